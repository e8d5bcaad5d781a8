"""The per-rank CSV log: its column schema, its writer (:class:`CsvLog`) and its readers.

The writer appends column blocks with pyarrow's CSV writer.

Why pyarrow: it encodes a whole block of rows in C++ with the GIL released, so the writer thread
does not steal the interpreter from the simulation thread (per-row Python formatting measured
11-15x the step time, design/performance.md). Integers stay integers; floats use pyarrow's
shortest round-trip formatting; missing values are empty fields.

Each block is encoded in memory and handed to the OS in one write, right away (no buffer held
back in Python), so a live reader (``tail -f``, pandas) sees whole blocks as soon as they are
written, never a row cut by a buffer boundary. ``write_header`` writes the header line alone,
before any row (the hook knows its columns at its first firing), so a reader finds a parseable
file from the start; it writes nothing when the file already holds a header (a restart).

The bytes go to an :class:`AppendLog`: a local file (:class:`LocalLogFile`: opened for append,
never truncated on open, so a restart continues it) or, on an object store, which cannot append,
one immutable part per block (``store/log_parts.py``; the logical log is byte for byte the
file). ``CsvLog(out, cut=bytes)`` cuts it back to a committed length as it opens it (resume after
a crash). ``size``/``rows`` are what was written, ``sync()`` makes it durable (a file: fsync) and
brings ``crc32`` (of the whole log so far) up to date — a file's by reading back only the bytes
written since the previous sync — the coordinator records all three at a checkpoint boundary,
and ``dist-hooks verify`` recomputes them from disk (:func:`scan_prefix`).

The readers parse only a committed prefix (:func:`iter_csv_batches`, :func:`read_csv_committed`)
and type the text columns over whole columns (:func:`narrow_table`), for ``open_run`` and
``dist-hooks consolidate``.
"""
from __future__ import annotations

import io
import os
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import DamageError, SchemaChangedError
from .checksums import fd_crc32, file_crc32

__all__ = ["FLOAT_COLUMNS", "INT_COLUMNS", "KEY_COLUMNS", "KIND_TYPES", "AppendLog", "CsvLog",
           "CsvPrefix", "LocalLogFile", "cast_text_column", "header_columns", "iter_csv_batches",
           "merge_kinds", "narrow_table", "read_csv_committed", "read_header", "scan_prefix",
           "sort_table", "text_kind", "text_kind_cast"]

#: The integer columns that open every LoggingHook row, in this order (the CSV schema, with
#: :data:`FLOAT_COLUMNS`; docs/format.md). Rows of a merged log are ordered by the first three.
INT_COLUMNS = ("step", "rank", "sample_id", "graph_idx", "status")
KEY_COLUMNS = INT_COLUMNS[:3]
#: The default per-system scalars (float64) that follow them; custom scalars come last.
FLOAT_COLUMNS = ("energy", "fmax", "temperature")


class AppendLog(ABC):
    """Where a :class:`CsvLog`'s bytes go: the log as one byte stream, appended to block by block.

    Why an interface: a local file appends in place, an object store cannot append at all (it
    keeps the log as immutable parts, :class:`~.log_parts.LogParts`), and the CSV encoding, the
    header and the row count above it are the same for both. A backend hands out its kind with
    :meth:`~.storage.RunStorage.log_file`. Constructing one does no I/O; :meth:`open` starts
    writing, :meth:`scan` only reads (the check of a committed prefix).
    """

    #: where the log is, as people are told (a local path, an ``s3://`` URL)
    name: str
    #: bytes in the log (those written so far)
    size: int = 0
    #: crc32 of the first ``size`` bytes as of the last :meth:`sync`
    crc32: int = 0

    @abstractmethod
    def open(self, size: int | None = None) -> CsvPrefix:
        """Open for appending: continue the log as it is (``None``), or first cut it back to its
        first ``size`` bytes (resume: :class:`DamageError` when fewer are there). Returns what
        the log then holds (bytes, crc32, newlines), which :attr:`size`/:attr:`crc32` are."""

    @abstractmethod
    def first_line(self) -> bytes:
        """The log's first line (its header), ``b""`` when it is empty; after :meth:`open`."""

    @abstractmethod
    def append(self, data: Any) -> None:
        """Append ``data`` (bytes-like: the header, then whole rows) as one write."""

    @abstractmethod
    def scan(self, nbytes: int) -> CsvPrefix | None:
        """What the first ``nbytes`` bytes are (fewer when the log is shorter), reading only;
        ``None`` when there is no log."""

    def flush(self) -> None:
        """Hand what was appended to the reader (the OS); nothing when each append is final."""

    def sync(self) -> None:
        """Make what was appended durable and bring :attr:`crc32` up to date."""

    def close(self) -> None:
        """Release the file; idempotent."""


