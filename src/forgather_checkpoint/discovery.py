"""Checkpoint directory -> components -> files.

A component is a key (``optimizer``, ``scheduler``, ``my_custom_state``...) saved with a sharing
pattern. The manifest, when present, is the authority on which components exist, their pattern
and their ranks; file names are parsed only to find the files (and the pattern when there is no
manifest). Keys may contain underscores and even ``_state``, so names are matched against the
full set of suffixes instead of being split on underscores.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import (
    CheckpointNotFoundError,
    ComponentNotFoundError,
    IncompleteComponentError,
    ManifestError,
)

MANIFEST_NAME = "checkpoint_manifest.json"
TOOL_DIR_NAME = ".forgather_checkpoint"

PATTERNS = ("global", "replicated", "per_rank", "per_group", "per_node")

# Greedy key + anchored suffix: the longest key for which the rest is a known suffix wins, so
# "foo_state_state_rank_0.pt" is key "foo_state", rank 0.
_COMPONENT_FILE = re.compile(
    r"^(?P<key>.+)_state"
    r"(?:"
    r"_rank_(?P<rank>\d+)"
    r"|_group_(?P<group>.+)_grank_(?P<grank>\d+)_rank_(?P<grouprank>\d+)"
    r"|_node_(?P<node>\d+)_rank_(?P<noderank>\d+)"
    r")?\.pt$"
)
# Temp files: ours (".NAME.fgc-tmp-PID-RANDOM") and the earlier tool's fixed "NAME.tmp".
_TEMP_FILE = re.compile(r"(^\..+\.fgc-tmp-.+$)|(\.pt\.tmp$)|(\.json\.tmp$)")
_BACKUP_FILE = re.compile(r"\.bak$")

# Fields of a manifest component entry, exactly as Forgather's dataclass declares them.
MANIFEST_COMPONENT_FIELDS = (
    "key",
    "sharing_pattern",
    "ranks",
    "replicated_across",
    "group_name",
    "size_bytes",
    "checksum",
    "metadata",
)
MANIFEST_REQUIRED_TOP_LEVEL = ("checkpoint_path", "world_size", "timestamp", "components")


@dataclass(frozen=True)
class ComponentFile:
    """One file of a component, with what its name says about where it came from."""

    path: Path
    size_bytes: int
    rank: int | None = None
    group_name: str | None = None
    group_rank: int | None = None
    node_rank: int | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Component:
    """A logical piece of checkpoint state and the files that hold it."""

    key: str
    sharing_pattern: str
    files: tuple[ComponentFile, ...]
    from_manifest: bool
    missing: tuple[str, ...] = ()
    manifest_entry: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything discovery learned about one checkpoint directory."""

    path: Path
    components: dict[str, Component]
    other_files: tuple[Path, ...]
    temp_files: tuple[Path, ...]
    backup_files: tuple[Path, ...]
    manifest: dict[str, Any] | None
    manifest_error: str | None

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def component(self, key: str) -> Component:
        """The component ``key``, or a ComponentNotFoundError that lists what exists."""
        try:
            return self.components[key]
        except KeyError:
            found = ", ".join(self.components) or "none"
            close = difflib.get_close_matches(key, list(self.components), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ComponentNotFoundError(
                f"no {key} files in {self.path} (found: {found}); "
                f"{hint}see 'forgather checkpoint components {self.path}'"
            ) from None

    def complete_component(self, key: str) -> Component:
        """Like :meth:`component`, but refuse a component with missing files."""
        component = self.component(key)
        if component.missing:
            raise IncompleteComponentError(
                f"{key} in {self.path} is incomplete: missing {', '.join(component.missing)} "
                f"({component.sharing_pattern}); refusing to edit a partial set of rank files"
            )
        if not component.files:
            raise IncompleteComponentError(f"{key} in {self.path} has no files on disk")
        return component


def parse_component_filename(name: str) -> tuple[str, str, dict[str, Any]] | None:
    """``optimizer_state_rank_3.pt`` -> ("optimizer", "per_rank", {"rank": 3}); None otherwise."""
    match = _COMPONENT_FILE.match(name)
    if match is None:
        return None
    key = match.group("key")
    if match.group("rank") is not None:
        return key, "per_rank", {"rank": int(match.group("rank"))}
    if match.group("group") is not None:
        return key, "per_group", {
            "group_name": match.group("group"),
            "group_rank": int(match.group("grank")),
            "rank": int(match.group("grouprank")),
        }
    if match.group("node") is not None:
        return key, "per_node", {
            "node_rank": int(match.group("node")),
            "rank": int(match.group("noderank")),
        }
    return key, "global", {}


def is_temp_file(name: str) -> bool:
    """True for leftover temp files of this tool (or of the earlier tool)."""
    return bool(_TEMP_FILE.search(name))


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse a manifest and check it against Forgather's strict loader rules."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    problems = manifest_problems(data)
    if problems:
        raise ManifestError(f"{path}: {problems[0]}")
    return data


def manifest_problems(data: Any) -> list[str]:
    """Everything that would make Forgather's manifest loader reject ``data``."""
    if not isinstance(data, dict):
        return ["top level is not a JSON object"]
    problems = [f"missing required field '{name}'" for name in MANIFEST_REQUIRED_TOP_LEVEL
                if name not in data]
    timestamp = data.get("timestamp")
    if "timestamp" in data:
        try:
            datetime.fromisoformat(str(timestamp))
        except ValueError:
            problems.append(f"timestamp {timestamp!r} is not an ISO date")
    components = data.get("components")
    if "components" in data and not isinstance(components, dict):
        problems.append("'components' is not an object")
    elif isinstance(components, dict):
        for key, entry in components.items():
            if not isinstance(entry, dict):
                problems.append(f"component '{key}' is not an object")
                continue
            unknown = sorted(set(entry) - set(MANIFEST_COMPONENT_FIELDS))
            if unknown:
                problems.append(f"component '{key}' has unknown field(s) {', '.join(unknown)}")
            absent = [name for name in ("key", "sharing_pattern", "ranks") if name not in entry]
            if absent:
                problems.append(f"component '{key}' lacks {', '.join(absent)}")
    return problems


def discover_components(path: Path) -> CheckpointInfo:
    """Find every component of the checkpoint directory ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint path not found: {path}; pass a checkpoint directory "
            f"such as output_models/NAME/checkpoints/checkpoint-1000"
        )
    if not path.is_dir():
        hint = ""
        if parse_component_filename(path.name) or path.name == MANIFEST_NAME:
            hint = f"; pass its checkpoint directory instead: {path.parent}"
        raise CheckpointNotFoundError(f"{path} is a file, not a checkpoint directory{hint}")

    found: dict[str, list[tuple[str, ComponentFile]]] = {}
    other: list[Path] = []
    temps: list[Path] = []
    backups: list[Path] = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name == MANIFEST_NAME or name.startswith(TOOL_DIR_NAME):
            continue  # the manifest is reported apart; the tool's own state is not checkpoint data
        if is_temp_file(name):
            temps.append(entry)
            continue
        if _BACKUP_FILE.search(name):
            backups.append(entry)
            continue
        parsed = parse_component_filename(name) if entry.is_file() else None
        if parsed is None:
            other.append(entry)
            continue
        key, pattern, where = parsed
        size = entry.stat().st_size
        found.setdefault(key, []).append((pattern, ComponentFile(entry, size, **where)))

    manifest: dict[str, Any] | None = None
    manifest_error: str | None = None
    manifest_path = path / MANIFEST_NAME
    if manifest_path.exists():
        try:
            manifest = read_manifest(manifest_path)
        except ManifestError as exc:
            manifest_error = str(exc)

    components: dict[str, Component] = {}
    listed = manifest["components"] if manifest else {}
    for key, entry in listed.items():
        components[key] = _component_from_manifest(path, key, entry, found.pop(key, []))
    for key, files in found.items():
        components[key] = _component_from_names(key, files)

    if not components and manifest is None and manifest_error is None:
        raise CheckpointNotFoundError(
            f"no checkpoint files in {path} (expected files such as optimizer_state.pt "
            f"or {MANIFEST_NAME})"
        )
    return CheckpointInfo(
        path=path,
        components=dict(sorted(components.items(), key=lambda item: _order(item[0]))),
        other_files=tuple(other),
        temp_files=tuple(temps),
        backup_files=tuple(backups),
        manifest=manifest,
        manifest_error=manifest_error,
    )


_STANDARD_ORDER = ("optimizer", "scheduler", "trainer", "dataset", "rng")


def _order(key: str) -> tuple[int, str]:
    return (_STANDARD_ORDER.index(key) if key in _STANDARD_ORDER else len(_STANDARD_ORDER), key)


def _file_sort_key(item: tuple[str, ComponentFile]) -> tuple[int, str, int, str]:
    file = item[1]
    return (file.rank if file.rank is not None else -1, file.group_name or "",
            file.node_rank if file.node_rank is not None else -1, file.name)


def _component_from_names(key: str, files: list[tuple[str, ComponentFile]]) -> Component:
    files = sorted(files, key=_file_sort_key)
    patterns = {pattern for pattern, _ in files}
    pattern = patterns.pop() if len(patterns) == 1 else "mixed"
    missing: tuple[str, ...] = ()
    if pattern == "per_rank":
        ranks = [f.rank for _, f in files if f.rank is not None]
        expected = range(max(ranks) + 1)
        missing = tuple(f"{key}_state_rank_{r}.pt" for r in expected if r not in ranks)
    return Component(key, pattern, tuple(f for _, f in files), from_manifest=False,
                     missing=missing)


def _component_from_manifest(
    directory: Path, key: str, entry: dict[str, Any], files: list[tuple[str, ComponentFile]]
) -> Component:
    pattern = str(entry.get("sharing_pattern", "global")).lower()
    ranks = [int(r) for r in entry.get("ranks") or []]
    files = sorted(files, key=_file_sort_key)
    by_pattern = [f for p, f in files if p == _name_pattern(pattern)]
    missing: list[str] = []
    if pattern in ("global", "replicated"):
        expected = directory / f"{key}_state.pt"
        if not expected.is_file():
            missing.append(expected.name)
    elif pattern == "per_rank":
        present = {f.rank for f in by_pattern}
        missing = [f"{key}_state_rank_{r}.pt" for r in ranks if r not in present]
    elif pattern in ("per_group", "per_node"):
        present = {f.rank for f in by_pattern}
        missing = [f"{key}_state_*_rank_{r}.pt" for r in ranks if r not in present]
    return Component(key, pattern, tuple(by_pattern), from_manifest=True,
                     missing=tuple(missing), manifest_entry=entry)


def _name_pattern(pattern: str) -> str:
    return "global" if pattern == "replicated" else pattern
