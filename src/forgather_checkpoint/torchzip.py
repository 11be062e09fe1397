"""Reading and rewriting the PyTorch zip container without touching tensor bytes.

``torch.save`` writes a zip archive (always ``ZIP_STORED``) whose first record is
``<prefix>/data.pkl`` (the object tree), followed by one record per storage (``data/0``, ...)
and a few small ones (``version``, ``byteorder``, ``.data/serialization_id``). Every record's
data starts on a 64-byte boundary (padding goes into an ``FB`` extra field of the local
header) so that ``torch.load(mmap=True)`` can map tensors in place.

A rewrite replaces the ``data.pkl`` record and copies every other record, local header and
data descriptor included, byte for byte with kernel-side copying. A caller may also patch a
few storage records with new bytes of the same length (an edited 0-d tensor): only their
data and CRC fields change, so no offset moves. The padding of the new
``data.pkl`` header is chosen so everything after it moves by a multiple of the alignment;
later records therefore keep their alignment and their headers need no change. Only the
central directory (offsets) and the end records are written anew.

Memory stays bounded: tensor bytes are never read into Python except in fixed-size chunks
by the last-resort copy fallback.
"""

from __future__ import annotations

import errno
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import pickle_codec
from .errors import StateFileError, ValidationError

__all__ = [
    "ArchiveLayout",
    "CorruptArchiveError",
    "LegacyFormatError",
    "NotAZipError",
    "RewriteReport",
    "TorchZipError",
    "UnsupportedArchiveError",
    "ZipRecord",
    "open_archive",
    "read_pickle_bytes",
    "read_record_ranges",
    "record_named",
    "rewrite",
    "verify_rewrite",
]


class TorchZipError(StateFileError):
    """The file is not a PyTorch zip archive this module can read or rewrite."""


class NotAZipError(TorchZipError):
    """The file is empty or not a zip archive at all."""


class LegacyFormatError(NotAZipError):
    """The file is a legacy (pre-1.6, non-zip) torch file; use the torch fallback."""


class CorruptArchiveError(TorchZipError):
    """The archive is truncated or its structures/CRCs are inconsistent."""


class UnsupportedArchiveError(TorchZipError):
    """A valid zip this engine cannot handle (encryption, multi-disk, unknown compression)."""


_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_DESCRIPTOR_SIG = b"PK\x07\x08"

_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes

_ZIP64_TAG = 0x0001
_PADDING_TAG = 0x4246  # "FB": the tag torch's writer uses for its alignment padding
_FLAG_ENCRYPTED = 0x0001
_FLAG_DESCRIPTOR = 0x0008
_STORED, _DEFLATED = 0, 8

# Values at or above this go into zip64 fields. A module constant so tests can lower it and
# exercise the zip64 paths without writing 4 GiB.
ZIP64_LIMIT = 0xFFFFFFFF
_ZIP64_COUNT_LIMIT = 0xFFFF

DEFAULT_ALIGNMENT = 64  # torch's storage alignment for mmap loading
_MAX_PICKLE_BYTES = 1 << 31  # refuse absurd pickle records instead of reading them
_COPY_CHUNK = 1 << 30  # per copy_file_range/sendfile call
_BUFFER_CHUNK = 8 << 20  # bounded buffer of the last-resort fallback
# Copied records move by a multiple of this, so source and destination offsets agree modulo
# the page (and filesystem block) size: the kernel then copies whole pages (an offset that
# differs makes every page straddle two, ~25% slower on ext4), and copy-on-write filesystems
# (XFS, btrfs) can share whole blocks (reflink) instead of copying them at all.
_COPY_ALIGNMENT = 4096


@dataclass(frozen=True)
class ZipRecord:
    """One archive member, as its central directory entry and local header describe it."""

    name: str
    raw_name: bytes
    header_offset: int  # local header
    data_offset: int  # first byte of the (compressed) data
    span_end: int  # end of the record: data + data descriptor (= next record's header)
    compressed_size: int
    uncompressed_size: int
    crc32: int
    method: int
    flags: int
    # central-directory fields re-emitted unchanged on rewrite
    version_made_by: int
    version_needed: int
    mod_time: int
    mod_date: int
    central_extra: bytes  # without the zip64 field, which is rebuilt
    comment: bytes
    internal_attr: int
    external_attr: int


