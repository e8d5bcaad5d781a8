"""LoggingHook's CSV as a live reader sees it: the header at the first firing, rows within
``flush_interval``, never a partial row; and a resumed log keeps one header and its checksum."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
import zlib

import pandas as pd
import pytest

from dist_hooks.hooks import LoggingHook
from dist_hooks.stages import Stage

from batches import Ctx, make_batch, perturb

COLUMNS = ["step", "rank", "sample_id", "graph_idx", "status", "energy", "fmax", "temperature"]

#: polls a CSV with pandas until told to stop; imports pandas only (not dist_hooks). Each poll
#: reads the bytes once and parses exactly those, so what it reports is what pandas got.
POLLER = textwrap.dedent("""
    import hashlib, io, json, os, sys, time
    import pandas as pd
    path, stop = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    seen = []
    while True:
        last = os.path.exists(stop)  # one more poll after the stop: it sees what close wrote
        t = time.time()
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = None
        if data is not None:
            poll = {"t": t, "bytes": len(data), "sha": hashlib.sha256(data).hexdigest(),
                    "whole": data.endswith(b"\\n")}
            try:
                df = pd.read_csv(io.BytesIO(data))
                poll.update(rows=len(df), columns=list(df.columns),
                            steps=sorted(set(df["step"].tolist())),
                            nan=int(df[["energy", "fmax", "temperature"]].isna().sum().sum()))
            except Exception as exc:
                poll["error"] = f"{type(exc).__name__}: {exc}"
            seen.append(poll)
        if last:
            break
        time.sleep(0.02)
    print(json.dumps(seen), flush=True)
""")


def test_live_reader_sees_rows_within_flush_interval(tmp_path):
    B, interval, margin = 4, 1.0, 3.0
    path = tmp_path / "log.rank-00000.csv"
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", POLLER, str(path), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline().strip() == "ready"
        # ring_size 64 > 30 firings: without flush_interval nothing but the header before close
        hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0, flush_interval=interval)
        b = make_batch([3, 5, 2, 7], seed=3)
        done_at = {}
        for step in range(30):
            perturb(b, step)
            hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
            done_at[step] = time.time()
            time.sleep(0.2)
        # rows ship at firings: the last interval's rows come with close, as a run ends
        closed_at = time.time()
        hook.close()
        stop.touch()
        out, _ = poller.communicate(timeout=60)
    finally:
        stop.touch()
        if poller.poll() is None:
            poller.kill()
    polls = json.loads(out)
    final = path.read_bytes()
    assert polls, "the reader never found the file"
    assert not [p for p in polls if "error" in p], [p for p in polls if "error" in p][:3]
    rows = [p["rows"] for p in polls]
    assert rows == sorted(rows)  # never decreasing
    for p in polls:
        assert p["columns"] == COLUMNS
        assert p["whole"] and p["rows"] % B == 0 and p["nan"] == 0, p
        assert hashlib.sha256(final[:p["bytes"]]).hexdigest() == p["sha"]  # a prefix of the file
        assert p["steps"] == list(range(len(p["steps"])))  # whole firings, in order
    for step, t in done_at.items():
        first = next((p["t"] for p in polls if step in p["steps"]), None)
        assert first is not None, f"step {step} never seen"
        assert first - t <= interval + margin, (step, first - t)
        # a firing at least an interval later came for these: they were shipped by it, not by close
        assert step > 15 or first < closed_at, f"step {step} only visible after close"


def test_header_written_at_first_firing_before_any_row(tmp_path):
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0, frequency=10, flush_interval=None)
    path = tmp_path / "log.rank-00000.csv"
    b = make_batch([2, 3], seed=4)
    for step in range(5):  # fires at step 0 only; its rows stay in the ring (interval disabled)
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
    deadline = time.time() + 10
    while not (path.exists() and path.stat().st_size) and time.time() < deadline:
        time.sleep(0.01)
    df = pd.read_csv(path)  # parses: no EmptyDataError
    assert list(df.columns) == COLUMNS and len(df) == 0
    hook.close()
    df = pd.read_csv(path)
    assert df["step"].tolist() == [0, 0]


def test_first_firing_rows_written_at_once(tmp_path):
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0, frequency=10)  # default interval
    path = tmp_path / "log.rank-00000.csv"
    b = make_batch([2, 3, 1], seed=5, first_id=40)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    deadline = time.time() + 10
    while time.time() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 4):
        time.sleep(0.01)
    df = pd.read_csv(path)
    assert df["sample_id"].tolist() == [40, 41, 42]
    hook.close()


def header_only_commit(tmp_path):
    """A log whose first firing's rows never came: sync commits the header alone."""
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0, flush_interval=None,
                       custom_scalars={"bad": lambda b, dyn: 1 / 0})
    b = make_batch([2, 3], seed=6)
    with pytest.raises(ZeroDivisionError):
        hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    point = hook.sync()
    hook.close()
    return point


def test_header_only_commit_and_resume_keep_one_header(tmp_path):
    point = header_only_commit(tmp_path)
    path = tmp_path / "log.rank-00000.csv"
    header = path.read_bytes()
    assert header == ",".join(f'"{c}"' for c in COLUMNS + ["bad"]).encode() + b"\n"
    assert (point["bytes"], point["rows"], point["crc32"]) == (len(header), 0, zlib.crc32(header))
    with open(path, "ab") as fh:  # what a crash left after the boundary: cut back on resume
        fh.write(b"9,0,1,1,0,1.5,2.5,3.5,7\n")
    # the resumed run: same columns, one header, the rows after it
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0,
                       custom_scalars={"bad": lambda b, dyn: 7.0})
    hook.bind(rank=0, resume_point=point)
    b = make_batch([2, 3], seed=6)
    for step in range(3):
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
    again = hook.sync()
    hook.close()
    data = path.read_bytes()
    assert data.startswith(header) and data.count(b'"step"') == 1
    df = pd.read_csv(path)
    assert df["step"].tolist() == [0, 0, 1, 1, 2, 2] and set(df["bad"]) == {7.0}
    assert (again["bytes"], again["rows"], again["crc32"]) == (len(data), 6, zlib.crc32(data))


def test_resume_from_nothing_committed_writes_the_header_once(tmp_path):
    path = tmp_path / "log.rank-00000.csv"
    path.write_bytes(b'"step","rank"\n1,0\n')  # written after the run's last boundary: not committed
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    hook.bind(rank=0, resume_point={})
    hook(Ctx(make_batch([2], seed=7), step_count=0), Stage.AFTER_STEP)
    hook.close()
    data = path.read_bytes()
    assert data.count(b'"step"') == 1
    assert list(pd.read_csv(path).columns) == COLUMNS and len(pd.read_csv(path)) == 1


def test_flush_interval_is_checked():
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="flush_interval"):
            LoggingHook(backend="custom", writer_fn=print, flush_interval=bad)
    assert LoggingHook(backend="custom", writer_fn=print, flush_interval=0).flush_interval is None
