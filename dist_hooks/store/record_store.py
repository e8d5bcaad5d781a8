"""``RecordStore``: what the record-group writers and readers need of a Zarr store beyond zarr's
``Store``, so that one code path records to a directory and to an object store.

Why an interface of its own: :class:`~.group_writer.GroupWriter`, :class:`~.group_reader.GroupReader`
and the shard-file code (:class:`~.staged_array.ShardFiles`, :class:`~.shard_files.RawArrayReader`)
write whole files themselves and read them whole, off zarr's codec pipeline (the GIL it holds and
the torn reads it makes beside a live writer: see :mod:`.shard_files`), and they list a folder to
find arrays and the files a killed writer left past a shape. zarr's ``Store`` has no synchronous
whole-file put, no checksums of what was written and no durability point. The two
implementations, :class:`~.atomic_store.AtomicLocalStore` (a directory: temporary + rename, fsync
policy) and :class:`~.object_zarr_store.ObjectZarrStore` (S3: one PUT per file, durable on
return), both zarr stores, offer exactly the methods below; nothing else of them is used here.

Keys are ``/``-separated and relative to the store's root, as zarr's.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Listing", "RecordStore", "StoreFolder", "Version"]

#: what identifies one version of a file, as :meth:`RecordStore.read_version` reports it (a
#: local file's inode, size and mtime; an object's ETag)
Version = Hashable


class Listing(NamedTuple):
    """What lies directly under a folder: sub-folder names and file names, each sorted."""

    folders: list[str]
    files: list[str]


@runtime_checkable
class RecordStore(Protocol):
    """A zarr ``Store`` that record groups are written to and read from (module docstring)."""

    def read_bytes(self, key: str) -> bytes | None:
        """The whole file ``key``, or ``None`` when there is none."""

    def read_version(self, key: str,
                     known: Version | None) -> tuple[Version, bytes | None] | None:
        """File ``key`` read whole as one consistent version: ``None`` when missing, else
        ``(version, data)``, where ``data`` is ``None`` when ``version == known`` (the caller's
        copy is still the file: readers of a live group re-read only what changed)."""

    def list_folder(self, prefix: str) -> Listing:
        """Names directly under the folder ``prefix`` (none when it does not exist); temporaries
        of a writer are not files."""

    def put_bytes(self, key: str, data: bytes | memoryview, *, exclusive: bool = False) -> int:
        """Write the whole file ``key`` atomically (a reader sees the old bytes or the new);
        ``exclusive``: refuse (``FileExistsError``) when it exists. Remembered for
        :meth:`take_checksums` and :meth:`sync`, as zarr's own writes through the store are.
        Returns the bytes written."""

    def delete_sync(self, key: str) -> None:
        """Delete file ``key``; a missing one is no error."""

    def take_checksums(self, prefix: str) -> dict[str, tuple[int, int]]:
        """``{key: (bytes, crc32)}`` of the files under ``prefix`` written since the last call
        (the latest version of each), forgotten here."""

    def remove_temporaries(self, prefix: str) -> int:
        """Delete what a killed writer left half-written under ``prefix`` (only a writer that
        owns it calls this); returns how many."""

    def sync(self) -> None:
        """Make everything written so far durable (checkpoint boundaries)."""


@dataclass(frozen=True)
class StoreFolder:
    """A folder of a :class:`RecordStore` (one array's files), as the shard-file readers take
    it in place of a local directory."""

    store: RecordStore
    key: str

    def file(self, name: str) -> str:
        """The key of file ``name`` in this folder."""
        return f"{self.key}/{name}" if self.key else name

    def __str__(self) -> str:
        return f"{self.store}/{self.key}"
