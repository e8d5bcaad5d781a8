"""``dist_hooks.reader.open_run``: committed data only, the same before and after consolidate.

Runs are synthetic (written with the real GroupWriter/CsvLog and a manifest as ``Run`` writes
it, by ``benchmarks/bench_consolidate.py``), so this file needs no launcher and runs in seconds.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr

from consolidated_ref import assert_bit_identical, group, manifest, reference, trajectory
from dist_hooks.errors import DamageError
from dist_hooks.reader import RunError, open_run
from dist_hooks.store import layout
from dist_hooks.store.csv_log import CsvLog
from dist_hooks.store.zarr_sink import ZarrSink
from dist_hooks.tools.consolidate import consolidate

#: Positions of the uncommitted record that _append_uncommitted writes.
UNCOMMITTED = 12345.0




@pytest.fixture(scope="module")
def base_run(tmp_path_factory, bench_consolidate) -> Path:
    path = tmp_path_factory.mktemp("reader") / "run"
    bench_consolidate.make_synthetic_run(path, ranks=3, steps=12, systems=6, chunk_records=16,
                                chunk_atoms=128, chunks_per_shard=2, steps_per_append=3)
    return path


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    p = tmp_path / "run"
    shutil.copytree(base_run, p)
    return p



def _csv_reference(run: Path) -> dict[str, np.ndarray]:
    import pyarrow.csv as pacsv
    tables = []
    for rk in manifest(run)["last"]["ranks"]:
        info = rk["hooks"]["log"]
        tables.append(pacsv.read_csv(io.BytesIO((run / info["path"]).read_bytes()[: info["bytes"]])))
    t = pa.concat_tables(tables, promote_options="permissive")
    cols = {n: t.column(n).to_numpy() for n in t.column_names}
    order = sorted(range(t.num_rows), key=lambda i: (cols["step"][i], cols["rank"][i],
                                                     cols["sample_id"][i]))
    return {n: v[order] for n, v in cols.items()}


def _append_uncommitted(run: Path) -> None:
    """What a crash after the last boundary leaves: rows and records nobody committed."""
    log = CsvLog(layout.csv_path(run, "log", 0))
    log.append({"step": np.array([999]), "rank": np.array([0]), "sample_id": np.array([0]),
                "graph_idx": np.array([0]), "status": np.array([0]),
                "energy": np.array([1.0]), "fmax": np.array([1.0]),
                "temperature": np.array([1.0])})
    log.close()
    w = ZarrSink(run / "data.zarr", chunk_records=16, chunk_atoms=128, chunks_per_shard=2).writer(0, "snapshots")
    g = zarr.open_group(str(run / "data.zarr/ranks/rank-00000/snapshots"), mode="r",
                        use_consolidated=False)
    n = manifest(run)["last"]["ranks"][0]["hooks"]["snapshots"]["records"]
    ptr = g["atoms_ptr"][:]
    levels = dict(g.attrs["level"])
    recs = {k: np.asarray(g[k][n - 1: n]) for k, lvl in levels.items() if lvl == "record"}
    recs["step"] = np.array([999], np.int64)
    atoms = {k: np.asarray(g[k][ptr[n - 1]: ptr[n]]) for k, lvl in levels.items() if lvl == "atom"}
    atoms["positions"] = np.full_like(atoms["positions"], UNCOMMITTED)  # findable in any output
    w.append(recs, atoms, np.array([ptr[n] - ptr[n - 1]]))
    w.close()


def test_open_unconsolidated(run):
    m = manifest(run)
    r = open_run(run)
    assert r.manifest.world_size == 3 and r.ranks == [0, 1, 2]
    assert r.consolidated is None
    assert set(r.hooks) == {"log", "snapshots", "converged"}
    logs = r.logs()
    want = _csv_reference(run)
    assert sorted(logs) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(logs[k], want[k])
    for rk in m["last"]["ranks"]:
        s = r.group(rk["rank"], "snapshots")
        assert len(s) == rk["hooks"]["snapshots"]["records"]
        assert s.n_atoms == rk["hooks"]["snapshots"]["atoms"]
    assert len(r.converged()) == m["last"]["merged"]["records"] > 0
    assert isinstance(r.logs(as_table=True), pa.Table)
    with pytest.raises(RunError, match="consolidate"):
        r.trajectory("snapshots")
    with pytest.raises(KeyError):
        r.logs("nope")


def test_uncommitted_data_are_ignored(run):
    before = open_run(run)
    logs0 = before.logs()
    n0 = len(before.group(0, "snapshots"))
    _append_uncommitted(run)
    after = open_run(run)
    assert len(after.group(0, "snapshots")) == n0
    logs1 = after.logs()
    assert logs1["step"].max() < 999
    for k in logs0:
        np.testing.assert_array_equal(logs0[k], logs1[k])
    for checksums in (True, False):
        consolidate(run, progress=False, force=True, checksums=checksums)
        snap = zarr.open_group(str(run / "consolidated/data.zarr/hooks/snapshots"), mode="r")
        assert snap["step"][:].max() < 999
        assert snap["step"].shape[0] == sum(
            rk["hooks"]["snapshots"]["records"] for rk in manifest(run)["last"]["ranks"])
        # not even as unreferenced bytes: the whole array, padding between segments included
        assert not np.any(snap["positions"][:] == UNCOMMITTED)
        assert_bit_identical(trajectory(run / "consolidated/data.zarr/hooks/snapshots"),
                             reference(run, "snapshots"), f"checksums={checksums}")


def test_same_before_and_after_consolidate(run, tmp_path):
    raw = open_run(run)
    logs_raw = raw.logs(as_table=True)
    conv_raw = raw.converged()
    consolidate(run, progress=False)
    done = open_run(run)
    assert done.consolidated == run / "consolidated"
    assert done.logs(as_table=True).equals(logs_raw)
    conv = done.converged()
    assert len(conv) == len(conv_raw)
    for f in conv_raw.fields:
        np.testing.assert_array_equal(conv.column(f), conv_raw.column(f))
    np.testing.assert_array_equal(conv.atoms_ptr(), conv_raw.atoms_ptr())
    assert len(done.group(1, "snapshots")) == len(raw.group(1, "snapshots"))
    traj = done.trajectory("snapshots")
    assert len(traj) == sum(len(raw.group(k, "snapshots")) for k in raw.ranks)
    # the consolidated directory opens on its own too, next to its run ...
    inplace = open_run(run / "consolidated")
    assert inplace.path == run.resolve() and len(inplace.group(2, "snapshots")) > 0
    # ... and moved away from it: logs and converged still read, per-rank shards cannot
    moved = tmp_path / "elsewhere"
    shutil.copytree(run / "consolidated", moved)
    alone = open_run(moved)
    assert alone.path is None and alone.manifest.world_size == 3
    assert alone.logs(as_table=True).equals(logs_raw)
    assert len(alone.converged()) == len(conv_raw)
    with pytest.raises(RunError, match="run directory"):
        alone.group(0, "snapshots")


def test_consolidated_trajectory_reads_like_the_reference(run):
    """The reader presents the indexed layout as CSR in record order: every access path."""
    consolidate(run, progress=False)
    want = reference(run, "snapshots")
    traj = open_run(run).trajectory("snapshots")
    ptr = want["atoms_ptr"]
    assert len(traj) == len(want["step"]) and traj.n_atoms == ptr[-1]
    np.testing.assert_array_equal(traj.atoms_ptr(), ptr)
    for f in traj.fields:
        np.testing.assert_array_equal(traj.column(f), want[f], err_msg=f)
    a, b = 7, len(want["step"]) - 5
    got = traj.records(a, b)
    np.testing.assert_array_equal(got["atoms_ptr"], ptr[a: b + 1] - ptr[a])
    for f in traj.fields:
        ref = want[f][a:b] if traj.fields[f][0] == "record" else want[f][ptr[a]:ptr[b]]
        np.testing.assert_array_equal(got[f], ref, err_msg=f)
    for i in (0, a, len(want["step"]) - 1):
        rec = traj.record(i, as_torch=False)
        np.testing.assert_array_equal(rec["positions"], want["positions"][ptr[i]:ptr[i + 1]])
        assert rec["step"] == want["step"][i] and rec["rank"] == want["rank"][i]


def _rechunk(group_dir: Path, chunks: int, shards: int | None) -> None:
    """Rewrite a group's atom arrays, same rows, with other chunking (as a rank whose run was
    set up differently would have written them)."""
    g = zarr.open_group(str(group_dir), mode="r+", use_consolidated=False)
    for name, lvl in dict(g.attrs["level"]).items():
        if lvl != "atom":
            continue
        data = np.asarray(g[name][:])
        del g[name]
        a = g.create_array(name, shape=data.shape, dtype=data.dtype,
                           chunks=(chunks, *data.shape[1:]),
                           shards=None if shards is None else (shards, *data.shape[1:]))
        a[:] = data


@pytest.mark.parametrize("shards", [None, 96])
def test_ranks_chunked_differently(run, shards):
    """A rank whose atom arrays are chunked unlike rank 0's cannot be copied file by file; it
    goes through zarr, and the output is the same."""
    _rechunk(run / "data.zarr/ranks/rank-00001/snapshots", 32, shards)
    consolidate(run, progress=False)
    assert_bit_identical(trajectory(run / "consolidated/data.zarr/hooks/snapshots"),
                         reference(run, "snapshots"), "rechunked rank 1")


def test_no_checksums_gives_the_same_bytes_and_still_checks_structure(run, tmp_path):
    from dist_hooks.reader import DamageError

    def data_files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes()
                for p in sorted((out / "data.zarr").rglob("*")) if p.is_file()}

    consolidate(run, tmp_path / "a", progress=False)
    consolidate(run, tmp_path / "b", progress=False, checksums=False)
    assert data_files(tmp_path / "a") == data_files(tmp_path / "b")
    f = run / "data.zarr/ranks/rank-00002/snapshots/forces/c.1.0"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for checksums in (True, False):
        with pytest.raises(DamageError, match="rank-00002/snapshots/forces/c.1.0"):
            consolidate(run, tmp_path / "c", progress=False, checksums=checksums)


def _strip_file_checksums(run: Path) -> None:
    """What a run recorded before commit records carried shard-file checksums looks like."""
    m = manifest(run)
    for entry in [m["last"]] + [json.loads((run / b["file"]).read_text()) for b in m["boundaries"]]:
        for rk in entry["ranks"]:
            for info in rk["hooks"].values():
                info.pop("files", None)
        if entry is not m["last"]:
            (run / f"boundaries/b-{entry['index']:06d}.json").write_text(json.dumps(entry))
    (run / "run.json").write_text(json.dumps(m))


def test_shard_files_checked_against_their_writers_checksums(run, tmp_path):
    """With the writers' file checksums in the commit records, shard files are checked whole
    (no decoding); a file that does not match is checked row by row, so damage is still found;
    without them (older runs), every row is decoded and checked."""
    from dist_hooks.reader import DamageError

    s = consolidate(run, tmp_path / "a", progress=False)
    checked = s["hooks"]["snapshots"]["checked"]
    assert {how for c in checked for how in c["checked"].values()} == {"files"}, checked
    assert_bit_identical(trajectory(tmp_path / "a/data.zarr/hooks/snapshots"),
                         reference(run, "snapshots"), "checked by file checksums")
    # one flipped byte inside a chunk of a full shard (its index stays valid)
    f = run / "data.zarr/ranks/rank-00001/snapshots/positions/c.1.0"
    data = bytearray(f.read_bytes())
    data[len(data) // 4] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(DamageError, match="rank-00001/snapshots/positions"):
        consolidate(run, tmp_path / "b", progress=False)


def test_runs_without_file_checksums_are_checked_row_by_row(run, tmp_path):
    _strip_file_checksums(run)
    s = consolidate(run, tmp_path / "a", progress=False)
    checked = s["hooks"]["snapshots"]["checked"]
    assert {how for c in checked for how in c["checked"].values()} == {"rows"}, checked
    assert_bit_identical(trajectory(tmp_path / "a/data.zarr/hooks/snapshots"),
                         reference(run, "snapshots"), "checked row by row")


def test_stale_or_partial_consolidation_is_not_used(run):
    consolidate(run, progress=False)
    assert open_run(run).consolidated is not None
    m = manifest(run)
    m["settings"]["touched"] = True  # a new manifest: the consolidated output is stale now
    (run / "run.json").write_text(json.dumps(m))
    assert open_run(run).consolidated is None
    consolidate(run, progress=False)
    assert open_run(run).consolidated is not None
    marker = run / "consolidated" / "consolidated.json"
    marker.unlink()  # as if the output were incomplete
    assert open_run(run).consolidated is None
    with pytest.raises(RunError, match="incomplete|not a"):
        open_run(run / "consolidated")


def test_not_a_run(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        open_run(tmp_path / "missing")
    with pytest.raises(RunError, match="not a dist_hooks run"):
        open_run(tmp_path)


def test_unsharded_run(tmp_path, bench_consolidate):
    """Ranks that wrote unsharded arrays: the output's record groups are then written through
    zarr (GroupWriter), not by the raw writer, and hold the same records."""
    run = tmp_path / "run"
    bench_consolidate.make_synthetic_run(run, ranks=2, steps=10, systems=5, chunk_records=64,
                                chunk_atoms=128, chunks_per_shard=0, steps_per_append=3)
    meta = json.loads((run / "data.zarr/ranks/rank-00000/snapshots/step/zarr.json").read_text())
    assert meta["codecs"][0]["name"] != "sharding_indexed"
    consolidate(run, progress=False)
    out = run / "consolidated/data.zarr"
    assert_bit_identical(trajectory(out / "hooks/snapshots"), reference(run, "snapshots"),
                         "unsharded snapshots")
    g = zarr.open_group(str(out), path="hooks/snapshots", mode="r", use_consolidated=False)
    assert "atoms_ptr" not in set(g.array_keys())
    assert g.attrs["atoms_layout"] == "indexed" and len(g.attrs["segments"]) == 2
    assert g["step"].shards is None  # written as the ranks' groups are: unsharded
    assert_bit_identical(group(out / "converged"), reference(run, "converged", dedup=True),
                         "unsharded converged")


def test_open_run_pairs_one_manifest_with_its_own_fingerprint(run, monkeypatch):
    """A consolidate (or a boundary) that replaces run.json while open_run reads it cannot make
    the reader pair one manifest with the consolidated output of another: open_run reads the
    file once, and parses and fingerprints those same bytes."""
    from dist_hooks.store.storage import LocalRunStorage

    old = (run / "run.json").read_bytes()
    m = manifest(run)
    m["settings"]["touched"] = True
    (run / "run.json").write_text(json.dumps(m))
    consolidate(run, progress=False)  # the output of the NEW manifest
    (run / "run.json").write_bytes(old)
    real_read = LocalRunStorage.read
    reads = []

    def read_then_commit(self, rel):
        data = real_read(self, rel)
        if rel == layout.MANIFEST:
            reads.append(data)
            (run / "run.json").write_text(json.dumps(m))  # the new one lands right after
        return data
    monkeypatch.setattr(LocalRunStorage, "read", read_then_commit)
    r = open_run(run)
    assert len(reads) == 1
    assert "touched" not in r.manifest.settings  # the old manifest, as read ...
    assert r.consolidated is None  # ... so the new one's output is not used with it
    monkeypatch.undo()
    r = open_run(run)  # now consistent: the new manifest and its output
    assert r.manifest.settings["touched"] and r.consolidated is not None


def test_consolidated_summary_paths_are_checked(run):
    consolidate(run, progress=False)
    marker = run / "consolidated" / "consolidated.json"
    s = json.loads(marker.read_text())
    s["hooks"]["log"]["parquet"] = "../../../victim.parquet"
    marker.write_text(json.dumps(s))
    with pytest.raises(DamageError, match=r"hooks\.log\.parquet"):
        open_run(run / "consolidated")
    consolidate(run, progress=False, force=True)  # a damaged output is rebuilt, not trusted
    assert open_run(run).consolidated is not None


@pytest.mark.parametrize("key", ["\u00b2", "-1", "1e3", " 1"])
def test_a_dropped_hook_with_an_odd_rank_key_is_damage(key):
    """isdigit() takes '²'; int() does not: the parser must refuse it as damage, not crash."""
    from dist_hooks.errors import DamageError
    from dist_hooks.store.manifest import DroppedHook
    entry = {"hook": "snapshots", "boundary": 2,
             "ranks": {key: {"group": "ranks/rank-00000/snapshots", "records": 1, "atoms": 2,
                             "crc32": {}, "kind": "zarr", "converged": False}}}
    with pytest.raises(DamageError, match="is not a rank"):
        DroppedHook.from_json(entry, "run.json.dropped[0]")
