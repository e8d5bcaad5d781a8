"""Per-rank, per-hook, append-only Zarr v3 writer of one record group in CSR layout.

One :class:`GroupWriter` owns one group ``ranks/rank-XXXXX/<hook>`` (exactly one writing process
per array: two processes appending to one Zarr array lose rows). The group holds

* record-level columns, shape ``(R, ...)`` (step, sample_id, status, energy, cell, ...),
* atom-level columns, shape ``(A, ...)`` (positions, forces, atomic_numbers, ...),
* ``atoms_ptr`` int64 ``(R+1,)``: CSR offsets, record ``r`` owns atom rows
  ``atoms_ptr[r]:atoms_ptr[r+1]``; ``atoms_ptr[0] == 0``.

Why it is built this way (upstream's sink did the opposite of each point):

* O(1) per append: the running atom total lives in memory (``atoms_ptr`` is read once, when an
  existing group is reopened); appends are copied into one preallocated staging buffer per array
  and Zarr is only written when a whole write unit is complete (a shard when sharding is on, a
  chunk otherwise), plus the partial tail at :meth:`GroupWriter.flush`. Appends smaller than a
  unit touch no file; a completed unit is written once, never read back.
* Explicit chunks on every array (never zarr's 1-row default for empty arrays), trailing
  dimensions whole, and sharding to keep the file count low. Arrays it creates name their
  dimensions and carry their units (:meth:`~.array_layout.ArraySpec.of_field`); arrays of a
  reopened group keep the metadata they have.
* Shapes move only at :meth:`GroupWriter.flush` (and :meth:`~GroupWriter.truncate`). Whole units
  written between flushes lie past the persisted shape, invisible to readers, until the next
  flush writes the tail and then saves every array's ``zarr.json``: atom arrays first, record
  arrays next, ``atoms_ptr`` last (truncation goes the other way). So the persisted shapes always
  describe a consistent, fully written prefix: the state of the last completed flush, or a
  prefix of it if a flush was killed half-way. Readers and a reopened writer never see rows
  that were not written; the coordinator still truncates to the committed lengths it recorded,
  because only those are promised across ranks.
* Every file is replaced atomically (:mod:`.atomic_store`: temporary + rename in a directory; one
  PUT per object in an object store, :mod:`.object_zarr_store`): completing a unit whose partial
  tail was flushed earlier rewrites that file, and a kill during the rewrite keeps the old one.
  The writer uses nothing of its store beyond zarr's ``Store`` and
  :class:`~.record_store.RecordStore`, so both backends get the same files, byte for byte.
* Resume: a new writer on an existing group continues after the existing data (schema from the
  arrays, lengths from the shapes and ``atoms_ptr``); :meth:`GroupWriter.truncate` drops anything
  past the committed lengths first.

Not thread-safe: one writer object is driven by one thread (the rank's background writer).
Memory: one write unit per array is staged (default 16 x 65536 atom rows, about 50 MB for
positions + velocities + forces + numbers + masses), committed by the OS only as it fills.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.sync import sync as _zsync

from ..errors import DamageError, SchemaChangedError
from .array_layout import (DEFAULT_CHUNK_ATOMS, DEFAULT_CHUNK_RECORDS, DEFAULT_CHUNKS_PER_SHARD,
                           ArraySpec, CompressorLike, make_compressors)
from .atomic_store import AtomicLocalStore, FsyncPolicy
from .layout import ATOMS_PTR, group_attrs
from .record_store import RecordStore
from .shard_files import key_row_block
from .staged_array import StagedArray, save_shapes, with_rows, write_regions

Level = Literal["record", "atom"]
WriteUnit = Literal["shard", "chunk"]

__all__ = ["GroupWriter", "WriteUnit"]


def _as_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"field {name!r}: unsupported dtype {arr.dtype} (numeric or bool only)")
    if arr.ndim == 0:
        raise ValueError(f"field {name!r}: expected an array with a leading row axis, got a scalar")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


class GroupWriter:
    """Append-only writer of one record group (see module docstring).

    Parameters
    ----------
    root : the Zarr root directory (``RUN/data.zarr``), or a record store on the Zarr root
        (:class:`~.atomic_store.AtomicLocalStore`, :class:`~.object_zarr_store.ObjectZarrStore`).
    group_path : group inside the root, e.g. ``layout.hook_group(rank, hook)``.
    chunk_records, chunk_atoms : rows per chunk for record- and atom-level arrays.
    chunks_per_shard : chunks per shard along the row axis; 0/None disables sharding.
    compressor : "zstd" (default), "blosc", "none", or a zarr ``BytesBytesCodec``.
    attrs : extra group attributes (merged into the format attributes).
    write_unit : "shard" (default): stage a whole shard per array before writing it, so each
        shard file is written once and never read back; "chunk": write each completed chunk
        (the sharding codec then reads, merges and rewrites the whole shard each time; measured
        3-4x slower). Without sharding both mean "chunk".
    fsync : fsync policy of the store created for ``root`` (ignored when a store is passed).

    Chunk settings apply to arrays this writer creates; a reopened group keeps its own.
    """

    def __init__(
        self,
        root: str | Path | RecordStore,
        group_path: str,
        *,
        chunk_records: int = DEFAULT_CHUNK_RECORDS,
        chunk_atoms: int = DEFAULT_CHUNK_ATOMS,
        chunks_per_shard: int | None = DEFAULT_CHUNKS_PER_SHARD,
        compressor: CompressorLike = "zstd",
        attrs: Mapping[str, Any] | None = None,
        write_unit: WriteUnit = "shard",
        fsync: FsyncPolicy = "replace",
    ) -> None:
        if int(chunk_records) < 1 or int(chunk_atoms) < 1:
            raise ValueError("chunk_records and chunk_atoms must be >= 1")
        if chunks_per_shard is not None and int(chunks_per_shard) < 0:
            raise ValueError("chunks_per_shard must be >= 0 (0/None: no sharding)")
        if write_unit not in ("shard", "chunk"):
            raise ValueError(f"write_unit must be 'shard' or 'chunk', got {write_unit!r}")
        if isinstance(root, (str, os.PathLike)):
            self.store: RecordStore = AtomicLocalStore(root, fsync=fsync)
        elif isinstance(root, RecordStore):
            self.store = root
        else:
            raise TypeError(f"GroupWriter: root must be a path or a RecordStore, got {root!r}")
        self.group_path = group_path.strip("/")
        self.chunk_records = int(chunk_records)
        self.chunk_atoms = int(chunk_atoms)
        self.shard_chunks = int(chunks_per_shard or 0)
        self.compressors = make_compressors(compressor)
        self.write_unit: WriteUnit = write_unit
        self._closed = False
        self._failed: BaseException | None = None
        self._cols: dict[str, StagedArray] = {}
        self._ptr: StagedArray | None = None
        self._n_records = 0
        self._n_atoms = 0
        self._committed = {"records": 0, "atoms": 0}
        self._extra_attrs = dict(attrs or {})

        self.group = zarr.open_group(self.store, path=self.group_path, mode="a", zarr_format=3,
                                     use_consolidated=False)
        # one writer per group: anything temporary in here was left by a killed predecessor
        self.store.remove_temporaries(self.group_path)
        self._open_existing()
        want = group_attrs({n: c.level for n, c in self._cols.items()}, self._extra_attrs)
        if any(self.group.attrs.get(k) != v for k, v in want.items()):
            self.group.attrs.update(want)

    # ------------------------------------------------------------------ state
    @property
    def fields(self) -> dict[str, tuple[str, np.dtype, tuple[int, ...]]]:
        """``name -> (level, dtype, trailing shape)``; empty until the first append."""
        return {n: (c.level, c.dtype, c.trailing) for n, c in self._cols.items()}

    @property
    def lengths(self) -> dict[str, int]:
        """Rows appended so far, buffered ones included."""
        return {"records": self._n_records, "atoms": self._n_atoms}

    def committed_lengths(self) -> dict[str, int]:
        """Lengths as of the last :meth:`flush` (or found when opening): exactly the persisted
        shapes. Record these in the manifest after :meth:`sync`."""
        return dict(self._committed)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("GroupWriter is closed")
        if self._failed is not None:
            raise RuntimeError(
                f"GroupWriter of {self.group_path!r} failed earlier ({self._failed!r}); open a new "
                f"writer and truncate() to the committed lengths") from self._failed

    def _run(self, coro: Any) -> Any:
        """Run a write coroutine. An I/O error poisons the writer: its buffers may be half
        consumed, and the resume path (new writer + truncate to committed) is the safe one."""
        try:
            return _zsync(coro)
        except BaseException as exc:
            self._failed = exc
            raise

    def _all_cols(self) -> list[StagedArray]:
        cols = list(self._cols.values())
        if self._ptr is not None:
            cols.append(self._ptr)
        return cols

    def _targets(self, n_rec: int, n_atoms: int) -> dict[str, int]:
        t = {n: (n_rec if c.level == "record" else n_atoms) for n, c in self._cols.items()}
        t[ATOMS_PTR] = n_rec + 1
        return t

    # ----------------------------------------------------------------- arrays
    def _unit_of(self, arr: zarr.Array) -> int:
        """Write unit of an existing array, from *its* chunk/shard shape (a reopening writer may
        have been given other settings; writes must stay aligned with what is on disk)."""
        if arr.shards is not None and self.write_unit == "shard":
            return int(arr.shards[0])
        return int(arr.chunks[0])

    def _create_array(self, name: str, level: str, dtype: np.dtype,
                      trailing: tuple[int, ...]) -> StagedArray:
        spec = ArraySpec.of_field(name, level, dtype, trailing, self.chunk_atoms if level ==
                                  "atom" else self.chunk_records, self.shard_chunks,
                                  self.compressors)
        arr = self.group.create_array(name, **spec.zarr_arguments(), overwrite=True)
        return StagedArray(name, level, arr.async_array, self._unit_of(arr))

    def _remove_chunk_files(self, col: StagedArray, keep_rows: int) -> None:
        """Delete files of row blocks at or past ``keep_rows`` (whole shards/chunks only).

        Lists the array's folder instead of trusting in-memory extents, so it also removes
        units that a killed predecessor wrote past its last flush.
        """
        first = -(-keep_rows // col.outer)
        folder = f"{self.group_path}/{col.name}"
        for name in self.store.list_folder(folder).files:
            i = key_row_block(name)
            if i is not None and i >= first:
                self.store.delete_sync(f"{folder}/{name}")

    def _open_existing(self) -> None:
        arrays = {n: a for n, a in self.group.arrays()}
        level_map: dict[str, str] = dict(self.group.attrs.get("level", {}) or {})
        if not arrays and not level_map:
            return
        missing = [n for n in level_map if n not in arrays]
        if ATOMS_PTR not in arrays or missing or not level_map:
            if all(a.shape[0] <= (1 if n == ATOMS_PTR else 0) for n, a in arrays.items()):
                # killed before or during the first append's array creation: nothing was ever
                # committed; the first append recreates the arrays (overwrite=True)
                return
            raise DamageError(
                f"group {self.group_path!r} is damaged: arrays {missing or [ATOMS_PTR]} are "
                f"missing but others hold data")
        unknown = [n for n in arrays if n not in level_map and n != ATOMS_PTR]
        if unknown:
            warnings.warn(f"group {self.group_path!r}: ignoring arrays without a level: {unknown}",
                          stacklevel=3)
        for name, level in level_map.items():
            if level not in ("record", "atom"):
                raise DamageError(f"group {self.group_path!r}: bad level {level!r} for {name!r}")
            self._cols[name] = StagedArray(name, level, arrays[name].async_array,
                                       self._unit_of(arrays[name]))
        self._ptr = StagedArray(ATOMS_PTR, "ptr", arrays[ATOMS_PTR].async_array,
                            self._unit_of(arrays[ATOMS_PTR]))

        # the one read of the whole atoms_ptr (O(R), once per open): find the consistent prefix
        ptr = np.asarray(arrays[ATOMS_PTR][:], dtype=np.int64)
        if len(ptr) and ptr[0] != 0:
            raise DamageError(f"group {self.group_path!r} is damaged: atoms_ptr[0] = {ptr[0]}")
        n_rec = max(len(ptr) - 1, 0)
        bad = np.flatnonzero(np.diff(ptr) < 0)
        if len(bad):
            n_rec = min(n_rec, int(bad[0]))
        n_rec = min([n_rec, *(c.saved for c in self._cols.values() if c.level == "record")])
        atom_lens = [c.saved for c in self._cols.values() if c.level == "atom"]
        if atom_lens and len(ptr):
            n_rec = min(n_rec, int(np.searchsorted(ptr[: n_rec + 1], min(atom_lens),
                                                   side="right")) - 1)
        n_rec = max(n_rec, 0)
        n_atoms = int(ptr[n_rec]) if len(ptr) else 0

        targets = self._targets(n_rec, n_atoms)
        if any(c.saved > targets[c.name] for c in self._all_cols()):
            self._shrink(targets)
        for col in self._all_cols():
            # files past the shape: units a killed predecessor wrote after its last flush
            self._remove_chunk_files(col, targets[col.name])
            # reload the partial trailing unit so later appends complete it in memory
            col.reload_tail(targets[col.name], ptr if col is self._ptr else None)
        if len(ptr) == 0:
            self._ptr.set_tail(0, np.zeros(1, np.int64))
        self._n_records, self._n_atoms = n_rec, n_atoms
        self._committed = {"records": n_rec, "atoms": n_atoms}

    def _shrink(self, targets: dict[str, int]) -> None:
        """Cut arrays to ``targets`` rows: persisted shapes first (``atoms_ptr``, then records,
        then atoms: the reverse of growth), then delete whole files past them."""
        cols = [c for c in self._all_cols() if c.written > targets[c.name]]
        # only shapes that are too long are saved: one never persisted past ``saved`` stays
        # where it is (growing it here could publish atoms_ptr ahead of the atom arrays)
        shrink_saved = [c for c in cols if c.saved > targets[c.name]]
        for c in cols:
            c.arr = with_rows(c.arr, targets[c.name])
            c.written = targets[c.name]
        self._run(save_shapes(shrink_saved, ("ptr", "record", "atom")))
        for c in cols:
            self._remove_chunk_files(c, targets[c.name])

    def _create_schema(self, rec: dict[str, np.ndarray], at: dict[str, np.ndarray]) -> None:
        level = {**{n: "record" for n in rec}, **{n: "atom" for n in at}}
        # attributes first: a reopened writer knows every array's level even if killed below
        self.group.attrs.update(group_attrs(level, self._extra_attrs))
        cols = {}
        for n, a in rec.items():
            cols[n] = self._create_array(n, "record", a.dtype, tuple(a.shape[1:]))
        for n, a in at.items():
            cols[n] = self._create_array(n, "atom", a.dtype, tuple(a.shape[1:]))
        ptr = self._create_array(ATOMS_PTR, "record", np.dtype(np.int64), ())
        ptr.level = "ptr"
        ptr.set_tail(0, np.zeros(1, np.int64))
        self._cols = cols
        self._ptr = ptr

    def _check_schema(self, records: dict[str, np.ndarray], atoms: dict[str, np.ndarray]) -> None:
        given = {**{n: ("record", a) for n, a in records.items()},
                 **{n: ("atom", a) for n, a in atoms.items()}}
        new = [f"{n!r} ({lvl})" for n, (lvl, _) in given.items() if n not in self._cols]
        if new:
            raise SchemaChangedError(
                f"new field(s) {', '.join(new)} not in the schema fixed by the first append "
                f"({sorted(self._cols)}) of group {self.group_path!r}")
        missing = [f"{n!r} ({c.level})" for n, c in self._cols.items() if n not in given]
        if missing:
            raise SchemaChangedError(
                f"field(s) {', '.join(missing)} missing from this append; the schema of group "
                f"{self.group_path!r} was fixed by the first append")
        for n, (lvl, a) in given.items():
            c = self._cols[n]
            if c.level != lvl:
                raise SchemaChangedError(f"field {n!r}: was {c.level}-level, now given as {lvl}-level")
            if a.dtype != c.dtype or tuple(a.shape[1:]) != c.trailing:
                raise SchemaChangedError(
                    f"field {n!r}: schema has dtype {c.dtype} and trailing shape {c.trailing}, "
                    f"this append has dtype {a.dtype} and trailing shape {tuple(a.shape[1:])}")

    # ----------------------------------------------------------------- append
    def append(self, records: Mapping[str, Any], atoms: Mapping[str, Any],
               n_atoms: Any) -> None:
        """Append R records and their A atoms (no Python loop over records).

        ``records[name]`` has shape ``(R, ...)``, ``atoms[name]`` ``(A, ...)``, ``n_atoms`` is
        ``(R,)`` with ``sum == A``. The inputs are copied before returning, so the caller may
        reuse its (pinned) buffers. Writes happen only when a whole write unit is complete.
        """
        self._check_usable()
        counts = np.asarray(n_atoms)
        if counts.ndim != 1 or (counts.size and counts.dtype.kind not in "iu"):
            raise ValueError(f"n_atoms must be a 1-D integer array, got {counts.dtype} "
                             f"{counts.shape}")
        n_rec = counts.shape[0]
        if n_rec == 0:
            return
        counts = counts.astype(np.int64, copy=False)
        if (counts < 0).any():
            raise ValueError("n_atoms must be non-negative")
        ptr_new = np.cumsum(counts)
        n_at = int(ptr_new[-1])
        rec = {n: _as_array(n, v) for n, v in records.items()}
        at = {n: _as_array(n, v) for n, v in atoms.items()}
        both = set(rec) & set(at)
        if both or ATOMS_PTR in rec or ATOMS_PTR in at:
            raise ValueError(f"field names must be unique across levels and not {ATOMS_PTR!r}: "
                             f"{sorted(both) or ATOMS_PTR}")
        for n, a in rec.items():
            if a.shape[0] != n_rec:
                raise ValueError(f"record field {n!r} has {a.shape[0]} rows, expected {n_rec}")
        for n, a in at.items():
            if a.shape[0] != n_at:
                raise ValueError(f"atom field {n!r} has {a.shape[0]} rows, expected "
                                 f"sum(n_atoms) = {n_at}")

        if self._ptr is None:
            self._create_schema(rec, at)
        else:
            self._check_schema(rec, at)
        assert self._ptr is not None

        ptr_new += self._n_atoms
        pushes = [(self._cols[n], a) for n, a in rec.items()]
        pushes += [(self._cols[n], a) for n, a in at.items()]
        pushes.append((self._ptr, ptr_new))
        jobs = [(c, j) for c, a in pushes if (j := c.push(a))]
        self._n_records += n_rec
        self._n_atoms += n_at
        if jobs:
            self._run(write_regions(jobs))
        for c, _ in jobs:
            c.commit()

    # ------------------------------------------------------------ flush/sync
    def flush(self) -> None:
        """Write the partial trailing units, then publish every array's new shape.

        The tail stays staged in memory: when later appends complete its unit, the whole unit is
        rewritten (atomically) from memory, never read back.
        """
        self._check_usable()
        if self._ptr is None:
            return
        cols = self._all_cols()
        jobs = [(c, [(c.base, c.tail())]) for c in cols if c.written != c.length]

        async def run() -> None:
            await write_regions(jobs)
            await save_shapes(cols, ("atom", "record", "ptr"))

        self._run(run())
        self._committed = {"records": self._n_records, "atoms": self._n_atoms}

    def sync(self) -> None:
        """:meth:`flush`, then fsync everything written through the store (checkpoint boundary)."""
        self.flush()
        self.store.sync()

    def take_file_checksums(self) -> dict[str, list[int]]:
        """``{"<atom array>/<shard file>": [bytes, crc32]}`` of the atom arrays' files written
        since the last call, as last written: for the commit record, right after :meth:`sync`.

        Why: a full shard is written once and never changed, so a checksum of the file taken
        when it was written lets ``dist-hooks consolidate`` check it at crc32 speed instead of
        decoding every row. The trailing shard is reported again whenever it was rewritten.
        """
        taken = self.store.take_checksums(f"{self.group_path}/")
        atom = {n for n, c in self._cols.items() if c.level == "atom"}
        out = {}
        for key, (size, crc) in taken.items():
            rel = key[len(self.group_path) + 1:]
            name, _, file = rel.partition("/")
            if name in atom and file.startswith("c"):
                out[rel] = [int(size), int(crc)]
        return dict(sorted(out.items()))

    def truncate(self, records: int, atoms: int) -> None:
        """Shrink every array back to ``records`` records and ``atoms`` atom rows.

        For resume after a crash: call with the committed lengths from the manifest. ``atoms``
        must equal ``atoms_ptr[records]`` (checked; it costs at most one element read).
        """
        self._check_usable()
        records, atoms = int(records), int(atoms)
        if not (0 <= records <= self._n_records and 0 <= atoms <= self._n_atoms):
            raise ValueError(f"cannot truncate to records={records}, atoms={atoms}: current "
                             f"lengths are {self.lengths}")
        if self._ptr is None:
            return
        ptr = self._ptr
        if records >= ptr.base:
            at_r = int(ptr.tail()[records - ptr.base])
        else:
            at_r = int(np.asarray(_zsync(ptr.arr.getitem(slice(records, records + 1))))[0])
        if at_r != atoms:
            raise ValueError(f"truncate: atoms={atoms} does not match atoms_ptr[{records}]={at_r}")
        targets = self._targets(records, atoms)
        self._shrink(targets)
        for col in self._all_cols():
            n = targets[col.name]
            if n >= col.base:
                col.fill = n - col.base
            else:
                col.reload_tail(n)
        self._n_records, self._n_atoms = records, atoms
        self._committed = {"records": min(self._committed["records"], records),
                           "atoms": min(self._committed["atoms"], atoms)}

    def close(self) -> None:
        """Flush and stop accepting appends (idempotent). Durability needs :meth:`sync`."""
        if not self._closed:
            try:
                if self._failed is None:
                    self.flush()
            finally:
                self._closed = True

    def __enter__(self) -> GroupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.store.root if isinstance(self.store, AtomicLocalStore) else self.store
        return (f"GroupWriter({str(where)!r}, {self.group_path!r}, "
                f"lengths={self.lengths}, committed={self._committed})")
