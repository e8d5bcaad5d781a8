"""Shard files of Zarr v3 sharded arrays: checked and decoded, and written, without zarr's
per-chunk machinery. One format, read and written here (as zarr's ``codecs/sharding.py``).

Why read them here, three reasons measured or seen:

* **Consolidate speed.** Moving every atom row of a trajectory through zarr (decode, reorder,
  re-encode) ran at ~50 MB/s on 2 cores, a twentieth of a file copy. A shard file wholly inside
  a rank's committed rows can instead be copied as a file (the consolidated format places each
  rank's segment on a shard boundary, see ``tools/atom_segments.py``); what zarr did on the way
  is done here: the index is checked (crc32c, every chunk inside the file), and the chunks are
  decoded (numcodecs releases the GIL) when the rows must be checked against a committed crc32.
* **Small chunks.** Record arrays have 1024-row chunks of a few KB; zarr's cost per chunk
  (~0.1 ms) dominated reading them. Decoding them here costs the codec and little else.
* **Consistency with a live writer.** zarr reads a shard's index and its chunks with separate
  opens; a writer replacing the file in between made it decode one version's chunk at the
  other's offsets (seen: the coordinator's merge failing with a zstd error). Here a shard file
  is read whole through one descriptor.

Only what :class:`~dist_hooks.store.group_writer.GroupWriter` writes is understood: a regular grid,
one ``sharding_indexed`` codec whose inner chunks span the trailing dimensions, inner codecs
``bytes`` plus at most one of zstd/blosc/gzip, and a ``bytes`` + ``crc32c`` index.
:meth:`ShardLayout.parse` returns ``None`` for anything else, and callers fall back to zarr.

Why write them here (:class:`RawArrayWriter`): ``dist-hooks consolidate`` writes every output
array once, front to back. Through GroupWriter, zarr's per-array and per-chunk machinery
(metadata objects, its event loop, the sharding codec's partial-shard logic) was about a third
of consolidate's Python time on the benchmark (measured on 2 cores), for arrays of a few MB.
Here a shard is staged, its chunks compressed (numcodecs' zstd, which releases the GIL:
measured, two threads compress twice the data in the same time), its index built and the file
written in one piece; ``zarr.json`` (:meth:`~.array_layout.ArraySpec.document`) last, with the
final shape. ``tests/store/test_raw_group_writer.py`` compares the files with zarr's for the same appends:
the metadata and every shard file are byte-identical, except that zarr leaves out a chunk whose
bytes are all zero (the fill value), where this writer keeps it. Chunks past the last row are
left out (empty in the index) and a partial last chunk is padded with the fill value, as zarr
does. The live writer's whole shards are encoded here too (:func:`encode_rows`, called by
:class:`~.staged_array.ShardFiles`), leaving out the zero chunks as zarr does, for the same
reason: zarr's machinery held the GIL that the simulation thread needs (issue 14).
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from ..errors import ShardDamage
from .array_layout import ZSTD_LEVEL, ArrayLayout, ArraySpec, parse_array
from .atomic_store import AtomicLocalStore, read_file_version
from .record_store import StoreFolder

__all__ = ["EMPTY", "ArrayMeta", "RawArrayReader", "RawArrayWriter", "ShardDamage",
           "ShardLayout", "encode_rows", "encode_shard", "key_row_block", "read_shard_rows",
           "shard_key"]

#: an index entry (offset and size) of a chunk the shard does not hold
EMPTY = np.uint64(2**64 - 1)


def _decoder(spec: dict) -> Any | None:
    """A numcodecs decoder for one inner bytes-to-bytes codec, or None when not understood."""
    name = spec.get("name")
    if name == "zstd":
        return numcodecs.Zstd()
    if name == "blosc":
        return numcodecs.Blosc()
    if name == "gzip":
        return numcodecs.GZip()
    return None


def shard_key(i: int, trailing_dims: int, separator: str = ".") -> str:
    """File name of shard ``i`` along the row axis of an array whose trailing dimensions are
    whole (zarr's default key encoding)."""
    return separator.join(["c", str(int(i)), *(["0"] * trailing_dims)])


_KEY = re.compile(r"^c\.(\d+)(?:\.\d+)*$")


def key_row_block(name: str) -> int | None:
    """The row-block index (shard, or chunk when unsharded) in a file name that zarr's default
    key encoding gives with the "." separator (``c.<i>.<j>...``); ``None`` for other names."""
    m = _KEY.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ShardLayout:
    """What is needed to find, check and decode one array's shard files."""

    shard_rows: int
    chunk_rows: int
    trailing: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    decoders: tuple[Any, ...]
    index_at_end: bool
    separator: str
    #: ``zarr.json`` without shape and attributes: equal for arrays whose files are interchangeable
    signature: str

    #: the array's whole parsed layout (its shape as of parsing)
    array: ArrayLayout | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, meta: dict) -> "ShardLayout | None":
        """From an array's ``zarr.json`` (as a dict); ``None`` when not a layout handled here."""
        try:
            return cls.of_layout(parse_array(meta))
        except ValueError:
            return None

    @classmethod
    def of_layout(cls, lay: ArrayLayout) -> "ShardLayout | None":
        """The shard-file view of a parsed layout; ``None`` when not a layout handled here."""
        trailing = lay.trailing
        if lay.key_encoding != "default" or not lay.sharded:
            return None
        if lay.file_shape[1:] != trailing or lay.chunk_shape[1:] != trailing or \
                lay.file_rows % lay.chunk_rows:
            return None
        if [c.get("name") for c in lay.index_codecs] != ["bytes", "crc32c"] or \
                lay.index_location not in ("end", "start"):
            return None
        if not lay.codecs or lay.codecs[0].get("name") != "bytes":
            return None
        decoders = tuple(_decoder(c) for c in lay.codecs[1:])
        if any(d is None for d in decoders) or len(decoders) > 1:
            return None
        return cls(shard_rows=lay.file_rows, chunk_rows=lay.chunk_rows, trailing=trailing,
                   dtype=lay.dtype, fill_value=lay.fill_value, decoders=decoders,
                   index_at_end=lay.index_location == "end", separator=lay.separator,
                   signature=lay.signature, array=lay)

    @classmethod
    def of(cls, array_dir: Path | StoreFolder) -> tuple["ShardLayout | None", dict]:
        """Parse the ``zarr.json`` of the array in ``array_dir`` (a local directory, or a folder
        of a record store); returns ``(layout or None, metadata dict)``; ``FileNotFoundError``
        when there is none."""
        if isinstance(array_dir, StoreFolder):
            raw = array_dir.store.read_bytes(array_dir.file("zarr.json"))
            if raw is None:
                raise FileNotFoundError(f"{array_dir}/zarr.json")
        else:
            raw = (Path(array_dir) / "zarr.json").read_bytes()
        meta = json.loads(raw)
        return cls.parse(meta), meta

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.trailing, dtype=np.int64)) * self.dtype.itemsize

    def shard_key(self, i: int) -> str:
        """File name (relative to the array) of shard ``i`` along the row axis."""
        return shard_key(i, len(self.trailing), self.separator)

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def read_index(self, path: Path, where: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The checked index of one shard file, reading only the index (``None``: no file)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            n = os.fstat(fd).st_size
            size = self.index_bytes
            raw = os.pread(fd, size, max(n - size, 0) if self.index_at_end else 0)
        finally:
            os.close(fd)
        return self.index(raw, where, file_size=n)

    def index(self, data: bytes, where: str,
              file_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(offset, nbytes)`` per inner chunk after checking the index's crc32c and that every
        chunk lies inside the file; empty chunks have offset ``-1``. ``data``: the whole file,
        or only its index bytes when ``file_size`` is given."""
        n = self.chunks_per_shard
        size = self.index_bytes
        total = len(data) if file_size is None else int(file_size)
        if total < size or len(data) < size:
            raise ShardDamage(f"{where}: {total} bytes, shorter than its {size}-byte shard "
                              f"index (truncated?)")
        raw = data[len(data) - size:] if self.index_at_end else data[:size]
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(bytes(body)) != crc:
            raise ShardDamage(f"{where}: shard index checksum mismatch (file truncated or "
                              f"overwritten)")
        pairs = np.frombuffer(body, dtype="<u8").reshape(n, 2)
        empty = (pairs[:, 0] == EMPTY) & (pairs[:, 1] == EMPTY)
        lo, hi = (0, total - size) if self.index_at_end else (size, total)
        off = pairs[:, 0].astype(np.int64)
        nb = pairs[:, 1].astype(np.int64)
        bad = np.flatnonzero(~empty & ((pairs[:, 0] < lo) | (pairs[:, 0] + pairs[:, 1] > hi)))
        if len(bad):
            j = int(bad[0])
            raise ShardDamage(f"{where}: chunk {j} at bytes [{off[j]}, {off[j] + nb[j]}) lies "
                              f"outside the file's {total} bytes (truncated?)")
        off[empty] = -1
        nb[empty] = 0
        return off, nb

    def empty_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The index of a shard that holds no chunk (a file zarr did not write)."""
        n = self.chunks_per_shard
        return np.full(n, -1, np.int64), np.zeros(n, np.int64)

    def decode_chunk(self, data: bytes, offset: int, nbytes: int, where: str) -> np.ndarray:
        """One inner chunk, ``(chunk_rows, *trailing)``; fill value when ``offset < 0``."""
        shape = (self.chunk_rows, *self.trailing)
        if offset < 0:
            return np.full(shape, self.fill_value, dtype=self.dtype)
        buf: Any = memoryview(data)[offset: offset + nbytes]
        try:
            for dec in reversed(self.decoders):
                buf = dec.decode(buf)
            out = np.frombuffer(buf, dtype=self.dtype)
            return out.reshape(shape)
        except Exception as exc:  # noqa: BLE001 - any decode failure is damage here
            raise ShardDamage(f"{where}: chunk at bytes [{offset}, {offset + nbytes}) does not "
                              f"decode ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class ArrayMeta:
    """What readers use of a ``zarr.Array`` (shape, dtype, chunking), taken from a sharded
    array's ``zarr.json`` without building zarr's metadata objects."""

    shape: tuple[int, ...]
    dtype: np.dtype          #: native byte order, as the rows are returned
    chunks: tuple[int, ...]  #: inner chunk shape
    shards: tuple[int, ...]  #: shard (file) shape

    @classmethod
    def of(cls, meta: dict, lay: ShardLayout) -> "ArrayMeta":
        return cls(shape=tuple(int(x) for x in meta["shape"]),
                   dtype=lay.dtype.newbyteorder("="), chunks=(lay.chunk_rows, *lay.trailing),
                   shards=(lay.shard_rows, *lay.trailing))

    @property
    def ndim(self) -> int:
        return len(self.shape)


def read_shard_rows(data: bytes, lay: ShardLayout, rows: int, where: str, crc: int,
                    keep: bool) -> tuple[int, np.ndarray | None]:
    """Check and decode the first ``rows`` rows of one shard file's bytes (``b""``: a file
    zarr did not write, all fill value).

    Returns the running crc32 with those rows folded in (in row order) and, when ``keep``, the
    rows themselves (native byte order). Chunks are decoded one at a time, so memory stays at one
    chunk when the rows are not kept.
    """
    off, nb = lay.index(data, where) if data else lay.empty_index()
    parts = []
    for j in range(-(-rows // lay.chunk_rows)):
        chunk = lay.decode_chunk(data, int(off[j]), int(nb[j]), where)
        take = min(lay.chunk_rows, rows - j * lay.chunk_rows)
        part = chunk[:take]
        if not lay.dtype.isnative:
            part = part.astype(lay.dtype.newbyteorder("="))
        if part.size:
            crc = zlib.crc32(np.ascontiguousarray(part), crc)
        if keep:
            parts.append(part)
    if not keep:
        return crc, None
    got = (np.concatenate(parts) if parts
           else np.empty((0, *lay.trailing), dtype=lay.dtype.newbyteorder("=")))
    return crc, got


class RawArrayReader:
    """Rows of one sharded array read straight from its shard files (see module docstring).

    Used by every bulk reader of record groups (``GroupReader``, consolidate, verify). The last
    shard file read is kept, so sequential reads of neighbouring ranges check each file once.
    ``array_dir``: a local directory, or a folder of a record store (an object store's).
    """

    def __init__(self, array_dir: Path | StoreFolder, lay: ShardLayout, place: str) -> None:
        self.dir = array_dir if isinstance(array_dir, StoreFolder) else Path(array_dir)
        self.lay = lay
        self.place = place
        self._cached: tuple[tuple, bytes, np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(cls, array_dir: Path | StoreFolder, place: str) -> "RawArrayReader | None":
        """A reader of the array in ``array_dir``, or ``None`` when its metadata cannot be read
        or its layout is not one handled here (the caller then reads through zarr, which
        reports any damage)."""
        try:
            lay, _ = ShardLayout.of(array_dir)
        except (OSError, ValueError):
            return None
        return cls(array_dir, lay, place) if lay is not None else None

    def _shard(self, i: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        """One shard file, read whole as one version (a local file through one descriptor: a
        writer replaces files by rename; an object in one GET): zarr reads the index and the
        chunks with separate requests, and a replacement in between mixed two versions. The
        file kept from the previous call is reused while it is still the same version (a local
        file's inode, size and mtime; an object's ETag, asked with ``If-None-Match``)."""
        key = self.lay.shard_key(i)
        cached = self._cached
        known = cached[0][1] if cached is not None and cached[0][0] == i else None
        if isinstance(self.dir, StoreFolder):
            got = self.dir.store.read_version(self.dir.file(key), known)
        else:
            got = read_file_version(self.dir / key, known)
        if got is None:
            # zarr leaves out shards that hold only the fill value: read as such (a lost file
            # then shows as a crc32 mismatch against the committed checksum)
            return b"", *self.lay.empty_index()
        version, data = got
        if data is None:  # unchanged since the previous call
            assert cached is not None
            return cached[1:]
        off, nb = self.lay.index(data, f"{self.place}/{key}")
        self._cached = ((i, version), data, off, nb)
        return data, off, nb

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` (native byte order); raises :class:`ShardDamage` naming the file."""
        lay, C = self.lay, self.lay.chunk_rows
        parts = []
        shard = None
        for c in range(a // C, -(-b // C)):
            i, j = divmod(c, lay.chunks_per_shard)
            if shard is None or shard[0] != i:  # each shard file opened once per call
                shard = (i, *self._shard(i))
            _, data, off, nb = shard
            chunk = lay.decode_chunk(data, int(off[j]), int(nb[j]),
                                     f"{self.place}/{lay.shard_key(i)}")
            parts.append(chunk[max(a - c * C, 0): min(b - c * C, C)])
        # a fresh, writable array (as zarr returns), never a view of a decoded buffer
        out = np.concatenate(parts) if len(parts) > 1 else (
            parts[0].copy() if parts else np.empty((0, *lay.trailing), lay.dtype))
        return out.astype(lay.dtype.newbyteorder("="), copy=False)


def encode_shard(chunks: list[bytes], chunks_per_shard: int) -> bytes:
    """One shard file: the encoded chunks (in order, from chunk 0; ``b""`` and the rest absent)
    followed by their index, as :meth:`ShardLayout.index` reads it (``bytes`` + ``crc32c``, at
    the end)."""
    index = np.full((int(chunks_per_shard), 2), EMPTY, dtype="<u8")
    off = 0
    for j, enc in enumerate(chunks):
        if enc:
            index[j] = (off, len(enc))
            off += len(enc)
    body = index.tobytes()
    return b"".join([*chunks, body + google_crc32c.value(body).to_bytes(4, "little")])


def _all_zero(chunk: np.ndarray) -> bool:
    """Whether every byte of a (contiguous) chunk is zero: zarr's test for a chunk equal to the
    fill value 0 / ``False`` (it compares float bit patterns, so ``-0.0`` is not zero)."""
    flat = chunk.reshape(-1).view(np.uint8)
    return not np.count_nonzero(flat)


def encode_rows(rows: np.ndarray, chunk_rows: int, chunks_per_shard: int, codec: Any, *,
                keep_zero_chunks: bool) -> bytes | None:
    """The shard file of ``rows`` (at most one shard's, from its first row; native little-endian
    dtype, fill value 0): chunks compressed with ``codec`` (numcodecs, which releases the GIL),
    a partial last chunk padded with zeros, chunks past the rows absent, as zarr writes them.

    ``keep_zero_chunks=False`` leaves out chunks whose bytes are all zero and returns ``None``
    when every chunk is: zarr's ``write_empty_chunks=False``, so that the live writer
    (:class:`~.staged_array.ShardFiles`) writes zarr's bytes; ``True`` keeps them
    (:class:`RawArrayWriter`, as it always did)."""
    n = len(rows)
    parts: list[bytes] = []
    for j in range(-(-n // chunk_rows)):
        chunk = rows[j * chunk_rows: (j + 1) * chunk_rows]
        if len(chunk) < chunk_rows:  # zarr stores whole chunks: pad with the fill
            pad = np.zeros((chunk_rows, *rows.shape[1:]), rows.dtype)
            pad[: len(chunk)] = chunk
            chunk = pad
        chunk = np.ascontiguousarray(chunk)
        parts.append(b"" if not keep_zero_chunks and _all_zero(chunk) else codec.encode(chunk))
    if not keep_zero_chunks and not any(parts):
        return None
    return encode_shard(parts, chunks_per_shard)


class RawArrayWriter:
    """One sharded array of ``store``, written front to back: :meth:`append` rows, then
    :meth:`close` (the remaining partial shard, then ``zarr.json``, with ``dimension_names``
    and ``attributes`` as :class:`~.array_layout.ArraySpec` renders them). One shard is
    staged."""

    def __init__(self, store: AtomicLocalStore, key: str, dtype: np.dtype,
                 trailing: tuple[int, ...], chunk_rows: int, chunks_per_shard: int, *,
                 dimension_names: tuple[str, ...] | None = None,
                 attributes: dict[str, Any] | None = None) -> None:
        if np.dtype(dtype).kind not in "biufc":
            raise TypeError(f"{key}: unsupported dtype {np.dtype(dtype)} (numeric or bool only)")
        if int(chunk_rows) < 1 or int(chunks_per_shard) < 1:
            raise ValueError(f"{key}: chunk_rows and chunks_per_shard must be >= 1")
        self.store = store
        self.key = key.strip("/")
        self.spec = ArraySpec(np.dtype(dtype).newbyteorder("<"), tuple(trailing), chunk_rows,
                              chunks_per_shard,  # zstd level 1, as GroupWriter's default
                              dimension_names=dimension_names, attributes=attributes or {})
        self.dtype = self.spec.dtype
        self.trailing = self.spec.trailing
        self.chunk_rows = self.spec.chunk_rows
        self.per_shard = self.spec.chunks_per_shard
        self.shard_rows = self.chunk_rows * self.per_shard
        self.rows = 0     # rows appended
        self._shard = 0   # index of the shard being staged
        self._fill = 0    # rows staged
        self._stage: np.ndarray | None = None
        self._codec = numcodecs.Zstd(level=ZSTD_LEVEL)

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.shape[1:] != self.trailing:
            raise ValueError(f"{self.key}: rows of shape {x.shape[1:]}, array has "
                             f"{self.trailing}")
        i = 0
        while i < len(x):
            if self._fill == 0 and len(x) - i >= self.shard_rows:
                self._write_shard(x[i: i + self.shard_rows])  # whole shards: no staging copy
                i += self.shard_rows
                continue
            if self._stage is None:
                self._stage = np.empty((self.shard_rows, *self.trailing), self.dtype)
            k = min(self.shard_rows - self._fill, len(x) - i)
            self._stage[self._fill: self._fill + k] = x[i: i + k]
            self._fill += k
            i += k
            if self._fill == self.shard_rows:
                self._write_shard(self._stage)
        self.rows += len(x)

    def _write_shard(self, rows: np.ndarray) -> None:
        if 0 not in self.trailing:  # no element, so no chunk (zarr's grid has none either)
            data = encode_rows(np.asarray(rows, self.dtype), self.chunk_rows, self.per_shard,
                               self._codec, keep_zero_chunks=True)
            assert data is not None
            self.store.put_bytes(f"{self.key}/{shard_key(self._shard, len(self.trailing))}", data)
        self._shard += 1
        self._fill = 0

    def close(self) -> None:
        """Write the staged rows and ``zarr.json`` (the array exists for readers from here)."""
        if self._fill:
            assert self._stage is not None
            self._write_shard(self._stage[: self._fill])
        self._stage = None
        self.store.put_bytes(f"{self.key}/zarr.json", self.spec.document_bytes(self.rows))
