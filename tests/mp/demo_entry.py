"""Run ``python -m dist_hooks.demo`` as a script (for torchrun/mpiexec launches in tests)."""
import sys

from dist_hooks.demo.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
