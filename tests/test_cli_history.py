"""history, restore and recover through the command group, on real checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from forgather_checkpoint.cli import checkpoint

from .forgather_loader import load_manifest_strict
from .helpers import assert_unchanged, load, snapshot


def run(*args: Any) -> Any:
    return CliRunner().invoke(checkpoint, [str(a) for a in args], catch_exceptions=False)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()
            and not p.name.endswith(".bak")}


@pytest.fixture
def edited_twice(make_checkpoint: Callable[..., Path]) -> tuple[Path, dict[str, bytes]]:
    path = make_checkpoint(layout="pipeline", world_size=4)
    original = _files(path)
    assert run("modify", path, "-c", "optimizer", "--set", "weight_decay=0.2", "-f").exit_code == 0
    assert run("lr", path, "--scale", "0.5", "-f").exit_code == 0
    return path, original


def test_history_lists_every_commit_with_its_changes(
    edited_twice: tuple[Path, dict[str, bytes]],
) -> None:
    path, _ = edited_twice
    data = json.loads(run("history", path, "--json").stdout)
    assert data["schema"] == "forgather-checkpoint.history"
    assert [e["action"] for e in data["entries"]] == ["modify", "lr"]
    first = data["entries"][0]
    keys = {(c["file"], c["group"], c["key"], c["new"]) for c in first["record"]["changes"]}
    assert ("optimizer_state_rank_0.pt", 0, "weight_decay", 0.2) in keys
    assert {f["path"] for f in first["files"]} >= {"optimizer_state_rank_0.pt",
                                                   "checkpoint_manifest.json"}
    text = run("history", path).stdout
    assert first["id"] in text and "weight_decay" in text and "0.2" in text


def test_restore_dry_run_changes_nothing(edited_twice: tuple[Path, dict[str, bytes]]) -> None:
    path, _ = edited_twice
    before = snapshot(path)
    result = run("restore", path, "--dry-run")
    assert result.exit_code == 0 and "Dry run" in result.stdout
    assert_unchanged(path, before)


def test_restore_undoes_the_last_entry(edited_twice: tuple[Path, dict[str, bytes]]) -> None:
    path, _ = edited_twice
    result = run("restore", path, "--force")
    assert result.exit_code == 0, result.output
    for rank_file in sorted(path.glob("optimizer_state_rank_*.pt")):
        groups = load(rank_file)["param_groups"]
        assert all(g["weight_decay"] == 0.2 for g in groups)     # first edit kept
        assert all(g["initial_lr"] == 0.001 for g in groups)     # lr change undone
    actions = [e["action"] for e in json.loads(run("history", path, "--json").stdout)["entries"]]
    assert actions == ["modify", "lr", "restore"]
    load_manifest_strict(path / "checkpoint_manifest.json")


def test_restore_original_gives_back_the_exact_bytes(
    edited_twice: tuple[Path, dict[str, bytes]],
) -> None:
    path, original = edited_twice
    result = run("restore", path, "--original", "--force", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["applied"] is True
    assert _files(path) == original
    # Backups are never deleted by a restore.
    assert (path / "optimizer_state_rank_0.pt.bak").exists()


def test_restore_to_an_entry(edited_twice: tuple[Path, dict[str, bytes]]) -> None:
    path, _ = edited_twice
    first = json.loads(run("history", path, "--json").stdout)["entries"][0]["id"]
    ambiguous = run("restore", path, "--to", "2", "--force")
    assert ambiguous.exit_code == 1 and "matches several entries" in ambiguous.stderr
    result = run("restore", path, "--to", first, "--force")
    assert result.exit_code == 0, result.output
    groups = load(path / "optimizer_state_rank_1.pt")["param_groups"]
    assert all(g["weight_decay"] == 0.2 and g["initial_lr"] == 0.001 for g in groups)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--to", "nonexistent"], 1, "is not in the history"),
    (["--to", "x", "--original"], 2, "not both"),
    ([], 1, "no terminal"),
])
def test_restore_errors_change_nothing(edited_twice: tuple[Path, dict[str, bytes]],
                                       args: list[str], code: int, message: str) -> None:
    path, _ = edited_twice
    before = snapshot(path)
    result = run("restore", path, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert_unchanged(path, before)


def test_restore_without_history(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint()
    result = run("restore", path, "--force")
    assert result.exit_code == 1 and "no edit history" in result.stderr


def test_recover_on_a_clean_checkpoint_does_nothing(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint()
    before = snapshot(path)
    result = run("recover", path)
    assert result.exit_code == 0 and "Nothing to recover" in result.stdout
    assert_unchanged(path, before)
    data = json.loads(run("recover", path, "--json").stdout)
    assert data["action"] == "none"
