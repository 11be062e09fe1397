"""Assertions the tests share: snapshots of a checkpoint directory and real reloads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def snapshot(directory: Path) -> dict[str, Any]:
    """Every file's bytes and mode, plus the directory's mtime: what users care about."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(directory))] = (path.read_bytes(), path.stat().st_mode)
    return {"files": files, "mtime_ns": os.stat(directory).st_mtime_ns}


def assert_unchanged(directory: Path, before: dict[str, Any]) -> None:
    after = snapshot(directory)
    assert sorted(after["files"]) == sorted(before["files"]), "files were added or removed"
    for name, content in before["files"].items():
        assert after["files"][name] == content, f"{name} changed"
    assert after["mtime_ns"] == before["mtime_ns"], "directory mtime changed"


def load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def tensor_bytes(value: Any) -> bytes:
    """The raw bytes of a tensor (bit-exact, NaN payloads included)."""
    return bytes(value.detach().contiguous().reshape(-1).view(torch.uint8).tolist())


def assert_tensors_identical(left: Any, right: Any, where: str = "") -> None:
    """Every tensor in two state trees is bit-identical (dtype, shape and bytes)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor), where
        assert left.dtype == right.dtype and left.shape == right.shape, where
        assert tensor_bytes(left) == tensor_bytes(right), f"tensor bytes differ at {where}"
    elif isinstance(left, dict):
        assert isinstance(right, dict) and list(left) == list(right), where
        for key in left:
            assert_tensors_identical(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert isinstance(right, (list, tuple)) and len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_tensors_identical(a, b, f"{where}.{index}")


def train_steps(optimizer: Any, scheduler: Any, steps: int) -> list[list[float]]:
    """Step a real optimizer (gradients of ones) and scheduler; each step's lr per group."""
    seen = []
    for _ in range(steps):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
        seen.append([float(group["lr"]) for group in optimizer.param_groups])
    return seen
