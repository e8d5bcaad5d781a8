"""``dist-hooks export`` and ``open_run(...).frames``: structures ASE reads back whole.

One small real demo run (one process: FIRE, then MD), kept as recorded (``raw``) and
consolidated (``cons``). Every export is read back with ASE's own readers (``ase.io.read``,
``ase.db.connect``, ``ase.io.Trajectory``) and compared with the records read with plain zarr,
and each structure's ``get_temperature()`` with the temperature the LoggingHook logged for that
system and step (read with pandas).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mp.runner import clean_env, run_command

from dist_hooks.cli import main

ase = pytest.importorskip("ase")
import ase.db  # noqa: E402
import ase.io  # noqa: E402
import ase.units  # noqa: E402
from ase.io.trajectory import Trajectory  # noqa: E402

DEMO = ["--steps", "60", "--relax-steps", "40", "--max-atoms", "16", "--fmax", "0.02",
        "--systems-per-rank", "4", "--snapshot-every", "5", "--checkpoint-every", "20", "--quiet"]
#: ASE's k_B (CODATA 2014) over the LoggingHook's (CODATA 2018): ASE's temperature is larger by it
KB_RATIO = 8.617333262e-5 / ase.units.kB
ATOM_FIELDS = ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("export")
    p = run_command([sys.executable, "-m", "dist_hooks.demo", "--out", str(base / "raw"), *DEMO],
                    timeout=120, env=clean_env())
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.copytree(base / "raw", base / "cons")
    assert cli("consolidate", base / "cons")[0] == 0
    return {"raw": base / "raw", "cons": base / "cons"}


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def recorded(run: Path, group: str) -> dict[str, np.ndarray]:
    """A group's committed records read with plain zarr (rank 0's group, or the merged
    converged one), in (step, sample_id) order, with per-record atom slices ``sl``."""
    import zarr

    m = json.loads((run / "run.json").read_text())
    if group == "converged":
        g = zarr.open_group(run / "data.zarr" / "converged", mode="r", use_consolidated=False)
        n = m["last"]["merged"]["records"]
    else:
        g = zarr.open_group(run / "data.zarr/ranks/rank-00000" / group, mode="r",
                            use_consolidated=False)
        n = m["last"]["ranks"][0]["hooks"][group]["records"]
    ptr = g["atoms_ptr"][: n + 1]
    order = np.lexsort((g["sample_id"][:n], g["step"][:n]))
    out = {k: a[:n][order] for k, a in g.arrays() if k not in ATOM_FIELDS and k != "atoms_ptr"}
    atom = {k: g[k][: ptr[-1]] for k in ATOM_FIELDS}
    out["atoms"] = [{k: v[ptr[i]: ptr[i + 1]] for k, v in atom.items()} for i in order]
    return out


def logged_temperature(run: Path) -> dict[tuple[int, int], float]:
    import pandas as pd

    log = pd.read_csv(run / "logs/log/rank-00000.csv")
    return {(int(s), int(i)): float(t) for s, i, t in zip(log.step, log.sample_id, log.temperature)}


def check_frames(frames, want, temps, *, exact: bool) -> None:
    """Every frame equals its record; ``exact``: bit for bit at the recorded float32 precision
    (binary formats), else to extxyz's 8 decimals."""
    assert len(frames) == len(want["step"]) > 0
    hot = 0
    for i, a in enumerate(frames):
        at = want["atoms"][i]
        key = (int(want["step"][i]), int(want["sample_id"][i]))
        assert (a.info["step"], a.info["sample_id"], a.info["rank"]) == (*key, 0)
        assert a.info["graph_idx"] == want["graph_idx"][i] and a.info["status"] == want["status"][i]
        np.testing.assert_array_equal(a.numbers, at["atomic_numbers"])
        np.testing.assert_array_equal(a.pbc, want["pbc"][i])
        np.testing.assert_array_equal(a.cell[:], want["cell"][i].astype(np.float64))
        assert np.float32(a.get_potential_energy()) == want["energy"][i]
        for got, name in ((a.positions, "positions"), (a.get_velocities(), "velocities"),
                          (a.get_forces(), "forces"), (a.get_masses(), "atomic_masses")):
            if exact:
                np.testing.assert_array_equal(got.astype(np.float32), at[name], err_msg=name)
            else:
                np.testing.assert_allclose(got, at[name], rtol=0, atol=1e-8, err_msg=name)
        t = a.get_temperature()
        assert t == pytest.approx(temps[key] * KB_RATIO, rel=3e-7, abs=1e-9), key
        assert t == pytest.approx(temps[key], rel=1e-6, abs=1e-9), key
        hot += t > 1.0
    assert hot > len(frames) // 4  # the velocities are real ones, not zeros


