"""Launch-environment detection: who am I, how many of us are there, who started us.

Every other part of ``dist_hooks`` needs the same few facts (global rank, world size, rank on the
node, node index, a job identifier and how many times the job was restarted) and they come from
different environment variables depending on the launcher.  This module reads them in one place,
validates them, and turns contradictory or partial settings into a :class:`LaunchError` that names
the offending variables, because a silently wrong rank is the worst failure a recorder can have:
two processes that both believe they are rank 0 overwrite each other's files.

Supported launchers and their variables:

* ``torchrun`` (and anything following its ``env://`` contract): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (node), ``TORCHELASTIC_RUN_ID``,
  ``TORCHELASTIC_RESTART_COUNT``.
* ``openmpi``: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
  ``OMPI_COMM_WORLD_LOCAL_SIZE``, ``OMPI_COMM_WORLD_NODE_RANK``.
* ``mpich`` (Hydra, also Intel MPI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``,
  ``MPI_LOCALNRANKS``.
* ``slurm`` (a task of an ``srun`` step): ``SLURM_PROCID``, ``SLURM_NTASKS`` (or ``SLURM_NPROCS``),
  ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_JOB_ID``, ``SLURM_STEP_TASKS_PER_NODE`` /
  ``SLURM_TASKS_PER_NODE`` / ``SLURM_NTASKS_PER_NODE``, ``SLURM_RESTART_COUNT``.
* ``single``: none of the above.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import LaunchError

__all__ = ["LAUNCHERS", "LaunchError", "LaunchInfo", "detect_launch"]

logger = logging.getLogger("dist_hooks")

#: Launcher names :func:`detect_launch` can return (and accepts as ``launcher=``).
LAUNCHERS: tuple[str, ...] = ("torchrun", "slurm", "mpich", "openmpi", "single")

# Slurm reserves step ids at the top of the uint32 range for pseudo-steps: the batch script
# (0xFFFFFFFE), the extern step (0xFFFFFFFF), interactive/pending steps (0xFFFFFFFA-D).  A process
# seeing one of these is not a task of an srun step.
_SLURM_PSEUDO_STEP_MIN = 0xFFFFFFF0
_SLURM_PSEUDO_STEP_NAMES = frozenset({"batch", "extern", "interactive", "pending"})


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job.

    Attributes:
        launcher: ``"torchrun"``, ``"slurm"``, ``"mpich"``, ``"openmpi"`` or ``"single"``.
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the job.
        local_rank: rank among the processes of this node (selects the GPU).
        local_world_size: number of processes on this node.
        node_rank: index of this node.
        job_id: identifier shared by every rank of one job (``TORCHELASTIC_RUN_ID`` under
            torchrun, else ``SLURM_JOB_ID``), ``None`` when the launcher gives none.
        restart_count: how many times this job has been restarted: ``TORCHELASTIC_RESTART_COUNT``
            under torchrun, ``SLURM_RESTART_COUNT`` under slurm (and under MPI inside a Slurm
            allocation, where a requeue is the only restart mechanism), else 0.  Lets a re-launched
            job know it must resume instead of starting afresh.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    job_id: str | None
    restart_count: int

    @property
    def is_root(self) -> bool:
        """True on global rank 0, the process that coordinates and writes run-level files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part (collectives are needed)."""
        return self.world_size > 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON manifests and logs."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing helpers


def _parse_int(name: str, value: str) -> int:
    """Parse one variable as a non-negative integer, naming it on failure."""
    text = value.strip()
    try:
        result = int(text)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None
    if result < 0:
        raise LaunchError(f"{name}={value!r} is negative")
    return result


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of ``names`` that is set (non-empty) in ``env``, with its value."""
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return name, value
    return None


