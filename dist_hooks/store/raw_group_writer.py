"""Record groups written once, front to back, straight to shard files (no zarr write path),
and the consolidated metadata of a finished hierarchy.

Why: ``dist-hooks consolidate`` writes every output group once and never changes it; zarr's
write path cost a third of its Python time (see :mod:`.shard_files`, which writes the arrays).
:class:`RawGroupWriter` gives the arrays, attributes and files a
:class:`~.group_writer.GroupWriter` with sharding and zstd gives (``tests/store/test_raw_group_writer.py``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic_store import AtomicLocalStore
from .array_layout import ArraySpec
from .layout import ATOMS_PTR, group_attrs
from .shard_files import RawArrayWriter

__all__ = ["RawGroupWriter", "consolidate_metadata"]


class RawGroupWriter:
    """A record group (CSR, as :class:`~.group_writer.GroupWriter` writes it) written once.

    The same arrays, attributes and files as a GroupWriter with ``chunks_per_shard``
    >= 1 and zstd (dimension names and units included). ``atoms_ptr=False`` leaves the CSR
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
        spec = ArraySpec.of_field(name, level, x.dtype, tuple(x.shape[1:]), rows,
                                  self.chunking[2])  # names and units as GroupWriter's
        return RawArrayWriter(self.store, f"{self.group}/{name}", x.dtype, spec.trailing, rows,
                              self.chunking[2], dimension_names=spec.dimension_names,
                              attributes=dict(spec.attributes))

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
        attrs = group_attrs(self._levels, self.attrs)
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
