"""``dist-hooks consolidate``: one group per hook, one converged group and one CSV per log.

A run leaves one Zarr group per rank and hook and one CSV per rank and log, which is what lets
every rank write without coordination. Analysis wants the opposite: one table. This module
merges them, reading only what the last checkpoint boundary committed.

How, and why:

* Records (and CSV rows) are merged as sorted streams. Each rank's records were appended in
  step order, so the ranks are merged like sorted runs: a window holds every buffered row whose
  step is below the *frontier* (the smallest last-buffered step of any rank not yet exhausted),
  is ordered by (step, rank, sample_id) with one ``np.lexsort`` and written out. Memory is
  bounded by one read block per rank plus one step's records, whatever the run's size.
* A trajectory's atom rows (nearly all the bytes) are not reordered: the consolidated group
  keeps each rank's rows as one segment, and records point into it (``atoms_start``,
  ``n_atoms``; format in docs/format.md). Whole shard files are copied, each checked against the
  checksum its writer recorded at the boundaries, or decoded and checked against the committed
  crc32 when it has none (:mod:`.atom_segments`). That is what brought consolidate from a
  twentieth of a file copy's speed to about half of it or more (docs/performance.md).
* Everything read is checked on the way: every field's crc32, every CSV's checksum and row
  count; a mismatch aborts before anything is published.
* The CSV logs, the atom files, the converged group and the records run side by side in
  threads (each releases the GIL for most of its time). Each merge runs in one thread: reading
  ahead in a second one cost more in handing the GIL back and forth than it overlapped
  (measured: 10% slower on 200 MB and on 1 GB).
* Crash safety: everything is written into a hidden temporary directory next to the output,
  fsynced, completed with ``consolidated.json`` (the marker readers require) and renamed into
  place; a killed consolidate leaves only the temporary, which the next one removes.
* Idempotent: an output whose marker names the current ``run.json`` (crc32) and the same
  options is left untouched; a forced rebuild writes the same bytes (no timestamps inside).
* One consolidate per run at a time: ``fcntl.flock`` on ``RUN/.consolidate.lock``.
* The output is plain Zarr v3 + CSV (+ Parquet): readable with ``zarr`` and ``pandas`` alone.
* Node-local runs: each rank's files are read from its *rank root* (``rank_roots``).

Output layout (``OUT``, default ``RUN/consolidated``)::

    OUT/consolidated.json          completion marker and summary (written last)
    OUT/data.zarr/hooks/<hook>     every snapshot hook: all ranks, indexed layout, ``rank`` column
    OUT/data.zarr/converged        converged records, one per (rank, sample_id), CSR layout
    OUT/logs/<hook>.csv            every CSV log: all ranks, committed rows
    OUT/logs/<hook>.parquet        the same, typed (when pyarrow.parquet is importable)
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..reader import (
    CONSOLIDATED_FORMAT,
    CONSOLIDATED_MARKER,
    DamageError,
    RunError,
    Unit,
    committed_files,
    committed_units,
    default_consolidated_dir,
    find_rank_roots,
    load_manifest,
    local_storage_error,
    read_consolidated_summary,
)
from ..records import CsrBlock, frontier_windows, merge_blocks
from ..store import layout
from ..store.array_layout import parse_array, writer_chunking
from ..store.atomic_store import AtomicLocalStore, atomic_write_bytes, fsync_file, sync_dir
from ..store.csv_log import (INT_COLUMNS, KEY_COLUMNS, KIND_TYPES, iter_csv_batches, merge_kinds,
                             text_kind_cast)
from ..store.shard_files import RawArrayReader, ShardDamage
from ..store.raw_group_writer import RawGroupWriter, consolidate_metadata
from ..store.group_writer import GroupWriter
from ..store.group_reader import GroupReader
from zarr.core.sync import sync as _zsync
from . import LockHeldError, Progress

__all__ = ["ZarrSource", "consolidate", "merge_csv"]

#: 2: trajectory groups in the indexed layout (atom rows as per-rank segments).
CONSOLIDATED_VERSION = 2
LOCK_NAME = ".consolidate.lock"
#: Test fault injection: SIGKILL this process after writing that many merged windows.
FAULT_ENV = "DIST_HOOKS_FAULT_CONSOLIDATE_AFTER_WINDOWS"

DEFAULT_BLOCK_RECORDS = 4096
DEFAULT_BLOCK_ATOMS = 65536
#: Bytes fetched per array and read (rounded to whole chunks, at most one shard file) ...
FETCH_BYTES = 4 << 20
#: Record chunks of a consolidated group (512 KiB of an int64 column; zarr's cost per chunk
#: made 16384 two times slower, measured), 4 to a shard: the writer stages one shard per column
#: in memory, 9.4 MB for a 3x3 float32 cell.
OUT_CHUNK_RECORDS = 65536
OUT_SHARD_RECORDS = 4 * OUT_CHUNK_RECORDS
#: ... shrunk so that all sources of one merge together fetch about this much at a time.
FETCH_TOTAL = 32 << 20


def fetch_bytes_for(n_sources: int) -> int:
    """Per-array fetch size when ``n_sources`` ranks are merged at once (memory stays flat as
    the world grows; the floor of one chunk per array and rank remains)."""
    return max(1 << 20, min(FETCH_BYTES, FETCH_TOTAL // max(n_sources, 1) // 4))


class _SeqArray:
    """Sequential reader of one array's committed rows, aligned to its chunks.

    Why: record blocks are cut by record count and atom budget, which never line up with the
    atom arrays' chunks; reading ``arr[a:b]`` per block would decode a boundary chunk twice.
    Here each chunk is fetched once and its unread tail kept for the next request. The crc32 of
    every fetched row is folded in, in order, for the committed-checksum check.
    """

    def __init__(self, arr: Any, stop: int, place: str, progress: Progress | None,
                 fetch_bytes: int = FETCH_BYTES, raw: RawArrayReader | None = None) -> None:
        self.arr = arr
        self.raw = raw  # shard files read directly (store/shard_files.py), when understood
        self.stop = int(stop)
        self.place = place
        self.progress = progress
        chunk = int(arr.chunks[0]) or 1
        self.file_rows = int((arr.shards or arr.chunks)[0]) or 1
        row = max(int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize, 1)
        # whole chunks, as many as fit in fetch_bytes, at most one file (shard): every partial
        # read of a shard re-reads its index, so few large reads beat many chunk-sized ones
        self.unit = min(max(fetch_bytes // row // chunk, 1) * chunk, max(self.file_rows, chunk))
        self.lo = self.hi = 0
        self.buf = np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        self.crc = 0

    def _damage(self, a: int, b: int, exc: BaseException) -> DamageError:
        first = a // self.file_rows
        key = (self.raw.lay.shard_key(first) if self.raw is not None else
               self.arr.metadata.encode_chunk_key((first,) + (0,) * (self.arr.ndim - 1)))
        return DamageError(f"{self.place}/{key}: cannot be read ({type(exc).__name__}: {exc}) "
                           f"over rows [{a}, {b})")

    def plan(self, b: int) -> tuple[int, int] | None:
        """The chunk-aligned row range to fetch before rows up to ``b`` can be served."""
        if b <= self.hi:
            return None
        return self.hi, min(self.stop, -(-b // self.unit) * self.unit)

    def feed(self, a: int, rng: tuple[int, int], data: Any) -> None:
        """Take fetched rows ``rng`` (from :meth:`plan`); ``a``: the next request's start."""
        data = np.ascontiguousarray(data)
        self.crc = zlib.crc32(data, self.crc) if data.size else self.crc
        if self.progress is not None:
            self.progress.update(data.nbytes)
        keep = self.buf[a - self.lo:]
        self.buf = np.concatenate([keep, data]) if len(keep) else data
        self.lo, self.hi = a, rng[1]

    def take(self, a: int, b: int) -> np.ndarray:
        return self.buf[a - self.lo: b - self.lo]

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)``; ``a`` never goes back before an earlier request's start."""
        rng = self.plan(b)
        if rng is not None:
            self.feed(a, rng, self.fetch(rng))
        return self.take(a, b)

    def fetch(self, rng: tuple[int, int]) -> np.ndarray:
        """Rows ``rng`` decoded, read directly from the shard files when ``raw`` is set."""
        try:
            if self.raw is not None:
                return self.raw.read(*rng)
            return self.arr[rng[0]:rng[1]]
        except ShardDamage as exc:
            raise DamageError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - any decode error is damage here
            raise self._damage(*rng, exc) from exc

    def drain(self) -> None:
        """Fetch any committed rows not read yet (so that the checksum covers them)."""
        if self.hi < self.stop:
            self.read(self.hi, self.stop)


