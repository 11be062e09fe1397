"""The typed errors users can meet.

Every error a user can cause derives from :class:`CheckpointToolError`. The CLI maps these (and
only these) to ``Error: ...`` with exit status 1; anything else is a bug and keeps its traceback.
Messages say what went wrong, where, and what to do next.
"""

from __future__ import annotations


class CheckpointToolError(Exception):
    """Base class of every error the tool reports to users."""


class CheckpointNotFoundError(CheckpointToolError):
    """The checkpoint path does not exist or is not a checkpoint directory."""


class ComponentNotFoundError(CheckpointToolError):
    """The checkpoint has no files for the requested component."""


class IncompleteComponentError(CheckpointToolError):
    """A component's file set is incomplete (for example a missing rank file)."""


class StateFileError(CheckpointToolError):
    """A component state file cannot be read (corrupt, truncated, unsafe or not a torch file)."""


class ManifestError(CheckpointToolError):
    """``checkpoint_manifest.json`` is unreadable or does not satisfy Forgather's loader."""


class EditSpecError(CheckpointToolError):
    """A ``--set``/``--scale`` specification is malformed (bad KEY=VALUE syntax or literal)."""


class ParameterNotFoundError(CheckpointToolError):
    """An edit names a key or path that does not exist in the state."""


class ParamGroupError(CheckpointToolError):
    """``--param-group`` is out of range or used with a component without param groups."""


class ForbiddenEditError(CheckpointToolError):
    """An edit targets protected state (``params``, tensors, optimizer ``state``)."""


class ValueTypeError(CheckpointToolError):
    """An edit would change a value's kind (number to string, bool to number, ...)."""


class ValidationError(CheckpointToolError):
    """A written temp file does not hold exactly the intended state; nothing was replaced."""


class CommitError(CheckpointToolError):
    """Committing the edited files failed; every original file is still in place."""


class StaleReadError(CommitError):
    """A file changed between reading it and committing (another edit finished first)."""


class LockedError(CheckpointToolError):
    """Another process holds the checkpoint's edit lock."""


class ConfirmationRequiredError(CheckpointToolError):
    """A change needs confirmation but there is no terminal to ask and ``--force`` was not given."""


class AbortedError(CheckpointToolError):
    """The user declined the confirmation prompt; nothing was changed."""


class UsageProblem(CheckpointToolError):
    """An option combination that makes no sense for the target (exit status 2, like click)."""


class HistoryError(CheckpointToolError):
    """The edit history cannot satisfy a restore (unknown entry, backup not kept or missing)."""
