"""Every record group opens with ``xarray.open_zarr`` as it is, in a process that never imports
dist_hooks: the live groups of each rank (a finished run, and a run killed after its last
boundary with rows past it), the coordinator's merged group and the consolidated output's groups;
and ``xarray.open_datatree`` opens the whole ``data.zarr`` of both. Values are compared bit for
bit with plain zarr's reads, dimension names and units with what the format documents
(docs/format.md, "Dimension names and units")."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from mp.runner import REPO_ROOT, clean_env, run_command, run_torchrun

from dist_hooks.store import layout
from dist_hooks.store.array_layout import ArraySpec
from dist_hooks.store.group_writer import GroupWriter

pytest.importorskip("xarray")

ENTRY = str(REPO_ROOT / "tests" / "mp" / "demo_entry.py")
DEMO = ["--steps", "60", "--relax-steps", "40", "--systems-per-rank", "5", "--min-atoms", "8",
        "--max-atoms", "20", "--fmax", "0.02", "--checkpoint-every", "20", "--snapshot-every", "5",
        "--timeout", "90", "--quiet"]

#: what the demo records, as docs/format.md names it (written out here, not taken from the table)
UNITS = {"positions": "angstrom", "velocities": "(eV/amu)^0.5", "forces": "eV/angstrom",
         "atomic_masses": "amu", "energy": "eV", "cell": "angstrom"}
DIMS = {"positions": ("atom", "xyz"), "velocities": ("atom", "xyz"), "forces": ("atom", "xyz"),
        "atomic_numbers": ("atom",), "atomic_masses": ("atom",), "energy": ("record",),
        "cell": ("record", "cell_vector", "xyz"), "pbc": ("record", "cell_vector"),
        "step": ("record",), "sample_id": ("record",), "graph_idx": ("record",),
        "status": ("record",), "rank": ("record",), "atoms_ptr": ("record_edge",),
        "atoms_start": ("record",), "n_atoms": ("record",)}

#: run in a fresh interpreter: xarray only (argv: a JSON list of [store, group], the output dir)
READER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import xarray as xr

    todo, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    report = {"groups": {}, "trees": {}}
    for i, (store, group) in enumerate(todo):
        ds = xr.open_zarr(store, group=group, consolidated=False)
        np.savez(out / f"{i}.npz", **{n: v.values for n, v in ds.data_vars.items()})
        report["groups"][f"{store}::{group}"] = {
            "file": f"{i}.npz", "sizes": dict(ds.sizes),
            "vars": {n: {"dims": list(v.dims), "attrs": dict(v.attrs)}
                     for n, v in ds.data_vars.items()},
            "coords": sorted(ds.coords)}
    for store in sorted({s for s, _ in todo}):
        tree = xr.open_datatree(store, engine="zarr", consolidated=False)
        report["trees"][store] = {node.path: sorted(node.ds.data_vars) for node in tree.subtree}
    assert "dist_hooks" not in sys.modules, sorted(m for m in sys.modules if "dist_hooks" in m)
    (out / "report.json").write_text(json.dumps(report))
""")


