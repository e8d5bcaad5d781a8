"""Where ranks meet to create a process group: the ``init_method`` URL for each launcher.

Parsing the Slurm node list and picking a free port live here too; only
:class:`~dist_hooks.comm.torch_store.TorchCommunicator` uses them, when it creates the process
group itself.
"""
from __future__ import annotations

import importlib.util
import re
import socket
from typing import Mapping

from ..errors import LaunchError
from ..launch import LaunchInfo


def free_port() -> int:
    """An ephemeral TCP port that is free right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def first_slurm_node(nodelist: str) -> str:
    """First host of a compressed Slurm node list: ``"gpu[003-010,12],cpu1"`` -> ``"gpu003"``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # first top-level comma ends the first item
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    host = nodelist[:end].strip()
    while "[" in host:  # replace each bracket group by its first element, keeping zero padding
        host = re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", host, count=1)
    return host


def rendezvous_url(launch: LaunchInfo, env: Mapping[str, str]) -> tuple[str, str]:
    """Choose the ``init_method`` URL (and a description) for ``init_process_group``.

    * ``MASTER_ADDR`` and ``MASTER_PORT`` set (torchrun always sets them): ``env://``, which also
      honours torchrun's agent-hosted store (``TORCHELASTIC_USE_AGENT_STORE``).
    * one process: loopback and a free port.
    * MPI launchers: rank 0 picks a free port on its host and broadcasts host and port over mpi4py
      (``MPI.COMM_WORLD``), so nothing has to be configured.
    * Slurm without both: the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (where
      task 0 runs) and a port derived from the job and step ids (20000-39999), the convention
      most Slurm recipes use; ``MASTER_ADDR`` or ``MASTER_PORT`` set alone replaces its half.  No
      MPI is initialised under srun, where PMI may be missing.  Two jobs sharing a first node
      collide only when their ids collide modulo 20000; set ``MASTER_PORT`` to rule it out.
    """
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return "env://", f"env:// ({env['MASTER_ADDR']}:{env['MASTER_PORT']})"
    if launch.world_size == 1:
        url = f"tcp://127.0.0.1:{free_port()}"
        return url, url
    if launch.launcher in ("mpich", "openmpi"):
        if importlib.util.find_spec("mpi4py") is None:
            raise LaunchError(
                f"launcher {launch.launcher!r}: MASTER_ADDR/MASTER_PORT are not set and mpi4py is "
                "not installed to agree on them; set both, or install mpi4py")
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if world.Get_size() != launch.world_size or world.Get_rank() != launch.rank:
            raise LaunchError(
                f"MPI.COMM_WORLD is rank {world.Get_rank()}/{world.Get_size()} but the launch "
                f"environment says {launch.rank}/{launch.world_size}")
        address = None
        if world.Get_rank() == 0:
            one_node = launch.local_world_size == launch.world_size
            host = "127.0.0.1" if one_node else socket.gethostname()
            address = (host, free_port())
        host, port = world.bcast(address, root=0)
        url = f"tcp://{host}:{port}"
        return url, f"{url} (chosen by rank 0, sent over MPI)"
    if launch.launcher == "slurm":
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
            or env.get("SLURM_NODELIST") or ""
        if not nodelist and not env.get("MASTER_ADDR"):
            raise LaunchError("slurm launch without MASTER_ADDR and without SLURM_STEP_NODELIST / "
                               "SLURM_JOB_NODELIST: set MASTER_ADDR and MASTER_PORT")
        host = env.get("MASTER_ADDR") or first_slurm_node(nodelist)
        job = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
        step = int(re.sub(r"\D", "", env.get("SLURM_STEP_ID", "0")) or 0)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else \
            20000 + (job * 131 + step) % 20000
        url = f"tcp://{host}:{port}"
        return url, f"{url} (first node of the Slurm step, port from the job id)"
    raise LaunchError(f"launcher {launch.launcher!r} with {launch.world_size} ranks: set "
                       "MASTER_ADDR and MASTER_PORT")
