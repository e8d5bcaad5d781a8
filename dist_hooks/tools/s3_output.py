"""``dist-hooks consolidate`` of an ``s3://`` run or into an ``s3://`` output: built in a local
directory, then uploaded with its completion marker last.

Why build locally: consolidate's writers (the atomic local Zarr store, pyarrow's CSV and Parquet
writers) write files; building into a directory keeps that one implementation, and with it the
guarantee that the same run gives the same bytes. The upload order makes the output on the store
appear complete only once it is:

1. a lease on the output, ``OUT/.consolidate.lock``
   (:meth:`~dist_hooks.store.object_storage.ObjectRunStorage.lock`): a second consolidate into
   the same output, from any host, is refused (exit 3), as a local one is by its ``flock``;
2. the old marker (``consolidated.json``) deleted first: from here on no reader takes what is
   there for a complete output (a mirror checks a marker again after fetching the files it
   vouches for, :mod:`.mirror`);
3. every file of the new output PUT, in parallel; then the objects of an older output that the
   new one lacks deleted;
4. the marker PUT last (refused if the lease was lost meanwhile); the lease released.

Where it is built: an output inside the run's prefix (the default, ``s3://.../RUN/consolidated``)
in the run's mirror at the same place, so that its ``source.relative`` is the one a local
consolidate writes (``..``) and the output is byte for byte a local consolidate's; an output
elsewhere in its own mirror directory (its ``source.relative`` then leads to the run's mirror in
the cache). Either way the mirror's index learns the uploaded objects: the next mirror fetches
none of them.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from ..errors import RunError
from ..reader import CONSOLIDATED_MARKER, manifest_snapshot
from .mirror import (INDEX_DIR, WORKERS, BAR_BYTES, usable_key, is_url, mirror_dir,
                     mirror_lock, mirror_run, naming_url, open_object_storage, remember,
                     remove_tree, save_index, sync)
from ..store.storage import lock_holder
from .progress import Progress
from .staging import LOCK_NAME, check_out, check_out_place

__all__ = ["consolidate_remote", "upload_output"]


def _under(out: Any, run: Any) -> str | None:
    """``out``'s place inside ``run``'s prefix (``"consolidated"``), or ``None`` when it is
    elsewhere (another bucket, endpoint or prefix)."""
    if out.bucket != run.bucket or out.endpoint != run.endpoint:
        return None
    if run.prefix and not out.prefix.startswith(f"{run.prefix}/"):
        return None
    rel = out.prefix[len(run.prefix):].strip("/")
    return rel or None


def consolidate_remote(consolidate: Callable[..., dict], run: str | os.PathLike,
                       out: str | os.PathLike | None, *,
                       cache: str | os.PathLike | None = None,
                       storage_options: dict[str, Any] | None = None,
                       progress: bool | None = None, **kwargs: Any) -> dict:
    """``consolidate`` (:func:`~dist_hooks.tools.consolidate.consolidate`, which calls this
    with itself: no import cycle) where the run or the output (or both) is on an object store;
    ``kwargs`` go to it. The default output of an ``s3://`` run is ``RUN/consolidated`` in the
    store, as on disk. Returns its summary, ``out`` the output's URL (or path)."""
    run_storage = open_object_storage(str(run), storage_options) if is_url(run) else None
    if out is None:
        out = f"{run_storage.root_url}/consolidated"
    if not is_url(out):  # an s3:// run into a local directory: the mirror is the run
        m = mirror_run(str(run), cache, progress=progress, storage=run_storage)
        with naming_url(m):
            return consolidate(m.path, out, progress=progress, **kwargs)
    out_storage = open_object_storage(str(out), storage_options)
    if run_storage is not None and out_storage.bucket == run_storage.bucket \
            and out_storage.endpoint == run_storage.endpoint:
        check_out_place(PurePosixPath("/", run_storage.prefix), PurePosixPath("/", out_storage.prefix),
                        out_storage.root_url)  # before the lease: nothing written for a bad --out
    _check_replaceable(out_storage)
    inside = _under(out_storage, run_storage) if run_storage is not None else None
    run_path = mirror_dir(run_storage, cache) if run_storage is not None else Path(run)
    local_out = run_path / inside if inside else mirror_dir(out_storage, cache)
    if inside:
        check_out(run_path, local_out)  # before the lease: nothing is written for a bad --out
    lease = out_storage.lock(lock_holder("dist-hooks consolidate", None), LOCK_NAME)
    try:
        if run_storage is None:
            return _into(consolidate, run_path, out_storage, local_out, None, lease, progress,
                         kwargs)
        with mirror_lock(run_path):  # the run's mirror stays as consolidated until uploaded
            m = sync(run_storage, run_path, progress=progress)
            with naming_url(m):
                return _into(consolidate, run_path, out_storage, local_out,
                             m if inside else None, lease, progress, kwargs)
    finally:
        lease.release()