def test_velocity_unit_is_ases():
    """The engine's time unit (Å·sqrt(amu/eV)) is ASE's: velocities need no scaling."""
    from dist_hooks.demo import FS
    assert FS == ase.units.fs


@pytest.mark.parametrize("what", ["trajectory", "converged"])
def test_extxyz_reads_back_whole(runs, tmp_path, what):
    run = runs["cons"]
    rc, out, err = cli("export", run, "--what", what, "--format", "extxyz",
                       "--out", tmp_path / "a.xyz")
    assert rc == 0, err
    want = recorded(run, "snapshots" if what == "trajectory" else "converged")
    frames = ase.io.read(tmp_path / "a.xyz", ":")
    assert f"{len(frames)} structures" in out
    check_frames(frames, want, logged_temperature(run), exact=False)


def test_ase_db_rows_hold_velocities_and_fields(runs, tmp_path):
    run = runs["cons"]
    rc, _, err = cli("export", run, "--what", "trajectory", "--format", "ase-db",
                     "--out", tmp_path / "t.db")
    assert rc == 0, err
    rows = list(ase.db.connect(str(tmp_path / "t.db")).select())
    frames = []
    for r in rows:
        a = r.toatoms()
        a.info.update(r.key_value_pairs)
        frames.append(a)
        assert set(r.key_value_pairs) == {"step", "rank", "sample_id", "graph_idx", "status"}
        assert r.data == {}  # the demo records no field beyond the structure's
    check_frames(frames, recorded(run, "snapshots"), logged_temperature(run), exact=True)


def test_traj_reads_back_whole(runs, tmp_path):
    run = runs["cons"]
    rc, _, err = cli("export", run, "--what", "trajectory", "--format", "traj",
                     "--out", tmp_path / "t.traj")
    assert rc == 0, err
    with Trajectory(str(tmp_path / "t.traj")) as traj:
        frames = list(traj)
    check_frames(frames, recorded(run, "snapshots"), logged_temperature(run), exact=True)


@pytest.mark.parametrize("fmt", ["extxyz", "traj"])
def test_unconsolidated_export_equals_consolidated(runs, tmp_path, fmt):
    for k in ("raw", "cons"):
        assert cli("export", runs[k], "--what", "trajectory", "--format", fmt,
                   "--out", tmp_path / f"{k}.out")[0] == 0
    assert (tmp_path / "raw.out").read_bytes() == (tmp_path / "cons.out").read_bytes()


@pytest.mark.parametrize("kind", ["raw", "cons"])
def test_selection(runs, tmp_path, kind):
    run = runs[kind]
    rc, out, err = cli("export", run, "--what", "trajectory", "--format", "extxyz",
                       "--out", tmp_path / "s.xyz", "--sample-id", "1", "--sample-id", "3",
                       "--steps", "10:40", "--rank", "0")
    assert rc == 0, err
    want = recorded(run, "snapshots")
    keys = [(int(s), int(i)) for s, i in zip(want["step"], want["sample_id"])
            if i in (1, 3) and 10 <= s < 40]
    got = [(a.info["step"], a.info["sample_id"]) for a in ase.io.read(tmp_path / "s.xyz", ":")]
    assert got == keys and len(keys) == 12
    rc, out, _ = cli("export", run, "--what", "trajectory", "--format", "extxyz",
                     "--out", tmp_path / "e.xyz", "--steps", ":5")
    assert rc == 0 and "4 structures" in out  # step 0 of each system
    rc, out, _ = cli("export", run, "--what", "trajectory", "--format", "extxyz",
                     "--out", tmp_path / "n.xyz", "--rank", "1")
    assert rc == 0 and "0 structures" in out
    rc, _, err = cli("export", run, "--what", "trajectory", "--format", "extxyz",
                     "--out", tmp_path / "x.xyz", "--steps", "ten")
    assert rc == 2 and err.count("\n") == 1 and "A:B" in err
    assert not (tmp_path / "x.xyz").exists()


def test_progress_only_when_asked(runs, tmp_path):
    base = ["export", runs["cons"], "--what", "trajectory", "--format", "traj"]
    rc, _, err = cli(*base, "--out", tmp_path / "a.traj", "--progress", "always")
    assert rc == 0 and "export" in err
    rc, _, err = cli(*base, "--out", tmp_path / "b.traj", "--progress", "never")
    assert rc == 0 and err == ""


