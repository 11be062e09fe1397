"""Checking a checkpoint the way a Forgather resume will meet it, without changing anything.

Errors are what makes a resume abort or restore the wrong state: a manifest Forgather's strict
loader rejects, a missing rank file, a file that does not decode, an interrupted commit that may
have left old and new files side by side. Warnings are what a resume survives but a user should
know: a component the manifest omits (Forgather silently skips it), stray or leftover files, a
``size_bytes`` that no longer matches, a scheduler whose ``base_lrs`` do not match the optimizer's
param groups. Notes are facts worth showing (Forgather's per-rank size estimate, legacy files).

Nothing here writes, takes the lock or recovers: a checkpoint is left byte for byte (and mtime
for mtime) as it was found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .diffing import ValueDifference, diff_documents
from .discovery import (
    MANIFEST_NAME,
    PATTERNS,
    CheckpointInfo,
    Component,
    discover_components,
    manifest_problems,
    parse_component_filename,
)
from .errors import StateFileError
from .listing import format_value
from .stateformat import StateDocument, read_state_file
from .writer import find_temp_files, pending_commit

VERIFY_SCHEMA = "forgather-checkpoint.verify"
VERIFY_SCHEMA_VERSION = 1

Severity = Literal["error", "warning"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NO_WEIGHTS_MARKER = ".forgather_no_model_weights"
_SHOWN_DIFFERENCES = 3


@dataclass(frozen=True)
class Problem:
    """Something wrong with the checkpoint: an ``error`` breaks a resume, a ``warning`` may not."""

    severity: Severity
    component: str | None
    file: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "component": self.component, "file": self.file,
                "message": self.message}


@dataclass(frozen=True)
class Note:
    """A fact worth reporting that is not a problem."""

    component: str | None
    file: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "file": self.file, "message": self.message}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_checkpoint`."""

    path: str
    problems: tuple[Problem, ...]
    notes: tuple[Note, ...] = ()
    components: tuple[str, ...] = ()
    files_decoded: int = 0

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def ok(self) -> bool:
        """No errors: as far as can be checked without training, a resume would succeed."""
        return not self.errors

    @property
    def clean(self) -> bool:
        """No problems at all (notes do not count)."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (schema ``forgather-checkpoint.verify``, version 1).

        ``{"schema", "version", "checkpoint", "ok", "clean", "errors": N, "warnings": N,
        "components": [...], "files_decoded": N,
        "problems": [{"severity", "component", "file", "message"}],
        "notes": [{"component", "file", "message"}]}``; ``component``/``file`` may be null.
        """
        return {
            "schema": VERIFY_SCHEMA,
            "version": VERIFY_SCHEMA_VERSION,
            "checkpoint": self.path,
            "ok": self.ok,
            "clean": self.clean,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "components": list(self.components),
            "files_decoded": self.files_decoded,
            "problems": [p.to_json() for p in self.problems],
            "notes": [n.to_json() for n in self.notes],
        }


@dataclass
class _Findings:
    problems: list[Problem] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def error(self, component: str | None, file: str | None, message: str) -> None:
        self.problems.append(Problem("error", component, file, message))

    def warning(self, component: str | None, file: str | None, message: str) -> None:
        self.problems.append(Problem("warning", component, file, message))

    def note(self, component: str | None, file: str | None, message: str) -> None:
        self.notes.append(Note(component, file, message))


def verify_checkpoint(path: Path) -> VerifyReport:
    """Check the checkpoint directory ``path`` as a Forgather resume would meet it.

    Raises CheckpointNotFoundError when ``path`` is not a checkpoint directory; everything else
    found wrong is reported in the returned report, never raised.
    """
    path = Path(path)
    info = discover_components(path)
    found = _Findings()
    # Before anything else: an interrupted commit explains most other findings.
    _check_pending_commit(path, found)
    manifest = _check_manifest(info, found)
    docs: dict[Path, StateDocument] = {}
    for component in info.components.values():
        _check_component(info, manifest, component, docs, found)
    _check_schedule_matches_groups(info, docs, found)
    _check_model_weights(info, found)
    _check_leftovers(info, found)
    return VerifyReport(
        path=str(path),
        problems=tuple(found.problems),
        notes=tuple(found.notes),
        components=tuple(info.components),
        files_decoded=len(docs),
    )


