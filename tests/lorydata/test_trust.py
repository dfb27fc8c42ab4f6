"""Shard folders from elsewhere: names that leave the folder, the tokenizer a folder carries,
out-of-range token ids, and the one-writer lock."""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from lorydata.confine import OutsideFolderError, inside
from lorydata.dataset import ShardDataset
from lorydata.errors import ShardError
from lorydata.folder_tokenizer import known_tokenizer_file, shard_tokenizer_file
from lorydata.hashing import file_sha256
from lorydata.lock import LOCK_NAME, FolderLock, FolderLockedError, LockOwner
from lorydata.manifest import Manifest
from lorydata.tokenizer import DEFAULT_TOKENIZER
from lorydata.verify import inspect_folder, verify_folder
from tests.lorydata.shardkit import build_shards, make_documents, run_cli
from tests.lorydata.trustkit import edit_manifest, set_token


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ---- names in a manifest ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_manifest_shard_names_outside_the_folder_are_refused(tmp_path, capsys, kind):
    """A shard `file` that is absolute, climbs out with `..` or is a symlink leading out is
    refused in one line naming the manifest and the entry, even when it names a valid shard."""
    elsewhere = tmp_path / "elsewhere"
    build_shards(elsewhere, make_documents(12), rows_per_shard=4)
    folder = tmp_path / "corpus"
    manifest = build_shards(folder, make_documents(12), rows_per_shard=4)
    victim = manifest.shards[0].file
    outside = elsewhere / victim  # a valid shard, of the same content and hash
    if kind == "symlink":
        (folder / victim).unlink()
        (folder / victim).symlink_to(outside)
        name = victim
    else:
        name = str(outside) if kind == "absolute" else f"../elsewhere/{victim}"
        edit_manifest(folder, lambda data: data["shards"][0].update(file=name))
    with pytest.raises(OutsideFolderError) as info:
        Manifest.read(folder)
    message = str(info.value)
    assert "\n" not in message and "manifest.json" in message and repr(name) in message and "shard file" in message
    code, _, err = run_cli(["inspect", str(folder)], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and repr(name) in lines[0], err
    with pytest.raises(OutsideFolderError):
        ShardDataset(folder)


def test_plain_names_and_symlinks_inside_the_folder_are_fine(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "a")
    assert inside(tmp_path, "sub/a", source="test", entry="file") == tmp_path / "sub" / "a"
    assert inside(tmp_path, "link", source="test", entry="file") == tmp_path / "link"
    for bad in ["", "/etc/passwd", "a/../../b", "./a", "a//b", "a\\b", 5, None]:
        with pytest.raises(OutsideFolderError, match="test: file"):
            inside(tmp_path, bad, source="test", entry="file")


# ---- the tokenizer a folder carries ----------------------------------------------------------
def test_tokenizer_file_beside_the_manifest_is_verified_and_paths_are_never_read(tmp_path):
    folder = tmp_path / "corpus"
    manifest = build_shards(folder, make_documents(12))
    assert shard_tokenizer_file(folder, manifest) is None  # an older folder: no `file` entry
    assert known_tokenizer_file(folder, manifest) == DEFAULT_TOKENIZER  # the bundled one made it
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the run folder")

    def point_at(name, sha=None):
        def edit(data):
            data["tokenizer"].update(file=name, path=str(secret))
            if sha:
                data["tokenizer"]["sha256"] = sha
        edit_manifest(folder, edit)
        return Manifest.read(folder)

    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    assert shard_tokenizer_file(folder, point_at("tokenizer.json")) == folder / "tokenizer.json"
    for name in (str(secret), "../secret.txt"):
        with pytest.raises(OutsideFolderError, match="tokenizer file"):
            shard_tokenizer_file(folder, point_at(name, file_sha256(secret)))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ShardError, match="sha256"):
        shard_tokenizer_file(folder, point_at("tokenizer.json"))
    # lory inspect reports the bad tokenizer file, and --show does not fall back to `path`
    _, report = verify_folder(folder)
    assert [c.file for c in report.failed] == ["tokenizer.json"]


