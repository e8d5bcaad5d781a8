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

Before any of it, rank 0 takes :meth:`RunStorage.lock` of the run directory (and with node-local
storage every rank the lock of its own files) and holds it for the run's lifetime: one writer per
run, a second job is refused before it touches a file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import zarr
from zarr.errors import ContainsGroupError

from ..errors import DamageError, LockHeldError, RunError
from .atomic_store import AtomicLocalStore, FsyncPolicy, atomic_write_bytes, sync_dir
from .csv_log import AppendLog, LocalLogFile
from .group_reader import GroupReader
from .layout import DATA_DIR, MANIFEST, RANKS_GROUP
from .log_parts import LogParts
from .manifest import CsvCommit, HookCommit

__all__ = ["LocalRunStorage", "RUN_LOCK", "RunLock", "RunStorage", "holder_text", "lock_holder",
           "run_path"]

#: The lock file of a run directory (rank 0's; with node-local storage each rank also locks
#: ``.run.rank-XXXXX.lock`` in its own directory). Its content names the holder (JSON).
RUN_LOCK = ".run.lock"


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
    def zarr_store(self, rel: str = DATA_DIR, *, fsync: FsyncPolicy = "replace") -> "zarr.abc.store.Store":
        """The Zarr store of the hierarchy at ``rel`` (``data.zarr``) that the record groups are
        written and read through: an :class:`AtomicLocalStore` with the ``fsync`` policy on a
        filesystem; on an object store one whose every PUT is atomic and durable (``fsync``
        means nothing there)."""

    @abstractmethod
    def path(self, rel: str | os.PathLike, place: str | None = None) -> Path:
        """A local path for ``rel`` (writers that stream into files: CSV logs), checked with
        :func:`run_path`; ``place`` names the source of ``rel`` in the error. A backend without
        local files (an object store) checks ``rel`` the same way, then raises
        :class:`RunError`: callers that only name a file in a message use :meth:`url`."""

    def url(self, rel: str | os.PathLike = "", place: str | None = None) -> str:
        """Where ``rel`` is, as people should be told (a local path, an ``s3://`` URL), checked
        as :meth:`path` checks it; ``""`` names the root itself."""
        return str(self.path(rel, place))

    @abstractmethod
    def lock(self, holder: dict[str, Any], name: str = RUN_LOCK) -> "RunLock":
        """Take the exclusive writer lock ``name`` of this root for the caller's lifetime, without
        waiting; ``holder`` (host, pid, job id, launcher) is what a refused job is told.
        :class:`LockHeldError` naming the holder when another process holds it; :class:`RunError`
        when the storage cannot lock. It must be released when the holding process dies, however
        it dies, so a killed job never blocks its relaunch."""

    # -- built on the above
    #: whether :meth:`path` gives local files (a directory) or raises (an object store)
    is_local: bool = False

    def make_root(self) -> None:
        """Make the root exist before the first write (a directory; nothing on an object store,
        where a prefix exists once an object is under it)."""

    def relative(self, location: str | os.PathLike) -> str | None:
        """``location`` (a path or URL, as a hook reports where it writes) as a ``/``-separated
        name relative to this root, or ``None`` when it is not inside the root."""
        root = self.url().rstrip("/") + "/"
        loc = str(location)
        return loc[len(root):] if loc.startswith(root) and len(loc) > len(root) else None

    def log_file(self, rel: str, place: str | None = None) -> AppendLog:
        """Where the CSV log ``rel`` keeps its bytes, checked as :meth:`path` checks ``rel``; no
        I/O until it is opened or scanned. By default immutable parts (an object store cannot
        append: :class:`~.log_parts.LogParts`, over this storage's read, replace, list and
        remove); a filesystem backend appends to a file in place."""
        self.url(rel, place)
        return LogParts(self, rel)

    def check_committed(self, c: HookCommit, what: str) -> None:
        """:class:`DamageError` naming the file unless a committed prefix is there as committed:
        a CSV's first ``bytes`` match their crc32, a group shows its ``records`` and ``atoms``
        (``Run`` checks every one at start, before any hook cuts its file back). Reads, never
        writes; a group's column checksums are verify's (they need all of its data read)."""
        place = f"{MANIFEST} ({what})"
        if isinstance(c, CsvCommit):
            log = self.log_file(c.path, place)  # a local file, or an object store's parts
            if not c.bytes:
                return
            got = log.scan(c.bytes)
            if got is None:
                raise DamageError(f"{log.name}: missing; {place} commits {c.rows} rows "
                                  f"({c.bytes} bytes) in it")
            if got.bytes < c.bytes:
                raise DamageError(f"{log.name}: {got.bytes} bytes, {place} commits {c.bytes}; "
                                  "the file was cut (or lost a part) after the boundary")
            if got.crc32 != c.crc32:
                raise DamageError(f"{log.name}: the committed first {c.bytes} bytes do not "
                                  f"match their crc32 in {place}; the file was changed after "
                                  "the boundary")
            return
        if not c.records and not c.atoms:
            return
        where = self.url(f"{DATA_DIR}/{c.group}", place)  # checked: it stays in the run
        try:
            rd = GroupReader(self.zarr_store(), c.group, limit_records=c.records)
        except Exception as exc:  # noqa: BLE001 - missing or undecodable: damage either way
            raise DamageError(f"{where}: cannot be read ({type(exc).__name__}: {exc}); {place} "
                              f"commits {c.records} records in it") from exc
        if len(rd) < c.records or rd.n_atoms != c.atoms:
            raise DamageError(f"{where}: {len(rd)} records and {rd.n_atoms} atoms visible, "
                              f"{place} commits {c.records} records and {c.atoms} atoms")

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