@dataclass(frozen=True)
class ArchiveLayout:
    """Where everything is in a PyTorch zip file."""

    path: Path
    file_size: int
    records: tuple[ZipRecord, ...]  # central directory order
    pickle_index: int  # index of ``<prefix>/data.pkl`` in ``records``
    prefix: str
    cd_offset: int
    cd_size: int
    had_zip64_end: bool  # torch always writes zip64 end records; keep whatever we found
    zip64_version_made_by: int
    zip64_version_needed: int
    archive_comment: bytes
    alignment: int

    @property
    def pickle_record(self) -> ZipRecord:
        return self.records[self.pickle_index]

    @property
    def pickle_compressed(self) -> bool:
        """True when ``data.pkl`` is not ``ZIP_STORED`` (torch never does that itself)."""
        return self.pickle_record.method != _STORED


@dataclass(frozen=True)
class RewriteReport:
    """What a rewrite did."""

    size: int  # bytes of the new file
    shift: int  # how far every record after data.pkl moved (a multiple of the alignment)
    copied_bytes: int
    copy_method: str  # "copy_file_range", "sendfile" or "buffered"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise CorruptArchiveError(f"truncated archive: {what} at byte {offset} is incomplete")
    return data


def _parse_extra(extra: bytes) -> list[tuple[int, bytes]]:
    fields = []
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        fields.append((tag, extra[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return fields


def _join_extra(fields: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("<HH", tag, len(body)) + body for tag, body in fields)


def _looks_like_legacy_torch(head: bytes) -> bool:
    # Legacy torch.save output is a bare pickle stream (PROTO opcode first); very old files
    # are tar archives ("ustar" at offset 257).
    return head[:1] == b"\x80" or head[257:262] == b"ustar"


def _find_eocd(fd: int, file_size: int) -> tuple[int, bytes]:
    # The end record is 22 bytes plus a comment of up to 65535 bytes at the very end.
    tail_size = min(file_size, _EOCD.size + 0xFFFF)
    tail = _pread_exact(fd, tail_size, file_size - tail_size, "end of central directory")
    pos = tail.rfind(_EOCD_SIG)
    while pos >= 0:
        if pos + _EOCD.size <= len(tail):
            comment_len = struct.unpack_from("<H", tail, pos + 20)[0]
            if pos + _EOCD.size + comment_len == len(tail):
                return file_size - tail_size + pos, tail[pos:]
        pos = tail.rfind(_EOCD_SIG, 0, pos)
    raise CorruptArchiveError("not a complete zip archive: end of central directory not found "
                              "(truncated or not a zip file)")


def open_archive(path: Path | str) -> ArchiveLayout:
    """Read the directory of a PyTorch zip file (nothing but headers is read)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _open_fd(path, fd)
    finally:
        os.close(fd)


def _open_fd(path: Path, fd: int) -> ArchiveLayout:
    file_size = os.fstat(fd).st_size
    if file_size == 0:
        raise NotAZipError("empty file")
    head = os.pread(fd, 512, 0)
    if head[:4] != _LOCAL_SIG:
        if _looks_like_legacy_torch(head):
            raise LegacyFormatError("legacy (non-zip) torch file")
        if head[:4] in (_EOCD_SIG, _CENTRAL_SIG):
            raise NotAZipError("zip archive without members")
        raise NotAZipError("not a PyTorch checkpoint (no zip or pickle signature)")

    eocd_offset, eocd = _find_eocd(fd, file_size)
    (_, disk, cd_disk, _, total, cd_size, cd_offset, comment_len) = _EOCD.unpack_from(eocd)
    archive_comment = eocd[_EOCD.size:_EOCD.size + comment_len]
    had_zip64 = False
    z64_made = z64_needed = 45
    locator_offset = eocd_offset - _ZIP64_LOCATOR.size
    if locator_offset >= 0:
        locator = _pread_exact(fd, _ZIP64_LOCATOR.size, locator_offset, "zip64 locator")
        if locator[:4] == _ZIP64_LOCATOR_SIG:
            _, _, z64_offset, _ = _ZIP64_LOCATOR.unpack(locator)
            if z64_offset + _ZIP64_EOCD.size > locator_offset:
                raise CorruptArchiveError("zip64 end record points past the file")
            record = _pread_exact(fd, _ZIP64_EOCD.size, z64_offset, "zip64 end record")
            (sig, _, z64_made, z64_needed, disk, cd_disk, _, total, cd_size,
             cd_offset) = _ZIP64_EOCD.unpack(record)
            if sig != _ZIP64_EOCD_SIG:
                raise CorruptArchiveError("zip64 end record signature is wrong")
            had_zip64 = True
    if disk != 0 or cd_disk != 0:
        raise UnsupportedArchiveError("multi-disk zip archives are not supported")
    if cd_offset + cd_size > eocd_offset or total == 0:
        raise CorruptArchiveError("central directory lies outside the file (truncated?)")

    directory = _pread_exact(fd, cd_size, cd_offset, "central directory")
    raw_entries = []
    pos = 0
    for _ in range(total):
        if directory[pos:pos + 4] != _CENTRAL_SIG:
            raise CorruptArchiveError(f"central directory entry at byte {cd_offset + pos} "
                                      "is damaged")
        (_, made_by, needed, flags, method, mtime, mdate, crc, csize, usize, name_len,
         extra_len, comment_len, disk_start, internal, external,
         offset) = _CENTRAL.unpack_from(directory, pos)
        pos += _CENTRAL.size
        raw_name = directory[pos:pos + name_len]
        extra = directory[pos + name_len:pos + name_len + extra_len]
        comment = directory[pos + name_len + extra_len:pos + name_len + extra_len + comment_len]
        pos += name_len + extra_len + comment_len
        if pos > len(directory):
            raise CorruptArchiveError("central directory is truncated")
        # zip64 extra: only the fields whose 32-bit slot holds 0xFFFFFFFF, in fixed order
        fields = _parse_extra(extra)
        for tag, body in fields:
            if tag == _ZIP64_TAG:
                values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
                if usize == 0xFFFFFFFF and values:
                    usize = values.pop(0)
                if csize == 0xFFFFFFFF and values:
                    csize = values.pop(0)
                if offset == 0xFFFFFFFF and values:
                    offset = values.pop(0)
        if flags & _FLAG_ENCRYPTED:
            raise UnsupportedArchiveError("encrypted zip members are not supported")
        if method not in (_STORED, _DEFLATED):
            raise UnsupportedArchiveError(f"zip compression method {method} is not supported")
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        kept_extra = _join_extra([(t, b) for t, b in fields if t != _ZIP64_TAG])
        raw_entries.append((name, raw_name, offset, csize, usize, crc, method, flags, made_by,
                            needed, mtime, mdate, kept_extra, comment, internal, external))

    # Each record spans from its local header to the next header (or the directory).
    starts = sorted({entry[2] for entry in raw_entries})
    if len(starts) != len(raw_entries):
        raise CorruptArchiveError("two directory entries share one local header")
    next_start = {start: (starts[i + 1] if i + 1 < len(starts) else cd_offset)
                  for i, start in enumerate(starts)}
    records = []
    for (name, raw_name, offset, csize, usize, crc, method, flags, made_by, needed, mtime,
         mdate, kept_extra, comment, internal, external) in raw_entries:
        header = _pread_exact(fd, _LOCAL.size, offset, f"local header of {name}")
        (sig, _, _, _, _, _, _, _, _, name_len, extra_len) = _LOCAL.unpack(header)
        if sig != _LOCAL_SIG:
            raise CorruptArchiveError(f"local header of {name} is damaged")
        local_name = _pread_exact(fd, name_len, offset + _LOCAL.size, f"name of {name}")
        if local_name != raw_name:
            raise CorruptArchiveError(f"local header name {local_name!r} does not match {name}")
        data_offset = offset + _LOCAL.size + name_len + extra_len
        span_end = next_start[offset]
        if data_offset + csize > span_end:
            raise CorruptArchiveError(f"record {name} overlaps the next one (truncated?)")
        records.append(ZipRecord(name, raw_name, offset, data_offset, span_end, csize, usize,
                                 crc, method, flags, made_by, needed, mtime, mdate, kept_extra,
                                 comment, internal, external))

    prefix, pickle_index = _find_pickle_record(records)
    alignment = _read_alignment(fd, records, prefix)
    return ArchiveLayout(path, file_size, tuple(records), pickle_index, prefix, cd_offset,
                         cd_size, had_zip64, z64_made, z64_needed, archive_comment, alignment)


def _find_pickle_record(records: list[ZipRecord]) -> tuple[str, int]:
    # torch.load takes the archive folder from the first member's name; data.pkl is in it.
    first = records[0].name
    prefix = first.split("/", 1)[0] if "/" in first else ""
    wanted = f"{prefix}/data.pkl" if prefix else "data.pkl"
    for index, record in enumerate(records):
        if record.name == wanted:
            return prefix, index
    candidates = [i for i, r in enumerate(records) if r.name.endswith("/data.pkl")
                  and r.name.count("/") == 1]
    if len(candidates) == 1:
        index = candidates[0]
        return records[index].name.split("/", 1)[0], index
    raise NotAZipError("zip archive without a data.pkl record: not a torch.save file")


def _read_alignment(fd: int, records: list[ZipRecord], prefix: str) -> int:
    # torch >= 2.5 records its alignment in ``.storage_alignment``; older files used 64 too.
    for record in records:
        if record.name == f"{prefix}/.storage_alignment" and record.method == _STORED \
                and 0 < record.compressed_size <= 16:
            raw = os.pread(fd, record.compressed_size, record.data_offset)
            try:
                value = int(raw.decode("ascii"))
            except ValueError:
                break
            if 0 < value <= 4096:
                return math.lcm(value, DEFAULT_ALIGNMENT)
    return DEFAULT_ALIGNMENT


def read_pickle_bytes(layout: ArchiveLayout) -> bytes:
    """The ``data.pkl`` bytes, CRC-checked (inflated when the record is compressed)."""
    record = layout.pickle_record
    if record.compressed_size > _MAX_PICKLE_BYTES or record.uncompressed_size > _MAX_PICKLE_BYTES:
        raise UnsupportedArchiveError(f"{record.name} is implausibly large "
                                      f"({record.uncompressed_size} bytes)")
    fd = os.open(layout.path, os.O_RDONLY)
    try:
        raw = _pread_exact(fd, record.compressed_size, record.data_offset, record.name)
    finally:
        os.close(fd)
    if record.method == _DEFLATED:
        try:
            raw = zlib.decompress(raw, -15)
        except zlib.error as exc:
            raise CorruptArchiveError(f"{record.name} does not inflate: {exc}") from None
    if len(raw) != record.uncompressed_size:
        raise CorruptArchiveError(f"{record.name} has {len(raw)} bytes, the directory says "
                                  f"{record.uncompressed_size}")
    crc = zlib.crc32(raw)
    if crc != record.crc32:
        raise CorruptArchiveError(f"CRC mismatch in {record.name} (stored {record.crc32:08x}, "
                                  f"computed {crc:08x}): the file is corrupted")
    return raw


def record_named(layout: ArchiveLayout, name: str) -> ZipRecord | None:
    """The member called ``name`` (full name, prefix included), or None."""
    for record in layout.records:
        if record.name == name:
            return record
    return None


def read_record_ranges(layout: ArchiveLayout,
                       ranges: Sequence[tuple[ZipRecord, int, int]]) -> list[bytes]:
    """``(record, start, size)`` byte ranges of stored (uncompressed) records, in one open.

    Used for small reads only (a 0-d tensor's element, the ``byteorder`` record); no CRC
    check, which would need the whole record.
    """
    fd = os.open(layout.path, os.O_RDONLY)
    try:
        chunks = []
        for record, start, size in ranges:
            if record.method != _STORED:
                raise UnsupportedArchiveError(f"{record.name} is compressed")
            if start < 0 or size < 0 or start + size > record.compressed_size:
                raise CorruptArchiveError(f"{record.name} has no bytes {start}..{start + size}")
            chunks.append(_pread_exact(fd, size, record.data_offset + start, record.name))
        return chunks
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _Copier:
    """Copies byte ranges between descriptors kernel-side, degrading only when it must."""

    def __init__(self) -> None:
        self.method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
        self.copied = 0

    def copy(self, src: int, dst: int, offset: int, length: int) -> None:
        end = offset + length
        # Up to the next block boundary on its own: a reflink needs block-aligned offsets, and
        # the kernel falls back to copying a whole call's range when the start is unaligned.
        head = min(-offset % _COPY_ALIGNMENT, length)
        while offset < end:
            count = min(end - offset, _COPY_CHUNK, head or _COPY_CHUNK)
            head = 0
            done = self._copy_some(src, dst, offset, count)
            if done <= 0:
                raise CorruptArchiveError(f"source ended at byte {offset} while copying")
            offset += done
            self.copied += done

    def _copy_some(self, src: int, dst: int, offset: int, count: int) -> int:
        if self.method == "copy_file_range":
            try:
                return os.copy_file_range(src, dst, count, offset)
            except OSError as exc:
                # Cross-filesystem or unsupported: fall back for the rest of this file.
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                     errno.EBADF, errno.EPERM):
                    raise
                self.method = "sendfile"
        if self.method == "sendfile":
            try:
                return os.sendfile(dst, src, offset, count)
            except (OSError, AttributeError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (
                        errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.method = "buffered"
        chunk = os.pread(src, min(count, _BUFFER_CHUNK), offset)
        view = memoryview(chunk)
        while view:
            written = os.write(dst, view)
            view = view[written:]
        return len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _padding_field(size: int) -> tuple[int, bytes]:
    # An "FB" extra field of exactly ``size`` bytes including its 4-byte header.
    return _PADDING_TAG, b"Z" * (size - 4)


def _build_pickle_record(old: ZipRecord, src_fd: int, new_pickle: bytes,
                         alignment: int) -> bytes:
    """Local header + data (+ descriptor) for the new data.pkl, padded so that its total
    length is congruent to the old record's span modulo ``alignment``."""
    header = _pread_exact(src_fd, _LOCAL.size, old.header_offset, "local header")
    (_, needed, flags, _, mtime, mdate, _, _, _, name_len, extra_len) = _LOCAL.unpack(header)
    old_extra = _pread_exact(src_fd, extra_len, old.header_offset + _LOCAL.size + name_len,
                             "local extra") if extra_len else b""
    kept = [(t, b) for t, b in _parse_extra(old_extra) if t not in (_ZIP64_TAG, _PADDING_TAG)]
    crc = zlib.crc32(new_pickle)
    size = len(new_pickle)
    zip64 = size >= ZIP64_LIMIT
    uses_descriptor = bool(flags & _FLAG_DESCRIPTOR)
    descriptor = b""
    if uses_descriptor:
        # Keep the old descriptor's shape (with or without signature); sizes are 8 bytes each
        # when the record is zip64. The local header then carries zeros.
        signed = os.pread(src_fd, 4, old.data_offset + old.compressed_size) == _DESCRIPTOR_SIG
        sizes = struct.pack("<QQ", size, size) if zip64 else struct.pack("<II", size, size)
        descriptor = (_DESCRIPTOR_SIG if signed else b"") + struct.pack("<I", crc) + sizes
        header_crc, header_size, z64_sizes = 0, 0, (0, 0)
    else:
        header_crc, header_size, z64_sizes = crc, size, (size, size)
    if zip64:
        kept.insert(0, (_ZIP64_TAG, struct.pack("<QQ", *z64_sizes)))
        header_size = 0xFFFFFFFF
        needed = max(needed, 45)
    base = _LOCAL.size + len(old.raw_name) + len(_join_extra(kept)) + size + len(descriptor)
    old_span = old.span_end - old.header_offset
    pad = (old_span - base) % alignment
    if 0 < pad < 4:  # an extra field needs at least its 4-byte header
        pad += alignment
    fields = kept + ([_padding_field(pad)] if pad else [])
    extra = _join_extra(fields)
    if len(extra) > 0xFFFF:
        raise UnsupportedArchiveError("alignment padding does not fit a zip extra field")
    local = _LOCAL.pack(_LOCAL_SIG, needed, flags & ~0x0006, _STORED, mtime, mdate, header_crc,
                        header_size, header_size, len(old.raw_name), len(extra))
    return local + old.raw_name + extra + new_pickle + descriptor


def _build_patched_record(record: ZipRecord, src_fd: int, data: bytes) -> bytes:
    """The whole span of a patched record: its header, the new data, its descriptor."""
    header = _pread_exact(src_fd, record.data_offset - record.header_offset,
                          record.header_offset, f"local header of {record.name}")
    data_end = record.data_offset + record.compressed_size
    tail = _pread_exact(src_fd, record.span_end - data_end, data_end,
                        f"data descriptor of {record.name}")
    header, tail = _patched_frame(record, header, tail, zlib.crc32(data))
    return header + data + tail


def _central_entry(record: ZipRecord, offset: int) -> bytes:
    zip64_values = []
    usize, csize, local_offset = record.uncompressed_size, record.compressed_size, offset
    if usize >= ZIP64_LIMIT:
        zip64_values.append(usize)
        usize = 0xFFFFFFFF
    if csize >= ZIP64_LIMIT:
        zip64_values.append(csize)
        csize = 0xFFFFFFFF
    if local_offset >= ZIP64_LIMIT:
        zip64_values.append(local_offset)
        local_offset = 0xFFFFFFFF
    extra = record.central_extra
    needed = record.version_needed
    if zip64_values:
        extra = _join_extra([(_ZIP64_TAG, struct.pack(f"<{len(zip64_values)}Q", *zip64_values))]
                            ) + extra
        needed = max(needed, 45)
    return _CENTRAL.pack(_CENTRAL_SIG, record.version_made_by, needed, record.flags,
                         record.method, record.mod_time, record.mod_date, record.crc32, csize,
                         usize, len(record.raw_name), len(extra), len(record.comment), 0,
                         record.internal_attr, record.external_attr,
                         local_offset) + record.raw_name + extra + record.comment


def _end_records(layout: ArchiveLayout, count: int, cd_offset: int, cd_size: int) -> bytes:
    needs_zip64 = (count >= _ZIP64_COUNT_LIMIT or cd_offset >= ZIP64_LIMIT
                   or cd_size >= ZIP64_LIMIT)
    out = b""
    if needs_zip64 or layout.had_zip64_end:
        z64_offset = cd_offset + cd_size
        out += _ZIP64_EOCD.pack(_ZIP64_EOCD_SIG, _ZIP64_EOCD.size - 12,
                                layout.zip64_version_made_by, layout.zip64_version_needed, 0, 0,
                                count, count, cd_size, cd_offset)
        out += _ZIP64_LOCATOR.pack(_ZIP64_LOCATOR_SIG, 0, z64_offset, 1)
    out += _EOCD.pack(_EOCD_SIG, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                      min(cd_size, 0xFFFFFFFF), min(cd_offset, 0xFFFFFFFF),
                      len(layout.archive_comment)) + layout.archive_comment
    return out


def _check_patches(layout: ArchiveLayout, patches: Mapping[str, bytes]) -> None:
    for name, data in patches.items():
        record = record_named(layout, name)
        if record is None:
            raise TorchZipError(f"no record {name} to patch")
        if record is layout.pickle_record:
            raise TorchZipError(f"{name} is the pickle record; it is replaced, not patched")
        if record.method != _STORED:
            raise UnsupportedArchiveError(f"{name} is compressed and cannot be patched in place")
        if len(data) != record.compressed_size:
            raise TorchZipError(f"patch for {name} has {len(data)} bytes, the record "
                                f"{record.compressed_size}; a patch must keep the size")


def _patched_frame(record: ZipRecord, header: bytes, tail: bytes,
                   new_crc: int) -> tuple[bytes, bytes]:
    """The local header and the bytes after the data (descriptor) with ``new_crc`` in place
    of the record's CRC wherever the original carried it."""
    old_crc = struct.pack("<I", record.crc32)
    crc = struct.pack("<I", new_crc)
    # The local header's CRC field (byte 14) holds the CRC unless a data descriptor carries
    # it (then the field is zero, as torch's writer leaves it).
    if header[14:18] == old_crc:
        header = header[:14] + crc + header[18:]
    elif header[14:18] != b"\0\0\0\0" or not record.flags & _FLAG_DESCRIPTOR:
        raise CorruptArchiveError(f"local header of {record.name} has a CRC that matches "
                                  "neither the directory nor a data descriptor")
    if record.flags & _FLAG_DESCRIPTOR:
        at = 4 if tail[:4] == _DESCRIPTOR_SIG else 0
        if tail[at:at + 4] != old_crc:
            raise CorruptArchiveError(f"data descriptor of {record.name} does not match the "
                                      "directory's CRC")
        tail = tail[:at] + crc + tail[at + 4:]
    return header, tail


def rewrite(layout: ArchiveLayout, destination: Path | str | int,
            new_pickle: bytes, patches: Mapping[str, bytes] | None = None) -> RewriteReport:
    """Write ``layout``'s archive with ``new_pickle`` as data.pkl to ``destination``.

    ``patches`` maps record names (``archive/data/3``) to their new data, each exactly as long
    as the record's: that data is written in place of the original and its CRC is updated in
    the local header, data descriptor and directory; nothing moves.

    ``destination`` is a path (created or truncated) or an open, writable descriptor (it is
    truncated and written from offset 0, and left open). No fsync: committing is the caller's.
    """
    patches = dict(patches or {})
    _check_patches(layout, patches)
    if isinstance(destination, int):
        dst_fd, owned = destination, False
        os.ftruncate(dst_fd, 0)
        os.lseek(dst_fd, 0, os.SEEK_SET)
    else:
        dst_fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        owned = True
    src_fd = os.open(layout.path, os.O_RDONLY)
    try:
        if os.fstat(src_fd).st_size != layout.file_size:
            raise CorruptArchiveError(f"{layout.path} changed size since it was read")
        return _rewrite_fds(layout, src_fd, dst_fd, new_pickle, patches)
    finally:
        os.close(src_fd)
        if owned:
            os.close(dst_fd)


def _rewrite_fds(layout: ArchiveLayout, src_fd: int, dst_fd: int,
                 new_pickle: bytes, patches: Mapping[str, bytes]) -> RewriteReport:
    copier = _Copier()
    pickle_record = layout.pickle_record
    by_offset = sorted(layout.records, key=lambda r: r.header_offset)
    position = 0
    first = by_offset[0].header_offset
    if first:  # bytes before the first member (a self-extractor stub): keep them
        copier.copy(src_fd, dst_fd, 0, first)
        position = first
    new_offsets: dict[int, int] = {}
    shift = 0
    # Consecutive copied records form one contiguous source range: copy it in one call
    # (fewer syscalls, and lets the filesystem share/copy whole extents).
    run_start, run_length = 0, 0
    for record in by_offset:
        new_offsets[record.header_offset] = position
        if record is pickle_record:
            if run_length:
                copier.copy(src_fd, dst_fd, run_start, run_length)
                run_length = 0
            block = _build_pickle_record(record, src_fd, new_pickle,
                                         math.lcm(layout.alignment, _COPY_ALIGNMENT))
            _write_all(dst_fd, block)
            shift = len(block) - (record.span_end - record.header_offset)
            position += len(block)
        elif record.name in patches:
            if run_length:
                copier.copy(src_fd, dst_fd, run_start, run_length)
                run_length = 0
            block = _build_patched_record(record, src_fd, patches[record.name])
            _write_all(dst_fd, block)
            position += len(block)
        else:
            length = record.span_end - record.header_offset
            if not run_length:
                run_start = record.header_offset
            run_length += length
            position += length
    if run_length:
        copier.copy(src_fd, dst_fd, run_start, run_length)
    assert shift % layout.alignment == 0, "padding must keep later records aligned"

    new_pickle_record = replace(pickle_record, method=_STORED, crc32=zlib.crc32(new_pickle),
                                compressed_size=len(new_pickle),
                                uncompressed_size=len(new_pickle),
                                flags=pickle_record.flags & ~0x0006)
    cd_offset = position
    directory = bytearray()
    for record in layout.records:
        current = new_pickle_record if record is pickle_record else record
        if record.name in patches:
            current = replace(record, crc32=zlib.crc32(patches[record.name]))
        directory += _central_entry(current, new_offsets[record.header_offset])
    _write_all(dst_fd, bytes(directory))
    end = _end_records(layout, len(layout.records), cd_offset, len(directory))
    _write_all(dst_fd, end)
    size = cd_offset + len(directory) + len(end)
    return RewriteReport(size, shift, copier.copied, copier.method)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

_NOTHING: Any = object()


def verify_rewrite(written: Path | str, source: ArchiveLayout, expected_pickle: bytes,
                   expected_root: Any = _NOTHING,
                   patches: Mapping[str, bytes] | None = None) -> ArchiveLayout:
    """Check a rewritten file before it replaces anything; raise ``ValidationError`` if not ok.

    Re-reads the written directory, checks the data.pkl CRC and bytes, decodes it and compares
    it with ``expected_root`` (values and sharing), and checks every other record is present
    with its original sizes, CRC, compression and data alignment. Tensor bytes are not re-read:
    they were copied by the kernel and their CRCs in the directory are the originals. Patched
    records are re-read in full: they must hold exactly the patch, under its CRC.
    """
    patches = dict(patches or {})
    try:
        layout = open_archive(written)
        data = read_pickle_bytes(layout)
    except StateFileError as exc:
        raise ValidationError(f"{written}: the written archive is unreadable: {exc}") from None
    if data != expected_pickle:
        raise ValidationError(f"{written}: data.pkl differs from the encoded state")
    if expected_root is not _NOTHING:
        try:
            decoded = pickle_codec.decode_pickle(data)
        except StateFileError as exc:
            raise ValidationError(f"{written}: data.pkl does not decode: {exc}") from None
        difference = pickle_codec.tree_difference(expected_root, decoded)
        if difference is not None:
            raise ValidationError(f"{written}: decoded state differs from the intended one at "
                                  f"{difference}")
    old = {r.name: r for r in source.records}
    new = {r.name: r for r in layout.records}
    _check_records(written, source, layout, old, new, patches)
    return layout


def _check_records(written: Path | str, source: ArchiveLayout, layout: ArchiveLayout,
                   old: dict[str, ZipRecord], new: dict[str, ZipRecord],
                   patches: Mapping[str, bytes]) -> None:
    if list(old) != list(new):
        raise ValidationError(f"{written}: archive members differ from the original "
                              f"({sorted(set(old) ^ set(new))})")
    for name, before in old.items():
        if before is source.pickle_record:
            continue
        after = new[name]
        crc = zlib.crc32(patches[name]) if name in patches else before.crc32
        same = (crc, before.compressed_size, before.uncompressed_size, before.method) == (
            after.crc32, after.compressed_size, after.uncompressed_size, after.method)
        if not same:
            raise ValidationError(f"{written}: record {name} changed size, CRC or compression"
                                  + (" (or lacks the intended patch)" if name in patches else ""))
        if (after.data_offset - before.data_offset) % source.alignment:
            raise ValidationError(f"{written}: record {name} lost its {source.alignment}-byte "
                                  "data alignment")
    # The copied local headers must be the originals, byte for byte (cheap: headers only).
    src_fd = os.open(source.path, os.O_RDONLY)
    dst_fd = os.open(layout.path, os.O_RDONLY)
    try:
        for name, before in old.items():
            if before is source.pickle_record:
                continue
            after = new[name]
            if name in patches:
                _check_patched(written, before, after, src_fd, dst_fd, patches[name])
                continue
            length = before.data_offset - before.header_offset
            if os.pread(src_fd, length, before.header_offset) != os.pread(
                    dst_fd, length, after.header_offset):
                raise ValidationError(f"{written}: local header of {name} was not copied intact")
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _check_patched(written: Path | str, before: ZipRecord, after: ZipRecord, src_fd: int,
                   dst_fd: int, data: bytes) -> None:
    # The whole span is compared with what the rewrite meant to write: the original header
    # and descriptor with only the CRC changed, and exactly the patch as data.
    expected = _build_patched_record(before, src_fd, data)
    actual = os.pread(dst_fd, after.span_end - after.header_offset, after.header_offset)
    if after.span_end - after.header_offset != len(expected) or actual != expected:
        raise ValidationError(f"{written}: patched record {before.name} does not hold exactly "
                              "the intended bytes")
