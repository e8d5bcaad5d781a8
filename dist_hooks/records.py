"""Record blocks in CSR form, and the k-way merge of per-rank record streams.

Both the coordinator (the converged records of each boundary, merged into ``data.zarr/converged``)
and ``dist-hooks consolidate`` (whole runs) merge records of several ranks into one order,
(step, rank, sample_id), optionally keeping one record per (rank, sample_id). That merge lives
here, once, below both of them.

A block holds consecutive records: record-level columns (``rec``), their atom rows (``atoms``)
and 0-based CSR offsets (``ptr``: record ``r`` owns atom rows ``ptr[r]:ptr[r+1]``). Nothing here
loops over records in Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from .errors import RunError
from .store.layout import ATOMS_PTR

__all__ = ["CsrBlock", "frontier_windows", "gather", "merge_blocks"]


@dataclass
class CsrBlock:
    """Consecutive records in CSR form: record columns, their atom rows, 0-based ``ptr``."""

    rec: dict[str, np.ndarray]
    atoms: dict[str, np.ndarray]
    ptr: np.ndarray

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray], levels: dict[str, str]) -> "CsrBlock":
        """A block from flat columns with a 0-based ``atoms_ptr`` (as
        :meth:`GroupReader.records <dist_hooks.store.group_reader.GroupReader.records>` returns
        them); ``levels``: field name -> "record" or "atom". Column order is kept."""
        ptr = columns[ATOMS_PTR]
        return cls({k: v for k, v in columns.items() if k != ATOMS_PTR and levels[k] == "record"},
                   {k: v for k, v in columns.items() if k != ATOMS_PTR and levels[k] == "atom"},
                   ptr)

    def __len__(self) -> int:
        return len(self.ptr) - 1

    @property
    def steps(self) -> np.ndarray:
        return self.rec["step"]

    def split(self, k: int) -> tuple["CsrBlock", "CsrBlock"]:
        a = int(self.ptr[k])
        head = CsrBlock({n: v[:k] for n, v in self.rec.items()},
                        {n: v[:a] for n, v in self.atoms.items()}, self.ptr[: k + 1])
        tail = CsrBlock({n: v[k:] for n, v in self.rec.items()},
                        {n: v[a:] for n, v in self.atoms.items()}, self.ptr[k:] - a)
        return head, tail

    @staticmethod
    def concat(blocks: list["CsrBlock"]) -> "CsrBlock":
        if len(blocks) == 1:
            return blocks[0]
        shifts = np.cumsum([0] + [int(b.ptr[-1]) for b in blocks[:-1]])
        ptr = np.concatenate([np.zeros(1, np.int64)] + [b.ptr[1:] + s
                                                          for b, s in zip(blocks, shifts)])
        rec = {n: np.concatenate([b.rec[n] for b in blocks]) for n in blocks[0].rec}
        atoms = {n: np.concatenate([b.atoms[n] for b in blocks]) for n in blocks[0].atoms}
        return CsrBlock(rec, atoms, ptr)

    def take(self, idx: np.ndarray) -> "CsrBlock":
        """Records ``idx`` in that order, with their atom rows (no Python loop over records)."""
        counts = (self.ptr[1:] - self.ptr[:-1])[idx]
        starts = self.ptr[:-1][idx]
        csum = np.cumsum(counts)
        rows = np.repeat(starts - (csum - counts), counts) + np.arange(int(csum[-1]) if len(csum)
                                                                       else 0, dtype=np.int64)
        return CsrBlock({n: v[idx] for n, v in self.rec.items()},
                        {n: v[rows] for n, v in self.atoms.items()},
                        np.concatenate([np.zeros(1, np.int64), csum]).astype(np.int64))


B = TypeVar("B")


def frontier_windows(iters: list[Iterator[B]], steps_of: Callable[[B], np.ndarray],
                     length: Callable[[B], int],
                     split: Callable[[B, int], tuple[B, B]]) -> Iterator[list[tuple[int, B]]]:
    """Merge step-ordered streams: yield windows ``[(source index, rows), ...]`` such that
    every row of a window has a smaller step than every row of later windows.

    A source's last buffered step may continue in its next block, so only rows below the
    smallest last-buffered step of the live sources (the frontier) are final; the sources at
    the frontier read on. Buffers are lists of blocks (never concatenated here: the caller
    copies each row once, into its output). Loops run over sources and blocks, never rows.
    """
    n = len(iters)
    bufs: list[list[B]] = [[] for _ in range(n)]
    done = [False] * n
    need = set(range(n))
    while True:
        for i in sorted(need):
            nxt = next(iters[i], None)
            if nxt is None:
                done[i] = True
            elif length(nxt):
                bufs[i].append(nxt)
            else:
                raise ValueError("sources must not yield empty blocks")
        live = [i for i in range(n) if not done[i]]
        frontier = min(int(steps_of(bufs[i][-1])[-1]) for i in live) if live else None
        parts = []
        for i in range(n):
            keep: list[B] = []
            for blk in bufs[i]:
                if frontier is None:
                    parts.append((i, blk))
                    continue
                st = steps_of(blk)
                if keep or st[0] >= frontier:
                    keep.append(blk)
                    continue
                k = int(np.searchsorted(st, frontier, side="left"))
                if k == length(blk):
                    parts.append((i, blk))
                else:
                    head, tail = split(blk, k)
                    parts.append((i, head))
                    keep.append(tail)
            bufs[i] = keep
        if parts:
            yield parts
        if not live:
            return
        need = {i for i in live if int(steps_of(bufs[i][-1])[-1]) == frontier}


def _dedup_mask(rank: np.ndarray, sid: np.ndarray, seen: dict[int, np.ndarray]) -> np.ndarray:
    """Keep the first occurrence of each (rank, sample_id) not seen in an earlier window."""
    keep = np.zeros(len(rank), dtype=bool)
    for r in np.unique(rank).tolist():  # a loop over ranks, not records
        m = np.flatnonzero(rank == r)
        ids = sid[m]
        prev = seen.get(r, np.empty(0, ids.dtype))
        first = np.zeros(len(ids), dtype=bool)
        first[np.unique(ids, return_index=True)[1]] = True
        keep[m] = first & ~np.isin(ids, prev)
        seen[r] = np.union1d(prev, ids)
    return keep


def gather(parts: list[CsrBlock], order: np.ndarray) -> CsrBlock:
    """Records ``order`` (indices into the concatenation of ``parts``) as one new block.

    Record columns are small: concatenated and indexed. Atom rows are most of the bytes, and in a
    merged window they come in long contiguous runs (one per step and rank: a rank's records of
    one step are already in sample order, or nearly), so they are copied run by run with slice
    assignments (memcpy speed, one copy) instead of a row-index gather through a concatenation
    (two copies and a slow fancy index). Many short runs fall back to the index gather.
    """
    lens = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    rec = {n: np.concatenate([p.rec[n] for p in parts])[order] for n in parts[0].rec}
    counts = np.concatenate([np.diff(p.ptr) for p in parts])[order]
    ptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)]).astype(np.int64)
    part_of = np.searchsorted(offsets, order, side="right") - 1
    brk = np.flatnonzero((np.diff(order) != 1) | (np.diff(part_of) != 0)) + 1
    starts = np.concatenate([[0], brk]).astype(np.int64)
    if len(order) == 0 or len(starts) * 8 > len(order):
        if len(parts) == 1:
            return parts[0].take(order)
        return CsrBlock.concat(parts).take(order)
    ends = np.concatenate([brk, [len(order)]]).astype(np.int64)
    atoms = {n: np.empty((int(ptr[-1]), *parts[0].atoms[n].shape[1:]), parts[0].atoms[n].dtype)
             for n in parts[0].atoms}
    # one iteration per contiguous run of records (a few per step and rank), not per record
    for r0, r1, p, src in zip(starts.tolist(), ends.tolist(), part_of[starts].tolist(),
                              (order[starts] - offsets[part_of[starts]]).tolist()):
        blk = parts[p]
        a0, a1 = int(blk.ptr[src]), int(blk.ptr[src + r1 - r0])
        d0 = int(ptr[r0])
        for n, out in atoms.items():
            out[d0: d0 + a1 - a0] = blk.atoms[n][a0:a1]
    return CsrBlock(rec, atoms, ptr)


def merge_blocks(sources: list[tuple[int, Iterable[CsrBlock]]], *, dedup: bool = False,
                 seen: dict[int, np.ndarray] | None = None) -> Iterator[CsrBlock]:
    """Merge per-rank record streams into blocks ordered by (step, rank, sample_id), with a
    ``rank`` record column; ``dedup`` keeps one record per (rank, sample_id), the first.

    ``seen`` (rank -> sorted sample ids) holds the keys merged before, by earlier calls (the
    coordinator merges boundary by boundary); it is updated in place with the keys kept."""
    ranks = [int(r) for r, _ in sources]
    iters = [iter(s) for _, s in sources]
    seen = {} if seen is None else seen
    for window in frontier_windows(iters, lambda b: b.steps, len, lambda b, k: b.split(k)):
        parts = []
        for i, b in window:
            rec = dict(b.rec)
            rec["rank"] = np.full(len(b), ranks[i], dtype=np.int64)
            parts.append(CsrBlock(rec, b.atoms, b.ptr))
        names = [set(b.rec) | set(b.atoms) for b in parts]
        if any(x != names[0] for x in names):
            raise RunError(f"cannot merge ranks {sorted(set(ranks))}: their fields differ "
                           f"({sorted(names[0] ^ next(x for x in names if x != names[0]))})")
        step = np.concatenate([b.steps for b in parts])
        rank = np.concatenate([b.rec["rank"] for b in parts])
        sid = (np.concatenate([b.rec["sample_id"] for b in parts]) if "sample_id" in parts[0].rec
               else np.zeros(len(step), np.int64))
        order = np.lexsort((sid, rank, step))
        if dedup:
            order = order[_dedup_mask(rank[order], sid[order], seen)]
        if len(order):
            yield gather(parts, order)