def _placed(raw: RawArrayReader | None, place: str) -> RawArrayReader | None:
    """The reader's shard-file reader (layout parsed once), naming files as the run does."""
    return None if raw is None else RawArrayReader(raw.dir, raw.lay, place)


async def _gather_reads(jobs: list[tuple[_SeqArray, tuple[int, int]]]) -> list[Any]:
    """Fetch several arrays' ranges concurrently (their chunks decode in zarr's threads)."""
    async def one(seq: _SeqArray, rng: tuple[int, int]) -> Any:
        try:
            return await seq.arr.async_array.getitem(slice(*rng))
        except Exception as exc:  # noqa: BLE001
            return seq._damage(*rng, exc)

    return await asyncio.gather(*(one(s, r) for s, r in jobs))


def _read_many(requests: list[tuple[_SeqArray, int, int]]) -> list[np.ndarray]:
    """Rows ``[a, b)`` of several arrays, fetching whatever is missing in one concurrent batch."""
    jobs = [(seq, rng, a) for seq, a, b in requests if (rng := seq.plan(b)) is not None]
    for seq, rng, a in jobs:
        if seq.raw is not None:
            seq.feed(a, rng, seq.fetch(rng))
    jobs = [j for j in jobs if j[0].raw is None]
    if jobs:
        results = _zsync(_gather_reads([(s, r) for s, r, _ in jobs]))
        for (seq, rng, a), data in zip(jobs, results):
            if isinstance(data, DamageError):
                raise data
            seq.feed(a, rng, data)
    return [seq.take(a, b) for seq, a, b in requests]


