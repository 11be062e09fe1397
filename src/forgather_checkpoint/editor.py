"""Edit specifications applied to decoded state trees -> an immutable plan.

Nothing here touches the disk. ``plan_edits`` takes decoded documents and returns, per file, the
new object tree and the list of changes; the writer commits it and ``--dry-run`` only shows it,
so a dry run and a real run print the same plan.

New trees are built copy-on-write along the edited paths: every untouched subtree is the very
object that was decoded, which keeps pickle sharing (memo references, shared storages) intact.
"""

from __future__ import annotations

import ast
import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from .errors import (
    EditSpecError,
    ForbiddenEditError,
    ParameterNotFoundError,
    ParamGroupError,
    UsageProblem,
    ValueTypeError,
)
from .stateformat import (
    StateDocument,
    describe_opaque,
    is_opaque,
    scale_tensor_scalar,
    set_tensor_scalar,
    tensor_scalar,
)

EditKind = Literal["set", "scale"]
Segment = str | int

_KEY_SYNTAX = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_LOWERCASE_LITERALS = {"true": True, "false": False, "none": None, "null": None}


@dataclass(frozen=True)
class EditSpec:
    """One ``--set KEY=VALUE`` or ``--scale KEY=FACTOR`` as typed and as parsed."""

    kind: EditKind
    key: str
    value: Any
    text: str

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))


@dataclass(frozen=True)
class ChangeRecord:
    """One value changed in one file: where it is, what it was, what it becomes."""

    file: str
    group: int | None
    key: str
    old: Any
    new: Any
    optimizer: int | None = None

    @property
    def changed(self) -> bool:
        return not _same_value(self.old, self.new)

    @property
    def location(self) -> str:
        parts = []
        if self.optimizer is not None:
            parts.append(f"optimizer {self.optimizer}")
        if self.group is not None:
            parts.append(f"param group {self.group}")
        return ", ".join(parts)


@dataclass(frozen=True)
class FilePlan:
    """The new tree for one file and the changes that lead to it."""

    document: StateDocument
    new_root: Any
    changes: tuple[ChangeRecord, ...]

    @property
    def changed(self) -> bool:
        return any(change.changed for change in self.changes)


@dataclass(frozen=True)
class EditPlan:
    """Every file of one component with its planned new state."""

    component: str
    files: tuple[FilePlan, ...]

    @property
    def changes(self) -> tuple[ChangeRecord, ...]:
        return tuple(change for plan in self.files for change in plan.changes)

    @property
    def changed_files(self) -> tuple[FilePlan, ...]:
        return tuple(plan for plan in self.files if plan.changed)


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_literal(text: str) -> Any:
    """A Python literal (plus lowercase true/false/none/null); never silently a string."""
    stripped = text.strip()
    if stripped.lower() in _LOWERCASE_LITERALS:
        return _LOWERCASE_LITERALS[stripped.lower()]
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        hint = ""
        if stripped and stripped[0].isalpha():
            hint = f"; quote strings, e.g. \"'{stripped}'\""
        raise EditSpecError(f"{text!r} is not a valid Python literal{hint}") from None
    if isinstance(value, (complex, set, frozenset)):
        raise EditSpecError(f"{text!r}: {type(value).__name__} values are not supported")
    return value


def parse_edit_spec(text: str, kind: EditKind) -> EditSpec:
    """Parse ``KEY=VALUE`` (``--set``) or ``KEY=FACTOR`` (``--scale``)."""
    option = f"--{kind}"
    expected = "KEY=VALUE" if kind == "set" else "KEY=FACTOR"
    if "=" not in text:
        raise EditSpecError(f"{option} {text!r}: expected {expected}, e.g. {option} "
                            + ("weight_decay=0.01" if kind == "set" else "lr=0.5"))
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or not _KEY_SYNTAX.match(key):
        raise EditSpecError(f"{option} {text!r}: {key!r} is not a valid key "
                            "(use names and indices joined by dots, e.g. _schedulers.0.base_lrs)")
    if not raw.strip():
        raise EditSpecError(f"{option} {text!r}: missing value after '='")
    try:
        value = parse_literal(raw)
    except EditSpecError as exc:
        raise EditSpecError(f"{option} {key}: {exc}") from None
    if kind == "scale":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EditSpecError(f"--scale {key}: factor must be a number, got {raw.strip()!r}")
        if not math.isfinite(value):
            raise EditSpecError(f"--scale {key}: factor must be finite, got {raw.strip()!r}")
    return EditSpec(kind=kind, key=key, value=value, text=text)


