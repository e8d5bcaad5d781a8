"""One array of a :class:`~.group_writer.GroupWriter` and its staging buffer, and the zarr writes
of whole row regions and of shapes.

Why apart from the group logic: this is where the append path's costs are decided (one copy
into a reused stage per append, only whole write units written, shapes saved only at flush;
see the group writer's module docstring); the group writer decides *what* to write and in
which order the shapes are published.

Whole shards go straight to shard files (:class:`ShardFiles`): the chunks are compressed by
numcodecs' zstd and the file written through the record store (a directory's atomic store, or
an object store's: one PUT), the same bytes zarr's sharding
codec writes, without zarr's per-chunk asyncio and buffer machinery. Why: that machinery runs
Python on the writer's side of the GIL, which is time the simulation thread waits for (measured
by ``benchmarks/bench_writer_gil.py``: see docs/performance.md). Any other layout, and a region
that does not start on a shard, goes through zarr.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numcodecs
import numpy as np
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as _zsync

from .array_layout import parse_array
from .record_store import RecordStore
from .shard_files import ShardLayout, encode_rows

__all__ = ["RAW_SHARD_WRITES", "ShardFiles", "StagedArray", "save_shapes", "with_rows",
           "write_regions"]

#: whole shards written as shard files by :class:`ShardFiles` (False: every write through zarr's
#: codec pipeline, as before; the tests compare the two)
RAW_SHARD_WRITES = True


def with_rows(arr: AsyncArray, rows: int) -> AsyncArray:
    """The same array with another row count, in memory only (nothing is written)."""
    md = arr.metadata.update_shape((rows, *arr.metadata.shape[1:]))
    return AsyncArray(metadata=md, store_path=arr.store_path, config=arr.config)


async def _save_metadata(arr: AsyncArray) -> None:
    # the array's zarr.json (what zarr's save_metadata does, without the parents logic)
    bufs = arr.metadata.to_buffer_dict(default_buffer_prototype())
    await asyncio.gather(*((arr.store_path / key).set(buf) for key, buf in bufs.items()))


class StagedArray:
    """One array and its host-side staging buffer.

    * ``[0, base)``: on disk in whole write units, never touched again by appends;
    * ``[base, base + fill)``: in ``stage`` (one unit, allocated once and reused: an append is a
      single copy into warm memory, no per-append allocation or concatenation);
    * ``written``: rows covered by chunk files (``arr``'s in-memory shape), ``>= base``;
    * ``saved``: the shape persisted in ``zarr.json`` (what readers see), ``<= written``.

    ``base`` is a multiple of ``unit``.
    """

    __slots__ = ("name", "level", "dtype", "trailing", "unit", "arr", "base", "fill", "written",
                 "saved", "_stage", "_next", "_files")

    def __init__(self, name: str, level: str, arr: AsyncArray, unit: int) -> None:
        self.name = name
        self.level = level  # "record" | "atom" | "ptr"
        self.arr = arr
        self.dtype = np.dtype(arr.metadata.dtype.to_native_dtype())
        self.trailing = tuple(int(d) for d in arr.metadata.shape[1:])
        self.unit = unit
        self.base = 0
        self.fill = 0
        self.written = self.saved = int(arr.metadata.shape[0])
        self._stage: np.ndarray | None = None
        self._next: tuple[int, np.ndarray] | None = None
        self._files: ShardFiles | None | bool = False  # False: not looked at yet

    @property
    def length(self) -> int:
        return self.base + self.fill

    @property
    def outer(self) -> int:
        """Rows per file (shard, or chunk when unsharded)."""
        return int(self.arr.metadata.chunk_grid.chunk_shape[0])

    def shard_files(self) -> "ShardFiles | None":
        """The shard-file writer of this array when whole shards are staged (write unit
        "shard") and its layout is one :class:`ShardFiles` writes; ``None`` otherwise."""
        if self._files is False:
            self._files = (ShardFiles.of(self.arr) if RAW_SHARD_WRITES and self.unit ==
                           self.outer else None)
        return self._files  # type: ignore[return-value]

    def stage(self) -> np.ndarray:
        if self._stage is None:
            # np.empty: pages are only committed as rows are filled
            self._stage = np.empty((self.unit, *self.trailing), self.dtype)
        return self._stage

    def tail(self) -> np.ndarray:
        """The buffered rows ``[base, base + fill)`` (a view)."""
        return self.stage()[: self.fill]

    def push(self, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Buffer ``x``; return the whole units it completes as ``(start, rows)`` write jobs.

        The jobs may reference the stage and ``x`` itself (written synchronously before
        ``append`` returns); :meth:`commit` must follow once they are written.
        """
        n, unit, fill = len(x), self.unit, self.fill
        if fill + n < unit:
            self.stage()[fill: fill + n] = x
            self.fill = fill + n
            return []
        jobs: list[tuple[int, np.ndarray]] = []
        pos, i = self.base, 0
        if fill:
            st = self.stage()
            i = unit - fill
            st[fill:] = x[:i]
            jobs.append((pos, st))
            pos += unit
        m = (n - i) // unit * unit
        if m:
            jobs.append((pos, x[i: i + m]))
            pos += m
        self._next = (pos, x[i + m:])
        return jobs

    def commit(self) -> None:
        """After the jobs of :meth:`push` are on disk: keep only the leftover rows (copied)."""
        if self._next is not None:
            pos, rest = self._next
            self._next = None
            self.set_tail(pos, rest)

    def set_tail(self, base: int, rows: np.ndarray) -> None:
        k = len(rows)
        if k:
            self.stage()[:k] = rows
        self.base, self.fill = base, k

    def reload_tail(self, n: int, whole: np.ndarray | None = None) -> None:
        """Stage the rows of the unit that row ``n`` falls in, up to ``n``, read back from disk
        (or taken from ``whole``, the array's rows already in memory)."""
        base = n // self.unit * self.unit
        self.set_tail(base, whole[base:n] if whole is not None else
                      np.asarray(_zsync(self.arr.getitem(slice(base, n)))))


class ShardFiles:
    """Whole shards of one array written as shard files, the bytes zarr writes (chunks equal to
    the fill value left out, a file without chunks deleted), through the array's record store
    (:class:`~.record_store.RecordStore`: a directory's atomic store, or an object store's).

    Only for the layout :class:`~.group_writer.GroupWriter` creates by default: sharded, regular
    rows, ``bytes`` (little-endian) + zstd inner codecs, index at the end, fill value 0, a
    numeric or bool dtype (not complex: zarr compares complex values, not bits, with the fill).
    A region must start on a shard and cover it up to the array's last row (the rows after it
    in the file are not kept, where zarr would merge the file's old chunks back in: those lie
    past every shape, so no reader sees the difference)."""

    __slots__ = ("store", "prefix", "lay", "codec")

    def __init__(self, store: RecordStore, prefix: str, lay: ShardLayout, codec: Any) -> None:
        self.store, self.prefix, self.lay, self.codec = store, prefix, lay, codec

    @classmethod
    def of(cls, arr: AsyncArray) -> "ShardFiles | None":
        store = arr.store_path.store
        if not isinstance(store, RecordStore):  # a plain zarr store: zarr writes everything
            return None
        try:
            layout = parse_array(arr.metadata.to_dict())
        except (ValueError, TypeError):
            return None
        lay = ShardLayout.of_layout(layout)
        if lay is None or not lay.index_at_end or lay.dtype.kind not in "biuf" or \
                lay.fill_value not in (0, False) or 0 in lay.trailing or \
                lay.dtype.byteorder == ">" or len(layout.codecs) != 2 or \
                layout.codecs[1].get("name") != "zstd":
            return None
        conf = layout.codecs[1].get("configuration") or {}
        codec = numcodecs.Zstd(level=int(conf.get("level", 0)),
                               checksum=bool(conf.get("checksum", False)))
        return cls(store, arr.store_path.path, lay, codec)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, start + len(rows))``, ``start`` on a shard (see the class docstring)."""
        per, lay = self.lay.shard_rows, self.lay
        assert start % per == 0
        for a in range(0, len(rows), per):
            key = f"{self.prefix}/{lay.shard_key((start + a) // per)}"
            data = encode_rows(rows[a: a + per], lay.chunk_rows, lay.chunks_per_shard,
                               self.codec, keep_zero_chunks=False)
            if data is None:
                self.store.delete_sync(key)
            else:
                self.store.put_bytes(key, data)


async def write_regions(jobs: list[tuple[StagedArray, list[tuple[int, np.ndarray]]]]) -> None:
    """Write row regions to chunk files; shapes grow in memory only (see module docstring).

    Arrays are written concurrently (compression runs in threads and releases the GIL).
    """

    async def write(col: StagedArray, regions: list[tuple[int, np.ndarray]]) -> None:
        end = max(s + len(d) for s, d in regions)
        target = with_rows(col.arr, end) if end > col.written else col.arr
        files = col.shard_files()
        # sequential within one array: two regions may share a shard (write_unit="chunk"), and
        # the sharding codec's read-merge-write of one shard file must not race with itself
        for s, d in regions:
            if not len(d):
                continue
            if files is not None and s % col.outer == 0:
                await asyncio.to_thread(files.write, s, d)
            else:
                await target.setitem(slice(s, s + len(d)), d)
        col.arr, col.written = target, max(end, col.written)

    await asyncio.gather(*(write(c, r) for c, r in jobs))


async def save_shapes(cols: list[StagedArray], order: tuple[str, ...]) -> None:
    """Persist ``zarr.json`` of each array whose shape changed, level by level in ``order``."""
    for level in order:
        todo = [c for c in cols if c.level == level and c.saved != c.written]
        await asyncio.gather(*(_save_metadata(c.arr) for c in todo))
        for c in todo:
            c.saved = c.written
