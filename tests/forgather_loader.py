"""A stand-in for Forgather's strict manifest loader, for tests.

Mirrors what Forgather's ``CheckpointManifest.load`` accepts (see
``shared/reference/forgather-format.md``): the top-level keys ``checkpoint_path``,
``world_size``, ``timestamp`` and ``components`` are required, the timestamp must parse with
``datetime.fromisoformat``, other top-level keys are optional and extra ones ignored, and every
component entry is passed as keyword arguments to a dataclass with exactly the documented
fields, so an unknown key raises ``TypeError`` (the resume would abort) and a missing required
one too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass
class LoadedComponent:
    """One ``components[key]`` entry, with Forgather's field names, order and defaults."""

    key: str
    sharing_pattern: str
    ranks: list[int]
    replicated_across: list[int] | None = None
    group_name: str | None = None
    size_bytes: int = 0
    checksum: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedManifest:
    """The whole manifest, as Forgather's loader builds it."""

    checkpoint_path: str
    world_size: int
    timestamp: datetime
    components: dict[str, LoadedComponent]
    training_args_hash: str | None = None
    forgather_version: str | None = None
    pytorch_version: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def load_manifest_strict(path: Path) -> LoadedManifest:
    """Load `path` (a manifest file or a checkpoint directory) the way Forgather does.

    Raises ``KeyError`` for a missing required top-level key, ``ValueError`` for a bad
    timestamp, ``TypeError`` for an unknown or missing field in a component entry and
    ``json.JSONDecodeError`` for malformed JSON, just as the trainer's resume would fail.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_manifest.json"
    with open(path) as stream:
        data = json.load(stream)
    return LoadedManifest(
        checkpoint_path=data["checkpoint_path"],
        world_size=data["world_size"],
        timestamp=datetime.fromisoformat(data["timestamp"]),
        components={key: LoadedComponent(**entry) for key, entry in data["components"].items()},
        training_args_hash=data.get("training_args_hash"),
        forgather_version=data.get("forgather_version"),
        pytorch_version=data.get("pytorch_version"),
        metadata=data.get("metadata", {}),
    )
