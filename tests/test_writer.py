"""The writer service on tmp_path: commit, backups, failures, history, restore, programmatic API."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from forgather_checkpoint import errors, writer
from forgather_checkpoint.locking import LOCK_NOTE_NAME
from forgather_checkpoint.writer import StagedWrite, commit_atomically
from tests.writer_support import assert_no_leftovers

OLD_MTIME = 1_700_000_000_000_000_000
NAMES = [f"optimizer_state_rank_{r}.pt" for r in range(4)] + ["checkpoint_manifest.json"]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint-5"
    path.mkdir()
    for name in NAMES:
        (path / name).write_bytes(b"old " + name.encode())
        os.chmod(path / name, 0o640)
    os.utime(path, ns=(OLD_MTIME, OLD_MTIME))
    return path


def put(target: Path, data: bytes, *, bad: bool = False) -> StagedWrite:
    def validate(temp: Path) -> None:
        if bad or temp.read_bytes() != data:
            raise errors.ValidationError(f"{temp} is wrong")

    return StagedWrite(target, lambda temp, _: temp.write_bytes(data), validate)


def contents(ckpt: Path) -> dict[str, bytes]:
    return {n: (ckpt / n).read_bytes() for n in NAMES}


def assert_unchanged(ckpt: Path, before: dict[str, bytes], listing: list[str]) -> None:
    assert contents(ckpt) == before
    assert sorted(os.listdir(ckpt)) == listing
    assert os.stat(ckpt).st_mtime_ns == OLD_MTIME
    assert_no_leftovers(ckpt)


def test_commit_replaces_every_file_and_keeps_originals(ckpt: Path) -> None:
    inodes = {n: os.stat(ckpt / n).st_ino for n in NAMES}
    result = commit_atomically(
        ckpt,
        [put(ckpt / n, b"new " + n.encode()) for n in NAMES],
        record={"component": "optimizer", "changes": [{"path": "lr", "old": 1e-3, "new": 5e-4}]},
    )
    for n in NAMES:
        assert (ckpt / n).read_bytes() == b"new " + n.encode()
        assert stat.S_IMODE(os.stat(ckpt / n).st_mode) == 0o640
        # Zero-copy backup: NAME.bak *is* the original inode.
        assert os.stat(ckpt / f"{n}.bak").st_ino == inodes[n]
        assert (ckpt / f"{n}.bak").read_bytes() == b"old " + n.encode()
    assert [b.method for b in result.backups] == ["hardlink"] * len(NAMES)
    assert result.copied_backups == ()
    assert os.stat(ckpt).st_mtime_ns == OLD_MTIME
    assert_no_leftovers(ckpt)
    (entry,) = writer.read_history(ckpt)
    assert entry.id == result.commit_id and entry.action == "modify"
    assert entry.record["changes"][0]["new"] == 5e-4
    assert [f.path for f in entry.files] == NAMES
    assert entry.files[0].old["size"] == len(b"old " + NAMES[0].encode())


def test_bak_is_never_overwritten_later_backups_go_to_history(ckpt: Path) -> None:
    first = commit_atomically(ckpt, [put(ckpt / NAMES[0], b"v1")])
    second = commit_atomically(ckpt, [put(ckpt / NAMES[0], b"v2")])
    assert (ckpt / f"{NAMES[0]}.bak").read_bytes() == b"old " + NAMES[0].encode()
    assert first.backups[0].path == ckpt / f"{NAMES[0]}.bak"
    later = ckpt / ".forgather_checkpoint" / "backups" / second.commit_id / NAMES[0]
    assert second.backups[0].path == later and later.read_bytes() == b"v1"


def test_preexisting_bak_is_left_alone(ckpt: Path) -> None:
    (ckpt / f"{NAMES[0]}.bak").write_bytes(b"someone else's backup")
    result = commit_atomically(ckpt, [put(ckpt / NAMES[0], b"v1")])
    assert (ckpt / f"{NAMES[0]}.bak").read_bytes() == b"someone else's backup"
    assert result.backups[0].path.read_bytes() == b"old " + NAMES[0].encode()


def test_no_backup_drops_originals_after_commit(ckpt: Path) -> None:
    result = commit_atomically(ckpt, [put(ckpt / n, b"x") for n in NAMES], backup=False)
    assert result.backups == ()
    assert not list(ckpt.glob("*.bak"))
    assert not (ckpt / ".forgather_checkpoint" / "backups").exists()
    assert writer.read_history(ckpt)[0].files[0].backup is None
    with pytest.raises(errors.HistoryError, match="without a backup"):
        writer.plan_restore(ckpt, original=True)


def test_validation_failure_changes_nothing(ckpt: Path) -> None:
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))
    writes = [put(ckpt / n, b"new", bad=(i == 3)) for i, n in enumerate(NAMES)]
    with pytest.raises(errors.ValidationError):
        commit_atomically(ckpt, writes)
    assert_unchanged(ckpt, before, listing)


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("bug")]
)
def test_render_failure_changes_nothing(ckpt: Path, exc: BaseException) -> None:
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))

    def render(temp: Path, _: Mapping[Path, Path]) -> None:
        temp.write_bytes(b"partial")
        raise exc

    writes = [put(ckpt / NAMES[0], b"a"), StagedWrite(ckpt / NAMES[1], render, lambda t: None)]
    # Our errors become CommitError; a bug keeps its own type (and its traceback in the CLI).
    expected = errors.CommitError if isinstance(exc, OSError) else RuntimeError
    with pytest.raises(expected):
        commit_atomically(ckpt, writes)
    assert_unchanged(ckpt, before, listing)


@pytest.mark.parametrize(
    "point",
    [
        "after-journal",
        "after-backup-3",
        "after-replace-1",
        "after-replace-5",
        "before-history",
        "before-journal-complete",
    ],
)
def test_write_error_after_commit_point_is_undone(
    ckpt: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit_atomically(ckpt, [put(ckpt / NAMES[0], b"earlier edit")])
    before, listing = contents(ckpt), sorted(os.listdir(ckpt))
    history_before = (ckpt / ".forgather_checkpoint" / "history.jsonl").read_bytes()
    monkeypatch.setenv("FORGATHER_CHECKPOINT_FAILPOINTS", f"{point}=eio")
    with pytest.raises(errors.CommitError, match="Input/output error.*nothing was changed"):
        commit_atomically(ckpt, [put(ckpt / n, b"new") for n in NAMES])
    assert_unchanged(ckpt, before, listing)
    assert (ckpt / ".forgather_checkpoint" / "history.jsonl").read_bytes() == history_before
    assert not (ckpt / ".forgather_checkpoint" / "backups").exists()


def test_symlinked_file_is_edited_at_its_target(ckpt: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    real = shared / "optimizer_state.pt"
    real.write_bytes(b"old shared")
    os.chmod(real, 0o600)
    (ckpt / "optimizer_state.pt").symlink_to(real)
    shared_mtime = os.stat(shared).st_mtime_ns
    commit_atomically(ckpt, [put(ckpt / "optimizer_state.pt", b"new shared")])
    assert (ckpt / "optimizer_state.pt").is_symlink()
    assert real.read_bytes() == b"new shared" and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert (ckpt / "optimizer_state.pt.bak").read_bytes() == b"old shared"
    assert os.stat(shared).st_mtime_ns == shared_mtime
    assert not [p for p in shared.iterdir() if ".fgc-tmp-" in p.name]


def test_hardlink_impossible_falls_back_to_copy(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writer.os, "link", no_link)
    result = commit_atomically(ckpt, [put(ckpt / NAMES[0], b"new")])
    assert [b.method for b in result.copied_backups] == ["copy"]
    assert (ckpt / f"{NAMES[0]}.bak").read_bytes() == b"old " + NAMES[0].encode()
    assert writer.read_history(ckpt)[0].files[0].backup_method == "copy"


def test_dependent_render_sees_the_other_temps(ckpt: Path) -> None:
    seen: dict[Path, int] = {}

    def manifest(temp: Path, rendered: Mapping[Path, Path]) -> None:
        seen.update({t: p.stat().st_size for t, p in rendered.items()})
        temp.write_bytes(b"manifest")

    # Listed first on purpose: after_others, not the position, decides that it runs last.
    writes = [
        StagedWrite(ckpt / NAMES[-1], manifest, lambda t: None, after_others=True),
        put(ckpt / NAMES[0], b"12345"),
    ]
    commit_atomically(ckpt, writes)
    assert seen == {ckpt / NAMES[0]: 5}


def test_new_file_is_created_and_undone(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGATHER_CHECKPOINT_FAILPOINTS", "after-replace-2=enospc")
    with pytest.raises(errors.CommitError):
        commit_atomically(ckpt, [put(ckpt / "brand_new.pt", b"n"), put(ckpt / NAMES[0], b"x")])
    assert not (ckpt / "brand_new.pt").exists()
    monkeypatch.delenv("FORGATHER_CHECKPOINT_FAILPOINTS")
    result = commit_atomically(ckpt, [put(ckpt / "brand_new.pt", b"n")])
    assert (ckpt / "brand_new.pt").read_bytes() == b"n" and result.backups == ()


def test_progress_and_duplicate_targets(ckpt: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    commit_atomically(
        ckpt, [put(ckpt / n, b"x") for n in NAMES[:2]], progress=lambda *a: calls.append(a)
    )
    assert ("stage", 2, 2) in calls and ("validate", 2, 2) in calls and ("replace", 2, 2) in calls
    with pytest.raises(errors.CommitError, match="same file"):
        commit_atomically(ckpt, [put(ckpt / NAMES[0], b"a"), put(ckpt / NAMES[0], b"b")])
    with pytest.raises(errors.CheckpointNotFoundError):
        commit_atomically(ckpt / "missing", [put(ckpt / NAMES[0], b"a")])


def test_leftovers_are_reported_then_recovered(ckpt: Path) -> None:
    stray = ckpt / f".{NAMES[0]}.fgc-tmp-99999-deadbeef"
    stray.write_bytes(b"junk")
    (ckpt / LOCK_NOTE_NAME).write_text(
        json.dumps(
            {
                "pid": 999999,
                "host": socket.gethostname(),
                "started": "2026-01-01T00:00:00",
                "user": "x",
                "command": "crashed",
                "dir_times": {str(ckpt): [OLD_MTIME, OLD_MTIME]},
            }
        )
    )
    assert writer.find_temp_files(ckpt) == [stray]
    pending = writer.pending_commit(ckpt)
    assert pending is not None and pending.phase == "staging" and not pending.in_progress
    result = writer.recover(ckpt)
    assert result is not None and result.removed_temp_files == (stray,)
    assert result.stale_holder is not None and result.stale_holder.pid == 999999
    assert writer.pending_commit(ckpt) is None
    assert_no_leftovers(ckpt)
    assert os.stat(ckpt).st_mtime_ns == OLD_MTIME


def test_restore_original_to_and_undo(ckpt: Path) -> None:
    a = commit_atomically(ckpt, [put(ckpt / n, b"v1") for n in NAMES[:2]])
    b = commit_atomically(ckpt, [put(ckpt / n, b"v2") for n in NAMES[1:3]])
    # undo the last entry: f1 back to v1, f2 back to old
    undo = writer.plan_restore(ckpt)
    assert {i.target.name for i in undo.items} == set(NAMES[1:3])
    writer.restore(ckpt, undo)
    assert [(ckpt / n).read_bytes() for n in NAMES[:3]] == [
        b"v1",
        b"v1",
        b"old " + NAMES[2].encode(),
    ]
    # back to right after entry b (the restore itself is in the history and can be undone)
    writer.restore(ckpt, writer.plan_restore(ckpt, to=b.commit_id))
    assert [(ckpt / n).read_bytes() for n in NAMES[:3]] == [b"v1", b"v2", b"v2"]
    original = writer.plan_restore(ckpt, original=True)
    result = writer.restore(ckpt, original)
    assert contents(ckpt) == {n: b"old " + n.encode() for n in NAMES}
    history = writer.read_history(ckpt)
    assert [e.action for e in history] == ["modify", "modify", "restore", "restore", "restore"]
    assert history[-1].id == result.commit_id and history[-1].record["original"] is True
    # Backups are never deleted by restores.
    assert (ckpt / f"{NAMES[0]}.bak").exists()
    assert (ckpt / ".forgather_checkpoint" / "backups" / b.commit_id).is_dir()
    assert a.commit_id in {e.id for e in history}
    assert os.stat(ckpt).st_mtime_ns == OLD_MTIME
    assert_no_leftovers(ckpt)


def test_restore_errors(ckpt: Path) -> None:
    with pytest.raises(errors.HistoryError, match="no edit history"):
        writer.plan_restore(ckpt)
    entry = commit_atomically(ckpt, [put(ckpt / NAMES[0], b"v1")])
    with pytest.raises(errors.HistoryError, match="not in the history"):
        writer.plan_restore(ckpt, to="nope")
    with pytest.raises(errors.HistoryError, match="latest entry"):
        writer.plan_restore(ckpt, to=entry.commit_id)
    (ckpt / f"{NAMES[0]}.bak").unlink()
    with pytest.raises(errors.HistoryError, match="is missing"):
        writer.plan_restore(ckpt, original=True)


class Opaque:
    """Pickled by reference, so not loadable with weights_only=True."""


def test_save_checkpoint_atomically_with_real_optimizer(tmp_path: Path) -> None:
    import torch

    from forgather_checkpoint import save_checkpoint_atomically

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "optimizer_state.pt"
    torch.save(opt.state_dict(), path)
    original = path.read_bytes()
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 5e-4
    save_checkpoint_atomically(path, state)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["param_groups"][0]["lr"] == 5e-4
    assert torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert (tmp_path / "optimizer_state.pt.bak").read_bytes() == original

    before = path.read_bytes()
    with pytest.raises(errors.ValidationError, match="weights_only"):
        save_checkpoint_atomically(path, {"x": Opaque()})
    assert path.read_bytes() == before
    assert_no_leftovers(tmp_path)


def test_writer_imports_neither_torch_nor_click() -> None:
    code = (
        "import sys, forgather_checkpoint.writer; "
        "assert 'torch' not in sys.modules and 'click' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