def check_distinct_keys(specs: Sequence[EditSpec]) -> None:
    """Refuse two edits of one key: their order would be ambiguous."""
    seen: dict[str, EditSpec] = {}
    for spec in specs:
        if spec.key in seen:
            first = seen[spec.key]
            raise EditSpecError(
                f"{spec.key} is edited twice (--{first.kind} {first.text} and "
                f"--{spec.kind} {spec.text}); give one edit per key"
            )
        seen[spec.key] = spec


# ---------------------------------------------------------------------------------------------
# Where edits apply


@dataclass(frozen=True)
class GroupSite:
    """A param group inside a state tree: its path and labels."""

    path: tuple[Segment, ...]
    group: int
    optimizer: int | None


def param_group_sites(root: Any) -> list[GroupSite] | None:
    """Every optimizer param group in ``root``; None when the state has no param groups.

    Handles a plain ``Optimizer.state_dict()`` and the multi-optimizer wrapper
    ``{"optimizers": [{"index": i, "state_dict": {...}}]}``.
    """
    if isinstance(root, Mapping) and isinstance(root.get("param_groups"), list):
        return [GroupSite(("param_groups", i), i, None) for i in range(len(root["param_groups"]))]
    if isinstance(root, Mapping) and isinstance(root.get("optimizers"), list):
        sites: list[GroupSite] = []
        for position, entry in enumerate(root["optimizers"]):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("state_dict"), Mapping):
                continue
            groups = entry["state_dict"].get("param_groups")
            if not isinstance(groups, list):
                continue
            label = entry.get("index", position)
            label = label if isinstance(label, int) and not isinstance(label, bool) else position
            for i in range(len(groups)):
                sites.append(GroupSite(("optimizers", position, "state_dict", "param_groups", i),
                                       i, label))
        return sites
    return None


def _targets(
    document: StateDocument, spec: EditSpec, param_group: int | None,
    optimizer_index: int | None = None,
) -> list[tuple[tuple[Segment, ...], GroupSite | None]]:
    """Absolute paths this spec edits in one document."""
    root = document.root
    sites = select_optimizer(document, param_group_sites(root), optimizer_index)
    first = spec.segments[0]
    if sites is None or first in ("param_groups", "optimizers", "state"):
        if first == "state" and sites is not None:
            raise ForbiddenEditError(
                f"{spec.key}: the optimizer's 'state' holds per-parameter buffers "
                "(momentum, variance, step counts) and cannot be edited"
            )
        if sites is None and param_group is not None:
            raise UsageProblem(
                f"--param-group applies to optimizer param groups; {document.path.name} "
                "has no param_groups"
            )
        return [(_resolve(root, spec.segments, document, spec.key), None)]
    if param_group is not None:
        if param_group < 0:
            raise ParamGroupError(f"--param-group must be >= 0, got {param_group}")
        chosen = [site for site in sites if site.group == param_group]
        if not chosen:
            count = max((site.group for site in sites), default=-1) + 1
            raise ParamGroupError(
                f"param group {param_group} does not exist in {document.path.name} "
                f"({count} group(s): 0..{count - 1})"
            )
        sites = chosen
    targets: list[tuple[tuple[Segment, ...], GroupSite | None]] = []
    for site in sites:
        group = _get(root, site.path)
        if spec.segments[0] not in group:
            keys = ", ".join(str(k) for k in group if k != "params")
            where = _site_label(site)
            raise ParameterNotFoundError(
                f"{spec.segments[0]} not found in {where} of {document.path.name} "
                f"(it has: {keys}); see 'forgather checkpoint list' or use --param-group"
            )
        targets.append((site.path + _resolve(group, spec.segments, document, spec.key), site))
    return targets


