"""Reading and writing the bytes of one component state file.

One layer for both directions, so what ``list`` shows is exactly what ``modify`` edits.

PyTorch zip files (everything ``torch.save`` has written since 1.6) go through our own engine:
``torchzip`` finds the ``data.pkl`` record and ``pickle_codec`` decodes it without importing or
calling anything, so tensors stay on disk as placeholders and no code in the file can run.
Writing re-encodes only the pickle and copies every tensor record byte for byte.

A tensor of one element (a 0-d learning rate of a fused optimizer, a step counter) is the one
exception to "tensors are never edited": its element is read at decode time (``list`` shows
it) and an edit is a ``pickle_codec.ScalarTensorEdit`` in the new tree. The pickle keeps the
original tensor (dtype, shape, stride, device tag) and the storage record gets the new bytes,
same length, so nothing else in the archive moves. Only a tensor whose storage no other tensor
uses, reached from one place in the tree, is edited in place.

Legacy (non-zip) torch files fall back to ``torch.load(weights_only=True)`` / ``torch.save``;
that path is reported through ``StateDocument.backend == "torch-legacy"`` and its notes. torch is
imported lazily, only there and in ``verify_load_with_torch``, so importing this module (and
``list``/``components``/``--dry-run`` on zip files) never imports torch.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import pickle_codec, torchzip
from .errors import ForbiddenEditError, StateFileError, ValidationError, ValueTypeError

__all__ = [
    "PreparedWrite",
    "StateDocument",
    "describe_opaque",
    "first_difference",
    "is_opaque",
    "read_state_file",
    "scale_tensor_scalar",
    "set_tensor_scalar",
    "tensor_scalar",
    "prepare_write",
    "verify_load_with_torch",
    "verify_prepared",
    "verify_state_file",
    "write_prepared",
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
    violation = pickle_codec.weights_only_violation(root, decoded=decoded)
    if violation is not None:
        raise StateFileError(
            f"{path}: torch.load(weights_only=True) would refuse this file (it {violation}); "
            "it is not a plain state file and is left untouched"
        )
    try:
        _attach_scalars(layout, decoded.usage)
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from None
    notes = []
    if layout.pickle_compressed:
        notes.append(f"{layout.pickle_record.name} is compressed; a rewrite stores it "
                     "uncompressed")
    if decoded.protocol != 2:
        notes.append(f"pickle protocol {decoded.protocol}; a rewrite uses protocol 2 as "
                     "torch.save does")
    return StateDocument(path=path, root=root, backend=ZIP_BACKEND,
                         private={"layout": layout, "pickle": data}, notes=tuple(notes))


@dataclass(frozen=True)
class PreparedWrite:
    """Everything needed to write (and then verify) one file: computed once per file.

    Encoding the pickle, the weights_only check and finding edited elements each walk the
    whole state; a commit writes a file and then verifies it, so they are done here once.
    """

    doc: StateDocument
    root: Any
    pickle: bytes = b""  # the encoded data.pkl (zip files)
    patches: dict[str, bytes] = field(default_factory=dict)  # storage record -> new bytes


def prepare_write(doc: StateDocument, new_root: Any) -> PreparedWrite:
    """Encode ``new_root`` for ``doc``; raises when the edited state would not stay loadable."""
    if doc.backend == LEGACY_BACKEND:
        return PreparedWrite(doc, new_root)
    layout = _layout_of(doc)
    _check_still_loadable(new_root, doc.path)
    data = pickle_codec.encode_pickle(new_root, protocol=2)
    try:
        patches = _storage_patches(doc, layout, new_root)
    except StateFileError as exc:
        raise StateFileError(f"{doc.path}: cannot rewrite: {exc}") from None
    return PreparedWrite(doc, new_root, data, patches)


def write_prepared(prepared: PreparedWrite, destination: Path) -> None:
    """Write the prepared file into ``destination`` (an existing, empty temp file); no fsync
    or rename happens here."""
    doc = prepared.doc
    if doc.backend == LEGACY_BACKEND:
        _write_legacy(prepared.root, destination)
        return
    try:
        torchzip.rewrite(_layout_of(doc), destination, prepared.pickle, prepared.patches)
    except StateFileError as exc:
        raise StateFileError(f"{doc.path}: cannot rewrite: {exc}") from None


def verify_prepared(prepared: PreparedWrite, written: Path) -> None:
    """Raise ValidationError unless ``written`` holds exactly the prepared state.

    For zip files: the written directory is re-read, the new data.pkl is CRC-checked, decoded
    and compared with the intended tree (values and sharing), and every tensor record must be
    present with its original size, CRC and data alignment; a record holding an edited element
    must hold exactly the original bytes with that element replaced.
    """
    doc = prepared.doc
    if doc.backend == LEGACY_BACKEND:
        _verify_legacy(written, prepared.root)
        return
    torchzip.verify_rewrite(written, _layout_of(doc), prepared.pickle, prepared.root,
                            prepared.patches)


def write_state_file(doc: StateDocument, new_root: Any, destination: Path) -> None:
    """Write the complete new file for ``doc`` holding ``new_root`` into ``destination``."""
    write_prepared(prepare_write(doc, new_root), destination)


def verify_state_file(doc: StateDocument, written: Path, expected_root: Any) -> None:
    """Raise ValidationError unless ``written`` holds exactly ``expected_root`` (see
    :func:`verify_prepared`)."""
    try:
        prepared = prepare_write(doc, expected_root)
    except StateFileError as exc:
        raise ValidationError(f"{written}: {exc}") from None
    verify_prepared(prepared, written)


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
    """A short description of an opaque value: never the contents of a tensor, except the one
    element of a one-element tensor (``tensor(float32, value=0.001)``)."""
    if isinstance(node, (pickle_codec.Reduced, pickle_codec.GlobalRef,
                         pickle_codec.PersistentRef, pickle_codec.ScalarTensorEdit)):
        return pickle_codec.describe(node)
    # Real tensors only occur on the legacy path; duck-typed so torch need not be imported.
    dtype = getattr(node, "dtype", None)
    shape = getattr(node, "shape", None)
    if dtype is not None and shape is not None:
        return f"tensor({str(dtype).removeprefix('torch.')}, shape={list(shape)})"
    return f"object({type(node).__module__}.{type(node).__qualname__})"


# --------------------------------------------------------------------------------------------
# One-element tensors: reading and editing their element in place
# --------------------------------------------------------------------------------------------

# dtype -> struct format of one element. bfloat16 has no struct code: it is the upper half of
# a float32 (see _pack_element).
_ELEMENT_FORMATS = {
    "float64": "d", "float32": "f", "float16": "e", "bfloat16": "H", "int64": "q",
    "int32": "i", "int16": "h", "int8": "b", "uint8": "B", "bool": "?",
}
_FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
# A patched storage record is read and rewritten whole to recompute its CRC; a one-element
# tensor's record is a few bytes, so anything big is a view into a big buffer: leave it.
_MAX_PATCHED_RECORD = 1 << 20


def tensor_scalar(node: Any) -> pickle_codec.TensorScalar | None:
    """The element of a one-element tensor (as read, or as an edit will write it), else None."""
    if isinstance(node, pickle_codec.ScalarTensorEdit):
        return node.scalar
    if isinstance(node, pickle_codec.TensorRebuild):
        return node.scalar
    return None


def set_tensor_scalar(node: Any, value: Any, key: str) -> pickle_codec.ScalarTensorEdit:
    """An edit giving a one-element tensor the element ``value``, rounded to its dtype.

    Raises ForbiddenEditError when the tensor cannot be edited in place (not one element,
    storage shared, dtype without a known byte layout) and ValueTypeError for a value the
    dtype cannot hold.
    """
    original, current = _editable_scalar(node, key)
    dtype = current.dtype
    if dtype == "bool":
        if not isinstance(value, bool):
            raise ValueTypeError(f"{key} is a bool tensor ({current.text}); give True or False, "
                                 f"not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueTypeError(f"{key} is a {describe_opaque(node)}; {value!r} is not a number")
    elif dtype not in _FLOAT_DTYPES and isinstance(value, float):
        if not value.is_integer():
            raise ValueTypeError(f"{key} is an {dtype} tensor ({current.text}); {value!r} is "
                                 "not a whole number")
        value = int(value)
    elif dtype in _FLOAT_DTYPES:
        value = float(value)
    try:
        raw = _pack_element(dtype, value, current.byteorder)
    except (OverflowError, struct.error):
        raise ValueTypeError(f"{key}: {value!r} does not fit a {dtype} tensor") from None
    stored = _unpack_element(dtype, raw, current.byteorder)
    scalar = replace(current, value=stored, raw=raw,
                     text=_element_text(dtype, stored, raw, current.byteorder))
    return pickle_codec.ScalarTensorEdit(original, scalar)


def scale_tensor_scalar(node: Any, factor: float, key: str) -> pickle_codec.ScalarTensorEdit:
    """An edit multiplying a one-element tensor's element by ``factor`` (kept in its dtype)."""
    _, current = _editable_scalar(node, key)
    if current.dtype == "bool":
        raise ValueTypeError(f"{key} is a bool tensor ({current.text}); only numbers can be "
                             "scaled")
    # Scale the value as shown (the shortest literal for those bits, e.g. 0.001 for a float32
    # that holds 0.0010000000474974513): that is the value a run was configured with, so the
    # result is what ``torch.tensor(0.001 * factor)`` stores, as a run that used the new value
    # from the start has. Both differ by at most one unit in the last place of the dtype.
    product = current.display_value * factor
    if current.dtype not in _FLOAT_DTYPES:
        if not float(product).is_integer():
            raise ValueTypeError(f"{key} is an {current.dtype} tensor ({current.text}); "
                                 f"{current.text} x {factor!r} = {product!r} is not whole")
        product = int(product)
    return set_tensor_scalar(node, product, key)


