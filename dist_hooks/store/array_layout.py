"""The on-disk layout of one record-group array: its ``zarr.json``, built and parsed in one place.

Why one module: the layout (docs/format.md) is written by two writers, :class:`~.group_writer.
GroupWriter` (through zarr) and :class:`~.shard_files.RawArrayWriter` (the document itself),
and read back by the shard-file reader and the consolidate tools. :class:`ArraySpec` is the one
definition both writers take their layout from (zarr's arguments, or the document), and
:func:`parse_array` the one parser every reader uses.

The layout: regular grid along rows, trailing dimensions whole (an empty one still has chunks
of 1, as zarr needs), ``c.<i>.0...`` keys ("." separator: one directory per array, half the
inodes and fewer directory fsyncs than "/"), fill value 0; sharded: one ``sharding_indexed``
codec holding ``bytes`` + the compressor, index ``bytes`` + ``crc32c`` at the end. Every array
also names its dimensions and carries its units (:meth:`ArraySpec.of_field`, from the table in
:mod:`.layout`), so that xarray opens a record group as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec

from .layout import array_attributes, array_dims

__all__ = ["ArrayLayout", "ArraySpec", "CompressorLike", "DEFAULT_CHUNK_ATOMS",
           "DEFAULT_CHUNK_RECORDS", "DEFAULT_CHUNKS_PER_SHARD", "ZSTD_LEVEL", "make_compressors", "parse_array",
           "with_names", "writer_chunking"]

CompressorLike = Literal["zstd", "blosc", "none"] | BytesBytesCodec | None

#: zstd level 1: on float coordinates/forces higher levels barely shrink the data (measured
#: 1.45x vs 1.48x at level 3) for more CPU.
ZSTD_LEVEL = 1
#: GroupWriter's default rows per chunk of record- and atom-level arrays.
DEFAULT_CHUNK_RECORDS = 1024
DEFAULT_CHUNK_ATOMS = 65536
#: ... and chunks per shard file along the rows (0: no sharding).
DEFAULT_CHUNKS_PER_SHARD = 16


def make_compressors(compressor: CompressorLike) -> tuple[BytesBytesCodec, ...] | None:
    """Map the user's choice to zarr v3 compressor codecs.

    numcodecs' Blosc is refused by zarr v3, so "blosc" is zarr's own ``BloscCodec`` (zstd
    inside, byte shuffle).
    """
    if compressor is None or compressor == "none":
        return None
    if isinstance(compressor, BytesBytesCodec):
        return (compressor,)
    if compressor == "zstd":
        return (ZstdCodec(level=ZSTD_LEVEL),)
    if compressor == "blosc":
        return (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),)
    raise ValueError(
        f"compressor must be 'zstd', 'blosc', 'none' or a zarr BytesBytesCodec, got {compressor!r}"
    )


def _data_type(dtype: np.dtype) -> str:
    """zarr v3's name of a numeric or bool dtype ("float32", "int64", "bool", ...)."""
    return "bool" if dtype.kind == "b" else np.dtype(dtype).newbyteorder("=").name


