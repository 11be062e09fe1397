"""The command group through click's CliRunner, on real checkpoints in every layout."""

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

from forgather_checkpoint.cli import checkpoint

from .forgather_loader import load_manifest_strict
from .helpers import assert_tensors_identical, assert_unchanged, load, snapshot


def run(*args: Any, input: str | None = None) -> Any:
    runner = CliRunner()
    result = runner.invoke(checkpoint, [str(a) for a in args], input=input,
                           catch_exceptions=False)
    return result


def optimizer_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("optimizer_state*.pt"))


# ---------------------------------------------------------------------------------------------
# components


def test_components_lists_every_component_with_pattern_and_size(example_checkpoint: Path) -> None:
    result = run("components", example_checkpoint)
    assert result.exit_code == 0, result.output
    for name in ("optimizer", "scheduler", "trainer", "dataset", "rng"):
        assert f"\n  {name}\n" in result.stdout
    assert "Found 5 component(s):" in result.stdout
    assert "pytorch_model.bin" in result.stdout  # listed apart, never edited
    assert "per_rank" in result.stdout


def test_components_json_schema(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4)
    result = run("components", path, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["schema"] == "forgather-checkpoint.components" and data["version"] == 1
    by_name = {c["name"]: c for c in data["components"]}
    assert by_name["optimizer"]["sharing_pattern"] == "per_rank"
    assert by_name["optimizer"]["file_count"] == 4
    assert by_name["optimizer"]["size_bytes"] == sum(
        p.stat().st_size for p in optimizer_files(path))
    assert [f["rank"] for f in by_name["optimizer"]["files"]] == [0, 1, 2, 3]


def test_components_without_manifest_infers_patterns_and_flags_temp_files(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = make_checkpoint(layout="per_node", world_size=4, manifest=False)
    (path / "optimizer_state.pt.tmp").write_bytes(b"left by the old tool")
    (path / "my_custom_state_state.pt").write_bytes((path / "trainer_state.pt").read_bytes())
    result = run("components", path, "--json")
    data = json.loads(result.stdout)
    by_name = {c["name"]: c for c in data["components"]}
    assert by_name["optimizer"]["sharing_pattern"] == "per_node"
    assert by_name["my_custom_state"]["sharing_pattern"] == "global"
    assert data["temp_files"] == ["optimizer_state.pt.tmp"]
    text = run("components", path)
    assert "leftover temp file" in text.stderr


# ---------------------------------------------------------------------------------------------
# list


def test_list_optimizer_shows_groups_without_params(example_checkpoint: Path) -> None:
    result = run("list", example_checkpoint)
    assert result.exit_code == 0
    assert "Component: optimizer" in result.stdout
    assert "Param group 0:" in result.stdout and "Param group 1:" in result.stdout
    assert "  weight_decay: 0.1\n" in result.stdout
    assert "betas: (0.9, 0.95)" in result.stdout
    assert "params" not in result.stdout


def test_list_verbose_shows_types_and_tensors_are_described(example_checkpoint: Path) -> None:
    result = run("list", example_checkpoint, "--component", "rng", "-v")
    assert "torch_rng_state: tensor(uint8, shape=[" in result.stdout
    assert "(tensor)" in result.stdout
    sched = run("list", example_checkpoint, "--component", "scheduler", "-v")
    assert "last_epoch: 5  (int)" in sched.stdout


def test_list_shows_which_rank_file_holds_which_value(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=2)
    rank1 = path / "optimizer_state_rank_1.pt"
    state = load(rank1)
    state["param_groups"][0]["lr"] = 0.5
    torch.save(state, rank1)
    result = run("list", path, "--json")
    data = json.loads(result.stdout)
    assert data["files"] == ["optimizer_state_rank_0.pt", "optimizer_state_rank_1.pt"]
    entry = next(e for e in data["entries"] if e["group"] == 0 and e["key"] == "lr")
    assert not entry["consistent"]
    holders = {v["value"]: v["files"] for v in entry["values"]}
    assert holders[0.5] == ["optimizer_state_rank_1.pt"]
    text = run("list", path)
    assert "differs between files" in text.stdout and "optimizer_state_rank_1.pt" in text.stdout


def test_list_nested_scheduler_paths(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(scheduler="sequential")
    result = run("list", path, "-c", "scheduler")
    assert "_schedulers.0.base_lrs:" in result.stdout
    assert "_milestones:" in result.stdout


# ---------------------------------------------------------------------------------------------
# modify: the effect, in every layout


@pytest.mark.parametrize("layout", ["single", "ddp", "pipeline", "per_group", "per_node"])
def test_modify_every_layout_takes_effect_in_a_real_optimizer(
    make_checkpoint: Callable[..., Path], layout: str
) -> None:
    path = make_checkpoint(layout=layout, world_size=4)
    files = optimizer_files(path)
    before = {f: load(f) for f in files}
    result = run("modify", path, "--component", "optimizer", "--set", "weight_decay=0.01",
                 "--scale", "lr=0.5", "--set", "betas=(0.8,0.9)", "--force")
    assert result.exit_code == 0, result.output
    for file in files:
        after = load(file)
        # A real optimizer accepts it and uses the new values.
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(
            sum(len(g["params"]) for g in after["param_groups"]))]
        groups, start = [], 0
        for group in after["param_groups"]:
            groups.append({"params": params[start:start + len(group["params"])]})
            start += len(group["params"])
        optimizer = torch.optim.AdamW(groups) if "decoupled_weight_decay" in after[
            "param_groups"][0] else torch.optim.Adam(groups)
        optimizer.load_state_dict(after)
        for old, new in zip(before[file]["param_groups"], optimizer.param_groups):
            assert new["weight_decay"] == 0.01
            assert new["lr"] == pytest.approx(old["lr"] * 0.5, rel=0, abs=0)
            assert new["betas"] == (0.8, 0.9) and isinstance(new["betas"], tuple)
        assert_tensors_identical(before[file]["state"], after["state"])
    manifest = load_manifest_strict(path / "checkpoint_manifest.json")
    assert manifest is not None
    raw = json.loads((path / "checkpoint_manifest.json").read_text())
    entry = raw["components"]["optimizer"]
    assert entry["size_bytes"] == sum(f.stat().st_size for f in files)
    assert entry["checksum"] is None
    assert "modified_at" in entry["metadata"] and "modified_by" in entry["metadata"]


def test_modify_scheduler_last_epoch_loads_into_real_scheduler(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = make_checkpoint(optimizer="sgd", scheduler="cosine")
    result = run("modify", path, "-c", "scheduler", "--set", "last_epoch=100", "--force")
    assert result.exit_code == 0, result.output
    state = load(path / "scheduler_state.pt")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    scheduler.load_state_dict(state)
    assert scheduler.last_epoch == 100 and isinstance(state["last_epoch"], int)


def test_modify_nested_sequential_base_lrs(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(scheduler="sequential")
    result = run("modify", path, "-c", "scheduler", "--scale", "_schedulers.1.base_lrs=0.5",
                 "--force")
    assert result.exit_code == 0, result.output
    state = load(path / "scheduler_state.pt")
    assert state["_schedulers"][1]["base_lrs"] == [0.0005, 0.0005]


def test_modify_param_group_only_touches_that_group(example_checkpoint: Path) -> None:
    result = run("modify", example_checkpoint, "-c", "optimizer", "--param-group", "1",
                 "--set", "weight_decay=0.05", "--force")
    assert result.exit_code == 0, result.output
    groups = load(example_checkpoint / "optimizer_state.pt")["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.05]


def test_modify_keeps_permission_bits_and_backs_up_original(example_checkpoint: Path) -> None:
    target = example_checkpoint / "optimizer_state.pt"
    os.chmod(target, 0o640)
    original = target.read_bytes()
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.1", "--force")
    assert result.exit_code == 0, result.output
    assert target.stat().st_mode & 0o777 == 0o640
    assert (example_checkpoint / "optimizer_state.pt.bak").read_bytes() == original
    # A second edit never overwrites the first backup.
    run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.2", "--force")
    assert (example_checkpoint / "optimizer_state.pt.bak").read_bytes() == original


def test_modify_symlinked_file_is_edited_at_its_target(example_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    real = tmp_path / "elsewhere" / "optimizer_state.pt"
    real.parent.mkdir()
    link = example_checkpoint / "optimizer_state.pt"
    real.write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(real)
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.3", "--force")
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert load(real)["param_groups"][0]["lr"] == 0.3


def test_modify_without_manifest_keeps_directory_mtime(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = make_checkpoint(manifest=False)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    result = run("modify", path, "-c", "optimizer", "--set", "lr=0.1", "--force", "--no-backup")
    assert result.exit_code == 0, result.output
    assert os.stat(path).st_mtime_ns == 1_000_000_000_000_000_000
    assert load(path / "optimizer_state.pt")["param_groups"][0]["lr"] == 0.1


def test_dry_run_prints_the_plan_and_changes_nothing(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="ddp", world_size=2)
    before = snapshot(path)
    result = run("modify", path, "-c", "optimizer", "--set", "weight_decay=0.01", "--dry-run")
    assert result.exit_code == 0
    assert "optimizer_state.pt" in result.stdout
    assert "param group 0:" in result.stdout and "weight_decay: 0.1 -> 0.01" in result.stdout
    assert "Dry run" in result.stdout
    assert_unchanged(path, before)


def test_modify_json_output(example_checkpoint: Path) -> None:
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.01",
                 "--force", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "forgather-checkpoint.modify" and data["applied"] is True
    change = data["files"][0]["changes"][0]
    assert change == {"optimizer": None, "group": 0, "key": "lr", "old": 0.001, "new": 0.01,
                      "changed": True}


def test_modify_quiet_prints_nothing(example_checkpoint: Path) -> None:
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.01",
                 "--force", "-q")
    assert result.exit_code == 0 and result.stdout == ""


def test_confirmation_prompt_declined_changes_nothing(example_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(example_checkpoint)
    monkeypatch.setattr("forgather_checkpoint.cli.sys.stdin.isatty", lambda: True, raising=False)
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.01", input="n\n")
    assert result.exit_code == 1
    assert_unchanged(example_checkpoint, before)


def test_lr_edit_warns_about_scheduler(example_checkpoint: Path) -> None:
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.01",
                 "--dry-run")
    assert "lasts one step" in result.stderr and "forgather checkpoint lr" in result.stderr


# ---------------------------------------------------------------------------------------------
# errors: clear message, right exit code, nothing changed


ERROR_CASES: list[tuple[list[str], int, str]] = [
    (["--set", "lr=1e-4x"], 2, "not a valid Python literal"),
    (["--set", "lr"], 2, "expected KEY=VALUE"),
    (["--scale", "amsgrad=2"], 1, "only numbers can be scaled"),
    (["--scale", "lr=abc"], 2, "not a valid Python literal"),
    (["--set", "lr='fast'"], 1, "is a float"),
    (["--set", "amsgrad=1"], 1, "is a bool"),
    (["--set", "params=[0,1]"], 1, "never edited"),
    (["--set", "state.0.step=1"], 1, "cannot be edited"),
    (["--set", "nonexistent=1"], 1, "not found in param group 0"),
    (["--param-group", "5", "--set", "lr=0.1"], 1, "param group 5 does not exist"),
    (["--param-group", "-1", "--set", "lr=0.1"], 2, "-1"),
    (["--set", "lr=0.1", "--set", "betas=(0.9,)"], 1, "has 2 item(s)"),
    ([], 2, "at least one modification"),
    (["--set", "lr=0.1"], 1, "no terminal"),
]


@pytest.mark.parametrize(("extra", "code", "message"), ERROR_CASES)
def test_modify_errors_change_nothing(example_checkpoint: Path, extra: list[str], code: int,
                                      message: str) -> None:
    before = snapshot(example_checkpoint)
    result = run("modify", example_checkpoint, "-c", "optimizer", *extra)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == "" or code == 1
    assert_unchanged(example_checkpoint, before)


def test_unknown_component_lists_what_exists(example_checkpoint: Path) -> None:
    before = snapshot(example_checkpoint)
    result = run("modify", example_checkpoint, "-c", "optimiser", "--set", "lr=1", "--force")
    assert result.exit_code == 1
    assert "no optimiser files" in result.stderr and "found: optimizer, scheduler" in result.stderr
    assert "did you mean 'optimizer'?" in result.stderr
    assert_unchanged(example_checkpoint, before)


def test_param_group_with_scheduler_is_usage_error(example_checkpoint: Path) -> None:
    result = run("modify", example_checkpoint, "-c", "scheduler", "--param-group", "0",
                 "--set", "last_epoch=1", "--force")
    assert result.exit_code == 2 and "no param_groups" in result.stderr


@pytest.mark.parametrize("command", ["components", "list"])
def test_missing_path_is_a_clear_error(tmp_path: Path, command: str) -> None:
    result = run(command, tmp_path / "nope")
    assert result.exit_code == 1 and "checkpoint path not found" in result.stderr


def test_corrupt_file_is_reported_and_nothing_changes(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4)
    broken = path / "optimizer_state_rank_2.pt"
    broken.write_bytes(broken.read_bytes()[:100])
    before = snapshot(path)
    result = run("modify", path, "-c", "optimizer", "--set", "lr=0.1", "--force")
    assert result.exit_code == 1 and "optimizer_state_rank_2.pt" in result.stderr
    assert_unchanged(path, before)


def test_missing_rank_file_is_refused(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4)
    (path / "optimizer_state_rank_1.pt").unlink()
    before = snapshot(path)
    result = run("modify", path, "-c", "optimizer", "--set", "lr=0.1", "--force")
    assert result.exit_code == 1 and "optimizer_state_rank_1.pt" in result.stderr
    assert_unchanged(path, before)


def test_bad_manifest_is_refused(example_checkpoint: Path) -> None:
    (example_checkpoint / "checkpoint_manifest.json").write_text("{not json")
    before = snapshot(example_checkpoint)
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.1", "--force")
    assert result.exit_code == 1 and "not valid JSON" in result.stderr
    assert_unchanged(example_checkpoint, before)


def test_file_path_instead_of_directory(example_checkpoint: Path) -> None:
    result = run("list", example_checkpoint / "optimizer_state.pt")
    assert result.exit_code == 1 and "pass its checkpoint directory" in result.stderr


# ---------------------------------------------------------------------------------------------
# help and import hygiene


@pytest.mark.parametrize("command", [[], ["components"], ["list"], ["modify"]])
def test_help_teaches_with_examples(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout


def test_cli_module_does_not_import_torch() -> None:
    code = ("import sys, forgather_checkpoint.cli as c; "
            "c.checkpoint.main(['--help'], standalone_mode=False); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_installed_entry_point_runs(example_checkpoint: Path) -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="forgather.cli") if e.name == "checkpoint"]
    assert entry.value == "forgather_checkpoint.cli:checkpoint"
    script = Path(sys.executable).parent / "forgather-checkpoint"
    out = subprocess.run([str(script), "components", str(example_checkpoint), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["components"][0]["name"] == "optimizer"


def test_corrupted_write_fails_validation_and_nothing_is_replaced(
    make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Simulate corruption while writing one rank file: validation catches it, and no file
    (not even the rank files that were written correctly) is replaced."""
    import forgather_checkpoint.operations as operations

    path = make_checkpoint(layout="pipeline", world_size=4)
    before = snapshot(path)
    real_write = operations.write_prepared

    def corrupting_write(prepared: Any, destination: Path) -> None:
        real_write(prepared, destination)
        if prepared.doc.path.name == "optimizer_state_rank_2.pt":
            data = bytearray(destination.read_bytes())
            index = data.find(b"weight_decay")
            data[index + 2] ^= 0x01  # a bit flip inside data.pkl
            destination.write_bytes(bytes(data))

    monkeypatch.setattr(operations, "write_prepared", corrupting_write)
    result = run("modify", path, "-c", "optimizer", "--set", "weight_decay=0.5", "--force")
    assert result.exit_code == 1
    assert "modified checkpoint failed validation" in result.stderr
    assert "optimizer_state_rank_2.pt" in result.stderr
    assert_unchanged(path, before)


def test_legacy_format_file_is_edited_through_torch_and_reported(example_checkpoint: Path) -> None:
    target = example_checkpoint / "optimizer_state.pt"
    state = load(target)
    torch.save(state, target, _use_new_zipfile_serialization=False)
    listing = run("list", example_checkpoint)
    assert listing.exit_code == 0 and "legacy" in listing.stderr.lower()
    result = run("modify", example_checkpoint, "-c", "optimizer", "--set", "lr=0.25", "--force")
    assert result.exit_code == 0, result.output
    assert "legacy" in result.stderr.lower()
    after = load(target)
    assert [g["lr"] for g in after["param_groups"]] == [0.25, 0.25]
    assert_tensors_identical(state["state"], after["state"])
