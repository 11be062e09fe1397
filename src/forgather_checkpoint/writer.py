"""Committing new file contents to a checkpoint as one crash-safe, concurrency-safe transaction.

A ``modify`` touches every rank file of a component plus the manifest. Whatever happens (the
process killed at any instant, a full disk, a write error, a second editor), each of those
files must end up all as before or all as intended. The design follows SQLite's rollback
journal and Orbax's commit markers: stage and verify everything first, make a durable record
of the plan, and only then touch the originals.

On-disk names (all inside the checkpoint directory unless a file is a symlink elsewhere)::

    .forgather_checkpoint.lock             lock note (holder pid/host/start); only while locked
    .forgather_checkpoint.journal          the plan of a commit in its replace phase
    .forgather_checkpoint.journal-rollback the same plan, being undone
    .forgather_checkpoint.journal-complete the same plan, done; only cleanup remains
    .NAME.fgc-tmp-PID-RANDOM               a staged temp file (next to the real file it replaces)
    NAME.bak                               NAME's original, pre-first-edit bytes; never overwritten
    .forgather_checkpoint/history.jsonl    one JSON line per commit (kept)
    .forgather_checkpoint/backups/ID/NAME  NAME's bytes before commit ID (later edits' backups)

Only the last three survive a command; the lock note, the journal and temp files exist only
while a command runs (or after a crash, until the next command recovers).

The commit, in order (the lock is held throughout; see :mod:`forgather_checkpoint.locking`)::

    LOCKED     note written, directory times recorded; an earlier interrupted commit recovered
    STAGING    each temp created O_EXCL, rendered, mode copied, fsynced, validated: the
               independent files in parallel threads, then those that depend on the others'
               temps (the manifest); temp directories fsynced
                                                           -- crash: no journal => roll back
    JOURNALED  journal written to a temp, fsynced, renamed into place, directory fsynced.
               This rename is the commit point.            -- crash: journal => roll forward
    BACKED UP  each original kept by hard link (copy + fsync only where links are impossible)
    REPLACED   os.replace(temp, target) for each; directories fsynced
    RECORDED   history line appended and fsynced
    COMPLETE   journal renamed to -complete (a rename: it cannot fail for lack of space)
    CLEAN      transient backups (--no-backup) dropped, journal removed, directory times put back

Recovery (``recover``, and the start of every commit) decides from the journal alone:

* no journal: a commit died while staging. Its originals were never touched: delete every temp
  file (recognisable by name) => all old.
* ``journal``: every temp was validated before the journal existed, so roll forward: for each
  entry, the target is already new iff its inode is the staged temp's inode (``os.replace`` moves
  the inode, so this is exact and needs no hashing); otherwise the temp must still exist with the
  journaled size and quick digest, and is backed up / replaced. If some temp is missing or
  damaged (someone deleted it), roll back instead => all new, or all old.
* ``journal-rollback``: an in-process failure after the commit point (ENOSPC, EIO, Ctrl-C) is
  undone rather than finished, so the user sees "nothing changed". The journal is renamed first,
  then every replaced target is put back from its backup (linked to a temp, then replaced), the
  history is truncated to its journaled length, temps and this commit's backups are removed.
  Each step is idempotent, so a crash while undoing is finished by undoing again => all old.
* ``journal-complete``: finish the cleanup => all new.

Quick digest: the journal and history record each file's size and a CRC-32 of its first and last
MiB. Targets are told apart by inode, so the digest only guards against a damaged or foreign temp
file at roll-forward and lets ``restore`` report drift; hashing whole multi-gigabyte rank files
would double the I/O of a commit for no decision it has to make (validation has already read the
complete file back).
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import json
import os
import queue
import secrets
import shutil
import socket
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import errors
from .failpoints import failpoint
from .locking import (
    CheckpointLock,
    LockHolder,
    acquire_lock,
    current_user,
    fsync_dir,
    read_lock_holder,
)

TEMP_MARKER = ".fgc-tmp-"
STATE_DIR_NAME = ".forgather_checkpoint"
HISTORY_NAME = "history.jsonl"
BACKUPS_NAME = "backups"
BAK_SUFFIX = ".bak"
JOURNAL_NAME = ".forgather_checkpoint.journal"
JOURNAL_ROLLBACK_NAME = JOURNAL_NAME + "-rollback"
JOURNAL_COMPLETE_NAME = JOURNAL_NAME + "-complete"
_JOURNAL_PHASES = {
    JOURNAL_NAME: "replacing",
    JOURNAL_ROLLBACK_NAME: "rolling-back",
    JOURNAL_COMPLETE_NAME: "complete",
}
_DIGEST_SPAN = 1 << 20
# Renders are kernel copies and fsyncs that release the GIL; more threads than this only make
# the disk seek between files. A module constant so tests can change it.
STAGING_THREADS = 8
# Link failures that mean "this file system (pair) cannot hard-link": fall back to a copy.
_NO_LINK_ERRNOS = {
    errno.EXDEV,
    errno.EPERM,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EMLINK,
    errno.ENOSYS,
    errno.EACCES,
}

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class StagedWrite:
    """One file of a commit: how to produce its new bytes and how to check them.

    ``render(temp, rendered)`` fills the empty temp file; ``validate(temp)`` raises when the
    staged bytes are not what was meant. Independent writes are rendered and validated in
    parallel threads, each seeing an empty ``rendered`` mapping. A write with ``after_others``
    (the manifest, which records the new files' sizes) runs once every independent write is
    staged and validated, and sees them all (target -> staged temp) in ``rendered``.
    """

    target: Path
    render: Callable[[Path, Mapping[Path, Path]], None]
    validate: Callable[[Path], None]
    after_others: bool = False


@dataclass(frozen=True)
class BackupRecord:
    """Where a replaced file's previous bytes are kept, and how (``hardlink`` or ``copy``)."""

    target: Path
    path: Path
    method: str


@dataclass(frozen=True)
class HistoryFile:
    """One file of a history entry (paths relative to the checkpoint directory)."""

    path: str
    backup: str | None
    backup_method: str | None
    old: Mapping[str, int] | None
    new: Mapping[str, int]


@dataclass(frozen=True)
class HistoryEntry:
    """One committed transaction, as stored in ``.forgather_checkpoint/history.jsonl``."""

    id: str
    time: str
    user: str
    host: str
    pid: int
    action: str
    record: Mapping[str, Any]
    files: tuple[HistoryFile, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "user": self.user,
            "host": self.host,
            "pid": self.pid,
            "action": self.action,
            "record": dict(self.record),
            "files": [
                {
                    "path": f.path,
                    "backup": f.backup,
                    "backup_method": f.backup_method,
                    "old": dict(f.old) if f.old is not None else None,
                    "new": dict(f.new),
                }
                for f in self.files
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HistoryEntry:
        return cls(
            id=str(data["id"]),
            time=str(data["time"]),
            user=str(data.get("user", "?")),
            host=str(data.get("host", "?")),
            pid=int(data.get("pid", 0)),
            action=str(data.get("action", "modify")),
            record=MappingProxyType(dict(data.get("record") or {})),
            files=tuple(
                HistoryFile(
                    path=str(f["path"]),
                    backup=f.get("backup"),
                    backup_method=f.get("backup_method"),
                    old=f.get("old"),
                    new=f.get("new") or {},
                )
                for f in data.get("files", [])
            ),
        )


@dataclass(frozen=True)
class RecoveryResult:
    """What recovery did: ``rolled-forward``, ``rolled-back``, ``finished`` or ``cleaned``."""

    action: str
    commit_id: str | None
    files: tuple[Path, ...]
    removed_temp_files: tuple[Path, ...]
    stale_holder: LockHolder | None


@dataclass(frozen=True)
class CommitResult:
    """A committed transaction."""

    commit_id: str
    files: tuple[Path, ...]
    backups: tuple[BackupRecord, ...]
    history_entry: HistoryEntry
    recovered: RecoveryResult | None = None
    stale_holder: LockHolder | None = None
    warnings: tuple[str, ...] = ()

    @property
    def copied_backups(self) -> tuple[BackupRecord, ...]:
        """Backups that had to be copied because a hard link was impossible."""
        return tuple(b for b in self.backups if b.method == "copy")


@dataclass(frozen=True)
class PendingCommit:
    """An interrupted (or, when ``in_progress``, running) commit found on disk."""

    commit_id: str | None
    phase: str  # "staging", "replacing", "rolling-back", "complete"
    next_step: str  # "roll back", "roll forward", "finish"
    files: tuple[Path, ...]
    temp_files: tuple[Path, ...]
    holder: LockHolder | None
    in_progress: bool


@dataclass(frozen=True)
class RestoreItem:
    """Put ``source``'s bytes (a backup kept by history entry ``entry_id``) back at ``target``."""

    target: Path
    source: Path
    entry_id: str


@dataclass(frozen=True)
class RestorePlan:
    """Which files go back to which bytes; made by :func:`plan_restore`, run by :func:`restore`."""

    checkpoint_dir: Path
    description: str
    to: str | None
    original: bool
    items: tuple[RestoreItem, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# Small helpers


@dataclass(frozen=True)
class _Entry:
    """One file in the journal."""

    target: Path  # the real file replaced (symlinks resolved)
    link: Path  # the path as the caller named it (what history records)
    temp: Path
    backup: Path | None
    keep_backup: bool
    orig: tuple[int, int] | None  # (st_dev, st_ino) of the original; None for a new file
    temp_id: tuple[int, int]
    mode: int
    old: Mapping[str, int] | None
    new: Mapping[str, int]


def _rel(ckpt: Path, path: Path) -> str:
    # Paths inside the checkpoint are stored relative so a moved checkpoint stays recoverable.
    try:
        return str(path.relative_to(ckpt))
    except ValueError:
        return str(path)


def _abs(ckpt: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else ckpt / path


def _entry_to_json(ckpt: Path, e: _Entry) -> dict[str, Any]:
    return {
        "target": _rel(ckpt, e.target),
        "link": _rel(ckpt, e.link),
        "temp": _rel(ckpt, e.temp),
        "backup": _rel(ckpt, e.backup) if e.backup else None,
        "keep_backup": e.keep_backup,
        "orig": list(e.orig) if e.orig else None,
        "temp_id": list(e.temp_id),
        "mode": e.mode,
        "old": dict(e.old) if e.old is not None else None,
        "new": dict(e.new),
    }


def _entry_from_json(ckpt: Path, d: Mapping[str, Any]) -> _Entry:
    return _Entry(
        target=_abs(ckpt, d["target"]),
        link=_abs(ckpt, d["link"]),
        temp=_abs(ckpt, d["temp"]),
        backup=_abs(ckpt, d["backup"]) if d.get("backup") else None,
        keep_backup=bool(d["keep_backup"]),
        orig=(int(d["orig"][0]), int(d["orig"][1])) if d.get("orig") else None,
        temp_id=(int(d["temp_id"][0]), int(d["temp_id"][1])),
        mode=int(d["mode"]),
        old=d.get("old"),
        new=d["new"],
    )


def _temp_path(target: Path) -> Path:
    # Dot-prefixed (hidden, never matched by Forgather's "*_state*.pt" globs), unique per process
    # and attempt, and recognisable by TEMP_MARKER so leftovers can be found and removed.
    return target.parent / f".{target.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"


def _quick_digest(path: Path) -> dict[str, int]:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        crc = zlib.crc32(fh.read(_DIGEST_SPAN))
        if size > _DIGEST_SPAN:
            fh.seek(max(_DIGEST_SPAN, size - _DIGEST_SPAN))
            crc = zlib.crc32(fh.read(), crc)
    return {"size": size, "crc32": crc}


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(dirs: Iterable[Path]) -> None:
    for d in sorted(set(dirs)):
        if d.is_dir():
            fsync_dir(d)


def _discard(paths: Iterable[Path]) -> list[str]:
    """Unlink what exists; never raise (cleanup must not mask the error being handled)."""
    problems = []
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"could not remove {p}: {exc.strerror or exc}")
    return problems


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _new_commit_id() -> str:
    # Sortable by time, unique across concurrent editors and hosts.
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _checkpoint_dir(checkpoint_dir: Path) -> Path:
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise errors.CheckpointNotFoundError(
            f"checkpoint directory {path} does not exist or is not a directory"
        )
    return path.resolve()


# ---------------------------------------------------------------------------------------------
# Temp files, journal, history on disk


def find_temp_files(checkpoint_dir: Path) -> list[Path]:
    """Leftover temp files of this tool, recognisable by name, in the checkpoint directory (and
    in the real directories of symlinked files named by a pending journal)."""
    ckpt = Path(checkpoint_dir)
    dirs = {ckpt}
    found = _find_journal(ckpt, tolerate_corrupt=True)
    if found is not None:
        for d in found[2].get("entries", []):
            with contextlib.suppress(KeyError, TypeError):
                dirs.add(_abs(ckpt, d["temp"]).parent)
    temps: list[Path] = []
    for d in dirs:
        with contextlib.suppress(OSError):
            temps.extend(
                d / name for name in os.listdir(d) if name.startswith(".") and TEMP_MARKER in name
            )
    return sorted(temps)


def _find_journal(
    ckpt: Path, *, tolerate_corrupt: bool = False
) -> tuple[Path, str, dict[str, Any]] | None:
    for name, phase in _JOURNAL_PHASES.items():
        path = ckpt / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            # Cannot happen through this module (the journal appears by atomic rename).
            if tolerate_corrupt:
                return path, phase, {}
            raise errors.CommitError(
                f"the commit journal {path} is corrupt ({exc}); the checkpoint may be "
                "inconsistent: compare the files with their backups before resuming"
            ) from exc
        return path, phase, data
    return None


def _write_journal(ckpt: Path, data: Mapping[str, Any]) -> Path:
    path = ckpt / JOURNAL_NAME
    tmp = _temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        # Appearing by rename, the journal is never seen half-written.
        os.replace(tmp, path)
    except BaseException:
        _discard([tmp])
        raise
    # The journal's existence is the commit point: it must be durable before any replace.
    fsync_dir(ckpt)
    return path


def _history_path(ckpt: Path) -> Path:
    return ckpt / STATE_DIR_NAME / HISTORY_NAME


def read_history(checkpoint_dir: Path) -> list[HistoryEntry]:
    """Every committed transaction of the checkpoint, oldest first (empty when never edited)."""
    path = _history_path(Path(checkpoint_dir))
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(HistoryEntry.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                # An unterminated last line is a torn append; recovery truncates it.
                continue
            raise errors.HistoryError(
                f"{path} line {number} is not a history entry ({exc})"
            ) from exc
    return entries


def _append_history(ckpt: Path, entry: Mapping[str, Any], size_before: int | None) -> None:
    path = _history_path(ckpt)
    if any(e.id == entry["id"] for e in read_history(ckpt)):
        return  # already appended before a crash; recovery must not record a commit twice
    state_dir = path.parent
    if not state_dir.is_dir():
        state_dir.mkdir()
        fsync_dir(ckpt)
    created = not path.exists()
    line = (json.dumps(entry, default=repr) + "\n").encode("utf-8")
    with open(path, "ab") as fh:
        # A torn line from a crashed append would glue onto ours: cut back to the known end.
        if size_before is not None and fh.tell() != size_before:
            fh.truncate(size_before)
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    if created:
        fsync_dir(state_dir)


def _history_entry_json(ckpt: Path, journal: Mapping[str, Any]) -> dict[str, Any]:
    entry = dict(journal["history_entry"])
    files = []
    for d in journal["entries"]:
        e = _entry_from_json(ckpt, d)
        method = None
        if e.keep_backup and e.backup is not None:
            method = "hardlink" if _file_id(e.backup) == e.orig else "copy"
        files.append(
            {
                "path": d["link"],
                "backup": d["backup"] if e.keep_backup else None,
                "backup_method": method,
                "old": d["old"],
                "new": d["new"],
            }
        )
    entry["files"] = files
    return entry


# ---------------------------------------------------------------------------------------------
# The replace phase and its two ways out (forward, back)


def _keep_original(e: _Entry) -> str:
    """Keep the original at ``e.backup``: a hard link (no copy) unless impossible."""
    assert e.backup is not None
    e.backup.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(e.target, e.backup)
        return "hardlink"
    except FileExistsError:
        raise errors.CommitError(
            f"backup {e.backup} already exists and is never overwritten; nothing was changed"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
    fd = os.open(e.backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, e.mode)
    try:
        with open(e.target, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        _discard([e.backup])
        raise
    return "copy"


def _backup_dirs(ckpt: Path, entries: Sequence[_Entry]) -> set[Path]:
    dirs: set[Path] = set()
    for e in entries:
        if e.backup is None:
            continue
        d = e.backup.parent
        # Newly made backup folders are entries of their parents: sync up to the checkpoint.
        while True:
            dirs.add(d)
            if d == ckpt or ckpt not in d.parents:
                break
            d = d.parent
    return dirs


def _is_new(e: _Entry) -> bool:
    # os.replace moves the temp's inode onto the target, so this identifies the new bytes exactly.
    return _file_id(e.target) == e.temp_id


def _roll_forward(ckpt: Path, journal: Mapping[str, Any], jpath: Path) -> bool:
    """Finish an interrupted replace phase. False (nothing done) when it cannot be finished."""
    entries = [_entry_from_json(ckpt, d) for d in journal["entries"]]
    pending = [e for e in entries if not _is_new(e)]
    for e in pending:
        if _file_id(e.temp) != e.temp_id or _quick_digest(e.temp) != dict(e.new):
            return False
    for e in pending:
        if e.backup is None or e.orig is None:
            continue
        if _file_id(e.backup) == e.orig:
            continue
        if os.path.lexists(e.backup):
            # Only a copy can be here; a crash may have torn it. Our own file: redo it.
            if e.old is not None and _quick_digest(e.backup) == dict(e.old):
                continue
            e.backup.unlink()
        _keep_original(e)
    _fsync_dirs(_backup_dirs(ckpt, pending))
    for i, e in enumerate(pending, 1):
        os.replace(e.temp, e.target)
        failpoint(f"recover-replace-{i}")
    _fsync_dirs(e.target.parent for e in entries)
    _append_history(ckpt, _history_entry_json(ckpt, journal), journal["history_size_before"])
    _mark_complete(ckpt, jpath)
    return True


def _mark_complete(ckpt: Path, jpath: Path) -> Path:
    done = ckpt / JOURNAL_COMPLETE_NAME
    os.rename(jpath, done)
    fsync_dir(ckpt)
    return done


def _finish(ckpt: Path, journal: Mapping[str, Any], jpath: Path) -> None:
    """After the commit is complete: drop transient (--no-backup) originals, remove journal."""
    entries = [_entry_from_json(ckpt, d) for d in journal["entries"]]
    transient = [e.backup for e in entries if e.backup is not None and not e.keep_backup]
    for problem in _discard(transient):
        raise OSError(errno.EIO, problem)
    _remove_empty_dirs(ckpt, {p.parent for p in transient}, journal)
    jpath.unlink()
    fsync_dir(ckpt)


def _remove_empty_dirs(ckpt: Path, dirs: Iterable[Path], journal: Mapping[str, Any]) -> None:
    candidates = set()
    for d in dirs:
        candidates.add(d)
        if d.parent.name == BACKUPS_NAME:
            candidates.add(d.parent)
    state_dir = ckpt / STATE_DIR_NAME
    if not journal.get("state_dir_existed", True):
        candidates.add(state_dir)
    # Deepest first, so a parent is tried only after its children.
    for d in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
        if d == state_dir and journal.get("state_dir_existed", True):
            continue
        with contextlib.suppress(OSError):
            d.rmdir()


def _roll_back(ckpt: Path, journal: Mapping[str, Any], jpath: Path) -> None:
    """Undo a commit after its commit point: every target back to its original bytes."""
    if jpath.name != JOURNAL_ROLLBACK_NAME:
        rolling = ckpt / JOURNAL_ROLLBACK_NAME
        # Renamed first: from here a crash must continue the undo, never roll forward again
        # (the temps we are about to delete would be missing).
        os.rename(jpath, rolling)
        fsync_dir(ckpt)
        jpath = rolling
    entries = [_entry_from_json(ckpt, d) for d in journal["entries"]]
    for i, e in enumerate(reversed(entries), 1):
        if not _is_new(e):
            continue
        if e.orig is None:
            e.target.unlink()
        elif e.backup is not None and os.path.lexists(e.backup):
            back = _temp_path(e.target)
            try:
                os.link(e.backup, back)
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                _copy_into_new(e.backup, back, e.mode)
            os.replace(back, e.target)
        else:
            raise errors.CommitError(
                f"cannot undo the change to {e.target}: its original ({e.backup}) is gone"
            )
        failpoint(f"rollback-restore-{i}")
    _fsync_dirs(e.target.parent for e in entries)
    history = _history_path(ckpt)
    size_before = journal.get("history_size_before")
    if history.exists():
        if size_before is None:
            history.unlink()
        elif history.stat().st_size > size_before:
            with open(history, "r+b") as fh:
                fh.truncate(size_before)
                os.fsync(fh.fileno())
    backups = [e.backup for e in entries if e.backup is not None]
    # Every backup named in the journal was made by this commit (backup paths never pre-exist),
    # and holds the same bytes as the restored original: removing it loses nothing.
    problems = _discard([e.temp for e in entries] + backups)
    if problems:
        raise OSError(errno.EIO, "; ".join(problems))
    _remove_empty_dirs(ckpt, {b.parent for b in backups}, journal)
    _fsync_dirs({e.target.parent for e in entries} | {ckpt})
    jpath.unlink()
    fsync_dir(ckpt)


def _copy_into_new(src: Path, dst: Path, mode: int) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        _discard([dst])
        raise


# ---------------------------------------------------------------------------------------------
# Recovery


def _recover_locked(ckpt: Path, lock: CheckpointLock) -> RecoveryResult | None:
    found = _find_journal(ckpt)
    action: str | None = None
    commit_id = None
    files: tuple[Path, ...] = ()
    if found is not None:
        jpath, phase, data = found
        commit_id = data.get("id")
        files = tuple(_abs(ckpt, d["link"]) for d in data["entries"])
        if phase == "complete":
            _finish(ckpt, data, jpath)
            action = "finished"
        elif phase == "rolling-back":
            _roll_back(ckpt, data, jpath)
            action = "rolled-back"
        elif _roll_forward(ckpt, data, jpath):
            _finish(ckpt, data, ckpt / JOURNAL_COMPLETE_NAME)
            action = "rolled-forward"
        else:
            _roll_back(ckpt, data, jpath)
            action = "rolled-back"
    # We hold the lock, so no commit is staging: every temp file left is an orphan.
    leftovers = find_temp_files(ckpt)
    problems = _discard(leftovers)
    if problems:
        raise errors.CommitError("; ".join(problems))
    if leftovers:
        _fsync_dirs({p.parent for p in leftovers})
    if action is None and not leftovers and lock.stale_holder is None:
        return None
    return RecoveryResult(
        action=action or "cleaned",
        commit_id=commit_id,
        files=files,
        removed_temp_files=tuple(leftovers),
        stale_holder=lock.stale_holder,
    )


def _journal_dirs(ckpt: Path) -> set[Path]:
    found = _find_journal(ckpt, tolerate_corrupt=True)
    if found is None:
        return set()
    dirs = set()
    for d in found[2].get("entries", []):
        with contextlib.suppress(KeyError, TypeError):
            dirs.add(_abs(ckpt, d["target"]).parent)
    return {d for d in dirs if d.is_dir()}


def _locked(ckpt: Path, wait: float, dirs: Iterable[Path]) -> CheckpointLock:
    lock = acquire_lock(ckpt, wait=wait)
    try:
        lock.protect_dirs({ckpt, *dirs, *_journal_dirs(ckpt)})
    except BaseException as exc:
        with contextlib.suppress(OSError):
            lock.release()
        if isinstance(exc, OSError):
            raise errors.CommitError(
                f"cannot lock {ckpt} for editing: {_reason(exc)}; nothing was changed"
            ) from exc
        raise
    return lock


def recover(checkpoint_dir: Path, *, wait: float = 0.0) -> RecoveryResult | None:
    """Finish or undo an interrupted commit and remove leftover temp files.

    Returns None when there was nothing to do. Takes the lock (``wait`` as for commits).
    """
    ckpt = _checkpoint_dir(checkpoint_dir)
    lock = _locked(ckpt, wait, ())
    try:
        result = _recover_locked(ckpt, lock)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            lock.release()
        if isinstance(exc, OSError):
            raise errors.CommitError(
                f"recovering {ckpt} failed: {_reason(exc)}; run 'forgather checkpoint recover "
                f"{ckpt}' again once the cause is fixed (it is safe to repeat)"
            ) from exc
        raise
    lock.release()
    return result


def pending_commit(checkpoint_dir: Path) -> PendingCommit | None:
    """Describe an interrupted commit without taking the lock or changing anything."""
    ckpt = Path(checkpoint_dir)
    holder = read_lock_holder(ckpt)
    in_progress = bool(holder and holder.alive and holder.pid != os.getpid())
    temps = tuple(find_temp_files(ckpt))
    found = _find_journal(ckpt, tolerate_corrupt=True)
    if found is None:
        if not temps and holder is None:
            return None
        return PendingCommit(None, "staging", "roll back", (), temps, holder, in_progress)
    _jpath, phase, data = found
    try:
        files = tuple(_abs(ckpt, d["link"]) for d in data["entries"])
    except (KeyError, TypeError):
        files = ()
    next_step = {"rolling-back": "roll back", "complete": "finish"}.get(phase, "roll forward")
    return PendingCommit(data.get("id"), phase, next_step, files, temps, holder, in_progress)


# ---------------------------------------------------------------------------------------------
# Commit


@dataclass(frozen=True)
class _Target:
    write: StagedWrite
    link: Path
    real: Path
    exists: bool


def _resolve_targets(writes: Sequence[StagedWrite]) -> list[_Target]:
    targets = []
    seen: dict[Path, Path] = {}
    for w in writes:
        given = Path(os.path.abspath(w.target))
        link = given.parent.resolve() / given.name
        # A symlinked file is edited where it really lives (os.replace on the link itself would
        # replace the link by a regular file); the link stays as it is.
        real = link.resolve() if os.path.lexists(link) else link
        if real.is_dir():
            raise errors.CommitError(f"{w.target} is a directory, not a state file")
        if not real.parent.is_dir():
            raise errors.CommitError(f"the directory of {w.target} does not exist")
        if real in seen:
            raise errors.CommitError(f"{w.target} and {seen[real]} are the same file")
        seen[real] = Path(w.target)
        targets.append(_Target(w, link, real, real.exists()))
    return targets


def _choose_backup(
    ckpt: Path, t: _Target, commit_id: str, keep: bool, edited_before: set[str], taken: set[Path]
) -> Path | None:
    if not t.exists:
        return None
    bak = t.link.with_name(t.link.name + BAK_SUFFIX)
    if keep and _rel(ckpt, t.link) not in edited_before and not os.path.lexists(bak):
        # First edit ever of this file: NAME.bak holds its original bytes from now on.
        return bak
    folder = ckpt / STATE_DIR_NAME / BACKUPS_NAME / commit_id
    path = folder / t.link.name
    n = 1
    while path in taken:
        n += 1
        path = folder / f"{t.link.name}.{n}"
    taken.add(path)
    return path


def _new_temp(t: _Target, staged: list[Path]) -> Path:
    temp = _temp_path(t.real)
    # O_EXCL: a name collision (another process, a leftover) fails instead of sharing.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    staged.append(temp)
    return temp


def _stage_one(
    index: int,
    t: _Target,
    temp: Path,
    rendered: Mapping[Path, Path],
    tell: Callable[[str], None],
    abort: threading.Event | None = None,
) -> None:
    """Render, keep the mode, fsync and validate one temp file (in a worker thread or not)."""
    t.write.render(temp, rendered)
    mode = stat.S_IMODE(os.stat(t.real).st_mode) if t.exists else 0o644
    os.chmod(temp, mode)
    # Data durable before anything may point at it (journal, then the target name).
    _fsync_path(temp)
    failpoint(f"after-stage-{index}")
    tell("stage")
    if abort is not None and abort.is_set():
        return  # another file failed: the commit is off, validating this one is wasted work
    t.write.validate(temp)
    tell("validate")


def _stage_all(
    targets: Sequence[_Target], staged: list[Path], report: Progress
) -> list[Path]:
    """Stage and validate every target; the temps in target order.

    Independent writes run in parallel threads (kernel copies and fsyncs release the GIL);
    ``after_others`` writes follow in order once all of those are staged and validated.
    ``after-stage-N`` still names the N-th write, fired once that file's temp is durable.
    Progress is reported on the calling thread only, so callbacks need no locking, with
    per-phase counts that only grow. On any failure (including Ctrl-C in the calling thread),
    no worker is left running when this returns, so the caller can remove every temp in
    ``staged`` without a late render recreating one; the first error to happen is raised.
    """
    n = len(targets)
    temps: dict[int, Path] = {}
    counts = {"stage": 0, "validate": 0}

    def tick(phase: str) -> None:
        counts[phase] += 1
        report(phase, counts[phase], n)

    independent = [i for i, t in enumerate(targets) if not t.write.after_others]
    # Created up front on this thread: ``staged`` then holds every temp a worker may touch.
    for i in independent:
        temps[i] = _new_temp(targets[i], staged)
    if independent:
        # Workers only post events; this thread turns them into progress and errors.
        events: queue.Queue[tuple[str, BaseException | None]] = queue.Queue()
        abort = threading.Event()

        def work(i: int) -> None:
            error: BaseException | None = None
            try:
                if not abort.is_set():
                    _stage_one(i + 1, targets[i], temps[i], MappingProxyType({}),
                               lambda phase: events.put((phase, None)), abort)
            except BaseException as exc:  # handed to the calling thread, which raises it
                error = exc
                abort.set()
            finally:
                events.put(("done", error))

        first_error: BaseException | None = None
        pool = ThreadPoolExecutor(max_workers=min(len(independent), STAGING_THREADS),
                                  thread_name_prefix="fgc-stage")
        try:
            for i in independent:
                pool.submit(work, i)
            remaining = len(independent)
            while remaining:
                phase, error = events.get()
                if phase == "done":
                    remaining -= 1
                    if error is not None and first_error is None:
                        first_error = error
                elif first_error is None:
                    tick(phase)
        except BaseException:
            abort.set()  # workers not started yet stay idle; running ones finish their file
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if first_error is not None:
            raise first_error
    for i, t in enumerate(targets):
        if t.write.after_others:
            rendered = MappingProxyType({targets[j].write.target: temps[j] for j in sorted(temps)})
            temps[i] = _new_temp(t, staged)
            _stage_one(i + 1, t, temps[i], rendered, tick)
    return [temps[i] for i in range(n)]


def commit_atomically(
    checkpoint_dir: Path,
    writes: Sequence[StagedWrite],
    *,
    backup: bool = True,
    record: Mapping[str, Any] | None = None,
    wait: float = 0.0,
    progress: Progress | None = None,
    action: str = "modify",
) -> CommitResult:
    """Replace every ``writes[i].target`` by its rendered, validated new bytes, all or none.

    Raises :class:`errors.LockedError` (another editor; nothing touched),
    :class:`errors.ValidationError` / :class:`errors.CommitError` (nothing changed: every
    original is in place, no temp file, journal or lock note is left, directory times are as
    found). Exceptions that are not ours (bugs in a callback, KeyboardInterrupt) propagate after
    the same cleanup.
    """
    ckpt = _checkpoint_dir(checkpoint_dir)
    if not writes:
        raise errors.CommitError(f"nothing to commit in {ckpt}")
    targets = _resolve_targets(writes)
    lock = _locked(ckpt, wait, {t.real.parent for t in targets} | {t.link.parent for t in targets})
    try:
        failpoint("after-lock")
        recovered = _recover_locked(ckpt, lock)
        result = _commit_locked(ckpt, lock, targets, backup, record, progress, action)
        result = replace(result, recovered=recovered, stale_holder=lock.stale_holder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            lock.release()
        if isinstance(exc, OSError):
            raise errors.CommitError(f"editing {ckpt} failed: {_reason(exc)}") from exc
        raise
    try:
        lock.release()
    except OSError as exc:
        result = replace(result, warnings=(*result.warnings, f"unlocking: {_reason(exc)}"))
    return result


def _commit_locked(
    ckpt: Path,
    lock: CheckpointLock,
    targets: Sequence[_Target],
    keep_backups: bool,
    record: Mapping[str, Any] | None,
    progress: Progress | None,
    action: str,
) -> CommitResult:
    n = len(targets)
    report = progress or (lambda phase, done, total: None)
    staged: list[Path] = []  # every temp created so far: what a failure must remove
    entries: list[_Entry] = []
    commit_id = _new_commit_id()
    try:
        temps = _stage_all(targets, staged, report)
        failpoint("after-validate")
        history = read_history(ckpt)
        edited_before = {f.path for e in history for f in e.files}
        taken: set[Path] = set()
        for t, temp in zip(targets, temps):
            st = os.stat(temp)
            orig = os.stat(t.real) if t.exists else None
            entries.append(
                _Entry(
                    target=t.real,
                    link=t.link,
                    temp=temp,
                    backup=_choose_backup(ckpt, t, commit_id, keep_backups, edited_before, taken),
                    keep_backup=keep_backups,
                    orig=(orig.st_dev, orig.st_ino) if orig else None,
                    temp_id=(st.st_dev, st.st_ino),
                    mode=stat.S_IMODE(st.st_mode),
                    old=_quick_digest(t.real) if t.exists else None,
                    new=_quick_digest(temp),
                )
            )
        # The journal names the temps: their directory entries must be durable first.
        _fsync_dirs(t.real.parent for t in targets)
    except BaseException as exc:
        _discard(staged)
        if isinstance(exc, OSError):
            raise errors.CommitError(
                f"could not prepare the new files in {ckpt}: {_reason(exc)}; nothing was changed"
            ) from exc
        raise

    history_path = _history_path(ckpt)
    journal: dict[str, Any] = {
        "version": 1,
        "id": commit_id,
        "pid": os.getpid(),
        "created": _now(),
        "state_dir_existed": (ckpt / STATE_DIR_NAME).is_dir(),
        "history_size_before": history_path.stat().st_size if history_path.exists() else None,
        "dir_times": {k: list(v) for k, v in lock.dir_times.items()},
        "history_entry": {
            "id": commit_id,
            "time": _now(),
            "user": current_user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "action": action,
            "record": dict(record or {}),
        },
        "entries": [_entry_to_json(ckpt, e) for e in entries],
    }
    try:
        jpath = _write_journal(ckpt, journal)
    except BaseException as exc:
        # A journal that got renamed into place but not synced names temps we now delete:
        # remove it first so no crash in between can ask for a roll-forward.
        _discard([ckpt / JOURNAL_NAME])
        _discard(staged)
        if isinstance(exc, OSError):
            raise errors.CommitError(
                f"could not write the commit journal in {ckpt}: {_reason(exc)}; nothing was changed"
            ) from exc
        raise

    completed = False
    try:
        failpoint("after-journal")
        # Every original is kept before any is replaced, so an undo never lacks one.
        for i, e in enumerate(entries, 1):
            if e.backup is not None:
                _keep_original(e)
            failpoint(f"after-backup-{i}")
        _fsync_dirs(_backup_dirs(ckpt, entries))
        for i, e in enumerate(entries, 1):
            os.replace(e.temp, e.target)
            failpoint(f"after-replace-{i}")
            report("replace", i, n)
        # The new names must be durable before history claims the commit happened.
        _fsync_dirs(e.target.parent for e in entries)
        failpoint("before-history")
        entry_json = _history_entry_json(ckpt, journal)
        _append_history(ckpt, entry_json, journal["history_size_before"])
        failpoint("before-journal-complete")
        jpath = _mark_complete(ckpt, jpath)
        completed = True
    except BaseException as exc:
        try:
            current = _find_journal(ckpt)
            if current is not None and current[1] == "complete":
                completed = True
            else:
                _roll_back(ckpt, journal, current[0] if current else jpath)
        except BaseException as undo_exc:
            raise errors.CommitError(
                f"committing {ckpt} failed ({_reason(exc)}) and undoing it failed too "
                f"({_reason(undo_exc)}); run 'forgather checkpoint recover {ckpt}' to finish "
                "or undo it (it is safe to repeat)"
            ) from exc
        if not completed:
            if isinstance(exc, OSError):
                raise errors.CommitError(
                    f"committing {ckpt} failed: {_reason(exc)}; every file was put back, "
                    "nothing was changed"
                ) from exc
            raise
        entry_json = _history_entry_json(ckpt, journal)
        jpath = ckpt / JOURNAL_COMPLETE_NAME

    warnings: list[str] = []
    failpoint("after-journal-complete")
    try:
        _finish(ckpt, journal, jpath)
    except OSError as exc:
        # The commit stands; the next command (or `recover`) finishes this cleanup.
        warnings.append(f"cleanup after the commit is incomplete: {_reason(exc)}")
    entry = HistoryEntry.from_json(entry_json)
    backups = tuple(
        BackupRecord(e.link, _abs(ckpt, f.backup), f.backup_method or "copy")
        for e, f in zip(entries, entry.files)
        if f.backup is not None
    )
    return CommitResult(
        commit_id=commit_id,
        files=tuple(e.link for e in entries),
        backups=backups,
        history_entry=entry,
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------------
# Restore


def plan_restore(
    checkpoint_dir: Path, to: str | None = None, original: bool = False
) -> RestorePlan:
    """Which files go back to which bytes.

    ``original``: every edited file back to its bytes before the first recorded edit.
    ``to=ID``: every file back to its bytes right after history entry ID (an unambiguous
    prefix of the id is accepted). Neither: undo the last entry.
    """
    ckpt = _checkpoint_dir(checkpoint_dir)
    entries = read_history(ckpt)
    if original and to:
        raise errors.HistoryError("give either an entry id or 'original', not both")
    if not entries:
        raise errors.HistoryError(f"{ckpt} has no edit history; there is nothing to restore")
    if original:
        start, description = 0, "the original files (before the first recorded edit)"
    elif to:
        matches = [i for i, e in enumerate(entries) if e.id == to] or [
            i for i, e in enumerate(entries) if e.id.startswith(to)
        ]
        if len(matches) != 1:
            known = ", ".join(e.id for e in entries[-5:])
            what = "matches several entries" if matches else "is not in the history"
            raise errors.HistoryError(
                f"{to!r} {what} of {ckpt} (latest: {known}); see 'forgather checkpoint history'"
            )
        start = matches[0] + 1
        if start == len(entries):
            raise errors.HistoryError(
                f"{entries[-1].id} is the latest entry: the files are already in that state"
            )
        description = f"the state right after {entries[start - 1].id}"
    else:
        start = len(entries) - 1
        description = f"the state before {entries[-1].id} (undo the last entry)"
    items: dict[str, RestoreItem] = {}
    for e in entries[start:]:
        for f in e.files:
            if f.path in items:
                continue  # an earlier entry's backup is the older state: it wins
            if f.backup is None:
                raise errors.HistoryError(
                    f"{f.path} was changed by {e.id} without a backup (--no-backup), so its "
                    "earlier bytes were not kept; cannot restore past that entry"
                )
            source = _abs(ckpt, f.backup)
            if not source.is_file():
                raise errors.HistoryError(
                    f"the backup {source} of {f.path} (entry {e.id}) is missing; nothing changed"
                )
            items[f.path] = RestoreItem(_abs(ckpt, f.path), source, e.id)
    return RestorePlan(ckpt, description, to, original, tuple(items.values()))


def restore(
    checkpoint_dir: Path,
    plan: RestorePlan,
    *,
    backup: bool = True,
    wait: float = 0.0,
    progress: Progress | None = None,
) -> CommitResult:
    """Carry out a :class:`RestorePlan` as one transaction, itself recorded in the history (so
    a restore can be undone too). Backups are copied from, never moved or deleted."""

    def writer(item: RestoreItem) -> StagedWrite:
        def render(temp: Path, _rendered: Mapping[Path, Path]) -> None:
            shutil.copyfile(item.source, temp)

        def validate(temp: Path) -> None:
            if not filecmp.cmp(item.source, temp, shallow=False):
                raise errors.ValidationError(
                    f"the restored copy of {item.target} differs from {item.source}"
                )

        return StagedWrite(item.target, render, validate)

    if not plan.items:
        raise errors.HistoryError(f"nothing to restore in {plan.checkpoint_dir}")
    ckpt = Path(plan.checkpoint_dir)
    record = {
        "component": "restore",
        "to": plan.to,
        "original": plan.original,
        "text": f"restored {len(plan.items)} file(s) to {plan.description}",
        "changes": [
            {"file": _rel(ckpt, i.target), "from_backup": _rel(ckpt, i.source), "entry": i.entry_id}
            for i in plan.items
        ],
    }
    return commit_atomically(
        ckpt,
        [writer(item) for item in plan.items],
        backup=backup,
        record=record,
        wait=wait,
        progress=progress,
        action="restore",
    )


# ---------------------------------------------------------------------------------------------
# The spec's programmatic API


def save_checkpoint_atomically(
    path: Path, state_dict: Mapping[str, Any], backup: bool = True, *, wait: float = 0.0
) -> CommitResult:
    """``torch.save`` ``state_dict`` to ``path`` through the same transaction as ``modify``:
    staged, verified by ``torch.load(weights_only=True)`` and compared, backed up, replaced."""
    import torch  # deferred: importing the writer must stay cheap and torch-free

    from .stateformat import first_difference

    path = Path(path)

    def render(temp: Path, _rendered: Mapping[Path, Path]) -> None:
        torch.save(state_dict, temp)

    def validate(temp: Path) -> None:
        try:
            loaded = torch.load(temp, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means the file is not what we meant
            raise errors.ValidationError(
                f"the new {path.name} does not load with torch.load(weights_only=True): {exc}"
            ) from exc
        where = first_difference(state_dict, loaded)
        if where is not None:
            raise errors.ValidationError(
                f"the new {path.name} does not read back as the state that was saved "
                f"(first difference at {where})"
            )

    return commit_atomically(
        path.parent,
        [StagedWrite(path, render, validate)],
        backup=backup,
        record={"component": path.name, "text": f"saved {path.name}"},
        wait=wait,
        action="save",
    )
