"""Small-object collectives (barrier, gather, allgather, broadcast) that fail loudly, never hang.

The coordinator exchanges metadata at checkpoint boundaries: per-rank manifests, committed
lengths, decisions.  Those exchanges happen exactly when jobs die (pre-emption, OOM, node loss),
so the one property that matters more than speed is that a rank which died or never arrived makes
the others raise :class:`CommTimeoutError` naming it, within the timeout, instead of hanging until
the scheduler kills the job and the last boundary is lost.

Library collectives (``dist.gather_object``, ``MPI_Gather``) cannot give that: they block without a
deadline (NCCL/MPI) or time out without saying who is missing (gloo).  So the collectives here are
built from primitives that let us watch each rank separately:

* :class:`TorchCommunicator` runs over the c10d key-value store of the process group (a TCPStore),
  with one key per rank and call, and polls for them against a deadline.  It never touches NCCL,
  so it is safe in NCCL jobs and does not need a separate gloo group; objects go through the
  store's server, which is fine for metadata (a few MB still works).
* :class:`MPICommunicator` uses non-blocking point-to-point messages (``Isend`` + ``Improbe``) on
  a private duplicate of the communicator, polled against a deadline.
* :class:`SingleCommunicator` is the trivial world of one.

All ranks must make the same sequence of calls (same operations, same roots), as with any
collective.  Objects must be picklable; they are meant to be small JSON-able metadata.
Communicators are not thread-safe: call them from one thread per process.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import pickle
import re
import socket
import struct
import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from .errors import CommTimeoutError
from .launch import LaunchInfo, detect_launch

__all__ = [
    "CommTimeoutError",
    "Communicator",
    "MPICommunicator",
    "SingleCommunicator",
    "TorchCommunicator",
    "get_communicator",
]

logger = logging.getLogger("dist_hooks")

DEFAULT_TIMEOUT = 300.0
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Polling back-off: start fast so that a collective whose ranks are all present costs about one
# round trip, cap low enough that a late rank adds at most this much latency, and high enough that
# hundreds of waiting ranks do not flood the store server or burn the cores the simulation needs.
_POLL_MIN = 0.0005
_POLL_MAX = 0.02
# MPI polling is local (no server to protect), so it can afford a tighter cap.
_MPI_POLL_MIN = 0.0001
_MPI_POLL_MAX = 0.01


def _timeout_error(rank: int, op: str, timeout: float, missing: Sequence[int],
                   detail: str = "") -> CommTimeoutError:
    missing = sorted(missing)
    who = f"ranks {missing}" if missing else "other ranks (which ones is unknown)"
    message = f"rank {rank}: timed out after {timeout:.1f} s in {op!r} waiting for {who}"
    if detail:
        message += f" ({detail})"
    return CommTimeoutError(message, missing, rank=rank, op=op, timeout=timeout)


class Communicator(ABC):
    """Collectives over small Python objects with a per-call deadline.

    Attributes:
        rank: this process's rank in the communicator.
        world_size: number of ranks.
        name: implementation (``"single"``, ``"torch"``, ``"mpi"``), for logs and manifests.
        timeout: seconds a call waits when it is given ``timeout=None``.
    """

    name: str = "abstract"

    def __init__(self, rank: int, world_size: int, timeout: float = DEFAULT_TIMEOUT):
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.timeout = float(timeout)
        self._closed = False

    # -- public API ------------------------------------------------------------------------------
    @abstractmethod
    def barrier(self, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier; CommTimeoutError otherwise."""

    @abstractmethod
    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        """Collect one object per rank on ``root``: a list by rank there, ``None`` elsewhere.

        Non-root ranks return as soon as their object is posted (as with MPI); only the root
        waits, so only the root detects missing ranks.  The root's own entry is ``obj`` itself;
        the others are unpickled copies.
        """

    @abstractmethod
    def allgather(self, obj: Any, timeout: float | None = None) -> list:
        """Every rank gets the list of all ranks' objects, indexed by rank."""

    @abstractmethod
    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        """Return ``root``'s ``obj`` on every rank (other ranks' ``obj`` is ignored).

        The root returns as soon as the object is posted; the other ranks wait for it.
        """

    @abstractmethod
    def close(self) -> None:
        """Release resources; further calls raise.  Idempotent."""

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        """True on rank 0, the conventional coordinator."""
        return self.rank == 0

    def _timeout(self, timeout: float | None) -> float:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if timeout is None:
            return self.timeout
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        return float(timeout)

    def _check_root(self, root: int) -> int:
        if not isinstance(root, int) or isinstance(root, bool) or not 0 <= root < self.world_size:
            raise ValueError(f"root must be a rank in [0, {self.world_size}), got {root!r}")
        return root

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, "
                f"timeout={self.timeout})")


