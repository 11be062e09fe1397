"""What differs between two checkpoints, or between the rank files of one checkpoint.

Values are compared the way ``list`` shows them (:func:`listing.document_rows`): per file, per
optimizer param group, per dotted key, plus the non-tensor leaves of optimizer per-parameter
``state``. Tensors (and other opaque values) are never read: they compare by their description
(dtype and shape), so two tensors of the same dtype and shape but different contents are equal
here. ``params`` index lists are not compared (they name parameters, not hyperparameters).

Files are matched by name, so two checkpoints are compared file for file when they share a
layout; a file or a component present on one side only is reported as such.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .discovery import Component, discover_components
from .listing import document_rows, flatten, format_value, same_listed_value, to_json_value
from .stateformat import StateDocument, is_opaque, read_state_file

DIFF_SCHEMA = "forgather-checkpoint.diff"
DIFF_SCHEMA_VERSION = 1

RowKey = tuple[int | None, int | None, str]


@dataclass(frozen=True)
class ValueDifference:
    """One value that differs: where it is, its value in A and in B.

    ``in_a``/``in_b`` are False when the value exists on one side only; the missing side's value
    is then None (which is also a legitimate stored value, hence the flags).
    """

    component: str
    file: str
    optimizer: int | None
    group: int | None
    key: str
    a: Any
    b: Any
    in_a: bool = True
    in_b: bool = True

    @property
    def location(self) -> str:
        """``file[optimizer 1, group 0] key`` as one label."""
        where = []
        if self.optimizer is not None:
            where.append(f"optimizer {self.optimizer}")
        if self.group is not None:
            where.append(f"group {self.group}")
        inside = f"[{', '.join(where)}]" if where else ""
        return f"{self.file}{inside} {self.key}" if self.key else f"{self.file}{inside}"

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "file": self.file,
            "optimizer": self.optimizer,
            "group": self.group,
            "key": self.key,
            "a": _side_json(self.a, self.in_a),
            "b": _side_json(self.b, self.in_b),
        }


@dataclass(frozen=True)
class Unmatched:
    """A component (``file`` None) or a file that exists on one side only."""

    component: str
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.file}


@dataclass(frozen=True)
class DiffResult:
    """Everything that differs between side A and side B.

    ``mode`` is ``"checkpoints"`` (A and B are checkpoint directories) or ``"ranks"`` (A is the
    reference file of a component, B the checkpoint whose other files were compared with it).
    """

    a: str
    b: str
    mode: str
    differences: tuple[ValueDifference, ...]
    only_in_a: tuple[Unmatched, ...] = ()
    only_in_b: tuple[Unmatched, ...] = ()
    files_compared: int = 0

    @property
    def equal(self) -> bool:
        return not (self.differences or self.only_in_a or self.only_in_b)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (schema ``forgather-checkpoint.diff``, version 1).

        ``{"schema", "version", "mode", "a", "b", "equal", "files_compared",
        "differences": [{"component", "file", "optimizer", "group", "key",
        "a": {"present", "value", "repr"}, "b": {...}}],
        "only_in_a": [{"component", "file"}], "only_in_b": [...]}``. ``value`` is JSON-safe
        (tuples as lists, tensors null, non-finite floats as strings); ``repr`` is the value as
        ``list`` prints it; an absent side has ``present`` false and null ``value``/``repr``.
        """
        return {
            "schema": DIFF_SCHEMA,
            "version": DIFF_SCHEMA_VERSION,
            "mode": self.mode,
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "files_compared": self.files_compared,
            "differences": [d.to_json() for d in self.differences],
            "only_in_a": [u.to_json() for u in self.only_in_a],
            "only_in_b": [u.to_json() for u in self.only_in_b],
        }


