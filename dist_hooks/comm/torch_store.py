"""Collectives over the c10d key-value store of the default ``torch.distributed`` process group.

torch is imported only when a :class:`TorchCommunicator` is made, so MPI jobs and readers never
pay for it.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import time
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import CommTimeoutError
from ..launch import LaunchInfo, detect_launch
from .base import DEFAULT_TIMEOUT, PICKLE_PROTOCOL, Communicator, timeout_error
from .rendezvous import rendezvous_url

logger = logging.getLogger("dist_hooks")

# Polling back-off: start fast so that a collective whose ranks are all present costs about one
# round trip, cap low enough that a late rank adds at most this much latency, and high enough that
# hundreds of waiting ranks do not flood the store server or burn the cores the simulation needs.
_POLL_MIN = 0.0005
_POLL_MAX = 0.02

_instance_ids = itertools.count()


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
    Every rank should :meth:`close` it: without the agent, rank 0's close waits for the others so
    that its store outlives their last call (see ``_close_impl``).
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
        url, described = rendezvous_url(launch, os.environ)
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
        raise timeout_error(self.rank, op, timeout, missing)

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
    def _barrier_impl(self, timeout: float) -> None:
        deadline, seq = time.monotonic() + timeout, self._next()
        with self._guard("barrier", timeout):
            self._arrive(seq, b"")
            self._await_all(seq, "barrier", timeout, deadline)
            self._release(seq, self.world_size,
                          self._data_keys(seq) + [f"{seq}/n", f"{seq}/done"])

    def _gather_impl(self, obj: Any, root: int, timeout: float) -> list | None:
        deadline, seq = time.monotonic() + timeout, self._next()
        payload = b"" if self.rank == root else pickle.dumps(obj, PICKLE_PROTOCOL)
        with self._guard("gather", timeout):
            self._arrive(seq, payload)
            if self.rank != root:
                return None
            self._await_all(seq, "gather", timeout, deadline)
            others = [r for r in range(self.world_size) if r != root]
            values = self._store.multi_get([f"{seq}/d/{r}" for r in others])
            for key in self._data_keys(seq) + [f"{seq}/n", f"{seq}/done"]:
                self._store.delete_key(key)
        result: list[Any] = [None] * self.world_size
        for r, value in zip(others, values):
            result[r] = pickle.loads(value)
        result[root] = obj
        return result

    def _broadcast_impl(self, obj: Any, root: int, timeout: float) -> Any:
        deadline, seq = time.monotonic() + timeout, self._next()
        key = f"{seq}/d/{root}"
        if self.rank == root:
            payload = pickle.dumps(obj, PICKLE_PROTOCOL)
            with self._guard("broadcast", timeout):
                self._store.set(key, payload)
            return obj
        with self._guard("broadcast", timeout):
            if not self._wait_key(key, deadline):
                raise timeout_error(self.rank, "broadcast", timeout, [root])
            value = self._store.get(key)
            self._release(seq, self.world_size - 1, [key])
        return pickle.loads(value)

    def _close_impl(self) -> None:
        """Stop using the store; destroy the process group if this communicator created it.

        When the store server lives in rank 0's own process (no torchrun agent), rank 0 waits (up
        to the default timeout) until every rank has closed, because a rank 0 that exits first
        takes the store down under peers still finishing their last call.  So every rank should
        close its communicator.  Rank 0 skips the wait once one of its calls has timed out (the
        peers it would wait for are likely gone).
        """
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