# --------------------------------------------------------------------------------------------
# manifest


def _check_manifest(info: CheckpointInfo, found: _Findings) -> dict[str, Any] | None:
    """Report every reason Forgather's loader would reject the manifest; return it if usable."""
    manifest_path = info.manifest_path
    if not manifest_path.exists():
        found.note(None, MANIFEST_NAME, f"no {MANIFEST_NAME}: components are found by file "
                   "name, and Forgather orders this checkpoint by the directory's mtime")
        return None
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except OSError as exc:
        found.error(None, MANIFEST_NAME, f"cannot read the manifest ({exc.strerror}); "
                    "the resume aborts")
        return None
    except ValueError as exc:
        found.error(None, MANIFEST_NAME, f"the manifest is not valid JSON ({exc}); "
                    "the resume aborts")
        return None
    problems = manifest_problems(data)
    components = data.get("components") if isinstance(data, dict) else None
    keys = list(components) if isinstance(components, dict) else []
    for message in problems:
        owner = next((key for key in keys if message.startswith(f"component '{key}'")), None)
        found.error(owner, MANIFEST_NAME, f"{message}: Forgather's manifest loader rejects it "
                    "and the resume aborts")
    if not isinstance(data, dict):
        return None
    world_size = data.get("world_size")
    if "world_size" in data and not _is_int(world_size):
        found.error(None, MANIFEST_NAME, f"world_size {world_size!r} is not an integer")
    for key in keys:
        entry = components[key] if isinstance(components, dict) else None
        if isinstance(entry, dict):
            _check_manifest_entry(key, entry, found)
    if problems or not isinstance(components, dict):
        found.note(None, MANIFEST_NAME, "the manifest is unusable, so components were found by "
                   "file name; fix it and verify again to check its ranks and sizes")
        return None
    return data


def _check_manifest_entry(key: str, entry: Mapping[str, Any], found: _Findings) -> None:
    pattern = entry.get("sharing_pattern")
    if "sharing_pattern" in entry and str(pattern).lower() not in PATTERNS:
        found.error(key, MANIFEST_NAME, f"unknown sharing_pattern {pattern!r} "
                    f"(Forgather knows {', '.join(PATTERNS)})")
    ranks = entry.get("ranks")
    if "ranks" in entry and not (isinstance(ranks, list) and all(_is_int(r) for r in ranks)):
        found.error(key, MANIFEST_NAME, f"ranks {ranks!r} is not a list of integers")
    if "key" in entry and entry["key"] != key:
        found.warning(key, MANIFEST_NAME, f"the entry's key is {entry['key']!r}, "
                      f"not {key!r} as it is listed under")
    size = entry.get("size_bytes")
    if size is not None and not _is_int(size):
        found.warning(key, MANIFEST_NAME, f"size_bytes {size!r} is not an integer")


# --------------------------------------------------------------------------------------------
# components


def _check_component(
    info: CheckpointInfo,
    manifest: dict[str, Any] | None,
    component: Component,
    docs: dict[Path, StateDocument],
    found: _Findings,
) -> None:
    key = component.key
    if manifest is not None and not component.from_manifest:
        found.warning(key, None, f"{key} files exist but {MANIFEST_NAME} does not list "
                      f"{key}: Forgather skips it on resume and its state is not restored")
    if component.sharing_pattern == "mixed":
        names = ", ".join(f.name for f in component.files)
        found.warning(key, None, f"{key} has files named for different sharing patterns "
                      f"({names}); a resume loads only the ones its pattern names")

    entry = component.manifest_entry if component.from_manifest else None
    ranks = entry.get("ranks") if entry else None
    for missing in component.missing:
        where = f"the manifest lists ranks {ranks}" if entry else "rank files are numbered"
        found.error(key, missing, f"{missing} is missing ({where} for this "
                    f"{component.sharing_pattern} component); the resume cannot restore it")
    if entry is not None and manifest is not None:
        _check_rank_coverage(key, component, entry, manifest.get("world_size"), found)

    for file in component.files:
        try:
            doc = read_state_file(file.path)
        except StateFileError as exc:
            reason = str(exc).removeprefix(f"{file.path}: ")
            found.error(key, file.name, f"does not decode: {reason}")
            continue
        docs[file.path] = doc
        for note in doc.notes:
            found.note(key, file.name, note)

    if component.sharing_pattern in ("global", "replicated", "mixed"):
        _check_replicas(info, component, docs, found)
    if entry is not None and manifest is not None and not component.missing:
        _check_size(component, entry, manifest.get("world_size"), found)


