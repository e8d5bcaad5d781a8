"""Read record groups written by :class:`~dist_hooks.store.group_writer.GroupWriter`.

Opens *without* consolidated metadata: consolidated metadata is only refreshed at checkpoint
boundaries and goes stale with every later append, so a live reader (``dist-hooks info`` on a
running job, a notebook) must read each array's own ``zarr.json``. Writers replace files
atomically and grow an array's shape only after its chunks are written, ``atoms_ptr`` last, so
the record count derived from ``atoms_ptr`` never covers unwritten data. After a crash, data past
the committed length is not trusted: pass ``limit_records`` (from the run manifest) and nothing
past it is returned.

Where the group is: a local directory, or any :class:`~.record_store.RecordStore` (an object
store's :class:`~.object_zarr_store.ObjectZarrStore`); the reader uses nothing else of it than
zarr's ``Store`` and the record store's reads and listing, so both read the same way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .array_layout import ArrayLayout, parse_array
from .atomic_store import AtomicLocalStore
from .layout import ATOMS_PTR, ATOMS_START, DATA_DIR, INDEXED, N_ATOMS
from .record_store import RecordStore, StoreFolder
from .shard_files import ArrayMeta, RawArrayReader, ShardLayout

__all__ = ["GroupReader", "resolve_data_root"]


def resolve_data_root(root: str | Path) -> Path:
    """Accept either the Zarr root (``RUN/data.zarr``) or the run directory (``RUN``)."""
    root = Path(root)
    if not (root / "zarr.json").exists() and (root / DATA_DIR / "zarr.json").exists():
        return root / DATA_DIR
    return root


def _to_torch(value: Any) -> Any:
    import torch  # lazy: reading with numpy must not pay torch's import

    arr = np.asarray(value)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


class GroupReader:
    """Random and bulk access to one record group (CSR: ``atoms_ptr`` + columns).

    Also reads a consolidated trajectory group in the *indexed* layout (``atoms_start`` +
    ``n_atoms``, atom rows stored as per-rank segments): the API presents it exactly like a
    CSR group, i.e. atom rows in record order and ``atoms_ptr()`` as their offsets.

    Parameters
    ----------
    root : the Zarr root (or the run directory holding ``data.zarr``), or a record store on the
        Zarr root (then no local path is used).
    group_path : e.g. ``layout.hook_group(rank, hook)`` or ``layout.CONVERGED_GROUP``.
    limit_records : never return records at or past this index (the committed length).
    """

    def __init__(self, root: str | Path | RecordStore, group_path: str, *,
                 limit_records: int | None = None) -> None:
        self.group_path = group_path.strip("/")
        self.limit_records = None if limit_records is None else int(limit_records)
        self.root: Path | RecordStore
        if isinstance(root, (str, os.PathLike)):
            self.root = resolve_data_root(root)
            # read-only; the atomic store's listings hide temporaries a killed writer left
            self._store: RecordStore = AtomicLocalStore(self.root, read_only=True)
        elif isinstance(root, RecordStore):
            self.root = self._store = root
        else:
            raise TypeError(f"GroupReader: root must be a path or a RecordStore, got {root!r}")
        self.refresh()

    def refresh(self) -> None:
        """Re-read metadata and ``atoms_ptr`` to see records appended since opening."""
        opened = self._open_json()
        if opened is None:  # a layout not handled here (or damage): zarr reads it, and reports
            group = zarr.open_group(self._store, path=self.group_path, mode="r",
                                    use_consolidated=False)
            attrs, arrays = dict(group.attrs), dict(group.arrays())
            raws = {n: self._raw_reader(n) for n in arrays}
        else:
            attrs, arrays, raws = opened
        self.attrs = attrs
        self.all_arrays = arrays  #: every array of the group, layout arrays included
        self._raw_all = raws
        levels: dict[str, str] = dict(self.attrs.get("level", {}) or {})
        self._arrays = {n: arrays[n] for n in levels if n in arrays}
        self.fields: dict[str, tuple[str, np.dtype, tuple[int, ...]]] = {
            n: (levels[n], np.dtype(a.dtype), tuple(a.shape[1:])) for n, a in self._arrays.items()
        }
        self._raw = {n: raws.get(n) for n in self._arrays}
        self.indexed = self.attrs.get("atoms_layout") == INDEXED
        self._start: np.ndarray | None = None
        if self.indexed:
            # logical CSR over the records' atoms in record order; _start: where they are
            counts = self._whole(arrays[N_ATOMS], N_ATOMS)
            self._start = self._whole(arrays[ATOMS_START], ATOMS_START)
            ptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
            self._segments = np.array(sorted(int(s["start"]) for s in
                                             self.attrs.get("segments") or [{"start": 0}]),
                                      dtype=np.int64)
        else:
            ptr = self._whole(arrays[ATOMS_PTR], ATOMS_PTR) if ATOMS_PTR in arrays \
                else np.zeros(1, np.int64)
        if len(ptr) == 0:
            ptr = np.zeros(1, np.int64)
        n = len(ptr) - 1
        if self.limit_records is not None:
            n = min(n, max(self.limit_records, 0))
        # defensive: never index past what every array actually holds
        for name, (level, _, _) in self.fields.items():
            if level == "record":
                n = min(n, self._arrays[name].shape[0])
        atom_lens = [self._arrays[m].shape[0] for m, f in self.fields.items() if f[0] == "atom"]
        if self.indexed:
            assert self._start is not None
            n = min(n, len(self._start))
            if atom_lens:
                ends = self._start[:n] + np.diff(ptr[: n + 1])
                over = np.flatnonzero(ends > min(atom_lens))
                n = int(over[0]) if len(over) else n
        elif atom_lens:
            n = min(n, int(np.searchsorted(ptr[: n + 1], min(atom_lens), side="right")) - 1)
        self._n = max(n, 0)
        self._ptr = ptr[: self._n + 1]

    def _folder(self, name: str) -> StoreFolder:
        """Where array ``name`` of the group is (or, for ``""``, the group itself)."""
        return StoreFolder(self._store, "/".join(p for p in (self.group_path, name) if p))

    def _raw_reader(self, name: str) -> RawArrayReader | None:
        return RawArrayReader.open(self._folder(name), f"{self.group_path}/{name}")

    def _open_json(self) -> tuple[dict, dict[str, ArrayMeta], dict[str, RawArrayReader]] | None:
        """``(attributes, arrays, shard readers)`` from the group's and its arrays' ``zarr.json``
        alone, or ``None`` unless every array is sharded in a layout read here directly.

        Why not zarr: building zarr's metadata objects (and its event loop round trips) was
        most of the cost of opening a group (measured: consolidate opens one per rank and hook,
        verify and info as many), and none of them is used when the files are read directly.
        """
        store = self._store
        try:
            raw = store.read_bytes(self._folder("").file("zarr.json"))
            if raw is None:
                return None
            gmeta = json.loads(raw)
            if gmeta.get("zarr_format") != 3 or gmeta.get("node_type") != "group":
                return None
            arrays: dict[str, ArrayMeta] = {}
            raws: dict[str, RawArrayReader] = {}
            for name in store.list_folder(self.group_path).folders:
                if name.startswith("."):
                    continue
                folder = self._folder(name)
                try:
                    lay, meta = ShardLayout.of(folder)
                except FileNotFoundError:
                    continue  # not a node (zarr lists no member there either)
                if meta.get("node_type") != "array":
                    continue
                if lay is None:
                    return None
                arrays[name] = ArrayMeta.of(meta, lay)
                raws[name] = RawArrayReader(folder, lay, f"{self.group_path}/{name}")
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        return dict(gmeta.get("attributes") or {}), dict(sorted(arrays.items())), raws

    def raw(self, name: str) -> RawArrayReader | None:
        """The direct shard-file reader of field ``name`` (see :meth:`_rows`), or ``None``
        when zarr reads it."""
        return self._raw.get(name)

    def layout(self, name: str) -> ArrayLayout:
        """The parsed ``zarr.json`` of array ``name`` (any array of the group), as opened."""
        raw = self._raw_all.get(name)
        if raw is not None and raw.lay.array is not None:
            return raw.lay.array
        return parse_array(self.all_arrays[name].metadata.to_dict())

    def _whole(self, arr: Any, name: str) -> np.ndarray:
        """A whole int64 layout array (see :meth:`_rows`)."""
        raw = self._raw_all.get(name)
        if raw is not None:
            return raw.read(0, int(arr.shape[0])).astype(np.int64, copy=False)
        return np.asarray(arr[:], dtype=np.int64)

    def _rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` of a field, from its shard files when their layout is understood.

        Why not zarr: it reads a shard's index and its chunks with separate opens, so a writer
        that replaces the file in between (this reader is meant for live runs) makes it decode
        one version's chunk at the other's offsets; and its cost per chunk dominated reading
        the small record chunks. Whole files read through one descriptor are consistent.
        """
        raw = self._raw.get(name)
        if raw is not None:
            return raw.read(a, b)
        return np.asarray(self._arrays[name][a:b])

    def __len__(self) -> int:
        return self._n

    def atoms_ptr(self) -> np.ndarray:
        """CSR offsets ``(len(self) + 1,)``; record r owns atom rows ``ptr[r]:ptr[r+1]``."""
        return self._ptr.copy()

    @property
    def n_atoms(self) -> int:
        """Atom rows covered by the visible records."""
        return int(self._ptr[-1])

    def _level(self, name: str) -> str:
        try:
            return self.fields[name][0]
        except KeyError:
            raise KeyError(f"no field {name!r} in {self.group_path!r}; fields: "
                           f"{sorted(self.fields)}") from None

    def column(self, name: str) -> np.ndarray:
        """A whole column: ``(len(self), ...)`` for records, ``(n_atoms, ...)`` for atoms."""
        if name == ATOMS_PTR:
            return self.atoms_ptr()
        if self._level(name) == "atom" and self.indexed:
            return self._atom_rows(name, 0, self._n)
        stop = self._n if self._level(name) == "record" else self.n_atoms
        return self._rows(name, 0, stop)

    def _atom_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Indexed layout: the atom rows of records ``[start, stop)`` in record order.

        A rank's records keep their relative order in the consolidated order, so the rows
        wanted from each segment lie in one short range: one read per segment touched, then
        one gather (no loop over records).
        """
        assert self._start is not None
        arr = self._arrays[name]
        st = self._start[start:stop]
        cnt = np.diff(self._ptr[start: stop + 1])
        if not len(st) or not int(cnt.sum()):
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        seg = np.searchsorted(self._segments, st, side="right") - 1
        bufs, pos = [], np.empty(len(st), np.int64)
        off = 0
        for s in np.unique(seg).tolist():  # a loop over segments (ranks), not records
            m = seg == s
            lo, hi = int(st[m].min()), int((st[m] + cnt[m]).max())
            bufs.append(self._rows(name, lo, hi))
            pos[m] = st[m] - lo + off
            off += hi - lo
        buf = bufs[0] if len(bufs) == 1 else np.concatenate(bufs)
        csum = np.cumsum(cnt)
        rows = np.repeat(pos - (csum - cnt), cnt) + np.arange(int(csum[-1]), dtype=np.int64)
        return buf[rows]

    def record(self, i: int, *, as_torch: bool = True) -> dict[str, Any]:
        """One system: its record columns (scalars/arrays) and its atom rows (sliced by CSR)."""
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        a, b = int(self._ptr[i]), int(self._ptr[i + 1])
        if self.indexed:  # where record i's atoms are stored
            assert self._start is not None
            a, b = int(self._start[i]), int(self._start[i]) + b - a
        out: dict[str, Any] = {}
        for name, (level, _, _) in self.fields.items():
            out[name] = np.asarray(self._rows(name, i, i + 1)[0]) if level == "record" else \
                self._rows(name, a, b)
        if as_torch:
            out = {k: _to_torch(v) for k, v in out.items()}
        return out

    def records(self, start: int = 0, stop: int | None = None, *,
                fields: list[str] | None = None, as_torch: bool = False) -> dict[str, Any]:
        """Bulk read of records ``[start, stop)``: record columns, the atom rows of those
        records, and ``atoms_ptr`` rebased to start at 0 (length ``stop - start + 1``)."""
        n = self._n
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(stop, start)
        a, b = int(self._ptr[start]), int(self._ptr[stop])
        names = list(self.fields) if fields is None else fields
        out: dict[str, Any] = {}
        for name in names:
            arr = self._arrays[name] if name in self._arrays else None
            if arr is None:
                self._level(name)  # raises KeyError with the field list
            if self._level(name) == "record":
                out[name] = self._rows(name, start, stop)
            elif self.indexed:
                out[name] = self._atom_rows(name, start, stop)
            else:
                out[name] = self._rows(name, a, b)
        out[ATOMS_PTR] = self._ptr[start: stop + 1] - a
        if as_torch:
            out = {k: _to_torch(v) for k, v in out.items()}
        return out

    def __repr__(self) -> str:
        return (f"GroupReader({str(self.root)!r}, {self.group_path!r}, records={self._n}, "
                f"fields={sorted(self.fields)})")
