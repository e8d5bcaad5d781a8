"""``dist-hooks`` whose consolidate is killed (SIGKILL) after N pieces of output are written.

Why a script: the test of a consolidate that dies midway needs a real process to die, and the
kill point is consolidate's test seam (``dist_hooks.tools.consolidate.on_window``), installed
here rather than by anything in the package.

Usage: ``python consolidate_killed.py N consolidate RUN [options]``
"""
import os
import signal
import sys
import threading

from dist_hooks.cli import main
from dist_hooks.tools import consolidate


def kill_after(n: int):
    """A callback that SIGKILLs this process on its ``n``-th call (from any thread)."""
    lock = threading.Lock()
    calls = 0

    def hit() -> None:
        nonlocal calls
        with lock:
            calls += 1
            if calls >= n:
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    return hit


if __name__ == "__main__":
    consolidate.on_window = kill_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
