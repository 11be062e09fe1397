"""Flattening decoded state into rows, and comparing them across the files of a component.

``list`` reads every file of a component; rank files that agree are shown once, and where they
disagree each distinct value is shown with the files that hold it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .editor import param_group_sites
from .stateformat import StateDocument, describe_opaque, is_opaque, tensor_scalar


@dataclass(frozen=True)
class ValueVariant:
    """One distinct value of an entry and the files that hold it."""

    value: Any
    files: tuple[str, ...]


@dataclass(frozen=True)
class ListedEntry:
    """A parameter (``group``/``key``) and its value(s) across the component's files."""

    key: str
    group: int | None
    optimizer: int | None
    variants: tuple[ValueVariant, ...]
    absent_from: tuple[str, ...] = ()

    @property
    def consistent(self) -> bool:
        return len(self.variants) == 1 and not self.absent_from


@dataclass(frozen=True)
class ComponentListing:
    """Every listed entry of a component, in first-seen order."""

    component: str
    files: tuple[str, ...]
    entries: tuple[ListedEntry, ...]
    has_param_groups: bool
    notes: tuple[str, ...] = ()

    @property
    def consistent(self) -> bool:
        return all(entry.consistent for entry in self.entries)


def is_leaf(value: Any) -> bool:
    """Values shown on one line: scalars, opaque values, and flat sequences of scalars."""
    if is_opaque(value) or not isinstance(value, (Mapping, list, tuple)):
        return True
    if isinstance(value, Mapping):
        return not value
    return all(not isinstance(item, (Mapping, list, tuple)) and not is_opaque(item)
               for item in value)


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf value) pairs of a nested structure."""
    if prefix and is_leaf(value):
        yield prefix, value
        return
    items: Any = value.items() if isinstance(value, Mapping) else enumerate(value)
    for key, item in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        yield from flatten(item, path)


def document_rows(root: Any) -> Iterator[tuple[int | None, int | None, str, Any]]:
    """(optimizer, group, key, value) rows of one decoded file, as ``list`` shows them."""
    sites = param_group_sites(root)
    if sites is None:
        if is_leaf(root):
            yield None, None, "", root
            return
        for key, value in flatten(root):
            yield None, None, key, value
        return
    for site in sites:
        group = root
        for segment in site.path:
            group = group[segment]
        for key, value in group.items():
            if key == "params":
                continue
            for path, leaf in flatten(value, str(key)):
                yield site.optimizer, site.group, path, leaf
    skipped = {"state", "param_groups", "optimizers"}
    for key, value in root.items():
        if key not in skipped:
            for path, leaf in flatten(value, str(key)):
                yield None, None, path, leaf


def list_documents(component: str, documents: Sequence[StateDocument]) -> ComponentListing:
    """Merge the rows of every file, keeping distinct values apart."""
    names = tuple(doc.path.name for doc in documents)
    order: list[tuple[int | None, int | None, str]] = []
    values: dict[tuple[int | None, int | None, str], list[tuple[Any, list[str]]]] = {}
    for doc in documents:
        for optimizer, group, key, value in document_rows(doc.root):
            slot = (optimizer, group, key)
            if slot not in values:
                values[slot] = []
                order.append(slot)
            for known, files in values[slot]:
                if same_listed_value(known, value):
                    files.append(doc.path.name)
                    break
            else:
                values[slot].append((value, [doc.path.name]))
    entries = []
    for slot in order:
        variants = tuple(ValueVariant(value, tuple(files)) for value, files in values[slot])
        present = {name for variant in variants for name in variant.files}
        absent = tuple(name for name in names if name not in present)
        entries.append(ListedEntry(key=slot[2], group=slot[1], optimizer=slot[0],
                                   variants=variants, absent_from=absent))
    has_groups = any(param_group_sites(doc.root) is not None for doc in documents)
    return ComponentListing(component, names, tuple(entries), has_groups,
                            document_notes(documents))


def document_notes(documents: Sequence[StateDocument]) -> tuple[str, ...]:
    """What the format layer noticed about each file (legacy format, compressed pickle...)."""
    return tuple(f"{doc.path.name}: {note}" for doc in documents
                 for note in getattr(doc, "notes", ()))


def same_listed_value(left: Any, right: Any) -> bool:
    """Equality as ``list`` shows values: tensors compare by their description."""
    if is_opaque(left) or is_opaque(right):
        return (is_opaque(left) and is_opaque(right)
                and describe_opaque(left) == describe_opaque(right))
    if isinstance(left, str) and isinstance(right, str):
        return str(left) == str(right)  # the decoder may hand back a str subclass
    if type(left) is not type(right):
        return False
    if isinstance(left, float) and math.isnan(left):
        return math.isnan(right)
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(
            same_listed_value(a, b) for a, b in zip(left, right))
    if isinstance(left, Mapping):
        return list(left) == list(right) and all(
            same_listed_value(left[k], right[k]) for k in left)
    return bool(left == right)


def format_value(value: Any) -> str:
    """The one-line text form of a value (Python literal syntax; tensors described)."""
    if is_opaque(value):
        return describe_opaque(value)
    if isinstance(value, tuple):
        inner = ", ".join(format_value(item) for item in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def type_name(value: Any) -> str:
    """The type shown by ``-v`` and in JSON: float, int, bool, str, tuple, list, tensor, ..."""
    if is_opaque(value):
        return "tensor" if describe_opaque(value).startswith("tensor") else "object"
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return "dict"
    return type(value).__name__


def to_json_value(value: Any) -> Any:
    """A JSON-safe form: tuples become lists, non-finite floats strings, tensors null (a
    one-element tensor: its element, as ``list`` shows it)."""
    scalar = tensor_scalar(value)
    if scalar is not None:
        return to_json_value(scalar.display_value)
    if is_opaque(value):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value