class SingleCommunicator(Communicator):
    """World of one process: every collective is the identity, nothing can go missing."""

    name = "single"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(0, 1, timeout)

    def barrier(self, timeout: float | None = None) -> None:
        self._timeout(timeout)

    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        self._timeout(timeout)
        self._check_root(root)
        return [obj]

    def allgather(self, obj: Any, timeout: float | None = None) -> list:
        self._timeout(timeout)
        return [obj]

    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        self._timeout(timeout)
        self._check_root(root)
        return obj

    def close(self) -> None:
        self._closed = True


# =============================================================================== torch.distributed

_instance_ids = itertools.count()


def _free_port() -> int:
    """An ephemeral TCP port that is free right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _first_slurm_node(nodelist: str) -> str:
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


def _rendezvous(launch: LaunchInfo, env: Mapping[str, str]) -> tuple[str, str]:
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
        url = f"tcp://127.0.0.1:{_free_port()}"
        return url, url
    if launch.launcher in ("mpich", "openmpi"):
        if importlib.util.find_spec("mpi4py") is None:
            raise RuntimeError(
                f"launcher {launch.launcher!r}: MASTER_ADDR/MASTER_PORT are not set and mpi4py is "
                "not installed to agree on them; set both, or install mpi4py")
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if world.Get_size() != launch.world_size or world.Get_rank() != launch.rank:
            raise RuntimeError(
                f"MPI.COMM_WORLD is rank {world.Get_rank()}/{world.Get_size()} but the launch "
                f"environment says {launch.rank}/{launch.world_size}")
        address = None
        if world.Get_rank() == 0:
            one_node = launch.local_world_size == launch.world_size
            host = "127.0.0.1" if one_node else socket.gethostname()
            address = (host, _free_port())
        host, port = world.bcast(address, root=0)
        url = f"tcp://{host}:{port}"
        return url, f"{url} (chosen by rank 0, sent over MPI)"
    if launch.launcher == "slurm":
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
            or env.get("SLURM_NODELIST") or ""
        if not nodelist and not env.get("MASTER_ADDR"):
            raise RuntimeError("slurm launch without MASTER_ADDR and without SLURM_STEP_NODELIST / "
                               "SLURM_JOB_NODELIST: set MASTER_ADDR and MASTER_PORT")
        host = env.get("MASTER_ADDR") or _first_slurm_node(nodelist)
        job = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
        step = int(re.sub(r"\D", "", env.get("SLURM_STEP_ID", "0")) or 0)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else \
            20000 + (job * 131 + step) % 20000
        url = f"tcp://{host}:{port}"
        return url, f"{url} (first node of the Slurm step, port from the job id)"
    raise RuntimeError(f"launcher {launch.launcher!r} with {launch.world_size} ranks: set "
                       "MASTER_ADDR and MASTER_PORT")


class TorchCommunicator(Communicator):
    """Collectives over the c10d store of the default process group.

    Reuses the default process group when one is initialised (so it composes with the user's own
    ``init_process_group``); otherwise initialises it from the launch environment (gloo on CPU;
    ``cpu:gloo,cuda:nccl`` when ``device`` is a CUDA device, so that the user's tensor collectives
    run on NCCL) and destroys it on :meth:`close`.

    Protocol, per call ``n`` (keys live under a prefix private to this communicator, on a cloned
    store connection so that a long wait never blocks the process group's own use of the store):
    each participating rank sets ``n/d/<rank>`` (its payload, or empty) and increments ``n/n``; the
    rank that brings the count to the world size sets ``n/done``.  Waiters poll ``n/done`` (or, for
    broadcast, ``n/d/<root>``) with a short back-off until the deadline; on timeout the per-rank
    keys tell exactly which ranks are missing.  Readers increment ``n/m`` and the last reader
    deletes the call's keys, so the store does not grow.

    Losing the store server (it lives in rank 0's process, or in node 0's torchrun agent under
    torchrun) is reported as :class:`CommTimeoutError` naming rank 0 as soon as the connection
    breaks.  Under torchrun a rank that *exits with an error* makes the agent stop all workers, so
    the timeout path is for ranks that hang, exit cleanly too early, or die on other launchers.
    """

    name = "torch"

    def __init__(self, launch: LaunchInfo | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 device: str | None = None, namespace: str | None = None):
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        self._dist = dist
        self._owns_pg = False
        if not dist.is_initialized():
            launch = launch if launch is not None else detect_launch()
            self._init_process_group(launch, device)
            self._owns_pg = True
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if launch is not None and (launch.rank, launch.world_size) != (rank, world_size):
            raise RuntimeError(f"the default process group is rank {rank}/{world_size} but the "
                               f"launch info says {launch.rank}/{launch.world_size}")
        super().__init__(rank, world_size, timeout)
        restart = launch.restart_count if launch is not None else \
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        base = self._default_store()
        try:
            base = base.clone()
        except (RuntimeError, NotImplementedError, AttributeError):  # e.g. HashStore in tests
            pass
        # Creation order gives the namespace: every rank creates its communicators in the same
        # order (as with dist.new_group), so instance k on one rank talks to instance k elsewhere.
        ns = namespace if namespace is not None else str(next(_instance_ids))
        self._prefix = f"dist_hooks/comm/a{restart}/{ns}/"
        self._store = dist.PrefixStore(self._prefix, base)
        self._seq = 0
        self._failed = False  # a call on this rank timed out: peers may be gone
        self._agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        logger.debug("TorchCommunicator rank %d/%d, store prefix %s", rank, world_size,
                     self._prefix)

    # -- set-up ----------------------------------------------------------------------------------
    def _init_process_group(self, launch: LaunchInfo, device: str | None) -> None:
        import torch

        dist = self._dist
        backend = "gloo"
        if device is not None and str(device).startswith("cuda"):
            dev = torch.device(device)
            index = dev.index if dev.index is not None else \
                launch.local_rank % max(torch.cuda.device_count(), 1)
            torch.cuda.set_device(index)
            backend = "cpu:gloo,cuda:nccl"
        url, described = _rendezvous(launch, os.environ)
        logger.info("dist_hooks: init_process_group(%s) via %s, rank %d/%d", backend, described,
                    launch.rank, launch.world_size)
        dist.init_process_group(backend=backend, init_method=url, rank=launch.rank,
                                world_size=launch.world_size)

    def _default_store(self):
        c10d = self._dist.distributed_c10d
        getter = getattr(c10d, "_get_default_store", None)
        if getter is not None:
            return getter()
        return c10d._get_process_group_store(c10d._get_default_group())  # older torch

    # -- store helpers ---------------------------------------------------------------------------
    @contextmanager
    def _guard(self, op: str, timeout: float) -> Iterator[None]:
        """Turn a broken store connection into CommTimeoutError naming rank 0 (the store host)."""
        try:
            yield
        except CommTimeoutError:
            self._failed = True
            raise
        except (RuntimeError, ConnectionError, OSError) as exc:  # DistError is a RuntimeError
            self._failed = True
            raise CommTimeoutError(
                f"rank {self.rank}: lost the c10d store in {op!r} waiting for ranks [0] (the "
                f"store server runs with rank 0 / node 0's torchrun agent, which is presumably "
                f"gone): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                [0], rank=self.rank, op=op, timeout=timeout) from exc

    def _wait_key(self, key: str, deadline: float) -> bool:
        """Poll for ``key`` until ``deadline``; True when it exists."""
        store, delay = self._store, _POLL_MIN
        while True:
            if store.check([key]):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2.0, _POLL_MAX)

    def _arrive(self, seq: int, payload: bytes) -> None:
        self._store.set(f"{seq}/d/{self.rank}", payload)
        if self._store.add(f"{seq}/n", 1) == self.world_size:
            self._store.set(f"{seq}/done", b"1")

    def _await_all(self, seq: int, op: str, timeout: float, deadline: float) -> None:
        if self._wait_key(f"{seq}/done", deadline):
            return
        check = self._store.check
        missing = [r for r in range(self.world_size) if not check([f"{seq}/d/{r}"])]
        if not missing:
            # Everyone posted (a rank may have died between posting and counting): complete.
            self._store.set(f"{seq}/done", b"1")
            return
        raise _timeout_error(self.rank, op, timeout, missing)

    def _data_keys(self, seq: int) -> list[str]:
        return [f"{seq}/d/{r}" for r in range(self.world_size)]

    def _release(self, seq: int, readers: int, keys: list[str]) -> None:
        """Count this reader out; the last one deletes the call's keys."""
        if self._store.add(f"{seq}/m", 1) == readers:
            for key in keys:
                self._store.delete_key(key)
            self._store.delete_key(f"{seq}/m")

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    # -- collectives -----------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        t = self._timeout(timeout)
        if self.world_size == 1:
            return
        deadline, seq = time.monotonic() + t, self._next()
        with self._guard("barrier", t):
            self._arrive(seq, b"")
            self._await_all(seq, "barrier", t, deadline)
            self._release(seq, self.world_size,
                          self._data_keys(seq) + [f"{seq}/n", f"{seq}/done"])

    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        t = self._timeout(timeout)
        self._check_root(root)
        if self.world_size == 1:
            return [obj]
        deadline, seq = time.monotonic() + t, self._next()
        payload = b"" if self.rank == root else pickle.dumps(obj, _PICKLE_PROTOCOL)
        with self._guard("gather", t):
            self._arrive(seq, payload)
            if self.rank != root:
                return None
            self._await_all(seq, "gather", t, deadline)
            others = [r for r in range(self.world_size) if r != root]
            values = self._store.multi_get([f"{seq}/d/{r}" for r in others])
            for key in self._data_keys(seq) + [f"{seq}/n", f"{seq}/done"]:
                self._store.delete_key(key)
        result: list[Any] = [None] * self.world_size
        for r, value in zip(others, values):
            result[r] = pickle.loads(value)
        result[root] = obj
        return result

    def allgather(self, obj: Any, timeout: float | None = None) -> list:
        t = self._timeout(timeout)
        if self.world_size == 1:
            return [obj]
        deadline, seq = time.monotonic() + t, self._next()
        payload = pickle.dumps(obj, _PICKLE_PROTOCOL)
        with self._guard("allgather", t):
            self._arrive(seq, payload)
            self._await_all(seq, "allgather", t, deadline)
            others = [r for r in range(self.world_size) if r != self.rank]
            values = self._store.multi_get([f"{seq}/d/{r}" for r in others])
            self._release(seq, self.world_size,
                          self._data_keys(seq) + [f"{seq}/n", f"{seq}/done"])
        result: list[Any] = [None] * self.world_size
        for r, value in zip(others, values):
            result[r] = pickle.loads(value)
        result[self.rank] = obj
        return result

    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        t = self._timeout(timeout)
        self._check_root(root)
        if self.world_size == 1:
            return obj
        deadline, seq = time.monotonic() + t, self._next()
        key = f"{seq}/d/{root}"
        if self.rank == root:
            payload = pickle.dumps(obj, _PICKLE_PROTOCOL)
            with self._guard("broadcast", t):
                self._store.set(key, payload)
            return obj
        with self._guard("broadcast", t):
            if not self._wait_key(key, deadline):
                raise _timeout_error(self.rank, "broadcast", t, [root])
            value = self._store.get(key)
            self._release(seq, self.world_size - 1, [key])
        return pickle.loads(value)

    def close(self) -> None:
        """Stop using the store; destroy the process group if this communicator created it.

        When the store server lives in rank 0's own process (no torchrun agent), rank 0 waits (up
        to the default timeout) until every rank has closed, because a rank 0 that exits first
        takes the store down under peers still finishing their last call.  So every rank should
        close its communicator.  Rank 0 skips the wait once one of its calls has timed out (the
        peers it would wait for are likely gone).
        """
        if self._closed:
            return
        self._closed = True
        if self.world_size > 1:
            try:
                self._store.add("closed", 1)
                if self.rank == 0 and not self._agent_store and not self._failed:
                    deadline = time.monotonic() + self.timeout
                    delay = _POLL_MIN
                    while (count := self._store.add("closed", 0)) < self.world_size:
                        if time.monotonic() >= deadline:
                            logger.warning("dist_hooks: closing rank 0 after %.1f s with %d/%d "
                                           "ranks closed", self.timeout, count, self.world_size)
                            break
                        time.sleep(delay)
                        delay = min(delay * 2.0, _POLL_MAX)
            except RuntimeError as exc:  # the store is already gone: nothing left to protect
                logger.debug("dist_hooks: store unavailable while closing: %s", exc)
        if self._owns_pg and self._dist.is_initialized():
            self._dist.destroy_process_group()


# =============================================================================== mpi4py


class MPICommunicator(Communicator):
    """Collectives over mpi4py point-to-point messages with deadlines.

    Works on a private duplicate of ``comm`` (default ``MPI.COMM_WORLD``), so its messages can
    never match the application's; each call uses its own tag (the call number).  Objects are
    pickled once and sent as raw bytes.  Receivers *post* their receives (``Irecv``) and poll them
    with ``Testsome`` and a short back-off until the deadline, then name the ranks whose messages
    did not arrive.  (Polling ``Iprobe``/``Improbe`` instead was measured 20-100x slower with
    MPICH, which throttles progress in probes.)  A message is a header of at most
    ``_INLINE`` bytes (total length, and the payload when it fits), followed by the body as a
    second message when it does not, so receivers never need to know sizes in advance.

    Senders wait, within the call's deadline, until their sends complete: a large message only
    moves while the sender drives MPI progress, so a sender that returned to computing would
    stall its receivers.  Small sends complete at once; a large send to a rank that never arrives
    makes the sender time out naming that rank.

    Barrier and allgather are a gather to rank 0 followed by a release message from rank 0.  When
    rank 0 times out it sends the ranks that did arrive an abort naming the missing ranks, so every
    survivor reports the real culprit; non-root ranks wait a little longer than the timeout
    (10 % + 1 s, at most 30 s more) so that this report can reach them, and name rank 0 if nothing
    does.  Run under ``mpiexec -n N python -m mpi4py script.py`` so that an uncaught exception
    aborts the whole job.
    """

    name = "mpi"
    _INLINE = 4096  # below typical eager limits (UCX/shm ~4-8 kB): headers never need a rendezvous
    _HEADER = struct.Struct("<Q")

    def __init__(self, comm: Any = None, *, timeout: float = DEFAULT_TIMEOUT):
        from mpi4py import MPI

        self._MPI = MPI
        base = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(base.Get_rank(), base.Get_size(), timeout)
        # Idup rather than Dup: a rank that never constructs its communicator must not hang us.
        dup, request = base.Idup()
        done, _ = self._wait_some([request], time.monotonic() + self.timeout)
        if not done:
            raise _timeout_error(self.rank, "init", self.timeout, [],
                                 "not every rank created its MPICommunicator")
        self._comm = dup
        tag_ub = dup.Get_attr(MPI.TAG_UB)
        self._tag_ub = int(tag_ub) if tag_ub else 32767
        self._seq = 0
        # Requests abandoned at a timeout, with their buffers: kept alive until they complete
        # (MPI may still write into or read from the buffers).
        self._abandoned: list[tuple[Any, Any]] = []

    # -- polling primitives ----------------------------------------------------------------------
    def _wait_some(self, requests: list[Any], deadline: float) -> tuple[set[int], set[int]]:
        """Poll ``requests`` until all complete or ``deadline``: (done indices, pending indices)."""
        MPI = self._MPI
        pending, done = set(range(len(requests))), set()
        delay = _MPI_POLL_MIN
        while pending:
            indices = MPI.Request.Testsome(requests)
            if indices is None:  # every request inactive: nothing left to wait for
                break
            if indices:
                done.update(indices)
                pending.difference_update(indices)
                delay = _MPI_POLL_MIN
                continue
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2.0, _MPI_POLL_MAX)
        return done, pending

    def _abandon(self, requests: list[Any], buffers: list[Any], cancel: bool) -> None:
        for request, buffer in zip(requests, buffers):
            if request == self._MPI.REQUEST_NULL:
                continue
            if cancel:
                request.Cancel()
            self._abandoned.append((request, buffer))
        self._abandoned = [(r, b) for r, b in self._abandoned if not r.Test()]

    def _next_tag(self) -> int:
        self._seq += 1
        return self._seq % self._tag_ub

    # -- messages --------------------------------------------------------------------------------
    def _send(self, payload: bytes, dests: Sequence[int], tag: int, deadline: float) -> list[int]:
        """Send ``payload`` to each of ``dests``; return the ranks whose sends did not complete."""
        MPI, comm = self._MPI, self._comm
        header = self._HEADER.pack(len(payload))
        if len(payload) + self._HEADER.size <= self._INLINE:
            parts = [header + payload]
        else:
            parts = [header, payload]
        requests, owners, buffers = [], [], []
        for dest in dests:
            for part in parts:
                requests.append(comm.Isend([part, MPI.BYTE], dest=dest, tag=tag))
                owners.append(dest)
                buffers.append(part)
        _, pending = self._wait_some(requests, deadline)
        if not pending:
            return []
        self._abandon([requests[i] for i in pending], [buffers[i] for i in pending], cancel=False)
        return sorted({owners[i] for i in pending})

    def _recv(self, sources: Sequence[int], tag: int,
              deadline: float) -> tuple[dict[int, Any], list[int]]:
        """Receive one object with ``tag`` from each of ``sources`` until ``deadline``.

        Returns the objects by source and the sources that did not deliver.
        """
        MPI, comm = self._MPI, self._comm
        sources = list(sources)
        buffers = [bytearray(self._INLINE) for _ in sources]
        requests = [comm.Irecv([buf, MPI.BYTE], source=src, tag=tag)
                    for buf, src in zip(buffers, sources)]
        owners = list(sources)
        is_body = [False] * len(sources)
        got: dict[int, Any] = {}
        delay = _MPI_POLL_MIN
        outstanding = len(requests)
        while outstanding:
            indices = MPI.Request.Testsome(requests)
            if indices is None:
                break
            if indices:
                delay = _MPI_POLL_MIN
                for i in indices:
                    outstanding -= 1
                    src, buf = owners[i], buffers[i]
                    if is_body[i]:
                        got[src] = pickle.loads(buf)
                        continue
                    (length,) = self._HEADER.unpack_from(buf)
                    if length + self._HEADER.size <= self._INLINE:
                        got[src] = pickle.loads(memoryview(buf)[self._HEADER.size:
                                                                self._HEADER.size + length])
                    else:  # the body follows as a second message with the same tag
                        body = bytearray(length)
                        requests.append(comm.Irecv([body, MPI.BYTE], source=src, tag=tag))
                        buffers.append(body)
                        owners.append(src)
                        is_body.append(True)
                        outstanding += 1
                continue
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2.0, _MPI_POLL_MAX)
        missing = sorted(set(sources) - set(got))
        if missing:
            live = [i for i, r in enumerate(requests) if r != MPI.REQUEST_NULL]
            self._abandon([requests[i] for i in live], [buffers[i] for i in live], cancel=True)
        return got, missing

    def _gather_to(self, obj: Any, root: int, tag: int, op: str, timeout: float,
                   deadline: float, notify: bool) -> list | None:
        if self.rank != root:
            undelivered = self._send(pickle.dumps(obj, _PICKLE_PROTOCOL), [root], tag, deadline)
            if undelivered:
                raise _timeout_error(self.rank, op, timeout, undelivered)
            return None
        others = [r for r in range(self.world_size) if r != root]
        got, missing = self._recv(others, tag, deadline)
        if missing:
            error = _timeout_error(self.rank, op, timeout, missing)
            if notify and got:
                abort = pickle.dumps(("abort", error.missing_ranks, timeout), _PICKLE_PROTOCOL)
                self._send(abort, sorted(got), tag, time.monotonic() + self._grace(timeout))
            raise error
        got[root] = obj
        return [got[r] for r in range(self.world_size)]

    def _grace(self, timeout: float) -> float:
        return min(0.1 * timeout + 1.0, 30.0)

    def _gather_release(self, obj: Any, op: str, timeout: float, deliver: bool) -> Any:
        """Gather to rank 0, then rank 0 releases everyone (with the list when ``deliver``)."""
        start = time.monotonic()
        tag = self._next_tag()
        grace = self._grace(timeout)
        gathered = self._gather_to(obj, 0, tag, op, timeout, start + timeout, True)
        if self.rank == 0:
            release = pickle.dumps(("ok", gathered if deliver else None), _PICKLE_PROTOCOL)
            undelivered = self._send(release, range(1, self.world_size), tag,
                                     start + timeout + grace)
            if undelivered:
                raise _timeout_error(self.rank, op, timeout, undelivered,
                                     "they arrived but did not take the result")
            return gathered
        got, _ = self._recv([0], tag, start + timeout + grace)
        if 0 not in got:
            raise _timeout_error(self.rank, op, timeout, [0])
        reply = got[0]
        if reply[0] == "abort":
            raise _timeout_error(self.rank, op, reply[2], reply[1], "reported by rank 0")
        return reply[1]

    # -- collectives -----------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        t = self._timeout(timeout)
        if self.world_size > 1:
            self._gather_release(None, "barrier", t, deliver=False)

    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        t = self._timeout(timeout)
        self._check_root(root)
        if self.world_size == 1:
            return [obj]
        tag = self._next_tag()
        return self._gather_to(obj, root, tag, "gather", t, time.monotonic() + t, False)

    def allgather(self, obj: Any, timeout: float | None = None) -> list:
        t = self._timeout(timeout)
        if self.world_size == 1:
            return [obj]
        return self._gather_release(obj, "allgather", t, deliver=True)

    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        t = self._timeout(timeout)
        self._check_root(root)
        if self.world_size == 1:
            return obj
        deadline, tag = time.monotonic() + t, self._next_tag()
        if self.rank == root:
            others = [r for r in range(self.world_size) if r != root]
            undelivered = self._send(pickle.dumps(obj, _PICKLE_PROTOCOL), others, tag, deadline)
            if undelivered:
                raise _timeout_error(self.rank, "broadcast", t, undelivered)
            return obj
        got, missing = self._recv([root], tag, deadline)
        if missing:
            raise _timeout_error(self.rank, "broadcast", t, missing)
        return got[root]

    def close(self) -> None:
        """Free the private communicator.

        Requests abandoned at a timeout (to or from a rank that is gone) may never complete; then
        the communicator is left unfreed, since freeing it could block on them.
        """
        if self._closed:
            return
        self._closed = True
        self._abandoned = [(r, b) for r, b in self._abandoned if not r.Test()]
        if self._abandoned:
            logger.warning("dist_hooks: MPICommunicator closed with %d unfinished message(s)",
                           len(self._abandoned))
            return
        self._comm.Free()


# =============================================================================== factory

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
            raise RuntimeError(f"MPI.COMM_WORLD is rank {comm.rank}/{comm.world_size} but the "
                               f"launch info says {launch.rank}/{launch.world_size}")
    logger.info("dist_hooks: %s communicator, rank %d/%d", comm.name, comm.rank, comm.world_size)
    return comm
