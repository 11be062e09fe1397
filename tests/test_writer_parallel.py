"""Parallel staging in the writer: independent files really render at the same time, the
manifest waits for them, and a failure (or Ctrl-C) in the middle leaves nothing behind."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from forgather_checkpoint import errors, writer
from forgather_checkpoint.writer import StagedWrite, commit_atomically
from tests.test_writer import NAMES, assert_unchanged, contents, put
from tests.test_writer import ckpt as ckpt  # noqa: F401 - the fixture, shared

RANK_NAMES = NAMES[:-1]
MANIFEST = NAMES[-1]
# Long enough never to fire on a loaded CI machine, short enough that a regression (serial
# renders) fails the test instead of hanging it.
TIMEOUT = 10.0


def _render(action: Callable[[Path], None]) -> Callable[[Path, Mapping[Path, Path]], None]:
    def render(temp: Path, _rendered: Mapping[Path, Path]) -> None:
        action(temp)

    return render


def _check(data: bytes) -> Callable[[Path], None]:
    def validate(temp: Path) -> None:
        if temp.read_bytes() != data:
            raise errors.ValidationError(f"{temp} is wrong")

    return validate


def test_independent_renders_run_concurrently(ckpt: Path) -> None:
    # Every render waits until all of them have started: serial rendering breaks the barrier.
    barrier = threading.Barrier(len(RANK_NAMES), timeout=TIMEOUT)
    threads: set[str] = set()

    def meet(name: str) -> Callable[[Path], None]:
        def action(temp: Path) -> None:
            threads.add(threading.current_thread().name)
            barrier.wait()
            temp.write_bytes(b"new " + name.encode())

        return action

    writes = [StagedWrite(ckpt / n, _render(meet(n)), _check(b"new " + n.encode()))
              for n in RANK_NAMES]
    commit_atomically(ckpt, writes)
    assert len(threads) == len(RANK_NAMES) and threading.current_thread().name not in threads
    assert all((ckpt / n).read_bytes() == b"new " + n.encode() for n in RANK_NAMES)


def test_validations_run_concurrently_too(ckpt: Path) -> None:
    barrier = threading.Barrier(len(RANK_NAMES), timeout=TIMEOUT)

    def validate(temp: Path) -> None:
        barrier.wait()
        assert temp.read_bytes() == b"v"

    commit_atomically(ckpt, [StagedWrite(ckpt / n, _render(lambda t: t.write_bytes(b"v")),
                                         validate) for n in RANK_NAMES])
    assert (ckpt / RANK_NAMES[-1]).read_bytes() == b"v"


def test_dependent_write_runs_after_every_independent_one(ckpt: Path) -> None:
    finished: list[str] = []
    seen: dict[Path, bytes] = {}

    def slow(name: str, delay: float) -> Callable[[Path], None]:
        def action(temp: Path) -> None:
            time.sleep(delay)
            temp.write_bytes(name.encode())
            finished.append(name)

        return action

    def manifest(temp: Path, rendered: Mapping[Path, Path]) -> None:
        assert sorted(finished) == sorted(RANK_NAMES)  # all of them, not merely the earlier
        seen.update({target: path.read_bytes() for target, path in rendered.items()})
        temp.write_bytes(b"manifest")

    writes = [StagedWrite(ckpt / MANIFEST, manifest, _check(b"manifest"), after_others=True)]
    writes += [StagedWrite(ckpt / n, _render(slow(n, 0.05 * (4 - i))), _check(n.encode()))
               for i, n in enumerate(RANK_NAMES)]
    commit_atomically(ckpt, writes)
    assert seen == {ckpt / n: n.encode() for n in RANK_NAMES}
    assert (ckpt / MANIFEST).read_bytes() == b"manifest"


def test_failure_in_one_parallel_render_leaves_nothing(ckpt: Path) -> None:
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))
    barrier = threading.Barrier(len(RANK_NAMES), timeout=TIMEOUT)
    failed = threading.Event()
    manifest_rendered = threading.Event()

    def ok(temp: Path) -> None:
        barrier.wait()
        # Still writing when the other render has already failed: staging must wait for this
        # one before removing the temps, or the late write would leave a stray file behind.
        failed.wait(TIMEOUT)
        time.sleep(0.05)
        temp.write_bytes(b"late but complete")

    def broken(temp: Path) -> None:
        barrier.wait()
        temp.write_bytes(b"partial")
        failed.set()
        raise OSError(errno.ENOSPC, "No space left on device")

    def later_error(temp: Path) -> None:
        barrier.wait()
        failed.wait(TIMEOUT)
        time.sleep(0.1)
        raise RuntimeError("a second, later failure must not hide the first")

    actions = [ok, broken, later_error, ok]
    writes = [StagedWrite(ckpt / n, _render(action), lambda t: None)
              for n, action in zip(RANK_NAMES, actions)]
    writes.append(StagedWrite(ckpt / MANIFEST, lambda t, r: manifest_rendered.set(),
                              lambda t: None, after_others=True))
    with pytest.raises(errors.CommitError, match="No space left on device.*nothing was changed"):
        commit_atomically(ckpt, writes)
    assert not manifest_rendered.is_set()
    assert_unchanged(ckpt, before, listing)


def test_validation_failure_in_one_thread_wins_and_leaves_nothing(ckpt: Path) -> None:
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))
    writes = [put(ckpt / n, b"new", bad=(i == 2)) for i, n in enumerate(RANK_NAMES)]
    with pytest.raises(errors.ValidationError):
        commit_atomically(ckpt, writes)
    assert_unchanged(ckpt, before, listing)


def test_interrupt_on_the_calling_thread_waits_for_workers(ckpt: Path) -> None:
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))
    release = threading.Event()

    def quick(temp: Path) -> None:
        temp.write_bytes(b"quick")

    def slow(temp: Path) -> None:
        release.wait(TIMEOUT)
        temp.write_bytes(b"slow")

    def progress(phase: str, done: int, total: int) -> None:
        # Ctrl-C while other renders are still running, as a user would press it.
        if phase == "stage":
            release.set()
            raise KeyboardInterrupt

    writes = [StagedWrite(ckpt / RANK_NAMES[0], _render(quick), lambda t: None)]
    writes += [StagedWrite(ckpt / n, _render(slow), lambda t: None) for n in RANK_NAMES[1:]]
    with pytest.raises(KeyboardInterrupt):
        commit_atomically(ckpt, writes, progress=progress)
    assert_unchanged(ckpt, before, listing)


def test_progress_arrives_on_the_calling_thread_in_order(ckpt: Path) -> None:
    calls: list[tuple[str, int, int, str]] = []

    def progress(phase: str, done: int, total: int) -> None:
        calls.append((phase, done, total, threading.current_thread().name))

    writes = [put(ckpt / n, b"x") for n in RANK_NAMES]
    writes.append(StagedWrite(ckpt / MANIFEST, lambda t, r: t.write_bytes(b"m"),
                              lambda t: None, after_others=True))
    commit_atomically(ckpt, writes, progress=progress)
    me = threading.current_thread().name
    assert {thread for *_, thread in calls} == {me}
    for phase in ("stage", "validate", "replace"):
        assert [done for p, done, total, _ in calls if p == phase] == [1, 2, 3, 4, 5]
        assert {total for p, _, total, _ in calls if p == phase} == {5}


def test_each_stage_failpoint_fires_once_per_file(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fired: list[str] = []
    lock = threading.Lock()

    def record(name: str) -> None:
        with lock:
            fired.append(name)

    monkeypatch.setattr(writer, "failpoint", record)
    writes = [put(ckpt / n, b"x") for n in RANK_NAMES]
    writes.append(StagedWrite(ckpt / MANIFEST, lambda t, r: t.write_bytes(b"m"),
                              lambda t: None, after_others=True))
    commit_atomically(ckpt, writes)
    stages = [name for name in fired if name.startswith("after-stage-")]
    assert sorted(stages) == [f"after-stage-{i}" for i in range(1, 6)]
    # The manifest (the 5th write) is staged last; "after-validate" follows every stage.
    assert stages[-1] == "after-stage-5"
    assert fired.index("after-validate") > max(fired.index(s) for s in stages)


@pytest.mark.parametrize("point", ["after-stage-2", "after-stage-5"])
def test_enospc_at_a_stage_failpoint_changes_nothing(
    ckpt: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))
    monkeypatch.setenv("FORGATHER_CHECKPOINT_FAILPOINTS", f"{point}=enospc")
    writes = [put(ckpt / n, b"new") for n in RANK_NAMES]
    writes.append(StagedWrite(ckpt / MANIFEST, lambda t, r: t.write_bytes(b"m"),
                              lambda t: None, after_others=True))
    with pytest.raises(errors.CommitError, match=f"failpoint {point}"):
        commit_atomically(ckpt, writes)
    assert_unchanged(ckpt, before, listing)


def test_thread_count_is_capped(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "STAGING_THREADS", 2)
    active, peak = 0, 0
    lock = threading.Lock()

    def counted(temp: Path) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        temp.write_bytes(b"c")

    commit_atomically(ckpt, [StagedWrite(ckpt / n, _render(counted), _check(b"c"))
                             for n in NAMES])
    assert peak == 2
