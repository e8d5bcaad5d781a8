"""Pre-emption: SIGTERM and SIGUSR1 noted, so that a run stops at its next boundary.

Why a module of its own: what a batch system sends before the time limit (Slurm's ``--signal``,
submitit) must neither kill the process mid-write nor be lost; the handler only notes the signal,
and ``Run`` turns the next boundary into the last one and raises :class:`Preempted`.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("dist_hooks")

#: the signals that ask a run to stop after its next boundary
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the final boundary that a SIGTERM/SIGUSR1 asked for; exit status 143."""

    def __init__(self, signum: int):
        super().__init__(143)
        self.signum = signum


class StopSignals:
    """Handlers of :data:`STOP_SIGNALS` that note the last one received (``received``), installed
    from the main thread only (elsewhere Python refuses handlers: nothing is installed), and the
    previous handlers put back by :meth:`restore`."""

    def __init__(self, who: str, what_next: str) -> None:
        self.received: int | None = None
        self._who, self._what_next = who, what_next
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._note)
            except (ValueError, OSError):
                pass

    def _note(self, signum: int, frame: Any) -> None:
        log.warning("%s: received signal %d; the run stops after the next %s", self._who, signum,
                    self._what_next)
        self.received = signum

    def restore(self) -> None:
        old, self._old = self._old, {}
        for sig, handler in old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
