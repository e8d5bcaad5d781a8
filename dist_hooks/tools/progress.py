"""The progress bar the tools draw on stderr (only on a terminal, unless forced), through tqdm."""
from __future__ import annotations

import sys
import threading
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Bytes done of ``total``, as one tqdm line on ``stream`` (stderr by default).

    Why a wrapper and not tqdm itself: the tools share one small interface (``update(n)``,
    ``set_label``, ``close``, a settable ``total``) that their worker threads call at once, so
    updates take a lock (tqdm's counter is not thread-safe); a total of 0 means *not known yet*
    (drawn as a count, never as "100 % of 0"); and the bar never passes 100 %: a total that
    proves short (an estimate) grows to what was done. ``enabled=None``: draw only when the
    stream is a terminal, so batch jobs' logs and pipes get no stream of carriage returns.
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool | None = None,
                 stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = bool(enabled)
        self.done = 0
        self.label = label
        self._total = max(int(total), 0)
        self._lock = threading.Lock()
        self._bar = tqdm(total=self._total or None, desc=label, file=self.stream,
                         disable=not self.enabled, mininterval=interval, miniters=1,
                         unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                         leave=True)

    @property
    def total(self) -> int:
        """Bytes expected (0: not known yet). Settable, e.g. once the inputs are opened."""
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        with self._lock:
            self._total = max(int(value), self.done, 0)
            self._bar.total = self._total or None
            self._bar.refresh()

    def set_label(self, label: str) -> None:
        with self._lock:
            self.label = label
            self._bar.set_description_str(label, refresh=True)

    def update(self, n: int) -> None:
        """Thread-safe: consolidate's worker threads report as they go."""
        with self._lock:
            self.done += int(n)
            if self._total and self.done > self._total:  # an estimate fell short: stay <= 100 %
                self._total = self.done
                self._bar.total = self._total
            self._bar.update(int(n))

    def close(self) -> None:
        with self._lock:
            self._bar.close()
