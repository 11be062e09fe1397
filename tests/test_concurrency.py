"""Eight real processes committing to one checkpoint at once, with and without waiting."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from forgather_checkpoint import errors, writer
from forgather_checkpoint.locking import LOCK_NOTE_NAME, acquire_lock
from tests.writer_support import assert_no_leftovers, child_spec, start_child

EDITORS = 8


def _launch(specs: list[str], go: Path, failpoints: str | None = None) -> list[dict]:
    procs = [start_child(spec, failpoints) for spec in specs]
    time.sleep(0.3)  # let every child import and spin on the go file: a real simultaneous start
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 1), err
        assert "Traceback" not in err, err
        results.append({**json.loads(out.strip().splitlines()[-1]), "code": proc.returncode})
    return results


def _content_dirs(tmp_path: Path, names: list[str], size: int) -> list[Path]:
    dirs = []
    for editor in range(EDITORS):
        d = tmp_path / f"editor-{editor}"
        d.mkdir()
        for name in names:
            # Distinct, recognisable content per editor (and per file).
            (d / name).write_bytes(f"{editor}:{name}:".encode() * (size // 16))
        dirs.append(d)
    return dirs


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint-1"
    path.mkdir()
    for i in range(EDITORS):
        (path / f"f{i}").write_bytes(b"original %d\n" % i)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return path


def test_eight_editors_different_files_all_succeed(ckpt: Path, tmp_path: Path) -> None:
    dirs = _content_dirs(tmp_path, [f"f{i}" for i in range(EDITORS)], 1 << 18)
    specs = [
        child_spec(ckpt, dirs[i], [f"f{i}"], wait=30, go_file=str(tmp_path / "go"), label=str(i))
        for i in range(EDITORS)
    ]
    results = _launch(specs, tmp_path / "go")
    assert all(r["ok"] for r in results)
    for i in range(EDITORS):
        assert (ckpt / f"f{i}").read_bytes() == (dirs[i] / f"f{i}").read_bytes()
        assert (ckpt / f"f{i}.bak").read_bytes() == b"original %d\n" % i
    assert sorted(e.id for e in writer.read_history(ckpt)) == sorted(r["id"] for r in results)
    assert_no_leftovers(ckpt)
    assert os.stat(ckpt).st_mtime_ns == 1_700_000_000_000_000_000


@pytest.mark.parametrize("wait", [30.0, 0.0])
def test_eight_editors_same_files(ckpt: Path, tmp_path: Path, wait: float) -> None:
    """Every editor rewrites the same 4 files. Waiting: all succeed, in some order. Not waiting
    (and each holding the lock a while): the refused ones say so and change nothing."""
    names = ["f0", "f1", "f2", "f3"]
    dirs = _content_dirs(tmp_path, names, 1 << 18)
    specs = [
        child_spec(ckpt, dirs[i], names, wait=wait, go_file=str(tmp_path / "go"), label=str(i))
        for i in range(EDITORS)
    ]
    # Hold the lock a little after taking it, so that without waiting there is real contention.
    results = _launch(specs, tmp_path / "go", failpoints="after-lock=sleep:0.2")
    succeeded = [r for r in results if r["ok"]]
    refused = [r for r in results if not r["ok"]]
    if wait:
        assert len(succeeded) == EDITORS
    else:
        assert 1 <= len(succeeded) < EDITORS
        for r in refused:
            assert r["code"] == 1 and r["error"] == "LockedError"
            assert "being edited by process" in r["message"] and "started" in r["message"]
    history = writer.read_history(ckpt)
    # Every reported success is recorded, nothing else is.
    assert len(history) == len(succeeded)
    assert {e.id for e in history} == {r["id"] for r in succeeded}
    # The files are one editor's content, all of them: the last committed one.
    last = int(history[-1].record["text"])
    for name in names:
        assert (ckpt / name).read_bytes() == (dirs[last] / name).read_bytes()
    # Each later commit kept the previous one's files in its backup folder: nothing was lost.
    for before, after in zip(history, history[1:]):
        for f in after.files:
            assert (
                f.backup is not None
                and (ckpt / f.backup).read_bytes()
                == (dirs[int(before.record["text"])] / f.path).read_bytes()
            )
    assert_no_leftovers(ckpt)
    assert os.stat(ckpt).st_mtime_ns == 1_700_000_000_000_000_000


def test_refused_editor_names_holder_and_touches_nothing(ckpt: Path, tmp_path: Path) -> None:
    lock = acquire_lock(ckpt)
    lock.protect_dirs([ckpt])
    try:
        listing = sorted(os.listdir(ckpt))
        before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != LOCK_NOTE_NAME}
        with pytest.raises(errors.LockedError, match=rf"process {os.getpid()} .*started"):
            writer.commit_atomically(
                ckpt,
                [writer.StagedWrite(ckpt / "f0", lambda t, _: t.write_bytes(b"x"), lambda t: None)],
            )
        assert sorted(os.listdir(ckpt)) == listing
        assert {n: (ckpt / n).read_bytes() for n in before} == before
    finally:
        lock.release()
    assert sorted(os.listdir(ckpt)) == sorted(set(listing) - {LOCK_NOTE_NAME})
    assert os.stat(ckpt).st_mtime_ns == 1_700_000_000_000_000_000


def test_waiting_editor_gets_the_lock_when_released(ckpt: Path, tmp_path: Path) -> None:
    import threading

    lock = acquire_lock(ckpt)
    lock.protect_dirs([ckpt])
    timer = threading.Timer(0.3, lock.release)
    timer.start()
    started = time.monotonic()
    result = writer.commit_atomically(
        ckpt,
        [writer.StagedWrite(ckpt / "f0", lambda t, _: t.write_bytes(b"x"), lambda t: None)],
        wait=5,
    )
    timer.join()
    assert time.monotonic() - started >= 0.25
    assert (ckpt / "f0").read_bytes() == b"x" and result.stale_holder is None
    assert_no_leftovers(ckpt)
    assert os.stat(ckpt).st_mtime_ns == 1_700_000_000_000_000_000