def _check_rank_coverage(
    key: str, component: Component, entry: Mapping[str, Any], world_size: Any, found: _Findings
) -> None:
    """A per_rank component needs a file for every rank of the world that resumes."""
    ranks = entry.get("ranks")
    if component.sharing_pattern != "per_rank" or not _is_int(world_size):
        return
    if not isinstance(ranks, list) or not all(_is_int(r) for r in ranks):
        return
    uncovered = [r for r in range(world_size) if r not in ranks]
    if uncovered:
        found.warning(key, None, f"the manifest lists ranks {ranks} for this per_rank "
                      f"component but world_size is {world_size}: rank(s) "
                      f"{', '.join(map(str, uncovered))} would find no file on resume")
    beyond = [r for r in ranks if r >= world_size or r < 0]
    if beyond:
        found.warning(key, None, f"the manifest lists rank(s) {', '.join(map(str, beyond))} "
                      f"outside world_size {world_size}")


def _check_replicas(
    info: CheckpointInfo, component: Component, docs: dict[Path, StateDocument], found: _Findings
) -> None:
    """Every file claiming to hold ``key``'s one shared state must hold the same state.

    A correct global/replicated component is one file (rank 0 writes it). Files of the same key
    named for another pattern (``optimizer_state_rank_1.pt`` next to a replicated
    ``optimizer_state.pt``) are ignored by a resume; they are reported, and compared with the
    shared file so the user knows whether they hold something else.
    """
    key = component.key
    main = info.path / f"{key}_state.pt"
    claimants = [f.path for f in component.files if f.path != main]
    if component.from_manifest:
        claimants += [p for p in _stray_files(info.path, key) if p not in claimants]
    for path in claimants:
        if component.from_manifest:
            found.warning(key, path.name, f"{path.name} is not part of {key} as the manifest "
                          f"declares it ({component.sharing_pattern}: {main.name}); Forgather "
                          "ignores it")
        if main not in docs:
            continue
        other = docs.get(path) or _try_read(path)
        if other is None:
            continue
        differences = diff_documents(key, path.name, docs[main], other)
        if differences:
            found.warning(key, path.name, f"{path.name} and {main.name} should hold the same "
                          f"{key} state but differ: {_summarize(differences)}")


def _stray_files(directory: Path, key: str) -> list[Path]:
    strays = []
    for entry in sorted(directory.iterdir()):
        parsed = parse_component_filename(entry.name) if entry.is_file() else None
        if parsed is not None and parsed[0] == key and parsed[1] != "global":
            strays.append(entry)
    return strays


def _try_read(path: Path) -> StateDocument | None:
    try:
        return read_state_file(path)
    except StateFileError:
        return None


def _summarize(differences: list[ValueDifference]) -> str:
    shown = []
    for d in differences[:_SHOWN_DIFFERENCES]:
        group = f" (group {d.group})" if d.group is not None else ""
        a = format_value(d.a) if d.in_a else "absent"
        b = format_value(d.b) if d.in_b else "absent"
        shown.append(f"{d.key}{group} {a} vs {b}")
    more = len(differences) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _check_size(
    component: Component, entry: Mapping[str, Any], world_size: Any, found: _Findings
) -> None:
    """``size_bytes`` is exact for one-file patterns; per-rank ones may hold Forgather's estimate.

    Forgather's loader never reads ``size_bytes``, so a mismatch is a warning: the files changed
    after the manifest was written (an edit that did not update it, a copy, a truncation).
    """
    size = entry.get("size_bytes")
    if not _is_int(size) or not component.files:
        return
    key = component.key
    actual = component.size_bytes
    if component.sharing_pattern in ("global", "replicated"):
        if size != actual:
            found.warning(key, component.files[0].name,
                          f"manifest size_bytes is {size} but the file is {actual} bytes")
        return
    if size == actual:
        return
    first = component.files[0]
    estimate = first.size_bytes * world_size if _is_int(world_size) else None
    if size == estimate:
        found.note(key, None, f"manifest size_bytes {size} is Forgather's estimate ({first.name} "
                   f"is {first.size_bytes} bytes x world_size {world_size}); the "
                   f"{len(component.files)} file(s) total {actual} bytes")
        return
    shown = f" nor Forgather's estimate {estimate}" if estimate is not None else ""
    found.warning(key, None, f"manifest size_bytes is {size}, matching neither the "
                  f"{len(component.files)} file(s)' total {actual}{shown}")