def _editable_scalar(node: Any, key: str
                     ) -> tuple[pickle_codec.TensorRebuild, pickle_codec.TensorScalar]:
    if isinstance(node, pickle_codec.ScalarTensorEdit):
        original, current = node.original, node.scalar
    elif isinstance(node, pickle_codec.TensorRebuild) and node.scalar is not None:
        original, current = node, node.scalar
    else:
        raise ForbiddenEditError(
            f"{key} is a {describe_opaque(node)}; only a tensor of one element (such as a 0-d "
            "learning rate) can be edited, in place"
        )
    if current.shared is not None:
        raise ForbiddenEditError(
            f"{key} is a {describe_opaque(node)} but {current.shared}; editing its bytes in "
            "place would change that too, so it is left alone"
        )
    return original, current


def _order(byteorder: str) -> str:
    return ">" if byteorder == "big" else "<"


def _pack_element(dtype: str, value: Any, byteorder: str) -> bytes:
    """The stored bytes of ``value`` as torch would store it (``torch.tensor(value, dtype)``).

    torch converts a Python float to half and bfloat16 through float32, so we round the same
    way (double rounding included). A finite value that would become infinite is refused.
    """
    order = _order(byteorder)
    if dtype in ("float16", "bfloat16", "float32"):
        single = struct.unpack("<f", struct.pack("<f", value))[0]
        if dtype == "float32":
            return struct.pack(order + "f", single)
        if dtype == "float16":
            return struct.pack(order + "e", single)
        bits = struct.unpack("<I", struct.pack("<f", single))[0]
        if single != single:  # NaN: torch's canonical bfloat16 NaN
            half = 0x7FC0
        else:  # round to nearest, ties to even, on the dropped 16 bits (c10::BFloat16)
            half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            if (half & 0x7FFF) == 0x7F80 and abs(single) != float("inf"):
                raise OverflowError("bfloat16 overflow")
        return struct.pack(order + "H", half)
    return struct.pack(order + _ELEMENT_FORMATS[dtype], value)


