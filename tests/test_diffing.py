"""diff_checkpoints / diff_ranks on real checkpoints, edited with real torch.load/torch.save."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from forgather_checkpoint.diffing import (
    DIFF_SCHEMA,
    DiffResult,
    Unmatched,
    ValueDifference,
    diff_checkpoints,
    diff_ranks,
)
from forgather_checkpoint.errors import ComponentNotFoundError, StateFileError

from .conftest import MakeCheckpoint
from .helpers import assert_unchanged, load, snapshot


def edit(path: Path, change: Any) -> None:
    """Load ``path`` as Forgather does, let ``change`` alter the state, save it back."""
    state = load(path)
    change(state)
    torch.save(state, path)


def set_lr(group: int, value: float) -> Any:
    def change(state: dict[str, Any]) -> None:
        state["param_groups"][group]["lr"] = value

    return change


def test_identical_builds_diff_as_equal(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint(layout="ddp", world_size=2)
    b = make_checkpoint(layout="ddp", world_size=2)
    result = diff_checkpoints(a, b)
    assert result.equal
    assert result.differences == () and result.only_in_a == () and result.only_in_b == ()
    # optimizer, scheduler, trainer, dataset x2, rng x2
    assert result.files_compared == 7
    assert result.to_json()["equal"] is True


def test_a_checkpoint_equals_itself_and_is_left_untouched(
    make_checkpoint: MakeCheckpoint,
) -> None:
    a = make_checkpoint(layout="pipeline", world_size=2)
    before = snapshot(a)
    assert diff_checkpoints(a, a).equal
    assert diff_ranks(a, "optimizer").differences  # reads every rank file
    assert_unchanged(a, before)


def test_one_edited_lr_is_the_only_difference(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint()
    b = make_checkpoint()
    old_lr = load(a / "optimizer_state.pt")["param_groups"][1]["lr"]
    edit(b / "optimizer_state.pt", set_lr(1, 0.5))
    result = diff_checkpoints(a, b)
    assert not result.equal
    assert result.differences == (
        ValueDifference("optimizer", "optimizer_state.pt", None, 1, "lr", old_lr, 0.5),
    )
    assert result.differences[0].location == "optimizer_state.pt[group 1] lr"


def test_checkpoints_of_different_steps_differ_in_lr_and_progress(
    make_checkpoint: MakeCheckpoint,
) -> None:
    # OneCycleLR over 4x the steps (+1): after 3 and 4 steps the learning rates differ.
    a = make_checkpoint(scheduler="onecycle", steps=3)
    b = make_checkpoint(scheduler="onecycle", steps=4)
    found = {(d.component, d.group, d.key): (d.a, d.b) for d in diff_checkpoints(a, b).differences}
    groups_a = load(a / "optimizer_state.pt")["param_groups"]
    groups_b = load(b / "optimizer_state.pt")["param_groups"]
    for index, (ga, gb) in enumerate(zip(groups_a, groups_b)):
        assert ga["lr"] != gb["lr"]
        assert found[("optimizer", index, "lr")] == (ga["lr"], gb["lr"])
    sched_a, sched_b = load(a / "scheduler_state.pt"), load(b / "scheduler_state.pt")
    assert found[("scheduler", None, "last_epoch")] == (3, 4)
    assert found[("scheduler", None, "_last_lr")] == (sched_a["_last_lr"], sched_b["_last_lr"])
    assert found[("scheduler", None, "total_steps")] == (13, 17)
    assert found[("trainer", None, "global_step")] == (3, 4)
    # base learning rates did not change, so they are not reported
    assert ("scheduler", None, "base_lrs") not in found
    assert ("optimizer", 0, "initial_lr") not in found


def test_component_filter(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint(steps=3)
    b = make_checkpoint(steps=4)
    result = diff_checkpoints(a, b, component="scheduler")
    assert result.differences
    assert {d.component for d in result.differences} == {"scheduler"}
    assert result.files_compared == 1
    with pytest.raises(ComponentNotFoundError, match="schedular"):
        diff_checkpoints(a, b, component="schedular")


def test_files_and_components_on_one_side(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint(scheduler="lambda")
    b = make_checkpoint(scheduler="none")
    (b / "rng_state_rank_1.pt").unlink()
    result = diff_checkpoints(a, b)
    assert result.only_in_a == (Unmatched("scheduler"), Unmatched("rng", "rng_state_rank_1.pt"))
    assert result.only_in_b == ()
    # Without a scheduler the optimizer groups have no initial_lr: absent in B, not None.
    absent = [d for d in result.differences if d.key == "initial_lr"]
    assert [(d.group, d.in_a, d.in_b, d.b) for d in absent] == [(0, True, False, None),
                                                                 (1, True, False, None)]
    reversed_result = diff_checkpoints(b, a, component="scheduler")
    assert reversed_result.only_in_b == (Unmatched("scheduler"),)
    assert reversed_result.differences == ()


def test_tensors_compare_by_description_only(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint()
    b = make_checkpoint()

    def scramble(state: dict[str, Any]) -> None:
        state["torch_rng_state"] = torch.flip(state["torch_rng_state"], [0])

    edit(b / "rng_state_rank_0.pt", scramble)
    assert diff_checkpoints(a, b).equal

    def retype(state: dict[str, Any]) -> None:
        state["torch_rng_state"] = state["torch_rng_state"].to(torch.int16)

    edit(b / "rng_state_rank_0.pt", retype)
    (difference,) = diff_checkpoints(a, b).differences
    assert (difference.file, difference.key) == ("rng_state_rank_0.pt", "torch_rng_state")
    assert difference.to_json()["a"]["value"] is None  # tensors are never serialised
    assert difference.to_json()["a"]["repr"].startswith("tensor(uint8")
    assert difference.to_json()["b"]["repr"].startswith("tensor(int16")


def test_non_tensor_optimizer_state_is_compared(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint()
    b = make_checkpoint()

    def tag(state: dict[str, Any]) -> None:
        state["state"][0]["note"] = "warm"

    edit(b / "optimizer_state.pt", tag)
    (difference,) = diff_checkpoints(a, b).differences
    assert (difference.key, difference.in_a, difference.b) == ("state.0.note", False, "warm")


def test_json_schema(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint()
    b = make_checkpoint(scheduler="none")

    def betas(state: dict[str, Any]) -> None:
        state["param_groups"][0]["betas"] = (0.8, 0.99)
        state["param_groups"][0]["eps"] = float("inf")

    edit(b / "optimizer_state.pt", betas)
    document = json.loads(json.dumps(diff_checkpoints(a, b).to_json(), allow_nan=False))
    assert list(document) == ["schema", "version", "mode", "a", "b", "equal", "files_compared",
                              "differences", "only_in_a", "only_in_b"]
    assert (document["schema"], document["version"], document["mode"]) == (DIFF_SCHEMA, 1,
                                                                           "checkpoints")
    assert (document["a"], document["b"], document["equal"]) == (str(a), str(b), False)
    by_key = {(d["group"], d["key"]): d for d in document["differences"]}
    assert by_key[(0, "betas")] == {
        "component": "optimizer", "file": "optimizer_state.pt", "optimizer": None, "group": 0,
        "key": "betas",
        "a": {"present": True, "value": [0.9, 0.95], "repr": "(0.9, 0.95)"},
        "b": {"present": True, "value": [0.8, 0.99], "repr": "(0.8, 0.99)"},
    }
    assert by_key[(0, "eps")]["b"] == {"present": True, "value": "inf", "repr": "inf"}
    assert by_key[(1, "initial_lr")]["b"] == {"present": False, "value": None, "repr": None}
    assert document["only_in_a"] == [{"component": "scheduler", "file": None}]
    assert document["only_in_b"] == []


def test_rank_files_of_a_pipeline_optimizer(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="pipeline", world_size=2)
    result = diff_ranks(ckpt, "optimizer")
    assert result.mode == "ranks"
    assert result.a == str(ckpt / "optimizer_state_rank_0.pt")
    assert result.files_compared == 2
    # The last pipeline stage uses its own weight decay (examples._LAST_STAGE_DECAY).
    assert result.differences == (
        ValueDifference("optimizer", "optimizer_state_rank_1.pt", None, 0, "weight_decay",
                        0.1, 0.05),
    )


def test_rank_files_after_an_edit_of_one_rank(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="ddp", world_size=4)
    assert diff_ranks(ckpt, "rng").differences == tuple(
        ValueDifference("rng", f"rng_state_rank_{r}.pt", None, None, "initial_seed", 0, r)
        for r in (1, 2, 3)
    )

    def skip(state: dict[str, Any]) -> None:
        state["skip_batches"] = 99

    edit(ckpt / "dataset_state_rank_2.pt", skip)
    edited = [d for d in diff_ranks(ckpt, "dataset").differences if d.key == "skip_batches"]
    assert [(d.file, d.in_a, d.b) for d in edited] == [("dataset_state_rank_2.pt", False, 99)]


def test_rank_diff_of_a_single_file_component_is_equal(make_checkpoint: MakeCheckpoint) -> None:
    ckpt = make_checkpoint(layout="ddp", world_size=2)
    result = diff_ranks(ckpt, "optimizer")
    assert isinstance(result, DiffResult) and result.equal and result.files_compared == 1
    with pytest.raises(ComponentNotFoundError):
        diff_ranks(ckpt, "optimiser")


def test_undecodable_file_is_an_error(make_checkpoint: MakeCheckpoint) -> None:
    a = make_checkpoint()
    b = make_checkpoint()
    path = b / "scheduler_state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StateFileError, match="scheduler_state.pt"):
        diff_checkpoints(a, b)


def test_importing_the_services_imports_neither_torch_nor_click() -> None:
    code = ("import sys, forgather_checkpoint.diffing, forgather_checkpoint.verification; "
            "print(sorted({'torch', 'click'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