def select_optimizer(document: StateDocument, sites: list[GroupSite] | None,
                     optimizer_index: int | None) -> list[GroupSite] | None:
    """Only the groups of optimizer ``optimizer_index`` of a multi-optimizer checkpoint."""
    if optimizer_index is None:
        return sites
    if not sites or all(site.optimizer is None for site in sites):
        raise UsageProblem(
            f"--optimizer applies to multi-optimizer checkpoints ({{'optimizers': [...]}}); "
            f"{document.path.name} holds a single optimizer"
        )
    chosen = [site for site in sites if site.optimizer == optimizer_index]
    if not chosen:
        known = sorted({site.optimizer for site in sites if site.optimizer is not None})
        raise ParamGroupError(
            f"optimizer {optimizer_index} does not exist in {document.path.name} "
            f"(optimizers: {', '.join(map(str, known))})"
        )
    return chosen


def _site_label(site: GroupSite) -> str:
    label = f"param group {site.group}"
    return label if site.optimizer is None else f"optimizer {site.optimizer} {label}"


def _resolve(
    node: Any, segments: Sequence[str], document: StateDocument, key: str
) -> tuple[Segment, ...]:
    """Turn dotted segments into real keys/indices, with errors that say what exists."""
    resolved: list[Segment] = []
    for depth, segment in enumerate(segments):
        here = ".".join(segments[:depth]) or "the top level"
        if isinstance(node, Mapping):
            real = _mapping_key(node, segment)
            if real is _MISSING:
                keys = ", ".join(str(k) for k in node)
                raise ParameterNotFoundError(
                    f"{key}: {segment!r} not found at {here} of {document.path.name} "
                    f"(keys: {keys or 'none'}); see 'forgather checkpoint list'"
                )
            resolved.append(real)
            node = node[real]
        elif isinstance(node, (list, tuple)):
            if not segment.isdigit() or int(segment) >= len(node):
                raise ParameterNotFoundError(
                    f"{key}: {segment!r} is not an index of {here} in {document.path.name} "
                    f"(a {type(node).__name__} of {len(node)} item(s))"
                )
            resolved.append(int(segment))
            node = node[int(segment)]
        else:
            what = describe_opaque(node) if is_opaque(node) else type(node).__name__
            raise ParameterNotFoundError(
                f"{key}: {here} of {document.path.name} is a {what}, which has no {segment!r}"
            )
    return tuple(resolved)


class _Missing:
    pass


_MISSING: Any = _Missing()


def _mapping_key(node: Mapping[Any, Any], segment: str) -> Any:
    if segment in node:
        return segment
    if segment.lstrip("-").isdigit() and int(segment) in node:
        return int(segment)
    return _MISSING


def _get(root: Any, path: Sequence[Segment]) -> Any:
    node = root
    for segment in path:
        node = node[segment]
    return node


