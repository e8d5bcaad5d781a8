"""A zarr ``LocalStore`` whose every write is atomic, with an explicit durability policy.

Why: appending to a Zarr array rewrites whole chunk (or shard) files: completing a partially
filled trailing chunk rewrites a file that already holds committed records, and publishing a
new shape rewrites the array's ``zarr.json``. If the process is killed half-way through such a rewrite, a
plain ``open(path, "wb")`` would leave a torn file and lose data that had been committed at an
earlier checkpoint boundary. Here every value is written to a temporary file in the same
directory and moved over the target with ``os.replace`` (atomic on POSIX), so a reader, or a
restarted writer, sees either the old file or the new one, never a mix.

(zarr 3.1's own ``LocalStore`` also renames a ``*.partial`` temporary into place, but never
fsyncs, names its temporaries ``<name>.<uuid>.partial`` next to the chunk files and leaves them
behind on a hard kill. This class makes the policy explicit, independent of the zarr version, and
adds durability controls and temp-file clean-up.)

Durability (``fsync=`` policy). Measured on the 2-core dev VM: an fsync adds ~0.3 ms to a
256 KiB write and ~0.07 ms per directory, and whole-run append throughput (1024 systems x 64
atoms per append, 16-chunk shards, zstd-1) was the same within noise for all three policies
(~150-190 MB/s, CPU-bound in zarr's codec pipeline). The default still avoids fsyncs that buy
nothing, because on shared/parallel file systems an fsync can cost milliseconds:

* ``"replace"`` (default): fsync the temporary *only when it replaces an existing file*, before
  the rename. Those are exactly the writes that can destroy committed data after an OS crash or
  power loss (a rename of an un-synced file can surface as an empty file on some file systems).
  New files cannot hurt committed data; they are made durable at the next :meth:`sync`.
* ``"always"``: fsync every file before its rename (and its directory after); nothing to do at
  boundaries except :meth:`sync` for directories.
* ``"never"``: no fsync on write; a process kill is still safe (the page cache survives it), but an
  OS crash may lose anything not yet passed through :meth:`sync`.

In every mode the written paths are remembered until :meth:`sync` fsyncs them and their parent
directories, which the coordinator calls at checkpoint boundaries.

It is one of the two :class:`~.record_store.RecordStore` implementations (the other writes to
an object store): the group writers and readers use nothing else of it beyond zarr's ``Store``.

Partial writes: zarr 3.x never issues byte-range writes (``Store.supports_partial_writes`` is
always ``False``; the sharding codec reads the whole shard, merges, and ``set``\\ s the whole shard
again), so overriding ``set``/``set_sync``/``set_if_not_exists`` covers every write path.
"""
from __future__ import annotations

import asyncio
import os
import re
import threading
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Literal, Self

from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from .record_store import Listing, Version

FsyncPolicy = Literal["always", "replace", "never"]
_POLICIES = ("always", "replace", "never")

#: Temporaries are hidden dot-files in the target's directory (same file system, so the rename is
#: atomic): ``.<name>.<32 hex>.tmp``. zarr's own temporaries end in ``.<32 hex>.partial``.
_TMP_RE = re.compile(r"^(\..+\.[0-9a-f]{32}\.tmp|.+\.[0-9a-f]{32}\.partial)$")


def _write_payload(f, view) -> int:  # noqa: ANN001 - tiny indirection, patched by crash tests
    """Write the whole payload to the open temporary (split out so tests can inject a crash)."""
    return f.write(view)


def fsync_file(path: str | Path) -> None:
    """fsync one regular file by path (a missing file is ignored: it was deleted or replaced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str | Path) -> None:
    """fsync a directory so that renames/creations/unlinks of its entries are durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; nothing more we can do
        pass
    finally:
        os.close(fd)