class RunLock:
    """A held writer lock; :meth:`release` (idempotent) or the end of the process frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd
        _HELD.add(self)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is not None:
            os.close(fd)  # the open file's last descriptor closed: the kernel drops the lock

    def __del__(self) -> None:  # an abandoned Run must not keep its directory locked forever
        try:
            self.release()
        except OSError:
            pass


#: The locks this process holds. A child forked without exec (multiprocessing's fork, data
#: loader workers) shares their open files and would keep a lock after its parent died: it
#: closes its copies (the parent's lock stays: a flock goes with the last descriptor).
_HELD: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for lk in list(_HELD):
        lk.release()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_holder(launcher: str, job_id: str | None, **more: Any) -> dict[str, Any]:
    """Who takes a lock (a file's or a lease): this host and process, the job and launcher, and
    since when; what a refused job is told (:func:`holder_text`)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
            "launcher": launcher, **more, "since": time.time()}


def holder_text(raw: bytes) -> str:
    """What a lock (a file, or an object store's lease) says about its holder, for the message of
    the refused job."""
    try:
        h = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "holder unknown"
    if not isinstance(h, dict):
        return "holder unknown"
    here = h.get("host") == socket.gethostname() and h.get("pid") == os.getpid()
    who = (f"host {h.get('host')}, pid {h.get('pid')}" + (" (this process: a Run on this directory "
           "that was not closed)" if here else "") + f", job id {h.get('job_id')}, launcher "
           f"{h.get('launcher')}")
    if isinstance(h.get("since"), (int, float)):
        who += ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
    return who


class LocalRunStorage(RunStorage):
    """A run on a POSIX filesystem (local disk, NFS, Lustre): atomic replacement is a rename
    of a fsynced temporary file in the same directory, then a fsync of the directory."""

    is_local = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    def make_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def relative(self, location: str | os.PathLike) -> str | None:
        p = Path(location).absolute()
        return p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else None

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

    def zarr_store(self, rel: str = DATA_DIR, *, fsync: FsyncPolicy = "replace") -> AtomicLocalStore:
        return AtomicLocalStore(self.path(rel), fsync=fsync)

    def log_file(self, rel: str, place: str | None = None) -> LocalLogFile:
        return LocalLogFile(self.path(rel, place))

    def path(self, rel: str | os.PathLike, place: str | None = None) -> Path:
        run_path(self.root, rel, place)
        return self.root / rel  # as the caller named it (messages show it so), once checked

    def lock(self, holder: dict[str, Any], name: str = RUN_LOCK) -> RunLock:
        """``flock(LOCK_EX | LOCK_NB)`` on ``ROOT/name``, then the holder written into it.

        Why ``flock`` and not POSIX record locks (``lockf``/``F_SETLK``): a POSIX lock belongs to
        the process and is dropped when the process closes *any* descriptor of the file, so a
        reader elsewhere in the program (a tool, a test) opening the lock file would silently
        release it, and a second ``Run`` in the same process would not be refused. A ``flock``
        belongs to the open file: only our descriptor releases it, and the kernel does when the
        process dies (SIGKILL included). On NFS, Linux emulates ``flock`` with a whole-file POSIX
        lock, which works across clients (NFSv4; NFSv3 through lockd); on Lustre it needs the
        ``flock`` mount option. A filesystem that cannot lock is refused with :class:`RunError`
        (docs/user-guide.md: ``Run(lock=False)``), never treated as unlocked.
        """
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"{path}: cannot open the run's lock file ({exc.strerror}): the run "
                           "directory must be writable") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = b""
            for _ in range(20):  # the holder writes its name just after taking the lock
                raw = os.pread(fd, 4096, 0)
                if raw.strip():
                    break
                time.sleep(0.05)
            os.close(fd)
            raise LockHeldError(
                f"{self.root} is being recorded by another job ({holder_text(raw)}; lock "
                f"{path}): two writers would corrupt it. Wait for that job to end or stop it; "
                "the lock is released when its process exits, however it exits") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK):
                raise RunError(
                    f"{path}: the filesystem of {self.root} cannot lock files ({exc.strerror}): "
                    "Lustre needs the 'flock' mount option, NFSv3 a running lockd (not 'nolock'). "
                    "Without a lock nothing stops a second job from corrupting this run; pass "
                    "Run(lock=False) to record anyway") from exc
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as exc:  # a full disk: do not keep a lock nobody can name
            os.close(fd)
            raise RunError(f"{path}: cannot write the run's lock file ({exc.strerror})") from exc
        return RunLock(path, fd)

    def __repr__(self) -> str:
        return f"LocalRunStorage({str(self.root)!r})"
