"""Raw shard reading (``dist_hooks.store.shard_files``) against an independent reference.

Arrays are created with plain zarr v3 (``zarr.create_array`` on a ``LocalStore``), never through
GroupWriter. The reference for rows is zarr reading the same array (``arr[a:b]``); the reference
for checksums is ``zlib.crc32`` of those rows' numpy bytes. Tested: ``RawArrayReader.read`` and
``read_shard_rows`` over dtypes, trailing shapes, compressors, key separators, index location
and byte order; shards/chunks zarr left out (fill value only); layouts ``ShardLayout.parse``
refuses; damaged shard files (truncated, index checksum, garbage chunk bytes); ``signature``.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import (BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec,
                         ZstdCodec)

from dist_hooks.store.shard_files import RawArrayReader, ShardDamage, ShardLayout, read_shard_rows

ROWS, CHUNK, SHARD = 53, 4, 12  # 53 rows: not a multiple of the chunk nor of the shard
# full, empty (at a chunk boundary and inside a chunk), inside one chunk, crossing a chunk
# boundary, crossing shard boundaries, exactly one shard, the partial last chunk/shard
RANGES = [(0, ROWS), (0, 0), (8, 8), (5, 5), (1, 3), (3, 9), (10, 14), (11, 37), (12, 24),
          (47, ROWS), (ROWS - 1, ROWS)]
COMPRESSORS = {
    "zstd": lambda: [ZstdCodec(level=1)],
    "blosc": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "gzip": lambda: [GzipCodec(level=1)],
    "none": lambda: None,
}


def random_rows(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype == "int64":
        return rng.integers(-2**40, 2**40, shape, dtype=np.int64)
    return rng.normal(size=shape).astype(dtype)


def make(path: Path, dtype: str, trailing: tuple[int, ...], comp: str = "zstd", *,
         rows: int = ROWS, data: np.ndarray | None = None, seed: int = 0, **kw) -> zarr.Array:
    """A sharded array written by plain zarr; ``kw`` overrides create_array's arguments."""
    args = dict(shape=(rows, *trailing), dtype=dtype, chunks=(CHUNK, *trailing),
                shards=(SHARD, *trailing), compressors=COMPRESSORS[comp]())
    args.update(kw)
    arr = zarr.create_array(zarr.storage.LocalStore(path), **args)
    arr[:] = random_rows(np.random.default_rng(seed), dtype, (rows, *trailing)) \
        if data is None else data
    return arr


def layout(path: Path) -> ShardLayout:
    lay, _ = ShardLayout.of(path)
    assert lay is not None
    return lay


