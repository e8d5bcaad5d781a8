"""``dist-hooks`` on untrusted run files: seeded mutations of a real run's ``run.json`` and
boundary files (keys deleted, types swapped, negative and huge numbers, ``..`` and absolute
paths, names with ``/``) never produce a traceback, an undocumented exit status, a file outside
the run and the ``--out`` directory, or a consolidated output that differs from the untouched
run's while claiming success.

The run is the format-v1 fixture (a real 2-rank torchrun run, killed, with CSV logs, snapshots
and converged records); commands run in-process through ``dist_hooks.cli.main`` (fast), a few
as real subprocesses.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mp.runner import REPO_ROOT
from dist_hooks.cli import main

DATA = REPO_ROOT / "tests" / "data"
N_MUTATIONS = 90
VALUES = [None, "", "abc", 0, -1, 1 << 70, -(1 << 70), 1.5, [], {}, True, "../../../victim",
          "/etc/passwd", "a/b", "..", "logs/../../x.csv", "line\nbreak", 10 ** 6, [1, 2], {"a": 1}]
NAMES = ["../../../victim", "a/b", ".hidden", "", "..", "/abs", "x\\y", "ok_name"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, dict]:
    """The unpacked fixture and the digest of its consolidated data (what success must give)."""
    base = tmp_path_factory.mktemp("fuzz-base")
    with tarfile.open(DATA / "v1_killed_run.tar.gz") as tar:
        tar.extractall(base, filter="data")
    run = base / "run"
    rc, _, err = cli("consolidate", run, "--out", base / "ref", "--progress", "never")
    assert rc == 0, err
    return run, data_digest(base / "ref")


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def data_digest(out: Path) -> dict[str, str]:
    """sha256 of every data file of a consolidated output (its summary aside)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "consolidated.json"}


def tree(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root`` outside ``skip``."""
    out = {}
    for base, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(base, d) not in skip]
        for f in files:
            p = Path(base, f)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _slots(obj, path=()):
    """Every (container, key) of a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield obj, k
            yield from _slots(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield obj, i
            yield from _slots(v, path + (i,))


def mutate(doc, rng: random.Random) -> str:
    """One random mutation of ``doc`` in place; returns what it did."""
    slots = list(_slots(doc))
    # favour what names and points at files: hooks, paths, groups, states, ranks
    hot = [s for s in slots if isinstance(s[0], dict) and (
        s[1] in ("path", "group", "file", "hooks", "state", "rank", "world_size", "ranks")
        or "hooks" in s[0] or "rank-" in str(s[0].get("path", "")))]
    c, k = rng.choice(hot if hot and rng.random() < 0.6 else slots)
    op = rng.randrange(4)
    if op == 0 and isinstance(c, dict):
        del c[k]
        return f"del {k!r}"
    if op == 1 and isinstance(c, dict):
        new = rng.choice(NAMES)
        c[new] = c.pop(k)
        return f"rename {k!r} -> {new!r}"
    if op == 2 and isinstance(c[k], (int, str)) and not isinstance(c[k], bool):
        v = c[k]
        c[k] = str(v) if isinstance(v, int) else (len(v) if rng.random() < 0.5 else [v])
        return f"swap type of {k!r}"
    c[k] = copy.deepcopy(rng.choice(VALUES))
    return f"set {k!r} = {c[k]!r}"


def _apply(run: Path, rng: random.Random) -> str:
    """Mutate run.json, its last boundary file (alone or with it), or an earlier one."""
    m = json.loads((run / "run.json").read_text())
    last_file = run / m["boundaries"][-1]["file"]
    where = rng.random()
    if where < 0.5:  # run.json and the last boundary file alike: run-wide checks see no difference
        what = mutate(m["last"], rng)
        (run / "run.json").write_text(json.dumps(m, indent=1))
        last_file.write_text(json.dumps(m["last"], indent=1))
        return f"run.json+last boundary: {what}"
    if where < 0.8:
        what = mutate(m, rng)
        (run / "run.json").write_text(json.dumps(m, indent=1))
        return f"run.json: {what}"
    f = run / m["boundaries"][rng.randrange(len(m["boundaries"]))]["file"]
    b = json.loads(f.read_text())
    what = mutate(b, rng)
    f.write_text(json.dumps(b, indent=1))
    return f"{f.name}: {what}"


@pytest.mark.parametrize("chunk", range(3))
def test_mutated_run_files_never_crash_or_escape(base_run, tmp_path, chunk):
    src, want = base_run
    rng = random.Random(1200 + chunk)
    (tmp_path / "victim.csv").write_text("keep me\n")
    for i in range(N_MUTATIONS // 3):
        case = tmp_path / f"case-{i}"
        run, out = case / "run", case / "out"
        shutil.copytree(src, run)
        what = _apply(run, rng)
        before = tree(tmp_path, (run, out))
        results = {}
        for cmd in (("verify", run), ("info", run, "--no-disk"),
                    ("consolidate", run, "--out", out, "--progress", "never")):
            rc, stdout, err = cli(*cmd)
            assert rc in (0, 1, 2), (what, cmd[0], rc, err)
            assert "Traceback" not in err, (what, cmd[0], err)
            if rc:  # verify reports on stdout, the others on stderr
                assert (err if cmd[0] != "verify" else stdout).strip(), (what, cmd[0])
            results[cmd[0]] = rc
        assert tree(tmp_path, (run, out)) == before, (what, "files changed outside run and out")
        if results["consolidate"] == 0:  # success must mean the run's data, unchanged
            assert data_digest(out) == want, (what, results)
        else:
            assert not out.exists(), (what, "a refused consolidate left an output")
        shutil.rmtree(case)


def test_mutations_as_real_processes(base_run, tmp_path):
    """A few of the same through the installed entry point: status and stderr as a shell sees
    them (one line, no traceback)."""
    src, _ = base_run
    rng = random.Random(7)
    for i in range(3):
        run = tmp_path / f"case-{i}" / "run"
        shutil.copytree(src, run)
        m = json.loads((run / "run.json").read_text())
        m["last"]["ranks"][0]["hooks"][rng.choice(NAMES[:3])] = {"path": "/etc/passwd",
                                                                "bytes": -1}
        (run / "run.json").write_text(json.dumps(m))
        for cmd in ("verify", "info", "consolidate"):
            p = subprocess.run([sys.executable, "-m", "dist_hooks.cli", cmd, str(run)],
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 1, (cmd, p.stderr)
            assert "Traceback" not in p.stderr
            if cmd != "verify":
                assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (run / "consolidated").exists()
