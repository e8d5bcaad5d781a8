"""Checkpoint boundaries with real processes: crash, timeout, resume, merged converged group.

Every scenario is compared with an uninterrupted run of the same seed and world size (the demo is
deterministic per rank), reading the bytes back with plain zarr and numpy.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from consolidated_ref import in_merged_order, manifest
from mp.runner import REPO_ROOT, clean_env, mpiexec_path, run_command

ENTRY = str(REPO_ROOT / "tests" / "mp" / "demo_entry.py")
KILLED_BEFORE_COMMIT = str(REPO_ROOT / "tests" / "mp" / "demo_killed_before_commit.py")
DEMO = ["--steps", "160", "--relax-steps", "110", "--systems-per-rank", "6", "--min-atoms", "8",
        "--max-atoms", "20", "--checkpoint-every", "25", "--snapshot-every", "10", "--quiet"]


def launch(kind: str, n: int, out: Path, extra=(), env=None, timeout=150, crash=False, entry=ENTRY,
           entry_args=()):
    # a short boundary timeout where a rank is made to die; a generous one elsewhere, so that a slow,
    # loaded CI machine never turns an ordinary boundary into a false timeout
    args = [entry, *entry_args, "--out", str(out), *DEMO, "--timeout", "6" if crash else "90", *extra]
    if kind == "torchrun":
        # when a rank is made to crash, a longer monitor interval keeps the agent from killing the
        # survivors before our own timeout fires (the agent notices dead workers only once per interval)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               f"--monitor-interval={20 if crash else 0.2}", *args]
    elif kind == "mpiexec":
        # -disable-auto-cleanup where a rank is made to die, so that the survivors get the chance to
        # fail on their own; Hydra then signals SIGUSR1 to the others whenever a process exits, so
        # ordinary runs go without it
        flags = ["-disable-auto-cleanup"] if crash else []
        cmd = [mpiexec_path(), *flags, "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    else:
        cmd = [sys.executable, *args]
    return run_command(cmd, timeout=timeout, env=clean_env(env))



def group_arrays(run: Path, path: str, records: int | None = None) -> dict[str, np.ndarray]:
    """A record group read with plain zarr, cut to ``records`` committed records."""
    g = zarr.open_group(str(run / "data.zarr"), path=path, mode="r", use_consolidated=False)
    levels = dict(g.attrs["level"])
    ptr = np.asarray(g["atoms_ptr"][:])
    r = len(ptr) - 1 if records is None else records
    out = {"atoms_ptr": ptr[: r + 1]}
    for name, lvl in levels.items():
        a = np.asarray(g[name][:])
        out[name] = a[:r] if lvl == "record" else a[: ptr[r]]
    return out


def assert_same(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        x, y = np.ascontiguousarray(a[k]), np.ascontiguousarray(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, (what, k, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), (what, k)


def union_of_ranks(run: Path, m: dict) -> dict[str, np.ndarray]:
    """The expected merged group: every rank's committed converged records, ordered by (step, rank,
    sample_id), without repeats of (rank, sample_id) — built record by record, independently."""
    rows = []
    for rk in m["last"]["ranks"]:
        info = rk["hooks"].get("converged")
        if not info:
            continue
        g = group_arrays(run, info["group"], info["records"])
        ptr = g["atoms_ptr"]
        for i in range(info["records"]):
            rec = {k: (v[i] if v.shape[0] == info["records"] and k not in ("positions", "velocities", "forces",
                        "atomic_numbers", "atomic_masses") else v[ptr[i]:ptr[i + 1]])
                   for k, v in g.items() if k != "atoms_ptr"}
            rec["rank"] = np.int64(rk["rank"])
            rows.append(rec)
    return in_merged_order(rows, dedup=True)


def assert_merged_is_union(run: Path) -> int:
    m = manifest(run)
    want = union_of_ranks(run, m)
    got = group_arrays(run, "converged", m["last"]["merged"]["records"]) if want else None
    assert m["last"]["merged"]["records"] == len(want)
    if want:
        ptr = got["atoms_ptr"]
        for i, rec in enumerate(want):
            for k, v in rec.items():
                g = got[k][ptr[i]:ptr[i + 1]] if k in ("positions", "velocities", "forces", "atomic_numbers",
                                                         "atomic_masses") else got[k][i]
                assert np.asarray(g).tobytes() == np.asarray(v).tobytes(), (i, k)
    return len(want)


def assert_committed_prefix_equals(run: Path, ref: Path) -> None:
    """Everything the last boundary of ``run`` committed equals the same prefix of ``ref``."""
    for rk in manifest(run)["last"]["ranks"]:
        for name, info in rk["hooks"].items():
            if info["kind"] == "csv":
                got = (run / info["path"]).read_bytes()[: info["bytes"]]
                assert got == (ref / info["path"]).read_bytes()[: info["bytes"]], (rk["rank"], name)
                assert got.count(b"\n") == info["rows"] + 1
            else:
                assert_same(group_arrays(run, info["group"], info["records"]),
                            group_arrays(ref, info["group"], info["records"]), f"rank {rk['rank']} {name}")


def assert_runs_equal(run: Path, ref: Path) -> None:
    mr, mf = manifest(run), manifest(ref)
    assert mr["last"]["all_final"] and mf["last"]["all_final"]
    assert mr["last"]["merged"] == mf["last"]["merged"]
    assert_same(group_arrays(run, "converged"), group_arrays(ref, "converged"), "merged converged group")
    assert_committed_prefix_equals(run, ref)
    for a, b in zip(mr["last"]["ranks"], mf["last"]["ranks"]):
        assert {k: (v.get("records"), v.get("rows")) for k, v in a["hooks"].items()} == \
               {k: (v.get("records"), v.get("rows")) for k, v in b["hooks"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per world size, made once for the module."""
    cache = {}

    def get(n: int) -> Path:
        if n not in cache:
            out = tmp_path_factory.mktemp(f"ref{n}") / "run"
            res = launch("torchrun", n, out)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
            assert assert_merged_is_union(out) > 0, "the reference run converged nothing: test too weak"
            cache[n] = out
        return cache[n]

    return get


