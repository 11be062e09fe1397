"""forgather-checkpoint: safely change hyperparameters inside saved Forgather checkpoints."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "save_checkpoint_atomically"]


def save_checkpoint_atomically(path: Any, state_dict: Any, backup: bool = True) -> None:
    """Save ``state_dict`` to ``path`` through the tool's atomic, validated commit path."""
    from .writer import save_checkpoint_atomically as _save

    _save(path, state_dict, backup=backup)
