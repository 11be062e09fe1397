"""Helpers for the writer, crash and concurrency tests: a real multi-rank checkpoint and checks.

The template checkpoint holds real ``torch.optim.AdamW`` states for 4 ranks (pipeline-parallel
style: each rank its own parameters and two param groups), a real LambdaLR scheduler state and a
manifest; a sibling folder holds the *new* bytes of the same files (every lr halved, manifest
metadata updated), saved with ``torch.save`` too, so both sides load with
``torch.load(weights_only=True)``. Built once per session (torch is slow to import), copied per
test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from forgather_checkpoint.locking import LOCK_NOTE_NAME
from forgather_checkpoint.writer import (
    JOURNAL_COMPLETE_NAME,
    JOURNAL_NAME,
    JOURNAL_ROLLBACK_NAME,
    find_temp_files,
)

RANKS = 4
CHILD = Path(__file__).with_name("writer_child.py")
COMPONENT_FILES = [f"optimizer_state_rank_{r}.pt" for r in range(RANKS)] + [
    "checkpoint_manifest.json"
]


def build_template(root: Path, hidden: int = 384) -> tuple[Path, Path]:
    """(checkpoint dir, dir of new contents). ``hidden=384``: ~1.7 MiB per rank file."""
    import torch

    ckpt = root / "checkpoints" / "checkpoint-10"
    new = root / "new"
    ckpt.mkdir(parents=True)
    new.mkdir()
    sizes = {}
    for rank in range(RANKS):
        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 4))
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        model(torch.randn(2, hidden)).sum().backward()
        opt.step()
        sched.step()
        name = f"optimizer_state_rank_{rank}.pt"
        state = opt.state_dict()
        torch.save(state, ckpt / name)
        for group in state["param_groups"]:
            group["lr"] = group["lr"] / 2
        torch.save(state, new / name)
        sizes[name] = (ckpt / name).stat().st_size
        if rank == 0:
            torch.save(sched.state_dict(), ckpt / "scheduler_state.pt")
    manifest = {
        "checkpoint_path": str(ckpt),
        "world_size": RANKS,
        "timestamp": "2026-02-10T07:14:59",
        "components": {
            "optimizer": {
                "key": "optimizer",
                "sharing_pattern": "per_rank",
                "ranks": list(range(RANKS)),
                "replicated_across": None,
                "group_name": None,
                "size_bytes": sum(sizes.values()),
                "checksum": None,
                "metadata": {},
            }
        },
        "training_args_hash": None,
        "forgather_version": None,
        "pytorch_version": torch.__version__,
        "metadata": {},
    }
    (ckpt / "checkpoint_manifest.json").write_text(json.dumps(manifest, indent=2))
    manifest["components"]["optimizer"]["metadata"] = {"modified_by": "test", "changes": ["lr"]}
    (new / "checkpoint_manifest.json").write_text(json.dumps(manifest, indent=2))
    return ckpt, new


def copy_template(template: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    ckpt_src, new_src = template
    ckpt = dest / "checkpoints" / ckpt_src.name
    shutil.copytree(ckpt_src, ckpt)
    shutil.copytree(new_src, dest / "new")
    # A known, old directory mtime, so "unchanged" cannot pass by coincidence.
    os.utime(ckpt, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return ckpt, dest / "new"


def snapshot(directory: Path, names: list[str] = COMPONENT_FILES) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in names}


def classify(ckpt: Path, old: dict[str, bytes], new: dict[str, bytes]) -> str:
    """'old' or 'new' when every file is, byte for byte; otherwise fail with the details."""
    now = snapshot(ckpt, list(old))
    states = {n: "old" if now[n] == old[n] else "new" if now[n] == new[n] else "??" for n in now}
    assert len(set(states.values())) == 1 and "??" not in states.values(), states
    return next(iter(states.values()))


def assert_loadable(ckpt: Path) -> None:
    import torch

    for name in COMPONENT_FILES:
        if name.endswith(".pt"):
            state = torch.load(ckpt / name, map_location="cpu", weights_only=True)
            assert len(state["param_groups"]) == 2
    json.loads((ckpt / "checkpoint_manifest.json").read_text())


def assert_no_leftovers(ckpt: Path) -> None:
    """No temp file, journal or lock note: what every finished command must leave."""
    assert find_temp_files(ckpt) == []
    for name in (JOURNAL_NAME, JOURNAL_ROLLBACK_NAME, JOURNAL_COMPLETE_NAME, LOCK_NOTE_NAME):
        assert not (ckpt / name).exists(), name
    strays = [p for p in ckpt.rglob("*") if ".fgc-tmp-" in p.name]
    assert strays == []


def child_spec(ckpt: Path, new: Path, names: list[str] = COMPONENT_FILES, **extra: Any) -> str:
    spec = {"checkpoint": str(ckpt), "sources": {n: str(new / n) for n in names}, **extra}
    return json.dumps(spec)


def child_env(failpoints: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FORGATHER_CHECKPOINT_FAILPOINTS", None)
    if failpoints:
        env["FORGATHER_CHECKPOINT_FAILPOINTS"] = failpoints
    return env


def run_child(
    spec: str, failpoints: str | None = None, **popen: Any
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHILD), spec],
        env=child_env(failpoints),
        capture_output=True,
        text=True,
        timeout=60,
        **popen,
    )


def start_child(spec: str, failpoints: str | None = None, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), spec],
        env=child_env(failpoints),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def was_killed(returncode: int) -> bool:
    return returncode == -signal.SIGKILL
