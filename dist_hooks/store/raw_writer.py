"""Record groups written once, front to back, straight to shard files (no zarr write path).

Why: ``dist-hooks consolidate`` writes every output group once and never changes it. Through
:class:`~.shard.GroupWriter`, zarr's per-array and per-chunk machinery (metadata objects, its
event loop, the sharding codec's partial-shard logic) was about a third of consolidate's
Python time on the benchmark (measured on 2 cores), for arrays of a few MB. Here a shard is
staged, its chunks compressed (numcodecs' zstd, which releases the GIL: measured, two threads
compress twice the data in the same time), its index built and the file written in one
piece; ``zarr.json`` is written last, with the final shape.

The files have exactly the layout :class:`~.shard.GroupWriter` writes (docs/format.md): regular
grid, one ``sharding_indexed`` codec with ``bytes`` + ``zstd`` (level 1) inside and a ``bytes``
+ ``crc32c`` index at the end, ``c.<i>.0...`` keys, fill value 0. zarr and
:mod:`~.raw_shards` both read them. ``tests/test_raw_writer.py`` compares them with zarr's
files for the same appends: the metadata and every shard file are byte-identical, except that
zarr leaves out a chunk whose values all equal the fill value, where this writer keeps it (so a
chunk of ``-0.0`` reads back as written; zarr's reads back as ``0.0``). Chunks past the last row
are left out (empty in the index) and a partial last chunk is padded with the fill value, as
zarr does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from .atomic_store import AtomicLocalStore
from .layout import ATOMS_PTR, FORMAT_NAME, FORMAT_VERSION
from .raw_shards import EMPTY, shard_key

__all__ = ["RawArrayWriter", "RawGroupWriter", "array_metadata", "consolidate_metadata"]

ZSTD_LEVEL = 1  # as make_compressors("zstd"): see there for why level 1


def _data_type(dtype: np.dtype) -> str:
    """zarr v3's name of a numeric or bool dtype ("float32", "int64", "bool", ...)."""
    return "bool" if dtype.kind == "b" else np.dtype(dtype).newbyteorder("=").name