@pytest.mark.parametrize("kind", ["raw", "cons"])
def test_frames_of_one_system(runs, kind):
    from dist_hooks.reader import open_run

    run = runs[kind]
    reader = open_run(run)
    assert (reader.consolidated is not None) == (kind == "cons")
    want = recorded(run, "snapshots")
    mine = np.flatnonzero(want["sample_id"] == 2)
    sub = {k: v[mine] for k, v in want.items() if k != "atoms"}
    sub["atoms"] = [want["atoms"][i] for i in mine]
    frames = reader.frames(2)
    check_frames(frames, sub, logged_temperature(run), exact=True)
    assert [a.info["step"] for a in reader.frames(2, rank=0, steps="10:30")] == [10, 15, 20, 25]
    assert [a.info["step"] for a in reader.frames(2, steps=slice(50, None))] == [50, 55]
    assert reader.frames(7) == []


def test_frames_refuses_a_sample_id_on_two_ranks(runs):
    from dist_hooks.ase_frames import Selection, group_frames
    from dist_hooks.errors import RunError
    from dist_hooks.reader import open_run

    g = open_run(runs["raw"]).group(0, "snapshots")
    with pytest.raises(RunError, match=r"ranks \[0, 1\]"):
        group_frames([(g, 0), (g, 1)], Selection.of(2), "frames")
    assert len(group_frames([(g, 0), (g, 1)], Selection.of(2, 1), "frames")) == 12


def test_extra_fields_go_where_each_format_keeps_them(tmp_path):
    """Fields beyond the structure: extxyz info/arrays, ase-db key-value pairs and data,
    trajectory info."""
    from dist_hooks.ase_frames import atoms_of
    from dist_hooks.records import CsrBlock
    from dist_hooks.tools.export import _writer

    ptr = np.array([0, 2, 5])
    block = CsrBlock(
        {"step": np.array([3, 3]), "sample_id": np.array([0, 1]), "energy": np.float32([-1, -2]),
         "fmax": np.array([0.5, 0.25]), "tensor": np.arange(18.0).reshape(2, 3, 3),
         "cell": np.zeros((2, 3, 3), np.float32), "pbc": np.zeros((2, 3), bool)},
        {"positions": np.arange(15, dtype=np.float32).reshape(5, 3),
         "atomic_numbers": np.full(5, 18), "weights": np.float32([0.1, 0.2, 0.3, 0.4, 0.5])}, ptr)
    for fmt in ("extxyz", "ase-db", "traj"):
        with _writer(fmt, tmp_path / fmt) as write:
            write(atoms_of(block))
    xyz = ase.io.read(tmp_path / "extxyz", ":", format="extxyz")
    assert xyz[1].info["fmax"] == 0.25 and xyz[1].info["tensor"].shape == (3, 3)
    np.testing.assert_allclose(xyz[1].arrays["weights"], [0.3, 0.4, 0.5], atol=1e-8)
    row = ase.db.connect(str(tmp_path / "ase-db"), type="db").get(id=2)
    assert row.key_value_pairs == {"step": 3, "sample_id": 1}
    assert row.data["fmax"] == 0.25  # 'fmax' is a name the database reserves
    np.testing.assert_array_equal(row.data["tensor"], np.arange(9.0, 18.0).reshape(3, 3))
    np.testing.assert_array_equal(row.data["weights"], np.float32([0.3, 0.4, 0.5]))
    traj = ase.io.read(tmp_path / "traj", ":", format="traj")
    assert traj[1].info["sample_id"] == 1 and traj[1].info["fmax"] == 0.25
    np.testing.assert_array_equal(traj[1].info["weights"], np.float32([0.3, 0.4, 0.5]))


def test_without_ase_exit_4_and_missing_dependency(runs, tmp_path):
    code = ("import sys; sys.modules['ase'] = None\n"
            "from dist_hooks.cli import main\n"
            "from dist_hooks.errors import MissingDependencyError\n"
            "from dist_hooks.reader import open_run\n"
            "try:\n    open_run(sys.argv[1]).frames(0)\n"
            "except MissingDependencyError as exc:\n    print('frames:', exc)\n"
            "sys.exit(main(['export', sys.argv[1], '--what', 'trajectory', '--format', 'traj',"
            " '--out', sys.argv[2]]))\n")
    p = run_command([sys.executable, "-c", code, str(runs["cons"]), str(tmp_path / "t.traj")],
                    timeout=60, env=clean_env())
    assert p.returncode == 4 and "frames: ASE is needed" in p.stdout, (p.stdout, p.stderr)
    assert p.stderr.startswith("dist-hooks export: ASE is needed") and p.stderr.count("\n") == 1
    assert not (tmp_path / "t.traj").exists()
