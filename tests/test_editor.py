"""The editor on real optimizer/scheduler state dicts, without touching the disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forgather_checkpoint.editor import (
    coerce_for_set,
    parse_edit_spec,
    parse_literal,
    plan_edits,
    scale_value,
)
from forgather_checkpoint.errors import (
    EditSpecError,
    ForbiddenEditError,
    ParameterNotFoundError,
    ParamGroupError,
    UsageProblem,
    ValueTypeError,
)
from forgather_checkpoint.stateformat import StateDocument


def _adamw_state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    decay = [model[0].weight, model[1].weight]
    no_decay = [model[0].bias, model[1].bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95),
    )
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _doc(root: Any, name: str = "optimizer_state.pt") -> StateDocument:
    return StateDocument(path=Path(name), root=root, backend="test")


def _specs(*texts: str, kind: str = "set") -> list[Any]:
    return [parse_edit_spec(text, kind) for text in texts]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.01", 0.01), ("1e-4", 1e-4), ("100", 100), ("True", True), ("false", False),
        ("(0.9,0.98)", (0.9, 0.98)), ("[0.001,0.0001]", [0.001, 0.0001]), ("'adam'", "adam"),
        ("None", None), ("null", None), ("-3", -3),
    ],
)
def test_parse_literal_accepts_python_literals(text: str, expected: Any) -> None:
    value = parse_literal(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["1e-4x", "adam", "(0.9,", "os.system('x')", "", "{1, 2}"])
def test_parse_literal_never_falls_back_to_a_string(text: str) -> None:
    with pytest.raises(EditSpecError):
        parse_literal(text)


@pytest.mark.parametrize("text", ["lr", "=0.1", "lr=", "l r=1", "lr..x=1"])
def test_malformed_specs_are_refused(text: str) -> None:
    with pytest.raises(EditSpecError):
        parse_edit_spec(text, "set")


@pytest.mark.parametrize("text", ["lr=True", "lr='x'", "lr=inf", "lr=[1]", "lr=nan"])
def test_scale_factor_must_be_a_finite_number(text: str) -> None:
    with pytest.raises(EditSpecError):
        parse_edit_spec(text, "scale")


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers() | st.booleans())
def test_parse_literal_round_trips_repr(value: Any) -> None:
    parsed = parse_literal(repr(value))
    assert parsed == value and type(parsed) is type(value)


@given(
    old=st.floats(allow_nan=False, allow_infinity=False),
    new=st.integers(min_value=-10**6, max_value=10**6),
)
def test_set_int_for_float_becomes_float(old: float, new: int) -> None:
    result = coerce_for_set(old, new, "lr")
    assert type(result) is float and result == new


@given(old=st.integers(), new=st.integers(min_value=-10**9, max_value=10**9))
def test_set_whole_float_for_int_becomes_int(old: int, new: int) -> None:
    result = coerce_for_set(old, float(new), "last_epoch")
    assert type(result) is int and result == new


def test_set_keeps_kinds() -> None:
    assert coerce_for_set((0.9, 0.999), [0.9, 1], "betas") == (0.9, 1.0)
    assert type(coerce_for_set((0.9, 0.999), [0.9, 1], "betas")[1]) is float
    assert coerce_for_set(None, 0.5, "foreach") == 0.5
    with pytest.raises(ValueTypeError):
        coerce_for_set(False, 1, "amsgrad")
    with pytest.raises(ValueTypeError):
        coerce_for_set(0.1, True, "lr")
    with pytest.raises(ValueTypeError):
        coerce_for_set(0.1, "0.2", "lr")
    with pytest.raises(ValueTypeError):
        coerce_for_set(5, 5.5, "last_epoch")
    # torch stores SGD's weight_decay/momentum defaults as the int 0: a fraction makes a float.
    assert coerce_for_set(0, 0.9, "momentum") == 0.9
    assert type(coerce_for_set(0, 0.01, "weight_decay")) is float
    with pytest.raises(ValueTypeError):
        coerce_for_set((0.9, 0.999), (0.9,), "betas")
    with pytest.raises(ForbiddenEditError):
        coerce_for_set(torch.tensor(0.1), 0.2, "lr")


def test_scale_rules() -> None:
    assert scale_value(1000, 0.1, "n", "0.1") == 100
    assert type(scale_value(1000, 0.1, "n", "0.1")) is int
    assert scale_value([0.001, 0.002], 0.5, "base_lrs") == [0.0005, 0.001]
    assert scale_value((0.9, 0.999), 1.0, "betas") == (0.9, 0.999)
    with pytest.raises(ValueTypeError):
        scale_value(True, 2, "amsgrad")
    with pytest.raises(ValueTypeError):
        scale_value(5, 0.3, "last_epoch", "0.3")
    with pytest.raises(ValueTypeError):
        scale_value(None, 2, "foreach")
    with pytest.raises(ValueTypeError):
        scale_value("adam", 2, "name")
    with pytest.raises(ValueTypeError):
        scale_value([0.1, True], 2, "mixed")


def test_plan_edits_every_group_and_leaves_the_original_untouched() -> None:
    state = _adamw_state()
    doc = _doc(state)
    plan = plan_edits("optimizer", [doc], _specs("weight_decay=0.01", "betas=(0.9,0.98)"))
    new_root = plan.files[0].new_root
    assert [g["weight_decay"] for g in new_root["param_groups"]] == [0.01, 0.01]
    assert all(g["betas"] == (0.9, 0.98) for g in new_root["param_groups"])
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.1, 0.0]
    # Untouched subtrees are the same objects (keeps pickle sharing intact).
    assert new_root["state"] is state["state"]
    assert new_root["param_groups"][0]["params"] is state["param_groups"][0]["params"]
    changes = [(c.group, c.key, c.old, c.new) for c in plan.changes]
    assert (0, "weight_decay", 0.1, 0.01) in changes and (1, "weight_decay", 0.0, 0.01) in changes


def test_param_group_targets_one_group() -> None:
    state = _adamw_state()
    plan = plan_edits("optimizer", [_doc(state)], _specs("betas=(0.8,0.9)"), param_group=1)
    groups = plan.files[0].new_root["param_groups"]
    assert groups[0]["betas"] == (0.9, 0.95) and groups[1]["betas"] == (0.8, 0.9)
    with pytest.raises(ParamGroupError, match="does not exist"):
        plan_edits("optimizer", [_doc(state)], _specs("lr=0.1"), param_group=2)


def test_missing_key_names_the_group_and_lists_keys() -> None:
    state = _adamw_state()
    del state["param_groups"][1]["eps"]
    with pytest.raises(ParameterNotFoundError, match=r"param group 1.*weight_decay"):
        plan_edits("optimizer", [_doc(state)], _specs("eps=1e-6"))


@pytest.mark.parametrize("spec", ["params=[0]", "state.0.step=3"])
def test_params_and_state_are_refused(spec: str) -> None:
    with pytest.raises(ForbiddenEditError):
        plan_edits("optimizer", [_doc(_adamw_state())], _specs(spec))


def test_param_group_on_a_component_without_groups_is_a_usage_problem() -> None:
    with pytest.raises(UsageProblem):
        plan_edits("scheduler", [_doc({"last_epoch": 3}, "scheduler_state.pt")],
                   _specs("last_epoch=4"), param_group=0)


def test_nested_paths_reach_sequential_lr_sub_schedulers() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    plan = plan_edits("scheduler", [_doc(state, "scheduler_state.pt")],
                      _specs("_schedulers.1.base_lrs=[0.05]"))
    assert plan.files[0].new_root["_schedulers"][1]["base_lrs"] == [0.05]
    assert state["_schedulers"][1]["base_lrs"] == [0.1]


def test_same_key_twice_is_refused() -> None:
    specs = _specs("lr=0.1") + _specs("lr=0.5", kind="scale")
    with pytest.raises(EditSpecError, match="twice"):
        plan_edits("optimizer", [_doc(_adamw_state())], specs)


def test_multi_optimizer_wrapper_groups_are_edited() -> None:
    first, second = _adamw_state(), _adamw_state()
    root = {"optimizers": [{"index": 0, "state_dict": first}, {"index": 1, "state_dict": second}]}
    plan = plan_edits("optimizer", [_doc(root)], _specs("lr=0.5"), param_group=0)
    changed = {(c.optimizer, c.group) for c in plan.changes}
    assert changed == {(0, 0), (1, 0)}