def array_metadata(rows: int, dtype: np.dtype, trailing: tuple[int, ...], chunk_rows: int,
                   shard_rows: int) -> dict[str, Any]:
    """The ``zarr.json`` document of a sharded array as :class:`~.shard.GroupWriter` creates
    it (zstd level 1, "." key separator, fill value 0)."""
    dtype = np.dtype(dtype)
    tr = [int(d) for d in trailing]
    inner = [max(d, 1) for d in tr]
    fill: Any = {"b": False, "f": 0.0, "c": [0.0, 0.0]}.get(dtype.kind, 0)
    le = {"name": "bytes", "configuration": {"endian": "little"}}
    data = le if dtype.itemsize > 1 else {"name": "bytes"}  # one byte: no endianness (zarr)
    return {
        "shape": [int(rows), *tr],
        "data_type": _data_type(dtype),
        # an empty trailing dimension still has chunks of 1 (as GroupWriter creates it)
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [int(shard_rows), *inner]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": fill,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [int(chunk_rows), *inner],
            "codecs": [data, {"name": "zstd", "configuration": {"level": ZSTD_LEVEL,
                                                             "checksum": False}}],
            "index_codecs": [le, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


class RawArrayWriter:
    """One sharded array of ``store``, written front to back: :meth:`append` rows, then
    :meth:`close` (the remaining partial shard, then ``zarr.json``). One shard is staged."""

    def __init__(self, store: AtomicLocalStore, key: str, dtype: np.dtype,
                 trailing: tuple[int, ...], chunk_rows: int, chunks_per_shard: int) -> None:
        if np.dtype(dtype).kind not in "biufc":
            raise TypeError(f"{key}: unsupported dtype {np.dtype(dtype)} (numeric or bool only)")
        if int(chunk_rows) < 1 or int(chunks_per_shard) < 1:
            raise ValueError(f"{key}: chunk_rows and chunks_per_shard must be >= 1")
        self.store = store
        self.key = key.strip("/")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.trailing = tuple(int(d) for d in trailing)
        self.chunk_rows = int(chunk_rows)
        self.per_shard = int(chunks_per_shard)
        self.shard_rows = self.chunk_rows * self.per_shard
        self.rows = 0     # rows appended
        self._shard = 0   # index of the shard being staged
        self._fill = 0    # rows staged
        self._stage: np.ndarray | None = None
        self._codec = numcodecs.Zstd(level=ZSTD_LEVEL)

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.shape[1:] != self.trailing:
            raise ValueError(f"{self.key}: rows of shape {x.shape[1:]}, array has "
                             f"{self.trailing}")
        i = 0
        while i < len(x):
            if self._fill == 0 and len(x) - i >= self.shard_rows:
                self._write_shard(x[i: i + self.shard_rows])  # whole shards: no staging copy
                i += self.shard_rows
                continue
            if self._stage is None:
                self._stage = np.empty((self.shard_rows, *self.trailing), self.dtype)
            k = min(self.shard_rows - self._fill, len(x) - i)
            self._stage[self._fill: self._fill + k] = x[i: i + k]
            self._fill += k
            i += k
            if self._fill == self.shard_rows:
                self._write_shard(self._stage)
        self.rows += len(x)

    def _write_shard(self, rows: np.ndarray) -> None:
        n = len(rows)
        if 0 in self.trailing:  # no element, so no chunk (zarr's grid has none either)
            self._shard += 1
            self._fill = 0
            return
        index = np.full((self.per_shard, 2), EMPTY, dtype="<u8")
        parts: list[bytes] = []
        off = 0
        for j in range(-(-n // self.chunk_rows)):
            chunk = rows[j * self.chunk_rows: (j + 1) * self.chunk_rows]
            if len(chunk) < self.chunk_rows:  # zarr stores whole chunks: pad with the fill
                pad = np.zeros((self.chunk_rows, *self.trailing), self.dtype)
                pad[: len(chunk)] = chunk
                chunk = pad
            enc = self._codec.encode(np.ascontiguousarray(chunk, dtype=self.dtype))
            parts.append(enc)
            index[j] = (off, len(enc))
            off += len(enc)
        body = index.tobytes()
        parts.append(body + google_crc32c.value(body).to_bytes(4, "little"))
        self.store.put_bytes(f"{self.key}/{shard_key(self._shard, len(self.trailing))}",
                             b"".join(parts))
        self._shard += 1
        self._fill = 0

    def close(self) -> None:
        """Write the staged rows and ``zarr.json`` (the array exists for readers from here)."""
        if self._fill:
            assert self._stage is not None
            self._write_shard(self._stage[: self._fill])
        self._stage = None
        meta = array_metadata(self.rows, self.dtype, self.trailing, self.chunk_rows,
                              self.shard_rows)
        self.store.put_bytes(f"{self.key}/zarr.json", json.dumps(meta, indent=2).encode())


class RawGroupWriter:
    """A record group (CSR, as :class:`~.shard.GroupWriter` writes it) written once.

    The same arrays, attributes and files as a GroupWriter with ``chunks_per_shard``
    >= 1 and zstd. ``atoms_ptr=False`` leaves the CSR
    pointer array out (the consolidated indexed layout keeps ``atoms_start``/``n_atoms``
    instead). Nothing is visible until :meth:`close`, which writes every ``zarr.json``
    (arrays first, the group last).
    """

    def __init__(self, store: AtomicLocalStore, group: str, *, chunk_records: int,
                 chunk_atoms: int, chunks_per_shard: int,
                 attrs: Mapping[str, Any] | None = None, atoms_ptr: bool = True) -> None:
        if int(chunks_per_shard) < 1:
            raise ValueError("RawGroupWriter writes sharded arrays only")
        self.store = store
        self.group = group.strip("/")
        self.chunking = (int(chunk_records), int(chunk_atoms), int(chunks_per_shard))
        self.attrs = dict(attrs or {})
        self.with_ptr = bool(atoms_ptr)
        self._cols: dict[str, RawArrayWriter] = {}
        self._levels: dict[str, str] = {}
        self._ptr: RawArrayWriter | None = None
        self.records = 0
        self.atoms = 0

    def _col(self, name: str, level: str, x: np.ndarray) -> RawArrayWriter:
        rows = self.chunking[0] if level == "record" else self.chunking[1]
        return RawArrayWriter(self.store, f"{self.group}/{name}", x.dtype, tuple(x.shape[1:]),
                              rows, self.chunking[2])

    def append(self, records: Mapping[str, np.ndarray], atoms: Mapping[str, np.ndarray],
               n_atoms: np.ndarray) -> None:
        """Records and their atom rows; the fields are fixed by the first append."""
        n_atoms = np.asarray(n_atoms, dtype=np.int64)
        if not self._levels:
            self._levels = {**{n: "record" for n in records}, **{n: "atom" for n in atoms}}
            self._cols = {n: self._col(n, "record", np.asarray(v)) for n, v in records.items()}
            self._cols.update({n: self._col(n, "atom", np.asarray(v)) for n, v in atoms.items()})
            if self.with_ptr:
                self._ptr = self._col(ATOMS_PTR, "record", np.zeros(1, np.int64))
                self._ptr.append(np.zeros(1, np.int64))
        elif set(records) | set(atoms) != set(self._levels):
            raise ValueError(f"{self.group}: fields {sorted(set(records) | set(atoms))}, "
                             f"expected {sorted(self._levels)}")
        for n, v in (*records.items(), *atoms.items()):
            self._cols[n].append(np.asarray(v))
        if self._ptr is not None:
            self._ptr.append(self.atoms + np.cumsum(n_atoms))
        self.records += len(n_atoms)
        self.atoms += int(n_atoms.sum())

    def close(self, attrs: Mapping[str, Any] | None = None) -> None:
        """Write what is staged, every array's ``zarr.json``, then the group's, with
        ``attrs`` over the format attributes (``level`` included)."""
        self.attrs.update(attrs or {})
        for c in self._cols.values():
            c.close()
        if self._ptr is not None:
            self._ptr.close()
        attrs = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                 "level": dict(self._levels), **self.attrs}
        meta = {"attributes": attrs, "zarr_format": 3, "node_type": "group"}
        self.store.put_bytes(f"{self.group}/zarr.json", json.dumps(meta, indent=2).encode())


def consolidate_metadata(store: AtomicLocalStore) -> None:
    """Write the root group's consolidated metadata (what ``zarr.consolidate_metadata``
    writes) from the ``zarr.json`` files under ``store``.

    Why not zarr's: it builds a metadata object of every node in its event loop, which was a
    tenth of a small consolidate's time (measured); the documents are on disk already. For a
    hierarchy that no longer changes (a consolidated output): a live one's goes stale.
    """
    root = Path(store.root)
    nodes: dict[str, dict] = {}
    todo = [""]  # groups to list: as zarr, members of groups only (no implicit groups)
    while todo:
        group = todo.pop()
        for entry in os.scandir(root / group):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                doc = json.loads(Path(entry.path, "zarr.json").read_bytes())
            except FileNotFoundError:
                continue
            key = f"{group}/{entry.name}".lstrip("/")
            if doc.get("node_type") == "group":
                # a child group's own consolidated view is flattened into the root's
                doc = _group_doc(doc, {})
                todo.append(key)
            nodes[key] = doc
    # zarr's order: by depth, then path
    ordered = {k: nodes[k] for k in sorted(nodes, key=lambda k: (k.count("/"), k))}
    doc = _group_doc(json.loads((root / "zarr.json").read_bytes()), ordered)
    store.put_bytes("zarr.json", json.dumps(doc, indent=2).encode())


def _group_doc(doc: dict, members: dict[str, dict]) -> dict:
    """A group's document with inline consolidated metadata, keys in zarr's order."""
    doc = {**doc, "consolidated_metadata": {"kind": "inline", "must_understand": False,
                                            "metadata": members}}
    head = ("attributes", "zarr_format", "consolidated_metadata", "node_type")
    return {**{k: doc[k] for k in head if k in doc}, **doc}