def fsync_tree(paths: Iterable[str | Path], *, stop_at: str | Path | None = None) -> None:
    """Make files durable: fsync each file, then each parent directory up to ``stop_at``.

    Directories are synced bottom-up after their files, so that a newly created chunk directory
    is reachable after a crash. Directories given in ``paths`` are synced as directories.
    """
    stop = Path(stop_at).resolve() if stop_at is not None else None
    dirs: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            dirs.add(p)
        else:
            fsync_file(p)
            dirs.add(p.parent)
    todo: set[Path] = set()
    for d in dirs:
        d = d.resolve()
        todo.add(d)
        if stop is not None:
            # include ancestors up to and including the store root: mkdir(parents=True) may have
            # created any of them since the last sync
            while d != stop and stop in d.parents:
                d = d.parent
                todo.add(d)
    # deepest first
    for d in sorted(todo, key=lambda x: len(x.parts), reverse=True):
        sync_dir(d)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same dir + fsync + rename).

    For small control files such as the run manifest: readers see the old or the new content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_into(path, memoryview(data), do_fsync=fsync, exclusive=False)
    if fsync:
        sync_dir(path.parent)


def _replace_into(path: Path, view: memoryview, *, do_fsync: bool, exclusive: bool) -> int:
    # 32 random hex digits (as uuid4().hex, without building a UUID object: the writer thread
    # names one temporary per file, under the GIL)
    tmp = path.parent / f".{path.name}.{os.urandom(16).hex()}.tmp"
    try:
        with open(tmp, "xb") as f:
            n = _write_payload(f, view)
            if do_fsync:
                f.flush()
                os.fsync(f.fileno())
        if exclusive:
            # link() fails if the target exists: first writer wins, as zarr's set_if_not_exists
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n


