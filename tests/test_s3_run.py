"""Runs recorded straight to an S3-compatible object store (a real SeaweedFS server on loopback):
2-rank torchrun jobs, a SIGKILL at a random step, a kill between the ranks' writes and the commit,
a second writer, bad credentials and a dead endpoint.

Every run is compared with the same demo recorded on local disk: the objects are downloaded with
plain obstore (tests/support/s3_download.py, not the package's reader) and checked with the same
helpers as the on-disk crash tests.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mp.runner import REPO_ROOT, clean_env, run_command
from s3_download import download_run, object_keys
from test_coordinator import (DEMO, ENTRY, KILLED_BEFORE_COMMIT, assert_committed_prefix_equals,
                              assert_merged_is_union, assert_runs_equal, launch, manifest)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun jobs on Linux")


def s3_launch(server, n: int, url: str, extra=(), crash: bool = False, entry: str = ENTRY,
              entry_args=(), env: dict | None = None):
    """``launch`` (tests/test_coordinator.py) of the demo with ``--out`` an s3:// URL; the
    credentials and endpoint reach the ranks only through the AWS_* environment."""
    return launch("torchrun", n, url, extra, env=env or server.env, crash=crash, entry=entry,
                  entry_args=entry_args)


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    """The uninterrupted 2-rank demo on local disk (the reference of every run here)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = launch("torchrun", 2, out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert assert_merged_is_union(out) > 0
    return out


def cli(server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "dist_hooks.cli", *args], timeout=timeout,
                       env=clean_env(server.env))


def assert_no_local_files() -> None:
    """Nothing of an s3:// run was written under the working directory as a path."""
    assert not (REPO_ROOT / "s3:").exists()


def test_two_rank_run_on_the_store_equals_the_run_on_disk(s3_server, local_ref, tmp_path):
    url = s3_server.new_url("torchrun")
    res = s3_launch(s3_server, 2, url)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert_no_local_files()
    keys = object_keys(s3_server, url)
    assert "run.json" in keys and any(k.startswith("logs/log/rank-00001.csv/part-") for k in keys)
    assert ".run.lock" in keys and json.loads(
        _get(s3_server, url, ".run.lock"))["released"]  # the lease given back at the end
    got = download_run(s3_server, url, tmp_path / "down")
    assert_runs_equal(got, local_ref)
    assert_merged_is_union(got)
    # the tools on the URL: verify, and consolidate equal to consolidating the local run
    v = cli(s3_server, "verify", url)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    for where, out in ((url, tmp_path / "c-s3"), (str(local_ref), tmp_path / "c-local")):
        c = cli(s3_server, "consolidate", where, "--out", str(out))
        assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-2000:]
    _assert_same_tree(tmp_path / "c-s3", tmp_path / "c-local")


def _assert_same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name in ("consolidated.json", "info.json"):
            continue  # they name their source (a URL or a path) and when they were made
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _get(server, url: str, key: str) -> bytes:
    import obstore
    from s3_download import raw_store

    return bytes(obstore.get(raw_store(server, url), key).bytes())


def test_sigkill_of_a_rank_at_a_random_step_then_resume(s3_server, local_ref, tmp_path):
    seed = int(os.environ.get("DIST_HOOKS_KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    step, rank = rng.randrange(5, 155), rng.randrange(2)
    why = f"seed {seed}: rank {rank} killed at step {step}"
    url = s3_server.new_url("killed")
    crashed = s3_launch(s3_server, 2, url, ["--fail-at-step", str(step), "--fail-rank", str(rank)],
                        crash=True)
    assert crashed.returncode not in (0, 124), why
    v = cli(s3_server, "verify", url)
    assert v.returncode == 0, (why, v.stdout[-2000:], v.stderr[-2000:])  # committed data intact
    got = download_run(s3_server, url, tmp_path / "crashed")
    m = manifest(got)
    if m.get("last"):
        assert max(s for s in m["last"]["steps"] if s is not None) <= step, why
        assert_committed_prefix_equals(got, local_ref)
    resumed = s3_launch(s3_server, 2, url)
    assert resumed.returncode == 0, (why, resumed.stdout[-2000:], resumed.stderr[-3000:])
    done = download_run(s3_server, url, tmp_path / "resumed")
    assert_runs_equal(done, local_ref)
    assert_merged_is_union(done)
    c = cli(s3_server, "consolidate", url, "--out", str(tmp_path / "c-s3"))
    r = cli(s3_server, "consolidate", str(local_ref), "--out", str(tmp_path / "c-local"))
    assert c.returncode == 0 and r.returncode == 0, (why, c.stderr[-2000:], r.stderr[-2000:])
    _assert_same_tree(tmp_path / "c-s3", tmp_path / "c-local")


def test_kill_between_the_ranks_writes_and_the_commit_keeps_the_previous_boundary(
        s3_server, local_ref, tmp_path):
    url = s3_server.new_url("before-commit")
    # rank 0 dies after every rank sent its commit record of boundary 2 (step 75), before run.json
    res = s3_launch(s3_server, 2, url, crash=True, entry=KILLED_BEFORE_COMMIT, entry_args=["2"])
    assert res.returncode != 0
    got = download_run(s3_server, url, tmp_path / "crashed")
    m = manifest(got)
    assert [b["index"] for b in m["boundaries"]] == [0, 1] and m["last"]["steps"] == [50, 50]
    assert "boundaries/b-000002.json" in object_keys(s3_server, url)  # written, never committed
    assert_committed_prefix_equals(got, local_ref)
    resumed = s3_launch(s3_server, 2, url)  # the dead rank 0's lease is taken over at once
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert_runs_equal(download_run(s3_server, url, tmp_path / "resumed"), local_ref)


def test_a_second_job_on_the_same_url_is_refused(s3_server, tmp_path):
    url = s3_server.new_url("held")
    release = tmp_path / "release"
    held = [sys.executable, str(REPO_ROOT / "tests" / "mp" / "demo_held.py"), "30", str(release),
            "--out", url, *DEMO]
    first = subprocess.Popen(held, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=clean_env(s3_server.env), cwd=str(REPO_ROOT))
    try:
        deadline = time.monotonic() + 90
        while "run.json" not in object_keys(s3_server, url) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run_command([sys.executable, ENTRY, "--out", url, *DEMO], timeout=90,
                             env=clean_env(s3_server.env))
        assert second.returncode != 0
        assert "being recorded by another job" in second.stderr, second.stderr[-2000:]
        release.touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


@pytest.mark.parametrize("what", ["bad credentials", "unreachable endpoint"])
def test_bad_credentials_and_a_dead_endpoint_fail_at_start(s3_server, what):
    env = dict(s3_server.env)
    if what == "bad credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        expect = "access denied"
    else:
        import socket

        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        expect = "cannot reach the object store"
    t0 = time.monotonic()
    res = run_command([sys.executable, ENTRY, "--out", s3_server.new_url("refused"), *DEMO],
                      timeout=90, env=clean_env(env))
    assert res.returncode != 0 and expect in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert env["AWS_SECRET_ACCESS_KEY"] not in res.stderr + res.stdout
    assert time.monotonic() - t0 < 60  # at start, not after retrying for minutes
