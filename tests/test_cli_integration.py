"""End to end through the installed script: every pattern x optimizer x scheduler, crashes in
the middle of a real `modify`, concurrent editors, and bad inputs that must change nothing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from forgather_checkpoint.examples import LAYOUTS, make_rank_objects

from .forgather_loader import load_manifest_strict
from .helpers import assert_tensors_identical, assert_unchanged, load, snapshot

SCRIPT = Path(sys.executable).parent / "forgather-checkpoint"


def cli(*args: Any, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def component_files(path: Path, key: str) -> list[Path]:
    return sorted(p for p in path.glob(f"{key}_state*.pt"))


def rank_of(file: Path) -> int:
    return int(file.stem.rsplit("_", 1)[1]) if "rank" in file.stem else 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("optimizer", "scheduler"),
                         [("adamw", "lambda"), ("sgd", "cosine"), ("adamw", "sequential")])
def test_modify_loads_into_real_objects_in_every_pattern(
    make_checkpoint: Callable[..., Path], layout: str, optimizer: str, scheduler: str,
) -> None:
    path = make_checkpoint(layout=layout, optimizer=optimizer, scheduler=scheduler,
                           world_size=4)
    optimizer_files = component_files(path, "optimizer")
    before = {f: load(f) for f in optimizer_files}
    result = cli("modify", path, "-c", "optimizer", "--set", "weight_decay=0.025",
                 "--scale", "lr=0.5", "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["applied"] is True
    for file in optimizer_files:
        after = load(file)
        objects = make_rank_objects(layout=layout, optimizer=optimizer, scheduler=scheduler,
                                    world_size=4, steps=5, seed=0, rank=rank_of(file))
        objects.optimizer.load_state_dict(after)
        for old, group in zip(before[file]["param_groups"], objects.optimizer.param_groups):
            assert group["weight_decay"] == 0.025
            assert group["lr"] == old["lr"] * 0.5
        assert_tensors_identical(before[file]["state"], after["state"])
    scheduler_file = component_files(path, "scheduler")[0]
    result = cli("modify", path, "-c", "scheduler", "--set", "last_epoch=11", "--force")
    assert result.returncode == 0, result.stderr
    objects = make_rank_objects(layout=layout, optimizer=optimizer, scheduler=scheduler,
                                world_size=4, steps=5, seed=0)
    objects.scheduler.load_state_dict(load(scheduler_file))
    assert objects.scheduler.last_epoch == 11
    load_manifest_strict(path / "checkpoint_manifest.json")


# ---------------------------------------------------------------------------------------------
# Crashes in the middle of a real modify


def _big_pipeline(make_checkpoint: Callable[..., Path]) -> Path:
    """4 rank files of a few MB each (real AdamW state, padded with a large extra buffer)."""
    path = make_checkpoint(layout="pipeline", world_size=4)
    for file in component_files(path, "optimizer"):
        state = load(file)
        state["state"][0]["extra_buffer"] = torch.randn(600_000)
        torch.save(state, file)
    return path


def _all_old_or_all_new(path: Path, old: dict[str, bytes], expect_new_lr: float) -> str:
    files = component_files(path, "optimizer")
    now = {f.name: f.read_bytes() for f in files}
    if now == {k: v for k, v in old.items() if k in now}:
        return "old"
    for file in files:
        state = load(file)
        assert all(g["lr"] == expect_new_lr for g in state["param_groups"]), file.name
        original = torch.load(path / f"{file.name}.bak", weights_only=True)
        assert_tensors_identical(original["state"], state["state"])
    return "new"


@pytest.mark.parametrize("point", ["after-stage-2", "after-validate", "after-journal",
                                   "after-replace-1", "after-replace-3",
                                   "before-journal-complete"])
def test_killed_modify_recovers_all_old_or_all_new(make_checkpoint: Callable[..., Path],
                                                   point: str) -> None:
    path = _big_pipeline(make_checkpoint)
    old = {f.name: f.read_bytes() for f in component_files(path, "optimizer")}
    killed = cli("modify", path, "-c", "optimizer", "--set", "lr=0.125", "--force",
                 env={"FORGATHER_CHECKPOINT_FAILPOINTS": f"{point}=kill"})
    assert killed.returncode == -9
    status = cli("components", path, "--json")
    assert json.loads(status.stdout)["interrupted_commit"], status.stdout
    recovered = cli("recover", path)
    assert recovered.returncode == 0, recovered.stderr
    outcome = _all_old_or_all_new(path, old, 0.125)
    assert outcome == ("old" if point in ("after-stage-2", "after-validate") else "new")
    assert not [p for p in path.iterdir() if ".fgc-tmp-" in p.name or "journal" in p.name
                or p.name.endswith(".lock")]
    load_manifest_strict(path / "checkpoint_manifest.json")


def test_list_recovers_a_crashed_commit_first(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4)
    cli("modify", path, "-c", "optimizer", "--set", "lr=0.25", "--force",
        env={"FORGATHER_CHECKPOINT_FAILPOINTS": "after-replace-1=kill"})
    listing = cli("list", path, "--json")
    assert listing.returncode == 0, listing.stderr
    entries = json.loads(listing.stdout)["entries"]
    lrs = {v["value"] for e in entries if e["key"] == "lr" for v in e["values"]}
    assert lrs == {0.25}  # every rank new, never a mixture


def test_disk_full_during_modify_changes_nothing(make_checkpoint: Callable[..., Path]) -> None:
    path = _big_pipeline(make_checkpoint)
    before = snapshot(path)
    for point in ("after-stage-3", "after-backup-2", "after-replace-2"):
        result = cli("modify", path, "-c", "optimizer", "--set", "lr=0.5", "--force",
                     env={"FORGATHER_CHECKPOINT_FAILPOINTS": f"{point}=enospc"})
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "No space left" in result.stderr
        assert_unchanged(path, before)


# ---------------------------------------------------------------------------------------------
# Concurrent editors


def test_eight_concurrent_editors_on_different_keys(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4, scheduler="cosine")
    edits = [("optimizer", "lr=0.5"), ("optimizer", "weight_decay=0.03"),
             ("optimizer", "eps=1e-7"), ("optimizer", "betas=(0.8,0.9)"),
             ("scheduler", "last_epoch=40"), ("scheduler", "T_max=77"),
             ("scheduler", "eta_min=1e-9"), ("optimizer", "amsgrad=True")]

    def edit(item: tuple[str, str]) -> Any:
        return cli("modify", path, "-c", item[0], "--set", item[1], "--force", "--wait", "60")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(edit, edits))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    for file in component_files(path, "optimizer"):
        for group in load(file)["param_groups"]:
            assert (group["lr"], group["weight_decay"], group["eps"], group["betas"],
                    group["amsgrad"]) == (0.5, 0.03, 1e-7, (0.8, 0.9), True)
    scheduler = load(component_files(path, "scheduler")[0])
    assert (scheduler["last_epoch"], scheduler["T_max"], scheduler["eta_min"]) == (40, 77, 1e-9)
    history = cli("history", path, "--json")
    assert len(json.loads(history.stdout)["entries"]) == 8
    load_manifest_strict(path / "checkpoint_manifest.json")


def test_refused_editor_reports_the_holder(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint()
    slow = subprocess.Popen(
        [str(SCRIPT), "modify", str(path), "-c", "optimizer", "--set", "lr=0.5", "--force"],
        env={**os.environ, "FORGATHER_CHECKPOINT_FAILPOINTS": "after-validate=sleep:3"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if (path / ".forgather_checkpoint.lock").exists():
                break
            subprocess.run(["sleep", "0.05"])
        refused = cli("modify", path, "-c", "optimizer", "--set", "eps=1e-3", "--force")
        assert refused.returncode == 1
        assert f"process {slow.pid}" in refused.stderr and "started" in refused.stderr
    finally:
        assert slow.wait(timeout=60) == 0
    assert load(path / "optimizer_state.pt")["param_groups"][0]["lr"] == 0.5


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear error, exit 1, nothing changed, no traceback


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _bit_flip_pickle(file: Path) -> None:
    data = bytearray(file.read_bytes())
    with zipfile.ZipFile(file) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    # The local header's extra field (torch pads it) differs from the central directory's.
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    offset = info.header_offset + 30 + name_len + extra_len + 40
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def _not_a_dict(file: Path) -> None:
    torch.save([1, 2, 3], file)


BAD_INPUTS: dict[str, Callable[[Path], None]] = {
    "missing rank file": lambda p: (p / "optimizer_state_rank_1.pt").unlink(),
    "truncated file": lambda p: _truncate(p / "optimizer_state_rank_2.pt"),
    "bit-flipped pickle": lambda p: _bit_flip_pickle(p / "optimizer_state_rank_0.pt"),
    "empty file": lambda p: (p / "optimizer_state_rank_3.pt").write_bytes(b""),
    "not a zip": lambda p: (p / "optimizer_state_rank_3.pt").write_bytes(b"hello world" * 50),
    "top level not a dict": lambda p: _not_a_dict(p / "optimizer_state_rank_1.pt"),
    "manifest not JSON": lambda p: (p / "checkpoint_manifest.json").write_text("{"),
    "manifest lacks fields": lambda p: (p / "checkpoint_manifest.json").write_text(
        json.dumps({"components": {}})),
    "manifest unknown entry key": lambda p: (p / "checkpoint_manifest.json").write_text(
        json.dumps({**json.loads((p / "checkpoint_manifest.json").read_text()),
                    "components": {"optimizer": {"key": "optimizer", "bogus": 1,
                                                 "sharing_pattern": "per_rank",
                                                 "ranks": [0, 1, 2, 3]}}})),
    "another component's file": lambda p: (p / "optimizer_state_rank_0.pt").write_bytes(
        (p / "scheduler_state.pt").read_bytes()),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_change_nothing(make_checkpoint: Callable[..., Path], name: str) -> None:
    path = make_checkpoint(layout="pipeline", world_size=4)
    BAD_INPUTS[name](path)
    before = snapshot(path)
    result = cli("modify", path, "-c", "optimizer", "--set", "lr=0.5", "--force")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert_unchanged(path, before)


def test_a_component_file_instead_of_the_directory(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint()
    before = snapshot(path)
    result = cli("modify", path / "scheduler_state.pt", "-c", "optimizer", "--set", "lr=1",
                 "--force")
    assert result.returncode == 1 and "pass its checkpoint directory" in result.stderr
    assert_unchanged(path, before)


def test_stale_temp_files_are_cleaned_by_the_next_edit(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = make_checkpoint()
    stale = path / ".optimizer_state.pt.fgc-tmp-99999-deadbeef"
    stale.write_bytes(b"half-written by a crashed run")
    flagged = cli("components", path)
    assert "leftover temp file" in flagged.stderr
    result = cli("modify", path, "-c", "optimizer", "--set", "lr=0.5", "--force")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert load(path / "optimizer_state.pt")["param_groups"][0]["lr"] == 0.5
