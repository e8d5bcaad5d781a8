"""Communicator tests: real torchrun / mpiexec jobs (tests/mp/comm_worker.py), plus in-process
checks of the single-process communicator, the factory and the error type.

Every multi-process job runs under a hard deadline (tests/mp/runner.py); each rank writes what it
received to a JSON file and the test compares it with values computed here.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from dist_hooks.comm import CommTimeoutError, Communicator, SingleCommunicator, get_communicator
from dist_hooks.comm.rendezvous import first_slurm_node, rendezvous_url
from dist_hooks.launch import detect_launch

try:
    from mp.comm_worker import allgather
    from mp.runner import mpi_available, run_mpiexec, run_plain_env, run_torchrun, \
        torchrun_available
except ImportError:  # tests/ became a package
    from tests.mp.comm_worker import allgather
    from tests.mp.runner import mpi_available, run_mpiexec, run_plain_env, run_torchrun, \
        torchrun_available

WORKER = Path(__file__).resolve().parents[1] / "mp" / "comm_worker.py"
JOB_TIMEOUT = 120.0
needs_mpi = pytest.mark.skipif(not mpi_available(), reason="mpi4py or mpiexec missing")
needs_torch = pytest.mark.skipif(not torchrun_available(), reason="torch.distributed missing")


def expected_payload(rank: int) -> dict:
    """Independent copy of comm_worker.payload, as JSON round-trips it."""
    return {"rank": rank, "name": f"rank-{rank}", "values": [rank * i for i in range(5)],
            "nested": {"even": rank % 2 == 0, "tags": ["a"] * (rank + 1)}, "none": None}


def _check_job(proc) -> None:
    assert proc.returncode == 0, (
        f"job failed with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}")


def _records(out: Path, ranks) -> dict[int, dict]:
    found = {p.name for p in out.glob("rank-*.json")}
    expected = {f"rank-{r}.json" for r in ranks}
    assert expected <= found, f"missing result files: {sorted(expected - found)}"
    return {r: json.loads((out / f"rank-{r}.json").read_text()) for r in ranks}


def _check_collectives(out: Path, n: int, kind: str) -> None:
    records = _records(out, range(n))
    everyone = [expected_payload(r) for r in range(n)]
    shas = set()
    for r, rec in records.items():
        assert rec["rank"] == r and rec["world_size"] == n and rec["name"] == kind
        assert rec["gather0"] == (everyone if r == 0 else None)
        assert rec["gather_last"] == (everyone if r == n - 1 else None)
        assert rec["allgather"] == everyone
        assert rec["bcast0"] == expected_payload(0)
        assert rec["bcast_last"] == expected_payload(n - 1)
        assert rec["blob_len"] == 3 << 20
        assert rec["big_ok"] is True
        shas.add(rec["blob_sha"])
        if kind == "torch":
            # 33 rounds x 4 collectives would leave hundreds of keys if calls did not clean up.
            assert all(c is not None and c < 30 for c in rec["key_counts"]), rec["key_counts"]
    assert len(shas) == 1, "ranks received different broadcast blobs"


# --------------------------------------------------------------------------- collectives


@needs_torch
@pytest.mark.parametrize("n", [2, 4])
def test_torchrun_collectives(tmp_path, n):
    _check_job(run_torchrun(WORKER, n, [tmp_path, "ok"], timeout=JOB_TIMEOUT))
    _check_collectives(tmp_path, n, "torch")


@needs_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpiexec_collectives(tmp_path, n):
    _check_job(run_mpiexec(WORKER, n, [tmp_path, "ok"], timeout=JOB_TIMEOUT))
    _check_collectives(tmp_path, n, "mpi")


# --------------------------------------------------------------------------- missing ranks

TIMEOUT = 3.0


def _check_timeout(rec: dict, op: str, missing: list[int], *, lost_store: bool = False) -> None:
    assert rec.get("type") == "CommTimeoutError", rec
    assert rec["missing"] == missing
    assert f"rank {rec['rank']}:" in rec["error"] and f"ranks {missing}" in rec["error"]
    assert repr(op) in rec["error"]
    if lost_store:
        assert "lost the c10d store" in rec["error"]
        assert rec["elapsed"] < TIMEOUT + 5.0
    else:
        assert f"timed out after {TIMEOUT:.1f} s" in rec["error"]
        assert TIMEOUT - 0.1 <= rec["elapsed"] < TIMEOUT + 10.0


def _early(runner, tmp_path, n, early_rank, op, style="exit"):
    args = [tmp_path, "early", "--early-rank", early_rank, "--op", op, "--timeout", TIMEOUT,
            "--early-style", style]
    proc = runner(WORKER, n, args, timeout=JOB_TIMEOUT)
    if runner is run_mpiexec and style == "sleep" and proc.returncode == 9:
        # MPICH's Hydra SIGKILLs the rank that is still (deliberately) hanging once the survivors
        # have left without MPI_Finalize, and then reports the job as killed; what is under test
        # here is what the survivors recorded, checked below in full
        assert "Killed (signal 9)" in proc.stdout, proc.stdout[-4000:]
    else:
        _check_job(proc)
    return _records(tmp_path, [r for r in range(n) if r != early_rank])


@needs_torch
def test_torch_rank_exits_before_gather(tmp_path):
    rec = _early(run_torchrun, tmp_path, 2, 1, "gather")[0]
    _check_timeout(rec, "gather", [1])


@needs_torch
def test_torch_rank0_exits_before_barrier(tmp_path):
    # Under torchrun the store lives in the agent, so rank 1 sees a plain timeout naming rank 0.
    rec = _early(run_torchrun, tmp_path, 2, 0, "barrier")[1]
    _check_timeout(rec, "barrier", [0])


@needs_torch
def test_torch_store_host_dies(tmp_path):
    # Without torchrun's agent the store server is inside rank 0: its exit breaks the connection,
    # which must surface at once as CommTimeoutError naming rank 0, not a hang or a raw DistError.
    rec = _early(run_plain_env, tmp_path, 2, 0, "barrier")[1]
    _check_timeout(rec, "barrier", [0], lost_store=True)


@needs_torch
def test_torch_rank_missing_from_barrier_without_agent(tmp_path):
    rec = _early(run_plain_env, tmp_path, 2, 1, "barrier")[0]
    _check_timeout(rec, "barrier", [1])


@needs_mpi
def test_mpi_rank_exits_before_gather(tmp_path):
    # The early rank finalises MPI and exits 0, so mpiexec keeps the job alive for our timeout.
    rec = _early(run_mpiexec, tmp_path, 2, 1, "gather", style="finalize")[0]
    _check_timeout(rec, "gather", [1])


@needs_mpi
def test_mpi_rank0_never_arrives(tmp_path):
    rec = _early(run_mpiexec, tmp_path, 2, 0, "barrier", style="sleep")[1]
    _check_timeout(rec, "barrier", [0])


@needs_mpi
def test_mpi_root_reports_missing_rank_to_survivors(tmp_path):
    # Rank 2 hangs; rank 0 (the root of the gather phase) names it, and relays that to rank 1,
    # which otherwise could only have blamed rank 0.
    recs = _early(run_mpiexec, tmp_path, 3, 2, "barrier", style="sleep")
    _check_timeout(recs[0], "barrier", [2])
    _check_timeout(recs[1], "barrier", [2])
    assert "reported by rank 0" in recs[1]["error"]


# --------------------------------------------------------------------------- in process


def test_single_communicator():
    comm = get_communicator("single", timeout=5.0)
    assert isinstance(comm, SingleCommunicator) and isinstance(comm, Communicator)
    assert (comm.rank, comm.world_size, comm.name, comm.timeout) == (0, 1, "single", 5.0)
    obj = {"a": [1, 2]}
    comm.barrier()
    assert comm.gather(obj) == [obj]
    assert allgather(comm, obj) == [obj]
    assert comm.broadcast(obj) is obj
    with pytest.raises(ValueError, match="root"):
        comm.gather(obj, root=1)
    with pytest.raises(ValueError, match="timeout"):
        comm.barrier(timeout=0)
    comm.close()
    with pytest.raises(RuntimeError, match="closed"):
        comm.barrier()


def test_auto_is_single_for_one_process():
    with get_communicator("auto", detect_launch({})) as comm:
        assert comm.name == "single"


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown communicator kind 'nccl'"):
        get_communicator("nccl")
    with pytest.raises(ValueError, match="world of 4 processes"):
        get_communicator("single", detect_launch({"PMI_RANK": "0", "PMI_SIZE": "4"}))
    with pytest.raises(ValueError, match="timeout must be positive"):
        SingleCommunicator(timeout=0)


def test_timeout_error_carries_ranks_across_pickle():
    err = CommTimeoutError("rank 0: timed out after 5.0 s in 'gather' waiting for ranks [1]",
                           [3, 1], rank=0, op="gather", timeout=5.0)
    assert isinstance(err, TimeoutError) and err.missing_ranks == [1, 3]
    again = pickle.loads(pickle.dumps(err))
    assert (again.missing_ranks, again.op, again.rank, str(again)) == \
        ([1, 3], "gather", 0, str(err))


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-010,12],cpu1", "gpu003"),
    ("node7", "node7"),
    ("a1,b2", "a1"),
    ("rack[1-2]-n[05-06]", "rack1-n05"),
])
def testfirst_slurm_node(nodelist, first):
    assert first_slurm_node(nodelist) == first


def test_slurm_rendezvous_address():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
           "SLURM_STEP_ID": "2", "SLURM_JOB_ID": "1000", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    url, _ = rendezvous_url(detect_launch(env), env)
    assert url == f"tcp://gpu07:{20000 + (1000 * 131 + 2) % 20000}"
    assert rendezvous_url(detect_launch(env), {**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"})[0] \
        == "env://"


def test_payload_helper_matches_worker():
    # Guard against the expected values silently drifting from what the worker sends.
    import importlib.util
    spec = importlib.util.spec_from_file_location("comm_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for r in range(4):
        assert json.loads(json.dumps(module.payload(r))) == expected_payload(r)
