"""Toy downstream tasks from held-out shards, in the jsonl layouts of `lory benchmark`.

A sanity check for models trained on the bundled sample corpus, which know nothing of the
paper's benchmarks: "which continuation follows this held-out passage?" written in the layouts
of HellaSwag (4 endings) and PIQA (2 solutions). The true continuation is the next words of
the same document; the distractors are the same stretch of words of other held-out documents.
Chance is 25% and 50%. These are NOT the paper's tasks.

    python benchmarks/toy_tasks.py runs/sample-corpus/heldout --out runs/toy-tasks
    lory benchmark runs/sample-lory --tasks hellaswag,piqa --data-dir runs/toy-tasks --compare runs/sample-dense
    # the same tasks with plain lm-eval on an export-hf folder (same scores; README):
    lm_eval run --model hf --model_args pretrained=runs/sample-lory-hf,trust_remote_code=True \
        --include_path lorytrain/harness/tasks --tasks lory_hellaswag,lory_piqa --metadata '{"data_dir": "runs/toy-tasks"}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from lorydata.dataset import ShardDataset
from lorydata.folder_tokenizer import known_tokenizer_file
from lorydata.tokenizer import Tokenizer


def passages(heldout: str, context_words: int, ending_words: int) -> list[tuple[str, str, str]]:
    """(domain, context, true ending) of every held-out document span long enough."""
    dataset = ShardDataset(heldout, shuffle=False, epochs=1, even=False, with_metadata=True)
    found = known_tokenizer_file(heldout, dataset.manifest)
    if found is None:
        raise SystemExit(f"{heldout} carries no tokenizer.json (build it again with this lory)")
    tok = Tokenizer(found)
    out = []
    for sample in dataset:
        ids = sample["input_ids"].tolist()
        starts = [*sample["doc_starts"], len(ids)]
        for (lo, hi), domain in zip(itertools.pairwise(starts), sample["domains"], strict=False):
            words = tok.decode([t for t in ids[lo:hi] if t not in (tok.eos_id, tok.pad_id)]).split()
            if len(words) >= context_words + ending_words:
                out.append((domain, " ".join(words[:context_words]),
                            " ".join(words[context_words : context_words + ending_words])))
    return out


def build(heldout: str, out: str, context_words: int = 24, ending_words: int = 8, limit: int = 200,
          seed: int = 0) -> dict:
    """Write hellaswag/test.jsonl and piqa/test.jsonl under `out`; returns the counts."""
    rng = random.Random(seed)
    items = passages(heldout, context_words, ending_words)
    rng.shuffle(items)
    items = items[:limit]
    if len(items) < 4:
        raise SystemExit(f"{heldout} has too few long documents ({len(items)})")
    hellaswag, piqa = [], []
    for index, (_, context, ending) in enumerate(items):
        others = [items[j][2] for j in rng.sample([j for j in range(len(items)) if j != index], 3)]
        label = rng.randrange(4)
        endings = [*others[:label], ending, *others[label:]]
        hellaswag.append({"ctx": context, "endings": endings, "label": label})
        first = rng.randrange(2)
        sols = [ending, others[0]] if first == 0 else [others[0], ending]
        piqa.append({"goal": context, "sol1": sols[0], "sol2": sols[1], "label": first})
    for name, docs in (("hellaswag", hellaswag), ("piqa", piqa)):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return {"hellaswag": len(hellaswag), "piqa": len(piqa)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("heldout", help="held-out shard folder (e.g. runs/sample-corpus/heldout)")
    parser.add_argument("--out", required=True, help="data dir for lory benchmark --data-dir")
    parser.add_argument("--limit", type=int, default=200, help="examples per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.heldout, args.out, limit=args.limit, seed=args.seed))


if __name__ == "__main__":
    main()
