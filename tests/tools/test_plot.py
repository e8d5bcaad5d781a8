"""``dist-hooks plot``: what the figure shows (read back from matplotlib's own objects) and the
file types it writes (by their first bytes).

Two small one-rank demo runs: ``both`` (FIRE to step 40, then MD; 4 systems, with snapshots: atom
counts known) and ``md`` (MD only, 12 systems, no snapshots and nothing converged: no atom counts).
The expected values are computed here from the CSV (pandas) and the groups (zarr), not with the
plot's own code.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

from mp.runner import clean_env, run_command

pytest.importorskip("matplotlib")

from dist_hooks.cli import main  # noqa: E402
from dist_hooks.tools.plot import plot  # noqa: E402

BOTH = ["--steps", "60", "--relax-steps", "40", "--systems-per-rank", "4", "--max-atoms", "16",
        "--fmax", "0.02", "--dt", "4", "--checkpoint-every", "20", "--snapshot-every", "5"]
MD = ["--phase", "md", "--steps", "30", "--systems-per-rank", "12", "--max-atoms", "16",
      "--snapshot-every", "0", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plot-runs")
    out = {}
    for name, args in (("both", BOTH), ("md", MD)):
        p = run_command([sys.executable, "-m", "dist_hooks.demo", "--out", str(base / name),
                         "--quiet", *args], timeout=150, env=clean_env())
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = base / name
    return out


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _main_axes(fig):
    """The 3x2 data axes (not the secondary time axes), row by row."""
    axes = [a for a in fig.axes if a.get_ylabel()]
    assert len(axes) == 6, [a.get_ylabel() for a in fig.axes]
    return axes


def _atoms_by_system(run: Path) -> dict[int, int]:
    import zarr
    g = zarr.open_group(str(run / "data.zarr" / "ranks" / "rank-00000" / "snapshots"), mode="r")
    ptr, sid = g["atoms_ptr"][:], g["sample_id"][:]
    return {int(s): int(n) for s, n in zip(sid, np.diff(ptr))}


def test_axes_units_and_per_atom_energy(runs, tmp_path):
    import pandas as pd
    run = runs["both"]
    r = plot(run, tmp_path / "p.png")
    fig = r["figure"]
    axes = _main_axes(fig)
    want_units = ["(eV/atom)", "(eV/atom)", "(eV/Å)", "(eV/Å)", "(K)", "(K)"]
    for ax, unit in zip(axes, want_units):
        assert unit in ax.get_ylabel(), ax.get_ylabel()
    assert [a.get_xlabel() for a in axes[-2:]] == ["step", "step"]
    assert r["energy"] == "per atom" and (r["systems"], r["ranks"]) == (4, 1)

    # the left energy line is the mean over the systems of energy / atoms, step by step
    log = pd.read_csv(run / "logs" / "log" / "rank-00000.csv")
    n_atoms = _atoms_by_system(run)
    assert len(set(n_atoms.values())) > 1  # clusters of different sizes: per-atom matters
    log["e_atom"] = log["energy"] / log["sample_id"].map(n_atoms)
    want = log.groupby("step")["e_atom"].mean()
    (line,) = [ln for ln in axes[0].get_lines() if ln.get_label() == "rank 0"]
    np.testing.assert_array_equal(line.get_xdata(), want.index.to_numpy())
    np.testing.assert_allclose(line.get_ydata(), want.to_numpy(), rtol=1e-12)

    # fewer than 10 systems: each system's own line on the right, no percentile bands
    right = axes[1]
    assert len([ln for ln in right.get_lines() if ln.get_label() == "rank 0 systems"]) == 4
    assert not right.collections or all(c.get_label() != "10–90 %" for c in right.collections)

    # the relax -> MD switch at step 40 on every panel, the fmax threshold up to it
    for ax in axes:
        sw = [ln for ln in ax.get_lines() if ln.get_label().startswith("relax → MD")]
        assert len(sw) == 1 and list(sw[0].get_xdata()) == [40, 40]
    for ax in axes[2:4]:
        (thr,) = [c for c in ax.collections if c.get_label().startswith("fmax threshold")]
        (seg,) = thr.get_segments()
        assert seg[0][1] == seg[1][1] == pytest.approx(0.02) and seg[1][0] == 40
        assert ax.get_yscale() == "log"
    # MD time in fs on top, 0 at the switch, dt 4 fs
    tops = [c for a in axes for c in a.child_axes if "MD time" in c.get_xlabel()]
    assert len(tops) == 2 and all("(fs)" in a.get_xlabel() for a in tops)
    sec = tops[0]
    assert sec._functions[0](np.array([40.0, 50.0])).tolist() == [0.0, 40.0]

    title = fig._suptitle.get_text()
    assert "4 systems" in title and "1 rank" in title and "4 fs" in title
    # the legend is the figure's, outside every data axes
    assert fig.legends and all(ax.get_legend() is None for ax in axes)
    renderer = fig.canvas.get_renderer()
    box = fig.legends[0].get_window_extent(renderer)
    for ax in axes:
        assert not box.overlaps(ax.get_window_extent(renderer))


def test_total_energy_option_and_fallback(runs, tmp_path):
    fig = plot(runs["both"], tmp_path / "t.png", per_atom=False)["figure"]
    assert _main_axes(fig)[0].get_ylabel() == "total energy per system (eV)"
    # MD only, nothing converged and no snapshots: no atom counts, so total, and the label says so
    r = plot(runs["md"], tmp_path / "md.png")
    fig = r["figure"]
    axes = _main_axes(fig)
    assert r["energy"] == "total"
    assert "total energy per system (eV)" in axes[0].get_ylabel()
    assert "no atom counts" in axes[0].get_ylabel()
    # 12 systems: median and bands on the right; MD from step 0, no switch, no threshold
    labels = {c.get_label() for c in axes[1].collections}
    assert {"min–max", "10–90 %"} <= labels
    assert not any(ln.get_label().startswith("relax → MD") for a in axes for ln in a.get_lines())
    assert not any(c.get_label().startswith("fmax threshold") for a in axes for c in a.collections)
    tops = [c for a in axes for c in a.child_axes if c.get_xlabel() == "MD time (fs)"]
    assert len(tops) == 2
    assert "12 systems" in fig._suptitle.get_text()


@pytest.mark.parametrize("suffix,magic", [(".png", (b"\x89PNG\r\n\x1a\n",)),
                                          (".svg", (b"<?xml", b"<svg")),
                                          (".pdf", (b"%PDF",))])
def test_format_from_suffix(runs, tmp_path, suffix, magic):
    out = tmp_path / f"fig{suffix}"
    rc, stdout, err = cli("plot", runs["both"], "--out", out)
    assert rc == 0, err
    assert out.read_bytes().startswith(magic), out.read_bytes()[:20]
    assert "4 systems on 1 rank" in stdout
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left


def test_unknown_suffix_is_refused(runs, tmp_path):
    for name in ("fig.jpg", "fig"):
        rc, _, err = cli("plot", runs["both"], "--out", tmp_path / name)
        assert rc == 2 and ".png, .svg, .pdf" in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dpi", ["0", "-5", "100000"])
def test_a_resolution_matplotlib_cannot_draw_is_a_usage_error(runs, tmp_path, dpi):
    run = runs["both"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["plot", str(run), "--out", str(tmp_path / "x.png"), "--dpi", dpi])
    assert code == 2 and "dots per inch" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not (tmp_path / "x.png").exists()
