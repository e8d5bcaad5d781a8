"""Per-rank CSV log, written in column blocks with pyarrow's CSV writer.

Why pyarrow: it encodes a whole block of rows in C++ with the GIL released, so the writer thread
does not steal the interpreter from the simulation thread (per-row Python formatting measured
11-15x the step time, design/performance.md). Integers stay integers; floats use pyarrow's
shortest round-trip formatting; missing values are empty fields.

The file is opened for append, never truncated on open: a restart continues it. ``truncate(bytes)``
cuts it back to a committed length (resume after a crash). ``size``/``rows`` are what was written,
``sync()`` makes it durable (fsync) and brings ``crc32`` (of the whole file so far) up to date by
reading back only the bytes written since the previous sync — the coordinator records all three at a
checkpoint boundary, and ``dist-hooks verify`` recomputes the checksum from disk.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..errors import SchemaChangedError
from .checksums import file_crc32

#: The integer columns that open every LoggingHook row, in this order (the CSV schema, with
#: :data:`FLOAT_COLUMNS`; docs/format.md). Rows of a merged log are ordered by the first three.
INT_COLUMNS = ("step", "rank", "sample_id", "graph_idx", "status")
KEY_COLUMNS = INT_COLUMNS[:3]
#: The default per-system scalars (float64) that follow them; custom scalars come last.
FLOAT_COLUMNS = ("energy", "fmax", "temperature")


class CsvLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")
        self.size = self._fh.tell()
        self.columns: list[str] | None = _read_header(self.path) if self.size else None
        self.rows = _count_rows(self.path) if self.size else 0
        self.crc32, self._crc_pos = file_crc32(self.path, self.size), self.size

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append one block of rows given as equally long columns (None entries: empty fields)."""
        names = list(columns)
        if self.columns is None:
            self.columns = names
            header = True
        else:
            if names != self.columns:
                raise SchemaChangedError(
                    f"{self.path}: columns {names} differ from the header {self.columns}; a CSV cannot change "
                    "its columns mid-run")
            header = False
        table = pa.table({k: pa.array(v) for k, v in columns.items()})
        pacsv.write_csv(table, self._fh, write_options=pacsv.WriteOptions(include_header=header,
                                                                          quoting_style="needed"))
        self.rows += table.num_rows
        self.size = self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        with open(self.path, "rb") as fh:
            fh.seek(self._crc_pos)
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                self.crc32 = zlib.crc32(chunk, self.crc32)
        self._crc_pos = self.size

    def truncate(self, size: int, rows: int) -> None:
        """Cut the file back to ``size`` bytes holding ``rows`` data rows (resume after a crash)."""
        self._fh.flush()
        if size > self._fh.seek(0, os.SEEK_END):
            raise ValueError(f"{self.path}: cannot truncate to {size} bytes, the file holds fewer; "
                             "it was damaged or replaced after the checkpoint")
        self._fh.truncate(size)
        self._fh.seek(size)
        self.size, self.rows = size, rows
        self.columns = _read_header(self.path) if size else None
        self.crc32, self._crc_pos = file_crc32(self.path, size), size

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()


def _read_header(path: Path) -> list[str]:
    with open(path, "rb") as fh:
        line = fh.readline().decode().rstrip("\r\n")
    return [c.strip('"') for c in line.split(",")] if line else []


def _count_rows(path: Path) -> int:
    with open(path, "rb") as fh:
        n = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return max(n - 1, 0)