def raw_crc(path: Path, lay: ShardLayout, rows: int, place: str = "here") -> tuple[int, np.ndarray]:
    """crc32 and rows of the whole array through ``read_shard_rows``, shard file by shard file."""
    crc, parts = 0, []
    for i in range(-(-rows // lay.shard_rows)):
        f = path / lay.shard_key(i)
        data = f.read_bytes() if f.exists() else b""
        if data:  # reading only the index finds what the whole file gives
            for x, y in zip(lay.read_index(f, "w"), lay.index(data, "w")):
                np.testing.assert_array_equal(x, y)
        n = min(lay.shard_rows, rows - i * lay.shard_rows)
        crc_alone, none = read_shard_rows(data, lay, n, f"{place}/{i}", crc, keep=False)
        crc, got = read_shard_rows(data, lay, n, f"{place}/{i}", crc, keep=True)
        assert none is None and crc_alone == crc and got.shape[0] == n
        parts.append(got)
    return crc, np.concatenate(parts)


def check_against_zarr(path: Path, arr: zarr.Array) -> None:
    lay = layout(path)
    ref = arr[:]
    reader = RawArrayReader(path, lay, "place")
    for a, b in RANGES:
        got = reader.read(a, b)
        assert got.dtype == ref.dtype and got.dtype.isnative, (a, b)
        np.testing.assert_array_equal(got, ref[a:b], err_msg=f"rows [{a}, {b})")
        assert got.shape == ref[a:b].shape
        assert got.flags.writeable, (a, b)  # like zarr's result, never a view of a decoded buffer
    crc, rows = raw_crc(path, lay, ref.shape[0])
    np.testing.assert_array_equal(rows, ref)
    assert crc == zlib.crc32(np.ascontiguousarray(ref).tobytes())


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("comp", ["zstd", "blosc", "none"])
@pytest.mark.parametrize("trailing", [(), (3,), (3, 3)], ids=["scalar", "vec3", "mat3x3"])
@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_reads_equal_zarr(tmp_path, dtype, trailing, comp):
    arr = make(tmp_path / "a", dtype, trailing, comp, seed=len(trailing))
    check_against_zarr(tmp_path / "a", arr)


@pytest.mark.parametrize("variant", ["dot-separator", "gzip", "index-start", "big-endian"])
def test_layout_variants_read_equal_zarr(tmp_path, variant):
    kw: dict = {}
    if variant == "dot-separator":  # what GroupWriter uses
        kw = dict(chunk_key_encoding={"name": "default", "separator": "."})
    elif variant in ("index-start", "big-endian"):
        start = variant == "index-start"
        inner = [BytesCodec(endian="little" if start else "big"), ZstdCodec(level=1)]
        kw = dict(chunks=(SHARD, 3), shards=None, compressors=None, serializer=ShardingCodec(
            chunk_shape=(CHUNK, 3), codecs=inner, index_location="start" if start else "end"))
    arr = make(tmp_path / "a", "float32", (3,), "gzip" if variant == "gzip" else "zstd", **kw)
    lay = layout(tmp_path / "a")
    assert lay.index_at_end == (variant != "index-start")
    assert (lay.dtype.byteorder == ">") == (variant == "big-endian")
    check_against_zarr(tmp_path / "a", arr)


@pytest.mark.parametrize("dtype,fill", [("float32", None), ("float32", np.nan), ("int64", 7),
                                        ("bool", True)])
def test_fill_value_shards_and_chunks_left_out(tmp_path, dtype, fill):
    """Shard 1 (rows 12-23) and chunk 0 of shard 2 (rows 24-27) hold only the fill value."""
    data = random_rows(np.random.default_rng(3), dtype, (ROWS, 3))
    if dtype == "bool":
        data[:] = False
        data[::5, 1] = True
    data[12:28] = 0 if fill is None else fill
    kw = {} if fill is None else {"fill_value": fill}
    arr = make(tmp_path / "a", dtype, (3,), "zstd", data=data, **kw)
    lay = layout(tmp_path / "a")
    assert not (tmp_path / "a" / lay.shard_key(1)).exists()  # zarr did not write it
    off, _ = lay.read_index(tmp_path / "a" / lay.shard_key(2), "w")
    assert off[0] == -1 and (off[1:] >= 0).all()  # nor that chunk
    check_against_zarr(tmp_path / "a", arr)


# --------------------------------------------------------------------------- layouts refused
def test_parse_refuses_unhandled_layouts(tmp_path):
    refused = {
        "unsharded": dict(chunks=(CHUNK, 3), shards=None),
        "two compressors": dict(compressors=[GzipCodec(level=1), ZstdCodec(level=1)]),
        "unknown inner codec": dict(compressors=[Crc32cCodec()]),
        "chunk not spanning trailing dims": dict(chunks=(CHUNK, 1), shards=(SHARD, 3)),
    }
    for name, kw in refused.items():
        make(tmp_path / name, "float32", (3,), **kw)
        lay, meta = ShardLayout.of(tmp_path / name)
        assert lay is None, name
        assert meta["zarr_format"] == 3
    # metadata zarr would not write as such: a valid one edited in one place
    make(tmp_path / "ok", "float32", (3,), "zstd")
    _, meta = ShardLayout.of(tmp_path / "ok")
    assert ShardLayout.parse(meta) is not None
    conf = lambda m: m["codecs"][0]["configuration"]  # noqa: E731
    edits = {
        "index location": lambda m: conf(m).update(index_location="middle"),
        "index without crc32c": lambda m: conf(m).update(index_codecs=[{"name": "bytes"}]),
        "v2 chunk keys": lambda m: m["chunk_key_encoding"].update(name="v2"),
        "shard not a multiple of chunk": lambda m: conf(m).update(chunk_shape=[5, 3]),
    }
    for name, edit in edits.items():
        m = json.loads(json.dumps(meta))
        edit(m)
        assert ShardLayout.parse(m) is None, name
    assert ShardLayout.parse({}) is None
    assert ShardLayout.parse({"zarr_format": 3, "node_type": "array"}) is None


def test_signature(tmp_path):
    a = make(tmp_path / "a", "float32", (3,), "zstd", rows=ROWS)
    make(tmp_path / "b", "float32", (3,), "zstd", rows=2 * ROWS + 1)
    a.attrs["note"] = "attributes are not part of the signature"
    make(tmp_path / "c", "float32", (3,), "blosc", rows=ROWS)
    make(tmp_path / "d", "int64", (3,), "zstd", rows=ROWS)
    sig = {n: layout(tmp_path / n).signature for n in "abcd"}
    assert sig["a"] == sig["b"]
    assert sig["a"] != sig["c"]  # compressor differs
    assert sig["a"] != sig["d"]  # dtype differs


# --------------------------------------------------------------------------- damage
def test_truncated_shard_is_damage_naming_place(tmp_path):
    make(tmp_path / "a", "float32", (3,), "zstd")
    lay = layout(tmp_path / "a")
    f = tmp_path / "a" / lay.shard_key(1)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardDamage, match="PLACE-xyz"):
        RawArrayReader(tmp_path / "a", lay, "PLACE-xyz").read(0, ROWS)
    with pytest.raises(ShardDamage, match="where-1"):
        lay.read_index(f, "where-1")
    with pytest.raises(ShardDamage, match="where-2"):
        read_shard_rows(f.read_bytes(), lay, SHARD, "where-2", 0, keep=False)
    f.write_bytes(data[:10])  # shorter than the index itself
    with pytest.raises(ShardDamage, match="where-3"):
        lay.read_index(f, "where-3")


def test_index_checksum_and_missing_file(tmp_path):
    make(tmp_path / "a", "int64", (), "zstd")
    lay = layout(tmp_path / "a")
    f = tmp_path / "a" / lay.shard_key(0)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ShardDamage, match="checksum") as err:
        lay.read_index(f, "where-4")
    assert "where-4" in str(err.value)
    with pytest.raises(ShardDamage, match="checksum"):
        RawArrayReader(tmp_path / "a", lay, "PLACE").read(0, 1)
    assert lay.read_index(tmp_path / "a" / "c" / "999", "w") is None


