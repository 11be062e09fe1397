"""Reading and writing the bytes of one component state file.

One layer for both directions, so what ``list`` shows is exactly what ``modify`` edits.
This first version goes through ``torch.load(weights_only=True)`` / ``torch.save``; torch is
imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StateFileError, ValidationError

_PLAIN = (dict, list, tuple, str, int, float, bool, bytes, type(None))


@dataclass(frozen=True)
class StateDocument:
    """A decoded state file: its path, the object tree and how it was read."""

    path: Path
    root: Any
    backend: str
    private: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def read_state_file(path: Path) -> StateDocument:
    """Decode ``path``; raise StateFileError with the reason when it cannot be read safely."""
    import torch

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read ({exc.strerror})") from exc
    if size == 0:
        raise StateFileError(f"{path}: file is empty")
    try:
        root = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StateFileError(
            f"{path}: cannot be loaded with torch.load(weights_only=True): {reason}"
        ) from exc
    if not isinstance(root, dict):
        raise StateFileError(f"{path}: top level is {type(root).__name__}, expected a dict")
    return StateDocument(path=path, root=root, backend="torch")


def write_state_file(doc: StateDocument, new_root: Any, destination: Path) -> None:
    """Write the complete new file for ``doc`` holding ``new_root`` into ``destination``."""
    import torch

    with open(destination, "wb") as handle:
        torch.save(new_root, handle)


def verify_state_file(doc: StateDocument, written: Path, expected_root: Any) -> None:
    """Raise ValidationError unless ``written`` holds exactly ``expected_root``."""
    try:
        actual = read_state_file(written).root
    except StateFileError as exc:
        raise ValidationError(f"{written}: written file does not load back: {exc}") from exc
    problem = _first_difference(expected_root, actual, "")
    if problem is not None:
        raise ValidationError(f"{written}: written file differs from the plan at {problem}")


def is_opaque(node: Any) -> bool:
    """True for values the editor must never touch (tensors, storages, unknown objects)."""
    return not isinstance(node, _PLAIN)


def describe_opaque(node: Any) -> str:
    """A short description of an opaque value, never its contents."""
    dtype = getattr(node, "dtype", None)
    shape = getattr(node, "shape", None)
    if dtype is not None and shape is not None:
        return f"tensor({str(dtype).removeprefix('torch.')}, shape={list(shape)})"
    return f"object({type(node).__module__}.{type(node).__qualname__})"


def _first_difference(expected: Any, actual: Any, where: str) -> str | None:
    if is_opaque(expected) or is_opaque(actual):
        if not (_same_tensor_bits(expected, actual)):
            return where or "<root>"
        return None
    if type(expected) is not type(actual):
        return where or "<root>"
    if isinstance(expected, dict):
        if list(expected.keys()) != list(actual.keys()):
            return where or "<root>"
        for key in expected:
            found = _first_difference(expected[key], actual[key], f"{where}.{key}".lstrip("."))
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return where or "<root>"
        for index, (left, right) in enumerate(zip(expected, actual)):
            found = _first_difference(left, right, f"{where}.{index}".lstrip("."))
            if found:
                return found
        return None
    if isinstance(expected, float) and expected != expected:
        return None if actual != actual else (where or "<root>")
    return None if expected == actual else (where or "<root>")


def _same_tensor_bits(left: Any, right: Any) -> bool:
    import torch

    if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
        return type(left) is type(right) and left == right
    if left.dtype != right.dtype or left.shape != right.shape:
        return False
    left_bytes = left.detach().contiguous().reshape(-1).view(torch.uint8)
    right_bytes = right.detach().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(left_bytes, right_bytes))
