"""RawGroupWriter against zarr: the same appends through GroupWriter (zarr's write path) and
through the raw writer must give the same files, byte for byte, and read back through plain
zarr to the appended data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from dist_hooks.store import staged_array
from dist_hooks.store.atomic_store import AtomicLocalStore
from dist_hooks.store.layout import ATOMS_PTR
from dist_hooks.store.group_reader import GroupReader
from dist_hooks.store.group_writer import GroupWriter
from dist_hooks.store.raw_group_writer import RawGroupWriter
from dist_hooks.store.shard_files import RawArrayWriter
from store_helpers import pending_sync


def _data(rng: np.random.Generator, n_rec: int) -> tuple[dict, dict, np.ndarray]:
    rec = {"step": np.arange(n_rec, dtype=np.int64) // 7,
           "energy": rng.normal(size=n_rec).astype(np.float32),
           "cell": rng.normal(size=(n_rec, 3, 3)).astype(np.float64),
           "pbc": rng.integers(0, 2, (n_rec, 3)).astype(bool),
           "tag": rng.integers(0, 255, n_rec).astype(np.uint8),
           "phase": (rng.normal(size=n_rec) + 1j * rng.normal(size=n_rec)).astype(np.complex64),
           "nothing": np.zeros((n_rec, 0), np.float32),
           # zarr leaves out chunks equal to the fill value; the raw writer keeps them
           "zeros": np.zeros(n_rec, np.float64)}
    counts = rng.integers(0, 9, n_rec).astype(np.int64)
    n_at = int(counts.sum())
    atoms = {"positions": rng.normal(size=(n_at, 3)).astype(np.float32),
             "numbers": rng.integers(1, 90, n_at).astype(np.int16)}
    return rec, atoms, counts


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _append_both(zw: GroupWriter, rw: RawGroupWriter, rec: dict, atoms: dict,
                 counts: np.ndarray, sizes: list[int]) -> None:
    ptr = np.concatenate([[0], np.cumsum(counts)])
    a = 0
    for k in sizes:
        b = min(a + k, len(counts))
        r = {n: v[a:b] for n, v in rec.items()}
        at = {n: v[ptr[a]:ptr[b]] for n, v in atoms.items()}
        zw.append(r, at, counts[a:b])
        rw.append(r, at, counts[a:b])
        a = b


@pytest.mark.parametrize("sizes", [[5000], [1] * 40 + [777] * 7, [4096, 4096, 3]],
                         ids=["one", "small-and-odd", "whole-shards"])
def test_same_files_as_zarr(tmp_path: Path, sizes: list[int],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    # the reference: GroupWriter through zarr's own write path (not its shard files)
    monkeypatch.setattr(staged_array, "RAW_SHARD_WRITES", False)
    rng = np.random.default_rng(len(sizes))
    n = sum(sizes)
    rec, atoms, counts = _data(rng, n)
    chunking = dict(chunk_records=256, chunk_atoms=1024, chunks_per_shard=4)
    zw = GroupWriter(tmp_path / "zarr", "g", **chunking, fsync="never")
    rw = RawGroupWriter(AtomicLocalStore(tmp_path / "raw", fsync="never"), "g", **chunking)
    _append_both(zw, rw, rec, atoms, counts, sizes)
    zw.close()
    rw.close()
    want, got = _files(tmp_path / "zarr" / "g"), _files(tmp_path / "raw" / "g")
    # the all-fill column: zarr wrote no shard file at all, the raw writer one per shard
    assert not any(n.startswith("zeros/c.") for n in want)
    assert any(n.startswith("zeros/c.") for n in got)
    got = {n: b for n, b in got.items() if not n.startswith("zeros/c.")}
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    # and zarr itself reads back what was appended
    g = zarr.open_group(str(tmp_path / "raw"), path="g", mode="r")
    for name, v in {**rec, **atoms}.items():
        np.testing.assert_array_equal(g[name][:], v)
    np.testing.assert_array_equal(g[ATOMS_PTR][:], np.concatenate([[0], np.cumsum(counts)]))


def test_read_back_and_attrs(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rec, atoms, counts = _data(rng, 3000)
    store = AtomicLocalStore(tmp_path, fsync="never")
    w = RawGroupWriter(store, "out/g", chunk_records=100, chunk_atoms=500,
                       chunks_per_shard=3, attrs={"note": "x"})
    w.append(rec, atoms, counts)
    assert not (tmp_path / "out" / "g" / "zarr.json").exists()  # nothing visible before close
    w.close({"extra": 1})
    assert (w.records, w.atoms) == (3000, int(counts.sum()))
    r = GroupReader(tmp_path, "out/g")
    assert r.attrs["note"] == "x" and r.attrs["extra"] == 1
    assert r.attrs["level"] == {**{n: "record" for n in rec}, **{n: "atom" for n in atoms}}
    assert len(r) == 3000
    got = r.records()
    for name, v in {**rec, **atoms}.items():
        np.testing.assert_array_equal(got[name], v)
    assert pending_sync(store) > 0  # the files go through the store's durability policy


def test_without_atoms_ptr_and_empty(tmp_path: Path) -> None:
    store = AtomicLocalStore(tmp_path, fsync="never")
    w = RawGroupWriter(store, "a", chunk_records=8, chunk_atoms=8, chunks_per_shard=2,
                       atoms_ptr=False)
    w.append({"x": np.arange(5, dtype=np.int64)}, {}, np.zeros(5, np.int64))
    w.close()
    g = zarr.open_group(str(tmp_path), path="a", mode="r")
    assert sorted(g.array_keys()) == ["x"]
    np.testing.assert_array_equal(g["x"][:], np.arange(5))
    e = RawGroupWriter(store, "e", chunk_records=8, chunk_atoms=8, chunks_per_shard=2)
    e.close()  # no append: a group without arrays, as GroupWriter leaves it
    assert list(zarr.open_group(str(tmp_path), path="e", mode="r").array_keys()) == []


def test_bad_input(tmp_path: Path) -> None:
    store = AtomicLocalStore(tmp_path, fsync="never")
    with pytest.raises(TypeError, match="unsupported dtype"):
        RawArrayWriter(store, "s", np.dtype("U3"), (), 4, 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        RawArrayWriter(store, "s", np.dtype("f4"), (), 0, 2)
    w = RawArrayWriter(store, "s", np.dtype("f4"), (3,), 4, 2)
    with pytest.raises(ValueError, match=r"rows of shape \(2,\)"):
        w.append(np.zeros((1, 2), np.float32))
    g = RawGroupWriter(store, "g", chunk_records=4, chunk_atoms=4, chunks_per_shard=1)
    g.append({"a": np.zeros(1)}, {}, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="fields"):
        g.append({"b": np.zeros(1)}, {}, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="sharded"):
        RawGroupWriter(store, "h", chunk_records=4, chunk_atoms=4, chunks_per_shard=0)


def test_consolidated_metadata_as_zarr_writes_it(tmp_path: Path) -> None:
    """The root document equals, byte for byte, what zarr.consolidate_metadata writes for the
    same hierarchy (groups nested two deep, arrays written by zarr and by the raw writer)."""
    import json
    import shutil
    import warnings

    from dist_hooks.store.raw_group_writer import consolidate_metadata

    rng = np.random.default_rng(3)
    rec, atoms, counts = _data(rng, 300)
    base = tmp_path / "a"
    root = zarr.open_group(AtomicLocalStore(base), mode="w", zarr_format=3)
    root.attrs.update({"format": "x", "n": 1})
    root.create_group("hooks")
    w = GroupWriter(base, "hooks/zarr", chunk_records=64, chunk_atoms=256,
                    chunks_per_shard=2, fsync="never")
    w.append(rec, atoms, counts)
    w.close()
    for group in ("hooks/raw", "top/raw"):  # "top" is implicit (no zarr.json): not a member
        r = RawGroupWriter(AtomicLocalStore(base, fsync="never"), group, chunk_records=64,
                           chunk_atoms=256, chunks_per_shard=2)
        r.append(rec, atoms, counts)
        r.close({"segments": [{"rank": 0}]})
    other = tmp_path / "b"
    shutil.copytree(base, other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(AtomicLocalStore(base))
    consolidate_metadata(AtomicLocalStore(other))
    assert (other / "zarr.json").read_bytes() == (base / "zarr.json").read_bytes()
    doc = json.loads((other / "zarr.json").read_bytes())
    assert "hooks/zarr/positions" in doc["consolidated_metadata"]["metadata"]
    assert "hooks/raw/positions" in doc["consolidated_metadata"]["metadata"]
    assert not any(k.startswith("top") for k in doc["consolidated_metadata"]["metadata"])
    # and zarr opens through it
    g = zarr.open_group(str(other), mode="r", use_consolidated=True)
    np.testing.assert_array_equal(g["hooks/raw/cell"][:], rec["cell"])
