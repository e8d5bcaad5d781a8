"""The ``dist-hooks`` command: consolidate, info, verify, export, plot.

Real demo runs with 1, 2 and 4 ranks (torchrun / mpiexec) and one that crashed after a boundary
are made once per module; consolidated outputs are compared record for record, bit for bit, with
a reference built here independently (plain zarr, a Python sort), and the damage cases work on
copies of a run.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mp.runner import REPO_ROOT, clean_env, mpi_available, mpiexec_path, run_command

from consolidated_ref import assert_bit_identical, group, manifest, reference, trajectory
from dist_hooks.cli import EXIT_MEANINGS, build_parser, main
from dist_hooks.reader import open_run
from dist_hooks.tools.progress import Progress

ENTRY = str(REPO_ROOT / "tests" / "mp" / "demo_entry.py")
#: dist-hooks with consolidate SIGKILLed after N pieces of output (its test seam)
KILLED = str(REPO_ROOT / "tests" / "mp" / "consolidate_killed.py")
DEMO = ["--steps", "60", "--relax-steps", "40", "--systems-per-rank", "5", "--min-atoms", "8",
        "--max-atoms", "20", "--fmax", "0.02", "--checkpoint-every", "20", "--snapshot-every", "5",
        "--timeout", "90", "--quiet"]




def _launch(n: int, out: Path, extra=()):
    args = [ENTRY, "--out", str(out), *DEMO, *extra]
    if n == 1:
        cmd = [sys.executable, *args]
    elif n == 4 and mpi_available():
        cmd = [mpiexec_path(), "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", "--monitor-interval=0.2", *args]
    return run_command(cmd, timeout=150, env=clean_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Demo runs: 1, 2 and 4 ranks, and a 1-rank run SIGKILLed at step 55 (rank 0 commits a
    boundary in the background, so the last one in force is at step 40, or 20 on a slow day)."""
    base = tmp_path_factory.mktemp("runs")
    jobs = {"r1": (1, ()), "r2": (2, ()), "r4": (4, ()), "crash": (1, ("--fail-at-step", "55")),
            "local": (2, ("--storage", "local", "--local-dir", str(base / "local-dir")))}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futs = {k: pool.submit(_launch, n, base / k, extra) for k, (n, extra) in jobs.items()}
        res = {k: f.result() for k, f in futs.items()}
    for k, p in res.items():
        if k != "crash":
            assert p.returncode == 0, (k, p.stdout[-2000:], p.stderr[-4000:])
    m = json.loads((base / "crash" / "run.json").read_text())
    assert not m["last"]["all_final"] and m["last"]["steps"] in ([20], [40]), m["last"]["steps"]
    return {k: base / k for k in jobs}


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``dist-hooks`` in-process; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ independent reference
def csv_reference(run: Path, hook: str = "log", roots: dict[int, Path] | None = None):
    import pandas as pd
    parts = []
    for rk in manifest(run)["last"]["ranks"]:
        info = rk["hooks"][hook]
        root = (roots or {}).get(rk["rank"], run)
        data = (root / info["path"]).read_bytes()[: info["bytes"]]
        parts.append(pd.read_csv(io.BytesIO(data)))
    df = pd.concat(parts, ignore_index=True)
    return df.sort_values(["step", "rank", "sample_id"], kind="stable").reset_index(drop=True)


