"""The demo, held before one step until a file appears: a job that is certainly still running
while another one starts on its directory (no race with how long the demo takes).

Usage: ``demo_held.py STEP RELEASE_FILE <demo options>``. At BEFORE_STEP of ``STEP`` the job waits
for ``RELEASE_FILE`` to exist (at most 120 s, then it goes on, so it never hangs a test).
"""
import os
import sys
import time

import dist_hooks.demo.__main__ as demo
from dist_hooks.stages import Stage

HOLD_AT = int(sys.argv.pop(1))
RELEASE = sys.argv.pop(1)


class Hold:
    frequency = 1
    stage = Stage.BEFORE_STEP

    def __call__(self, ctx, stage=None):
        if ctx.step_count == HOLD_AT:
            deadline = time.monotonic() + 120
            while not os.path.exists(RELEASE) and time.monotonic() < deadline:
                time.sleep(0.05)


_build = demo.build_hooks


def build_hooks(args, run):
    return [Hold(), *_build(args, run)]


if __name__ == "__main__":
    demo.build_hooks = build_hooks
    sys.exit(demo.main())
