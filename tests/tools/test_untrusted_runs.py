"""Run files that would corrupt a run, or mislead a tool, are refused: names and paths that
leave the run, a run inconsistent as a whole, values of the wrong type, a garbage Zarr root, an
unwritable output; each with its documented exit status and a one-line message, never a
traceback. Real ``dist-hooks`` processes on copies of a real 2-rank run (the format-v1 fixture)
and of a real single-process demo run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mp.runner import REPO_ROOT, clean_env, run_command
from dist_hooks import Run
from dist_hooks.errors import DamageError

DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("v1")
    with tarfile.open(DATA / "v1_killed_run.tar.gz") as tar:
        tar.extractall(base, filter="data")
    return base / "run"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    res = run_command([sys.executable, "-m", "dist_hooks.demo", "--out", str(run), "--steps", "40",
                       "--systems-per-rank", "4", "--checkpoint-every", "10", "--quiet"],
                      timeout=120, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def copy_run(src: Path, tmp_path: Path) -> Path:
    run = tmp_path / "work" / "run"
    shutil.copytree(src, run)
    return run


def edit(run: Path, fn, *, boundary: bool = True) -> None:
    """Apply ``fn`` to run.json's ``last`` entry (and to the last boundary file alike)."""
    m = json.loads((run / "run.json").read_text())
    fn(m)
    (run / "run.json").write_text(json.dumps(m, indent=1))
    if boundary:
        (run / m["boundaries"][-1]["file"]).write_text(json.dumps(m["last"], indent=1))


