"""The writer lease of a run on an object store, and the conditional PUTs it is built on.

Why a lease and not a lock: an object store cannot see a process die, so the holder's claim must
run out by itself. ``.run.lock`` holds the holder (JSON), a random token and an expiry; it is
taken with a create-only PUT (or, once expired or released, an ``If-Match`` PUT on the stale
ETag, so of two jobs racing exactly one wins) and renewed by a daemon thread every
``lease_s / 3`` with ``If-Match`` on its own last version. The same conditional PUTs make the
manifest's compare-and-swap (:meth:`.object_storage.ObjectRunStorage.commit_manifest`).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Protocol

from ..errors import CommitConflictError, LockHeldError, RunError
from .storage import holder_text

__all__ = ["ObjectLease", "VersionedObjects", "lease_doc", "precondition_failed", "put_mode", "request_failed",
           "take_lease"]

log = logging.getLogger(__name__)


class VersionedObjects(Protocol):
    """What a lease needs of its store: versioned reads, conditional PUTs, names for messages."""

    lease_s: float

    def get_object(self, key: str) -> tuple[bytes, dict[str, Any]] | None: ...
    def put_object(self, key: str, data: bytes, mode: Any = "overwrite") -> dict[str, Any]: ...
    def url(self, rel: str = "", place: str | None = None) -> str: ...


def put_mode(version: dict[str, Any] | None) -> Any:
    """obstore's put mode: create-only for ``None``, else ``If-Match`` that version (obstore
    refuses ``None`` values in it)."""
    if version is None:
        return "create"
    return {k: v for k, v in version.items() if v is not None}


def request_failed() -> tuple[type[BaseException], ...]:
    """What a request to the store raises when the store (not this code) failed; a missing key
    is ``FileNotFoundError``, one of them."""
    from obstore.exceptions import BaseError
    return (BaseError, OSError)


def precondition_failed() -> tuple[type[BaseException], ...]:
    """A conditional PUT refused: the object is not (or no longer) the version we named."""
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    return (AlreadyExistsError, PreconditionError)


def _lease_body(holder: dict[str, Any], token: str, lease_s: float, *,
                released: bool = False) -> bytes:
    now = time.time()
    doc = {"holder": holder, "token": token, "lease_s": lease_s, "renewed": now,
           "expires": now + lease_s, "process_space": _process_space()}
    if released:
        doc["released"] = now
    return (json.dumps(doc) + "\n").encode()


def _who(doc: dict | None) -> str:
    """The holder a lease names, as a refused job is told (the words of a local lock's)."""
    return holder_text(json.dumps((doc or {}).get("holder")).encode())


def _process_space() -> str:
    """This machine's boot and pid namespace: two processes with equal values here see the same
    pids (a host name alone does not tell: containers on the host network share it)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _holder_died_here(doc: dict) -> bool:
    """Whether a lease's holder was a process of this machine and pid namespace that is gone (a
    crashed job relaunched on the same node): its lease need not run out. A live holder, another
    host's or container's, or a pid that was reused all answer no, and the lease runs out."""
    h = doc.get("holder")
    space = _process_space()
    if not isinstance(h, dict) or h.get("host") != socket.gethostname() or not space \
            or doc.get("process_space") != space \
            or not isinstance(h.get("pid"), int) or h["pid"] <= 0 or h["pid"] == os.getpid():
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def lease_doc(raw: bytes) -> dict | None:
    """A lease object's content, or ``None`` when it is not one (garbage: free to take)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("token"), str) \
            or not isinstance(doc.get("expires"), (int, float)):
        return None
    return doc


class ObjectLease:
    """A held lease on an object store, renewed every ``lease_s / 3`` by a daemon thread.

    :meth:`release` (idempotent; also at interpreter exit) marks it released with a conditional
    PUT. A child forked from the holder neither renews nor releases it (the thread is not forked;
    :meth:`release` checks the pid). :meth:`check` raises :class:`CommitConflictError` once the
    lease was taken over or has gone unrenewed for two intervals: the commit it guards is
    refused before the lease could have expired in anybody's eyes.
    """

    def __init__(self, storage: VersionedObjects, key: str, holder: dict[str, Any], token: str,
                 version: dict[str, Any]) -> None:
        self.storage, self.key, self.holder, self.token = storage, key, holder, token
        self.took_over = False
        self.path = storage.url(key)
        self.lease_s = storage.lease_s
        self._version = version
        self._renewed = time.monotonic()  # the start of the last successful renewal
        self._lost: str | None = None
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        # the thread holds the lease weakly: an abandoned one is released when collected
        self._thread = threading.Thread(target=_renew_loop, args=(weakref.ref(self), self._stop,
                                        self.lease_s / 3), name="dist_hooks-lease", daemon=True)
        self._thread.start()
        _HELD.add(self)

    @property
    def lost(self) -> str | None:
        """Why the lease is not ours any more, or ``None`` while it is."""
        return self._lost

    def check(self) -> None:
        age = time.monotonic() - self._renewed
        if self._lost is None and age > self.lease_s * 2 / 3:
            self._lost = f"not renewed for {age:.1f} s (lease {self.lease_s:g} s)"
        if self._lost is not None:
            raise CommitConflictError(f"{self.path}: this job's lease of the run is lost "
                                      f"({self._lost}); nothing more is committed by it")

    def renew(self) -> bool:
        """One renewal (the thread's; public for tests): ``False`` once the lease is lost."""
        with self._mutex:
            if self._lost is not None or self._stop.is_set():
                return self._lost is None
            start = time.monotonic()
            body = _lease_body(self.holder, self.token, self.lease_s)
            try:
                self._version = self.storage.put_object(self.key, body, put_mode(self._version))
                self._renewed = start
            except precondition_failed():
                cur = self.storage.get_object(self.key)
                if cur is not None and cur[0] == body:  # ours, its answer lost and retried
                    self._version, self._renewed = cur[1], start
                else:
                    doc = lease_doc(cur[0]) if cur is not None else None
                    who = _who(doc)
                    self._lost = f"taken over by another job: {who}"
            except RunError as exc:
                log.warning("%s: renewing the lease failed: %s", self.path, exc)
                if time.monotonic() - self._renewed > self.lease_s * 2 / 3:
                    self._lost = f"could not be renewed: {exc}"
            if self._lost is not None:
                log.error("%s: lease lost (%s)", self.path, self._lost)
            return self._lost is None

    def release(self) -> None:
        """Stop renewing and mark the lease released, so a next job takes it at once."""
        if self._stop.is_set():
            return
        self._stop.set()
        _HELD.discard(self)
        if os.getpid() != self._pid:
            return  # a forked child: the lease is its parent's
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._mutex:
            if self._lost is not None:
                return
            try:
                self.storage.put_object(self.key, _lease_body(self.holder, self.token, 0.0,
                                                        released=True), put_mode(self._version))
            except precondition_failed():
                pass  # somebody took it over: not ours to release
            except RunError as exc:
                log.warning("%s: releasing the lease failed (it expires by itself): %s",
                            self.path, exc)
            self._lost = "released"

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit
            pass


