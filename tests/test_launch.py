"""Launch-environment detection from synthetic environments (no processes needed)."""
from __future__ import annotations

import logging

import pytest

from dist_hooks import launch as launch_mod
from dist_hooks.launch import LAUNCHERS, LaunchError, LaunchInfo, detect_launch

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "run-abc", "TORCHELASTIC_RESTART_COUNT": "2"}
SLURM_STEP = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
              "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4(x2)",
              "SLURM_RESTART_COUNT": "1"}
# What an sbatch batch script sees: job-level variables, no srun step.
SBATCH_SCRIPT = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "4(x2)",
                 "SLURM_JOB_NODELIST": "gpu[01-02]"}
MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
         "PMI_FD": "9"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "16",
           "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
           "OMPI_COMM_WORLD_NODE_RANK": "1"}


def info(launcher, rank, world, lrank, lworld, node, job=None, restarts=0) -> LaunchInfo:
    return LaunchInfo(launcher, rank, world, lrank, lworld, node, job, restarts)


# --------------------------------------------------------------------------- each launcher


def test_torchrun():
    assert detect_launch(TORCHRUN) == info("torchrun", 5, 8, 1, 4, 1, "run-abc", 2)


def test_slurm_step():
    assert detect_launch(SLURM_STEP) == info("slurm", 6, 8, 2, 4, 1, "123456", 1)


def test_mpich():
    assert detect_launch(MPICH) == info("mpich", 3, 4, 1, 2, 1)


def test_openmpi():
    assert detect_launch(OPENMPI) == info("openmpi", 7, 16, 3, 4, 1)


def test_single_process_empty_env():
    assert detect_launch({}) == info("single", 0, 1, 0, 1, 0)


def test_sbatch_batch_script_is_single_process():
    # SLURM_NTASKS=8 but no srun step: this is one process, not rank 0 of 8.
    assert detect_launch(SBATCH_SCRIPT) == info("single", 0, 1, 0, 1, 0, "123456")


@pytest.mark.parametrize("step", ["4294967294", "4294967295", "batch", "extern"])
def test_slurm_pseudo_steps_are_single_process(step):
    assert detect_launch({**SBATCH_SCRIPT, "SLURM_STEP_ID": step}).launcher == "single"


def test_slurm_legacy_names():
    env = {k: v for k, v in SLURM_STEP.items() if k not in ("SLURM_NTASKS", "SLURM_STEP_ID")}
    env.update(SLURM_NPROCS="8", SLURM_STEPID="3")
    assert detect_launch(env) == info("slurm", 6, 8, 2, 4, 1, "123456", 1)