def read_file_version(path: str | Path,
                      known: Version | None) -> tuple[Version, bytes | None] | None:
    """A local file read whole through one descriptor (:meth:`RecordStore.read_version`): a
    writer replaces files by rename, so this is one consistent version of it. Its version is
    ``(inode, size, mtime)``; when that equals ``known`` nothing is read (``data`` is ``None``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig == known:
            return sig, None
        with os.fdopen(os.dup(fd), "rb") as fh:
            return sig, fh.read()
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete temporaries left by a killed writer under ``directory``; returns how many.

    Only call this on a directory that no live process writes to (a writer's own group).
    """
    n = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if _TMP_RE.match(name):
                try:
                    os.unlink(os.path.join(root, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


class AtomicLocalStore(LocalStore):
    """``LocalStore`` with atomic (temp + ``os.replace``) writes and an fsync policy.

    Parameters
    ----------
    root : directory of the store.
    read_only : open read-only.
    fsync : ``"replace"`` (default), ``"always"`` or ``"never"``; see the module docstring.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False,
                 fsync: FsyncPolicy = "replace") -> None:
        super().__init__(root, read_only=read_only)
        if fsync not in _POLICIES:
            raise ValueError(f"fsync must be one of {_POLICIES}, got {fsync!r}")
        self.fsync_policy: FsyncPolicy = fsync
        self._dirty: set[Path] = set()
        self._dirty_lock = threading.Lock()
        #: key -> (bytes, crc32) of each file written through this store and not yet taken by
        #: :meth:`take_checksums`: writers report them at checkpoint boundaries, so that a full
        #: shard (written once, never changed) can later be checked without decoding it
        self._checksums: dict[str, tuple[int, int]] = {}

    def with_read_only(self, read_only: bool = False) -> Self:
        # docstring inherited; keep the policy (zarr calls this when opening)
        return type(self)(root=self.root, read_only=read_only, fsync=self.fsync_policy)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStore) and self.root == other.root

    __hash__ = None  # type: ignore[assignment]  # mutable (dirty set), like LocalStore

    def __repr__(self) -> str:
        return f"AtomicLocalStore('{self}', fsync={self.fsync_policy!r})"

    # ------------------------------------------------------------------ reads
    def read_bytes(self, key: str) -> bytes | None:
        """The file ``key``'s bytes, or ``None`` when there is none (:class:`RecordStore`)."""
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_version(self, key: str,
                     known: Version | None) -> tuple[Version, bytes | None] | None:
        """:func:`read_file_version` of ``key`` (:class:`RecordStore`)."""
        return read_file_version(self.root / key, known)

    def list_folder(self, prefix: str) -> Listing:
        """Sub-directories and files directly under ``prefix``, temporaries left out (one
        ``scandir``; :class:`RecordStore`)."""
        folders, files = [], []
        try:
            with os.scandir(self.root / prefix) as entries:
                for e in entries:
                    if e.is_dir():
                        folders.append(e.name)
                    elif not _TMP_RE.match(e.name):
                        files.append(e.name)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return Listing(sorted(folders), sorted(files))

    def remove_temporaries(self, prefix: str) -> int:
        """:func:`remove_stale_temporaries` under ``prefix`` (:class:`RecordStore`)."""
        return remove_stale_temporaries(self.root / prefix)

    # ------------------------------------------------------------------ writes
    def _put_atomic(self, key: str, value: Buffer, exclusive: bool = False) -> int:
        if not isinstance(value, Buffer):
            raise TypeError(
                f"AtomicLocalStore.set(): `value` must be a Buffer instance, got {type(value)}"
            )
        return self.put_bytes(key, value.as_buffer_like(), exclusive=exclusive)

    def put_bytes(self, key: str, data: bytes | memoryview, *, exclusive: bool = False) -> int:
        """Write ``data`` as the file ``key`` under the store's policy (atomic replace, fsync,
        checksum, :meth:`sync`), as zarr's writes through this store are; returns its size.
        For writers that build whole files themselves (:mod:`.shard_files`)."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        policy = self.fsync_policy
        do_fsync = policy == "always" or (policy == "replace" and path.exists())
        view = memoryview(data)
        n = _replace_into(path, view, do_fsync=do_fsync, exclusive=exclusive)
        crc = zlib.crc32(view)
        if policy == "always":
            sync_dir(path.parent)  # the rename is durable now; sync() still covers new parents
        with self._dirty_lock:
            # after an fsync'd replace only the rename (the directory entry) is pending
            self._dirty.add(path.parent if do_fsync else path)
            self._checksums[key] = (n, crc)
        return n

    def set_sync(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._ensure_open_sync()
        self._check_writable()
        assert isinstance(key, str)
        self._put_atomic(key, value)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        # LocalStore.set and set_if_not_exists both funnel through here
        if not self._is_open:
            await self._open()
        self._check_writable()
        assert isinstance(key, str)
        await asyncio.to_thread(self._put_atomic, key, value, exclusive)

    def _note_deleted(self, key: str) -> None:
        with self._dirty_lock:
            self._dirty.add((self.root / key).parent)
            self._checksums.pop(key, None)

    def take_checksums(self, prefix: str) -> dict[str, tuple[int, int]]:
        """``(bytes, crc32)`` of the files under ``prefix`` written since the last call, as
        written (the latest version of each); they are forgotten here."""
        with self._dirty_lock:
            keys = [k for k in self._checksums if k.startswith(prefix)]
            return {k: self._checksums.pop(k) for k in keys}

    def delete_sync(self, key: str) -> None:
        # docstring inherited
        super().delete_sync(key)
        self._note_deleted(key)

    async def delete(self, key: str) -> None:
        # docstring inherited
        await super().delete(key)
        self._note_deleted(key)

    # --------------------------------------------------------------- listing
    # A hard kill can leave a temporary behind until the group's writer reopens; keep it out of
    # zarr's hierarchy listings (zarr would warn about an unrecognised node, or count it).
    async def list(self) -> AsyncIterator[str]:
        # docstring inherited
        async for key in super().list():
            if not _TMP_RE.match(key.rsplit("/", 1)[-1]):
                yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        async for key in super().list_prefix(prefix):
            if not _TMP_RE.match(key.rsplit("/", 1)[-1]):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        async for key in super().list_dir(prefix):
            if not _TMP_RE.match(key):
                yield key

    # ------------------------------------------------------------- durability
    def sync(self) -> None:
        """Make everything written through this store so far durable (fsync files, then dirs).

        Call at checkpoint boundaries, after the writers' ``flush()``, before recording
        committed lengths in the manifest.
        """
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        try:
            fsync_tree(dirty, stop_at=self.root)
        except BaseException:
            with self._dirty_lock:
                self._dirty |= dirty
            raise
