"""The demo, with the coordinator SIGKILLed just before it writes ``run.json`` of boundary N.

Usage: ``demo_killed_before_commit.py N <demo options>``. Installs the test seam
``Coordinator.before_commit`` (production code calls it and does nothing else).
"""
import os
import signal
import sys

from dist_hooks.coordinator import Coordinator
from dist_hooks.demo.__main__ import main

KILL_AT = int(sys.argv.pop(1))


def _die_before(index: int) -> None:
    if index == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    Coordinator.before_commit = _die_before
    sys.exit(main())
