"""A run in an S3-compatible object store (``s3://bucket/prefix``), behind :class:`RunStorage`.

Why it can be as safe as a POSIX directory: an object store has no rename and no append, but a
PUT is atomic per object (a reader sees the old object or the new one, never a mix) and durable
when it returns, and S3 (and SeaweedFS, MinIO, R2, GCS's S3 API) refuse a *conditional* PUT whose
precondition fails: ``If-None-Match: *`` (create only) and ``If-Match: <ETag>`` (replace only the
version I saw). Those two are all the boundary protocol needs:

* :meth:`ObjectRunStorage.replace` is a plain PUT (a boundary file, a saved state, a Zarr node);
* :meth:`ObjectRunStorage.commit_manifest` is a compare-and-swap on ``run.json``: the storage
  remembers the ETag of the manifest it last read or wrote, and the commit succeeds only if
  ``run.json`` is still that version (create-only for a new run). A commit that finds another
  writer's manifest raises :class:`CommitConflictError`, so two writers can never both commit,
  whatever the locks did;
* :meth:`ObjectRunStorage.lock` is a lease: ``.run.lock`` holds the holder (JSON), a random token
  and an expiry, created with a create-only PUT and renewed (``If-Match``) by a daemon thread
  every ``lease_s / 3``. An object store cannot see a process die, so a killed holder's lease
  *expires* ``lease_s`` after its last renewal; a relaunch then takes it over with an ``If-Match``
  PUT on the stale ETag: of two relaunches racing for it, exactly one wins. A relaunch on the
  holder's own host whose pid is gone takes it over at once (the usual restart after a crash).

(The lease and the conditional PUTs: :mod:`.object_lease`.)

Who calls what, and in which order (as for :mod:`.storage`, whose docstring has the protocol):

1. rank 0 opens the run with :func:`open_storage` (which checks the credentials and the
   endpoint with one listing, so a wrong key or a dead endpoint fails at start, in seconds), takes
   :meth:`~ObjectRunStorage.lock`, then :meth:`~ObjectRunStorage.read`\\ s ``run.json`` (this
   remembers its ETag) before anything is written;
2. every rank writes its data through :meth:`~ObjectRunStorage.zarr_store` and
   :meth:`~ObjectRunStorage.replace`;
3. rank 0, at each boundary: :meth:`~ObjectRunStorage.replace` of the boundary file, then
   :meth:`~ObjectRunStorage.commit_manifest` (the commit point: refused when this process's lease
   was lost or not renewed for two renewal intervals, or when ``run.json`` changed);
4. at the end, ``release()`` of the lease (a conditional PUT marking it released).

Clocks: a lease's expiry is the holder's wall-clock time; a relaunch compares it with its own, so
the hosts' clocks must agree to well under ``lease_s`` (NTP does). An early takeover would still
not let two writers commit: the old holder's next renewal and commit are conditional and fail.

Credentials, endpoint and region come from ``storage_options`` or the usual AWS environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``); nothing of them is written into the
run or shown in a message. obstore is imported only when an ``s3://`` run is opened
(``pip install 'dist_hooks[s3]'``).
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import CommitConflictError, DamageError, MissingDependencyError, RunError
from .layout import DATA_DIR, MANIFEST
from .object_lease import (ObjectLease, precondition_failed, put_mode, request_failed,
                           take_lease)
from .storage import RUN_LOCK, LocalRunStorage, RunStorage

__all__ = ["ObjectLease", "ObjectRunStorage", "is_url", "open_storage"]

log = logging.getLogger(__name__)

#: default lease length: how long a killed job blocks its relaunch, and how long a holder may go
#: without renewing (network trouble) before it stops committing
LEASE_S = 30.0

#: ``storage_options`` keys that go to obstore's HTTP client, not to its S3 config
_CLIENT_KEYS = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
    "default_headers", "http1_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
    "proxy_url", "proxy_ca_certificate", "proxy_excludes", "root_certificate",
    "randomize_addresses", "read_timeout", "timeout", "user_agent"})
#: s3fs-style names accepted too (people come with those)
_ALIASES = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
            "endpoint_url": "endpoint"}
#: a short connect timeout; the check at open retries little (a dead endpoint or bad keys are an
#: error in seconds), the run's own requests ride out a busy store (503 SlowDown, a short outage)
_CLIENT_DEFAULTS = {"connect_timeout": "3s"}
_RETRY_DEFAULTS = {"max_retries": 10, "retry_timeout": 120.0}
_CHECK_RETRY = {"max_retries": 1, "retry_timeout": timedelta(seconds=5)}


def _obstore():
    try:
        import obstore
    except ImportError:
        raise MissingDependencyError("s3:// runs need obstore: pip install 'dist_hooks[s3]'") \
            from None
    return obstore


def _not_found() -> tuple[type[BaseException], ...]:
    from obstore.exceptions import NotFoundError
    return (FileNotFoundError, NotFoundError)


def object_key(rel: str | os.PathLike, place: str | None = None) -> str:
    """``rel`` as a key under the run's prefix (``""`` for the prefix itself), refusing one that
    leaves it, as :func:`.storage.run_path` refuses a path that leaves a run directory (the
    manifest is data: ``../other_run`` must neither be read as this run's nor written to)."""
    s = os.fspath(rel)
    norm = posixpath.normpath(s) if s else "."
    if (s.startswith("/") or "\\" in s or "\0" in s or norm == ".."
            or norm.startswith("../")):
        raise DamageError(f"{place or MANIFEST}: path {s!r} points outside the run directory")
    return "" if norm == "." else norm


class ObjectRunStorage(RunStorage):
    """One root (a run, or a rank root) at ``s3://bucket/prefix``.

    ``storage_options``: obstore's S3 config keys (``access_key_id``, ``secret_access_key``,
    ``session_token``, ``endpoint``, ``region``, ...; s3fs's ``key``/``secret``/``token``/
    ``endpoint_url`` too), its client keys (``allow_http``, ``connect_timeout``, ``timeout``, ...)
    and ``max_retries``/``retry_timeout`` (seconds); what is not given comes from the AWS
    environment variables. An ``http://`` endpoint allows plain HTTP by itself. ``lease_s``
    (also a key of ``storage_options``): the lease of :meth:`lock`, in seconds. ``check``: list the prefix once now, so bad credentials, a
    missing bucket or an unreachable endpoint raise :class:`RunError` here.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 lease_s: float = LEASE_S, check: bool = True) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise RunError(f"{url!r}: not an object-store run URL (s3://bucket/prefix)")
        self.bucket = parts.netloc
        self.prefix = object_key(unquote(parts.path).strip("/"), url)
        #: ``s3://bucket/prefix`` (no local path: there is no ``root``)
        self.root_url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        opts = dict(storage_options or {})
        self.lease_s = float(opts.pop("lease_s", lease_s))
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        self._config, self._client, self._retry = _split_options(opts)
        self._store = self._s3(self.prefix)
        self._zarr: dict[str, Any] = {}
        #: ``run.json``'s version as last read or written: ``None`` never seen (commit: create
        #: only), ``{"e_tag": ..., "version": ...}`` once seen (commit: only over that version)
        self._manifest_version: dict[str, Any] | None = None
        self._leases: "weakref.WeakSet[ObjectLease]" = weakref.WeakSet()
        if check:
            self.check_access()

    # -- the store
    def _s3(self, prefix: str, retry: dict[str, Any] | None = None):
        _obstore()  # first: its message names the extra
        from obstore.store import S3Store
        try:
            return S3Store(self.bucket, prefix=prefix or None, config=self._config,
                           client_options=self._client,
                           retry_config={**self._retry, **(retry or {})})
        except Exception as exc:  # noqa: BLE001 - an unknown key, a bad value: the user's
            raise RunError(f"{self.root_url}: cannot configure the object store: {exc}") from exc

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages (no credentials)."""
        ep = _configured_endpoint(self._config)
        region = self._config.get("region") or os.environ.get("AWS_REGION") or "default region"
        return ep or f"AWS S3 ({region})"

    def _error(self, exc: BaseException, doing: str) -> RunError:
        """An obstore failure as a :class:`RunError` that says what to check."""
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        name = type(exc).__name__
        if name in ("PermissionDeniedError", "UnauthenticatedError") or "403 Forbidden" in text \
                or "401 Unauthorized" in text:
            return RunError(
                f"{self.root_url}: access denied while {doing} at {self.endpoint}: the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or "
                f"storage_options) are wrong or may not use this bucket ({first})")
        if "NoSuchBucket" in text:
            return RunError(f"{self.root_url}: bucket {self.bucket!r} does not exist at "
                            f"{self.endpoint} (create it first)")
        if any(s in text for s in ("error sending request", "Connection refused", "dns error",
                                   "timed out", "connection closed", "tcp connect")):
            return RunError(
                f"{self.root_url}: cannot reach the object store at {self.endpoint} while {doing}: "
                "check AWS_ENDPOINT_URL (or storage_options['endpoint']) and that the server is "
                f"up ({first})")
        return RunError(f"{self.root_url}: {doing} failed: {first}")

    def check_access(self) -> None:
        """One listing of the prefix: the credentials, the bucket and the endpoint work."""
        try:
            self._s3(self.prefix, _CHECK_RETRY).list_with_delimiter(None)
        except request_failed() as exc:
            raise self._error(exc, "listing the run") from exc

    def get_object(self, key: str):
        """``(bytes, {"e_tag", "version"})`` or ``None``; both from one response."""
        obs = _obstore()
        try:
            r = obs.get(self._store, key)
            data = bytes(r.bytes())
        except _not_found():
            return None
        except request_failed() as exc:
            raise self._error(exc, f"reading {key}") from exc
        return data, {"e_tag": r.meta.get("e_tag"), "version": r.meta.get("version")}

    def put_object(self, key: str, data: bytes, mode: Any = "overwrite") -> dict[str, Any]:
        """One PUT (``mode``: see :func:`_mode`); a refused precondition propagates as obstore's
        error (:func:`precondition_failed`), any other failure as :class:`RunError`."""
        obs = _obstore()
        try:
            if mode == "overwrite":
                r = obs.put(self._store, key, data)
            else:  # a conditional PUT cannot be multipart
                r = obs.put(self._store, key, data, mode=mode, use_multipart=False)
        except precondition_failed():
            raise
        except request_failed() as exc:
            raise self._error(exc, f"writing {key}") from exc
        return {"e_tag": r.get("e_tag"), "version": r.get("version")}

    # -- RunStorage
    def read(self, rel: str) -> bytes | None:
        """The object's bytes, or ``None``. Reading ``run.json`` remembers its version: the next
        :meth:`commit_manifest` replaces exactly that version."""
        key = object_key(rel)
        got = self.get_object(key)
        if key == MANIFEST and got is not None:
            self._manifest_version = got[1]
        return None if got is None else got[0]

    def replace(self, rel: str, data: bytes) -> None:
        """One PUT: atomic per object and durable when it returns (a large one is a multipart
        upload, which appears whole at its completion)."""
        key = object_key(rel)
        if not key:
            raise RunError(f"{self.root_url}: cannot replace the run's prefix itself")
        self.put_object(key, bytes(data))

    def commit_manifest(self, data: bytes) -> None:
        """Compare-and-swap ``run.json``: create-only when this storage never saw one, else
        ``If-Match`` its last ETag. Refused (:class:`CommitConflictError`, nothing written) when
        another writer's manifest is there, or this process's lease of the run is lost."""
        for lease in list(self._leases):
            if lease.lost != "released":
                lease.check()
        seen = self._manifest_version
        if seen is not None and not seen.get("e_tag") and not seen.get("version"):
            raise RunError(f"{self.root_url}: the store returned no ETag for {MANIFEST}: it "
                           "cannot compare-and-swap, so commits would not be safe")
        try:
            self._manifest_version = self.put_object(MANIFEST, bytes(data), put_mode(seen))
            return
        except precondition_failed():
            pass
        now = self.get_object(MANIFEST)  # our own PUT, retried after its answer was lost?
        if now is not None and now[0] == bytes(data):
            self._manifest_version = now[1]
            return
        raise CommitConflictError(
            f"{self.root_url}/{MANIFEST} was "
            + ("created" if seen is None else "replaced")
            + " by another writer since this one "
            + ("looked" if seen is None else "last read or wrote it")
            + ": another job is recording this run (or took it over after this job's lease "
            "lapsed); this boundary was not committed, the other writer's stays in force")

    def list(self, prefix: str) -> list[str]:
        """Names of the objects directly under the "folder" ``prefix`` (not deeper), sorted."""
        key = object_key(prefix)
        try:
            res = self._store.list_with_delimiter(key or None)
        except request_failed() as exc:
            raise self._error(exc, f"listing {key or '/'}") from exc
        base = f"{key}/" if key else ""
        return sorted(o["path"][len(base):] for o in res["objects"]
                      if o["path"].startswith(base) and "/" not in o["path"][len(base):])

    def remove(self, rel: str) -> None:
        key = object_key(rel)
        if not key:
            raise RunError(f"{self.root_url}: cannot remove the run's prefix itself")
        try:
            _obstore().delete(self._store, key)
        except _not_found():
            pass
        except request_failed() as exc:
            raise self._error(exc, f"deleting {key}") from exc

    def zarr_store(self, rel: str = DATA_DIR, *, fsync: str = "replace"):
        """The :class:`~.object_zarr_store.ObjectZarrStore` at ``prefix/rel`` (one per ``rel``,
        reused; ``""``: the prefix itself): every chunk, shard and ``zarr.json`` is one PUT,
        atomic and durable at return, so it needs no temporary files and no fsync (``fsync``
        is accepted and means nothing here; ``LocalRunStorage``'s ``AtomicLocalStore`` does
        both); failures are this storage's :class:`RunError`\\ s."""
        key = object_key(rel)
        if key not in self._zarr:
            from .object_zarr_store import ObjectZarrStore
            self._zarr[key] = ObjectZarrStore(
                self._s3(posixpath.join(self.prefix, key).strip("/")), errors=self._error,
                url=self.url(key))
        return self._zarr[key]

    def path(self, rel: str | os.PathLike, place: str | None = None) -> Path:
        """An object store has no local paths: :class:`RunError` (after the same check of
        ``rel`` as every other method). Writers that stream into local files (CSV logs) need
        another design here; messages use :meth:`url`."""
        key = object_key(rel, place)
        raise RunError(f"{self.url(key)}: an object store has no local file path; this "
                       "operation needs a run on a filesystem")

    def url(self, rel: str | os.PathLike = "", place: str | None = None) -> str:
        key = object_key(rel, place)
        return f"{self.root_url}/{key}" if key else self.root_url

    def lock(self, holder: dict[str, Any], name: str = RUN_LOCK) -> ObjectLease:
        """Take the lease ``name`` (:func:`.object_lease.take_lease`): :class:`LockHeldError`
        naming the holder and its expiry while another's lease is live; of two jobs racing,
        exactly one wins. A commit is refused once a lease of this storage is lost."""
        lease = take_lease(self, object_key(name), holder, self.root_url)
        self._leases.add(lease)
        if lease.took_over and object_key(name) == RUN_LOCK:
            self._fence_manifest()
        return lease

    def _fence_manifest(self) -> None:
        """After taking over a lease that was not released, replace ``run.json`` by a version no
        earlier holder has seen (its bytes and ETag differ; its JSON is the same): a holder that
        was only frozen, and still believes in its lease, then fails its next compare-and-swap
        instead of committing over the data this job is about to cut back."""
        for _ in range(5):
            cur = self.get_object(MANIFEST)
            if cur is None:
                return  # a new run: both would commit create-only, and one of them loses
            data = cur[0][:-1] if cur[0].endswith(b"\n ") else cur[0] + b" "
            try:
                self._manifest_version = self.put_object(MANIFEST, data, put_mode(cur[1]))
                return
            except precondition_failed():
                continue  # it committed meanwhile: fence the newer version
        raise RunError(f"{self.root_url}/{MANIFEST}: changed under every attempt to fence it")

    def __repr__(self) -> str:
        return f"ObjectRunStorage({self.root_url!r})"

    def list_tree(self, prefix: str = "") -> dict[str, tuple[int, str | None]]:
        """Every object under the "folder" ``prefix`` at any depth, as ``{key: (size, ETag)}``
        (keys relative to the run, like :meth:`read`'s). Why: a mirror of the run
        (:mod:`dist_hooks.tools.mirror`) learns from one recursive listing (up to 1000 keys a
        request) which objects changed since it last looked, without a GET of any of them."""
        key = object_key(prefix)
        out: dict[str, tuple[int, str | None]] = {}
        try:
            for batch in _obstore().list(self._store, key or None, chunk_size=1000):
                for o in batch:
                    out[o["path"]] = (int(o["size"]), o.get("e_tag"))
        except request_failed() as exc:
            raise self._error(exc, f"listing {key or '/'}") from exc
        return out


def _configured_endpoint(config: dict[str, Any]) -> str:
    """The endpoint obstore will use: its config's, else the AWS environment's ("" for AWS)."""
    return str(config.get("endpoint") or config.get("aws_endpoint")
               or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or "")


def _split_options(opts: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``storage_options`` as obstore's (S3 config, client options, retry config)."""
    config: dict[str, Any] = {}
    client = dict(_CLIENT_DEFAULTS)
    retry = dict(_RETRY_DEFAULTS)
    for k, v in opts.items():
        k = _ALIASES.get(k, k)
        if k in _CLIENT_KEYS:
            client[k] = v
        elif k in ("max_retries", "retry_timeout"):
            retry[k] = v
        else:
            config[k] = v
    if _configured_endpoint(config).startswith("http://"):  # named a plain-HTTP endpoint: meant it
        client.setdefault("allow_http", True)
    rt = retry.pop("retry_timeout")
    retry["retry_timeout"] = rt if isinstance(rt, timedelta) else timedelta(seconds=float(rt))
    retry["backoff"] = {"init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=2), "base": 2}
    return config, client, retry


_MANGLED = re.compile(r"^(s3|file):(?!//)", re.IGNORECASE)


def is_url(location: str | os.PathLike | None) -> bool:
    """Whether ``location`` is a storage URL (``s3://...``, ``file://...``) rather than a local
    path: the one test every entry point uses. A string that looks like a mangled URL
    (``s3:/bucket/x``, ``s3:bucket``) is a :class:`RunError`, not a local directory ``s3:``."""
    if not isinstance(location, str):
        return False
    if _MANGLED.match(location):
        raise RunError(f"{location!r}: not a valid URL; write s3://bucket/prefix or "
                       "file:///absolute/path")
    return "://" in location


def open_storage(url_or_path: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> RunStorage:
    """The storage a run location names: a local path or ``file://`` URL
    (:class:`.storage.LocalRunStorage`) or ``s3://bucket/prefix`` (:class:`ObjectRunStorage`,
    ``kwargs`` to it). Anything else is a :class:`RunError` naming what is supported.

    (Here, not in :mod:`.storage`: that module cannot import this one without an import cycle.)
    """
    if not is_url(url_or_path):
        if storage_options:
            raise RunError(f"{url_or_path}: storage_options apply to s3:// runs only")
        return LocalRunStorage(url_or_path)
    url = str(url_or_path)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or storage_options:
            raise RunError(f"{url}: a file:// URL names a local path (file:///abs/path), "
                           "without storage_options")
        return LocalRunStorage(unquote(parts.path))
    if scheme == "s3":
        return ObjectRunStorage(url, storage_options, **kwargs)
    raise RunError(f"{url}: unsupported storage URL scheme {scheme!r}: use a local path, "
                   "file:///path or s3://bucket/prefix")
