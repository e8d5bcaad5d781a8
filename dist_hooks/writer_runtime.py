"""The stream-async engine under every recording hook.

Why it looks like this (figures in docs/performance.md and ../shared/design/performance.md): moving
bytes off the GPU is cheap, CPU work on the simulation thread is not. So the simulation thread only
*issues* device work (a reduction into a device ring, one staging copy, one device-to-host copy
into a reused pinned buffer on a side CUDA stream) and records an event; a single background
writer thread per process waits on that event and encodes in bulk. Nothing here synchronises the
host with the device on the simulation thread.

Pieces:
- ``Streams``: the side stream of the device-to-host copies and the orderings that keep sources
  safe (the copy waits for the compute stream; the compute stream waits for a copy only before
  it overwrites that copy's source).
- ``HostBufferPool``: a bounded set of (pinned) host buffers, allocated once and reused; taking one
  blocks while all are in flight, which is the back-pressure that bounds memory when the disk is slow.
- ``WriterThread`` / ``Channel``: the per-process writer and each hook's view of it: ordered jobs, an
  error kept and re-raised in the caller at the next call or at ``drain()``.
"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from contextlib import nullcontext
from typing import Any, Callable

import torch

from .errors import RecorderError

log = logging.getLogger("dist_hooks")


class Streams:
    """Side-stream handling for one hook on one device; a no-op on CPU tensors.

    A firing issues its device work (LoggingHook's reduction into its ring, a snapshot's one
    staging ``cat``) on the compute stream, where it is ordered with the simulation's kernels by
    the stream itself: no wait either way, and an in-place update in the next step queues behind
    the read. Only the device-to-host copy goes to the side stream (``copying()``), after one
    device-side wait for the compute stream's work so far; the compute stream never waits for the
    copy, except before it overwrites a buffer a copy may still read (``compute_waits``). The
    source of a copy is kept alive until its event completed (``protect``, or the writer job
    holding it).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device=device) if self.cuda else None

    def copying(self):
        """The context of a device-to-host copy: on CUDA the side stream, which first waits
        (device-side, no host sync) for what the compute stream issued so far."""
        if not self.cuda:
            return nullcontext()
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.side)

    def compute_waits(self, event: "torch.cuda.Event | None") -> None:
        """Make the compute stream wait (device-side, no host sync) for ``event`` of the side
        stream: before it overwrites a buffer a side-stream copy may still be reading."""
        if self.cuda and event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def protect(self, t: torch.Tensor) -> torch.Tensor:
        """Mark a compute-stream allocation as used by the side stream, so the caching allocator
        does not hand its memory out again before the side stream's pending work on it is done."""
        if self.cuda:
            t.record_stream(self.side)
        return t

    def event(self) -> "torch.cuda.Event | None":
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.side)
        return ev


class HostBufferPool:
    """Up to ``slots`` host buffers of at least ``nbytes`` each, pinned when the source is on CUDA.

    Allocated lazily and reused; a buffer too small for a request is replaced by a larger one (the
    pool grows by size, never by count). ``acquire`` blocks while all buffers are with the writer.
    """

    def __init__(self, slots: int, pinned: bool):
        self.slots = slots
        self.pinned = pinned and torch.cuda.is_available()
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(slots):
            self._free.put(None)
        self.allocations = 0  # count of real allocations, for tests and stats

    def acquire(self, nbytes: int, check: Callable[[], None] | None = None) -> torch.Tensor:
        while True:
            try:
                buf = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                if check is not None:
                    check()  # a dead writer must not block us forever
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
            self.allocations += 1
        return buf

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class _Job:
    __slots__ = ("channel", "fn", "event")

    def __init__(self, channel: "Channel", fn: Callable[[], None], event: Any):
        self.channel, self.fn, self.event = channel, fn, event


class WriterThread:
    """The one background writer of this process. Jobs run in submission order.

    The queue is bounded (``maxsize``): a full queue blocks the submitting thread, which keeps host
    memory bounded when the disk cannot keep up instead of buffering without limit.
    """

    _instance: "WriterThread | None" = None
    _lock = threading.Lock()

    def __init__(self, maxsize: int = 16):
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=maxsize)
        self.thread = threading.Thread(target=self._run, name="dist_hooks-writer", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> "WriterThread":
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = WriterThread()
            return cls._instance

    def submit(self, job: _Job) -> None:
        self.queue.put(job)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            ch = job.channel
            try:
                if ch.error is None:  # after a failure, later jobs of that hook are dropped
                    if job.event is not None:
                        job.event.synchronize()
                    job.fn()
            except BaseException as exc:  # noqa: BLE001 - kept and re-raised in the caller
                ch.error = exc
            finally:
                ch._done()


class Channel:
    """One hook's ordered connection to the writer: submit, drain, and error propagation."""

    def __init__(self, name: str):
        self.name = name
        self.error: BaseException | None = None
        self._pending = 0
        self._cv = threading.Condition()
        self._writer = WriterThread.get()

    def check(self) -> None:
        """Re-raise a writer error in the calling thread (once, then keep the hook failed)."""
        if self.error is not None:
            err = self.error
            raise RecorderError(f"{self.name}: background writer failed: {type(err).__name__}: {err}") from err

    def submit(self, fn: Callable[[], None], event: Any = None) -> None:
        self.check()
        with self._cv:
            self._pending += 1
        self._writer.submit(_Job(self, fn, event))

    def _done(self) -> None:
        with self._cv:
            self._pending -= 1
            self._cv.notify_all()

    @property
    def pending(self) -> int:
        return self._pending

    def drain(self) -> None:
        """Wait until every submitted job of this channel ran; re-raise a writer error."""
        with self._cv:
            while self._pending:
                self._cv.wait(timeout=1.0)
        self.check()


_open_hooks: "weakref.WeakSet[Any]" = weakref.WeakSet()
_exit_registered = False


def register_for_exit(hook: Any) -> None:
    """Close ``hook`` at interpreter exit if nobody did: the last resort for engines (like
    nvalchemi's distributed pipeline) that never enter or close their hooks.

    Registered lazily, at the first hook's start, with the hooks that run when the main thread ends
    (``threading._register_atexit``, last-in first-out): those run *before* ``atexit`` handlers, and
    thread pools — zarr's I/O among them — shut down there, after which nothing could be written.
    """
    global _exit_registered
    _open_hooks.add(hook)
    if not _exit_registered:
        _exit_registered = True
        register = getattr(threading, "_register_atexit", None)
        try:
            register(_close_open_hooks) if register is not None else atexit.register(_close_open_hooks)
        except RuntimeError:  # interpreter already shutting down
            atexit.register(_close_open_hooks)


def _close_open_hooks() -> None:
    for hook in list(_open_hooks):
        try:
            hook.close()
        except Exception as exc:  # noqa: BLE001 - nothing better to do at exit than say so
            log.error("dist_hooks: closing %r at exit failed: %s", hook, exc)
