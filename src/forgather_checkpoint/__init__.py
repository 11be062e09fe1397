"""forgather-checkpoint: safely change hyperparameters inside saved Forgather checkpoints."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "save_checkpoint_atomically"]


def save_checkpoint_atomically(path: Any, state_dict: Any, backup: bool = True) -> Any:
    """Save ``state_dict`` to ``path`` through the tool's atomic, validated commit path.

    The file is written to a unique temp file, fsynced, loaded back with
    ``torch.load(weights_only=True)`` and compared, the original kept as ``path.bak`` (or under
    ``.forgather_checkpoint/backups/``), then replaced. Returns the writer's ``CommitResult``.
    """
    from pathlib import Path

    from .writer import save_checkpoint_atomically as _save

    return _save(Path(path), state_dict, backup=backup)
