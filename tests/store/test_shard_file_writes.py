"""GroupWriter's whole shards written as shard files (``staged_array.ShardFiles``) against
zarr's own write path: the same appends, flushes and truncations must leave the same files,
byte for byte (zarr is the reference: ``RAW_SHARD_WRITES = False``), and the same rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from dist_hooks.store import staged_array
from dist_hooks.store.group_writer import GroupWriter

CHUNKING = dict(chunk_records=32, chunk_atoms=64, chunks_per_shard=4, fsync="never")


def _data(rng: np.random.Generator, n_rec: int) -> tuple[dict, dict, np.ndarray]:
    counts = rng.integers(0, 6, n_rec).astype(np.int64)
    n_at = int(counts.sum())
    rec = {"step": np.arange(n_rec, dtype=np.int64),
           "status": np.zeros(n_rec, np.int64),          # all zero: zarr writes no chunk
           "pbc": np.zeros((n_rec, 3), bool),
           "energy": rng.normal(size=n_rec).astype(np.float32),
           "neg_zero": np.full(n_rec, -0.0, np.float64),  # not zero bits: zarr keeps it
           "nan": np.where(rng.random(n_rec) < 0.5, np.nan, 0.0),
           "tag": rng.integers(0, 3, n_rec).astype(np.uint8),
           "phase": (rng.normal(size=n_rec) + 0j).astype(np.complex64),  # through zarr
           "nothing": np.zeros((n_rec, 0), np.float32)}                   # through zarr
    # zeros in runs, so that some chunks are all zero and some are not
    sparse = np.zeros(n_at, np.int16)
    sparse[: n_at // 3] = rng.integers(1, 9, n_at // 3)
    atoms = {"positions": rng.normal(size=(n_at, 3)).astype(np.float32),
             "forces": np.zeros((n_at, 3), np.float32), "sparse": sparse}
    return rec, atoms, counts


def _slice(rec: dict, atoms: dict, counts: np.ndarray, a: int, b: int) -> tuple:
    ptr = np.concatenate([[0], np.cumsum(counts)])
    return ({n: v[a:b] for n, v in rec.items()},
            {n: v[ptr[a]:ptr[b]] for n, v in atoms.items()}, counts[a:b])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _write(root: Path, raw: bool, steps: list, data: tuple, monkeypatch: pytest.MonkeyPatch,
           calls: list) -> GroupWriter:
    monkeypatch.setattr(staged_array, "RAW_SHARD_WRITES", raw)
    w = GroupWriter(root, "g", **CHUNKING)
    a = 0
    for step in steps:
        if step == "flush":
            w.flush()
        elif isinstance(step, tuple):  # ("truncate", records)
            r = step[1]
            w.truncate(r, int(data[2][:r].sum()))
            a = r
        else:
            w.append(*_slice(*data, a, a + step))
            a += step
    w.close()
    calls.append(w.take_file_checksums())
    return w


SEQUENCES = {
    # sub-unit appends with flushes between (the tail shard rewritten each time), then
    # appends that complete units, span several shards at once, and leave a tail
    "appends-and-flushes": [5, "flush", 40, "flush", 1, 83, "flush", 300, 7, "flush", 129],
    "whole-shards": [128, 256, 128],
}


@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_same_files_as_zarr(tmp_path: Path, steps: list, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(np.random.default_rng(4), 1000)
    written: list = []
    real_write = staged_array.ShardFiles.write

    def counting(self, start, rows):  # the shard-file path must really be taken
        written.append(self.prefix)
        return real_write(self, start, rows)

    monkeypatch.setattr(staged_array.ShardFiles, "write", counting)
    checksums: list = []
    _write(tmp_path / "zarr", False, steps, data, monkeypatch, checksums)
    assert written == []
    _write(tmp_path / "raw", True, steps, data, monkeypatch, checksums)
    assert {p.rsplit("/", 1)[1] for p in written} >= {"positions", "step", "energy", "atoms_ptr"}
    assert not any(p.endswith(("phase", "nothing")) for p in written)  # those through zarr
    want, got = _files(tmp_path / "zarr"), _files(tmp_path / "raw")
    assert sorted(got) == sorted(want)
    assert [n for n in want if got[n] != want[n]] == []
    assert not any(n.startswith("g/status/c.") or n.startswith("g/forces/c.") for n in got)
    assert any(n.startswith("g/neg_zero/c.") for n in got)
    assert checksums[0] == checksums[1]  # what the commit records carry


def test_truncated_and_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume cuts back into a shard and writes on: the rows read back are the same either
    way (zarr merges the file's old chunks past the rows back in, the shard files do not:
    bytes past the shape may differ, which no reader sees)."""
    data = _data(np.random.default_rng(5), 1000)
    steps = [300, "flush", 90, "flush", ("truncate", 250), 10, "flush", ("truncate", 200),
             400]
    for raw in (False, True):
        _write(tmp_path / str(raw), raw, steps, data, monkeypatch, [])
    rec, atoms, counts = _slice(*data, 0, 600)
    for raw in (False, True):
        g = zarr.open_group(str(tmp_path / str(raw)), path="g", mode="r")
        for name, v in {**rec, **atoms}.items():
            np.testing.assert_array_equal(g[name][:], v, err_msg=f"{raw} {name}")
        np.testing.assert_array_equal(g["atoms_ptr"][:], np.concatenate([[0], np.cumsum(counts)]))
