"""One writer per run directory, with real processes: two jobs on one directory, a SIGKILLed
holder, a torchrun job whose directory another process holds.

The lock is rank 0's ``flock`` on ``RUN/.run.lock`` (``RunStorage.lock``); the kernel releases it
when the holder dies, and every rank of a refused job learns of the refusal from the first
broadcast of ``Run.__init__``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mp.runner import REPO_ROOT, clean_env, run_command, run_torchrun, torchrun_available
from dist_hooks.store.storage import LocalRunStorage

HELD = str(REPO_ROOT / "tests" / "mp" / "demo_held.py")
ENTRY = str(REPO_ROOT / "tests" / "mp" / "demo_entry.py")
DEMO = ["--steps", "60", "--systems-per-rank", "3", "--min-atoms", "8", "--max-atoms", "14",
        "--checkpoint-every", "10", "--snapshot-every", "10", "--quiet"]


def verify(run) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "dist_hooks.cli", "verify", str(run)], timeout=120)


def _wait_first_exit(procs: list[subprocess.Popen], seconds: float) -> subprocess.Popen | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                return p
        time.sleep(0.05)
    return None


def test_two_jobs_started_together_one_is_refused_naming_the_holder(tmp_path):
    run, release = tmp_path / "dual", tmp_path / "release"
    cmd = [sys.executable, HELD, "30", str(release), "--out", str(run), *DEMO]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(), cwd=str(REPO_ROOT), start_new_session=True)
             for _ in range(2)]
    try:
        # the holder waits at step 30 until released, so the other certainly meets its lock
        loser = _wait_first_exit(procs, 150)
        assert loser is not None, "neither job ended"
        winner = procs[1 - procs.index(loser)]
        out, err = loser.communicate()
        assert loser.returncode != 0, out + err
        assert "LockHeldError" in err, err[-3000:]
        assert f"pid {winner.pid}" in err and socket.gethostname() in err, err[-3000:]
        assert winner.poll() is None  # still held: the refusal did not wait for it
        release.touch()
        out, err = winner.communicate(timeout=180)
        assert winner.returncode == 0, err[-3000:]
    finally:
        release.touch()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    res = verify(run)
    assert res.returncode == 0, res.stdout + res.stderr
    csv = (run / "logs" / "log" / "rank-00000.csv").read_text().splitlines()
    assert sum(1 for line in csv if line.startswith('"step"')) == 1  # one writer, one header
    assert json.loads((run / "run.json").read_text())["last"]["all_final"]


def test_sigkilled_job_leaves_no_lock_behind(tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, ENTRY, "--out", str(run), *DEMO]
    first = run_command([*cmd, "--fail-at-step", "25"], timeout=150)
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), first.stderr[-2000:]
    holder = json.loads((run / ".run.lock").read_text())  # the dead job's name is still in it
    assert holder["host"] == socket.gethostname() and isinstance(holder["pid"], int)
    again = run_command(cmd, timeout=150)
    assert again.returncode == 0, again.stderr[-3000:]
    m = json.loads((run / "run.json").read_text())
    assert m["last"]["all_final"] and m["boundaries"][-1]["steps"] == [60, 60]
    res = verify(run)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(not torchrun_available(), reason="torch.distributed unavailable")
def test_torchrun_job_on_a_held_directory_fails_on_every_rank(tmp_path):
    run = tmp_path / "held"
    run.mkdir()
    lock = LocalRunStorage(run).lock({"host": socket.gethostname(), "pid": os.getpid(),
                                      "job_id": "other-job-77", "launcher": "test"})
    try:
        # a boundary timeout far longer than the job's deadline: a rank left waiting would show
        # as a timed-out job (124) or a CommTimeoutError, never as a prompt refusal
        res = run_torchrun(ENTRY, 2, ["--out", str(run), *DEMO, "--timeout", "300"], timeout=120)
    finally:
        lock.release()
    text = res.stdout + res.stderr
    assert res.returncode not in (0, 124), text[-4000:]
    assert "CommTimeoutError" not in text, text[-4000:]
    # rank 0 raises it itself, rank 1 as rank 0 sent it: both name the holder
    assert text.count("LockHeldError: ") >= 2 and "LockHeldError: rank 0: " in text, text[-4000:]
    assert "other-job-77" in text and f"pid {os.getpid()}" in text
    assert sorted(p.name for p in run.iterdir()) == [".run.lock"]  # nothing else touched