@pytest.mark.parametrize("kind,n", [("torchrun", 2), ("torchrun", 4), ("mpiexec", 2), ("mpiexec", 4)])
def test_sigkill_between_boundaries_then_resume(kind, n, tmp_path, reference):
    if kind == "mpiexec" and mpiexec_path() is None:
        pytest.fail("mpiexec not found: install the test extra (mpich wheel)")
    ref = reference(n)
    out = tmp_path / "run"
    # rank 1 dies once the boundary at 50 is in force: rank 0 commits it in the background, and
    # mpiexec kills the survivors at once, which on a loaded machine can be before that commit
    crashed = launch(kind, n, out, ["--fail-at-step", "60", "--fail-rank", "1", "--fail-after-commit"],
                     crash=True)
    text = crashed.stdout + crashed.stderr
    assert crashed.returncode not in (0, 124)  # failed, and did not hang until the deadline
    if kind == "torchrun":
        # the survivors fail at the next boundary with the timeout error naming the dead rank
        assert re.search(r"timed out.*waiting for ranks \[1\]", text), text[-4000:]
    else:
        # MPICH's mpiexec terminates the survivors itself when a rank is killed, usually before our
        # timeout fires (even with -disable-auto-cleanup); either way nobody hangs
        assert re.search(r"timed out.*waiting for ranks \[1\]|Killed \(signal 9\)", text), text[-4000:]
    m = manifest(out)
    assert m["last"]["steps"] == [50] * n  # boundaries at 25 and 50 committed, 75 never came
    assert_committed_prefix_equals(out, ref)
    assert_merged_is_union(out)
    resumed = launch(kind, n, out)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert_runs_equal(out, ref)
    assert_merged_is_union(out)