def record_groups(data: Path) -> list[str]:
    """Every group under ``data`` (a ``data.zarr``) whose attributes give array levels."""
    found = []
    for meta in sorted(data.rglob("zarr.json")):
        doc = json.loads(meta.read_bytes())
        if doc.get("node_type") == "group" and "level" in doc.get("attributes", {}):
            found.append(str(meta.parent.relative_to(data)))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished 2-rank run (then consolidated), and a 1-rank run killed at step 55 (its
    groups hold rows past the boundary in force). The kill waits for a flush and the background
    commit: one landing inside a flush leaves arrays of unequal lengths, which xarray refuses
    (docs/format.md says so); that is not what this test is about."""
    base = tmp_path_factory.mktemp("xr")

    def finished() -> subprocess.CompletedProcess:
        res = run_torchrun(ENTRY, 2, ["--out", str(base / "r2"), *DEMO], timeout=150)
        if res.returncode == 0:
            res = run_command([sys.executable, "-m", "dist_hooks.cli", "consolidate",
                               "--progress", "never", str(base / "r2")], timeout=120)
        return res

    def killed() -> subprocess.CompletedProcess:
        return run_command([sys.executable, ENTRY, "--out", str(base / "crash"), *DEMO,
                            "--fail-at-step", "55", "--fail-after-flush"], timeout=150, env=clean_env())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done, crash = pool.submit(finished), pool.submit(killed)
        res = done.result()
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        crash.result()
    m = json.loads((base / "crash" / "run.json").read_text())
    assert not m["last"]["all_final"]
    return {"run": base / "r2" / "data.zarr", "crash": base / "crash" / "data.zarr",
            "out": base / "r2" / "consolidated" / "data.zarr"}


@pytest.fixture(scope="module")
def opened(runs, tmp_path_factory) -> tuple[list[tuple[str, str]], dict, Path]:
    todo = [(str(runs[k]), g) for k in ("run", "crash", "out") for g in record_groups(runs[k])]
    out = tmp_path_factory.mktemp("xr-read")
    env = clean_env()
    env.pop("PYTHONPATH")  # nothing of the repository is importable there
    res = subprocess.run([sys.executable, "-c", READER, json.dumps(todo), str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert res.returncode == 0, res.stderr[-4000:]
    return todo, json.loads((out / "report.json").read_text()), out


def test_every_kind_of_group_is_opened(opened) -> None:
    todo, _, _ = opened
    groups = {g for _, g in todo}
    assert {"ranks/rank-00000/snapshots", "ranks/rank-00001/snapshots",
            "ranks/rank-00000/converged", "converged", "hooks/snapshots"} <= groups
    assert sum(1 for s, _ in todo if s.endswith("crash/data.zarr")) >= 2


def test_values_bit_for_bit_and_units(opened, runs) -> None:
    todo, report, out = opened
    for store, group in todo:
        got = report["groups"][f"{store}::{group}"]
        g = zarr.open_group(store, path=group, mode="r", use_consolidated=False)
        names = sorted(g.array_keys())
        assert sorted(got["vars"]) == names, (group, got["coords"])
        assert got["coords"] == []  # no dimension named like an array
        with np.load(out / got["file"]) as data:
            for name in names:
                want = g[name][...]
                x = data[name]
                assert x.dtype == want.dtype and x.shape == want.shape, (group, name)
                assert x.tobytes() == want.tobytes(), (group, name)
        for name, v in got["vars"].items():
            assert tuple(v["dims"]) == DIMS[name], (group, name)
            assert v["attrs"] == ({"units": UNITS[name]} if name in UNITS else {}), (group, name)
        level = g.attrs["level"]
        n_rec = g["step"].shape[0]
        assert got["sizes"]["record"] == n_rec
        if layout.ATOMS_PTR in names:
            assert got["sizes"]["record_edge"] == n_rec + 1
            assert got["sizes"]["atom"] == g[layout.ATOMS_PTR][-1] or store.endswith(
                "crash/data.zarr")  # a killed writer's atom rows may run past its last record
        else:  # the indexed layout: atom rows, padding included
            assert g.attrs["atoms_layout"] == "indexed"
            assert {level[n] for n in names if n in level} == {"record", "atom"}


def test_killed_run_holds_rows_past_its_boundary(opened, runs) -> None:
    """The live groups xarray opened are the files as the writer left them (not cut)."""
    _, report, _ = opened
    m = json.loads((runs["crash"].parent / "run.json").read_text())
    (rec,) = m["last"]["ranks"]
    hook = rec["hooks"]["snapshots"]
    got = report["groups"][f"{runs['crash']}::{hook['group']}"]
    assert got["sizes"]["record"] > hook["records"]


def test_datatree_opens_whole_stores(opened, runs) -> None:
    _, report, _ = opened
    for key in ("run", "out", "crash"):
        tree = report["trees"][str(runs[key])]
        groups = {p.lstrip("/") for p, v in tree.items() if v}
        assert groups == set(record_groups(runs[key])), key
    assert tree["/"] == []


# ------------------------------------------------------------------ the table, unit level
def test_names_of_unknown_and_odd_shapes() -> None:
    assert layout.array_dims("positions", "atom", (3,)) == ("atom", "xyz")
    assert layout.array_dims("positions", "atom", (2,)) == ("atom", "positions_dim1")
    assert layout.array_dims("stress", "record", (3, 3)) == ("record", "xyz_row", "xyz_col")
    assert layout.array_dims("stress", "record", (6,)) == ("record", "voigt")
    assert layout.array_dims("mine", "record", (4, 2)) == ("record", "mine_dim1", "mine_dim2")
    assert layout.array_dims(layout.ATOMS_PTR, "record", ()) == ("record_edge",)
    assert layout.array_attributes("mine") == {} and layout.array_attributes("step") == {}
    assert layout.array_attributes("forces") == {"units": "eV/angstrom"}
    with pytest.raises(ValueError, match="dimension names"):
        ArraySpec("f4", (3,), 8, dimension_names=("atom",))


def test_reopened_group_keeps_its_metadata(tmp_path: Path) -> None:
    """A group written before names existed keeps its arrays' documents on append (resume)."""
    root = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    g = root.create_group("g")
    old = ArraySpec("f4", (3,), 8)  # no names, no units: as v1 wrote
    for name, spec in (("positions", old), ("step", ArraySpec("i8", (), 8)),
                       (layout.ATOMS_PTR, ArraySpec("i8", (), 8))):
        g.create_array(name, **spec.zarr_arguments())
    g[layout.ATOMS_PTR].resize((1,))
    g.attrs.update(layout.group_attrs({"step": "record", "positions": "atom"}))
    w = GroupWriter(tmp_path, "g", chunk_records=8, chunk_atoms=8, chunks_per_shard=0,
                    fsync="never")
    w.append({"step": np.arange(3)}, {"positions": np.ones((5, 3), np.float32)},
             np.array([1, 2, 2]))
    w.close()
    doc = json.loads((tmp_path / "g" / "positions" / "zarr.json").read_bytes())
    assert "dimension_names" not in doc and doc["attributes"] == {} and doc["shape"] == [5, 3]
    new = GroupWriter(tmp_path, "h", chunk_records=8, chunk_atoms=8, fsync="never")
    new.append({"step": np.arange(3)}, {"positions": np.ones((5, 3), np.float32)},
               np.array([1, 2, 2]))
    new.close()
    doc = json.loads((tmp_path / "h" / "positions" / "zarr.json").read_bytes())
    assert doc["dimension_names"] == ["atom", "xyz"] and doc["attributes"] == {
        "units": "angstrom"}