def _check_replaceable(out: Any) -> None:
    """An output prefix is empty or holds an earlier output (its marker, or the lease of a
    consolidate that was interrupted): anything else there is not ours to replace."""
    there = [k for k in out.list_tree("") if usable_key(k)]
    if there and out.read(CONSOLIDATED_MARKER) is None and out.read(LOCK_NAME) is None:
        raise RunError(f"--out {out.root_url} holds {len(there)} other objects (e.g. "
                       f"{there[0]!r}) and no consolidated output: choose an empty place; "
                       "consolidate replaces what an output prefix holds")


def _into(consolidate: Any, run_path: Path, out_storage: Any, local_out: Path, run_mirror: Any,
          lease: Any, progress: bool | None, kwargs: dict) -> dict:
    """Consolidate ``run_path`` into ``local_out``, then upload it unless it was up to date.
    ``run_mirror``: the run's mirror when ``local_out`` lies inside it, else ``None`` (then
    ``local_out`` is the output's own mirror)."""
    if run_mirror:
        s = consolidate(run_path, local_out, progress=progress, **kwargs)
        if s["status"] == "written":
            rel = local_out.relative_to(run_path).as_posix()
            up = upload_output(local_out, out_storage, lease, progress)
            remember(run_path, run_mirror.url, {f"{rel}/{k}": v for k, v in up.items()}, rel)
        return {**s, "out": out_storage.root_url}
    with mirror_lock(local_out):
        _prepare(out_storage, local_out, run_path)
        s = consolidate(run_path, local_out, progress=progress, **kwargs)
        if s["status"] == "written":
            save_index(local_out, out_storage.root_url, {}, {})  # a mirror again, empty
            up = upload_output(local_out, out_storage, lease, progress)
            save_index(local_out, out_storage.root_url, up, {})
    return {**s, "out": out_storage.root_url}


def _prepare(out_storage: Any, local_out: Path, run_path: Path) -> None:
    """The output's mirror as the store has it when that output is of the run as it is now
    (consolidate then finds it up to date: nothing written or uploaded), else emptied: a stale
    output is not fetched only to be replaced."""
    raw = out_storage.read(CONSOLIDATED_MARKER)
    try:
        src = json.loads(raw).get("source", {}) if raw else {}
        fresh = src.get("manifest_crc32") == manifest_snapshot(run_path)[1]
    except (ValueError, AttributeError):
        fresh = False
    if fresh:
        sync(out_storage, local_out, require_run=False)
    else:
        remove_tree(local_out)


def upload_output(local: Path, storage: Any, lease: Any = None,
                  progress: bool | None = None) -> dict[str, tuple[int, str | None]]:
    """Upload the consolidated output ``local`` to ``storage``, marker last (module doc);
    returns the uploaded objects' ``(size, ETag)``."""
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and INDEX_DIR not in p.relative_to(local).parts)
    files = [f for f in files if usable_key(f)]
    if CONSOLIDATED_MARKER not in files:
        raise RuntimeError(f"{local}: no {CONSOLIDATED_MARKER}: not a finished output")
    body = [f for f in files if f != CONSOLIDATED_MARKER]
    storage.remove(CONSOLIDATED_MARKER)  # first: the output there is no longer complete
    before = storage.list_tree("")
    total = sum((local / f).stat().st_size for f in files)
    bar = Progress(total, f"upload {storage.root_url}",
                   enabled=progress if progress is not None else (None if total > BAR_BYTES
                                                                  else False))

    def put(rel: str) -> None:
        data = (local / rel).read_bytes()
        storage.replace(rel, data)
        bar.update(len(data))

    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="dist-hooks-upload") as pool:
            list(pool.map(put, body))
        for key in sorted(set(before) - set(files)):
            if usable_key(key):  # an older output's file the new one lacks (never a lease)
                storage.remove(key)
        if lease is not None:
            lease.check()  # lost meanwhile: another consolidate may be writing; no marker
        put(CONSOLIDATED_MARKER)
    finally:
        bar.close()
    listed = storage.list_tree("")
    return {k: listed[k] for k in files if k in listed}