class LocalLogFile(AppendLog):
    """A log in a local file, opened for append (never truncated on open: a restart continues
    it). ``sync`` fsyncs and brings ``crc32`` up to date by reading back only the bytes written
    since the previous sync. A file not there yet is created by the first append, with it: a
    live reader never finds it empty (it would not parse)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self._fh: Any = None
        self._crc_pos = 0

    def open(self, size: int | None = None) -> CsvPrefix:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not size and not self.path.exists():
            self.size = self.crc32 = self._crc_pos = 0
            return CsvPrefix(0, 0, 0, b"")
        self._fh = open(self.path, "ab")
        try:
            end = self._fh.tell()
            if size is not None:
                if size > end:
                    raise DamageError(f"{self.path}: cannot cut it back to {size} bytes, it holds "
                                      f"{end}; it was damaged or replaced after the checkpoint")
                self._fh.truncate(size)
                self._fh.seek(size)
                end = size
            found = scan_prefix(self.path, end)
        except BaseException:
            self._fh.close()
            raise
        self.size, self.crc32, self._crc_pos = end, found.crc32, end
        return found

    def first_line(self) -> bytes:
        if not self.size:
            return b""
        with open(self.path, "rb") as fh:
            return fh.readline()

    def append(self, data: Any) -> None:
        if self._fh is None:
            self._fh = open(self.path, "ab")
        self._fh.write(data)
        self._fh.flush()
        self.size += len(data)

    def scan(self, nbytes: int) -> CsvPrefix | None:
        try:
            return scan_prefix(self.path, nbytes)
        except FileNotFoundError:
            return None

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def sync(self) -> None:
        if self._fh is None:
            return  # nothing written, nothing there
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.crc32 = file_crc32(self.path, self.size, start=self._crc_pos, crc=self.crc32)
        self._crc_pos = self.size

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()
            self._fh.close()


class CsvLog:
    """One CSV log written in blocks (see the module docstring) to an :class:`AppendLog`: a
    local file (a path given: :class:`LocalLogFile`) or, on an object store, its parts.

    ``cut``: the committed length of a resumed run; the log is cut back to it as it is opened,
    so what follows it is never read. Without it the log is continued as it is.
    """

    def __init__(self, out: str | os.PathLike | AppendLog, cut: int | None = None):
        self._out = out if isinstance(out, AppendLog) else LocalLogFile(out)
        self.name = self._out.name
        found = self._out.open(None if cut is None else int(cut))
        self.rows = found.rows
        self.columns: list[str] | None = (header_columns(self._out.first_line())
                                          if self._out.size else None)

    @property
    def size(self) -> int:
        """Bytes written (the log's length)."""
        return self._out.size

    @property
    def crc32(self) -> int:
        """crc32 of the whole log as of the last :meth:`sync`."""
        return self._out.crc32

    def write_header(self, names: list[str]) -> None:
        """Write the header line alone when the log is empty; otherwise check that the header
        there names ``names`` (a restart continues its log and must keep its columns)."""
        names = list(names)
        if self.columns is None:
            self.columns = names
            self._write(pa.table({k: pa.nulls(0) for k in names}), header=True)
        elif names != self.columns:
            raise self._schema_changed(names)

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append one block of rows given as equally long columns (None entries: empty fields)."""
        names = list(columns)
        if self.columns is None:
            self.columns = names
            header = True
        else:
            if names != self.columns:
                raise self._schema_changed(names)
            header = False
        table = pa.table({k: pa.array(v) for k, v in columns.items()})
        self._write(table, header)
        self.rows += table.num_rows

    def _write(self, table: pa.Table, header: bool) -> None:
        """Encode ``table`` in memory (C++, GIL released) and hand it on in one write."""
        out = pa.BufferOutputStream()
        pacsv.write_csv(table, out, write_options=pacsv.WriteOptions(include_header=header,
                                                                     quoting_style="needed"))
        self._out.append(out.getvalue())

    def _schema_changed(self, names: list[str]) -> SchemaChangedError:
        return SchemaChangedError(
            f"{self.name}: columns {names} differ from the header {self.columns}; a CSV cannot change "
            "its columns mid-run")

    def flush(self) -> None:
        self._out.flush()

    def sync(self) -> None:
        """Durable, and ``crc32`` up to date (a local file: fsync; object-store parts: each
        written block already is)."""
        self._out.sync()

    def close(self) -> None:
        self._out.close()


# ------------------------------------------------------------------------------- reading
def read_header(path: str | os.PathLike) -> list[str]:
    """Column names of a CSV log (its first line; pyarrow quotes them)."""
    with open(path, "rb") as fh:
        return header_columns(fh.readline())


def header_columns(line: bytes) -> list[str]:
    """Column names of a header line (pyarrow quotes them)."""
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    return [c.strip('"') for c in text.split(",")] if text else []


@dataclass(frozen=True)
class CsvPrefix:
    """The first bytes of a CSV log as read back (:func:`scan_prefix`): what a commit record's
    ``bytes``, ``rows`` and ``crc32`` are checked against."""

    bytes: int        #: bytes read (fewer than asked when the file is shorter)
    crc32: int
    newlines: int
    last_byte: bytes  #: ``b""`` when nothing was read

    @property
    def rows(self) -> int:
        """Data rows: the lines after the header."""
        return max(self.newlines - 1, 0)


def scan_prefix(path: str | os.PathLike, nbytes: int | None = None,
                progress: Callable[[int], None] | None = None) -> CsvPrefix:
    """The crc32, newline count and last byte of the first ``nbytes`` bytes of a CSV log (all
    of it for ``None``; what there is when it is shorter), in one read. ``progress`` is called
    with the size of each piece read."""
    lines, last = 0, b""

    def each(piece: memoryview) -> None:
        nonlocal lines, last
        lines += bytes(piece).count(b"\n")
        last = bytes(piece[-1:])
        if progress is not None:
            progress(len(piece))

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        n = size if nbytes is None else min(int(nbytes), size)
        crc = fd_crc32(fd, n, each=each)
    finally:
        os.close(fd)
    return CsvPrefix(n, crc, lines, last)


class _Prefix(io.RawIOBase):
    """The first ``n`` bytes of a file, with a running crc32 of what was read.

    pyarrow's streaming CSV reader pulls through this, so only committed bytes are parsed and the
    checksum costs no second read.
    """

    def __init__(self, path: Path, n: int) -> None:
        self._f = open(path, "rb")
        self.left = int(n)
        self.read_bytes = 0
        self.crc32 = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        k = min(len(b), self.left)
        if k <= 0:
            return 0
        data = self._f.read(k)
        n = len(data)
        b[:n] = data
        self.left -= n
        self.read_bytes += n
        self.crc32 = zlib.crc32(data, self.crc32)
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def iter_csv_batches(path: str | Path, nbytes: int, *, block_size: int = 1 << 22,
                     counter: dict | None = None) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """Stream the committed prefix of a CSV log: ``(columns, batches)``.

    Key columns (step, rank, sample_id, graph_idx, status) are parsed as int64; every other
    column stays text. Why text: pyarrow wrote ``1.0`` as ``1``, so a type guessed from the first
    block can be wrong for a later one; the caller narrows types over the whole column
    (:func:`narrow_table`) or passes the text through unchanged. ``counter`` (a dict) receives
    ``bytes`` and ``crc32`` of what was read once the iterator is exhausted.
    """
    path = Path(path)
    cols = read_header(path) if nbytes else []
    if not cols:
        if counter is not None:
            counter.update(bytes=0, crc32=0)
        return cols, iter(())
    types = {c: (pa.int64() if c in INT_COLUMNS else pa.string()) for c in cols}
    src = _Prefix(path, nbytes)
    reader = pacsv.open_csv(
        src, read_options=pacsv.ReadOptions(block_size=block_size),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True,
                                             null_values=[""], quoted_strings_can_be_null=True))

    def gen() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                if batch.num_rows:
                    yield batch
            # drain: a trailing partial read must still count towards the checksum
            while src.readinto(bytearray(1 << 16)):
                pass
            if counter is not None:
                counter.update(bytes=src.read_bytes, crc32=src.crc32)
        finally:
            src.close()

    return cols, gen()


def narrow_table(table: pa.Table) -> pa.Table:
    """Cast each text column to the narrowest of int64, float64, bool that holds every value.

    Known columns get their known type (energy, fmax, temperature are float64 even when every
    value happened to be written as an integer).
    """
    out = []
    for name, col in zip(table.column_names, table.columns):
        out.append(cast_text_column(name, col))
    return pa.table(out, names=table.column_names)


def cast_text_column(name: str, col: Any, kind: str | None = None) -> Any:
    """Cast one text column (see :func:`narrow_table`); ``kind`` forces "int"/"float"/"bool"/"str"."""
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        return col
    if kind is None:
        kind = text_kind(name, col)
    target = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}.get(kind)
    return col if target is None else pc.cast(col, target)


_KIND_ORDER = ("int", "float", "bool", "str")
#: the Arrow type of each kind of :func:`text_kind`
KIND_TYPES = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}


def text_kind(name: str, col: Any) -> str:
    """The narrowest kind ("int", "float", "bool", "str") that every value of ``col`` parses as."""
    return text_kind_cast(name, col)[0]


def text_kind_cast(name: str, col: Any) -> tuple[str, Any]:
    """:func:`text_kind` and ``col`` cast to it (``col`` itself for "str"): finding the kind
    casts the column anyway, and the cast values are what a typed copy needs."""
    if name in FLOAT_COLUMNS:
        candidates: tuple[str, ...] = ("float", "str")
    else:
        candidates = _KIND_ORDER
    for kind in candidates:
        if kind == "str":
            return kind, col
        try:
            return kind, pc.cast(col, KIND_TYPES[kind])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return "str", col


def merge_kinds(a: str | None, b: str) -> str:
    """The narrowest kind that holds values of both kinds (int+float -> float, else str)."""
    if a is None or a == b:
        return b
    if {a, b} == {"int", "float"}:
        return "float"
    return "str"


def read_csv_committed(path: str | Path, nbytes: int, *, narrow: bool = True) -> pa.Table:
    """The committed prefix of one CSV as a table (in memory); typed unless ``narrow=False``
    (then non-key columns stay text, ready to be concatenated with other ranks' and narrowed
    together)."""
    cols, batches = iter_csv_batches(path, nbytes)
    batches = list(batches)
    if batches:
        table = pa.Table.from_batches(batches)
    else:
        table = pa.table({c: pa.array([], pa.int64() if c in INT_COLUMNS else pa.string())
                          for c in cols})
    return narrow_table(table) if narrow else table


def sort_table(table: pa.Table) -> pa.Table:
    """Rows ordered by (step, rank, sample_id), stably (numpy lexsort, no Python row loop)."""
    if table.num_rows == 0 or not all(k in table.column_names for k in KEY_COLUMNS):
        return table
    keys = [np.asarray(table.column(k).to_numpy(zero_copy_only=False)) for k in KEY_COLUMNS]
    order = np.lexsort(keys[::-1])
    return table.take(pa.array(order))
