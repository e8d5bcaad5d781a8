"""The scripts in ``launch/`` start real jobs and leave a complete run directory behind.

* ``launch/torchrun.sh``: a single-node job with two ranks; the multi-node command line it builds
  (the real two-node run is tests/test_multihost.py, in two network namespaces).
* ``launch/mpiexec.sh``: two ranks under MPICH's mpiexec.
* ``launch/sbatch.sh``: the whole batch script, run by bash with the variables sbatch sets and a
  fake ``srun`` on PATH that starts the tasks with the variables a real srun gives them
  (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_JOB_ID, SLURM_STEP_ID, ...) and
  forwards signals to them as srun does; a fake ``scontrol`` answers ``show hostnames`` and records
  ``requeue``. The time-limit path is exercised end to end: SIGUSR1 to the batch script, a final
  boundary, a requeue, and the relaunch (SLURM_RESTART_COUNT=1) resuming the same run to the end
  with every CSV row and every converged system exactly once.

Each run is checked on disk: ``run.json`` (launcher, world size, job id, boundaries) and the merged
converged group, which must equal the union of the ranks' converged records read with plain zarr.
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest
import zarr

from consolidated_ref import manifest
from mp.runner import REPO_ROOT, clean_env, mpi_available, run_command

LAUNCH = REPO_ROOT / "launch"
STEPS, SYSTEMS = 120, 4
DEMO = ["-m", "dist_hooks.demo", "--steps", str(STEPS), "--relax-steps", "90", "--systems-per-rank",
        str(SYSTEMS), "--min-atoms", "8", "--max-atoms", "20", "--checkpoint-every", "30",
        "--snapshot-every", "10", "--timeout", "90", "--quiet"]


# ----------------------------------------------------------------------------- run directory checks



def read_group(data_root: Path, path: str, records: int | None = None) -> tuple[dict, dict]:
    """A record group read with plain zarr, cut to ``records`` records: (arrays, levels)."""
    g = zarr.open_group(str(data_root), path=path, mode="r", use_consolidated=False)
    levels = dict(g.attrs["level"])
    ptr = np.asarray(g["atoms_ptr"][:], dtype=np.int64)
    r = len(ptr) - 1 if records is None else int(records)
    out = {"atoms_ptr": ptr[: r + 1]}
    for name, lvl in levels.items():
        a = np.asarray(g[name][:])
        out[name] = a[:r] if lvl == "record" else a[: ptr[r]]
    return out, levels


def assert_merged_is_union(run: Path, rank_roots: Mapping[int, Path] | None = None) -> int:
    """``run/data.zarr/converged`` equals the union of every rank's committed converged records,
    ordered by (step, rank, sample_id), each (rank, sample_id) once. ``rank_roots``: where each
    rank's data lives (the node-local directory with --storage local); default the run directory.
    Returns the number of merged records."""
    m = manifest(run)
    rows: list[tuple[int, int, int, int, int]] = []  # (step, rank, sample_id, rank, index)
    groups: dict[int, tuple[dict, dict]] = {}
    for rk in m["last"]["ranks"]:
        info = rk["hooks"].get("converged")
        if not info or not info.get("records"):
            continue
        root = (rank_roots or {}).get(rk["rank"], run) / "data.zarr"
        arrays, levels = read_group(root, info["group"], info["records"])
        groups[rk["rank"]] = (arrays, levels)
        for i in range(info["records"]):
            rows.append((int(arrays["step"][i]), rk["rank"], int(arrays["sample_id"][i]), i))
    rows.sort()
    seen, want = set(), []
    for step, rank, sid, i in rows:
        if (rank, sid) not in seen:
            seen.add((rank, sid))
            want.append((rank, i))
    assert m["last"]["merged"]["records"] == len(want)
    if not want:
        return 0
    got, got_levels = read_group(run / "data.zarr", "converged", len(want))
    assert got_levels["rank"] == "record"
    assert got["rank"].tolist() == [r for r, _ in want]
    ptr = got["atoms_ptr"]
    for j, (rank, i) in enumerate(want):
        arrays, levels = groups[rank]
        for name, lvl in levels.items():
            if lvl == "record":
                expect, have = arrays[name][i], got[name][j]
            else:
                p = arrays["atoms_ptr"]
                expect, have = arrays[name][p[i]:p[i + 1]], got[name][ptr[j]:ptr[j + 1]]
            assert np.asarray(have).tobytes() == np.asarray(expect).tobytes(), (j, rank, name)
    return len(want)


def assert_complete_logs(run: Path, world: int, steps: int = STEPS, systems: int = SYSTEMS,
                         rank_offset: int = 0) -> None:
    """Every rank's CSV (ranks ``rank_offset .. rank_offset + world - 1`` under ``run``) holds each
    (step, sample_id) of the run exactly once: nothing lost or repeated, also across a preemption
    and resume."""
    for rank in range(rank_offset, rank_offset + world):
        path = run / "logs" / "log" / f"rank-{rank:05d}.csv"
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        keys = sorted((int(r["step"]), int(r["sample_id"])) for r in rows)
        ids = sorted({sid for _, sid in keys})
        assert len(ids) == systems, (path, ids)
        assert keys == [(s, i) for s in range(steps) for i in ids], path
        assert {int(r["rank"]) for r in rows} == {rank}


def check_run(run: Path, res: subprocess.CompletedProcess, *, launcher: str, world: int,
              steps: int = STEPS) -> dict:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.strip().splitlines()[-1] == f"Run output: {run.resolve()}", res.stdout[-2000:]
    m = manifest(run)
    assert (m["format"], m["world_size"], m["launcher"]) == ("dist_hooks", world, launcher)
    assert m["last"]["all_final"] and m["last"]["steps"] == [steps] * world
    assert [b["index"] for b in m["boundaries"]] == list(range(len(m["boundaries"])))
    assert assert_merged_is_union(run) > 0, "nothing converged: the check would be empty"
    assert_complete_logs(run, world, steps)
    return m


# ----------------------------------------------------------------------------- torchrun, mpiexec


def test_torchrun_single_node(tmp_path):
    run = tmp_path / "run"
    res = run_command(["bash", LAUNCH / "torchrun.sh", run, *DEMO], timeout=120,
                      env=clean_env({"NPROC": "2", "PYTHON": sys.executable}))
    check_run(run, res, launcher="torchrun", world=2)


def _fake_python(tmp_path: Path) -> Path:
    """An interpreter stand-in that prints the command line it was given, one word per line."""
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    return fake


def test_torchrun_multinode_command_line(tmp_path):
    env = {"PYTHON": str(_fake_python(tmp_path)), "NPROC": "2", "NNODES": "2",
           "RDZV_ENDPOINT": "10.1.2.3:29400", "RDZV_ID": "job7", "NODE_RANK": "0",
           "LOCAL_ADDR": "10.1.2.3"}
    res = run_command(["bash", LAUNCH / "torchrun.sh", tmp_path / "run", "train.py", "--lr", "1"],
                      timeout=30, env=clean_env(env))
    assert res.returncode == 0, res.stderr
    words = res.stdout.splitlines()
    assert words[:2] == ["-m", "torch.distributed.run"]
    for w in ("--nproc-per-node=2", "--nnodes=2", "--rdzv-backend=c10d",
              "--rdzv-endpoint=10.1.2.3:29400", "--rdzv-id=job7", "--node-rank=0",
              "--local-addr=10.1.2.3", "--rdzv-conf=is_host=true"):
        assert w in words, (w, words)
    assert "--standalone" not in words
    assert words[-4:] == ["--lr", "1", "--out", str(tmp_path / "run")]
    assert words[-5] == "train.py"
    # the other node: not the host of the rendezvous store
    env["LOCAL_ADDR"] = "10.1.2.4"
    res = run_command(["bash", LAUNCH / "torchrun.sh", tmp_path / "run"], timeout=30, env=clean_env(env))
    assert "--rdzv-conf=is_host=false" in res.stdout.splitlines()
    assert res.stdout.splitlines()[-4:] == ["-m", "dist_hooks.demo", "--out", str(tmp_path / "run")]
    # several nodes without an endpoint: refused with a message, nothing started
    env.pop("RDZV_ENDPOINT")
    res = run_command(["bash", LAUNCH / "torchrun.sh", tmp_path / "run"], timeout=30, env=clean_env(env))
    assert res.returncode == 2 and "RDZV_ENDPOINT" in res.stderr and res.stdout == ""


def test_mpiexec(tmp_path):
    if not mpi_available():
        pytest.fail("mpi4py or mpiexec missing: install the test extra (mpi4py and the mpich wheel)")
    run = tmp_path / "run"
    res = run_command(["bash", LAUNCH / "mpiexec.sh", run, *DEMO], timeout=120,
                      env=clean_env({"NPROC": "2", "PYTHON": sys.executable}))
    m = check_run(run, res, launcher=os.environ.get("DIST_HOOKS_TEST_MPI_LAUNCHER", "mpich"), world=2)
    assert m["job_id"] is None


# ----------------------------------------------------------------------------- sbatch + fake srun

FAKE_SRUN = r'''#!{python}
"""Fake srun: starts SLURM_NTASKS tasks of one step, with the variables a real srun sets."""
import json, os, signal, subprocess, sys, time

args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
log_dir = os.environ["FAKE_SLURM_LOG"]
steps = [f for f in os.listdir(log_dir) if f.startswith("srun-")]
step = len(steps)
ntasks = int(os.environ["SLURM_NTASKS"])
nnodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
per_node = ntasks // nnodes
procs, tasks = [], []
for r in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per_node),
               SLURM_NODEID=str(r // per_node), SLURM_STEP_ID=str(step), SLURM_STEPID=str(step),
               SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NUM_NODES=str(nnodes),
               SLURM_STEP_TASKS_PER_NODE=f"{{per_node}}(x{{nnodes}})",
               SLURM_STEP_NODELIST=os.environ.get("SLURM_JOB_NODELIST", ""))
    tasks.append({{k: env.get(k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                  "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT",
                  "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}})
    procs.append(subprocess.Popen(args, env=env))
with open(os.path.join(log_dir, f"srun-{{step}}.json"), "w") as fh:
    json.dump({{"options": opts, "command": args, "tasks": tasks}}, fh)

received = []
def forward(signum, frame):  # srun forwards the signals it receives to every task
    received.append(signum)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)

codes = [None] * ntasks
while None in codes:
    for i, p in enumerate(procs):
        if codes[i] is None and p.poll() is not None:
            codes[i] = p.returncode if p.returncode >= 0 else 128 - p.returncode
            if codes[i] != 0 and "--kill-on-bad-exit=1" in opts:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
    time.sleep(0.05)
with open(os.path.join(log_dir, f"srun-{{step}}.json")) as fh:
    record = json.load(fh)
record.update(codes=codes, signals=received)
with open(os.path.join(log_dir, f"srun-{{step}}.json"), "w") as fh:
    json.dump(record, fh)
sys.exit(max(codes))
'''

FAKE_SCONTROL = r'''#!/bin/sh
echo "$*" >> "$FAKE_SLURM_LOG/scontrol.log"
if [ "$1" = "show" ] && [ "$2" = "hostnames" ]; then
  printf '%s\n' "$3" | tr ',' '\n'
fi
'''


def _port_of(job_id: int, restarts: int) -> int:
    """The MASTER_PORT launch/sbatch.sh derives (kept in step with the script)."""
    return 20000 + (job_id * 7 + restarts * 1009) % 20000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _slurm_setup(tmp_path: Path, ntasks: int, nnodes: int) -> tuple[dict, Path, int]:
    """Fake srun/scontrol on PATH and the variables sbatch gives a batch script."""
    bin_dir, log_dir = tmp_path / "fakebin", tmp_path / "slurm-log"
    bin_dir.mkdir()
    log_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    rng = random.Random()
    job = next(j for j in (rng.randrange(100000, 999999) for _ in range(100))
               if _port_free(_port_of(j, 0)) and _port_free(_port_of(j, 1)))
    nodes = ["localhost", "127.0.0.1"][:nnodes]
    env = clean_env({
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_SLURM_LOG": str(log_dir), "PYTHON": sys.executable,
        "SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job), "SLURM_JOB_NAME": "dist_hooks",
        "SLURM_JOB_NODELIST": ",".join(nodes), "SLURM_NODELIST": ",".join(nodes),
        "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_NNODES": str(nnodes),
        "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
        "SLURM_TASKS_PER_NODE": f"{ntasks // nnodes}(x{nnodes})", "SLURM_CPUS_PER_TASK": "1",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
    })
    env.pop("OMP_NUM_THREADS", None)  # the script sets it from SLURM_CPUS_PER_TASK
    return env, log_dir, job


def _srun_record(log_dir: Path, step: int) -> dict:
    return json.loads((log_dir / f"srun-{step}.json").read_text())


def test_sbatch_with_fake_srun(tmp_path):
    env, log_dir, job = _slurm_setup(tmp_path, ntasks=2, nnodes=1)
    run = tmp_path / "run"
    res = run_command(["bash", LAUNCH / "sbatch.sh", run, *DEMO], timeout=120, env=env)
    m = check_run(run, res, launcher="slurm", world=2)
    assert m["job_id"] == str(job)
    rec = _srun_record(log_dir, 0)
    assert "--kill-on-bad-exit=1" in rec["options"] and rec["codes"] == [0, 0]
    assert rec["command"][:4] == [sys.executable, "-u", "-m", "dist_hooks.demo"]
    assert rec["command"][-2:] == ["--out", str(run)]
    for r, task in enumerate(rec["tasks"]):
        assert task == {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                        "SLURM_NODEID": "0", "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0",
                        "SLURM_RESTART_COUNT": None, "MASTER_ADDR": "localhost",
                        "MASTER_PORT": str(_port_of(job, 0)), "OMP_NUM_THREADS": "1"}
    assert not (log_dir / "scontrol.log").read_text().count("requeue")


def test_sbatch_time_limit_signal_requeues_and_resumes(tmp_path):
    env, log_dir, job = _slurm_setup(tmp_path, ntasks=2, nnodes=2)
    run = tmp_path / "run"
    # longer than the other jobs, so that the signal surely comes before the last regular boundary
    steps = 2 * STEPS
    demo = [*DEMO, "--steps", str(steps), "--relax-steps", str(steps - 30)]
    cmd = ["bash", str(LAUNCH / "sbatch.sh"), str(run), *demo]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO_ROOT),
                            start_new_session=True)
    try:
        # what --signal=B:USR1@300 does: SIGUSR1 to the batch shell, here once the first boundary
        # is committed (every rank has its signal handlers by then)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if manifest(run)["boundaries"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before the signal could be sent"
        os.kill(proc.pid, signal.SIGUSR1)  # the batch shell only, as Slurm's "B:" does
        out, err = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-5000:]
    rec = _srun_record(log_dir, 0)
    # every task stopped with Preempted (143); with --kill-on-bad-exit srun may SIGKILL (137) a task
    # still closing its files after the first one exited: harmless, the boundary is committed by then
    assert rec["signals"] == [signal.SIGUSR1] and 143 in rec["codes"], rec
    assert set(rec["codes"]) <= {143, 137}, rec
    assert f"requeue {job}" in (log_dir / "scontrol.log").read_text()
    first = manifest(run)
    stopped_at = first["last"]["steps"][0]
    assert 0 < stopped_at < steps and first["last"]["steps"] == [stopped_at] * 2
    assert not first["last"]["all_final"]
    assert signal.SIGUSR1 in [r["signal"] for r in first["last"]["ranks"]]
    assert_merged_is_union(run)

    # Slurm starts the requeued job again: same job id, SLURM_RESTART_COUNT=1
    env["SLURM_RESTART_COUNT"] = "1"
    res = run_command(cmd, timeout=120, env=env)
    m = check_run(run, res, launcher="slurm", world=2, steps=steps)  # complete logs: nothing twice
    assert m["job_id"] == str(job) and len(m["boundaries"]) > len(first["boundaries"])
    assert m["boundaries"][: len(first["boundaries"])] == first["boundaries"]
    again = _srun_record(log_dir, 1)
    assert [t["SLURM_NODEID"] for t in again["tasks"]] == ["0", "1"]
    assert {t["MASTER_PORT"] for t in again["tasks"]} == {str(_port_of(job, 1))}
    assert {t["SLURM_RESTART_COUNT"] for t in again["tasks"]} == {"1"}
    assert (log_dir / "scontrol.log").read_text().count("requeue") == 1
