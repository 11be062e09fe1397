"""Shared fixtures: real example checkpoints in Forgather's layouts.

``make_checkpoint(**options)`` trains a tiny model and saves a checkpoint under ``tmp_path``
(see ``forgather_checkpoint.examples.build_checkpoint`` for the options: ``layout``,
``optimizer``, ``scheduler``, ``world_size``, ``steps``, ``manifest``, ``seed``,
``timestamp``). Each call gets its own fresh directory named like Forgather's,
``.../checkpoints/checkpoint-STEP``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MakeCheckpoint = Callable[..., Path]


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> MakeCheckpoint:
    """Factory: ``make_checkpoint(layout="single", optimizer="adamw", ...) -> Path``."""
    from forgather_checkpoint.examples import build_checkpoint

    counter = itertools.count()

    def make(**options: Any) -> Path:
        steps = options.get("steps", 5)
        run = tmp_path / f"run-{next(counter)}"
        return build_checkpoint(run / "checkpoints" / f"checkpoint-{steps}", **options)

    return make


@pytest.fixture
def example_checkpoint(make_checkpoint: MakeCheckpoint) -> Path:
    """The README example: single layout, AdamW (2 groups), LambdaLR, rng for 2 ranks."""
    return make_checkpoint()
