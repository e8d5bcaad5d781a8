"""Read an ``s3://`` run through a local mirror of its objects (``open_run`` and every tool).

Why a mirror and not readers over the object store: the tools read a run through local paths
(pyarrow's CSV reader, raw shard files, zarr's ``LocalStore``), fast and tested there. A mirror
turns an object-store run back into the directory a POSIX run writes, so everything after it runs
unchanged; and it is incremental, so looking again at a live run fetches only what changed.

A mirror is the directory :func:`mirror_dir` names under the cache (one per run URL and
endpoint), holding:

* every object of the run as a file at its relative key (``run.json``, ``boundaries/``, saved
  states, every ``zarr.json`` and shard file of ``data.zarr``, a consolidated output), but the
  leases (hidden ``*.lock`` objects: ``.run.lock``, ``.consolidate.lock``), which are no data;
* each CSV log, on the store a folder of parts (:mod:`dist_hooks.store.log_parts`), as the one
  file a POSIX run writes, assembled by
  :meth:`LogParts.read <dist_hooks.store.log_parts.LogParts.read>` from its parts, which are kept in ``.dist_hooks-mirror/parts/`` so the next mirror fetches
  only new ones;
* ``.dist_hooks-mirror/index.json``: each object's size and ETag as fetched, and what the
  assembly of each log found (a gap in its parts, a part whose header differs).

The order of a mirror, and why:

1. ``run.json`` first: every object fetched after it is at least as new as that manifest, and
   the readers cut everything to what it commits (as on a live POSIX run);
2. one recursive listing; each object whose (size, ETag) differs from the index, or whose file
   is missing or of another size, is fetched (in parallel); the files of objects gone are
   removed, and so is anything else in the mirror that is no object (what a killed tool left);
3. completion markers (``consolidated.json``) last, their ETag then listed again: a consolidate
   uploading an output deletes the old marker before it writes any file (see
   :mod:`.s3_output`), so a marker unchanged after every file was fetched belongs to those
   files; otherwise it is left out, and that output reads as incomplete (never half-written).

One mirror at a time per directory (an ``flock`` in ``CACHE/.locks``); readers of a finished
mirror hold nothing, so a later mirror of a live run changes files under them, as a live POSIX
run does. Credentials come from ``storage_options`` or the AWS environment
(:class:`~dist_hooks.store.object_storage.ObjectRunStorage`); none is written into the mirror.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..errors import DamageError, DistHooksError, RunError
from ..store.layout import MANIFEST
from ..store.log_parts import LogParts, part_name
from ..store.object_storage import ObjectRunStorage
from ..store.object_storage import is_url as _is_url
from ..store.storage import LocalRunStorage
from .progress import Progress
from .staging import LOCK_NAME

__all__ = ["INDEX_DIR", "Mirror", "cache_root", "is_url", "mirror_dir", "mirror_lock",
           "mirror_run", "mirrored_url", "naming_url", "open_object_storage", "remember",
           "rename", "save_index", "sync", "usable_key"]

#: the mirror's own files, inside it (never an object key: skipped if a store has one)
INDEX_DIR = ".dist_hooks-mirror"
_INDEX = "index.json"
_PARTS = "parts"
INDEX_FORMAT = "dist_hooks-mirror"
#: completion markers: fetched after everything else, then checked unchanged (the reader's
#: ``CONSOLIDATED_MARKER``, not imported: the reader imports this module)
MARKERS = ("consolidated.json",)
#: files the tools make in a run directory that are no object (kept by the clean-up)
_LOCAL_ONLY = (LOCK_NAME,)
#: parallel GETs (each holds one object in memory; shard files are a few MiB to tens of MiB)
WORKERS = 16
#: a bar is drawn (on a terminal) only for a mirror fetching more than this
BAR_BYTES = 8 << 20
_PART_KEY = re.compile(r"^(?P<log>.+\.csv)/part-\d{16}\.csv$")


def is_url(run: str | os.PathLike | None) -> bool:
    """Whether ``run`` names an object-store run (``s3://...``) rather than a local path."""
    return _is_url(run) and str(run)[:5].lower() == "s3://"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, or ``$XDG_CACHE_HOME/dist_hooks`` (``~/.cache/dist_hooks``)."""
    if cache is not None:
        return Path(cache).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dist_hooks"


def open_object_storage(url: str, storage_options: dict[str, Any] | None = None):
    """The run's :class:`ObjectRunStorage`; its one listing checks the credentials, the bucket
    and the endpoint (a clear :class:`RunError` here, in seconds)."""

    return ObjectRunStorage(url, storage_options)


def mirror_dir(storage: Any, cache: str | os.PathLike | None = None) -> Path:
    """The mirror of ``storage``'s run: ``CACHE/<bucket>-<prefix>-<hash>``, the hash of its
    endpoint and URL (the same URL at two endpoints is two runs); readable names, no secret."""
    url = storage.root_url
    digest = hashlib.sha256(f"{storage.endpoint}\n{url}".encode()).hexdigest()[:16]
    parts = urlsplit(url)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parts.netloc}-{parts.path.strip('/')}")[:80]
    return cache_root(cache) / f"{name.strip('._-') or 'run'}-{digest}"


@dataclass
class Mirror:
    """A mirrored run: where it is (``path``), what this mirror fetched and removed, every
    object's ``(size, ETag)`` (``objects``), and ``notes``: per CSV log (relative path) what its
    parts lack (a gap, a foreign header), or nothing for logs that assembled whole."""

    url: str
    path: Path
    storage: Any
    fetched: int = 0
    fetched_bytes: int = 0
    removed: int = 0
    objects: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def store_bytes(self) -> dict[str, Any]:
        """Bytes on the store per top-level entry, and their total (``info``'s disk use)."""
        parts: dict[str, int] = {}
        for key, (size, _) in self.objects.items():
            top = key.split("/", 1)[0]
            parts[top] = parts.get(top, 0) + size
        return {"total": sum(parts.values()), "parts": dict(sorted(parts.items()))}

    def fix(self, text: str) -> str:
        """``text`` with the mirror's path (as given, and resolved) replaced by the URL."""
        for base in sorted({str(self.path.resolve()), str(self.path)}, key=len, reverse=True):
            text = text.replace(base, self.url)
        return text


@contextlib.contextmanager
def mirror_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` for the mirror at ``path`` (blocking: a second mirror of the same run
    waits, then finds it current). Outside the mirror, so that replacing the mirror's contents
    (a consolidate publishing into it) keeps the lock."""
    locks = path.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mirror_run(url: str, cache: str | os.PathLike | None = None,
               storage_options: dict[str, Any] | None = None, *, progress: bool | None = None,
               storage: Any = None) -> Mirror:
    """Mirror the run (or consolidated output) at ``url`` into :func:`mirror_dir`; see the
    module doc. ``progress``: a bar on stderr (``None``: on a terminal, for a long mirror).
    :class:`RunError` when the store cannot be used or ``url`` holds no dist_hooks run."""
    storage = storage or open_object_storage(url, storage_options)
    path = mirror_dir(storage, cache)
    with mirror_lock(path):
        return sync(storage, path, progress=progress)


class _Parts(LocalRunStorage):
    """The mirrored parts of the logs, read by :class:`LogParts`; messages name the store."""

    def __init__(self, root: Path, url: str) -> None:
        super().__init__(root)
        self._url = url

    def url(self, rel: str | os.PathLike = "", place: str | None = None) -> str:
        self.path(rel, place)
        return f"{self._url}/{os.fspath(rel)}" if os.fspath(rel) else self._url


def _write(dest: Path, data: bytes) -> None:
    """``dest`` replaced by ``data`` at once (a cache: no fsync; a torn file after a power cut
    has another size than its index entry, so the next mirror fetches it again)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.mirror-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_index(path: Path, url: str) -> dict[str, Any]:
    try:
        doc = json.loads((path / INDEX_DIR / _INDEX).read_bytes())
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        return {"objects": {}, "logs": {}}
    if doc.get("url") != url:
        raise RunError(f"{path}: a mirror of {doc.get('url')}, not of {url}; remove it or use "
                       "another --cache")
    return {"objects": {k: tuple(v) for k, v in doc.get("objects", {}).items()},
            "logs": dict(doc.get("logs", {}))}


def mirrored_url(path: str | os.PathLike | None) -> str | None:
    """The URL whose mirror ``path`` is (a path inside one: that URL and the rest), or ``None``
    for a path in no mirror: how tools name a place that lies in the cache."""
    if path is None:
        return None
    p = Path(path)
    for base in (p, *p.parents):
        try:
            doc = json.loads((base / INDEX_DIR / _INDEX).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("format") == INDEX_FORMAT and doc.get("url"):
            rel = p.relative_to(base).as_posix()
            return doc["url"] if rel == "." else f"{doc['url']}/{rel}"
    return None


def save_index(path: Path, url: str, objects: dict, logs: dict) -> None:
    """The mirror's index (atomic; sorted, so an unchanged mirror rewrites the same bytes)."""
    doc = {"format": INDEX_FORMAT, "version": 1, "url": url,
           "objects": {k: list(v) for k, v in sorted(objects.items())},
           "logs": dict(sorted(logs.items()))}
    _write(path / INDEX_DIR / _INDEX, json.dumps(doc, indent=0).encode())


def remember(path: Path, url: str, objects: dict[str, tuple[int, str | None]],
             under: str) -> None:
    """Tell the index of the mirror at ``path`` that the objects under the folder ``under`` are
    now ``objects`` (just uploaded from the files there): the next mirror fetches none of them."""
    index = _load_index(path, url)
    kept = {k: v for k, v in index["objects"].items() if not k.startswith(f"{under}/")}
    save_index(path, url, {**kept, **objects}, index["logs"])


def usable_key(key: str) -> bool:
    """A key that is a safe relative path here, and no lease or mirror file."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or "\0" in key \
            or any(p in ("", ".", "..") for p in parts) or parts[0] == INDEX_DIR:
        return False
    name = parts[-1]
    return not (name.startswith(".") and name.endswith(".lock"))


def sync(storage: Any, path: Path, *, progress: bool | None = None,
         require_run: bool = True) -> Mirror:
    """One mirror of ``storage`` into ``path`` (the caller holds :func:`mirror_lock`).
    ``require_run=False``: mirror whatever is there (an output's prefix, maybe empty)."""
    url = storage.root_url
    if path.exists() and any(path.iterdir()) and not (path / INDEX_DIR).is_dir():
        raise RunError(f"{path}: exists and is not a dist_hooks mirror; refusing to replace "
                       "its contents (choose another --cache)")
    index = _load_index(path, url)
    old, logs = index["objects"], index["logs"]
    m = Mirror(url, path, storage)
    manifest = storage.read(MANIFEST)  # first: what follows is at least as new as it
    listing = {k: v for k, v in storage.list_tree("").items() if usable_key(k)}
    listing.pop(MANIFEST, None)
    if require_run and manifest is None and MARKERS[0] not in listing:
        raise RunError(f"{url}: not a dist_hooks run (no {MANIFEST} there) nor a consolidated "
                       f"output (no {MARKERS[0]})")
    (path / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    parts_root = path / INDEX_DIR / _PARTS
    log_of = {k: mt.group("log") for k in listing if (mt := _PART_KEY.match(k))}
    for rel in set(log_of.values()):
        listing.pop(rel, None)  # an object named like a log folder: the parts are the log

    def local(key: str) -> Path:
        return (parts_root if key in log_of or _PART_KEY.match(key) else path) / key

    todo = [k for k, (size, etag) in listing.items()
            if old.get(k) != (size, etag) or etag is None or not local(k).is_file()
            or local(k).stat().st_size != size]
    gone = [k for k in old if k not in listing and k != MANIFEST]
    for key in gone:
        local(key).unlink(missing_ok=True)
    m.removed = len(gone)
    objects = {k: v for k, v in old.items() if k in listing}
    if manifest is not None:
        if not (path / MANIFEST).is_file() or (path / MANIFEST).read_bytes() != manifest:
            _write(path / MANIFEST, manifest)
            m.fetched, m.fetched_bytes = 1, len(manifest)
        objects[MANIFEST] = (len(manifest), None)
    markers = [k for k in todo if k.rsplit("/", 1)[-1] in MARKERS]
    total = sum(listing[k][0] for k in todo)
    bar = Progress(total, f"mirror {url}",
                   enabled=progress if progress is not None else (None if total > BAR_BYTES
                                                                  else False))

    def fetch(key: str) -> tuple[str, int | None]:
        data = storage.read(key)
        if data is not None:
            _write(local(key), data)
            bar.update(len(data))
        return key, None if data is None else len(data)

    def record(key: str, n: int | None) -> None:
        if n is None:  # deleted since the listing (a resume cut a log back): gone
            local(key).unlink(missing_ok=True)
            objects.pop(key, None)
            return
        size, etag = listing[key]
        objects[key] = (size, etag) if n == size else (n, None)  # changed since: next time
        m.fetched += 1
        m.fetched_bytes += n

    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="dist-hooks-mirror") as pool:
            for key, n in pool.map(fetch, [k for k in todo if k not in markers]):
                record(key, n)
        for key, n in map(fetch, markers):  # last: after every file they vouch for
            record(key, n)
    finally:
        bar.close()
    _check_markers(storage, listing, path, objects, todo)
    logs = _assemble_logs(_Parts(parts_root, url), path, logs, log_of, todo + gone)
    keep = {path / MANIFEST} | {local(k) for k in objects} | {path / rel for rel in logs}
    _clean(path, keep)
    save_index(path, url, objects, logs)
    m.objects = objects
    m.notes = {rel: v["note"] for rel, v in logs.items() if v.get("note")}
    return m


def _check_markers(storage: Any, listing: dict, path: Path, objects: dict,
                   fetched: list[str]) -> None:
    """Every completion marker of a folder something was fetched from, listed again after the
    fetches: one that changed or vanished since the first listing is dropped (its output then
    reads as incomplete; the next mirror looks again)."""
    for key in [k for k in objects if k.rsplit("/", 1)[-1] in MARKERS]:
        folder = key.rsplit("/", 1)[0] if "/" in key else ""
        if not any(not folder or k.startswith(f"{folder}/") for k in fetched):
            continue  # nothing of its output fetched now: checked when it was
        if storage.list_tree(folder).get(key) != listing[key]:
            (path / key).unlink(missing_ok=True)
            objects.pop(key)


def _assemble_logs(parts: "_Parts", path: Path, logs: dict, log_of: dict[str, str],
                   changed: list[str]) -> dict:
    """Each log whose parts changed (or whose file is not as assembled) assembled again into
    its file; logs without parts any more removed. Returns the index's ``logs``."""
    touched = {log_of.get(k) or k.rsplit("/", 1)[0] for k in changed if _PART_KEY.match(k)}
    out = {}
    for rel in sorted(set(log_of.values())):
        f, was = path / rel, logs.get(rel, {})
        if rel in touched or not f.is_file() or f.stat().st_size != was.get("bytes"):
            data, note = _assemble(parts, rel)
            _write(f, data)
            was = {"bytes": len(data), "note": note}
        out[rel] = was
    return out


def _assemble(parts: _Parts, rel: str) -> tuple[bytes, str | None]:
    """A log from its mirrored parts (:meth:`LogParts.read`): the logical log, or the readable
    part of it, and what its parts lack (``None`` when nothing)."""
    lp = LogParts(parts, rel)
    offsets = lp.offsets()
    try:
        return lp.read(), _gap_note(parts, lp, offsets)
    except DamageError as exc:  # a part's header differs: the parts before it are the log
        lo, hi = 0, len(offsets) - 1
        while lo < hi:  # the first part that breaks: read(limit) raises iff it reaches it
            mid = (lo + hi) // 2
            try:
                lp.read(offsets[mid] + 1)
                lo = mid + 1
            except DamageError:
                hi = mid
        return lp.read(offsets[lo]), str(exc)


def _gap_note(parts: _Parts, lp: LogParts, offsets: list[int]) -> str | None:
    """Which parts the reading stopped before (a gap: nothing after it is read), if any."""
    pos, header = 0, 0
    for i, off in enumerate(offsets):
        if off != pos:
            return (f"{parts.url(lp.rel)}: its parts end at a gap: the log stops at byte {pos}, "
                    f"the next part there is {part_name(off)}; {len(offsets) - i} part(s) not "
                    "read (a part is missing)")
        size = parts.path(f"{lp.rel}/{part_name(off)}").stat().st_size
        if off == 0:
            with open(parts.path(f"{lp.rel}/{part_name(0)}"), "rb") as fh:
                header = len(fh.readline())
            pos = size
        else:
            pos += size - header
    return None


def _clean(path: Path, keep: set[Path]) -> None:
    """Remove what is in the mirror but neither an object, an assembled log nor the mirror's
    own index (what a killed mirror or tool left, objects gone), and folders left empty: a
    mirror holds the store's run and nothing else."""
    index_dir = path / INDEX_DIR
    for base, _, names in os.walk(path, topdown=False):
        b = Path(base)
        for n in names:
            f = b / n
            if f not in keep and b != index_dir and not (b == path and n in _LOCAL_ONLY):
                f.unlink()
        if b not in (path, index_dir, index_dir / _PARTS):
            with contextlib.suppress(OSError):
                b.rmdir()  # only when empty


def rename(exc: BaseException, m: Mirror | None) -> BaseException:
    """``exc``'s message (and a :class:`DamageError`'s places) with the mirror's path replaced
    by the run's URL: people are told where the run is, not where its cache is."""
    if m is not None:
        exc.args = tuple(m.fix(a) if isinstance(a, str) else a for a in exc.args)
        if isinstance(exc, DamageError):
            exc.places = [m.fix(p) for p in exc.places]
    return exc


@contextlib.contextmanager
def naming_url(m: Mirror | None) -> Iterator[None]:
    """Errors raised inside name the run's URL instead of its mirror (:func:`rename`)."""
    try:
        yield
    except DistHooksError as exc:
        raise rename(exc, m)


def remove_tree(path: Path) -> None:
    """A mirror's contents (its index too), for a fresh start."""
    shutil.rmtree(path, ignore_errors=True)
