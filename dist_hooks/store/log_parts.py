"""A CSV log on an object store, which cannot append: the log as immutable, self-contained parts.

Why parts: an object is written whole (a PUT), so appending a block of rows to one object would
rewrite everything before it, and a log cannot live in a single object. Each written block is
its own object instead, named by where its rows start in the log:

* the log ``logs/<hook>/rank-XXXXX.csv`` (the name the manifest commits, as on disk) is the
  "folder" of objects ``logs/<hook>/rank-XXXXX.csv/part-<offset>.csv``, ``<offset>`` the byte
  offset (16 digits) in the *logical log* of the part's first row;
* the logical log is byte for byte the CSV a POSIX run writes: the header line, then every
  row. Its commit record (bytes, rows, crc32) means the same as on disk;
* the part at offset 0 holds the header and the first rows (or the header alone: it is written
  when the hook starts, so a reader sees the columns at once); every later part holds the header
  line, then its rows. So each part is a complete CSV file, and what reads a folder of CSVs
  (pandas over a glob, DuckDB, Spark, Dask) reads a live log as it is;
* parts follow each other without gap: the part at ``o`` holds rows ``[o, o + len - header)``
  and the next starts where it ends. A reader stops at the first gap (what follows is not
  trusted) and never reads past the committed ``bytes``;
* resume cuts the log back to its committed length: parts starting at or after it are deleted
  (the last one first, so no gap opens before a part that is left), then the part that spans
  it is replaced by its cut copy (a PUT replaces an object atomically).

Readers and the writer of this layout are both here, over :class:`~.storage.RunStorage`'s
``read``, ``replace``, ``list``, ``remove`` and ``url`` (:class:`PartStore`: those five, so that
``storage.py`` can hand out a ``LogParts`` without an import cycle), so any backend can hold a
log this way. ``LogParts`` is a :class:`~.csv_log.AppendLog`: ``CsvLog`` writes through it.
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Protocol

from ..errors import DamageError
from .csv_log import AppendLog, CsvPrefix

__all__ = ["LogParts", "PartStore", "part_name"]


class PartStore(Protocol):
    """What a :class:`LogParts` needs of its storage (a :class:`~.storage.RunStorage`)."""

    def read(self, rel: str) -> bytes | None: ...
    def replace(self, rel: str, data: bytes) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def remove(self, rel: str) -> None: ...
    def url(self, rel: str = "", place: str | None = None) -> str: ...

_PART = re.compile(r"^part-(\d{16})\.csv$")


def part_name(offset: int) -> str:
    """The object name (under the log's folder) of the part whose first row is at ``offset``."""
    return f"part-{int(offset):016d}.csv"


class LogParts(AppendLog):
    """One log kept as parts in ``storage`` under the folder ``rel`` (``logs/log/rank-00000.csv``).

    The writer (one per log: the rank's hook) calls :meth:`truncate` once on resume (or
    :meth:`open`, which also continues a log), then :meth:`append` per block; ``size`` and
    ``crc32`` are the logical log's, always up to date. Readers call :meth:`read` (or
    :meth:`scan`).
    """

    def __init__(self, storage: PartStore, rel: str) -> None:
        self.storage, self.rel = storage, rel.rstrip("/")
        self.name = storage.url(self.rel)
        self.header = b""
        self.size = 0
        self.crc32 = 0

    # ----------------------------------------------------------------- reading
    def offsets(self) -> list[int]:
        """The offsets of the parts there, ascending (other objects in the folder ignored)."""
        found = (_PART.match(n) for n in self.storage.list(self.rel))
        return sorted(int(m.group(1)) for m in found if m)

    def _part(self, offset: int) -> bytes:
        data = self.storage.read(f"{self.rel}/{part_name(offset)}")
        if data is None:
            raise DamageError(f"{self.storage.url(self.rel)}: part {part_name(offset)} vanished "
                              "while being read (a writer cut the log back)")
        return data

    def read(self, limit: int | None = None) -> bytes:
        """The logical log, or its first ``limit`` bytes (the committed prefix): fewer when the
        parts there end before it. :class:`DamageError` when a part's header differs from the
        first part's."""
        return self._read(self.offsets(), limit)

    def scan(self, nbytes: int) -> CsvPrefix | None:
        """The first ``nbytes`` bytes as :func:`~.csv_log.scan_prefix` sees a file's; ``None``
        when the log has no part at all."""
        offsets = self.offsets()
        return _prefix(self._read(offsets, int(nbytes))) if offsets else None

    def _read(self, offsets: list[int], limit: int | None) -> bytes:
        out = bytearray()
        header = b""
        for off in offsets:
            if off != len(out) or (limit is not None and off >= limit):
                break  # a gap (nothing after it is trusted) or past what was asked for
            data = self._part(off)
            if off == 0:
                header = data[: data.find(b"\n") + 1] if b"\n" in data else data
                out += data
            else:
                if not data.startswith(header) or not header:
                    raise DamageError(f"{self.storage.url(self.rel)}/{part_name(off)}: its "
                                      "header line differs from the log's first part")
                out += memoryview(data)[len(header):]
            if limit is not None and len(out) >= limit:
                break
        return bytes(out if limit is None else out[:limit])

    # ----------------------------------------------------------------- writing
    def open(self, size: int | None = None) -> CsvPrefix:
        """Start writing: :meth:`truncate` to ``size``, or (``None``) continue the log as it is,
        as a file opened for append continues (a restart without a committed length): parts
        after a gap, which no reader trusts, are deleted so a new part never follows them."""
        if size is not None:
            return _prefix(self._truncate(int(size)))
        offsets = self.offsets()
        kept = self._read(offsets, None)
        for off in reversed(offsets):
            if off >= len(kept) and (off > 0 or not kept):
                self.storage.remove(f"{self.rel}/{part_name(off)}")
        self._keep(kept)
        return _prefix(kept)

    def first_line(self) -> bytes:
        return self.header

    def truncate(self, size: int) -> None:
        """Cut the log back to its first ``size`` bytes (the committed length) and continue it
        from there: later parts are deleted, the last one first, and a part spanning ``size``
        is replaced by its cut copy. :class:`DamageError` when fewer than ``size`` bytes are
        there."""
        self._truncate(int(size))

    def _truncate(self, size: int) -> bytes:
        offsets = self.offsets()
        for off in reversed(offsets):
            if off >= size and (off > 0 or size == 0):
                self.storage.remove(f"{self.rel}/{part_name(off)}")
        kept = self.read(size) if size else b""
        if len(kept) < size:
            raise DamageError(f"{self.storage.url(self.rel)}: {len(kept)} bytes in its parts, the "
                              f"manifest commits {size}; parts were deleted after the boundary")
        last = max((o for o in offsets if o < size), default=None)
        if last is not None:
            data = self._part(last)
            header = kept[: kept.find(b"\n") + 1]
            want = (len(header) if last else 0) + size - last
            if len(data) > want:
                self.storage.replace(f"{self.rel}/{part_name(last)}", data[:want])
        self._keep(kept)
        return kept

    def _keep(self, kept: bytes) -> None:
        """The writer's state once the log holds ``kept``."""
        self.header = kept[: kept.find(b"\n") + 1] if b"\n" in kept else b""
        self.size, self.crc32 = len(kept), zlib.crc32(kept)

    def append(self, data: Any) -> None:
        """Write ``data`` (bytes-like: the header first, then whole rows, each block once) as the
        next part: one PUT. The header is the first block written to an empty log."""
        view = memoryview(data)
        if not view.nbytes:
            return
        if self.size == 0:
            body = bytes(view)
            self.header = body[: body.find(b"\n") + 1]
        else:
            body = b"".join((self.header, view))
        self.storage.replace(f"{self.rel}/{part_name(self.size)}", body)
        self.size += view.nbytes
        self.crc32 = zlib.crc32(view, self.crc32)


def _prefix(data: bytes) -> CsvPrefix:
    return CsvPrefix(len(data), zlib.crc32(data), data.count(b"\n"), data[-1:])
