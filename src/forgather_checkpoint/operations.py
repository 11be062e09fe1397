"""The use cases behind the commands: components, list, modify.

Each function takes paths and plain options, drives discovery/editor/stateformat/writer and
returns records; it never prints. ``prepare_modify`` is the plan (shown by ``--dry-run`` and by the
confirmation prompt), ``apply_modify`` the commit.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .discovery import CheckpointInfo, Component, discover_components, read_manifest
from .editor import EditPlan, EditSpec, FilePlan, plan_edits
from .errors import LockedError, ManifestError, StaleReadError, StateFileError
from .listing import ComponentListing, document_notes, list_documents, to_json_value
from .locking import current_user
from .lrchange import scheduler_base_lrs
from .stateformat import (
    StateDocument,
    prepare_write,
    read_state_file,
    verify_load_with_torch,
    verify_prepared,
    write_prepared,
)

Progress = Callable[[str, int, int], None]


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Discover the components of a checkpoint directory."""
    return discover_components(Path(path))


def read_component(
    info: CheckpointInfo, component: Component, progress: Progress | None = None
) -> list[StateDocument]:
    """Decode every file of a component (all of them, not just the first)."""
    documents = []
    for index, file in enumerate(component.files):
        if progress is not None:
            progress(f"reading {file.name}", index, len(component.files))
        documents.append(read_state_file(file.path))
    return documents


def _identity(component: Component) -> list[tuple[int, int, int]]:
    stats = [os.stat(f.path) for f in component.files]
    return [(s.st_ino, s.st_size, s.st_mtime_ns) for s in stats]


def read_consistent(
    path: Path, component: str, progress: Progress | None = None, *, wait: float = 30.0,
    for_edit: bool = False,
) -> tuple[CheckpointInfo, Component, list[StateDocument]]:
    """Read every file of ``component`` as one consistent snapshot, without taking the lock.

    A commit replaces files only while its journal exists, so a read that saw no journal
    before and after, and the same inodes before and after, saw no half-committed state.
    A commit interrupted by a crash is finished or undone first (``recover``). Readers wait
    out a commit in its replace phase; an editor (``for_edit``) meeting another live editor
    waits up to ``wait`` seconds and then fails, naming the holder.
    """
    from .writer import pending_commit, recover

    deadline = time.monotonic() + wait
    while True:
        pending = pending_commit(Path(path)) if Path(path).is_dir() else None
        if pending is not None and not pending.in_progress:
            recover(Path(path), wait=max(0.0, deadline - time.monotonic()))
            continue
        # While another commit is still staging, the originals are untouched: safe to read.
        readable = pending is None or (not for_edit and pending.phase == "staging")
        if readable:
            info = inspect_checkpoint(path)
            chosen = info.complete_component(component)
            before = _identity(chosen)
            documents = read_component(info, chosen, progress)
            after = pending_commit(info.path)
            if (after is None or (not for_edit and after.phase == "staging")) \
                    and _identity(chosen) == before:
                return info, chosen, documents
        if time.monotonic() >= deadline:
            holder = pending.holder if pending is not None else None
            who = holder.describe() if holder is not None else "another process"
            waited = f" after waiting {wait:g}s" if wait > 0 else ""
            raise LockedError(
                f"checkpoint {path} is being edited by {who}{waited}; try again later or "
                "pass --wait SECONDS"
            )
        time.sleep(0.05)


def list_component(path: Path, component: str, progress: Progress | None = None
                   ) -> tuple[CheckpointInfo, Component, ComponentListing]:
    """What ``forgather checkpoint list`` shows: every file's values, merged."""
    info, chosen, documents = read_consistent(path, component, progress)
    return info, chosen, list_documents(component, documents)


@dataclass(frozen=True)
class ComponentEdit:
    """The planned edit of one component."""

    component: Component
    edit_plan: EditPlan


@dataclass(frozen=True)
class ModifyPlan:
    """Everything a modify (or lr change) will do, computed without touching the disk."""

    info: CheckpointInfo
    parts: tuple[ComponentEdit, ...]
    warnings: tuple[str, ...]
    identities: Mapping[Path, tuple[int, int, int]] = field(default_factory=dict)
    command: str = "modify"

    @property
    def component(self) -> Component:
        return self.parts[0].component

    @property
    def edit_plan(self) -> EditPlan:
        return self.parts[0].edit_plan

    @property
    def changed_files(self) -> tuple[FilePlan, ...]:
        return tuple(fp for part in self.parts for fp in part.edit_plan.changed_files)

    @property
    def change_count(self) -> int:
        return sum(1 for part in self.parts for c in part.edit_plan.changes if c.changed)

    @property
    def has_changes(self) -> bool:
        return bool(self.changed_files)