# --------------------------------------------------------------------------------------------
# across components, leftovers, model weights


def _check_schedule_matches_groups(
    info: CheckpointInfo, docs: dict[Path, StateDocument], found: _Findings
) -> None:
    """The scheduler drives one learning rate per optimizer param group (``base_lrs``)."""
    optimizer = info.components.get("optimizer")
    scheduler = info.components.get("scheduler")
    if optimizer is None or scheduler is None:
        return
    if len(optimizer.files) != 1 or len(scheduler.files) != 1:
        return  # per-rank optimizers may hold different groups; nothing certain to compare
    opt_doc = docs.get(optimizer.files[0].path)
    sched_doc = docs.get(scheduler.files[0].path)
    if opt_doc is None or sched_doc is None:
        return
    groups = opt_doc.root.get("param_groups") if isinstance(opt_doc.root, dict) else None
    base_lrs = sched_doc.root.get("base_lrs") if isinstance(sched_doc.root, dict) else None
    if isinstance(groups, list) and isinstance(base_lrs, list) and len(groups) != len(base_lrs):
        found.warning("scheduler", scheduler.files[0].name,
                      f"the scheduler's base_lrs has {len(base_lrs)} entries but the optimizer "
                      f"has {len(groups)} param groups: learning rates would be applied to the "
                      "wrong groups (or not at all) on resume")


def _check_pending_commit(path: Path, found: _Findings) -> None:
    pending = pending_commit(path)
    if pending is None:
        return
    if pending.in_progress:
        holder = pending.holder.describe() if pending.holder else "another process"
        found.warning(None, None, f"an edit by {holder} is in progress: files may change "
                      "while they are checked; verify again when it is done")
        return
    command = f"'forgather checkpoint recover {path}'"
    if pending.commit_id is None:
        if pending.holder is not None:
            found.warning(None, None, f"a stale lock note of {pending.holder.describe()} is "
                          f"left from an interrupted edit; {command} removes it")
        return  # leftover temp files are reported by _check_leftovers
    files = ", ".join(p.name for p in pending.files) or "its files"
    if pending.phase == "complete":
        found.warning(None, None, f"commit {pending.commit_id} completed but its cleanup was "
                      f"interrupted; {command} finishes it")
        return
    found.error(None, None, f"commit {pending.commit_id} was interrupted while "
                f"{pending.phase}: {files} may be a mix of old and new state; run {command} "
                f"to {pending.next_step} before resuming")


def _check_leftovers(info: CheckpointInfo, found: _Findings) -> None:
    temps = sorted(set(info.temp_files) | set(find_temp_files(info.path)))
    for temp in temps:
        found.warning(None, temp.name, f"leftover temp file {temp.name} from an interrupted "
                      f"edit; 'forgather checkpoint recover {info.path}' removes it")
    if info.backup_files:
        names = ", ".join(p.name for p in info.backup_files)
        found.note(None, None, f"backup file(s) kept by earlier edits: {names} "
                   "(Forgather ignores them)")


def _check_model_weights(info: CheckpointInfo, found: _Findings) -> None:
    directory = info.path
    if (directory / _NO_WEIGHTS_MARKER).exists():
        found.note(None, _NO_WEIGHTS_MARKER, "model weights are stored outside the checkpoint")
        return
    indexes = [directory / name for name in _WEIGHT_INDEXES if (directory / name).is_file()]
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(name) for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            found.error(None, index.name, "the weight index is unreadable or has no weight_map; "
                        "the model cannot be loaded")
            continue
        for shard in shards:
            if not (directory / shard).is_file():
                found.error(None, shard, f"model shard {shard} named by {index.name} is missing")
    if not indexes and not any((directory / name).is_file() for name in _WEIGHT_FILES):
        found.warning(None, None, "no model weights (model.safetensors, pytorch_model.bin or a "
                      f"shard index) and no {_NO_WEIGHTS_MARKER} marker")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