def _unpack_element(dtype: str, raw: bytes, byteorder: str) -> Any:
    order = _order(byteorder)
    if dtype == "bfloat16":
        half = struct.unpack(order + "H", raw)[0]
        return struct.unpack("<f", struct.pack("<I", half << 16))[0]
    value = struct.unpack(order + _ELEMENT_FORMATS[dtype], raw)[0]
    return float(value) if dtype in _FLOAT_DTYPES else value


def _element_text(dtype: str, value: Any, raw: bytes, byteorder: str) -> str:
    """The shortest literal that ``dtype`` stores as exactly ``raw``."""
    if dtype not in _FLOAT_DTYPES or dtype == "float64" or value != value \
            or value in (float("inf"), float("-inf")):
        return repr(value)
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        try:
            if _pack_element(dtype, candidate, byteorder) == raw:
                return repr(candidate)
        except (OverflowError, struct.error):
            continue
    return repr(value)  # pragma: no cover - 17 significant digits always round-trip


def _storage_record_name(layout: torchzip.ArchiveLayout, key: str) -> str:
    return f"{layout.prefix}/data/{key}" if layout.prefix else f"data/{key}"


def _byteorder(layout: torchzip.ArchiveLayout) -> str:
    # torch writes a ``byteorder`` record; without one, torch.load assumes the native order.
    name = f"{layout.prefix}/byteorder" if layout.prefix else "byteorder"
    record = torchzip.record_named(layout, name)
    if record is None or record.method != 0 or not 0 < record.compressed_size <= 8:
        return sys.byteorder
    (raw,) = torchzip.read_record_ranges(layout, [(record, 0, record.compressed_size)])
    text = raw.decode("ascii", "replace")
    if text not in ("little", "big"):
        raise StateFileError(f"byteorder record says {text!r}; expected 'little' or 'big'")
    return text


