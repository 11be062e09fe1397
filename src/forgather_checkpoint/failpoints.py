"""Named failpoints in the commit path, for the fault-injection tests.

A failpoint is a named place in :mod:`forgather_checkpoint.writer` where a test can make the
process fail the way real processes fail: killed outright, or a write error from the kernel.
They are enabled only through one environment variable read by the process itself, so a test
can arm them in a child process without any code path existing to arm them by accident::

    FORGATHER_CHECKPOINT_FAILPOINTS="after-replace-2=kill,after-stage-1=enospc"

Actions: ``kill`` (SIGKILL to ourselves: no ``finally``, no atexit, exactly like the OOM killer),
``enospc`` / ``eio`` (raise the matching :class:`OSError`, as a full disk or a failing device
would), ``sleep:SECONDS`` (hold the current state for a while, used to make races reproducible).
The variable is parsed on every call (it is tiny), so tests may also set it in-process.
"""

from __future__ import annotations

import errno
import os
import signal
import time

FAILPOINTS_ENV = "FORGATHER_CHECKPOINT_FAILPOINTS"


def _armed_action(name: str) -> str | None:
    spec = os.environ.get(FAILPOINTS_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        point, sep, action = item.strip().partition("=")
        if sep and point.strip() == name:
            return action.strip()
    return None


def failpoint(name: str) -> None:
    """Fail here if the failpoint ``name`` is armed in the environment; otherwise do nothing."""
    action = _armed_action(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        # SIGKILL to ourselves is delivered before kill() returns on Linux; the sleep only
        # guards against a platform that delivers it a moment later.
        time.sleep(60)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (failpoint {name})")
    elif action == "eio":
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (failpoint {name})")
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise ValueError(f"unknown failpoint action {action!r} for {name} in ${FAILPOINTS_ENV}")
