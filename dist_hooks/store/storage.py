"""Where a run's files live and how they change: the storage interface under ``Run`` and readers.

Why an interface: everything a run writes outside the per-rank append streams (CSV logs, Zarr
groups) is either *replaced whole* (a boundary file, a saved state) or *committed* (``run.json``,
whose replacement is the commit point of a boundary). Those two operations, reading, listing and
the Zarr store of ``data.zarr`` are all the coordinator and ``Run`` need, so a backend other than
a POSIX directory (an object store) implements this class and nothing above it changes.

Who calls what, and when (one run, ``world_size`` ranks):

1. every rank, at start: :meth:`RunStorage.zarr_store` for its rank root's ``data.zarr``;
   rank 0 alone: :meth:`read` of the manifest (then broadcast);
2. every rank, at each boundary: :meth:`replace` of its own saved state, then :meth:`list` and
   :meth:`remove` of its older states;
3. rank 0, at each boundary, after every rank's data are durable: :meth:`replace` of the
   boundary file, then :meth:`commit_manifest` — the commit point; a crash before it leaves the
   previous boundary in force;
4. readers (tools, ``open_run``): :meth:`read` and :meth:`path`, which refuses any path that
   leaves the run.
"""
from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

import zarr
from zarr.errors import ContainsGroupError

from ..errors import DamageError
from .atomic_store import AtomicLocalStore, atomic_write_bytes, sync_dir
from .layout import DATA_DIR, MANIFEST, RANKS_GROUP

__all__ = ["LocalRunStorage", "RunStorage", "run_path"]


def run_path(root: str | Path, rel: str | os.PathLike, place: str | None = None) -> Path:
    """``root / rel``, refusing a path that leaves ``root``.

    Why: the manifest is data, not code; a damaged or hand-edited manifest pointing at
    ``/etc/passwd`` or ``../other_run`` must neither be read as this run's data nor written to.
    Symlinks are resolved before the check.
    """
    base = Path(root).resolve()
    p = Path(rel)
    target = (base / p).resolve()
    if p.is_absolute() or not target.is_relative_to(base):
        raise DamageError(f"{place or MANIFEST}: path {str(rel)!r} points outside the run "
                          f"directory")
    return target


class RunStorage(ABC):
    """One root (a run directory or a rank root) of a run. Paths are ``/``-separated and
    relative to the root; none may leave it."""

    @abstractmethod
    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or ``None`` when there is none."""

    @abstractmethod
    def replace(self, rel: str, data: bytes) -> None:
        """Write ``data`` as the file's new content, atomically and durably: a reader sees the
        old bytes or the new, never a mix, and after return a crash keeps the new."""

    @abstractmethod
    def commit_manifest(self, data: bytes) -> None:
        """Replace ``run.json`` as the commit point of a boundary (rank 0 only): durable before
        return, and everything replaced before this call is durable too."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names (not paths) of the files directly under the folder ``prefix``, sorted."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Delete a file; a missing one is no error."""

    @abstractmethod
    def zarr_store(self, rel: str = DATA_DIR) -> AtomicLocalStore:
        """The Zarr store of the hierarchy at ``rel`` (``data.zarr``)."""

    @abstractmethod
    def path(self, rel: str | os.PathLike, place: str | None = None) -> Path:
        """A local path for ``rel`` (writers that stream into files: CSV logs), checked with
        :func:`run_path`; ``place`` names the source of ``rel`` in the error."""

    # -- built on the above
    def read_manifest(self) -> bytes | None:
        """``run.json``'s bytes, or ``None`` for a run not created yet."""
        return self.read(MANIFEST)

    def check_hierarchy(self) -> None:
        """:class:`DamageError` naming the file when ``data.zarr``'s root or ``ranks`` group
        exists but is not a Zarr v3 group node (garbage, truncated, another format): zarr would
        fail on it later with a bare decoding error, or replace it. Missing nodes are fine."""
        for rel in (f"{DATA_DIR}/zarr.json", f"{DATA_DIR}/{RANKS_GROUP}/zarr.json"):
            try:
                data = self.read(rel)
            except OSError as exc:
                raise DamageError(f"{rel}: cannot be read ({exc.strerror or exc})") from exc
            if data is None:
                continue
            try:
                doc = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                doc = None
            if (not isinstance(doc, dict) or doc.get("zarr_format") != 3
                    or doc.get("node_type") != "group"):
                raise DamageError(f"{rel}: not a Zarr v3 group node (damaged)")

    def create_hierarchy(self) -> None:
        """``data.zarr`` and its ``ranks`` group (checked first: :meth:`check_hierarchy`). With
        node-local storage the ranks of one node create them in the same directory at the same
        time: whoever loses the race finds them made by another rank, which is as good."""
        self.check_hierarchy()
        for attempt in range(3):
            try:
                g = zarr.open_group(self.zarr_store(), mode="a", zarr_format=3,
                                    use_consolidated=False)
                if RANKS_GROUP not in g:
                    g.create_group(RANKS_GROUP)
                return
            except ContainsGroupError:
                if attempt == 2:
                    raise
                time.sleep(0.05)


class LocalRunStorage(RunStorage):
    """A run on a POSIX filesystem (local disk, NFS, Lustre): atomic replacement is a rename
    of a fsynced temporary file in the same directory, then a fsync of the directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    def read(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except FileNotFoundError:
            return None

    def replace(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)

    def commit_manifest(self, data: bytes) -> None:
        atomic_write_bytes(self.root / MANIFEST, data)
        sync_dir(self.root)

    def list(self, prefix: str) -> list[str]:
        d = self.path(prefix)
        return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def zarr_store(self, rel: str = DATA_DIR) -> AtomicLocalStore:
        return AtomicLocalStore(self.path(rel))

    def path(self, rel: str | os.PathLike, place: str | None = None) -> Path:
        run_path(self.root, rel, place)
        return self.root / rel  # as the caller named it (messages show it so), once checked

    def __repr__(self) -> str:
        return f"LocalRunStorage({str(self.root)!r})"