@dataclass(frozen=True)
class ArraySpec:
    """How one array is laid out, as both writers create it (see module docstring).

    ``chunks_per_shard`` 0: unsharded. ``compressors``: as :func:`make_compressors` gives them
    (``None``: uncompressed). ``dimension_names`` (``None``: none, zarr writes no key) and
    ``attributes`` (the units): what :meth:`of_field` gives a field.
    """

    dtype: np.dtype
    trailing: tuple[int, ...]
    chunk_rows: int
    chunks_per_shard: int = 0
    compressors: tuple[BytesBytesCodec, ...] | None = (ZstdCodec(level=ZSTD_LEVEL),)
    dimension_names: tuple[str, ...] | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "trailing", tuple(int(d) for d in self.trailing))
        object.__setattr__(self, "chunk_rows", int(self.chunk_rows))
        object.__setattr__(self, "chunks_per_shard", int(self.chunks_per_shard or 0))
        object.__setattr__(self, "attributes", dict(self.attributes))
        if self.dimension_names is not None:
            names = tuple(str(n) for n in self.dimension_names)
            if len(names) != 1 + len(self.trailing):
                raise ValueError(f"dimension names {names} for {1 + len(self.trailing)} "
                                 f"dimensions")
            object.__setattr__(self, "dimension_names", names)

    @classmethod
    def of_field(cls, name: str, level: str, dtype: np.dtype, trailing: tuple[int, ...],
                 chunk_rows: int, chunks_per_shard: int = 0,
                 compressors: tuple[BytesBytesCodec, ...] | None = (
                     ZstdCodec(level=ZSTD_LEVEL),)) -> ArraySpec:
        """The spec of record-group array ``name`` at ``level`` ("record"/"atom"; ``atoms_ptr``
        by its name): its dimension names and units from :mod:`.layout`'s table."""
        trailing = tuple(int(d) for d in trailing)
        return cls(dtype, trailing, chunk_rows, chunks_per_shard, compressors,
                   dimension_names=array_dims(name, level, trailing),
                   attributes=array_attributes(name))

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """Shape of one (inner) chunk."""
        return (self.chunk_rows, *(max(d, 1) for d in self.trailing))

    @property
    def shard_shape(self) -> tuple[int, ...] | None:
        """Shape of one shard file, ``None`` when unsharded."""
        if not self.chunks_per_shard:
            return None
        return (self.chunk_rows * self.chunks_per_shard, *self.chunk_shape[1:])

    @property
    def fill_value(self) -> Any:
        return False if self.dtype.kind == "b" else 0

    def zarr_arguments(self) -> dict[str, Any]:
        """Arguments of zarr's ``create_array`` that create this layout, with no rows."""
        return dict(shape=(0, *self.trailing), dtype=self.dtype, chunks=self.chunk_shape,
                    shards=self.shard_shape, compressors=self.compressors,
                    fill_value=self.fill_value,
                    chunk_key_encoding={"name": "default", "separator": "."},
                    dimension_names=self.dimension_names, attributes=dict(self.attributes))

    def document(self, rows: int) -> dict[str, Any]:
        """The ``zarr.json`` of this layout with ``rows`` rows: what zarr writes for
        :meth:`zarr_arguments` (``tests/store/test_raw_group_writer.py`` compares the bytes). Sharded
        arrays with zstd only: the others are written through zarr."""
        if self.chunks_per_shard < 1 or not self.compressors or not all(
                isinstance(c, ZstdCodec) for c in self.compressors):
            raise ValueError(f"{self}: only sharded zstd arrays are written without zarr")
        shard = self.shard_shape
        assert shard is not None
        fill: Any = {"b": False, "f": 0.0, "c": [0.0, 0.0]}.get(self.dtype.kind, 0)
        le = {"name": "bytes", "configuration": {"endian": "little"}}
        data = le if self.dtype.itemsize > 1 else {"name": "bytes"}  # one byte: no endianness
        zstd = [{"name": "zstd", "configuration": {"level": c.level, "checksum": c.checksum}}
                for c in self.compressors]
        return with_names({
            "shape": [int(rows), *self.trailing],
            "data_type": _data_type(self.dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "fill_value": fill,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(self.chunk_shape),
                "codecs": [data, *zstd],
                "index_codecs": [le, {"name": "crc32c"}],
                "index_location": "end"}}],
            "attributes": {},
            "zarr_format": 3,
            "node_type": "array",
            "storage_transformers": [],
        }, self.dimension_names, self.attributes)

    def document_bytes(self, rows: int) -> bytes:
        """:meth:`document` as zarr encodes it (indent 2)."""
        return json.dumps(self.document(rows), indent=2).encode()


def with_names(meta: dict, dimension_names: tuple[str, ...] | None,
               attributes: Mapping[str, Any]) -> dict:
    """An array's ``zarr.json`` document with these attributes and dimension names, keys in the
    order zarr writes them (``dimension_names`` right after ``attributes``; no key when
    ``None``). Also for a document copied from another array (consolidate's atom arrays)."""
    out: dict[str, Any] = {}
    for k, v in {**meta, "attributes": None}.items():  # (a document without any: at the end)
        if k == "attributes":
            out[k] = dict(attributes)
            if dimension_names is not None:
                out["dimension_names"] = list(dimension_names)
        elif k != "dimension_names":
            out[k] = v
    return out