def _refuse_broken_manifest(info: CheckpointInfo) -> None:
    if info.manifest_error is not None:
        raise ManifestError(
            f"{info.manifest_error}; refusing to modify a checkpoint whose manifest Forgather "
            "cannot load (fix or restore checkpoint_manifest.json first)"
        )


def prepare_modify(
    path: Path,
    component: str,
    specs: Sequence[EditSpec],
    param_group: int | None = None,
    progress: Progress | None = None,
    *,
    optimizer_index: int | None = None,
    wait: float = 0.0,
) -> ModifyPlan:
    """Read every file of ``component`` and plan ``specs``; raises before any write."""
    info, chosen, documents = read_consistent(path, component, progress, wait=wait,
                                              for_edit=True)
    _refuse_broken_manifest(info)
    identities = dict(zip((f.path for f in chosen.files), _identity(chosen)))
    edit_plan = plan_edits(component, documents, specs, param_group, optimizer_index)
    warnings = (*document_notes(documents), *_lr_warnings(info, component, edit_plan))
    return ModifyPlan(info, (ComponentEdit(chosen, edit_plan),), warnings, identities)


def prepare_lr_change(
    path: Path,
    *,
    set_value: float | None = None,
    scale: float | None = None,
    param_group: int | None = None,
    progress: Progress | None = None,
    wait: float = 0.0,
) -> ModifyPlan:
    """Plan a lasting learning-rate change over the optimizer and scheduler files."""
    from .lrchange import LrRequest, plan_lr_change

    info, optimizer, optimizer_docs = read_consistent(path, "optimizer", progress, wait=wait,
                                                      for_edit=True)
    _refuse_broken_manifest(info)
    identities = dict(zip((f.path for f in optimizer.files), _identity(optimizer)))
    scheduler = info.components.get("scheduler")
    scheduler_docs: list[StateDocument] = []
    if scheduler is not None:
        scheduler = info.complete_component("scheduler")
        identities.update(zip((f.path for f in scheduler.files), _identity(scheduler)))
        scheduler_docs = read_component(info, scheduler, progress)
    request = LrRequest(set_value=set_value, scale=scale, param_group=param_group)
    optimizer_plan, scheduler_plan, warnings = plan_lr_change(optimizer_docs, scheduler_docs,
                                                              request)
    warnings[:0] = document_notes([*optimizer_docs, *scheduler_docs])
    parts = [ComponentEdit(optimizer, optimizer_plan)]
    if scheduler is not None and scheduler_plan is not None:
        parts.append(ComponentEdit(scheduler, scheduler_plan))
    else:
        warnings.append("no scheduler in this checkpoint: only the optimizer groups change")
    return ModifyPlan(info, tuple(parts), tuple(warnings), identities, command="lr")


def _lr_warnings(info: CheckpointInfo, component: str, plan: EditPlan) -> list[str]:
    if component != "optimizer":
        return []
    if not any(c.changed and c.key in ("lr", "initial_lr") for c in plan.changes):
        return []
    scheduler = info.components.get("scheduler")
    if scheduler is None or not scheduler.files:
        return []
    try:
        root = read_state_file(scheduler.files[0].path).root
    except StateFileError:  # an unreadable scheduler is not this command's error
        return []
    if scheduler_base_lrs([root]) is None:
        return []
    return [
        "the scheduler recomputes lr from its base_lrs on every step, so this lr change "
        "lasts one step; to change the learning rate for the rest of training use "
        f"'forgather checkpoint lr {info.path} --set VALUE' (or also edit the scheduler's "
        "base_lrs with --component scheduler)"
    ]


def change_summary(plan: EditPlan) -> list[dict[str, Any]]:
    """The changes as JSON-safe records (for the manifest, history and ``--json``)."""
    return [
        {
            "file": change.file,
            "optimizer": change.optimizer,
            "group": change.group,
            "key": change.key,
            "old": to_json_value(change.old),
            "new": to_json_value(change.new),
        }
        for change in plan.changes
        if change.changed
    ]


