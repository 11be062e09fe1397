"""Learning-rate changes that last: every field that decides the lr from the next step on.

Closed-form schedulers (LambdaLR, cosine, one-cycle, ...) recompute each group's ``lr`` from the
scheduler's ``base_lrs`` (and floors such as ``eta_min``) on every step, so editing only the
optimizer's ``lr`` lasts one step. A run that had used learning rate ``F * x`` from the start
differs from the original in exactly the absolute learning-rate fields, each multiplied by F
(every schedule here is linear in them). So a lasting change multiplies, per param group:

* in the optimizer group: ``lr``, ``initial_lr`` and the other absolute lr fields (OneCycleLR's
  ``max_lr``/``min_lr``, ...);
* in the scheduler (and every nested ``_schedulers`` entry): element g of ``base_lrs``,
  ``_last_lr``, ``min_lrs``, ``max_lrs``, and scalar floors/peaks such as ``eta_min`` (shared by
  all groups: scaled only when every group gets the same factor).

``--scale F`` is F for each targeted group; ``--set V`` is ``V / base`` where base is the group's
base learning rate: ``initial_lr``, else the scheduler's ``base_lrs[g]``, else its ``lr``.

Optimizers given a tensor learning rate (``lr=torch.tensor(1e-3)``, e.g. with ``fused=True``)
store every one of these fields as a 0-d tensor, in the optimizer and in the scheduler. Those are
scaled in place through the same path as ``modify`` (``stateformat.scale_tensor_scalar``): same
dtype, same device tag, the new value rounded to the dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .editor import ChangeRecord, EditPlan, FilePlan, _assign, param_group_sites
from .errors import ForbiddenEditError, ParamGroupError, ValueTypeError
from .stateformat import (
    StateDocument,
    describe_opaque,
    is_opaque,
    scale_tensor_scalar,
    tensor_scalar,
)

GROUP_LR_FIELDS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr", "peak_lr", "final_lr",
                   "eta_min")
SCHEDULER_LIST_FIELDS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
SCHEDULER_SCALAR_FIELDS = ("eta_min", "default_min_lr", "min_lr", "max_lr", "constant_lr",
                           "peak_lr", "final_lr", "warmup_start_lr", "base_lr")


@dataclass(frozen=True)
class LrRequest:
    """What the user asked: ``--set VALUE`` or ``--scale FACTOR``, optionally one group."""

    set_value: float | None = None
    scale: float | None = None
    param_group: int | None = None

    def factor(self, base: float | None, where: str) -> float:
        if self.scale is not None:
            return self.scale
        assert self.set_value is not None
        if base is None or base == 0 or not math.isfinite(base):
            raise ValueTypeError(
                f"{where}: no usable base learning rate (initial_lr, scheduler base_lrs or lr "
                f"is {base!r}); use --scale instead of --set"
            )
        return self.set_value / base


def _number(value: Any) -> bool:
    """A number or a one-element numeric tensor: an lr field this change scales."""
    return _as_number(value) is not None


def _as_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    scalar = tensor_scalar(value)
    if scalar is not None and not isinstance(scalar.value, bool):
        return float(scalar.display_value)  # as scaled (see stateformat.scale_tensor_scalar)
    return None


def _shown(value: Any) -> str:
    return describe_opaque(value) if is_opaque(value) else repr(value)


def _scaled(old: Any, factor: float, key: str, file: str) -> Any:
    if tensor_scalar(old) is not None:
        try:
            return scale_tensor_scalar(old, factor, key)
        except (ForbiddenEditError, ValueTypeError) as exc:
            raise type(exc)(f"{file}: {exc}") from None
    if is_opaque(old):
        raise ForbiddenEditError(
            f"{file}: {key} is stored as a {describe_opaque(old)}; only numbers and tensors of "
            "one element are learning rates this command can change"
        )
    if isinstance(old, int) and not isinstance(old, bool):
        return float(old) * factor
    return old * factor


def _groups_of(root: Any) -> list[Mapping[str, Any]]:
    sites = param_group_sites(root)
    if sites is None:
        return []
    groups = []
    for site in sites:
        node = root
        for segment in site.path:
            node = node[segment]
        groups.append(node)
    return groups


def _targeted(count: int, param_group: int | None, file: str) -> list[int]:
    if param_group is None:
        return list(range(count))
    if param_group >= count:
        raise ParamGroupError(
            f"param group {param_group} does not exist in {file} ({count} group(s))"
        )
    return [param_group]


def scheduler_base_lrs(scheduler_roots: Sequence[Any]) -> list[Any] | None:
    """The first ``base_lrs`` of the scheduler states (top level, else nested ``_schedulers``)."""
    for root in scheduler_roots:
        if isinstance(root, Mapping) and isinstance(root.get("base_lrs"), list):
            return list(root["base_lrs"])
        if isinstance(root, Mapping) and isinstance(root.get("_schedulers"), list):
            for sub in root["_schedulers"]:
                if isinstance(sub, Mapping) and isinstance(sub.get("base_lrs"), list):
                    return list(sub["base_lrs"])
    return None


def plan_optimizer_file(doc: StateDocument, request: LrRequest,
                        scheduler_base: list[Any] | None) -> FilePlan:
    """Scale every absolute lr field of the targeted groups of one optimizer file."""
    root = doc.root
    sites = param_group_sites(root)
    if sites is None:
        raise ForbiddenEditError(f"{doc.path.name} has no param_groups; is it an optimizer?")
    chosen = _targeted(max((s.group for s in sites), default=-1) + 1, request.param_group,
                       doc.path.name)
    changes = []
    for site in sites:
        if site.group not in chosen:
            continue
        group = root
        for segment in site.path:
            group = group[segment]
        base = _as_number(group.get("initial_lr"))
        if base is None and scheduler_base and site.group < len(scheduler_base):
            base = _as_number(scheduler_base[site.group])
        if base is None:
            base = _as_number(group.get("lr"))
        factor = request.factor(base, f"{doc.path.name} param group {site.group}")
        for key in GROUP_LR_FIELDS:
            if key in group and (_number(group[key]) or is_opaque(group[key])):
                new = _scaled(group[key], factor, key, doc.path.name)
                root = _assign(root, (*site.path, key), new)
                changes.append(ChangeRecord(doc.path.name, site.group, key, group[key], new,
                                            site.optimizer))
    return FilePlan(doc, root, tuple(changes))


def plan_scheduler_file(doc: StateDocument, request: LrRequest,
                        optimizer_bases: list[Any] | None, warnings: list[str]) -> FilePlan:
    """Scale base_lrs & co. element-wise and shared floors when the factor is uniform."""
    changes: list[ChangeRecord] = []
    new_root = _scale_scheduler_node(doc, doc.root, (), request, optimizer_bases, changes,
                                     warnings)
    return FilePlan(doc, new_root, tuple(changes))


def _scale_scheduler_node(doc: StateDocument, node: Any, path: tuple[Any, ...],
                          request: LrRequest, optimizer_bases: list[Any] | None,
                          changes: list[ChangeRecord], warnings: list[str]) -> Any:
    if not isinstance(node, Mapping):
        return node
    file = doc.path.name
    prefix = ".".join(str(p) for p in path)
    base_lrs = node.get("base_lrs") if isinstance(node.get("base_lrs"), list) else None
    count = len(base_lrs) if base_lrs is not None else (
        len(optimizer_bases) if optimizer_bases is not None else None)
    for key in SCHEDULER_LIST_FIELDS:
        values = node.get(key)
        if not isinstance(values, list) or not values:
            continue
        if count is not None and len(values) != count:
            raise ValueTypeError(
                f"{file}: {prefix + '.' if prefix else ''}{key} has {len(values)} entries but "
                f"there are {count} param group(s); refusing an inconsistent lr change"
            )
        factors = _factors(len(values), base_lrs, optimizer_bases, request, file)
        new_values = list(values)
        for index, factor in factors.items():
            if _number(values[index]) or is_opaque(values[index]):
                new_values[index] = _scaled(values[index], factor, key, file)
        if new_values != values:
            clone = type(values)(new_values) if type(values) is list else list(new_values)
            node = _assign(node, (key,), clone)
            changes.append(ChangeRecord(file, None, f"{prefix}.{key}".lstrip("."),
                                        values, clone))
    group_count = count if count is not None else 1
    uniform = _uniform_factor(group_count, base_lrs, optimizer_bases, request, file)
    for key in SCHEDULER_SCALAR_FIELDS:
        value = node.get(key)
        if not _as_number(value):  # absent, not a number, or zero (nothing to scale)
            continue
        name = f"{prefix + '.' if prefix else ''}{key}"
        if request.param_group is not None and group_count > 1:
            warnings.append(
                f"{file}: {name} = {_shown(value)} is shared by every param group and was "
                f"left as it is; only param group {request.param_group} changed"
            )
            continue
        if uniform is None:
            raise ValueTypeError(
                f"{file}: {prefix + '.' if prefix else ''}{key} applies to every param group, "
                "but this change gives the groups different factors; use --scale, or edit "
                f"{key} with 'forgather checkpoint modify --component scheduler'"
            )
        new = _scaled(value, uniform, key, file)
        node = _assign(node, (key,), new)
        changes.append(ChangeRecord(file, None, f"{prefix}.{key}".lstrip("."), value, new))
    subs = node.get("_schedulers")
    if isinstance(subs, list):
        for index, sub in enumerate(subs):
            new_sub = _scale_scheduler_node(doc, sub, (*path, "_schedulers", index), request,
                                            optimizer_bases, changes, warnings)
            if new_sub is not sub:
                node = _assign(node, ("_schedulers", index), new_sub)
    return node


def _factors(count: int, base_lrs: list[Any] | None, optimizer_bases: list[Any] | None,
             request: LrRequest, file: str) -> dict[int, float]:
    factors = {}
    for index in _targeted(count, request.param_group, file):
        base = _as_number(base_lrs[index]) if base_lrs is not None and index < len(
            base_lrs) else None
        if base is None and optimizer_bases is not None and index < len(optimizer_bases):
            base = _as_number(optimizer_bases[index])
        factors[index] = request.factor(base, f"{file} param group {index}")
    return factors


def _uniform_factor(count: int, base_lrs: list[Any] | None, optimizer_bases: list[Any] | None,
                    request: LrRequest, file: str) -> float | None:
    factors = set(_factors(count, base_lrs, optimizer_bases, request, file).values())
    return factors.pop() if len(factors) == 1 else None


def plan_lr_change(optimizer_docs: Sequence[StateDocument],
                   scheduler_docs: Sequence[StateDocument],
                   request: LrRequest) -> tuple[EditPlan, EditPlan | None, list[str]]:
    """Plans for the optimizer files and (when present) the scheduler files, plus warnings."""
    warnings: list[str] = []
    scheduler_base = scheduler_base_lrs([doc.root for doc in scheduler_docs])
    optimizer_plan = EditPlan("optimizer", tuple(
        plan_optimizer_file(doc, request, scheduler_base) for doc in optimizer_docs))
    if not scheduler_docs:
        return optimizer_plan, None, warnings
    first_groups = _groups_of(optimizer_docs[0].root) if optimizer_docs else []
    optimizer_bases = [g.get("initial_lr", g.get("lr")) for g in first_groups] or None
    scheduler_plan = EditPlan("scheduler", tuple(
        plan_scheduler_file(doc, request, optimizer_bases, warnings) for doc in scheduler_docs))
    return optimizer_plan, scheduler_plan, warnings
