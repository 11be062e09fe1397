"""verify_checkpoint on real checkpoints, damaged the ways checkpoints really get damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from forgather_checkpoint.discovery import MANIFEST_NAME
from forgather_checkpoint.errors import CheckpointNotFoundError
from forgather_checkpoint.examples import LAYOUTS
from forgather_checkpoint.verification import (
    VERIFY_SCHEMA,
    Note,
    Problem,
    VerifyReport,
    verify_checkpoint,
)

from .conftest import MakeCheckpoint
from .helpers import assert_unchanged, load, snapshot
from .writer_support import child_spec, run_child, was_killed


def edit_manifest(ckpt: Path, change: Any) -> None:
    path = ckpt / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def problems(report: VerifyReport) -> list[tuple[str, str | None, str | None]]:
    return [(p.severity, p.component, p.file) for p in report.problems]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fresh_checkpoints_verify_clean(make_checkpoint: MakeCheckpoint, layout: str) -> None:
    ckpt = make_checkpoint(layout=layout, world_size=4)
    before = snapshot(ckpt)
    report = verify_checkpoint(ckpt)
    assert report.problems == ()
    assert report.ok and report.clean
    assert report.components == ("optimizer", "scheduler", "trainer", "dataset", "rng")
    assert report.files_decoded == sum(
        1 for p in ckpt.iterdir() if p.name.endswith(".pt") and "_state" in p.name)
    assert_unchanged(ckpt, before)  # bytes, modes and the directory mtime


def test_per_rank_size_estimate_is_a_note(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=2)
    rank0 = (ckpt / "optimizer_state_rank_0.pt").stat().st_size
    total = rank0 + (ckpt / "optimizer_state_rank_1.pt").stat().st_size
    assert rank0 * 2 != total  # the stages differ in size, so the estimate is not the total
    report = verify_checkpoint(ckpt)
    assert report.clean
    (note,) = [n for n in report.notes if n.component == "optimizer"]
    assert f"size_bytes {rank0 * 2} is Forgather's estimate" in note.message
    assert f"total {total} bytes" in note.message


def test_unknown_field_in_a_component_entry_is_fatal(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()
    edit_manifest(ckpt, lambda m: m["components"]["optimizer"].update(modified_by="someone"))
    report = verify_checkpoint(ckpt)
    assert not report.ok
    assert problems(report) == [("error", "optimizer", MANIFEST_NAME)]
    assert "unknown field(s) modified_by" in report.problems[0].message
    assert "resume aborts" in report.problems[0].message
    assert any("found by file name" in n.message for n in report.notes)


def test_manifest_that_is_not_json(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()
    (ckpt / MANIFEST_NAME).write_text('{"components": ')
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("error", None, MANIFEST_NAME)]
    assert "not valid JSON" in report.problems[0].message


def test_manifest_top_level_problems(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()

    def damage(data: dict[str, Any]) -> None:
        del data["world_size"]
        data["timestamp"] = "yesterday"
        data["components"]["rng"]["sharing_pattern"] = "per_gpu"

    edit_manifest(ckpt, damage)
    report = verify_checkpoint(ckpt)
    messages = [p.message for p in report.errors]
    assert any("missing required field 'world_size'" in m for m in messages)
    assert any("timestamp 'yesterday'" in m for m in messages)
    assert any("unknown sharing_pattern 'per_gpu'" in m for m in messages)


def test_no_manifest_is_a_note(make_checkpoint: MakeCheckpoint) -> None:
    report = verify_checkpoint(make_checkpoint(manifest=False))
    assert report.clean
    assert [n.file for n in report.notes] == [MANIFEST_NAME]


def test_component_the_manifest_omits(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()
    edit_manifest(ckpt, lambda m: m["components"].pop("scheduler"))
    report = verify_checkpoint(ckpt)
    assert report.ok  # the resume works, but without the scheduler's state
    assert problems(report) == [("warning", "scheduler", None)]
    assert "skips it on resume" in report.problems[0].message


def test_missing_rank_file(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="ddp", world_size=4)
    (ckpt / "rng_state_rank_2.pt").unlink()
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("error", "rng", "rng_state_rank_2.pt")]
    assert "ranks [0, 1, 2, 3]" in report.problems[0].message


def test_missing_rank_without_manifest(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=4, manifest=False)
    (ckpt / "optimizer_state_rank_1.pt").unlink()
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("error", "optimizer", "optimizer_state_rank_1.pt")]


def test_manifest_ranks_short_of_world_size(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="ddp", world_size=2)
    (ckpt / "dataset_state_rank_1.pt").unlink()
    edit_manifest(ckpt, lambda m: m["components"]["dataset"].update(ranks=[0]))
    report = verify_checkpoint(ckpt)
    assert ("warning", "dataset", None) in problems(report)
    assert any("rank(s) 1 would find no file" in p.message for p in report.problems)


def test_truncated_file(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()
    path = ckpt / "optimizer_state.pt"
    size = path.stat().st_size
    with open(path, "r+b") as stream:
        stream.truncate(size // 2)
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("error", "optimizer", "optimizer_state.pt"),
                                ("warning", "optimizer", "optimizer_state.pt")]
    assert report.problems[0].message.startswith("does not decode: ")
    assert str(ckpt) not in report.problems[0].message  # the file is named by .file
    assert f"size_bytes is {size} but the file is {size // 2} bytes" in report.problems[1].message
    assert report.files_decoded == 5  # every other component file


def test_global_size_mismatch_is_exact(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="ddp")
    edit_manifest(ckpt, lambda m: m["components"]["scheduler"].update(
        size_bytes=m["components"]["scheduler"]["size_bytes"] + 1))
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("warning", "scheduler", "scheduler_state.pt")]


def test_per_rank_size_matching_nothing(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=2)
    edit_manifest(ckpt, lambda m: m["components"]["optimizer"].update(size_bytes=123))
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("warning", "optimizer", None)]
    assert "matching neither" in report.problems[0].message


def test_replica_that_disagrees(make_checkpoint: MakeCheckpoint) -> None:
    # A ddp optimizer is replicated: one file. A rank-named copy next to it is ignored by
    # Forgather, and here it does not even hold the same state.
    ckpt = make_checkpoint(layout="ddp", world_size=2)
    state = load(ckpt / "optimizer_state.pt")
    old_lr = state["param_groups"][0]["lr"]
    state["param_groups"][0]["lr"] = 0.5
    torch.save(state, ckpt / "optimizer_state_rank_1.pt")
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("warning", "optimizer", "optimizer_state_rank_1.pt")] * 2
    assert "Forgather ignores it" in report.problems[0].message
    assert f"lr (group 0) {old_lr!r} vs 0.5" in report.problems[1].message


def test_replica_that_agrees_is_only_stray(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="ddp", world_size=2)
    shutil.copy(ckpt / "trainer_state.pt", ckpt / "trainer_state_rank_1.pt")
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("warning", "trainer", "trainer_state_rank_1.pt")]


def test_scheduler_base_lrs_must_match_param_groups(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()
    state = load(ckpt / "scheduler_state.pt")
    state["base_lrs"].append(state["base_lrs"][0])
    torch.save(state, ckpt / "scheduler_state.pt")
    edit_manifest(ckpt, lambda m: m["components"]["scheduler"].update(
        size_bytes=(ckpt / "scheduler_state.pt").stat().st_size))
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("warning", "scheduler", "scheduler_state.pt")]
    assert "base_lrs has 3 entries but the optimizer has 2 param groups" in (
        report.problems[0].message)


def test_leftover_temp_file(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint()
    temp = ckpt / ".optimizer_state.pt.fgc-tmp-123-abc"
    temp.write_bytes(b"partial")
    report = verify_checkpoint(ckpt)
    assert report.ok
    assert problems(report) == [("warning", None, temp.name)]
    assert "forgather checkpoint recover" in report.problems[0].message


def test_interrupted_commit(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=2)
    new = tmp_path / "new"
    new.mkdir()
    names = ["optimizer_state_rank_0.pt", "optimizer_state_rank_1.pt"]
    for name in names:
        state = load(ckpt / name)
        state["param_groups"][0]["lr"] /= 2
        torch.save(state, new / name)
    # Killed right after the commit point: journal written, no file replaced yet.
    proc = run_child(child_spec(ckpt, new, names), failpoints="after-journal=kill")
    assert was_killed(proc.returncode), proc.stderr
    report = verify_checkpoint(ckpt)
    assert not report.ok
    first = report.problems[0]
    assert (first.severity, first.component, first.file) == ("error", None, None)
    assert "was interrupted" in first.message and "recover" in first.message
    assert "optimizer_state_rank_0.pt, optimizer_state_rank_1.pt" in first.message
    temps = {p.file for p in report.problems[1:] if p.severity == "warning"}
    assert {f".{name}" for name in names} <= {t.split(".fgc-tmp-")[0] for t in temps if t}


def test_missing_model_shard(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=2)
    (ckpt / "pytorch_model-00002-of-00002.bin").unlink()
    report = verify_checkpoint(ckpt)
    assert problems(report) == [("error", None, "pytorch_model-00002-of-00002.bin")]


def test_json_schema(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=2)
    (ckpt / "rng_state_rank_1.pt").unlink()
    (ckpt / ".trainer_state.pt.fgc-tmp-1-x").write_bytes(b"")
    report = verify_checkpoint(ckpt)
    document = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert list(document) == ["schema", "version", "checkpoint", "ok", "clean", "errors",
                              "warnings", "components", "files_decoded", "problems", "notes"]
    assert (document["schema"], document["version"]) == (VERIFY_SCHEMA, 1)
    assert (document["ok"], document["clean"], document["errors"], document["warnings"]) == (
        False, False, 1, 1)
    assert document["checkpoint"] == str(ckpt)
    assert document["problems"][0] == Problem(
        "error", "rng", "rng_state_rank_1.pt", report.problems[0].message).to_json()
    assert set(document["problems"][1]) == {"severity", "component", "file", "message"}
    assert all(set(n) == {"component", "file", "message"} for n in document["notes"])
    assert isinstance(report.notes[0], Note)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        verify_checkpoint(tmp_path / "nowhere")