def _attach_scalars(layout: torchzip.ArchiveLayout, usage: pickle_codec.TensorUsage) -> None:
    """Read the element of every one-element tensor into its ``TensorRebuild.scalar``.

    One small read per such tensor (a 0-d lr, a step counter); bigger tensors are never read.
    """
    records = {record.name: record for record in layout.records}
    wanted = []
    for node in usage.tensors:
        slot = pickle_codec.scalar_tensor_slot(node)
        if slot is None or slot.dtype not in _ELEMENT_FORMATS:
            continue
        record = records.get(_storage_record_name(layout, slot.storage_key))
        size = struct.calcsize(_ELEMENT_FORMATS[slot.dtype])
        start = slot.offset * size
        if record is None or record.method != 0 or start + size > record.compressed_size:
            continue  # verify/torch.load report broken storages; list just describes it
        wanted.append((node, slot, record, start, size))
    if not wanted:
        return
    byteorder = _byteorder(layout)
    chunks = torchzip.read_record_ranges(layout, [(r, start, size)
                                                  for _, _, r, start, size in wanted])
    for (node, slot, _, _, _), raw in zip(wanted, chunks):
        value = _unpack_element(slot.dtype, raw, byteorder)
        shared = None
        if usage.storage_refs.get(slot.storage_key, 0) > 1:
            shared = "its storage is shared with another tensor in this file"
        elif usage.tensor_refs.get(id(node), 1) > 1:
            shared = (f"the same tensor object is used at {usage.tensor_refs[id(node)]} places "
                      "in this file")
        node.scalar = pickle_codec.TensorScalar(
            dtype=slot.dtype, value=value, text=_element_text(slot.dtype, value, raw, byteorder),
            raw=raw, storage_key=slot.storage_key, location=slot.location, offset=slot.offset,
            byteorder=byteorder, shared=shared)


def _storage_patches(doc: StateDocument, layout: torchzip.ArchiveLayout,
                     root: Any) -> dict[str, bytes]:
    """The new data of every storage record that holds an edited element of ``root``."""
    edits = pickle_codec.find_scalar_edits(root)
    if not edits:
        return {}
    # Sharing is checked again on the tree being written (not only when the edit was made),
    # so no path can patch bytes that another tensor or another place of the tree still uses.
    usage = pickle_codec.tensor_usage(root)
    patches: dict[str, bytearray] = {}
    originals: dict[str, bytes] = {}
    for edit in edits:
        before, after = edit.original.scalar, edit.scalar
        if before is None or before.shared is not None \
                or usage.storage_refs.get(before.storage_key, 0) != 1 \
                or usage.tensor_refs.get(id(edit.original), 0) != 1:
            raise ForbiddenEditError(f"{doc.path.name}: a tensor whose storage or object is "
                                     "used elsewhere in the file cannot be edited in place")
        if (after.dtype, after.storage_key, after.offset, len(after.raw)) != (
                before.dtype, before.storage_key, before.offset, len(before.raw)):
            raise ValidationError(f"{doc.path.name}: an element edit does not match its tensor")
        name = _storage_record_name(layout, before.storage_key)
        if name not in patches:
            patches[name] = bytearray(_read_storage_record(layout, name))
            originals[name] = bytes(patches[name])
        start = before.offset * len(before.raw)
        if originals[name][start:start + len(before.raw)] != before.raw:
            raise StateFileError(f"storage {name} no longer holds the element that was read")
        patches[name][start:start + len(after.raw)] = after.raw
    return {name: bytes(data) for name, data in patches.items()}


def _read_storage_record(layout: torchzip.ArchiveLayout, name: str) -> bytes:
    record = torchzip.record_named(layout, name)
    if record is None:
        raise StateFileError(f"storage record {name} is missing")
    if record.compressed_size > _MAX_PATCHED_RECORD:
        raise ForbiddenEditError(f"{name} holds {record.compressed_size} bytes; a one-element "
                                 "tensor inside a large storage is not edited in place")
    (data,) = torchzip.read_record_ranges(layout, [(record, 0, record.compressed_size)])
    if zlib.crc32(data) != record.crc32:
        raise StateFileError(f"CRC mismatch in {name}: the file is corrupted")
    return data


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
    problem = first_difference(expected_root, actual)
    if problem is not None:
        raise ValidationError(f"{written}: written file differs from the plan at {problem}")


def first_difference(expected: Any, actual: Any, where: str = "") -> str | None:
    """The dotted path of the first place two torch-loaded trees differ, else None.

    Containers must have the same type, keys in the same order and the same length; tensors
    must match bit for bit (so NaNs and -0.0 compare as stored); a NaN equals a NaN.
    """
    if is_opaque(expected) or is_opaque(actual):
        return None if _same_tensor_bits(expected, actual) else (where or "<root>")
    if type(expected) is not type(actual):
        return where or "<root>"
    if isinstance(expected, dict):
        if list(expected.keys()) != list(actual.keys()):
            return where or "<root>"
        for key in expected:
            found = first_difference(expected[key], actual[key], f"{where}.{key}".lstrip("."))
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return where or "<root>"
        for index, (left, right) in enumerate(zip(expected, actual)):
            found = first_difference(left, right, f"{where}.{index}".lstrip("."))
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
    # On the CPU: a caller's state may hold CUDA tensors, the loaded copy never does.
    left_bytes = left.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    right_bytes = right.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(left_bytes, right_bytes))
