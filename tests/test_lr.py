"""`forgather checkpoint lr`: a change that lasts, proven against a run that used it from the start.

For each scheduler, train N steps, save in Forgather's layout, change the learning rate with the
tool, resume a real optimizer + scheduler from the edited files (constructed from the ORIGINAL
config, then load_state_dict, as a resume does) and run 20 steps. The learning rates must equal,
step by step, those of a run that had used the new settings from the start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch.optim import lr_scheduler

from forgather_checkpoint.cli import checkpoint

from .helpers import assert_tensors_identical, assert_unchanged, load, snapshot, train_steps

STEPS_BEFORE = 7
STEPS_AFTER = 20
BASE_LRS = (1e-3, 5e-4)


class Warmup:
    """A picklable LambdaLR factor: linear warmup, then constant."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


SchedulerFactory = Callable[[torch.optim.Optimizer, float], Any]

# Each factory takes the optimizer and the factor F that a run "with the new settings from
# the start" applies to every absolute learning rate (peaks and floors move in proportion).
SCHEDULERS: dict[str, SchedulerFactory] = {
    "lambda_warmup": lambda opt, f: lr_scheduler.LambdaLR(opt, [Warmup(4), Warmup(4)]),
    "cosine": lambda opt, f: lr_scheduler.CosineAnnealingLR(opt, T_max=15, eta_min=1e-5 * f),
    "onecycle": lambda opt, f: lr_scheduler.OneCycleLR(
        opt, max_lr=[lr * 10 * f for lr in BASE_LRS], total_steps=40),
    "sequential": lambda opt, f: lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
         lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-6 * f)],
        milestones=[3],
    ),
    "constant": lambda opt, f: lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
}


def _optimizer(lrs: tuple[float, ...], seed: int = 0) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    return torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": lrs[0]},
         {"params": model[1].parameters(), "lr": lrs[1]}],
        weight_decay=0.01,
    )


def _save_checkpoint(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True)
    optimizer = _optimizer(BASE_LRS)
    scheduler = SCHEDULERS[name](optimizer, 1.0)
    train_steps(optimizer, scheduler, STEPS_BEFORE)
    torch.save(optimizer.state_dict(), directory / "optimizer_state.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler_state.pt")
    return directory


def _resume(directory: Path, name: str) -> list[list[float]]:
    optimizer = _optimizer(BASE_LRS)  # the original config, as a resume constructs it
    scheduler = SCHEDULERS[name](optimizer, 1.0)
    optimizer.load_state_dict(load(directory / "optimizer_state.pt"))
    scheduler.load_state_dict(load(directory / "scheduler_state.pt"))
    return train_steps(optimizer, scheduler, STEPS_AFTER)


def _reference(name: str, lrs: tuple[float, ...], factor: float) -> list[list[float]]:
    optimizer = _optimizer(lrs)
    scheduler = SCHEDULERS[name](optimizer, factor)
    return train_steps(optimizer, scheduler, STEPS_BEFORE + STEPS_AFTER)[STEPS_BEFORE:]


def _assert_same_schedule(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected) == STEPS_AFTER
    for step, (got, want) in enumerate(zip(actual, expected)):
        for group, (a, b) in enumerate(zip(got, want)):
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0), (step, group, a, b)


def _run(*args: Any) -> Any:
    return CliRunner().invoke(checkpoint, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scale_lasts_like_a_run_that_used_it_from_the_start(tmp_path: Path, name: str) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-7", name)
    before_state = load(directory / "optimizer_state.pt")["state"]
    result = _run("lr", directory, "--scale", "0.5", "--force")
    assert result.exit_code == 0, result.output
    expected = _reference(name, tuple(lr * 0.5 for lr in BASE_LRS), 0.5)
    _assert_same_schedule(_resume(directory, name), expected)
    # And the original schedule really differed (the test can fail).
    assert not math.isclose(_reference(name, BASE_LRS, 1.0)[-1][0], expected[-1][0])
    assert_tensors_identical(before_state, load(directory / "optimizer_state.pt")["state"])


@pytest.mark.parametrize("name", ["lambda_warmup", "onecycle", "constant"])
def test_set_moves_each_group_to_the_new_base(tmp_path: Path, name: str) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-7", name)
    result = _run("lr", directory, "--set", "3e-4", "--force")
    assert result.exit_code == 0, result.output
    # --set V: each group's base (initial_lr) becomes V (the groups had different bases; both
    # move to V). OneCycleLR's initial_lr is max_lr / div_factor (25 by default).
    optimizer = _optimizer((3e-4, 3e-4))
    if name == "onecycle":
        scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=[3e-4 * 25] * 2, total_steps=40)
    else:
        scheduler = SCHEDULERS[name](optimizer, 1.0)
    expected = train_steps(optimizer, scheduler, STEPS_BEFORE + STEPS_AFTER)[STEPS_BEFORE:]
    _assert_same_schedule(_resume(directory, name), expected)


def test_one_param_group_only(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-7", "lambda_warmup")
    result = _run("lr", directory, "--scale", "2", "--param-group", "1", "--force")
    assert result.exit_code == 0, result.output
    expected = _reference("lambda_warmup", (BASE_LRS[0], BASE_LRS[1] * 2), 1.0)
    _assert_same_schedule(_resume(directory, "lambda_warmup"), expected)


def test_lr_lists_every_field_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-7", "sequential")
    before = snapshot(directory)
    result = _run("lr", directory, "--scale", "0.5", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    keys = {(f["name"], c["key"]) for f in data["files"] for c in f["changes"]}
    assert ("optimizer_state.pt", "initial_lr") in keys
    assert ("scheduler_state.pt", "_schedulers.0.base_lrs") in keys
    assert ("scheduler_state.pt", "_schedulers.1.eta_min") in keys
    assert_unchanged(directory, before)


def test_every_rank_file_and_manifest(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4, scheduler="cosine")
    result = _run("lr", path, "--scale", "0.1", "--force")
    assert result.exit_code == 0, result.output
    for rank_file in sorted(path.glob("optimizer_state_rank_*.pt")):
        for group in load(rank_file)["param_groups"]:
            assert math.isclose(group["initial_lr"], 1e-4, rel_tol=1e-12)
    manifest = json.loads((path / "checkpoint_manifest.json").read_text())
    for key in ("optimizer", "scheduler"):
        assert manifest["components"][key]["metadata"]["modified_by"].startswith(
            "forgather-checkpoint")


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "0"], "finite positive"),
    (["--scale", "abc"], "not a valid Python literal"),
    ([], "exactly one of"),
    (["--set", "1e-3", "--scale", "2"], "exactly one of"),
])
def test_bad_lr_arguments_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-7", "cosine")
    before = snapshot(directory)
    result = _run("lr", directory, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert_unchanged(directory, before)


def test_modify_lr_warns_that_it_lasts_one_step(tmp_path: Path) -> None:
    directory = _save_checkpoint(tmp_path / "checkpoint-7", "cosine")
    result = _run("modify", directory, "-c", "optimizer", "--set", "lr=0.1", "--dry-run")
    assert "lasts one step" in result.stderr and "checkpoint lr" in result.stderr