def _assign(node: Any, path: Sequence[Segment], value: Any) -> Any:
    """Copy-on-write assignment: returns a new container chain, siblings shared."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, tuple):
        items = list(node)
        items[head] = _assign(node[head], rest, value)  # type: ignore[index]
        return type(node)(items) if type(node) is tuple else type(node)(*items)
    clone = copy.copy(node)
    clone[head] = _assign(node[head], rest, value)
    return clone


# ---------------------------------------------------------------------------------------------
# Values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if _is_number(value):
        return "number"
    if is_opaque(value):
        return describe_opaque(value)
    return type(value).__name__


# Real-valued hyperparameters that torch's own defaults store as the int 0 or 1 (SGD's
# momentum=0, dampening=0, weight_decay=0; RMSprop's alpha, ...). Setting them to a fraction
# must turn them into floats, not fail; any other int stays strictly an int.
REAL_VALUED_KEYS = frozenset({
    "lr", "initial_lr", "max_lr", "min_lr", "momentum", "dampening", "weight_decay", "eps",
    "alpha", "lr_decay", "initial_accumulator_value", "rho", "beta", "beta1", "beta2",
    "decay_rate", "clip_threshold", "max_momentum", "base_momentum", "eta_min", "gamma",
    "factor", "start_factor", "end_factor", "constant_lr", "eta",
})


_ONLY_SCALAR_TENSORS = ("tensors are not edited by this tool, except a tensor of one element "
                        "(such as a 0-d learning rate), in place")


def coerce_for_set(old: Any, new: Any, key: str) -> Any:
    """``new`` converted to the kind of ``old``; ValueTypeError when the kinds differ."""
    if tensor_scalar(old) is not None:
        # A one-element tensor (a fused optimizer's 0-d lr) keeps its dtype and device.
        return set_tensor_scalar(old, new, key)
    if is_opaque(old):
        raise ForbiddenEditError(
            f"{key} is a {describe_opaque(old)}; {_ONLY_SCALAR_TENSORS}"
        )
    if old is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        raise ValueTypeError(f"{key} is a bool ({old}); give True or False, not {new!r}")
    if isinstance(old, int):
        if isinstance(new, bool) or not _is_number(new):
            raise ValueTypeError(f"{key} is an int ({old}); {new!r} is a {_kind(new)}")
        if isinstance(new, float):
            if new.is_integer():
                return int(new)
            if key.rsplit(".", 1)[-1] in REAL_VALUED_KEYS:
                return new
            raise ValueTypeError(f"{key} is an int ({old}); {new!r} is not a whole number")
        return new
    if isinstance(old, float):
        if isinstance(new, bool) or not _is_number(new):
            raise ValueTypeError(f"{key} is a float ({old!r}); {new!r} is a {_kind(new)}")
        return float(new)
    if isinstance(old, str):
        if not isinstance(new, str):
            raise ValueTypeError(f"{key} is a string ({old!r}); {new!r} is a {_kind(new)} "
                                 f"(quote strings: \"'value'\")")
        return new
    if isinstance(old, (list, tuple)):
        if not isinstance(new, (list, tuple)):
            raise ValueTypeError(f"{key} is a {type(old).__name__} ({old!r}); "
                                 f"{new!r} is a {_kind(new)}")
        if len(old) != len(new):
            raise ValueTypeError(f"{key} has {len(old)} item(s) ({old!r}); {new!r} has {len(new)}")
        items = [coerce_for_set(o, n, f"{key}[{i}]") for i, (o, n) in enumerate(zip(old, new))]
        return _rebuild_sequence(old, items)
    if isinstance(old, Mapping):
        if not isinstance(new, Mapping):
            raise ValueTypeError(f"{key} is a dict; {new!r} is a {_kind(new)}")
        return new
    if isinstance(old, bytes) and isinstance(new, bytes):
        return new
    raise ValueTypeError(f"{key} is a {_kind(old)}; {new!r} is a {_kind(new)}")


def scale_value(old: Any, factor: float, key: str, factor_text: str | None = None) -> Any:
    """``old * factor`` for numbers and sequences of numbers, keeping ints as ints."""
    if tensor_scalar(old) is not None:
        return scale_tensor_scalar(old, factor, key)
    if is_opaque(old):
        raise ForbiddenEditError(
            f"{key} is a {describe_opaque(old)}; {_ONLY_SCALAR_TENSORS}"
        )
    if isinstance(old, bool):
        raise ValueTypeError(f"{key} is a bool ({old}); only numbers can be scaled")
    if isinstance(old, int):
        exact = old * _exact(factor, factor_text)
        if exact.denominator != 1:
            raise ValueTypeError(
                f"{key} is an int ({old}); {old} x {factor!r} = {float(exact)!r} is not whole"
            )
        return int(exact)
    if isinstance(old, float):
        return old * factor
    if isinstance(old, (list, tuple)):
        if not old:
            raise ValueTypeError(f"{key} is an empty {type(old).__name__}; nothing to scale")
        items = [scale_value(o, factor, f"{key}[{i}]", factor_text) for i, o in enumerate(old)]
        return _rebuild_sequence(old, items)
    if old is None:
        raise ValueTypeError(f"{key} is None (unset); use --set to give it a value")
    raise ValueTypeError(f"{key} is a {_kind(old)} ({old!r}); only numbers can be scaled")


def _exact(factor: float, text: str | None) -> Fraction:
    # The factor as the user wrote it ("0.1" is exactly 1/10), so 1000 x 0.1 stays 100.
    if text is not None:
        try:
            return Fraction(text.strip())
        except (ValueError, ZeroDivisionError):
            pass
    return Fraction(factor)


def _rebuild_sequence(like: Sequence[Any], items: list[Any]) -> Any:
    if isinstance(like, list):
        clone = copy.copy(like)
        clone[:] = items
        return clone
    return tuple(items) if type(like) is tuple else type(like)(*items)


def _same_value(left: Any, right: Any) -> bool:
    left_scalar, right_scalar = tensor_scalar(left), tensor_scalar(right)
    if left_scalar is not None or right_scalar is not None:  # same dtype, same stored bits
        return (left_scalar is not None and right_scalar is not None
                and (left_scalar.dtype, left_scalar.raw) == (right_scalar.dtype, right_scalar.raw))
    if isinstance(left, str) and isinstance(right, str):
        return str(left) == str(right)  # the decoder may hand back a str subclass
    if type(left) is not type(right):
        return False
    if isinstance(left, float) and math.isnan(left) and math.isnan(right):
        return True
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(_same_value(a, b) for a, b in zip(left, right))
    try:
        return bool(left == right)
    except Exception:  # opaque values without a usable ==
        return left is right


# ---------------------------------------------------------------------------------------------
# Planning

def _check_forbidden(root: Any, path: tuple[Segment, ...], key: str) -> None:
    sites = param_group_sites(root)
    if sites is None:
        return
    in_wrapper_state = path[:1] == ("optimizers",) and path[2:4] == ("state_dict", "state")
    if path[:1] == ("state",) or in_wrapper_state:
        raise ForbiddenEditError(
            f"{key}: the optimizer's 'state' holds per-parameter buffers "
            "(momentum, variance, step counts) and cannot be edited"
        )
    for site in sites:
        if path[: len(site.path)] == site.path and path[len(site.path):][:1] == ("params",):
            raise ForbiddenEditError(
                f"{key}: 'params' maps the group to parameter indices; changing it would attach "
                "hyperparameters to the wrong parameters, so it is never edited"
            )


def plan_file(
    document: StateDocument, specs: Sequence[EditSpec], param_group: int | None = None,
    optimizer_index: int | None = None,
) -> FilePlan:
    """Apply every spec to one document (copy-on-write) and record the changes."""
    root = document.root
    changes: list[ChangeRecord] = []
    for spec in specs:
        for path, site in _targets(document, spec, param_group, optimizer_index):
            _check_forbidden(document.root, path, spec.key)
            old = _get(root, path)
            if spec.kind == "set":
                new = coerce_for_set(old, spec.value, spec.key)
            else:
                factor_text = spec.text.partition("=")[2]
                new = scale_value(old, spec.value, spec.key, factor_text)
            root = _assign(root, path, new)
            relative = path[len(site.path):] if site is not None else path
            changes.append(ChangeRecord(
                file=document.path.name,
                group=site.group if site is not None else None,
                key=".".join(str(p) for p in relative),
                old=old,
                new=new,
                optimizer=site.optimizer if site is not None else None,
            ))
    return FilePlan(document=document, new_root=root, changes=tuple(changes))


def plan_edits(
    component: str,
    documents: Sequence[StateDocument],
    specs: Sequence[EditSpec],
    param_group: int | None = None,
    optimizer_index: int | None = None,
) -> EditPlan:
    """The plan for every file of a component; raises before anything is written."""
    if not specs:
        raise EditSpecError("no edits given; use --set KEY=VALUE or --scale KEY=FACTOR")
    check_distinct_keys(specs)
    return EditPlan(component, tuple(plan_file(doc, specs, param_group, optimizer_index)
                                     for doc in documents))
