"""``ObjectZarrStore``: a run's Zarr hierarchy in an S3-compatible object store, as the record-group
writers and readers use it (:class:`~.record_store.RecordStore`).

Why a subclass of zarr's ``ObjectStore`` (obstore): zarr reads and writes the groups' metadata and
any partial shard through it as through any store, and the group writer's whole shard files and
the readers' whole-file reads go through the few methods added here, byte for byte what
:class:`~.atomic_store.AtomicLocalStore` writes to a directory. What an object store gives in
place of the local store's machinery:

* **atomic replace**: a PUT is atomic per object (a reader sees the old object or the new one,
  never a mix; a large PUT is a multipart upload, which appears whole at its completion), so no
  temporary file and no rename. An interrupted single PUT stores nothing; an interrupted
  multipart upload leaves only invisible parts (a bucket lifecycle rule removes them), so there
  are no temporaries to remove;
* **durability**: a PUT is durable when it returns, so :meth:`ObjectZarrStore.sync` has
  nothing to do;
* **consistent whole-file reads beside a live writer**: one GET returns one version of an
  object; a reader that kept a copy asks for the object only if its ETag changed
  (``If-None-Match``), so re-reading an unchanged shard costs a round trip, not a transfer.

Every file written, through zarr (``set``) or :meth:`~ObjectZarrStore.put_bytes`, is remembered
as ``(bytes, crc32)`` for :meth:`~ObjectZarrStore.take_checksums`, as the local store does.

Failures of the store (bad credentials, an unreachable endpoint, a missing bucket) are passed to
``errors`` (``ObjectRunStorage``'s translation into a :class:`~dist_hooks.errors.RunError` that
says what to check); a missing key is ``None`` or nothing deleted, never an error.
"""
from __future__ import annotations

import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Self

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import ObjectStore

from .object_lease import request_failed
from .record_store import Listing, Version

__all__ = ["ObjectZarrStore"]

#: translates a failed request (the exception, what was being done) into the error to raise
ErrorTranslator = Callable[[BaseException, str], BaseException]