def _expand_tasks_per_node(name: str, value: str) -> list[int]:
    """Expand Slurm's compressed per-node task counts, e.g. ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise LaunchError(f"{name}={value!r} is not a Slurm task-count list like '2(x3),1'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


class _Reader:
    """Reads fields from the environment unless an explicit override already supplies them.

    Keeps the bookkeeping of which variable each value came from, so that validation errors can
    name the variables rather than the abstract fields.
    """

    def __init__(self, env: Mapping[str, str], overrides: Mapping[str, Any]):
        self.env = env
        self.overrides = overrides
        self.sources: dict[str, str] = {}

    def get(self, field: str, names: tuple[str, ...], *, required: bool,
            missing_hint: str = "") -> int | None:
        override = self.overrides.get(field)
        if override is not None:
            self.sources[field] = f"{field} (argument)"
            return override
        found = _first(self.env, names)
        if found is None:
            if required:
                raise LaunchError(f"{' / '.join(names)} is not set{missing_hint}")
            return None
        self.sources[field] = found[0]
        return _parse_int(*found)

    def label(self, field: str) -> str:
        return self.sources.get(field, field)


def _fill_local(reader: _Reader, fields: dict[str, int | None],
                local_names: tuple[str, str]) -> None:
    """Complete local_rank / local_world_size / node_rank when the launcher leaves them out.

    Both local variables absent means a launcher that does not publish node-level layout (a hand
    written ``env://`` launch, a PMI without Hydra's extras): assume one node, which is what such
    launches almost always are.  Exactly one of the pair present is a partial environment and an
    error.  ``node_rank`` defaults to ``(rank - local_rank) // local_world_size``, exact for block
    placement with equal tasks per node (the default of every launcher here).
    """
    lr, lws = fields["local_rank"], fields["local_world_size"]
    if lr is None and lws is None:
        fields["local_rank"] = fields["rank"]
        fields["local_world_size"] = fields["world_size"]
        reader.sources.setdefault("local_rank", reader.label("rank"))
        reader.sources.setdefault("local_world_size", reader.label("world_size"))
    elif lr is None or lws is None:
        present, missing = (local_names[1], local_names[0]) if lr is None else local_names
        raise LaunchError(f"{present} is set but {missing} is missing")
    if fields["node_rank"] is None:
        rank, local_rank, lws = fields["rank"], fields["local_rank"], fields["local_world_size"]
        fields["node_rank"] = max(rank - local_rank, 0) // max(lws, 1)  # type: ignore[operator]


# ----------------------------------------------------------------------------- per launcher


def _read_torchrun(env: Mapping[str, str], reader: _Reader) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "rank": reader.get("rank", ("RANK",), required=True,
                           missing_hint=" (WORLD_SIZE is set: torchrun sets both)"),
        "world_size": reader.get("world_size", ("WORLD_SIZE",), required=True,
                                 missing_hint=" (RANK is set: torchrun sets both)"),
        "local_rank": reader.get("local_rank", ("LOCAL_RANK",), required=False),
        "local_world_size": reader.get("local_world_size", ("LOCAL_WORLD_SIZE",), required=False),
        "node_rank": reader.get("node_rank", ("GROUP_RANK",), required=False),
    }
    _fill_local(reader, fields, ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    run_id = env.get("TORCHELASTIC_RUN_ID")
    # torchrun without --rdzv-id reports the literal run id "none"; inside sbatch the Slurm job id
    # is then the better identifier of the job.
    if not run_id or run_id.strip().lower() == "none":
        run_id = env.get("SLURM_JOB_ID") or None
    fields["job_id"] = run_id
    restart = env.get("TORCHELASTIC_RESTART_COUNT")
    fields["restart_count"] = _parse_int("TORCHELASTIC_RESTART_COUNT", restart) if restart else 0
    return fields


def _slurm_restart(env: Mapping[str, str]) -> int:
    value = env.get("SLURM_RESTART_COUNT")
    return _parse_int("SLURM_RESTART_COUNT", value) if value else 0


def _read_mpi(env: Mapping[str, str], reader: _Reader, rank: str, size: str, local_rank: str,
              local_size: str, node_rank: str | None) -> dict[str, Any]:
    """An MPI launcher's variables (Open MPI and MPICH name the same facts differently)."""
    fields: dict[str, Any] = {
        "rank": reader.get("rank", (rank,), required=True, missing_hint=f" ({size} is set)"),
        "world_size": reader.get("world_size", (size,), required=True,
                                 missing_hint=f" ({rank} is set)"),
        "local_rank": reader.get("local_rank", (local_rank,), required=False),
        "local_world_size": reader.get("local_world_size", (local_size,), required=False),
        "node_rank": reader.get("node_rank", (node_rank,) if node_rank else (), required=False),
    }
    _fill_local(reader, fields, (local_rank, local_size))
    fields["job_id"] = env.get("SLURM_JOB_ID") or None
    fields["restart_count"] = _slurm_restart(env)
    return fields


def _read_openmpi(env: Mapping[str, str], reader: _Reader) -> dict[str, Any]:
    return _read_mpi(env, reader, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
                     "OMPI_COMM_WORLD_NODE_RANK")


def _read_mpich(env: Mapping[str, str], reader: _Reader) -> dict[str, Any]:
    return _read_mpi(env, reader, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                     None)


def _read_slurm(env: Mapping[str, str], reader: _Reader) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "rank": reader.get("rank", ("SLURM_PROCID",), required=True),
        "world_size": reader.get("world_size", ("SLURM_NTASKS", "SLURM_NPROCS"), required=True,
                                 missing_hint=" (SLURM_PROCID is set)"),
        "local_rank": reader.get("local_rank", ("SLURM_LOCALID",), required=True,
                                 missing_hint=" (SLURM_PROCID is set)"),
        "node_rank": reader.get("node_rank", ("SLURM_NODEID",), required=True,
                                missing_hint=" (SLURM_PROCID is set)"),
    }
    lws = reader.overrides.get("local_world_size")
    if lws is not None:
        reader.sources["local_world_size"] = "local_world_size (argument)"
    else:
        # The step's own layout first: inside an sbatch allocation an srun step may use fewer
        # tasks than the allocation, and SLURM_NTASKS_PER_NODE is only the requested value.
        found = _first(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
        if found is not None:
            counts = _expand_tasks_per_node(*found)
            node = fields["node_rank"]
            if node >= len(counts):
                raise LaunchError(
                    f"{reader.label('node_rank')}={node} but {found[0]}={found[1]!r} lists only "
                    f"{len(counts)} node(s)")
            lws = counts[node]
            reader.sources["local_world_size"] = found[0]
        else:
            lws = reader.get("local_world_size", ("SLURM_NTASKS_PER_NODE",), required=False)
        if lws is None:
            nodes = _first(env, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
            if nodes is not None and _parse_int(*nodes) == 1:
                lws = fields["world_size"]
                reader.sources["local_world_size"] = nodes[0]
            else:
                raise LaunchError(
                    "cannot tell the number of tasks on this node: none of "
                    "SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE is "
                    "set and the step spans more than one node (SLURM_STEP_NUM_NODES / "
                    "SLURM_NNODES)")
    fields["local_world_size"] = lws
    fields["job_id"] = env.get("SLURM_JOB_ID") or None
    fields["restart_count"] = _slurm_restart(env)
    return fields


def _read_single(env: Mapping[str, str], reader: _Reader) -> dict[str, Any]:
    """No launcher variables: rank 0 of 1, unless explicit arguments describe a launcher we do
    not know (then ``launcher`` stays ``"single"`` but the arguments' layout is used)."""
    fields: dict[str, Any] = {}
    for field, default in (("rank", 0), ("world_size", 1), ("local_rank", None),
                           ("local_world_size", None), ("node_rank", 0)):
        value = reader.overrides.get(field)
        if value is not None:
            reader.sources[field] = f"{field} (argument)"
        fields[field] = value if value is not None else default
    if fields["local_rank"] is None:
        fields["local_rank"] = fields["rank"]
    if fields["local_world_size"] is None:
        fields["local_world_size"] = fields["world_size"]
    fields["job_id"] = env.get("SLURM_JOB_ID") or None
    fields["restart_count"] = _slurm_restart(env)
    return fields


_READERS: dict[str, Callable[[Mapping[str, str], _Reader], dict[str, Any]]] = {
    "torchrun": _read_torchrun,
    "openmpi": _read_openmpi,
    "mpich": _read_mpich,
    "slurm": _read_slurm,
    "single": _read_single,
}


def _is_srun_task(env: Mapping[str, str]) -> bool:
    """True for a task of an ``srun`` step, False for the batch script or an salloc shell.

    The batch script of an sbatch job (and an interactive ``salloc`` shell) carries
    ``SLURM_JOB_ID``, often ``SLURM_NTASKS`` and sometimes ``SLURM_PROCID=0``, yet it is one
    process: treating it as rank 0 of ``SLURM_NTASKS`` would make it wait forever for ranks that
    do not exist.  Only ``srun`` tasks carry a real step id (``SLURM_STEP_ID``, formerly
    ``SLURM_STEPID``); the batch and extern pseudo-steps use reserved ids near 2**32, which are
    rejected here.
    """
    if _first(env, ("SLURM_PROCID",)) is None:
        return False
    step = _first(env, ("SLURM_STEP_ID", "SLURM_STEPID"))
    if step is None:
        return False
    text = step[1].strip().lower()
    if text in _SLURM_PSEUDO_STEP_NAMES:
        return False
    try:
        return int(text) < _SLURM_PSEUDO_STEP_MIN
    except ValueError:
        raise LaunchError(f"{step[0]}={step[1]!r} is not an integer step id") from None


def _pick_launcher(env: Mapping[str, str]) -> str:
    """Precedence: torchrun, then MPI, then slurm, then single.

    torchrun wins because ``torchrun`` inside an sbatch allocation (or under ``srun``) is common,
    and then the SLURM variables describe the allocation while ``RANK``/``WORLD_SIZE`` describe the
    workers.  MPI comes next for the same reason (``mpiexec`` inside an allocation inherits the
    batch script's SLURM variables).  Open MPI is checked before MPICH because its ``OMPI_``
    variables cannot come from anything else.
    """
    if _first(env, ("RANK", "WORLD_SIZE")) is not None:
        return "torchrun"
    if _first(env, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")) is not None:
        return "openmpi"
    if _first(env, ("PMI_RANK", "PMI_SIZE")) is not None:
        return "mpich"
    if _is_srun_task(env):
        return "slurm"
    return "single"


def _validate(launcher: str, fields: Mapping[str, Any], reader: _Reader) -> None:
    """Check the invariants every consumer relies on, naming the variables that break them."""
    for field in ("rank", "world_size", "local_rank", "local_world_size", "node_rank",
                  "restart_count"):
        value = fields[field]
        if not isinstance(value, int) or isinstance(value, bool):
            raise LaunchError(f"{reader.label(field)}={value!r} is not an integer")
        if value < 0:
            raise LaunchError(f"{reader.label(field)}={value} is negative")
    rank, ws = fields["rank"], fields["world_size"]
    lr, lws, node = fields["local_rank"], fields["local_world_size"], fields["node_rank"]
    if ws < 1:
        raise LaunchError(f"{reader.label('world_size')}={ws} must be at least 1")
    if rank >= ws:
        raise LaunchError(f"{reader.label('rank')}={rank} is not below "
                          f"{reader.label('world_size')}={ws}")
    if lws < 1:
        raise LaunchError(f"{reader.label('local_world_size')}={lws} must be at least 1")
    if lr >= lws:
        raise LaunchError(f"{reader.label('local_rank')}={lr} is not below "
                          f"{reader.label('local_world_size')}={lws}")
    if lws > ws:
        raise LaunchError(f"{reader.label('local_world_size')}={lws} exceeds "
                          f"{reader.label('world_size')}={ws}")
    if lr > rank:
        raise LaunchError(
            f"{reader.label('local_rank')}={lr} exceeds {reader.label('rank')}={rank}")
    if node >= ws:
        raise LaunchError(f"{reader.label('node_rank')}={node} is not below "
                          f"{reader.label('world_size')}={ws}")


_last_logged: LaunchInfo | None = None


def _log_once(info: LaunchInfo) -> None:
    """Log the detection result once per process (again only if it changes).

    One line at start-up answers "which launcher did it think this was" in every bug report
    without flooding logs when the detection is repeated by several components.
    """
    global _last_logged
    if info == _last_logged:
        return
    _last_logged = info
    logger.info(
        "dist_hooks launch: %s, rank %d/%d (local %d/%d, node %d), job_id=%s, restart_count=%d",
        info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size,
        info.node_rank, info.job_id, info.restart_count)


def detect_launch(
    env: Mapping[str, str] | None = None,
    *,
    launcher: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    node_rank: int | None = None,
    job_id: str | None = None,
) -> LaunchInfo:
    """Work out this process's place in the job from the launcher's environment variables.

    Args:
        env: the environment to read; ``os.environ`` when ``None`` (a dict makes tests and
            "what would rank 3 see" questions easy).
        launcher: force one launcher's variables instead of auto-detection (one of
            :data:`LAUNCHERS`).  Without it the precedence is torchrun, MPI (Open MPI, then MPICH),
            srun task, single process; see :func:`_pick_launcher` for why.
        rank, world_size, local_rank, local_world_size, node_rank, job_id: explicit values that
            override (and need not be backed by) the environment, for launchers we do not know.

    A Slurm batch script or ``salloc`` shell is *not* treated as a Slurm launch: without an
    ``srun`` step id (``SLURM_STEP_ID``) the process is a single process even when
    ``SLURM_NTASKS`` says 8, because the other 7 tasks do not exist until ``srun`` starts them.

    Raises:
        LaunchError: partial variables (``RANK`` without ``WORLD_SIZE``), non-integer or negative
            values, a rank not below the world size, a local rank not below the local world size,
            or an unknown ``launcher``.  The message names the variables.
    """
    source: Mapping[str, str] = os.environ if env is None else env
    if launcher is not None and launcher not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}")
    overrides = {"rank": rank, "world_size": world_size, "local_rank": local_rank,
                 "local_world_size": local_world_size, "node_rank": node_rank}
    for name, value in overrides.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise LaunchError(f"{name} (argument)={value!r} is not an integer")
    chosen = launcher if launcher is not None else _pick_launcher(source)
    reader = _Reader(source, overrides)
    fields = _READERS[chosen](source, reader)
    if job_id is not None:
        fields["job_id"] = job_id
    _validate(chosen, fields, reader)
    info = LaunchInfo(
        launcher=chosen,
        rank=fields["rank"],
        world_size=fields["world_size"],
        local_rank=fields["local_rank"],
        local_world_size=fields["local_world_size"],
        node_rank=fields["node_rank"],
        job_id=fields["job_id"],
        restart_count=fields["restart_count"],
    )
    _log_once(info)
    return info
