"""One log's per-rank CSVs merged into one CSV, ordered by (step, rank, sample_id), and its
typed Parquet copy.

Each rank's committed rows are already in step order, so the ranks are merged as sorted streams
(:func:`~dist_hooks.records.frontier_windows`), window by window with one ``np.lexsort``: memory
is one read block per rank plus one step's rows, whatever the log's size. Every rank's bytes are
checked against the committed size, crc32 and row count on the way.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import DamageError
from ..reader import Unit
from ..records import frontier_windows
from ..store.atomic_store import fsync_file
from ..store.csv_log import (INT_COLUMNS, KEY_COLUMNS, KIND_TYPES, iter_csv_batches, merge_kinds,
                             text_kind_cast)
from .progress import Progress

__all__ = ["merge_csv", "write_parquet"]


def _csv_source(path: Path, nbytes: int, rows: int, rank: int, place: str, counter: dict,
                progress: Progress | None, block_bytes: int) -> tuple[list[str], Iterator[pa.Table]]:
    """One rank's committed CSV rows as tables in step order (``rank`` added when absent)."""
    cols, batches = iter_csv_batches(path, nbytes, block_size=block_bytes, counter=counter)

    def gen() -> Iterator[pa.Table]:
        last = None
        seen = 0
        try:
            for batch in batches:
                t = pa.Table.from_batches([batch])
                if "rank" not in t.column_names:
                    t = t.append_column("rank", pa.array(np.full(t.num_rows, rank, np.int64)))
                steps = t.column("step").to_numpy(zero_copy_only=False)
                back = np.flatnonzero(np.diff(steps) < 0)
                if len(back) or (last is not None and steps[0] < last):
                    raise DamageError(f"{place}: rows are not in step order at data row "
                                      f"{seen + (int(back[0]) + 1 if len(back) else 0) + 1}")
                last = steps[-1]
                seen += t.num_rows
                if progress is not None:  # bytes are only known at the end: prorate by rows
                    progress.update(nbytes * t.num_rows // max(rows, t.num_rows, 1))
                yield t
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise DamageError(f"{place}: cannot be parsed ({exc}) after {seen} data rows") from exc
        counter["rows"] = seen

    return cols, gen()


def merge_csv(units: list[Unit], roots: Path | Mapping[int, Path], csv_out: Path, *,
              progress: Progress | None = None, block_bytes: int = 1 << 22,
              on_window: Callable[[], None] | None = None,
              parquet_out: Path | None = None) -> dict:
    """Merge the committed rows of one log's per-rank CSVs into ``csv_out``, ordered by (step,
    rank, sample_id), streaming. Returns ``{rows, columns, kinds, crc32, parquet,
    problems}``: ``kinds`` the narrowest type of each column (for the Parquet copy), ``crc32``
    that of ``csv_out``, ``problems`` checksum/row-count mismatches against the manifest.
    ``roots``: the run directory, or each rank's root (a run recorded with node-local storage).

    ``parquet_out``: also write the typed Parquet copy there (``parquet`` says whether it
    was written; see :class:`_ParquetSink` for when it is not)."""
    counters: list[dict] = []
    iters, columns = [], None
    for u in units:
        path = u.path(roots if isinstance(roots, Path) else roots[u.rank])
        c: dict = {}
        counters.append(c)
        cols, it = _csv_source(path, u.commit.bytes, u.commit.rows,
                               u.rank, u.rel, c, progress, block_bytes)
        if "rank" not in cols and cols:
            cols = [*cols, "rank"]
        if columns is None and cols:
            columns = cols
        elif cols and cols != columns:
            raise DamageError(f"{u.rel}: columns {cols} differ from another rank's {columns}")
        iters.append(it)
    columns = columns or []
    kinds: dict[str, str | None] = {c: ("int" if c in INT_COLUMNS else None) for c in columns}
    rows = 0
    csv_out.parent.mkdir(parents=True, exist_ok=True)
    pq = _ParquetSink(parquet_out, columns) if parquet_out is not None and columns else None
    with open(csv_out, "wb") as raw:
        fh = _CrcWriter(raw)
        writer = None
        if columns:
            schema = pa.schema([(c, pa.int64() if c in INT_COLUMNS else pa.string())
                                for c in columns])
            writer = pacsv.CSVWriter(fh, schema, write_options=pacsv.WriteOptions(
                include_header=True, quoting_style="none"))
        for parts in frontier_windows(
                iters, lambda t: t.column("step").to_numpy(zero_copy_only=False),
                lambda t: t.num_rows, lambda t, k: (t.slice(0, k), t.slice(k))):
            table = pa.concat_tables([t.select(columns) for _, t in parts])
            keys = [table.column(k).to_numpy(zero_copy_only=False) for k in KEY_COLUMNS]
            table = table.take(pa.array(np.lexsort(keys[::-1])))
            cast = {}  # each text column's kind in this window, and its values in that type
            for c in columns:
                if c not in INT_COLUMNS and kinds[c] != "str":
                    cast[c] = text_kind_cast(c, table.column(c))
                    kinds[c] = merge_kinds(kinds[c], cast[c][0])
            writer.write_table(table)
            if pq is not None:
                pq.write(table, cast)
            rows += table.num_rows
            if on_window is not None:
                on_window()
        if writer is not None:
            writer.close()
        raw.flush()
        os.fsync(raw.fileno())
    problems = []
    for u, c in zip(units, counters):
        want_b, want_rows = u.commit.bytes, u.commit.rows
        if c.get("bytes", 0) != want_b:
            problems.append(f"{u.rel}: file is {c.get('bytes', 0)} bytes, committed {want_b}")
        elif c.get("crc32") != u.commit.crc32:
            problems.append(f"{u.rel}: crc32 mismatch over bytes [0, {want_b})")
        elif c.get("rows", 0) != want_rows:
            problems.append(f"{u.rel}: {c.get('rows', 0)} data rows, committed {want_rows}")
    final = {c: (k or "float") for c, k in kinds.items()}
    return {"rows": rows, "columns": columns, "kinds": final, "crc32": fh.crc32,
            "parquet": pq.close(final) if pq is not None else False, "problems": problems}


class _CrcWriter:
    """A binary file for pyarrow's CSV writer that keeps the crc32 of what is written (the
    summary records it; reading the file back for it cost a second pass)."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.crc32 = 0
        self.closed = False

    def write(self, data: Any) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True


class _ParquetSink:
    """The typed Parquet copy of a merged CSV, written window by window beside it.

    Each text column takes the type its first window's values have (:func:`text_kind_cast`:
    the values cast on the way to finding the kind are the ones written). A column's final
    type is only known at the end: :meth:`close` keeps the file when every column ended with
    the type it started with, and otherwise removes it and returns False, and the caller
    writes the copy from the merged CSV with the final types (:func:`write_parquet`).
    Why not always that: parsing the merged CSV again cost as much as merging it (measured).
    """

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self.kinds: dict[str, str] | None = None
        self.schema: pa.Schema | None = None
        self.writer: Any = None
        self.ok = True

    def write(self, table: pa.Table, cast: dict[str, tuple[str, Any]]) -> None:
        """One window; ``cast``: ``(kind, values)`` of its text columns that were looked at
        (key columns are int64 already; a column already known to be text is not cast)."""
        if not self.ok:
            return
        window = {c: cast.get(c, ("int" if c in INT_COLUMNS else "str", table.column(c)))
                  for c in self.columns}
        if self.kinds is None:
            try:
                import pyarrow.parquet as papq
            except ImportError:
                self.ok = False
                return
            self.kinds = {c: kind for c, (kind, _) in window.items()}
            self.schema = pa.schema([(c, KIND_TYPES[self.kinds[c]]) for c in self.columns])
            self.writer = papq.ParquetWriter(self.path, self.schema)
        cols = []
        for c in self.columns:
            want = self.kinds[c]
            got, values = window[c]
            if got != want:
                if want == "str" or merge_kinds(want, got) != want:
                    self.ok = False  # this column needs a wider type: see close()
                    return
                values = pc.cast(table.column(c), KIND_TYPES[want])  # e.g. 1 as a float
            cols.append(values)
        self.writer.write_table(pa.table(cols, schema=self.schema))

    def close(self, final: dict[str, str]) -> bool:
        if self.writer is not None:
            self.writer.close()
        if self.ok and self.kinds is not None and self.kinds == final:
            fsync_file(self.path)
            return True
        self.path.unlink(missing_ok=True)
        return False


def write_parquet(csv_path: Path, pq_path: Path, columns: list[str], kinds: dict[str, str]) -> bool:
    """A typed Parquet copy of a merged CSV, streamed (False when pyarrow.parquet is missing)."""
    try:
        import pyarrow.parquet as papq
    except ImportError:
        return False
    schema = pa.schema([(c, KIND_TYPES[kinds.get(c, "str")]) for c in columns])
    reader = pacsv.open_csv(csv_path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                            convert_options=pacsv.ConvertOptions(
                                column_types={c: schema.field(c).type for c in columns},
                                strings_can_be_null=True, null_values=[""],
                                quoted_strings_can_be_null=True))
    with papq.ParquetWriter(pq_path, schema) as w:
        for batch in reader:
            if batch.num_rows:
                w.write_batch(batch)
    fsync_file(pq_path)
    return True
