"""The progress bar the tools draw on stderr (only on a terminal)."""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Why not tqdm: one more dependency for a single line; and the bar must stay silent in logs and
    pipes (batch jobs), where a stream of carriage returns is noise.
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool | None = None,
                 stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = max(int(total), 0)
        self.done = 0
        self.label = label
        self.interval = interval
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw(force=True)

    def update(self, n: int) -> None:
        """Thread-safe: consolidate's worker threads report as they go."""
        with self._lock:
            self.done += int(n)
            self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.done / max(now - self._t0, 1e-9) / 1e6
        width = 24
        fill = int(width * min(pct, 100.0) / 100.0)
        self.stream.write(f"\r{self.label[:28]:<28} [{'#' * fill}{'.' * (width - fill)}] "
                          f"{pct:5.1f}% {self.done / 1e6:8.1f}/{self.total / 1e6:.1f} MB "
                          f"{rate:7.1f} MB/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