@dataclass(frozen=True)
class ArrayLayout:
    """An array's ``zarr.json``, parsed (:func:`parse_array`): what readers need of it."""

    shape: tuple[int, ...]
    #: the stored elements' dtype, in the byte order of the ``bytes`` codec
    dtype: np.dtype
    fill_value: Any
    #: rows per (inner) chunk
    chunk_rows: int
    #: the grid's chunk shape: one file's (a shard's, or a chunk's when unsharded)
    file_shape: tuple[int, ...]
    #: the inner chunk shape (equal to ``file_shape`` when unsharded)
    chunk_shape: tuple[int, ...]
    sharded: bool
    #: codecs of one (inner) chunk: array-to-bytes first, then bytes-to-bytes
    codecs: tuple[dict, ...]
    #: the shard index's codecs and where it lies ("end"/"start"); empty when unsharded
    index_codecs: tuple[dict, ...]
    index_location: str
    key_encoding: str
    separator: str
    #: ``zarr.json`` without shape, attributes and dimension names: equal for arrays whose files
    #: are interchangeable
    signature: str = field(repr=False)

    @property
    def trailing(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def file_rows(self) -> int:
        """Rows per file (shard, or chunk when unsharded): the unit a segment is aligned to."""
        return self.file_shape[0]

    @property
    def chunks_per_shard(self) -> int:
        """Chunks per shard along the rows; 0 when unsharded."""
        return self.file_rows // max(self.chunk_rows, 1) if self.sharded else 0

    @classmethod
    def of(cls, array_dir: str | Path) -> tuple[ArrayLayout, dict]:
        """Parse ``array_dir/zarr.json``: ``(layout, metadata dict)``."""
        meta = json.loads((Path(array_dir) / "zarr.json").read_bytes())
        return parse_array(meta), meta


def parse_array(meta: dict) -> ArrayLayout:
    """The layout of a Zarr v3 array with a regular chunk grid, from its ``zarr.json`` (as a
    dict); ``ValueError`` for anything else or for a document it cannot read."""
    try:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise ValueError("not a zarr v3 array")
        grid = meta["chunk_grid"]
        keys = meta["chunk_key_encoding"]
        if grid.get("name") != "regular":
            raise ValueError(f"chunk grid {grid.get('name')!r}, not 'regular'")
        shape = tuple(int(x) for x in meta["shape"])
        file_shape = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
        codecs = list(meta["codecs"])
        sharded = bool(codecs) and codecs[0].get("name") == "sharding_indexed"
        if sharded:
            if len(codecs) != 1:
                raise ValueError("codecs after the sharding codec")
            conf = codecs[0]["configuration"]
            chunk_shape = tuple(int(x) for x in conf["chunk_shape"])
            inner = tuple(conf["codecs"])
            index = tuple(conf["index_codecs"])
            where = conf.get("index_location", "end")
        else:
            chunk_shape, inner, index, where = file_shape, tuple(codecs), (), ""
        dtype = np.dtype(meta["data_type"])
        if inner and inner[0].get("name") == "bytes":
            endian = (inner[0].get("configuration") or {}).get("endian", "little")
            dtype = dtype.newbyteorder("<" if endian == "little" else ">")
        fill = meta.get("fill_value", 0)
        if isinstance(fill, (list, tuple)):
            if dtype.kind != "c" or len(fill) != 2:
                raise ValueError(f"fill value {fill!r} for dtype {dtype}")
            fill = complex(float(fill[0]), float(fill[1]))  # zarr's [re, im] pair
        sig = {k: v for k, v in meta.items()
               if k not in ("shape", "attributes", "dimension_names")}
        return ArrayLayout(
            shape=shape, dtype=dtype, fill_value=fill, chunk_rows=chunk_shape[0],
            file_shape=file_shape, chunk_shape=chunk_shape, sharded=sharded, codecs=inner,
            index_codecs=index, index_location=where, key_encoding=str(keys.get("name")),
            separator=(keys.get("configuration") or {}).get("separator", "/"),
            signature=json.dumps(sig, sort_keys=True))
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"array metadata cannot be read ({type(exc).__name__}: {exc})") \
            from exc


def writer_chunking(record: ArrayLayout | None, atom: ArrayLayout | None) -> dict[str, int]:
    """GroupWriter's chunk settings (``chunk_records``, ``chunk_atoms``, ``chunks_per_shard``)
    that recreate a group whose record and atom arrays have these layouts (defaults for a
    level without arrays)."""
    ref = record if record is not None else atom
    return {"chunk_records": record.chunk_rows if record is not None else DEFAULT_CHUNK_RECORDS,
            "chunk_atoms": atom.chunk_rows if atom is not None else DEFAULT_CHUNK_ATOMS,
            "chunks_per_shard": ref.chunks_per_shard if ref is not None else 0}