class ZarrSource:
    """The committed records of one record group, as bounded :class:`CsrBlock` s in order.

    Checks on the way: the group and every array exist, shapes cover the committed lengths,
    ``atoms_ptr`` starts at 0, never decreases and ends at the committed atom count, steps do
    not go back; :meth:`problems` then compares each field's crc32 with ``expect_crc``.
    Structural damage raises :class:`DamageError` naming the file.
    """

    def __init__(self, data_root: Path, group: str, *, place: str, records: int,
                 atoms: int | None = None, expect_crc: dict | None = None,
                 block_records: int = DEFAULT_BLOCK_RECORDS,
                 block_atoms: int = DEFAULT_BLOCK_ATOMS, progress: Progress | None = None,
                 fetch_bytes: int = FETCH_BYTES,
                 levels: tuple[str, ...] = ("record", "atom")) -> None:
        self.place = place
        self.levels = tuple(levels)
        self.records = int(records)
        self.expect_crc = expect_crc
        self.block_records = max(int(block_records), 1)
        self.block_atoms = max(int(block_atoms), 1)
        self._consumed = False
        gdir = Path(data_root) / group
        if not (gdir / "zarr.json").is_file():
            raise DamageError(f"{place}: group missing (committed {self.records} records)")
        try:
            reader = GroupReader(data_root, group, limit_records=self.records)
        except Exception as exc:  # noqa: BLE001
            raise DamageError(f"{place}: cannot be opened ({type(exc).__name__}: {exc})") from exc
        self.reader = reader
        arrays = dict(reader.all_arrays)
        self.fields = dict(reader.fields)
        levels = dict(reader.attrs.get("level", {}) or {})
        missing = sorted(set(levels) - set(arrays))
        if self.records and (missing or layout.ATOMS_PTR not in arrays):
            name = missing[0] if missing else layout.ATOMS_PTR
            raise DamageError(f"{place}/{name}: array missing")
        if self.records and self.expect_crc is not None:
            for name in self.expect_crc:
                if name not in arrays:
                    raise DamageError(f"{place}/{name}: array missing")
        ptr_arr = arrays.get(layout.ATOMS_PTR)
        if ptr_arr is not None and (ptr_arr.ndim != 1 or np.dtype(ptr_arr.dtype) != np.int64):
            raise DamageError(f"{place}/{layout.ATOMS_PTR}: dtype {ptr_arr.dtype} shape "
                              f"{ptr_arr.shape}, expected 1-D int64")
        if len(reader) < self.records:
            self._short(arrays, reader)
        ptr = reader.atoms_ptr()
        if len(ptr) and ptr[0] != 0:
            raise DamageError(f"{place}/{layout.ATOMS_PTR}: starts at {ptr[0]}, not 0")
        bad = np.flatnonzero(np.diff(ptr) < 0)
        if len(bad):
            raise DamageError(f"{place}/{layout.ATOMS_PTR}: decreases at record {int(bad[0])}")
        if atoms is not None and int(ptr[-1]) != int(atoms):
            raise DamageError(f"{place}/{layout.ATOMS_PTR}: ends at {int(ptr[-1])}, committed "
                              f"atom count {int(atoms)}")
        self.ptr = ptr
        self.atoms = int(ptr[-1])
        # ``levels``: which fields this source reads and checks (consolidate copies the atom
        # arrays of a trajectory separately, shard by shard: tools/atom_segments.py)
        self.arrays = {n: arrays[n] for n in self.fields if self.fields[n][0] in self.levels}
        self._seq = {n: _SeqArray(a, self.records if self.fields[n][0] == "record"
                                  else self.atoms, f"{place}/{n}", progress, fetch_bytes,
                                  raw=_placed(reader.raw(n), f"{place}/{n}"))
                     for n, a in self.arrays.items()}

    def _short(self, arrays: dict, reader: GroupReader) -> None:
        ptr_arr = arrays.get(layout.ATOMS_PTR)
        if ptr_arr is not None and ptr_arr.shape[0] < self.records + 1:
            raise DamageError(f"{self.place}/{layout.ATOMS_PTR}: shape has {ptr_arr.shape[0]} "
                              f"rows, committed {self.records + 1}")
        for n, (level, _, _) in reader.fields.items():
            if level == "record" and arrays[n].shape[0] < self.records:
                raise DamageError(f"{self.place}/{n}: shape has {arrays[n].shape[0]} rows, "
                                  f"committed {self.records}")
        raise DamageError(f"{self.place}: only {len(reader)} of the {self.records} committed "
                          f"records are readable (atom arrays shorter than atoms_ptr says)")

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the committed rows (for progress)."""
        total = 0
        for n, a in self.arrays.items():
            rows = self.records if self.fields[n][0] == "record" else self.atoms
            total += rows * int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize
        return total

    def chunking(self) -> dict[str, int]:
        """Chunk settings of this group, for an output that should look like the input."""
        first = {lvl: next((n for n in self.arrays if self.fields[n][0] == lvl), None)
                 for lvl in ("record", "atom")}
        lay = {lvl: self.reader.layout(n) if n is not None else None for lvl, n in first.items()}
        return writer_chunking(lay["record"], lay["atom"])

    def __iter__(self) -> Iterator[CsrBlock]:
        if self._consumed:
            raise RuntimeError(f"{self.place}: a source is read once")
        self._consumed = True
        ptr, n = self.ptr, self.records
        rec_names = [f for f in self.arrays if self.fields[f][0] == "record"]
        atom_names = [f for f in self.arrays if self.fields[f][0] == "atom"]
        start, last_step = 0, None
        while start < n:
            stop = min(start + self.block_records, n)
            lim = int(np.searchsorted(ptr, ptr[start] + self.block_atoms, side="right")) - 1
            stop = max(start + 1, min(stop, lim))
            a, b = int(ptr[start]), int(ptr[stop])
            got = _read_many([(self._seq[f], start, stop) for f in rec_names]
                             + [(self._seq[f], a, b) for f in atom_names])
            rec = dict(zip(rec_names, got[: len(rec_names)]))
            atoms = dict(zip(atom_names, got[len(rec_names):]))
            if "step" in rec:
                steps = rec["step"]
                back = np.flatnonzero(np.diff(steps) < 0)
                if len(back) or (last_step is not None and len(steps) and steps[0] < last_step):
                    at = start + (int(back[0]) + 1 if len(back) else 0)
                    raise DamageError(f"{self.place}/step: records are not in step order at "
                                      f"record {at}")
                if len(steps):
                    last_step = steps[-1]
            yield CsrBlock(rec, atoms, ptr[start: stop + 1] - a)
            start = stop
        _read_many([(s, s.hi, s.stop) for s in self._seq.values() if s.hi < s.stop])

    def problems(self) -> list[str]:
        """crc32 mismatches of fields against ``expect_crc`` (after a full iteration)."""
        out = []
        for name, want in (self.expect_crc or {}).items():
            if name in self.fields and self.fields[name][0] not in self.levels:
                continue  # checked by whoever reads that level
            seq = self._seq.get(name)
            if seq is None:
                out.append(f"{self.place}/{name}: array missing")
                continue
            if seq.crc != int(want):
                what = "records" if self.fields[name][0] == "record" else "atom rows"
                out.append(f"{self.place}/{name}: crc32 mismatch over {what} [0, {seq.stop})")
        return out


class _GroupSink:
    """Appends merged blocks to one output group and keeps each field's crc32.

    A sharded output (every output the benchmark sees) is written by
    :class:`~dist_hooks.store.raw_group_writer.RawGroupWriter`: the same files zarr writes, at a
    fraction of its cost per array and chunk; an unsharded one through zarr (GroupWriter)."""

    def __init__(self, store: AtomicLocalStore, group: str, chunking: dict[str, int], *,
                 atoms_ptr: bool = True) -> None:
        self.group = group
        self.writer: RawGroupWriter | GroupWriter
        if int(chunking.get("chunks_per_shard") or 0) >= 1:
            self.writer = RawGroupWriter(store, group, atoms_ptr=atoms_ptr, **chunking)
        else:
            self.writer = GroupWriter(store, group, compressor="zstd", **chunking)
        self.atoms_ptr = atoms_ptr
        self.crc: dict[str, int] = {}
        self.records = 0
        self.atoms = 0

    def append(self, block: CsrBlock) -> None:
        rec = {n: np.ascontiguousarray(v) for n, v in block.rec.items()}
        atoms = {n: np.ascontiguousarray(v) for n, v in block.atoms.items()}
        for n, v in (*rec.items(), *atoms.items()):
            self.crc[n] = zlib.crc32(v, self.crc.get(n, 0)) if v.size else self.crc.get(n, 0)
        self.writer.append(rec, atoms, np.diff(block.ptr))
        self.records += len(block)
        self.atoms += int(block.ptr[-1])

    def close(self, attrs: dict | None = None) -> dict:
        """Finish the group, with ``attrs`` added to its attributes."""
        if isinstance(self.writer, RawGroupWriter):
            self.writer.close(attrs)
        else:
            self.writer.close()
            if attrs:
                import zarr
                zarr.open_group(self.writer.store, path=self.group, mode="r+").attrs.update(attrs)
            if not self.atoms_ptr:
                shutil.rmtree(Path(self.writer.store.root) / self.group / layout.ATOMS_PTR,
                              ignore_errors=True)
        return {"kind": "zarr", "group": self.group, "records": self.records,
                "atoms": self.atoms, "crc32": self.crc}


# ------------------------------------------------------------------------------ CSV merge
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
        cols, it = _csv_source(path, int(u.info.get("bytes", 0)), int(u.info.get("rows", 0)),
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
        want_b, want_rows = int(u.info.get("bytes", 0)), int(u.info.get("rows", 0))
        if c.get("bytes", 0) != want_b:
            problems.append(f"{u.rel}: file is {c.get('bytes', 0)} bytes, committed {want_b}")
        elif c.get("crc32") != int(u.info.get("crc32", 0)):
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
    writes the copy from the merged CSV with the final types (:func:`_write_parquet`).
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


def _write_parquet(csv_path: Path, pq_path: Path, columns: list[str], kinds: dict[str, str]) -> bool:
    """A typed Parquet copy of a merged CSV, streamed (False when pyarrow.parquet is missing)."""
    try:
        import pyarrow.parquet as papq
    except ImportError:
        return False
    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}
    schema = pa.schema([(c, types[kinds.get(c, "str")]) for c in columns])
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


# ---------------------------------------------------------------------------- the command
@contextlib.contextmanager
def run_lock(run_dir: Path, out: Path) -> Iterator[Path]:
    """Exclusive, non-blocking ``flock`` on ``RUN/.consolidate.lock`` (next to the output when
    the run directory is read-only). The kernel releases it when the process dies, so a killed
    consolidate never leaves a stale lock."""
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        lock = out.parent / f".{out.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeldError(f"another `dist-hooks consolidate` of {run_dir} is running "
                                f"(pid {holder}, lock {lock}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _tmp_re(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{32}}$")


def _remove_stale(out: Path) -> int:
    """Temporaries of killed consolidates of ``out`` (only ever called under the lock)."""
    pat, n = _tmp_re(out), 0
    for e in os.scandir(out.parent):
        if pat.match(e.name):
            shutil.rmtree(e.path, ignore_errors=True)
            n += 1
    return n


def _check_out(run_dir: Path, out: Path) -> None:
    r, o = run_dir.resolve(), out.resolve()
    if o == r or r.is_relative_to(o):
        raise RunError(f"--out {out} would replace the run directory itself")
    for part in (layout.DATA_DIR, layout.LOGS_DIR, "boundaries", "state", layout.MANIFEST):
        if o == r / part or o.is_relative_to(r / part):
            raise RunError(f"--out {out} lies inside the run's own {part}; choose another place")


def _fault_hook() -> Callable[[], None] | None:
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return None
    count = {"n": 0}

    def hit() -> None:
        count["n"] += 1
        if count["n"] >= int(limit):
            import sys
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def _structural_problems(roots: dict[int, Path], units: list[Unit]) -> list[str]:
    """Cheap checks that need no data read: paths inside the run, files present and long
    enough. Anything deeper is found while streaming (checksums)."""
    from .verify import quick_unit_problems
    out = []
    for u in units:
        out.extend(quick_unit_problems(roots.get(u.rank), u))
    return out


def consolidate(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                skip_damaged: bool = False, force: bool = False, progress: bool | None = None,
                parquet: bool = True, block_records: int = DEFAULT_BLOCK_RECORDS,
                block_atoms: int = DEFAULT_BLOCK_ATOMS, checksums: bool = True,
                rank_roots: Sequence[str | os.PathLike] = ()) -> dict:
    """Consolidate ``run_dir`` into ``out`` (default ``RUN/consolidated``); see the module doc.

    Returns the summary (``status``: "written" or "up-to-date"). Raises :class:`DamageError`
    when committed data are damaged (unless ``skip_damaged``: damaged (rank, hook) parts are
    left out and listed under ``skipped``), :class:`LockHeldError` when another consolidate of
    the run is running, :class:`RunError` for a path that is not a run.

    ``checksums=False`` skips decoding the trajectories' atom rows to compare them with their
    committed crc32 (whole shard files are then copied after only their index is checked;
    records, converged groups and CSVs are still checked in full): for a run already checked
    with ``dist-hooks verify``, or when the copy's speed matters more.

    ``rank_roots``: for a run recorded with ``storage="local"``, the directories that hold the
    nodes' local files (copied or mounted; see :func:`~dist_hooks.reader.find_rank_roots`).
    """
    run_dir = Path(run_dir)
    load_manifest(run_dir)  # "not a run" errors before anything is created
    out = Path(out) if out is not None else default_consolidated_dir(run_dir)
    _check_out(run_dir, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {"skip_damaged": bool(skip_damaged), "parquet": bool(parquet),
               "checksums": bool(checksums),
               "rank_roots": [str(Path(r).resolve()) for r in rank_roots]}
    with run_lock(run_dir, out):
        _remove_stale(out)
        data = (run_dir / layout.MANIFEST).read_bytes()  # one read: parse and fingerprint agree
        manifest = load_manifest(run_dir, data)
        mcrc = zlib.crc32(data)
        old = read_consolidated_summary(out)
        if (old is not None and not force and old.get("options") == options
                and old.get("format_version") == CONSOLIDATED_VERSION
                and old.get("source", {}).get("manifest_crc32") == mcrc):
            return {**old, "status": "up-to-date", "out": str(out)}
        units = committed_units(manifest)
        roots = find_rank_roots(run_dir, manifest, rank_roots)
        if manifest.get("storage") == "local" and not rank_roots and units:
            raise local_storage_error(run_dir, sorted({u.rank for u in units}))
        skipped: list[str] = []
        if skip_damaged:
            from .verify import verify_run
            report = verify_run(run_dir, manifest=manifest, check_merged=False,
                                rank_roots=rank_roots)
            bad = {(p["rank"], p["hook"]) for p in report["problems"] if p.get("hook")}
            skipped = [p["message"] for p in report["problems"]]
            units = [u for u in units if (u.rank, u.hook) not in bad]
        else:
            problems = _structural_problems(roots, units)
            if problems:
                raise DamageError(_refusal(run_dir, problems), problems)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            summary = _build(run_dir, manifest, units, tmp, progress=progress, parquet=parquet,
                             block_records=block_records, block_atoms=block_atoms,
                             checksums=checksums, roots=roots)
            summary.update({
                "format": CONSOLIDATED_FORMAT, "format_version": CONSOLIDATED_VERSION,
                "complete": True, "options": options, "skipped": skipped,
                "source": {"manifest_crc32": mcrc, "relative": os.path.relpath(run_dir.resolve(),
                                                                               out.resolve()),
                           "boundary": (manifest.get("last") or {}).get("index"),
                           "world_size": manifest.get("world_size")},
                "manifest": manifest})
            atomic_write_bytes(tmp / CONSOLIDATED_MARKER,
                               json.dumps(summary, indent=1, sort_keys=True).encode())
            sync_dir(tmp)
            trash = None
            if out.exists():
                trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
                os.rename(out, trash)
            os.rename(tmp, out)
            sync_dir(out.parent)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {**summary, "status": "written", "out": str(out)}


def _refusal(run_dir: Path, problems: list[str]) -> str:
    head = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return (f"refusing to consolidate {run_dir}: committed data are damaged:\n  {head}{more}\n"
            f"(`dist-hooks verify {run_dir}` lists all damage; --skip-damaged leaves the damaged "
            f"parts out)")


def _build(run_dir: Path, manifest: dict, units: list[Unit], tmp: Path, *,
           progress: bool | None, parquet: bool, block_records: int, block_atoms: int,
           checksums: bool = True, roots: dict[int, Path] | None = None) -> dict:
    """Write every output into ``tmp``; raise DamageError on checksum mismatches."""
    import zarr

    data_root = run_dir / layout.DATA_DIR
    zarr_hooks = sorted({u.hook for u in units if u.kind == "zarr" and not u.converged})
    conv_units = [u for u in units if u.kind == "zarr" and u.converged]
    csv_hooks = sorted({u.hook for u in units if u.kind == "csv"})
    total = sum(int(u.info.get("bytes", 0)) for u in units if u.kind == "csv")
    bar = Progress(0, "consolidate", enabled=progress)
    fault = _fault_hook()

    def root(u: Unit) -> Path:
        return (roots or {}).get(u.rank, run_dir)

    def open_source(u: Unit, levels: tuple[str, ...] = ("record", "atom")) -> ZarrSource:
        u.path(root(u))
        n = sum(1 for v in units if v.kind == "zarr" and v.hook == u.hook)
        return ZarrSource(root(u) / layout.DATA_DIR, u.group, place=u.rel, records=u.records,
                          atoms=u.atoms, expect_crc=u.info.get("crc32") or {},
                          block_records=block_records,
                          block_atoms=block_atoms, progress=bar, fetch_bytes=fetch_bytes_for(n),
                          levels=levels)

    problems: list[str] = []
    store = AtomicLocalStore(tmp / layout.DATA_DIR, fsync="never")
    zroot = zarr.open_group(store, mode="w", zarr_format=3)
    zroot.attrs.update({"format": CONSOLIDATED_FORMAT, "format_version": CONSOLIDATED_VERSION})
    zroot.create_group("hooks")
    summary: dict[str, Any] = {"hooks": {}, "converged": None}

    def logs() -> tuple[dict, list[str]]:
        out, found = {}, []
        for h in csv_hooks:
            us = [u for u in units if u.kind == "csv" and u.hook == h]
            csv_rel = f"{layout.LOGS_DIR}/{h}.csv"
            pq_rel = f"{layout.LOGS_DIR}/{h}.parquet"
            res = merge_csv(us, {u.rank: root(u) for u in us}, tmp / csv_rel, progress=bar,
                            on_window=fault, parquet_out=tmp / pq_rel if parquet else None)
            found.extend(res["problems"])
            has_pq = parquet and res["columns"] and (res["parquet"] or _write_parquet(
                tmp / csv_rel, tmp / pq_rel, res["columns"], res["kinds"]))
            out[h] = {"kind": "csv", "csv": csv_rel, "parquet": pq_rel if has_pq else None,
                      "rows": res["rows"], "columns": res["columns"], "types": res["kinds"],
                      "bytes": (tmp / csv_rel).stat().st_size, "crc32": res["crc32"],
                      "ranks": [u.rank for u in us]}
        return out, found

    # Four kinds of work run side by side (each releases the GIL for most of its time): the
    # CSV logs (pyarrow), the trajectories' atom files (copied, or decoded to be checked), the
    # converged group and, here, the trajectories' records. The atom copies need only the
    # manifest and the groups' metadata, so they start before any record source is opened.
    files = committed_files(run_dir, manifest) if checksums else {}
    pool = ThreadPoolExecutor(max_workers=2 + len(zarr_hooks), thread_name_prefix="dist-hooks")
    try:
        csv_job = pool.submit(logs)
        trajectories = {}
        for h in zarr_hooks:
            us = [u for u in units if u.kind == "zarr" and not u.converged and u.hook == h]
            t = _Trajectory(store, f"hooks/{h}", us, root, files, bar, fault, checksums)
            t.start(pool)
            trajectories[h] = t
        conv_sources = [(u.rank, open_source(u)) for u in conv_units]
        merged_source = None
        merged = (manifest.get("last") or {}).get("merged") or {}
        if not conv_units and manifest.get("storage") == "local" and int(merged.get("records", 0)):
            # rank data stayed on the nodes: the coordinator's merged group is all there is here
            merged_source = ZarrSource(data_root, layout.CONVERGED_GROUP,
                                       place=f"{layout.DATA_DIR}/{layout.CONVERGED_GROUP}",
                                       records=int(merged["records"]), atoms=int(merged["atoms"]),
                                       block_records=block_records, block_atoms=block_atoms,
                                       progress=bar)

        def converged() -> tuple[dict | None, list[str]]:
            """The converged group; in the pool, beside the trajectories (it was a sixth of a
            small run's time when it came after them, with the other threads idle)."""
            if not conv_sources and merged_source is None:
                return None, []
            ref = conv_sources[0][1] if conv_sources else merged_source
            n_conv = (sum(s.records for _, s in conv_sources) if conv_sources
                      else merged_source.records)
            sink = _GroupSink(store, layout.CONVERGED_GROUP, _out_chunking(ref.chunking(), n_conv))
            stream = (merge_blocks(conv_sources, dedup=True) if conv_sources
                      else iter(merged_source))
            for block in stream:
                sink.append(block)
                if fault is not None:
                    fault()
            found = [p for _, s in conv_sources for p in s.problems()]
            info = {**sink.close(), "ranks": [r for r, _ in conv_sources]}
            # to disk now, with whatever else was written so far: the last sync, on the
            # critical path after the trajectories, then has less to do
            store.sync()
            return info, found

        conv_job = pool.submit(converged)
        sources = {h: [(u, open_source(u, ("record",))) for u in t.units]
                   for h, t in trajectories.items()}
        total += sum(s.nbytes for ss in sources.values() for _, s in ss)
        total += sum(t.atom_bytes for t in trajectories.values())
        total += sum(s.nbytes for _, s in conv_sources)
        total += merged_source.nbytes if merged_source is not None else 0
        bar.total = total
        for h, t in trajectories.items():
            bar.set_label(f"consolidate {h}")
            info, more = t.finish(sources[h])
            problems.extend(more)
            summary["hooks"][h] = info
        if conv_sources or merged_source is not None:
            bar.set_label("consolidate converged")
        summary["converged"], more = conv_job.result()
        problems.extend(more)
        # an error above propagates as it is; the pool shutdown below waits for the others
        if csv_hooks:
            bar.set_label("consolidate logs")
        csv_info, more = csv_job.result()
        summary["hooks"].update(csv_info)
        problems.extend(more)
    except DamageError as exc:
        raise DamageError(_refusal(run_dir, exc.places), exc.places) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if problems:
        raise DamageError(_refusal(run_dir, problems), problems)
    _consolidate_metadata(store)
    store.sync()
    sync_dir(tmp / layout.LOGS_DIR) if (tmp / layout.LOGS_DIR).is_dir() else None
    return summary


def _out_chunking(c: dict[str, int], records: int) -> dict[str, int]:
    """A group's chunking ``c``, with larger record chunks for an output of ``records``
    records: a live run keeps record chunks small (they are rewritten as they fill), an output
    is written once, and zarr's cost per chunk dominated writing small ones (measured). Chunks
    stay within a 16th of the output, so a small output does not stage large buffers."""
    c = dict(c)
    want = min(OUT_CHUNK_RECORDS, max(records // 16, 1))
    if c["chunk_records"] < want:
        # the writer stages a whole shard per column: shards of 4 chunks
        c["chunk_records"] = want
        c["chunks_per_shard"] = OUT_SHARD_RECORDS // OUT_CHUNK_RECORDS
    return c


def _array_chunking(meta: dict) -> tuple[int, int]:
    """``(rows per chunk, chunks per shard or 0)`` from an array's ``zarr.json``."""
    lay = parse_array(meta)
    return lay.chunk_rows, lay.chunks_per_shard


class _Trajectory:
    """One consolidated trajectory group in the indexed layout (docs/format.md).

    On construction, from the manifest and the groups' metadata only: the atom fields, one
    :class:`~.atom_segments.Segment` per rank (placed, so each record's ``atoms_start`` is
    known) and the record writer. :meth:`start` copies the atom arrays in the background;
    :meth:`finish` merges the records, ordered by (step, rank, sample_id), with
    ``atoms_start`` and ``n_atoms`` pointing into the segments, and waits for the copy.
    """

    def __init__(self, store: AtomicLocalStore, group: str, units: list[Unit],
                 root: Callable[[Unit], Path], files: dict[tuple[int, str], dict],
                 bar: Progress, fault: Callable[[], None] | None, checksums: bool) -> None:
        from .atom_segments import Segment, SegmentWriter

        self.store, self.group, self.units, self.fault = store, group, units, fault
        levels: dict[str, str] = {}
        for u in units:  # the schema, from the first rank whose group is there
            meta_file = root(u) / layout.DATA_DIR / u.group / "zarr.json"
            u.path(root(u))
            if meta_file.is_file():
                try:
                    levels = dict(json.loads(meta_file.read_bytes())["attributes"]["level"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise DamageError(f"{u.rel}/zarr.json: cannot be read ({exc})") from exc
                ref = u
                break
        else:
            raise DamageError(f"{units[0].rel}: group missing (committed {units[0].records} "
                              f"records)")
        self.levels = levels
        self.atom_fields = [n for n, lvl in levels.items() if lvl == "atom"]
        rec_fields = [n for n, lvl in levels.items() if lvl == "record"]
        self.segments = [
            Segment(rank=u.rank, data_root=root(u) / layout.DATA_DIR, group=u.group,
                    place=u.rel, atoms=u.atoms,
                    expect_crc={k: v for k, v in (u.info.get("crc32") or {}).items()
                                if k in self.atom_fields},
                    files=files.get((u.rank, u.hook), {}))
            for u in units]
        self.atoms = SegmentWriter(store, group, self.atom_fields, self.segments, progress=bar,
                                   workers=4, on_piece=fault,
                                   checksums=checksums)
        chunking = {"chunk_records": 1024, "chunk_atoms": 65536, "chunks_per_shard": 0}
        if rec_fields:
            try:
                meta = json.loads((root(ref) / layout.DATA_DIR / ref.group / rec_fields[0]
                                   / "zarr.json").read_bytes())
                rows, per_shard = _array_chunking(meta)
            except (OSError, ValueError, KeyError) as exc:
                raise DamageError(f"{ref.rel}/{rec_fields[0]}: metadata cannot be read "
                                  f"({exc})") from exc
            chunking.update(chunk_records=rows, chunks_per_shard=per_shard)
        # created before the atom arrays exist: the writer refuses a group holding arrays
        # it did not write
        # records carry no atoms of their own: no atoms_ptr in this layout
        self.sink = _GroupSink(store, group, _out_chunking(chunking, sum(u.records for u in units)),
                               atoms_ptr=False)
        self.atom_bytes = sum(
            u.atoms * int(np.prod(self.atoms.metas[f]["shape"][1:], dtype=np.int64))
            * np.dtype(self.atoms.metas[f]["data_type"]).itemsize
            for u in units for f in self.atom_fields)
        self._copying: Any = None

    def start(self, pool: ThreadPoolExecutor) -> None:
        self._copying = pool.submit(self.atoms.run)

    def finish(self, sources: list[tuple[Unit, ZarrSource]]) -> tuple[dict, list[str]]:
        def located(s: ZarrSource, start: int) -> Iterator[CsrBlock]:
            base = 0
            for b in s:
                rec = dict(b.rec)
                rec[layout.ATOMS_START] = (start + base + b.ptr[:-1]).astype(np.int64)
                rec[layout.N_ATOMS] = np.diff(b.ptr).astype(np.int64)
                base += int(b.ptr[-1])
                yield CsrBlock(rec, {}, np.zeros(len(b) + 1, np.int64))

        merged = [(u.rank, located(s, sg.start)) for (u, s), sg in zip(sources, self.segments)]
        try:
            for block in merge_blocks(merged):
                self.sink.append(block)
                if self.fault is not None:
                    self.fault()
        finally:
            problems = self._copying.result()
        for _, s in sources:
            problems.extend(s.problems())
        levels = dict(self.levels)
        levels.setdefault("rank", "record")
        seg_info = [{"rank": sg.rank, "start": sg.start, "atoms": sg.atoms,
                     "crc32": sg.expect_crc} for sg in self.segments]
        checked = [{"rank": sg.rank, "checked": dict(sorted(sg.checked.items()))}
                   for sg in self.segments]
        # the group's level map names the atom fields (written by the segment writer) too;
        # atoms_start/n_atoms are layout arrays, not fields
        info = self.sink.close({"level": levels, "atoms_layout": layout.INDEXED,
                                "segments": seg_info})
        rec_crc = {k: v for k, v in info["crc32"].items()
                   if k not in (layout.ATOMS_START, layout.N_ATOMS)}
        return ({"kind": "zarr", "group": self.group, "layout": layout.INDEXED,
                 "records": info["records"], "atoms": sum(sg.atoms for sg in self.segments),
                 "atom_rows": self.atoms.rows, "crc32": rec_crc, "segments": seg_info,
                 "checked": checked, "ranks": [u.rank for u in self.units]}, problems)


def _consolidate_metadata(store: AtomicLocalStore) -> None:
    """Consolidated Zarr metadata at the output root: the output never changes after it is
    written, so (unlike a live run's) it cannot go stale, and ``zarr.open_group`` is one read.
    Written from the nodes' documents (:func:`~dist_hooks.store.raw_group_writer.consolidate_metadata`:
    the bytes zarr writes, without its cost)."""
    consolidate_metadata(store)
