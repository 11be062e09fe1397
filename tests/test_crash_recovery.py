"""Fault injection: a real child process commits 4 rank files + manifest (~7 MB) and is killed
(SIGKILL) at every failpoint and at random instants, or meets a full disk / write errors.
After each, recovery must leave every file all-old or all-new, byte for byte, loadable."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgather_checkpoint import writer
from forgather_checkpoint.locking import LOCK_NOTE_NAME
from tests.writer_support import (
    RANKS,
    assert_loadable,
    assert_no_leftovers,
    build_template,
    child_spec,
    classify,
    copy_template,
    run_child,
    snapshot,
    start_child,
    was_killed,
)

N_FILES = RANKS + 1
# Kill points before the journal's rename: the commit never happened => all old.
BEFORE_COMMIT_POINT = [
    "after-lock",
    *[f"after-stage-{i}" for i in range(1, N_FILES + 1)],
    "after-validate",
]
# From the journal on, the commit is decided => all new after recovery.
AFTER_COMMIT_POINT = [
    "after-journal",
    *[f"after-backup-{i}" for i in range(1, N_FILES + 1)],
    *[f"after-replace-{i}" for i in range(1, N_FILES + 1)],
    "before-history",
    "before-journal-complete",
    "after-journal-complete",
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def ckpt_and_new(template: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    return copy_template(template, tmp_path)


def _recover_and_check(ckpt: Path, new: Path, old: dict[str, bytes]) -> str:
    expected_new = snapshot(new)
    assert writer.pending_commit(ckpt) is not None
    writer.recover(ckpt)
    outcome = classify(ckpt, old, expected_new)
    assert_no_leftovers(ckpt)
    assert_loadable(ckpt)
    assert writer.recover(ckpt) is None  # idempotent: nothing left to do
    return outcome


@pytest.mark.parametrize("point", BEFORE_COMMIT_POINT + AFTER_COMMIT_POINT)
def test_kill_at_every_failpoint(point: str, ckpt_and_new: tuple[Path, Path]) -> None:
    ckpt, new = ckpt_and_new
    old = snapshot(ckpt)
    mtime = os.stat(ckpt).st_mtime_ns
    proc = run_child(child_spec(ckpt, new), failpoints=f"{point}=kill")
    assert was_killed(proc.returncode), proc.stdout + proc.stderr
    outcome = _recover_and_check(ckpt, new, old)
    assert outcome == ("old" if point in BEFORE_COMMIT_POINT else "new")
    # The dead process recorded the original directory time in its lock note / journal.
    assert os.stat(ckpt).st_mtime_ns == mtime
    history = writer.read_history(ckpt)
    assert len(history) == (1 if outcome == "new" else 0)
    if outcome == "new":
        # The originals were kept: NAME.bak holds each file's pre-edit bytes.
        for name, data in old.items():
            assert (ckpt / f"{name}.bak").read_bytes() == data


def test_next_commit_recovers_first(ckpt_and_new: tuple[Path, Path]) -> None:
    """Not only `recover`: the next commit finishes an interrupted one before its own."""
    ckpt, new = ckpt_and_new
    old = snapshot(ckpt)
    assert was_killed(
        run_child(child_spec(ckpt, new), failpoints="after-replace-2=kill").returncode
    )
    result = writer.commit_atomically(
        ckpt,
        [writer.StagedWrite(ckpt / "extra.txt", lambda t, _: t.write_bytes(b"x"), lambda t: None)],
    )
    assert result.recovered is not None and result.recovered.action == "rolled-forward"
    assert result.stale_holder is not None and result.stale_holder.alive is False
    assert classify(ckpt, old, snapshot(new)) == "new"
    assert_no_leftovers(ckpt)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # killed while finishing a roll-forward: recovering again finishes it
        ("after-replace-2=kill", "recover-replace-1=kill", "new"),
        # an EIO made the child undo its commit, and it was killed while undoing: undo again
        ("after-replace-4=eio,rollback-restore-2=kill", None, "old"),
    ],
)
def test_kill_during_recovery(
    first: str, second: str | None, expected: str, ckpt_and_new: tuple[Path, Path]
) -> None:
    ckpt, new = ckpt_and_new
    old = snapshot(ckpt)
    assert was_killed(run_child(child_spec(ckpt, new), failpoints=first).returncode)
    if second:
        code = "import sys; from forgather_checkpoint.writer import recover; recover(sys.argv[1])"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(ckpt)],
            env={**os.environ, "FORGATHER_CHECKPOINT_FAILPOINTS": second},
            capture_output=True,
        )
        assert was_killed(proc.returncode), proc.stderr
    assert _recover_and_check(ckpt, new, old) == expected


def _wait_for_commit_start(ckpt: Path, proc: subprocess.Popen) -> bool:
    """Spin until the child holds the lock (its note appears); False if it exited first."""
    while not (ckpt / LOCK_NOTE_NAME).exists():
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def test_kill_at_random_instants(template: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL at a random instant of the commit itself (staging ~7 MB, journal, replaces)."""
    seed = int(os.environ.get("FGC_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Time two undisturbed commits, from taking the lock to exit, to know the window to aim at.
    durations = []
    for run in range(2):
        ckpt, new = copy_template(template, tmp_path / f"timing-{run}")
        proc = start_child(child_spec(ckpt, new, chunk=1 << 16))
        assert _wait_for_commit_start(ckpt, proc)
        started = time.monotonic()
        proc.communicate()
        durations.append(time.monotonic() - started)
    window = min(durations)
    outcomes = {"old": 0, "new": 0, "finished": 0}
    runs = 16
    for run in range(runs):
        ckpt, new = copy_template(template, tmp_path / f"run-{run}")
        old = snapshot(ckpt)
        proc = start_child(child_spec(ckpt, new, chunk=1 << 16))
        if _wait_for_commit_start(ckpt, proc):
            time.sleep(rng.uniform(0, window))
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == 0:
            outcomes["finished"] += 1
            assert classify(ckpt, old, snapshot(new)) == "new"
            assert_no_leftovers(ckpt)
            continue
        assert was_killed(proc.returncode)
        writer.recover(ckpt)
        outcomes[classify(ckpt, old, snapshot(new))] += 1
        assert_no_leftovers(ckpt)
        assert_loadable(ckpt)
    print(f"random kills (seed {seed}, window {window:.3f}s): {outcomes}")
    assert sum(outcomes.values()) == runs


@pytest.mark.parametrize(
    "failpoints",
    [
        "after-stage-3=enospc",
        "after-validate=eio",
        "after-journal=eio",
        "after-backup-2=enospc",
        "after-replace-1=eio",
        f"after-replace-{N_FILES}=enospc",
        "before-history=enospc",
        "before-journal-complete=eio",
    ],
)
def test_injected_write_errors_change_nothing(
    failpoints: str, ckpt_and_new: tuple[Path, Path]
) -> None:
    ckpt, new = ckpt_and_new
    old = snapshot(ckpt)
    listing = sorted(os.listdir(ckpt))
    mtime = os.stat(ckpt).st_mtime_ns
    proc = run_child(child_spec(ckpt, new), failpoints=failpoints)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert '"error": "CommitError"' in proc.stdout
    reason = "No space left on device" if "enospc" in failpoints else "Input/output error"
    assert reason in proc.stdout and "nothing was changed" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert snapshot(ckpt) == old
    assert sorted(os.listdir(ckpt)) == listing  # no .bak, no history, no journal, no lock note
    assert os.stat(ckpt).st_mtime_ns == mtime
    assert_no_leftovers(ckpt)


def _limit_file_size() -> None:
    # 1 MiB is smaller than one rank file: the render's write fails with EFBIG. SIGXFSZ would
    # kill the child instead of letting it report, so ignore it as a careful program would.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_file_size_limit_changes_nothing(ckpt_and_new: tuple[Path, Path]) -> None:
    ckpt, new = ckpt_and_new
    old = snapshot(ckpt)
    listing = sorted(os.listdir(ckpt))
    mtime = os.stat(ckpt).st_mtime_ns
    proc = run_child(child_spec(ckpt, new), preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "File too large" in proc.stdout and "nothing was changed" in proc.stdout
    assert snapshot(ckpt) == old
    assert sorted(os.listdir(ckpt)) == listing
    assert os.stat(ckpt).st_mtime_ns == mtime
    assert_no_leftovers(ckpt)