def test_kill_in_the_middle_of_a_boundary_keeps_the_previous_one(tmp_path, reference):
    ref = reference(2)
    out = tmp_path / "run"
    # rank 0 dies after every rank committed boundary 2 (step 75) but before the manifest rename
    res = launch("torchrun", 2, out, crash=True, entry=KILLED_BEFORE_COMMIT, entry_args=["2"])
    assert res.returncode != 0
    m = manifest(out)
    assert [b["index"] for b in m["boundaries"]] == [0, 1] and m["last"]["steps"] == [50, 50]
    assert_committed_prefix_equals(out, ref)
    resumed = launch("torchrun", 2, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_runs_equal(out, ref)


def test_sigterm_commits_a_final_boundary(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, ENTRY, "--out", str(out), "--steps", "4000", "--systems-per-rank", "4",
            "--checkpoint-every", "1000", "--min-atoms", "8", "--max-atoms", "12"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(), cwd=str(REPO_ROOT))
    try:
        for line in proc.stdout:  # wait until the run is well under way (10% progress line)
            if "step 400/" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest
    m = manifest(out)
    last = m["last"]
    rk = last["ranks"][0]
    assert not last["all_final"] and not rk["final"] and rk["signal"] == signal.SIGTERM  # interrupted, committed
    step = rk["step"]
    assert 400 <= step < 4000
    log = rk["hooks"]["log"]
    assert log["rows"] == step * 4  # every step before the boundary logged, all 4 systems
    data = (out / log["path"]).read_bytes()
    assert len(data) == log["bytes"] and data.count(b"\n") == log["rows"] + 1
    snaps = rk["hooks"]["snapshots"]
    assert snaps["records"] == len(range(0, step, 10)) * 4


@pytest.mark.parametrize("n", [2, 4])
def test_every_rank_wrote_its_own_shard_and_csv_completely(n, reference):
    """Ranks writing at once lose nothing: every (step, system) row is in its rank's CSV exactly once,
    every snapshot record is in its rank's group, and the two agree on the energies."""
    import csv as _csv

    run = reference(n)
    m = manifest(run)
    steps, systems = 160, 6
    assert m["world_size"] == n and len(m["last"]["ranks"]) == n
    for rk in m["last"]["ranks"]:
        r = rk["rank"]
        with open(run / rk["hooks"]["log"]["path"], newline="") as fh:
            rows = list(_csv.DictReader(fh))
        assert {int(x["rank"]) for x in rows} == {r}
        keys = [(int(x["step"]), int(x["sample_id"])) for x in rows]
        assert len(keys) == len(set(keys)) == steps * systems
        assert set(keys) == {(s, r * systems + i) for s in range(steps) for i in range(systems)}
        snap = group_arrays(run, rk["hooks"]["snapshots"]["group"])
        assert snap["step"].tolist() == [s for s in range(0, steps, 10) for _ in range(systems)]
        energy_csv = {(int(x["step"]), int(x["sample_id"])): float(x["energy"]) for x in rows}
        for s, sid, e in zip(snap["step"], snap["sample_id"], snap["energy"]):
            assert energy_csv[(int(s), int(sid))] == float(e)


def test_changed_world_size_is_refused(tmp_path, reference):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference(2), out)
    res = launch("plain", 1, out)
    assert res.returncode != 0
    assert "recorded with world size 2, this job has 1" in res.stderr


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
sys.argv = ["demo"] + sys.argv[1:]
from dist_hooks.demo.__main__ import build_parser
import dist_hooks.run as run
orig = run.Run.checkpoint
def checkpoint(self, *a, **k):                  # the disk fills up right after the first boundary
    out = orig(self, *a, **k)
    self.coordinator.join()
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    return out
run.Run.checkpoint = checkpoint
from dist_hooks.demo.__main__ import main
sys.exit(main())
"""


def test_full_disk_raises_in_the_caller_and_keeps_committed_data(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    res = run_command([sys.executable, str(script), "--out", str(out), "--steps", "300",
                       "--systems-per-rank", "16", "--checkpoint-every", "25", "--quiet"], timeout=120)
    assert res.returncode != 0
    assert "RecorderError" in res.stderr and "File too large" in res.stderr, res.stderr[-3000:]
    m = manifest(out)
    (step,) = m["last"]["steps"]
    assert 25 <= step < 300 and not m["last"]["all_final"]  # the run died before its end
    log = m["last"]["ranks"][0]["hooks"]["log"]
    data = (out / log["path"]).read_bytes()
    import zlib
    assert zlib.crc32(data[: log["bytes"]]) == log["crc32"]  # the committed prefix is intact
    assert data[: log["bytes"]].count(b"\n") == log["rows"] + 1 == step * 16 + 1


def test_node_local_storage_merges_over_the_communicator(tmp_path, reference):
    """With --storage local the ranks' data stay in their own directory and the converged records
    travel with the commit records; the merged group equals the shared-storage run's."""
    ref = reference(2)
    out, local = tmp_path / "run", tmp_path / "node-local"
    res = launch("torchrun", 2, out, ["--storage", "local", "--local-dir", str(local)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "data.zarr" / "ranks" / "rank-00001").exists()  # rank data never left the node
    assert (local / "data.zarr" / "ranks" / "rank-00001" / "converged").is_dir()
    assert_same(group_arrays(out, "converged"), group_arrays(ref, "converged"), "merged converged group")
    assert manifest(out)["storage"] == "local"


ATEXIT = r"""
import sys
sys.path.insert(0, sys.argv[2])
from batches import Ctx, make_batch, perturb
from dist_hooks import LoggingHook, SnapshotHook, ZarrSink, Stage
log = LoggingHook(log_path=sys.argv[1] + "/log.csv", rank=0)
snap = SnapshotHook(ZarrSink(sys.argv[1] + "/data.zarr"), rank=0)
b = make_batch([3, 5, 2], seed=0)
for step in range(37):               # never closed, never flushed: a ring and a buffer are pending
    log(Ctx(b, step_count=step), Stage.AFTER_STEP)
    snap(Ctx(b, step_count=step), Stage.AFTER_STEP)
    perturb(b, step)
"""


def test_hooks_never_closed_are_flushed_at_exit(tmp_path):
    script = tmp_path / "atexit_case.py"
    script.write_text(ATEXIT)
    res = run_command([sys.executable, str(script), str(tmp_path), str(REPO_ROOT / "tests" / "support")], timeout=60)
    assert res.returncode == 0, res.stderr
    rows = (tmp_path / "log.rank-00000.csv").read_text().splitlines()
    assert len(rows) == 1 + 37 * 3
    g = group_arrays(tmp_path, "ranks/rank-00000/snapshots")
    assert g["step"].tolist() == [s for s in range(37) for _ in range(3)]