def tree_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["r1", "r2", "r4"])
def test_consolidate_equals_union_of_shards(runs, name):
    import pandas as pd
    run = runs[name]
    rc, out, err = cli("consolidate", run)
    assert rc == 0, err
    c = run / "consolidated"
    assert (c / "consolidated.json").is_file()
    want = reference(run, "snapshots")
    assert want and len(want["step"]) == sum(r["hooks"]["snapshots"]["records"]
                                             for r in manifest(run)["last"]["ranks"])
    assert_bit_identical(trajectory(c / "data.zarr" / "hooks" / "snapshots"), want,
                         f"{name} snapshots")
    conv_want = reference(run, "converged", dedup=True)
    conv = group(c / "data.zarr" / "converged")
    assert_bit_identical(conv, conv_want, f"{name} converged")
    # ... and the same as the coordinator's merged group
    merged = manifest(run)["last"]["merged"]
    coord = group(run / "data.zarr" / "converged")
    assert merged["records"] == len(conv["step"])
    for k, v in conv.items():
        n = len(v) if k != "atoms_ptr" else merged["records"] + 1
        assert coord[k][:n].tobytes() == v.tobytes(), k
    df = pd.read_csv(c / "logs" / "log.csv")
    ref = csv_reference(run)
    pd.testing.assert_frame_equal(df, ref, check_exact=True)
    pq = pd.read_parquet(c / "logs" / "log.parquet")
    pd.testing.assert_frame_equal(pq, ref, check_exact=True)
    # the reader gives the same whether consolidated or not
    r = open_run(run)
    assert r.consolidated is not None
    assert_bit_identical({k: np.asarray(v) for k, v in r.logs().items()},
                         {k: ref[k].to_numpy() for k in ref.columns}, "logs()")


def test_node_local_run_with_rank_roots(runs, tmp_path):
    """storage="local": each node's directory, copied somewhere, is given with --rank-root; the
    result is the union of what the nodes hold. Without them: a clear refusal, not "damage"."""
    import pandas as pd
    run = tmp_path / "run"
    shutil.copytree(runs["local"], run)
    assert manifest(run)["storage"] == "local"
    local = runs["local"].parent / "local-dir"
    # two "nodes": rank 0's files in one copied directory, rank 1's in another
    node = {0: tmp_path / "node-a", 1: tmp_path / "node-b"}
    for r, d in node.items():
        shutil.copytree(local, d)
        other = 1 - r
        shutil.rmtree(d / f"data.zarr/ranks/rank-{other:05d}")
        shutil.rmtree(d / f"state/rank-{other:05d}")
        (d / f"logs/log/rank-{other:05d}.csv").unlink()
    rc, _, err = cli("consolidate", run)
    assert rc == 2 and "storage='local'" in err and "--rank-root" in err, err
    rc, out, _ = cli("verify", run)
    assert rc == 0 and "--rank-root" in out
    roots = ["--rank-root", node[0], "--rank-root", node[1]]
    rc, out, _ = cli("verify", run, *roots)
    n_units = sum(len(rk["hooks"]) for rk in manifest(run)["last"]["ranks"])
    assert rc == 0 and f"{n_units} committed files/groups" in out, out
    rc, _, err = cli("consolidate", run, *roots)
    assert rc == 0, err
    c = run / "consolidated"
    assert_bit_identical(trajectory(c / "data.zarr/hooks/snapshots"),
                         reference(run, "snapshots", roots=node), "node-local snapshots")
    pd.testing.assert_frame_equal(pd.read_csv(c / "logs/log.csv"),
                                  csv_reference(run, roots=node), check_exact=True)
    merged = manifest(run)["last"]["merged"]
    conv, coord = group(c / "data.zarr/converged"), group(run / "data.zarr/converged")
    assert len(conv["step"]) == merged["records"] > 0
    for k, v in conv.items():
        n = len(v) if k != "atoms_ptr" else merged["records"] + 1
        assert coord[k][:n].tobytes() == v.tobytes(), k
    # only one node given: its rank is consolidated, the other is named as missing
    rc, _, err = cli("consolidate", run, "--force", "--rank-root", node[0])
    assert rc == 1 and "rank-00001" in err and "none of the --rank-root" in err, err
    # info reads the step range from the nodes' files only when it is given them
    rc, out, _ = cli("info", run, "--json", "--no-disk")
    assert rc == 0 and json.loads(out)["step_range"] is None
    rc, out, _ = cli("info", run, "--json", "--no-disk", *roots)
    last_step = max(rk["step"] for rk in manifest(run)["last"]["ranks"])
    lo, hi = json.loads(out)["step_range"]
    assert rc == 0 and lo == 0 and 0 < hi < last_step
    # the reader takes the same roots
    r = open_run(run, rank_roots=[node[0], node[1]])
    assert len(r.group(1, "snapshots")) == manifest(run)["last"]["ranks"][1]["hooks"][
        "snapshots"]["records"]


