"""The exclusive per-checkpoint edit lock, and the directory times it protects.

Why the lock is ``flock`` on the checkpoint *directory* itself rather than on a lock file:

* A lock file has to be created, and deleting it again is racy (a waiter may have opened the
  old inode and lock it after we unlink it). Locking the directory's own descriptor needs no
  file at all, so a refused editor creates nothing and there is nothing to delete.
* The kernel drops an ``flock`` when its holder dies (SIGKILL, OOM), so a lock left by a dead
  process is taken over simply by acquiring it.

What the lock cannot carry is *who* holds it, which a refused editor must be told. The holder
therefore writes a small JSON note, ``.forgather_checkpoint.lock`` in the checkpoint directory
(pid, host, start time, command, and the directory times to put back), after acquiring the lock
and removes it before releasing. The note is never the lock: a note found by the next holder is a
leftover of a process that died holding the lock (reported as a stale lock that was taken over),
and its recorded directory times are the true originals to restore, because the dead process
changed the directory after recording them.

Directory mtimes: Forgather picks the newest checkpoint by directory mtime when there is no
manifest, so every command restores the mtime of each directory it touched (the checkpoint
directory and, for symlinked files, their real directories) to the value recorded before its
first change, just before it releases the lock (after its last change, and before the next
holder can record a value).

Limits: ``flock`` is advisory (only this tool honours it) and is not reliable on some network
file systems; the note's pid is only meaningful on the host it names.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import errors

LOCK_NOTE_NAME = ".forgather_checkpoint.lock"
_POLL_SECONDS = 0.05
_NOTE_GRACE_SECONDS = 0.5


@dataclass(frozen=True)
class LockHolder:
    """What the lock note says about the process holding (or last holding) the lock."""

    pid: int
    host: str
    started: str
    user: str
    command: str
    dir_times: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    @property
    def alive(self) -> bool | None:
        """Whether the holder still runs (None when it ran on another host: we cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        return f"process {self.pid} on {self.host} (user {self.user}, started {self.started})"


def read_lock_holder(checkpoint_dir: Path) -> LockHolder | None:
    """The lock note in ``checkpoint_dir``, or None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(checkpoint_dir) / LOCK_NOTE_NAME).read_text(encoding="utf-8"))
        times = {str(k): (int(v[0]), int(v[1])) for k, v in data.get("dir_times", {}).items()}
        return LockHolder(
            pid=int(data["pid"]),
            host=str(data["host"]),
            started=str(data["started"]),
            user=str(data.get("user", "?")),
            command=str(data.get("command", "")),
            dir_times=times,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_user() -> str:
    """The login name recorded in lock notes, history and the manifest (uid if none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class CheckpointLock:
    """A held lock. Create with :func:`acquire_lock`; call :meth:`release` exactly once."""

    def __init__(self, checkpoint_dir: Path, fd: int, previous: LockHolder | None) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._fd: int | None = fd
        # A note left by a process that died holding the lock (the kernel released its flock).
        self.stale_holder = previous
        self._dir_times: dict[str, tuple[int, int]] = {}

    def protect_dirs(self, dirs: Iterable[Path]) -> None:
        """Record the times of ``dirs`` (before we change them) and write our lock note."""
        inherited = self.stale_holder.dir_times if self.stale_holder else {}
        for d in dirs:
            key = str(d)
            if key in self._dir_times:
                continue
            if key in inherited:
                # The dead holder recorded the true original before changing the directory.
                self._dir_times[key] = inherited[key]
            else:
                st = os.stat(d)
                self._dir_times[key] = (st.st_atime_ns, st.st_mtime_ns)
        note = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": current_user(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300],
            "dir_times": {k: list(v) for k, v in self._dir_times.items()},
        }
        path = self.checkpoint_dir / LOCK_NOTE_NAME
        # Plain overwrite is fine: only the lock holder ever writes the note.
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(note, fh)
            fh.flush()
            # Durable so that after a power loss the original times can still be put back.
            os.fsync(fh.fileno())

    @property
    def dir_times(self) -> dict[str, tuple[int, int]]:
        return dict(self._dir_times)

    def restore_dir_times(self) -> None:
        for key, (atime_ns, mtime_ns) in self._dir_times.items():
            with contextlib.suppress(FileNotFoundError):
                os.utime(key, ns=(atime_ns, mtime_ns))

    def release(self) -> None:
        """Remove the note, put directory times back, then drop the lock (in that order)."""
        if self._fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                (self.checkpoint_dir / LOCK_NOTE_NAME).unlink()
            # Last change first, times second, unlock last: the next holder must record the
            # restored times, never the ones our own changes produced.
            self.restore_dir_times()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)


def acquire_lock(checkpoint_dir: Path, *, wait: float = 0.0) -> CheckpointLock:
    """Take the checkpoint's exclusive edit lock, waiting up to ``wait`` seconds.

    Raises :class:`errors.LockedError` naming the holder when it stays taken. Changes nothing
    on disk (the caller writes the note with :meth:`CheckpointLock.protect_dirs`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    try:
        fd = os.open(checkpoint_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise errors.CheckpointNotFoundError(
            f"checkpoint directory {checkpoint_dir} does not exist"
        ) from exc
    except NotADirectoryError as exc:
        raise errors.CheckpointNotFoundError(f"{checkpoint_dir} is not a directory") from exc
    deadline = time.monotonic() + max(0.0, wait)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _locked_error(checkpoint_dir, wait) from None
                time.sleep(min(_POLL_SECONDS, remaining))
    except BaseException:
        os.close(fd)
        raise
    return CheckpointLock(checkpoint_dir, fd, read_lock_holder(checkpoint_dir))


def _locked_error(checkpoint_dir: Path, wait: float) -> errors.LockedError:
    # The holder writes its note just after taking the lock; a note naming a dead process is
    # a crashed holder's, about to be overwritten. Give the new holder a moment to sign in.
    deadline = time.monotonic() + _NOTE_GRACE_SECONDS
    holder = read_lock_holder(checkpoint_dir)
    while (holder is None or holder.alive is False) and time.monotonic() < deadline:
        time.sleep(0.01)
        holder = read_lock_holder(checkpoint_dir)
    who = holder.describe() if holder else "another process (it has not identified itself yet)"
    waited = f" after waiting {wait:g}s" if wait > 0 else ""
    return errors.LockedError(
        f"checkpoint {checkpoint_dir} is being edited by {who}{waited}; "
        "try again later or pass --wait SECONDS"
    )


def lock_note_details(holder: LockHolder) -> dict[str, Any]:
    """The note as plain data (for ``--json`` output)."""
    return {
        "pid": holder.pid,
        "host": holder.host,
        "user": holder.user,
        "started": holder.started,
        "command": holder.command,
        "alive": holder.alive,
    }