def diff_checkpoints(a: Path, b: Path, component: str | None = None) -> DiffResult:
    """Every non-tensor value that differs between checkpoints ``a`` and ``b``.

    All components present in either checkpoint are compared, or only ``component`` (which must
    exist in at least one of them: ComponentNotFoundError otherwise). Files are matched by name.
    Tensors compare by description (dtype and shape) only, never by contents. Raises
    StateFileError when a file present on both sides cannot be decoded.
    """
    info_a = discover_components(Path(a))
    info_b = discover_components(Path(b))
    if component is not None:
        if component not in info_a.components and component not in info_b.components:
            info_a.component(component)  # raises with the list of what exists
        keys = [component]
    else:
        keys = list(info_a.components)
        keys += [key for key in info_b.components if key not in info_a.components]

    differences: list[ValueDifference] = []
    only_a: list[Unmatched] = []
    only_b: list[Unmatched] = []
    compared = 0
    for key in keys:
        comp_a = info_a.components.get(key)
        comp_b = info_b.components.get(key)
        if comp_a is None or not comp_a.files:
            if comp_b is not None and comp_b.files:
                only_b.append(Unmatched(key))
            continue
        if comp_b is None or not comp_b.files:
            only_a.append(Unmatched(key))
            continue
        files_a = _files_by_name(comp_a)
        files_b = _files_by_name(comp_b)
        only_a += [Unmatched(key, name) for name in files_a if name not in files_b]
        only_b += [Unmatched(key, name) for name in files_b if name not in files_a]
        for name, path_a in files_a.items():
            if name in files_b:
                differences += diff_documents(
                    key, name, read_state_file(path_a), read_state_file(files_b[name]))
                compared += 1
    return DiffResult(
        a=str(a), b=str(b), mode="checkpoints", differences=tuple(differences),
        only_in_a=tuple(only_a), only_in_b=tuple(only_b), files_compared=compared,
    )


def diff_ranks(path: Path, component: str) -> DiffResult:
    """Compare each file of ``component`` in checkpoint ``path`` with the component's first file.

    The first file (lowest rank) is side A of every difference; ``ValueDifference.file`` names
    the other file. A component with one file is trivially equal. Missing rank files are not
    reported here (``verify`` does that). Tensors compare by description only.
    """
    info = discover_components(Path(path))
    files = info.component(component).files
    if not files:
        return DiffResult(a=str(path), b=str(path), mode="ranks", differences=())
    reference = read_state_file(files[0].path)
    differences: list[ValueDifference] = []
    for other in files[1:]:
        differences += diff_documents(component, other.name, reference,
                                      read_state_file(other.path))
    return DiffResult(
        a=str(files[0].path), b=str(path), mode="ranks", differences=tuple(differences),
        files_compared=len(files),
    )


def diff_documents(
    component: str, file: str, a: StateDocument, b: StateDocument
) -> list[ValueDifference]:
    """The differences between two decoded files, in A's row order, then B-only rows."""
    rows_a = _rows(a.root)
    rows_b = _rows(b.root)
    found: list[ValueDifference] = []
    for slot, value_a in rows_a.items():
        optimizer, group, key = slot
        if slot not in rows_b:
            found.append(ValueDifference(component, file, optimizer, group, key, value_a, None,
                                         in_b=False))
        elif not same_listed_value(value_a, rows_b[slot]):
            found.append(ValueDifference(component, file, optimizer, group, key, value_a,
                                         rows_b[slot]))
    for slot, value_b in rows_b.items():
        if slot not in rows_a:
            optimizer, group, key = slot
            found.append(ValueDifference(component, file, optimizer, group, key, None, value_b,
                                         in_a=False))
    return found


def _rows(root: Any) -> dict[RowKey, Any]:
    rows: dict[RowKey, Any] = {}
    for optimizer, group, key, value in document_rows(root):
        rows.setdefault((optimizer, group, key), value)
    for optimizer, key, value in _state_leaves(root):
        rows.setdefault((optimizer, None, key), value)
    return rows


def _state_leaves(root: Any) -> Iterator[tuple[int | None, str, Any]]:
    """Non-tensor leaves of optimizer per-parameter ``state`` (``list`` does not show them)."""
    if not isinstance(root, Mapping):
        return
    states: list[tuple[int | None, Any]] = []
    if "param_groups" in root:
        states.append((None, root.get("state")))
    elif isinstance(root.get("optimizers"), list):
        for position, entry in enumerate(root["optimizers"]):
            if isinstance(entry, Mapping) and isinstance(entry.get("state_dict"), Mapping):
                label = entry.get("index", position)
                if not isinstance(label, int) or isinstance(label, bool):
                    label = position
                states.append((label, entry["state_dict"].get("state")))
    for optimizer, state in states:
        if isinstance(state, Mapping) and state:
            for key, value in flatten(state, "state"):
                if not _holds_opaque(value):
                    yield optimizer, key, value


def _holds_opaque(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_opaque(item) for item in value)
    return is_opaque(value)


def _files_by_name(component: Component) -> dict[str, Path]:
    return {file.name: file.path for file in component.files}


def _side_json(value: Any, present: bool) -> dict[str, Any]:
    if not present:
        return {"present": False, "value": None, "repr": None}
    return {"present": True, "value": to_json_value(value), "repr": format_value(value)}