def test_consolidated_output_needs_only_zarr_and_pandas(runs):
    run = runs["r2"]
    assert cli("consolidate", run)[0] == 0
    code = f"""
import sys
sys.modules["dist_hooks"] = None  # our package must not be needed
import zarr, pandas as pd, numpy as np
root = zarr.open_group({str(run / 'consolidated' / 'data.zarr')!r}, mode="r")
snap = root["hooks/snapshots"]
start, n = snap["atoms_start"][:], snap["n_atoms"][:]
assert len(start) == len(n) == snap["step"].shape[0] and n.sum() > 0
assert np.all(start + n <= snap["positions"].shape[0])
assert np.all(np.diff(snap["step"][:]) >= 0)
first = snap["positions"][start[0]:start[0] + n[0]]
assert first.shape == (n[0], 3) and np.isfinite(first).all()
conv = root["converged"]
df = pd.read_csv({str(run / 'consolidated' / 'logs' / 'log.csv')!r})
pq = pd.read_parquet({str(run / 'consolidated' / 'logs' / 'log.parquet')!r})
assert len(df) == len(pq) > 0
print("OK", snap["step"].shape[0], conv["step"].shape[0], len(df))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd="/", timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stderr


def test_consolidate_is_idempotent(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["r2"], run)
    shutil.rmtree(run / "consolidated", ignore_errors=True)
    assert cli("consolidate", run)[0] == 0
    first = tree_hashes(run / "consolidated")
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "consolidated").rglob("*")}
    rc, out, _ = cli("consolidate", run)
    assert rc == 0 and "up to date" in out
    assert {p: p.stat().st_mtime_ns for p in (run / "consolidated").rglob("*")} == mtimes
    rc, _, _ = cli("consolidate", run, "--force")
    assert rc == 0
    assert tree_hashes(run / "consolidated") == first


def test_consolidate_killed_midway_then_rerun(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["r2"], run)
    shutil.rmtree(run / "consolidated", ignore_errors=True)
    assert cli("consolidate", run, "--block-records", "4")[0] == 0
    want = tree_hashes(run / "consolidated")
    shutil.rmtree(run / "consolidated")
    p = run_command([sys.executable, KILLED, "3", "consolidate", str(run),
                     "--block-records", "4"], timeout=90, env=clean_env())
    assert p.returncode in (-9, 137), (p.returncode, p.stderr[-2000:])
    leftovers = [e.name for e in run.iterdir() if e.name.startswith(".consolidated.tmp-")]
    assert leftovers, "the killed consolidate wrote into a temporary directory"
    assert not (run / "consolidated").exists()
    assert open_run(run).consolidated is None  # a partial output is never taken for one
    assert cli("consolidate", run, "--block-records", "4")[0] == 0
    assert not [e.name for e in run.iterdir() if e.name.startswith(".consolidated.tmp-")]
    assert tree_hashes(run / "consolidated") == want


def test_second_concurrent_consolidate_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["r1"], run)
    with open(run / ".consolidate.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("12345\n")
        fh.flush()
        rc, _, err = cli("consolidate", run, "--force")
    assert rc == 3
    assert "another `dist-hooks consolidate`" in err and "12345" in err
    assert cli("consolidate", run, "--force")[0] == 0  # lock released: works


def test_crashed_run_consolidates_committed_data_only(runs):
    run = runs["crash"]
    m = manifest(run)
    last = m["last"]["steps"][0]
    rc, _, err = cli("consolidate", run)
    assert rc == 0, err
    c = run / "consolidated"
    snap = trajectory(c / "data.zarr" / "hooks" / "snapshots")
    assert_bit_identical(snap, reference(run, "snapshots"), "crashed snapshots")
    assert snap["step"].max() < last
    conv = group(c / "data.zarr" / "converged")
    assert_bit_identical(conv, reference(run, "converged", dedup=True), "crashed converged")
    assert len(conv["step"]) == m["last"]["merged"]["records"]
    import pandas as pd
    df = pd.read_csv(c / "logs" / "log.csv")
    assert len(df) == m["last"]["ranks"][0]["hooks"]["log"]["rows"] and df["step"].max() < last
    assert cli("verify", run)[0] == 0


def _damaged_copy(runs, tmp_path, name="r2") -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs[name], run)
    shutil.rmtree(run / "consolidated", ignore_errors=True)
    return run


def _refused(run: Path, place: str) -> None:
    rc, out, err = cli("verify", run)
    assert rc == 1 and place in out, out
    rc, out, err = cli("consolidate", run)
    assert rc == 1 and place in err and "--skip-damaged" in err, err
    assert not (run / "consolidated").exists()
    assert not [e for e in run.iterdir() if e.name.startswith(".consolidated.")]


def test_truncated_chunk_file(runs, tmp_path):
    run = _damaged_copy(runs, tmp_path)
    f = run / "data.zarr/ranks/rank-00001/snapshots/positions/c.0.0"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _refused(run, "data.zarr/ranks/rank-00001/snapshots/positions")
    rc, _, err = cli("consolidate", run, "--skip-damaged")
    assert rc == 0 and "rank-00001/snapshots/positions" in err
    snap = trajectory(run / "consolidated/data.zarr/hooks/snapshots")
    assert set(snap["rank"].tolist()) == {0}
    ref = reference(runs["r2"], "snapshots")  # the undamaged original
    keep = ref["rank"] == 0
    assert snap["positions"].tobytes() == np.concatenate(
        [ref["positions"][a:b] for a, b, k in zip(ref["atoms_ptr"][:-1], ref["atoms_ptr"][1:], keep)
         if k]).tobytes()
    summary = json.loads((run / "consolidated/consolidated.json").read_text())
    assert any("rank-00001/snapshots" in s for s in summary["skipped"])


def test_flipped_byte_in_csv(runs, tmp_path):
    run = _damaged_copy(runs, tmp_path)
    f = run / "logs/log/rank-00000.csv"
    data = bytearray(f.read_bytes())
    i = len(data) // 2
    data[i] = ord("7") if data[i] != ord("7") else ord("3")
    f.write_bytes(bytes(data))
    committed = manifest(run)["last"]["ranks"][0]["hooks"]["log"]["bytes"]
    _refused(run, f"logs/log/rank-00000.csv: crc32 mismatch over bytes [0, {committed})")


def test_truncated_csv(runs, tmp_path):
    run = _damaged_copy(runs, tmp_path)
    f = run / "logs/log/rank-00001.csv"
    committed = manifest(run)["last"]["ranks"][1]["hooks"]["log"]["bytes"]
    f.write_bytes(f.read_bytes()[:100])
    _refused(run, f"logs/log/rank-00001.csv: file is 100 bytes, committed {committed}")


def test_missing_shard(runs, tmp_path):
    run = _damaged_copy(runs, tmp_path)
    (run / "data.zarr/ranks/rank-00000/snapshots/forces/c.0.0").unlink()
    atoms = manifest(run)["last"]["ranks"][0]["hooks"]["snapshots"]["atoms"]
    _refused(run, "data.zarr/ranks/rank-00000/snapshots/forces: crc32 mismatch over atom rows "
                  f"[0, {atoms})")
    shutil.rmtree(run / "data.zarr/ranks/rank-00001/converged")
    rc, out, _ = cli("verify", run)
    assert rc == 1 and "data.zarr/ranks/rank-00001/converged: group missing" in out


def test_damaged_merged_converged_group(runs, tmp_path):
    run = _damaged_copy(runs, tmp_path, "r4")
    n = manifest(run)["last"]["merged"]["records"]
    f = run / "data.zarr/converged/energy/c.0"
    f.unlink()
    rc, out, _ = cli("verify", run)
    assert rc == 1 and ("data.zarr/converged/energy: differs from the ranks' committed converged "
                        f"records over records [0, {n})") in out, out
    # consolidate rebuilds the converged group from the ranks' committed records
    assert cli("consolidate", run)[0] == 0
    assert_bit_identical(group(run / "consolidated/data.zarr/converged"),
                         reference(run, "converged", dedup=True), "rebuilt converged")


def test_consolidate_reuses_the_intact_merged_group(runs, tmp_path):
    """With the boundary's checksums of data.zarr/converged intact, consolidate writes that
    group and does not read the ranks' converged records again: damage in one of those (which
    only a rebuild would read) does not stop it, and the output equals the merged group."""
    run = _damaged_copy(runs, tmp_path, "r4")
    assert manifest(run)["last"]["merged"]["crc32"]  # recorded by this code
    f = run / "data.zarr/ranks/rank-00001/converged/energy/c.0"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x40  # inside a chunk: the file keeps its size and index
    f.write_bytes(bytes(data))
    assert cli("verify", run)[0] == 1  # verify compares with the ranks and finds it
    rc, _, err = cli("consolidate", run)
    assert rc == 0, err
    assert_bit_identical(group(run / "consolidated/data.zarr/converged"),
                         group(run / "data.zarr/converged"), "reused converged")


def test_manifest_path_outside_run(runs, tmp_path):
    run = _damaged_copy(runs, tmp_path)
    m = manifest(run)
    m["last"]["ranks"][1]["hooks"]["log"]["path"] = "../../../etc/passwd"
    (run / "run.json").write_text(json.dumps(m))
    # refused by the manifest's parser, naming the key, before anything is read or written
    rc, out, _ = cli("verify", run)
    assert rc == 1 and "hooks.log.path" in out, out
    rc, _, err = cli("consolidate", run)
    assert rc == 1 and "hooks.log.path" in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "consolidated").exists()


def test_verify_clean_runs(runs):
    for name in ("r1", "r2", "r4"):
        rc, out, err = cli("verify", runs[name])
        assert rc == 0 and out.startswith("OK"), (name, out, err)
    rc, out, _ = cli("verify", runs["r2"], "--json")
    assert rc == 0 and json.loads(out)["ok"] is True


def test_info(runs):
    run = runs["r4"]
    m = manifest(run)
    rc, out, _ = cli("info", run, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["world_size"] == 4 and info["launcher"] == m["launcher"]
    assert [b["index"] for b in info["boundaries"]] == list(range(len(m["boundaries"])))
    assert info["converged_count"] == m["last"]["merged"]["records"]
    for rk in m["last"]["ranks"]:
        got = next(r for r in info["ranks"] if r["rank"] == rk["rank"])
        assert got["hooks"]["snapshots"]["records"] == rk["hooks"]["snapshots"]["records"]
        assert got["hooks"]["log"]["rows"] == rk["hooks"]["log"]["rows"]
    assert info["step_range"] == [0, 59]
    assert info["disk_bytes"]["total"] > 0 and "data.zarr" in info["disk_bytes"]["parts"]
    rc, out, _ = cli("info", run)
    assert rc == 0 and "world size 4" in out and "snapshots" in out


def test_export_extxyz_reads_back_with_ase(runs, tmp_path):
    ase_io = pytest.importorskip("ase.io")
    run = runs["r4"]
    rc, _, err = cli("export", run, "--what", "converged", "--format", "extxyz",
                     "--out", tmp_path / "conv.xyz")
    assert rc == 0, err
    want = reference(run, "converged", dedup=True)
    frames = ase_io.read(tmp_path / "conv.xyz", ":")
    assert len(frames) == len(want["step"]) > 0
    ptr = want["atoms_ptr"]
    for i, a in enumerate(frames):
        np.testing.assert_allclose(a.positions, want["positions"][ptr[i]:ptr[i + 1]], atol=1e-6)
        np.testing.assert_allclose(a.get_forces(), want["forces"][ptr[i]:ptr[i + 1]], atol=1e-6)
        assert a.get_potential_energy() == pytest.approx(float(want["energy"][i]), abs=1e-7)
        assert (a.info["step"], a.info["rank"], a.info["sample_id"]) == \
            (want["step"][i], want["rank"][i], want["sample_id"][i])
    rc, _, err = cli("export", run, "--what", "trajectory", "--format", "extxyz",
                     "--out", tmp_path / "traj.xyz")
    assert rc == 0, err
    traj = ase_io.read(tmp_path / "traj.xyz", ":")
    snap = reference(run, "snapshots")
    assert len(traj) == len(snap["step"])
    np.testing.assert_allclose(np.concatenate([a.positions for a in traj]), snap["positions"],
                               atol=1e-6)


def test_export_ase_db(runs, tmp_path):
    ase_db = pytest.importorskip("ase.db")
    run = runs["r2"]
    rc, _, err = cli("export", run, "--what", "trajectory", "--format", "ase-db",
                     "--out", tmp_path / "traj.db")
    assert rc == 0, err
    want = reference(run, "snapshots")
    db = ase_db.connect(str(tmp_path / "traj.db"))
    rows = list(db.select())
    assert len(rows) == len(want["step"])
    assert [(r.step, r.rank, r.sample_id) for r in rows] == \
        list(zip(want["step"].tolist(), want["rank"].tolist(), want["sample_id"].tolist()))
    assert rows[3].energy == pytest.approx(float(want["energy"][3]))


def test_plot_writes_png(runs, tmp_path):
    pytest.importorskip("matplotlib")
    rc, _, err = cli("plot", runs["r2"], "--out", tmp_path / "p.png")
    assert rc == 0, err
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_usage_errors_and_help(tmp_path):
    assert cli()[0] == 2
    assert cli("bogus")[0] == 2
    rc, _, err = cli("info", tmp_path / "nope")
    assert rc == 2 and "no such directory" in err
    rc, _, err = cli("verify", tmp_path)
    assert rc == 2 and "not a dist_hooks run directory" in err
    rc, _, _ = cli("export", tmp_path, "--what", "converged")  # --format/--out missing
    assert rc == 2
    help_text = build_parser().format_help()
    for code in ("0 ", "1 ", "2 ", "3 ", "4 "):
        assert f"\n  {code}" in help_text
    assert "lock" in help_text


def test_exit_table_in_docs_matches_help():
    table = (REPO_ROOT / "docs" / "cli.md").read_text().split("## Exit status", 1)[1]
    table = table.split("\n## ", 1)[0]
    codes = [int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)]
    assert codes == [code for code, _ in EXIT_MEANINGS]
    help_text = build_parser().format_help()
    for code, meaning in EXIT_MEANINGS:
        assert f"\n  {code:<4} {meaning}\n" in help_text


def test_consolidate_refuses_out_inside_run_data(runs):
    rc, _, err = cli("consolidate", runs["r1"], "--out", runs["r1"] / "data.zarr" / "x")
    assert rc == 2 and "inside the run's own data.zarr" in err


def test_progress_bar_only_on_a_terminal():
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty in (False, True):
        s = Stream(tty)
        p = Progress(100, "x", stream=s, interval=0)
        p.update(50)
        p.close()
        assert (s.getvalue() != "") == tty
        if tty:
            assert " 50%" in s.getvalue()


def _percents(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"(\d+)%\|", text)]


def test_progress_never_passes_100_percent():
    s = io.StringIO()
    p = Progress(100, "x", enabled=True, stream=s, interval=0)
    for _ in range(5):
        p.update(30)  # 150 of an estimated 100
    p.close()
    assert _percents(s.getvalue()) and max(_percents(s.getvalue())) == 100
    assert p.total == p.done == 150
    # a total not known yet is drawn as a count, not as "100 % of 0"; set later, it counts
    s = io.StringIO()
    p = Progress(0, "consolidate", enabled=True, stream=s, interval=0)
    first = s.getvalue()
    assert first and "%" not in first
    p.total = 200
    p.update(50)
    p.set_label("consolidate logs")
    p.close()
    assert _percents(s.getvalue())[-1] == 25 and "consolidate logs" in s.getvalue()


def test_verify_and_consolidate_progress_totals(runs, tmp_path, monkeypatch):
    """verify's total is every byte it then reads (CSV and groups), known before it reads any;
    consolidate's first line is no percentage, its total (known once its inputs are open) is
    what it then reads, the reused merged converged group included; neither passes 100 %."""
    from dist_hooks.tools import consolidate as consolidate_mod, verify as verify_mod

    bars = []

    class Recorded(Progress):
        def __init__(self, total, *a, **k):
            super().__init__(total, *a, **k)
            self.first_total = self.total
            self.overran = False
            bars.append(self)

        def update(self, n):
            self.overran |= bool(self.total) and self.done + n > self.total
            super().update(n)

    monkeypatch.setattr(verify_mod, "Progress", Recorded)
    run = runs["r2"]
    rc, _, err = cli("verify", run, "--progress", "always")
    assert rc == 0
    (bar,) = bars
    csv_bytes = sum(r["hooks"]["log"]["bytes"] for r in manifest(run)["last"]["ranks"])
    assert bar.first_total == bar.done == bar.total > 2 * csv_bytes and not bar.overran
    assert max(_percents(err)) == 100
    monkeypatch.setattr(consolidate_mod, "Progress", Recorded)
    rc, _, err = cli("consolidate", run, "--out", tmp_path / "c", "--progress", "always")
    assert rc == 0
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[0].startswith("consolidate") and "%" not in lines[0]
    assert max(_percents(err)) == 100 and bars[-1].total == bars[-1].done > 0
    assert bars[-1].first_total == 0 and not bars[-1].overran  # set once the inputs are open
    rc, _, err = cli("verify", run, "--progress", "never")
    assert rc == 0 and err == ""


def test_version():
    import dist_hooks
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"dist-hooks {dist_hooks.__version__}"
    p = run_command([sys.executable, "-m", "dist_hooks.cli", "--version"], timeout=60,
                    env=clean_env())
    assert p.returncode == 0 and p.stdout.strip() == f"dist-hooks {dist_hooks.__version__}"


def test_info_of_a_consolidated_output(runs, tmp_path):
    run = runs["r2"]
    rc, out, _ = cli("info", run, "--json", "--no-disk")
    want = json.loads(out)
    cons = tmp_path / "cons"
    assert cli("consolidate", run, "--out", cons)[0] == 0
    rc, out, err = cli("info", cons, "--json")
    assert rc == 0, err
    got = json.loads(out)
    for key in ("world_size", "launcher", "boundaries", "ranks", "totals", "converged_count",
                "step_range", "hooks"):
        assert got[key] == want[key], key
    assert got["run"] == str(run.resolve())
    assert got["consolidated"] == {"path": str(cons.resolve()), "up_to_date": True}
    assert "consolidated.json" in got["disk_bytes"]["parts"]
    # moved away from its run: the copied manifest still answers; the step range needs the run
    moved = tmp_path / "a" / "b" / "moved"
    shutil.copytree(cons, moved)
    rc, out, err = cli("info", moved, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["totals"] == want["totals"] and got["ranks"] == want["ranks"]
    assert got["run"] is None and got["step_range"] is None
    assert got["consolidated"] == {"path": str(moved.resolve()), "up_to_date": None}
    rc, out, _ = cli("info", moved)
    assert rc == 0 and "world size 2" in out and "its run directory is not beside it" in out


def test_memory_stays_bounded(tmp_path, bench_consolidate):
    """Peak traced memory of a consolidate of a run 16x larger (and ~100 chunks long) grows far
    less than the data."""
    bench = bench_consolidate
    small, large = tmp_path / "small", tmp_path / "large"
    kw = dict(ranks=2, systems=32, min_atoms=8, max_atoms=32, chunk_records=256,
              chunk_atoms=4096, chunks_per_shard=4)
    bench.make_synthetic_run(small, steps=20, **kw)
    bench.make_synthetic_run(large, steps=320, **kw)
    code = f"""
import json, sys, tracemalloc
from dist_hooks.tools.consolidate import consolidate
out = {{}}
for name in ("small", "large"):
    tracemalloc.start()
    consolidate({str(tmp_path)!r} + "/" + name, progress=False, block_records=256,
                block_atoms=4096)
    out[name] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
print("PEAKS " + json.dumps(out))
"""
    p = run_command([sys.executable, "-c", code], timeout=150, env=clean_env())
    assert p.returncode == 0, p.stderr[-3000:]
    peaks = json.loads(p.stdout.split("PEAKS ")[1])
    raw = {n: sum(np.asarray(a).nbytes for a in trajectory(
        Path(tmp_path) / n / "consolidated/data.zarr/hooks/snapshots").values())
        for n in ("small", "large")}
    assert raw["large"] > 10 * raw["small"]
    assert raw["large"] > 50 * 4096 * 12  # many atom chunks of positions alone
    growth = peaks["large"] - peaks["small"]
    assert growth < 0.1 * (raw["large"] - raw["small"]), (peaks, raw)
    assert peaks["large"] < 0.5 * raw["large"], (peaks, raw)
