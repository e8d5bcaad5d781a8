"""Zarr v3 storage of recorded snapshots (layout constants, atomic store, writers, readers) and
the per-rank CSV log.

``ZarrSink`` is the user-facing handle (one per run's ``data.zarr``); ``GroupWriter`` appends to
one rank's group for one hook; ``GroupReader`` reads any record group back; both work on any
``RecordStore`` (``AtomicLocalStore`` in a directory, ``ObjectZarrStore`` in an object store).
"""
from __future__ import annotations

from . import layout
from .atomic_store import (
    AtomicLocalStore,
    atomic_write_bytes,
    fsync_file,
    fsync_tree,
    remove_stale_temporaries,
    sync_dir,
)
from .array_layout import make_compressors
from .record_store import RecordStore
from .layout import FORMAT_NAME, FORMAT_VERSION
from .group_writer import GroupWriter
from .group_reader import GroupReader, resolve_data_root
from .object_zarr_store import ObjectZarrStore
from .zarr_sink import ZarrSink

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AtomicLocalStore",
    "GroupReader",
    "GroupWriter",
    "ObjectZarrStore",
    "RecordStore",
    "ZarrSink",
    "atomic_write_bytes",
    "fsync_file",
    "fsync_tree",
    "layout",
    "make_compressors",
    "remove_stale_temporaries",
    "resolve_data_root",
    "sync_dir",
]
