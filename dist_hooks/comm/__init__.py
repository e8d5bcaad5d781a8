"""Small-object collectives (barrier, gather, broadcast) that fail loudly, never hang.

The coordinator exchanges metadata at checkpoint boundaries: per-rank manifests, committed
lengths, decisions.  Those exchanges happen exactly when jobs die (pre-emption, OOM, node loss),
so the one property that matters more than speed is that a rank which died or never arrived makes
the others raise :class:`CommTimeoutError` naming it, within the timeout, instead of hanging until
the scheduler kills the job and the last boundary is lost.

Library collectives (``dist.gather_object``, ``MPI_Gather``) cannot give that: they block without a
deadline (NCCL/MPI) or time out without saying who is missing (gloo).  So the collectives here are
built from primitives that let us watch each rank separately:

* :class:`TorchCommunicator` (``torch_store.py``) runs over the c10d key-value store of the
  process group (a TCPStore), with one key per rank and call, and polls for them against a
  deadline.  It never touches NCCL, so it is safe in NCCL jobs and does not need a separate gloo
  group; objects go through the store's server, which is fine for metadata (a few MB still works).
  ``rendezvous.py`` finds the address when it has to create the process group itself.
* :class:`MPICommunicator` (``mpi.py``) uses non-blocking point-to-point messages on a private
  duplicate of the communicator, polled against a deadline.
* :class:`SingleCommunicator` (``single.py``) is the trivial world of one.

:class:`Communicator` (``base.py``) is the interface; :func:`get_communicator` (``factory.py``)
picks the one that fits the launch.  All ranks must make the same sequence of calls (same
operations, same roots), as with any collective.  Objects must be picklable; they are meant to be
small JSON-able metadata.  Communicators are not thread-safe: call them from one thread per
process.
"""
from __future__ import annotations

from ..errors import CommTimeoutError
from .base import DEFAULT_TIMEOUT, Communicator
from .factory import get_communicator
from .mpi import MPICommunicator
from .single import SingleCommunicator
from .torch_store import TorchCommunicator

__all__ = [
    "DEFAULT_TIMEOUT",
    "CommTimeoutError",
    "Communicator",
    "MPICommunicator",
    "SingleCommunicator",
    "TorchCommunicator",
    "get_communicator",
]