def test_slurm_uneven_tasks_per_node():
    env = {**SLURM_STEP, "SLURM_TASKS_PER_NODE": "3,2(x2)", "SLURM_NTASKS": "7",
           "SLURM_PROCID": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    assert detect_launch(env).local_world_size == 2
    # The step's own layout wins over the allocation's.
    env["SLURM_STEP_TASKS_PER_NODE"] = "1,5,1"
    assert detect_launch(env).local_world_size == 5


def test_slurm_ntasks_per_node_and_single_node_fallbacks():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_TASKS_PER_NODE"}
    assert detect_launch({**env, "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4
    one_node = {**env, "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
    assert detect_launch(one_node).local_world_size == 8


def test_torchrun_without_local_variables_assumes_one_node():
    env = {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    assert detect_launch(env) == info("torchrun", 2, 3, 2, 3, 0)


def test_torchrun_node_rank_derived_without_group_rank():
    env = {k: v for k, v in TORCHRUN.items() if k != "GROUP_RANK"}
    assert detect_launch(env).node_rank == 1


def test_torchrun_run_id_none_falls_back_to_slurm_job():
    env = {**TORCHRUN, "TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "77"}
    assert detect_launch(env).job_id == "77"


def test_mpi_restart_count_from_slurm_allocation():
    assert detect_launch({**MPICH, **SBATCH_SCRIPT, "SLURM_RESTART_COUNT": "3"}).restart_count == 3


def test_to_dict_and_properties():
    i = detect_launch(TORCHRUN)
    assert i.to_dict() == {"launcher": "torchrun", "rank": 5, "world_size": 8, "local_rank": 1,
                           "local_world_size": 4, "node_rank": 1, "job_id": "run-abc",
                           "restart_count": 2}
    assert not i.is_root and i.is_distributed
    assert detect_launch({}).is_root and not detect_launch({}).is_distributed


def test_reads_os_environ_by_default(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_")) or key in TORCHRUN:
            monkeypatch.delenv(key)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert detect_launch() == info("mpich", 1, 2, 1, 2, 0)


# --------------------------------------------------------------------------- precedence


def test_torchrun_inside_sbatch_wins_over_slurm():
    env = {**SLURM_STEP, **TORCHRUN, "TORCHELASTIC_RUN_ID": "none"}
    assert detect_launch(env) == info("torchrun", 5, 8, 1, 4, 1, "123456", 2)


def test_mpi_inside_slurm_wins_over_slurm():
    assert detect_launch({**SLURM_STEP, **MPICH}).launcher == "mpich"
    assert detect_launch({**SLURM_STEP, **OPENMPI}).launcher == "openmpi"
    assert detect_launch({**SBATCH_SCRIPT, **MPICH}) == info("mpich", 3, 4, 1, 2, 1, "123456")


def test_torchrun_wins_over_mpi():
    assert detect_launch({**MPICH, **TORCHRUN}).launcher == "torchrun"


def test_openmpi_wins_over_mpich_variables():
    assert detect_launch({**MPICH, **OPENMPI}).launcher == "openmpi"


# --------------------------------------------------------------------------- overrides


def test_explicit_launcher_reads_that_launcher():
    env = {**SLURM_STEP, **TORCHRUN}
    assert detect_launch(env, launcher="slurm") == info("slurm", 6, 8, 2, 4, 1, "123456", 1)
    assert detect_launch(env, launcher="single").world_size == 1


def test_explicit_values_override_environment():
    got = detect_launch(TORCHRUN, rank=7, local_rank=3, node_rank=1, job_id="mine")
    assert got == info("torchrun", 7, 8, 3, 4, 1, "mine", 2)


def test_explicit_values_fill_missing_variables():
    got = detect_launch({"RANK": "1"}, world_size=2)
    assert (got.launcher, got.rank, got.world_size) == ("torchrun", 1, 2)


def test_explicit_values_without_launcher_variables():
    got = detect_launch({}, rank=2, world_size=4, local_rank=0, local_world_size=2, node_rank=1)
    assert got == info("single", 2, 4, 0, 2, 1)


def test_unknown_launcher():
    with pytest.raises(LaunchError, match="unknown launcher 'pbs'"):
        detect_launch({}, launcher="pbs")
    assert set(LAUNCHERS) == {"torchrun", "slurm", "mpich", "openmpi", "single"}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("env, pattern", [
    ({"RANK": "0"}, r"WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "2"}, r"RANK is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2.0"}, r"WORLD_SIZE='2.0' is not an integer"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, r"RANK='-1' is negative"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"LOCAL_RANK is set but LOCAL_WORLD_SIZE is missing"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_WORLD_SIZE is set but LOCAL_RANK is missing"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, r"LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=4"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9", "LOCAL_RANK": "1"}, r"LOCAL_WORLD_SIZE=9 exceeds WORLD_SIZE=8"),
    ({**TORCHRUN, "RANK": "0"}, r"LOCAL_RANK=1 exceeds RANK=0"),
    ({**TORCHRUN, "GROUP_RANK": "8"}, r"GROUP_RANK=8 is not below WORLD_SIZE=8"),
    ({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "two"}, r"TORCHELASTIC_RESTART_COUNT='two' is not an integer"),
    ({"PMI_RANK": "0"}, r"PMI_SIZE is not set"),
    ({"PMI_SIZE": "4"}, r"PMI_RANK is not set"),
    ({**MPICH, "PMI_RANK": "4"}, r"PMI_RANK=4 is not below PMI_SIZE=4"),
    ({**MPICH, "MPI_LOCALRANKID": "2"}, r"MPI_LOCALRANKID=2 is not below MPI_LOCALNRANKS=2"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, r"OMPI_COMM_WORLD_SIZE is not set"),
    ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "-3"}, r"OMPI_COMM_WORLD_SIZE='-3' is negative"),
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "16"}, r"OMPI_COMM_WORLD_RANK=16 is not below OMPI_COMM_WORLD_SIZE=16"),
    ({**SLURM_STEP, "SLURM_PROCID": "8"}, r"SLURM_PROCID=8 is not below SLURM_NTASKS=8"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_NTASKS"}, r"SLURM_NTASKS / SLURM_NPROCS is not set"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_LOCALID"}, r"SLURM_LOCALID is not set"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_NODEID"}, r"SLURM_NODEID is not set"),
    ({**SLURM_STEP, "SLURM_NODEID": "2"}, r"SLURM_NODEID=2 but SLURM_TASKS_PER_NODE='4\(x2\)' lists only 2 node"),
    ({**SLURM_STEP, "SLURM_TASKS_PER_NODE": "four"}, r"SLURM_TASKS_PER_NODE='four' is not a Slurm task-count list"),
    ({**SLURM_STEP, "SLURM_LOCALID": "4"}, r"SLURM_LOCALID=4 is not below SLURM_TASKS_PER_NODE=4"),
    ({**SLURM_STEP, "SLURM_STEP_ID": "x"}, r"SLURM_STEP_ID='x' is not an integer step id"),
    ({**SLURM_STEP, "SLURM_RESTART_COUNT": "-1"}, r"SLURM_RESTART_COUNT='-1' is negative"),
])
def test_errors_name_the_variables(env, pattern):
    with pytest.raises(LaunchError, match=pattern):
        detect_launch(env)


def test_slurm_multi_node_without_layout_is_an_error():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_TASKS_PER_NODE"}
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        detect_launch({**env, "SLURM_NNODES": "2"})


def test_override_errors_name_the_arguments():
    with pytest.raises(LaunchError, match=r"rank \(argument\)=9 is not below WORLD_SIZE=8"):
        detect_launch(TORCHRUN, rank=9)
    with pytest.raises(LaunchError, match=r"rank \(argument\)='1' is not an integer"):
        detect_launch(TORCHRUN, rank="1")  # type: ignore[arg-type]
    with pytest.raises(LaunchError, match=r"rank \(argument\)=-1 is negative"):
        detect_launch({}, rank=-1)


def test_launch_error_is_runtime_error():
    assert issubclass(LaunchError, RuntimeError)


# --------------------------------------------------------------------------- logging


def test_logs_detected_launcher_once(caplog, monkeypatch):
    monkeypatch.setattr(launch_mod, "_last_logged", None)
    with caplog.at_level(logging.INFO, logger="dist_hooks"):
        detect_launch(MPICH)
        detect_launch(MPICH)
    records = [r for r in caplog.records if r.name == "dist_hooks"]
    assert len(records) == 1
    assert "mpich" in records[0].getMessage() and "rank 3/4" in records[0].getMessage()
