#!/usr/bin/env python3
"""Build a small multi-domain development corpus from documentation that Debian packages ship.

    apt-get install -y git-doc postgresql-doc-15 perl-doc bible-kjv
    python3 make_dev_corpus.py OUT_DIR

Writes OUT_DIR/train.jsonl.zst and OUT_DIR/heldout.jsonl.zst (about 10% of documents, chosen
by id hash), one JSON object a line: {"id", "text", "domain", "source"}, and OUT_DIR/stats.json.
Domains: git (git's manuals), postgres (PostgreSQL's manual), perlpod (Perl's manual),
perlcode (Perl's standard modules), bible (King James Version, one chapter a document).
The texts keep their packages' licences (see /usr/share/doc/PACKAGE/copyright).

This is the team's original make_dev_corpus.py with one fix: the original shares one
ZstdCompressor between the train and held-out stream writers, which interleaves their
compression state and corrupts both files (train.jsonl.zst fails to decode after ~390 kB,
heldout.jsonl.zst has no zstd header). Each stream now has its own compressor.
"""
import glob
import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import sys

import zstandard

MAX_CHARS, MAX_DOCS, MIN_CHARS = 40_000, 1500, 200


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def html_text(src):
    src = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", "", src)
    return re.sub(r"\n\s*\n+", "\n\n", html.unescape(re.sub(r"<[^>]+>", "", src)))


def git():
    for p in sorted(glob.glob("/usr/share/doc/git-doc/**/*.txt*", recursive=True)):
        yield p, read(p)


def postgres():
    for p in sorted(glob.glob("/usr/share/doc/postgresql-doc-15/html/*.html")):
        yield p, html_text(read(p))


def perlpod():
    for p in sorted(glob.glob("/usr/share/perl/5.*/pod/*.pod") + glob.glob("/usr/share/perl/5.*/pod/**/*.pod", recursive=True)):
        yield p, read(p)


def perlcode():
    for p in sorted(glob.glob("/usr/share/perl/5.*/**/*.pm", recursive=True)):
        yield p, read(p)


def bible():
    out = subprocess.run(["bible", "-f", "Ge1:1-Re22:21"], capture_output=True, text=True, errors="replace").stdout
    chapter, lines = None, []
    for line in out.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) ", line)
        if m and (m.group(1), m.group(2)) != chapter:
            if lines:
                yield f"kjv:{chapter[0]}{chapter[1]}", "\n".join(lines)
            chapter, lines = (m.group(1), m.group(2)), []
        lines.append(line)
    if lines:
        yield f"kjv:{chapter[0]}{chapter[1]}", "\n".join(lines)


DOMAINS = dict(git=git, postgres=postgres, perlpod=perlpod, perlcode=perlcode, bible=bible)


def main(out):
    os.makedirs(out, exist_ok=True)
    cctx, seen, stats = zstandard.ZstdCompressor(level=19), set(), {}
    with open(f"{out}/train.jsonl.zst", "wb") as ft, open(f"{out}/heldout.jsonl.zst", "wb") as fh:
        wt, wh = cctx.stream_writer(ft), zstandard.ZstdCompressor(level=19).stream_writer(fh)
        for domain, docs in DOMAINS.items():
            n = chars = 0
            for source, text in docs():
                text = text.strip()[:MAX_CHARS]
                digest = hashlib.sha1(text.encode()).hexdigest()
                if len(text) < MIN_CHARS or digest in seen:
                    continue
                if n >= MAX_DOCS:
                    break
                seen.add(digest)
                record = {"id": digest[:16], "text": text, "domain": domain, "source": source}
                (wh if int(digest[:4], 16) % 10 == 0 else wt).write((json.dumps(record) + "\n").encode())
                n, chars = n + 1, chars + len(text)
            stats[domain] = {"docs": n, "chars": chars}
            print(domain, n, chars, flush=True)
        wt.close()
        wh.close()
    with open(f"{out}/stats.json", "w") as f:
        json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dev_corpus")
