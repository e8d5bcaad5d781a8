"""Choosing the communicator that fits the launch (``get_communicator``)."""
from __future__ import annotations

import importlib.util
import logging
import sys

from ..errors import LaunchError
from ..launch import LaunchInfo, detect_launch
from .base import DEFAULT_TIMEOUT, Communicator
from .mpi import MPICommunicator
from .single import SingleCommunicator
from .torch_store import TorchCommunicator

logger = logging.getLogger("dist_hooks")

_KINDS = ("auto", "torch", "mpi", "single")


def _torch_initialized() -> bool:
    """True when a default process group exists.  Never imports torch: if nothing imported
    ``torch.distributed`` yet, no process group can exist (and MPI jobs skip a slow import)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _auto_kind(launch: LaunchInfo) -> str:
    if _torch_initialized():
        return "torch"
    if launch.world_size == 1:
        return "single"
    if launch.launcher in ("mpich", "openmpi") and importlib.util.find_spec("mpi4py") is not None:
        return "mpi"
    return "torch"


def get_communicator(kind: str = "auto", launch: LaunchInfo | None = None, *,
                     timeout: float = DEFAULT_TIMEOUT, device: str | None = None) -> Communicator:
    """Make the communicator that fits this launch.

    Args:
        kind: ``"auto"``, ``"torch"``, ``"mpi"`` or ``"single"``.  ``"auto"`` picks torch when a
            default process group is already initialised (reuse what the user set up), single for
            a world of one, mpi under mpiexec when mpi4py is importable (no ports to agree on),
            and torch otherwise (torchrun, srun).
        launch: the launch description; detected from the environment when ``None``.
        timeout: default per-call timeout in seconds.
        device: ``"cuda"`` / ``"cuda:N"`` makes a process group this call creates use NCCL for
            CUDA tensors (coordination itself always goes through the store); ignored otherwise.

    Raises:
        ValueError: unknown ``kind``, or ``"single"`` in a world of more than one process (every
            rank would believe it is rank 0 and they would overwrite each other's files).
    """
    kind = kind.lower()
    if kind not in _KINDS:
        raise ValueError(f"unknown communicator kind {kind!r}; expected one of {', '.join(_KINDS)}")
    reuse_pg = kind == "auto" and _torch_initialized()
    if kind in ("auto", "single") and launch is None and not reuse_pg:
        launch = detect_launch()
    if kind == "auto":
        kind = _auto_kind(launch) if launch is not None else "torch"
    if kind == "single":
        if launch is not None and launch.world_size != 1:
            raise ValueError(f"kind='single' in a world of {launch.world_size} processes "
                             f"({launch.launcher}); use 'auto', 'torch' or 'mpi'")
        comm: Communicator = SingleCommunicator(timeout=timeout)
    elif kind == "torch":
        comm = TorchCommunicator(launch, timeout=timeout, device=device)
    else:
        comm = MPICommunicator(timeout=timeout)
        if launch is not None and (launch.rank, launch.world_size) != (comm.rank, comm.world_size):
            raise LaunchError(f"MPI.COMM_WORLD is rank {comm.rank}/{comm.world_size} but the "
                               f"launch info says {launch.rank}/{launch.world_size}")
    logger.info("dist_hooks: %s communicator, rank %d/%d", comm.name, comm.rank, comm.world_size)
    return comm
