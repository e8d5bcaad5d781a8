"""``ZarrSink``: the user-facing handle on a run's Zarr root, handing out the group writers.

Why a handle of its own: the snapshot hooks are configured once per run (chunking, compression,
fsync policy) but write one group per rank and hook; the sink keeps those settings and the one
record store all of them share: a directory's atomic store, or an object store's
(``s3://bucket/prefix/data.zarr``), the same files in both.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr

from .array_layout import (DEFAULT_CHUNK_ATOMS, DEFAULT_CHUNK_RECORDS, DEFAULT_CHUNKS_PER_SHARD,
                           CompressorLike)
from .atomic_store import AtomicLocalStore, FsyncPolicy
from .group_writer import GroupWriter, WriteUnit
from .layout import hook_group
from .object_storage import is_url, open_storage
from .record_store import RecordStore
from .storage import LocalRunStorage

__all__ = ["ZarrSink"]


class ZarrSink:
    """User-facing handle on a Zarr root (``RUN/data.zarr``) that the snapshot hooks take.

    Holds the chunking/compression settings and one record store; :meth:`writer` hands out the
    per-rank, per-hook :class:`GroupWriter`. ``path``: a directory, a ``file://`` URL, an
    ``s3://bucket/prefix`` URL (credentials and endpoint from ``storage_options`` or the AWS
    environment variables, as for ``Run``; checked here, so a wrong key or a dead endpoint fails
    now), or a :class:`~.record_store.RecordStore` on the root. ``fsync`` applies to a
    directory (a PUT is durable when it returns). ``chunks_per_shard``: chunks per shard file
    along the row axis (0/None: no sharding; ``shards``, its earlier name, is still accepted).
    """

    def __init__(
        self,
        path: str | Path | RecordStore,
        *,
        chunk_records: int = DEFAULT_CHUNK_RECORDS,
        chunk_atoms: int = DEFAULT_CHUNK_ATOMS,
        chunks_per_shard: int | None = DEFAULT_CHUNKS_PER_SHARD,
        compressor: CompressorLike = "zstd",
        write_unit: WriteUnit = "shard",
        fsync: FsyncPolicy = "replace",
        shards: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if shards is not None:
            warnings.warn("ZarrSink(shards=) is now chunks_per_shard=", DeprecationWarning, 2)
            chunks_per_shard = shards
        self.chunk_records = chunk_records
        self.chunk_atoms = chunk_atoms
        self.chunks_per_shard = chunks_per_shard
        self.compressor = compressor
        self.write_unit: WriteUnit = write_unit
        self.path: Path | str
        if isinstance(path, RecordStore):
            self.path, self.store = str(path), path
        else:
            storage = open_storage(path, storage_options)
            if isinstance(storage, LocalRunStorage):
                self.path = storage.root if is_url(path) else Path(path)  # file://
                self.store = AtomicLocalStore(self.path, fsync=fsync)
            else:
                self.path, self.store = storage.url(), storage.zarr_store("")
        # mode="a" only writes zarr.json when the root does not exist yet
        self.root = zarr.open_group(self.store, mode="a", zarr_format=3, use_consolidated=False)

    def writer(self, rank: int, hook_name: str, *,
               attrs: Mapping[str, Any] | None = None) -> GroupWriter:
        """The writer of group ``ranks/rank-XXXXX/<hook_name>`` (created, or reopened to resume)."""
        return GroupWriter(
            self.store, hook_group(rank, hook_name), chunk_records=self.chunk_records,
            chunk_atoms=self.chunk_atoms, chunks_per_shard=self.chunks_per_shard,
            compressor=self.compressor, attrs=attrs, write_unit=self.write_unit)

    def sync(self) -> None:
        """Make everything written through this sink's store durable (after the writers'
        flush()): fsync in a directory, nothing to do in an object store."""
        self.store.sync()

    def __repr__(self) -> str:
        return f"ZarrSink({str(self.path)!r})"
