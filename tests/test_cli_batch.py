"""Many checkpoints at once, diff, verify, multi-optimizer state, completion and progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from forgather_checkpoint.cli import _ProgressBar, checkpoint

from .helpers import assert_unchanged, load, snapshot


def run(*args: Any) -> Any:
    return CliRunner().invoke(checkpoint, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def three_checkpoints(tmp_path: Path) -> list[Path]:
    from forgather_checkpoint.examples import build_checkpoint

    root = tmp_path / "run" / "checkpoints"
    return [build_checkpoint(root / f"checkpoint-{step}", steps=step) for step in (9, 10, 100)]


def test_modify_many_checkpoints_from_a_quoted_glob(three_checkpoints: list[Path]) -> None:
    pattern = str(three_checkpoints[0].parent / "checkpoint-*")
    result = run("modify", pattern, "-c", "optimizer", "--set", "weight_decay=0.02", "--force",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "forgather-checkpoint.batch"
    assert data["summary"] == {"done": 3, "failed": 0, "skipped": 0}
    # Natural order: checkpoint-9, -10, -100.
    assert [Path(r["checkpoint"]).name for r in data["results"]] == [
        "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    for path in three_checkpoints:
        groups = load(path / "optimizer_state.pt")["param_groups"]
        assert all(g["weight_decay"] == 0.02 for g in groups)


def test_one_failure_does_not_stop_the_others(three_checkpoints: list[Path]) -> None:
    broken = three_checkpoints[1] / "optimizer_state.pt"
    broken.write_bytes(b"not a zip")
    before = snapshot(three_checkpoints[1])
    result = run("modify", *three_checkpoints, "-c", "optimizer", "--set", "lr=0.5", "--force")
    assert result.exit_code == 1
    assert "Summary: 2 done, 0 skipped, 1 failed" in result.stdout
    assert f"{three_checkpoints[1]}:" in result.stderr
    assert_unchanged(three_checkpoints[1], before)
    for path in (three_checkpoints[0], three_checkpoints[2]):
        assert load(path / "optimizer_state.pt")["param_groups"][0]["lr"] == 0.5


def test_unchanged_checkpoints_are_skipped(three_checkpoints: list[Path]) -> None:
    run("modify", three_checkpoints[0], "-c", "optimizer", "--set", "eps=1e-7", "--force")
    result = run("modify", *three_checkpoints, "-c", "optimizer", "--set", "eps=1e-7", "--force",
                 "--json")
    assert result.exit_code == 0
    statuses = [r["status"] for r in json.loads(result.stdout)["results"]]
    assert statuses == ["unchanged", "done", "done"]


def test_lr_and_list_accept_many(three_checkpoints: list[Path]) -> None:
    result = run("lr", *three_checkpoints, "--scale", "0.5", "--force", "-q")
    assert result.exit_code == 0 and result.stdout == ""
    listing = run("list", *three_checkpoints, "--json")
    data = json.loads(listing.stdout)
    assert len(data["results"]) == 3
    for record in data["results"]:
        entry = next(e for e in record["entries"] if e["key"] == "initial_lr")
        assert entry["values"][0]["value"] == 0.0005


def test_glob_matching_nothing_is_a_usage_error(tmp_path: Path) -> None:
    result = run("list", str(tmp_path / "checkpoint-*"))
    assert result.exit_code == 2 and "no checkpoint matches" in result.stderr


def test_diff_exit_codes(make_checkpoint: Callable[..., Path]) -> None:
    a = make_checkpoint()
    b = make_checkpoint()
    same = run("diff", a, b)
    assert same.exit_code == 0 and "No differences" in same.stdout
    run("modify", b, "-c", "optimizer", "--param-group", "1", "--set", "weight_decay=0.3",
        "--force")
    different = run("diff", a, b, "--json")
    assert different.exit_code == 1
    data = json.loads(different.stdout)
    assert data["equal"] is False
    wd = [d for d in data["differences"] if d["key"] == "weight_decay"]
    assert wd == [{"component": "optimizer", "file": "optimizer_state.pt", "optimizer": None,
                   "group": 1, "key": "weight_decay",
                   "a": {"present": True, "value": 0.0, "repr": "0.0"},
                   "b": {"present": True, "value": 0.3, "repr": "0.3"}}]
    error = run("diff", a, a.parent / "missing")
    assert error.exit_code == 2 and "Error:" in error.stderr


def test_diff_ranks(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=2)
    result = run("diff", path, "--ranks", "-c", "optimizer")
    # The pipeline example gives the last rank a different weight decay.
    assert result.exit_code == 1 and "weight_decay" in result.stdout


def test_verify_cli(make_checkpoint: Callable[..., Path]) -> None:
    good = make_checkpoint(layout="ddp", world_size=2)
    ok = run("verify", good)
    assert ok.exit_code == 0 and "OK" in ok.stdout
    bad = make_checkpoint(layout="pipeline", world_size=4)
    (bad / "optimizer_state_rank_2.pt").unlink()
    before = snapshot(bad)
    result = run("verify", bad, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema"] == "forgather-checkpoint.verify" and not data["ok"]
    assert any("optimizer_state_rank_2.pt" in p["message"] or
               p["file"] == "optimizer_state_rank_2.pt" for p in data["problems"])
    assert_unchanged(bad, before)
    missing = run("verify", bad.parent / "nope")
    assert missing.exit_code == 2


def _multi_optimizer_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    states = []
    for index, lr in enumerate((0.01, 0.02)):
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}],
                                    lr=lr, momentum=0.9)
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        states.append({"index": index, "state_dict": optimizer.state_dict()})
    torch.save({"optimizers": states}, directory / "optimizer_state.pt")
    return directory


def test_multi_optimizer_list_and_modify(tmp_path: Path) -> None:
    path = _multi_optimizer_checkpoint(tmp_path / "checkpoint-1")
    listing = run("list", path)
    assert "Optimizer 1, param group 0:" in listing.stdout
    only = run("list", path, "--optimizer", "1", "--json")
    assert {e["optimizer"] for e in json.loads(only.stdout)["entries"]} == {1}
    result = run("modify", path, "-c", "optimizer", "--optimizer", "1", "--set", "lr=0.5",
                 "--force")
    assert result.exit_code == 0, result.output
    state = load(path / "optimizer_state.pt")
    lrs = [[g["lr"] for g in o["state_dict"]["param_groups"]] for o in state["optimizers"]]
    assert lrs == [[0.01, 0.01], [0.5, 0.5]]
    # Loads back into a real optimizer.
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=1.0,
                                momentum=0.9)
    optimizer.load_state_dict(state["optimizers"][1]["state_dict"])
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]
    missing = run("modify", path, "-c", "optimizer", "--optimizer", "5", "--set", "lr=1",
                  "--force")
    assert missing.exit_code == 1 and "optimizer 5 does not exist" in missing.stderr


def test_optimizer_option_on_single_optimizer_is_usage_error(example_checkpoint: Path) -> None:
    result = run("modify", example_checkpoint, "-c", "optimizer", "--optimizer", "0",
                 "--set", "lr=1", "--force")
    assert result.exit_code == 2 and "multi-optimizer" in result.stderr


def test_shell_completion_offers_the_checkpoints_components(example_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    (example_checkpoint / "custom_thing_state.pt").write_bytes(
        (example_checkpoint / "trainer_state.pt").read_bytes())
    env = dict(os.environ, _FORGATHER_COMPLETE="bash_complete",
               COMP_WORDS=f"forgather checkpoint list {example_checkpoint} --component cu",
               COMP_CWORD="5")
    script = Path(sys.executable).parent / "forgather"
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["plain,custom_thing"]


def test_progress_bar_waits_a_second_and_draws_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    clock = iter([0.0, 0.5, 2.0, 2.5])
    monkeypatch.setattr("forgather_checkpoint.cli.time.monotonic", lambda: next(clock))
    bar = _ProgressBar()
    bar("reading a", 0, 2)      # at 0.5 s: too early, nothing drawn
    assert capsys.readouterr().err == ""
    bar("reading b", 1, 2)      # at 2.0 s: drawn, and finished
    err = capsys.readouterr().err
    assert "[########################] 2/2 reading b" in err and err.endswith("\n")


def test_every_command_has_help_with_an_example() -> None:
    for command in checkpoint.commands:
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Example" in result.stdout, command


def test_verify_load_option_loads_with_torch(example_checkpoint: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    import forgather_checkpoint.operations as operations

    real = operations.verify_load_with_torch

    def spy(path: Path) -> Any:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(operations, "verify_load_with_torch", spy)
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.2", "--force",
                 "--verify-load")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and ".fgc-tmp-" in calls[0].name


@pytest.mark.parametrize("command", [
    ["components", "{ckpt}"],
    ["list", "{ckpt}", "-c", "optimizer"],
    ["list", "{ckpt}", "-c", "rng", "--json"],
    ["modify", "{ckpt}", "-c", "optimizer", "--set", "lr=0.3", "--dry-run"],
    ["lr", "{ckpt}", "--scale", "0.5", "--dry-run"],
    ["verify", "{ckpt}"],
    ["modify", "{ckpt}", "-c", "optimizer", "--set", "lr=0.3", "--force"],
    ["lr", "{ckpt}", "--scale", "0.5", "--force", "-q"],
])
def test_reading_commands_never_import_torch(example_checkpoint: Path,
                                             command: list[str]) -> None:
    args = [part.replace("{ckpt}", str(example_checkpoint)) for part in command]
    code = (
        "import sys\n"
        "from forgather_checkpoint.cli import checkpoint\n"
        f"checkpoint.main({args!r}, standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
