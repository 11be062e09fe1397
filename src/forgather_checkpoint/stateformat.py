"""Reading and writing the bytes of one component state file.

One layer for both directions, so what ``list`` shows is exactly what ``modify`` edits.

PyTorch zip files (everything ``torch.save`` has written since 1.6) go through our own engine:
``torchzip`` finds the ``data.pkl`` record and ``pickle_codec`` decodes it without importing or
calling anything, so tensors stay on disk as placeholders and no code in the file can run.
Writing re-encodes only the pickle and copies every tensor record byte for byte.

Legacy (non-zip) torch files fall back to ``torch.load(weights_only=True)`` / ``torch.save``;
that path is reported through ``StateDocument.backend == "torch-legacy"`` and its notes. torch is
imported lazily, only there and in ``verify_load_with_torch``, so importing this module (and
``list``/``components``/``--dry-run`` on zip files) never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pickle_codec, torchzip
from .errors import StateFileError, ValidationError

__all__ = [
    "StateDocument",
    "describe_opaque",
    "is_opaque",
    "read_state_file",
    "verify_load_with_torch",
    "verify_state_file",
    "write_state_file",
]

_PLAIN = (dict, list, tuple, str, int, float, bool, bytes, type(None))

ZIP_BACKEND = "zip"
LEGACY_BACKEND = "torch-legacy"


@dataclass(frozen=True)
class StateDocument:
    """A decoded state file: its path, the object tree and how it was read.

    ``private`` holds backend data (for zip files: the archive layout and the original pickle
    bytes) that ``write_state_file``/``verify_state_file`` need; ``notes`` are things worth
    telling the user (legacy fallback, compressed pickle record).
    """

    path: Path
    root: Any
    backend: str
    private: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    notes: tuple[str, ...] = ()


def read_state_file(path: Path) -> StateDocument:
    """Decode ``path``; raise StateFileError with the reason when it cannot be read safely."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read ({exc.strerror})") from exc
    if size == 0:
        raise StateFileError(f"{path}: file is empty")
    try:
        layout = torchzip.open_archive(path)
    except torchzip.LegacyFormatError:
        return _read_legacy(path)
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = torchzip.read_pickle_bytes(layout)
        decoded = pickle_codec.decode_pickle_info(data)
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from None
    root = decoded.root
    if not isinstance(root, dict):
        raise StateFileError(f"{path}: top level is {_kind_name(root)}, expected a dict")
    violation = pickle_codec.weights_only_violation(root, decoded.opcodes)
    if violation is not None:
        raise StateFileError(
            f"{path}: torch.load(weights_only=True) would refuse this file (it {violation}); "
            "it is not a plain state file and is left untouched"
        )
    notes = []
    if layout.pickle_compressed:
        notes.append(f"{layout.pickle_record.name} is compressed; a rewrite stores it "
                     "uncompressed")
    if decoded.protocol != 2:
        notes.append(f"pickle protocol {decoded.protocol}; a rewrite uses protocol 2 as "
                     "torch.save does")
    return StateDocument(path=path, root=root, backend=ZIP_BACKEND,
                         private={"layout": layout, "pickle": data}, notes=tuple(notes))


def write_state_file(doc: StateDocument, new_root: Any, destination: Path) -> None:
    """Write the complete new file for ``doc`` holding ``new_root`` into ``destination``.

    ``destination`` is an existing, empty temp file; no fsync or rename happens here.
    """
    if doc.backend == LEGACY_BACKEND:
        _write_legacy(new_root, destination)
        return
    layout = _layout_of(doc)
    _check_still_loadable(new_root, destination)
    data = pickle_codec.encode_pickle(new_root, protocol=2)
    try:
        torchzip.rewrite(layout, destination, data)
    except StateFileError as exc:
        raise StateFileError(f"{doc.path}: cannot rewrite: {exc}") from None