def apply_modify(
    plan: ModifyPlan,
    *,
    backup: bool = True,
    wait: float = 0.0,
    progress: Progress | None = None,
    verify_load: bool = False,
) -> Any:
    """Commit the plan as one transaction; returns the writer's CommitResult.

    ``verify_load`` additionally loads every staged file with
    ``torch.load(weights_only=True, mmap=True)`` before anything is replaced.
    """
    from .writer import commit_atomically

    writes = [
        _staged_write(file_plan, plan.identities.get(file_plan.document.path), verify_load)
        for file_plan in plan.changed_files
    ]
    record = {
        "command": plan.command,
        "component": ",".join(part.component.key for part in plan.parts),
        "changes": [c for part in plan.parts for c in change_summary(part.edit_plan)],
    }
    if plan.info.manifest is not None:
        writes.append(_manifest_write(plan, record))
    return commit_atomically(plan.info.path, writes, backup=backup, record=record, wait=wait,
                             progress=progress, action=plan.command)


def _staged_write(file_plan: FilePlan, identity: tuple[int, int, int] | None,
                  verify_load: bool) -> Any:
    from .writer import StagedWrite

    # Encoded once: the render writes these bytes and the validation checks for exactly them.
    prepared = prepare_write(file_plan.document, file_plan.new_root)

    def render(temp: Path, staged: Mapping[Path, Path]) -> None:
        # Called under the lock: refuse to overwrite an edit that landed after we read.
        current = os.stat(file_plan.document.path)
        if identity is not None and (current.st_ino, current.st_size,
                                     current.st_mtime_ns) != identity:
            raise StaleReadError(
                f"{file_plan.document.path.name} changed since it was read (another edit "
                "finished first); nothing was changed, run the command again"
            )
        write_prepared(prepared, temp)

    def validate(temp: Path) -> None:
        verify_prepared(prepared, temp)
        if verify_load:
            # Optional belt and braces: the real loader, memory-mapped so it stays cheap.
            verify_load_with_torch(temp)

    return StagedWrite(target=file_plan.document.path, render=render, validate=validate)


def modified_by() -> str:
    """Who made a change, as recorded in the manifest and history."""
    return f"forgather-checkpoint {__version__} ({current_user()}@{socket.gethostname()})"


def _manifest_write(plan: ModifyPlan, record: Mapping[str, Any]) -> Any:
    from .writer import StagedWrite

    manifest_path = plan.info.manifest_path
    now = datetime.now(timezone.utc).astimezone().isoformat()

    def render(temp: Path, staged: Mapping[Path, Path]) -> None:
        # Re-read rather than reuse the discovered copy: it is the bytes being replaced.
        manifest = read_manifest(manifest_path)
        for part in plan.parts:
            _update_manifest_entry(manifest, part, staged, record, now)
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")

    def validate(temp: Path) -> None:
        from .errors import ValidationError

        try:
            written = read_manifest(temp)
        except ManifestError as exc:
            raise ValidationError(f"updated manifest would not load: {exc}") from exc
        original = plan.info.manifest or {}
        if written.get("timestamp") != original.get("timestamp"):
            raise ValidationError("updated manifest changed the top-level timestamp")

    return StagedWrite(target=manifest_path, render=render, validate=validate, after_others=True)


def _update_manifest_entry(manifest: dict[str, Any], part: ComponentEdit,
                           staged: Mapping[Path, Path], record: Mapping[str, Any],
                           now: str) -> None:
    """Exact size, no stale checksum, and who/when/what inside the entry's metadata.

    Forgather passes each component entry to a dataclass as keyword arguments, so nothing
    new may appear beside the fixed keys: the record of the change goes into ``metadata``.
    """
    entry = manifest["components"].get(part.component.key)
    if entry is None or not part.edit_plan.changed_files:
        return
    files = [f.path for f in part.component.files]
    entry["size_bytes"] = sum(os.stat(staged.get(p, p)).st_size for p in files)
    entry["checksum"] = None
    metadata = entry.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
        entry["metadata"] = metadata
    metadata["modified_by"] = modified_by()
    metadata["modified_at"] = now
    history = metadata.get("modifications")
    if not isinstance(history, list):
        history = []
    names = {f.name for f in part.component.files}
    mine = [c for c in record["changes"] if c["file"] in names]
    history.append({"at": now, "command": record["command"], "changes": mine})
    metadata["modifications"] = history