def _renew_loop(ref: "weakref.ref[ObjectLease]", stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        lease = ref()
        if lease is None or not lease.renew():
            return
        del lease


#: leases this process holds; released at a normal exit, as the kernel drops a ``flock``
_HELD: "weakref.WeakSet[ObjectLease]" = weakref.WeakSet()


@atexit.register
def _release_at_exit() -> None:
    for lease in list(_HELD):
        try:
            lease.release()
        except Exception:  # noqa: BLE001
            pass


def take_lease(store: VersionedObjects, key: str, holder: dict[str, Any], root: str) -> ObjectLease:
    """Take the lease ``key`` of ``store`` for ``holder`` (``root`` names the run in messages):
    a create-only PUT, or an ``If-Match`` PUT on the ETag of one that has expired, was released,
    or names a dead process of this machine. A live lease of the same job id (a restart on another
    node) is waited out once; :class:`LockHeldError` while another's is live. :class:`RunError`
    when the store ignores conditional writes."""
    token = uuid.uuid4().hex
    waited = False
    for _ in range(5):
        cur = store.get_object(key)
        doc = lease_doc(cur[0]) if cur is not None else None
        if cur is not None and doc is not None and doc["token"] == token:
            return ObjectLease(store, key, holder, token, cur[1])  # our PUT, answer lost
        live = cur is not None and doc is not None and not doc.get("released") \
            and time.time() < doc["expires"]
        if live and _holder_died_here(doc):
            log.warning("%s/%s: taking over the lease of %s, whose process is gone", root, key,
                        _who(doc))
        elif live and not waited and _same_job(doc, holder):
            # a restart of this very job (torchrun, a Slurm requeue) on another node: its dead
            # predecessor's lease runs out within lease_s; wait for that instead of failing
            wait = doc["expires"] - time.time() + 0.1
            log.warning("%s/%s: waiting %.0f s for the lease of this job's previous attempt (%s) "
                        "to run out", root, key, wait, _who(doc))
            time.sleep(max(0.0, wait))
            waited = True  # renewed meanwhile: that attempt is alive, and refused below
            continue
        elif live:
            raise _held(root, key, doc)
        elif cur is not None and not (doc and doc.get("released")):
            log.warning("%s/%s: taking over the expired lease of %s", root, key, _who(doc))
        body = _lease_body(holder, token, store.lease_s)
        try:
            version = store.put_object(key, body, put_mode(None if cur is None else cur[1]))
        except precondition_failed():
            continue  # changed since we read it: read again (a racer's, or ours retried)
        _check_conditional_writes(store, key, body, root)
        lease = ObjectLease(store, key, holder, token, version)
        #: taken from a holder that did not release it (it may still be writing)
        lease.took_over = cur is not None and not (doc and doc.get("released"))
        return lease
    raise RunError(f"{root}/{key}: the lease changed under every attempt to take it")


def _same_job(doc: dict, holder: dict[str, Any]) -> bool:
    h = doc.get("holder")
    return isinstance(h, dict) and holder.get("job_id") is not None \
        and h.get("job_id") == holder.get("job_id")


def _check_conditional_writes(store: VersionedObjects, key: str, body: bytes, root: str) -> None:
    """A create-only PUT over the lease just taken must be refused. A store that ignores the
    condition (some S3-compatible servers do) would let two writers both commit: refuse it."""
    try:
        store.put_object(key, body, "create")
    except precondition_failed():
        return
    raise RunError(f"{root}: the object store ignored a conditional write (a create-only PUT on "
                   f"the existing {key} succeeded): it cannot keep two jobs from both committing "
                   "this run; use a store that supports If-None-Match / If-Match on PUT")


def _held(root: str, key: str, doc: dict) -> LockHeldError:
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["expires"]))
    return LockHeldError(
        f"{root} is being recorded by another job ({_who(doc)}; lease {root}/{key}, "
        f"valid until {until} unless renewed): two writers would corrupt it. Wait for that "
        "job to end or stop it; a job that dies stops renewing its lease, which then "
        f"expires within {float(doc.get('lease_s', 0)):g} s, and a relaunch takes it over")