def test_inspect_show_never_opens_the_manifest_path(tmp_path, capsys):
    """Decoding uses the tokenizer the folder carries (or the bundled one when it made the
    shards), never the absolute path a manifest records."""
    folder = tmp_path / "corpus"
    build_shards(folder, make_documents(12), seq_len=64)
    edit_manifest(folder, lambda data: data["tokenizer"].update(path="/nonexistent/tokenizer.json"))
    report = inspect_folder(folder, show=0)
    assert report["sequence"]["text"]
    edit_manifest(folder, lambda data: data["tokenizer"].update(sha256="0" * 64))  # not the bundled one
    code, _, err = run_cli(["inspect", str(folder), "--show", "0"], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "--tokenizer" in lines[0] and "/nonexistent" not in err


# ---- token ids -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [8192, 10**6, -3])
def test_out_of_range_token_ids_are_named_by_shard_and_row(tmp_path, capsys, value):
    folder = tmp_path / "corpus"
    manifest = build_shards(folder, make_documents(30), rows_per_shard=4)
    assert manifest.tokenizer["vocab_size"] == 8192
    set_token(folder, shard=1, row=2, position=5, value=value)
    victim = manifest.shards[1].file
    _, report = verify_folder(folder)
    assert [c.file for c in report.failed] == [victim]
    assert f"row 2 holds token id {value}" in report.failed[0].error and "[0, 8192)" in report.failed[0].error
    code, _, err = run_cli(["inspect", str(folder)], capsys)
    assert code == 1 and victim in err and "row 2" in err and "Traceback" not in err
    with pytest.raises(ShardError, match=rf"{victim}: row 2 holds token id {value}"):
        list(ShardDataset(folder, shuffle=False, epochs=1))


def test_in_range_ids_pass_and_the_check_is_per_shard(tmp_path):
    folder = tmp_path / "corpus"
    build_shards(folder, make_documents(30), rows_per_shard=4)
    set_token(folder, shard=0, row=0, position=0, value=8191)  # the last id is fine
    assert verify_folder(folder)[1].ok
    assert len(list(ShardDataset(folder, shuffle=False, epochs=1))) == Manifest.read(folder).num_rows


# ---- one writer per output -------------------------------------------------------------------
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(folder, **fields) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": None, "pid_namespace": "",
             "command": "lory test", "since": "2020-01-01T00:00:00Z", "token": "t0", **fields}
    if "pid_namespace" not in fields:
        owner["pid_namespace"] = os.readlink("/proc/self/ns/pid")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(owner))


def test_second_writer_is_refused_naming_the_owner(tmp_path):
    with FolderLock(tmp_path / "out", command="lory build-corpus") as lock:
        owner = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(FolderLockedError) as info:
            FolderLock(tmp_path / "out").acquire()
        message = str(info.value)
        assert "\n" not in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "lory build-corpus" in message and lock.held
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released on leaving the block
    FolderLock(tmp_path / "out").acquire().release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    messages = []
    lock = FolderLock(tmp_path).acquire(log=messages.append)
    assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and "took over the stale lock" in messages[0] and "no longer running" in messages[0]
    lock.release()


def test_lock_of_a_reused_pid_is_stale_but_a_live_owner_is_not(tmp_path):
    _write_lock(tmp_path, started=1)  # our pid, but a start time that is not ours: the pid was reused
    FolderLock(tmp_path).acquire().release()
    _write_lock(tmp_path, pid=1)  # init: alive
    with pytest.raises(FolderLockedError, match="pid 1 on"):
        FolderLock(tmp_path).acquire()


def test_other_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    _write_lock(tmp_path, host="elsewhere.example", pid=12345)
    with pytest.raises(FolderLockedError, match=r"elsewhere\.example.*refreshed 0 s ago"):
        FolderLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    messages = []
    FolderLock(tmp_path).acquire(log=messages.append).release()
    assert "not refreshed for" in messages[0]


def test_holder_refreshes_its_lock(tmp_path):
    lock = FolderLock(tmp_path, heartbeat=0.05).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    deadline = time.monotonic() + 30  # a generous bound for a loaded machine, not a timing check
    while time.time() - (tmp_path / LOCK_NAME).stat().st_mtime > 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 60
    lock.release()


def test_unreadable_lock_is_refused_not_taken(tmp_path):
    (tmp_path / LOCK_NAME).write_text("garbage")
    with pytest.raises(FolderLockedError, match="not a lory lock file"):
        FolderLock(tmp_path).acquire()
    assert LockOwner.parse(json.dumps({"host": "h", "pid": -1, "token": "x"})) is None  # never os.kill(-1)


def _race(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        lock = FolderLock(folder, heartbeat=0).acquire()
        results.put(("won", os.getpid()))
        time.sleep(1.0)  # hold it while the others try
        lock.release()
    except FolderLockedError:
        results.put(("refused", os.getpid()))


def test_racing_writers_on_a_stale_lock_yield_exactly_one_owner(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60)[0] for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(outcomes) == ["refused"] * 3 + ["won"]


def test_out_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception) as info:
        FolderLock(tmp_path / "file" / "out").acquire()
    assert "cannot create" in str(info.value) and "Not a directory" in str(info.value)