def _bytes_view(data: Any) -> memoryview:
    """``data`` as the flat uint8 buffer obstore's PUT accepts (no copy)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class ObjectZarrStore(ObjectStore):
    """zarr's ``ObjectStore`` over an obstore store (``ObjectRunStorage._s3``), plus what
    :class:`~.record_store.RecordStore` names (see the module docstring).

    Parameters
    ----------
    store : the obstore store (an ``S3Store`` on the hierarchy's prefix).
    read_only : open read-only.
    errors : translation of a failed request into the error raised (``None``: obstore's own).
    url : where the hierarchy is (``s3://bucket/prefix``), for messages (``str(store)``).
    """

    def __init__(self, store: Any, *, read_only: bool = False,
                 errors: ErrorTranslator | None = None, url: str | None = None) -> None:
        super().__init__(store, read_only=read_only)
        self.url = url or f"object_store://{store}"
        self._errors = errors
        self._lock = threading.Lock()
        self._checksums: dict[str, tuple[int, int]] = {}

    def with_read_only(self, read_only: bool = False) -> Self:
        # docstring inherited; keep the translation and the name
        return type(self)(self.store, read_only=read_only, errors=self._errors, url=self.url)

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        for k in ("_lock", "_errors", "_checksums"):  # not picklable / this process's own
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._errors, self._lock, self._checksums = None, threading.Lock(), {}

    def _error(self, exc: BaseException, doing: str) -> BaseException:
        return exc if self._errors is None else self._errors(exc, doing)

    def _note(self, key: str, view: memoryview) -> int:
        n = view.nbytes
        crc = zlib.crc32(view)
        with self._lock:
            self._checksums[key] = (n, crc)
        return n

    # ------------------------------------------------------------- zarr's Store
    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        # docstring inherited
        try:
            return await super().get(key, prototype, byte_range)
        except request_failed() as exc:
            raise self._error(exc, f"reading {key}") from exc

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        # docstring inherited
        try:
            return await super().get_partial_values(prototype, key_ranges)
        except FileNotFoundError:
            raise
        except request_failed() as exc:
            raise self._error(exc, "reading parts of objects") from exc

    async def exists(self, key: str) -> bool:
        # docstring inherited
        try:
            return await super().exists(key)
        except request_failed() as exc:
            raise self._error(exc, f"looking up {key}") from exc

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited; one PUT, remembered for take_checksums
        import obstore as obs

        self._check_writable()
        view = _bytes_view(value.as_buffer_like())
        try:
            await obs.put_async(self.store, key, view)
        except request_failed() as exc:
            raise self._error(exc, f"writing {key}") from exc
        self._note(key, view)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        self._check_writable()
        view = _bytes_view(value.as_buffer_like())
        try:
            await obs.put_async(self.store, key, view, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return
        except request_failed() as exc:
            raise self._error(exc, f"writing {key}") from exc
        self._note(key, view)

    async def delete(self, key: str) -> None:
        # docstring inherited
        try:
            await super().delete(key)
        except request_failed() as exc:
            raise self._error(exc, f"deleting {key}") from exc
        self._forget(key)

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        # docstring inherited
        try:
            async for key in super().list_dir(prefix):
                yield key
        except request_failed() as exc:
            raise self._error(exc, f"listing {prefix or '/'}") from exc

    # --------------------------------------------------------------- RecordStore
    def read_bytes(self, key: str) -> bytes | None:
        """The object ``key``'s bytes (one GET), or ``None`` when there is none."""
        got = self.read_version(key, None)
        return None if got is None else got[1]

    def read_version(self, key: str,
                     known: Version | None) -> tuple[Version, bytes | None] | None:
        """One GET of ``key`` (one version of it); with ``known`` (an ETag), ``If-None-Match``
        it, so an unchanged object is not transferred (``data`` is ``None``)."""
        import obstore as obs
        from obstore.exceptions import NotModifiedError

        try:
            if isinstance(known, str):
                r = obs.get(self.store, key, options={"if_none_match": known})
            else:
                r = obs.get(self.store, key)
            data = bytes(r.bytes())
        except FileNotFoundError:
            return None
        except NotModifiedError:
            return known, None
        except request_failed() as exc:
            raise self._error(exc, f"reading {key}") from exc
        return r.meta.get("e_tag"), data

    def list_folder(self, prefix: str) -> Listing:
        """Sub-folders (common prefixes) and objects directly under ``prefix``: one listing
        with a delimiter (obstore follows its continuation tokens)."""
        import obstore as obs

        base = prefix.strip("/")
        try:
            res = obs.list_with_delimiter(self.store, base or None)
        except request_failed() as exc:
            raise self._error(exc, f"listing {base or '/'}") from exc
        cut = len(base) + 1 if base else 0

        def names(paths: Iterable[str]) -> list[str]:
            rel = (p[cut:].strip("/") for p in paths)
            return sorted(n for n in rel if n and "/" not in n)

        return Listing(names(res["common_prefixes"]), names(o["path"] for o in res["objects"]))

    def put_bytes(self, key: str, data: bytes | memoryview, *, exclusive: bool = False) -> int:
        """One PUT of the whole object ``key``: atomic, and durable when it returns
        (``exclusive``: create-only, ``FileExistsError`` when it exists). Returns its size."""
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        self._check_writable()
        view = _bytes_view(data)
        try:
            if exclusive:
                obs.put(self.store, key, view, mode="create", use_multipart=False)
            else:
                obs.put(self.store, key, view)
        except (AlreadyExistsError, PreconditionError):
            raise FileExistsError(f"{self.url}/{key} exists") from None
        except request_failed() as exc:
            raise self._error(exc, f"writing {key}") from exc
        return self._note(key, view)

    def delete_sync(self, key: str) -> None:
        """Delete the object ``key`` (a missing one is no error)."""
        import obstore as obs

        self._check_writable()
        try:
            obs.delete(self.store, key)
        except FileNotFoundError:
            pass
        except request_failed() as exc:
            raise self._error(exc, f"deleting {key}") from exc
        self._forget(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._checksums.pop(key, None)

    def take_checksums(self, prefix: str) -> dict[str, tuple[int, int]]:
        """``(bytes, crc32)`` of the objects under ``prefix`` written since the last call (the
        latest version of each); they are forgotten here."""
        with self._lock:
            keys = [k for k in self._checksums if k.startswith(prefix)]
            return {k: self._checksums.pop(k) for k in keys}

    def remove_temporaries(self, prefix: str) -> int:
        """Nothing to remove: a PUT leaves no temporary object (module docstring)."""
        return 0

    def sync(self) -> None:
        """Nothing to do: every PUT was durable when it returned."""