def dh(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_hooks.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_one_line(p: subprocess.CompletedProcess, rc: int, *words: str) -> None:
    assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def files_under(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. names and paths
def test_hook_name_with_dotdot_writes_nothing_outside_the_run(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)
    victim = tmp_path / "victim.csv"
    victim.write_text("keep me\n")

    def rename(m):
        for r in m["last"]["ranks"]:
            r["hooks"]["../../../victim"] = r["hooks"].pop("log")
    edit(run, rename)
    before = files_under(tmp_path)
    p = dh("verify", run)
    assert p.returncode == 1 and "../../../victim" in p.stdout and "DAMAGED" in p.stdout
    assert_one_line(dh("consolidate", run, "--progress", "never"), 1, "hook name",
                    "../../../victim")
    assert files_under(tmp_path) == before  # victim.csv unchanged, no victim.parquet
    assert not (tmp_path / "victim.parquet").exists()


def test_zarr_hook_name_with_dotdot_is_a_clean_error(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)

    def rename(m):
        m["last"]["ranks"][0]["hooks"]["../x"] = m["last"]["ranks"][0]["hooks"].pop("snapshots")
    edit(run, rename)
    p = dh("verify", run)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "../x" in p.stdout
    assert_one_line(dh("consolidate", run), 1, "../x")
    assert_one_line(dh("info", run), 1, "../x")


@pytest.mark.parametrize("key,value,words", [
    ("state", "/etc/passwd", ["state.path", "relative"]),
    ("state", "state/rank-00000/../../../x.pt", ["state.path"]),
    ("state", "state/rank-00001/b-000004.pt", ["state.path", "rank 0"]),   # another rank's
    ("group", "ranks/rank-00001/snapshots", ["group", "ranks/rank-00000/snapshots"]),
    ("csv", "../outside.csv", ["log.path"]),
    ("csv", "/tmp/abs.csv", ["log.path"]),
])
def test_paths_must_be_the_layouts(v1_run, tmp_path, key, value, words):
    run = copy_run(v1_run, tmp_path)

    def set_path(m):
        r0 = m["last"]["ranks"][0]
        if key == "state":
            r0["state"]["path"] = value
        elif key == "group":
            r0["hooks"]["snapshots"]["group"] = value
        else:
            r0["hooks"]["log"]["path"] = value
    edit(run, set_path)
    for cmd in ("verify", "consolidate", "info"):
        p = dh(cmd, run)
        if cmd == "verify":
            assert p.returncode == 1 and all(w in p.stdout for w in words), p.stdout
        else:
            assert_one_line(p, 1, *words)
    assert not (run / "consolidated").exists()


def test_boundary_file_path_must_be_the_layouts(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)
    m = json.loads((run / "run.json").read_text())
    m["boundaries"][2]["file"] = "../../etc/b.json"
    (run / "run.json").write_text(json.dumps(m))
    assert_one_line(dh("consolidate", run), 1, "boundaries[2].file", "boundaries/b-000002.json")


def test_absolute_state_path_is_refused_at_resume(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path)
    outside = tmp_path / "outside.pt"
    shutil.copy(next((run / "state" / "rank-00000").iterdir()), outside)

    def point_out(m):
        m["last"]["ranks"][0]["state"]["path"] = str(outside)
    edit(run, point_out)
    with pytest.raises(DamageError, match="state.path"):
        Run(run, state_fn=lambda: {}, handle_signals=False)


# ---------------------------------------------------------------- 2. run-wide checks
def test_rank_dropped_from_last_boundary_refuses_consolidate(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)
    edit(run, lambda m: m["last"]["ranks"].pop(1))  # run.json and boundary file agree
    p = dh("verify", run)
    assert p.returncode == 1 and "missing [1]" in p.stdout
    assert_one_line(dh("consolidate", run, "--progress", "never"), 1, "missing [1]")
    assert sorted(x.name for x in run.iterdir()) == ["boundaries", "data.zarr", "logs",
                                                     "run.json", "state"]  # nothing written
    assert_one_line(dh("consolidate", run, "--skip-damaged"), 1, "missing [1]")
    if _has("matplotlib"):  # the merging readers refuse the same way
        assert_one_line(dh("plot", run, "--out", tmp_path / "p.png"), 1, "missing [1]")
    if _has("ase"):
        assert_one_line(dh("export", run, "--what", "converged", "--format", "extxyz",
                           "--out", tmp_path / "c.xyz"), 1, "missing [1]")
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "c.xyz").exists()


def test_hook_dropped_at_the_last_boundary_refuses_consolidate(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)
    edit(run, lambda m: m["last"]["ranks"][1]["hooks"].pop("snapshots"))
    assert_one_line(dh("consolidate", run), 1, "rank 1 hook 'snapshots' missing")


def test_hooks_null_refuses_consolidate(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)

    def null(m):
        m["last"]["ranks"][0]["hooks"] = None
    for boundary in (False, True):
        edit(run, null, boundary=boundary)
        assert dh("verify", run).returncode == 1
        assert_one_line(dh("consolidate", run), 1, "hooks", "null")
        assert not (run / "consolidated").exists()


# ---------------------------------------------------------------- 3. CLI exit statuses
@pytest.mark.parametrize("mutation,words", [
    (lambda m: m["last"]["ranks"][0]["hooks"]["log"].update(bytes="abc"), ["bytes", '"abc"']),
    (lambda m: m.update(last=[]), ["last", "expected an object"]),
    (lambda m: m.update(world_size=1 << 80), ["world_size"]),
    (lambda m: m["last"]["ranks"][0]["hooks"]["log"].update(rows=-3), ["rows", "negative"]),
])
def test_wrong_types_exit_1_with_one_line(v1_run, tmp_path, mutation, words):
    run = copy_run(v1_run, tmp_path)
    edit(run, mutation, boundary=False)
    for cmd in ("consolidate", "info"):
        assert_one_line(dh(cmd, run), 1, *words)


def test_unwritable_output_exits_2_naming_the_path(v1_run, tmp_path):
    run = copy_run(v1_run, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line(dh("consolidate", run, "--out", blocker / "out"), 2, str(blocker))


# ---------------------------------------------------------------- 4. garbage Zarr root
def test_garbage_zarr_root_is_damage_for_verify_and_resume(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path)
    (run / "data.zarr" / "zarr.json").write_bytes(b"\x00garbage{")
    p = dh("verify", run)
    assert p.returncode == 1 and "data.zarr/zarr.json" in p.stdout, p.stdout
    assert_one_line(dh("consolidate", run), 1, "data.zarr/zarr.json")
    with pytest.raises(DamageError, match="data.zarr/zarr.json"):
        Run(run, handle_signals=False)


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None
