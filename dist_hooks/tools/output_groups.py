"""The groups consolidate writes: one output group fed merged blocks (:class:`GroupSink`),
and a consolidated trajectory in the indexed layout (:class:`TrajectoryOutput`).

An output is written once and never appended to later, so it is chunked for reading (larger
record chunks than a live run's, :func:`_out_chunking`) and, when sharded, written by
:class:`~dist_hooks.store.raw_group_writer.RawGroupWriter` (the files zarr writes, at a fraction of its
cost per array and chunk); an unsharded one goes through zarr (:class:`_ZarrOutput`).
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import zarr

from ..errors import DamageError
from ..reader import Unit
from ..records import CsrBlock, merge_blocks
from ..store import layout
from ..store.array_layout import parse_array
from ..store.atomic_store import AtomicLocalStore
from ..store.group_writer import GroupWriter
from ..store.raw_group_writer import RawGroupWriter
from .atom_segments import Segment, SegmentWriter
from .progress import Progress
from .record_source import BlockCrc, ZarrSource

__all__ = ["GroupSink", "TrajectoryOutput", "open_output_writer"]

#: Record chunks of a consolidated group (512 KiB of an int64 column; zarr's cost per chunk
#: made 16384 two times slower, measured), 4 to a shard: the writer stages one shard per column
#: in memory, 9.4 MB for a 3x3 float32 cell.
OUT_CHUNK_RECORDS = 65536
OUT_SHARD_RECORDS = 4 * OUT_CHUNK_RECORDS


class OutputWriter(Protocol):
    """What :class:`GroupSink` needs of a group writer: blocks in, then the group finished with
    ``attrs`` added to its attributes."""

    def append(self, records: Mapping[str, np.ndarray], atoms: Mapping[str, np.ndarray],
               n_atoms: np.ndarray) -> None: ...

    def close(self, attrs: Mapping[str, Any] | None = None) -> None: ...


class _ZarrOutput:
    """An unsharded output group written through zarr (:class:`GroupWriter`), finished as
    :class:`RawGroupWriter` finishes its own: attributes added on close, and no ``atoms_ptr``
    array when the layout has none (GroupWriter always writes one)."""

    def __init__(self, store: AtomicLocalStore, group: str, chunking: dict[str, int], *,
                 atoms_ptr: bool) -> None:
        self.writer = GroupWriter(store, group, compressor="zstd", **chunking)
        self.group = group
        self.atoms_ptr = atoms_ptr

    def append(self, records: Mapping[str, np.ndarray], atoms: Mapping[str, np.ndarray],
               n_atoms: np.ndarray) -> None:
        self.writer.append(records, atoms, n_atoms)

    def close(self, attrs: Mapping[str, Any] | None = None) -> None:
        self.writer.close()
        if attrs:
            zarr.open_group(self.writer.store, path=self.group, mode="r+").attrs.update(attrs)
        if not self.atoms_ptr:
            shutil.rmtree(Path(self.writer.store.root) / self.group / layout.ATOMS_PTR,
                          ignore_errors=True)


def open_output_writer(store: AtomicLocalStore, group: str, chunking: dict[str, int], *,
                       atoms_ptr: bool = True) -> OutputWriter:
    """The writer of one output group: raw shard files when ``chunking`` shards (every output
    the benchmark sees), zarr otherwise."""
    if int(chunking.get("chunks_per_shard") or 0) >= 1:
        return RawGroupWriter(store, group, atoms_ptr=atoms_ptr, **chunking)
    return _ZarrOutput(store, group, chunking, atoms_ptr=atoms_ptr)


class GroupSink:
    """Appends merged blocks to one output group and keeps each field's crc32 (the summary
    records them, so a reader can check the output without the run)."""

    def __init__(self, store: AtomicLocalStore, group: str, chunking: dict[str, int], *,
                 atoms_ptr: bool = True) -> None:
        self.group = group
        self.writer = open_output_writer(store, group, chunking, atoms_ptr=atoms_ptr)
        self.crc = BlockCrc()
        self.atoms = 0

    def append(self, block: CsrBlock) -> None:
        rec = {n: np.ascontiguousarray(v) for n, v in block.rec.items()}
        atoms = {n: np.ascontiguousarray(v) for n, v in block.atoms.items()}
        self.crc.update(CsrBlock(rec, atoms, block.ptr))
        self.writer.append(rec, atoms, np.diff(block.ptr))
        self.atoms += int(block.ptr[-1])

    def close(self, attrs: dict | None = None) -> dict:
        """Finish the group, with ``attrs`` added to its attributes."""
        self.writer.close(attrs)
        return {"kind": "zarr", "group": self.group, "records": self.crc.records,
                "atoms": self.atoms, "crc32": self.crc.crc}


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



class TrajectoryOutput:
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
                    expect_crc={k: v for k, v in u.commit.crc32.items()
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
        self.sink = GroupSink(store, group, _out_chunking(chunking, sum(u.records for u in units)),
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