def test_garbage_chunk_bytes(tmp_path):
    ref = make(tmp_path / "a", "float32", (3,), "zstd")[:]  # read before the damage
    lay = layout(tmp_path / "a")
    f = tmp_path / "a" / lay.shard_key(1)
    off, nb = lay.read_index(f, "w")
    data = bytearray(f.read_bytes())
    j = 1  # overwrite chunk 1 of shard 1 (rows 16-19), the index stays as it was
    data[off[j]: off[j] + nb[j]] = np.random.default_rng(5).bytes(int(nb[j]))
    f.write_bytes(bytes(data))
    assert lay.read_index(f, "w") is not None  # the index is still valid
    try:
        crc, _ = raw_crc(tmp_path / "a", lay, ROWS, place="PLACE")
    except ShardDamage as exc:
        assert "does not decode" in str(exc) and "PLACE/1" in str(exc)
    else:  # the garbage happened to decode: the checksum must still tell
        assert crc != zlib.crc32(ref.tobytes())
    try:
        got = RawArrayReader(tmp_path / "a", lay, "PLACE").read(16, 20)
    except ShardDamage as exc:
        assert "does not decode" in str(exc) and "PLACE/" in str(exc)
    else:
        assert zlib.crc32(got.tobytes()) != zlib.crc32(ref[16:20].tobytes())


@pytest.mark.parametrize("trailing,fill", [((), 0), ((2,), 1 + 2j)])
def test_complex_fill_value_chunks(tmp_path, trailing, fill):
    data = np.full((ROWS, *trailing), 3 - 1j, np.complex64)
    data[:CHUNK] = fill  # chunk 0 is left out by zarr
    arr = make(tmp_path / "a", "complex64", trailing, "zstd", data=data, fill_value=fill)
    check_against_zarr(tmp_path / "a", arr)