def verify_state_file(doc: StateDocument, written: Path, expected_root: Any) -> None:
    """Raise ValidationError unless ``written`` holds exactly ``expected_root``.

    For zip files: the written directory is re-read, the new data.pkl is CRC-checked, decoded
    and compared with ``expected_root`` (values and sharing), and every tensor record must be
    present with its original size, CRC and data alignment.
    """
    if doc.backend == LEGACY_BACKEND:
        _verify_legacy(written, expected_root)
        return
    layout = _layout_of(doc)
    _check_still_loadable(expected_root, written)
    expected = pickle_codec.encode_pickle(expected_root, protocol=2)
    torchzip.verify_rewrite(written, layout, expected, expected_root)


def verify_load_with_torch(path: Path) -> Any:
    """The optional ``--verify-load`` check: load ``path`` as Forgather will (mmap, CPU).

    Returns the loaded object; raises ValidationError when torch refuses the file.
    """
    import torch

    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as exc:  # torch raises many unrelated types for bad files
        raise ValidationError(f"{path}: torch.load(weights_only=True, mmap=True) fails: "
                              f"{_first_line(exc)}") from exc


def is_opaque(node: Any) -> bool:
    """True for values the editor must never touch (tensors, storages, unknown objects)."""
    return not isinstance(node, _PLAIN)


def describe_opaque(node: Any) -> str:
    """A short description of an opaque value, never its contents."""
    if isinstance(node, (pickle_codec.Reduced, pickle_codec.GlobalRef,
                         pickle_codec.PersistentRef)):
        return pickle_codec.describe(node)
    # Real tensors only occur on the legacy path; duck-typed so torch need not be imported.
    dtype = getattr(node, "dtype", None)
    shape = getattr(node, "shape", None)
    if dtype is not None and shape is not None:
        return f"tensor({str(dtype).removeprefix('torch.')}, shape={list(shape)})"
    return f"object({type(node).__module__}.{type(node).__qualname__})"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _layout_of(doc: StateDocument) -> torchzip.ArchiveLayout:
    layout = doc.private.get("layout")
    if not isinstance(layout, torchzip.ArchiveLayout):
        raise StateFileError(f"{doc.path}: document was not read by read_state_file")
    return layout


def _check_still_loadable(root: Any, where: Path) -> None:
    # A file torch.load(weights_only=True) accepted must still be accepted after the edit.
    violation = pickle_codec.weights_only_violation(root)
    if violation is not None:
        raise ValidationError(f"{where}: the edited state would not load with "
                              f"torch.load(weights_only=True) (it {violation})")


def _kind_name(node: Any) -> str:
    if is_opaque(node):
        return describe_opaque(node)
    return type(node).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_LEGACY_NOTE = ("legacy (non-zip) torch file: read and written with torch.load(weights_only=True)"
                " and torch.save, which loads every tensor into memory")


def _read_legacy(path: Path) -> StateDocument:
    import torch

    try:
        root = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for bad files
        raise StateFileError(
            f"{path}: legacy torch file cannot be loaded with torch.load(weights_only=True): "
            f"{_first_line(exc)}"
        ) from exc
    if not isinstance(root, dict):
        raise StateFileError(f"{path}: top level is {_kind_name(root)}, expected a dict")
    return StateDocument(path=path, root=root, backend=LEGACY_BACKEND, notes=(_LEGACY_NOTE,))


def _write_legacy(new_root: Any, destination: Path) -> None:
    import torch

    with open(destination, "wb") as handle:
        torch.save(new_root, handle, _use_new_zipfile_serialization=False)


def _verify_legacy(written: Path, expected_root: Any) -> None:
    try:
        actual = _read_legacy(Path(written)).root
    except StateFileError as exc:
        raise ValidationError(f"{written}: written file does not load back: {exc}") from exc
    problem = _first_difference(expected_root, actual, "")
    if problem is not None:
        raise ValidationError(f"{written}: written file differs from the plan at {problem}")


def _first_difference(expected: Any, actual: Any, where: str) -> str | None:
    if is_opaque(expected) or is_opaque(actual):
        return None if _same_tensor_bits(expected, actual) else (where or "<root>")
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
