"""A run recorded, and killed, by the code of format v1 (commit 8a61768) still verifies, resumes
and consolidates to exactly what that code made of it.

``tests/data/v1_killed_run.tar.gz``: a 2-rank torchrun demo whose rank 1 was SIGKILLed before step
130 (boundaries up to step 125 committed, uncommitted rows after them). The expected digests were
computed beside that code by ``tests/data/make_v1_fixture.sh`` with :mod:`run_digest`.
"""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from mp.runner import REPO_ROOT, clean_env, run_command
from consolidated_ref import assert_merged_checksums
from run_digest import tree_digest

DATA = REPO_ROOT / "tests" / "data"
ENTRY = str(REPO_ROOT / "tests" / "mp" / "demo_entry.py")
DEMO = ["--steps", "160", "--relax-steps", "110", "--systems-per-rank", "6", "--min-atoms", "8",
        "--max-atoms", "20", "--checkpoint-every", "25", "--snapshot-every", "10", "--quiet"]


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((DATA / "v1_killed_run.expected.json").read_text())


def unpack(tmp_path: Path, name: str) -> Path:
    with tarfile.open(DATA / "v1_killed_run.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    run = tmp_path / name
    (tmp_path / "run").rename(run)
    return run


def cli(*args: str):
    return run_command([sys.executable, "-m", "dist_hooks.cli", *args], timeout=120)


def test_v1_run_verifies(tmp_path, expected):
    run = unpack(tmp_path, "killed")
    res = cli("verify", "--json", str(run))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert {"ok": report["ok"], "checked": report["checked"]} == expected["verify"]


def test_v1_run_consolidates_as_before(tmp_path, expected):
    run = unpack(tmp_path, "killed")
    res = cli("consolidate", "--progress", "never", str(run))
    assert res.returncode == 0, res.stdout + res.stderr
    assert tree_digest(run / "consolidated") == expected["killed_consolidated"]


def test_v1_run_resumes_and_consolidates_as_before(tmp_path, expected):
    run = unpack(tmp_path, "resumed")
    # the torch reductions v1 had: the fused kernel adds each atom's squares in its own order,
    # which rounds some temperatures differently in the last digits (rel. ~1e-9), and this test
    # compares the resumed logs byte for byte
    res = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node=2", ENTRY, "--out", str(run), *DEMO, "--timeout", "90",
                       "--reductions", "eager"],
                      timeout=150, env=clean_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    res = cli("consolidate", "--progress", "never", str(run))
    assert res.returncode == 0, res.stdout + res.stderr
    # the merged group's checksums, which v1 did not record, are taken at the resume
    assert_merged_checksums(run)
    got = tree_digest(run)
    want = expected["resumed_run"]
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
