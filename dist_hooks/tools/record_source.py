"""The committed records of one record group, read as a stream of bounded blocks.

This is the record-stream engine every tool reads groups through: ``consolidate`` (the ranks'
groups it merges), ``verify`` (every committed byte against its crc32) and ``export`` (records
merged on the fly). One reader, so that every tool checks the same things on the way: arrays
present, shapes covering the committed lengths, ``atoms_ptr`` sound, steps in order, each
field's crc32 over its committed rows.

Why a sequential reader (:class:`_SeqArray`) under it: record blocks are cut by record count and
atom budget, which never line up with the arrays' chunks; it fetches each chunk once, whole
chunks up to a shard file at a time, and checksums what it fetched in order.
"""
from __future__ import annotations

import asyncio
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from zarr.core.sync import sync as _zsync

from ..errors import DamageError, ShardDamage
from ..records import CsrBlock
from ..store import layout
from ..store.array_layout import writer_chunking
from ..store.checksums import fold_column_crc32
from ..store.group_reader import GroupReader
from ..store.shard_files import RawArrayReader
from .progress import Progress

__all__ = ["DEFAULT_BLOCK_ATOMS", "DEFAULT_BLOCK_RECORDS", "BlockCrc", "ZarrSource",
           "fetch_bytes_for"]

DEFAULT_BLOCK_RECORDS = 4096
DEFAULT_BLOCK_ATOMS = 65536
#: Bytes fetched per array and read (rounded to whole chunks, at most one shard file) ...
FETCH_BYTES = 4 << 20
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
    every fetched row is folded in, in order, for the committed-checksum check. Requests
    never go back before an earlier request's start.
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



class BlockCrc:
    """Each field's crc32 over a stream of blocks, in stream order, and the record count.

    Why: a crc32 of the rows in the order they were written is what the manifest commits and
    what an output's summary records; folding it in block by block needs no second pass.
    """

    def __init__(self) -> None:
        self.crc: dict[str, int] = {}
        self.levels: dict[str, str] = {}
        self.records = 0

    @classmethod
    def of(cls, blocks: Iterable[CsrBlock]) -> "BlockCrc":
        """The checksums of a whole stream."""
        out = cls()
        for b in blocks:
            out.update(b)
        return out

    def update(self, block: CsrBlock) -> None:
        """Fold in ``block``."""
        self.records += len(block)
        for level, cols in (("record", block.rec), ("atom", block.atoms)):
            fold_column_crc32(self.crc, cols)
            self.levels.update(dict.fromkeys(cols, level))
