"""``dist-hooks plot``: energy, fmax and temperature versus step, per rank and over systems.

Why two views: the per-rank mean shows whether one rank (one GPU, one batch) behaves unlike the
others; the distribution over all systems (median, 10-90 % band, min-max) shows whether the
batch as a whole converges or heats up, which a mean hides. Aggregation is vectorised numpy
(one sort per metric), so a run of millions of rows plots in seconds. Uses matplotlib's Agg
canvas directly (no pyplot state, works without a display).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from ..reader import RunError, open_run
from ..errors import MissingDependencyError

__all__ = ["plot", "step_quantiles"]

METRICS = ("energy", "fmax", "temperature")
UNITS = {"energy": "eV", "fmax": "eV/Å", "temperature": "K"}


def step_means(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the finite values at each step (steps without any are dropped)."""
    ok = np.isfinite(values)
    uniq, inv = np.unique(steps[ok], return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq))
    return uniq, np.bincount(inv, weights=values[ok], minlength=len(uniq)) / np.maximum(n, 1)


def step_quantiles(steps: np.ndarray, values: np.ndarray,
                   qs: tuple[float, ...] = (0.0, 0.1, 0.5, 0.9, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, q)``: per step, the quantiles ``qs`` of the finite values (nearest rank), with
    one lexsort instead of a loop over steps. ``q`` has shape ``(len(qs), n_steps)``."""
    ok = np.isfinite(values)
    s, v = steps[ok], values[ok]
    order = np.lexsort((v, s))
    s, v = s[order], v[order]
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    q = np.stack([v[start + np.floor(x * (counts - 1)).astype(np.int64)] for x in qs])
    return uniq, q


def plot(run_dir: str | os.PathLike, out: str | os.PathLike, *, hook: str = "log",
         dpi: int = 110, rank_roots: Sequence[str | os.PathLike] = ()) -> dict:
    """Write the PNG; returns ``{"out", "metrics", "rows"}``. ``rank_roots``: as for
    :func:`~dist_hooks.reader.open_run`."""
    from ..reader import load_manifest
    from ..store.layout import MANIFEST
    if (Path(run_dir) / MANIFEST).is_file() and \
            getattr(load_manifest(run_dir).hooks.get(hook), "backend", None) == "tensorboard":
        raise RunError(f"log {hook!r} is a TensorBoard log (events, no committed rows): plot reads "
                       "CSV logs only; view it with TensorBoard (tensorboard --logdir on its log dir)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plot needs matplotlib: pip install 'dist_hooks[plot]' "
                                     "(or pip install matplotlib)") from None
    run = open_run(run_dir, rank_roots)
    try:
        cols = run.logs(hook)
    except KeyError as exc:
        raise RunError(str(exc.args[0] if exc.args else exc)) from None
    metrics = [m for m in METRICS if m in cols]
    if not metrics or "step" not in cols:
        raise RunError(f"log {hook!r} has none of {list(METRICS)} (columns: {sorted(cols)})")
    steps = np.asarray(cols["step"], dtype=np.int64)
    ranks = np.asarray(cols["rank"], dtype=np.int64) if "rank" in cols else np.zeros_like(steps)
    fig = Figure(figsize=(12, 3.2 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 2, squeeze=False, sharex=True)
    for row, m in enumerate(metrics):
        vals = np.asarray(cols[m], dtype=np.float64)
        left, right = axes[row]
        for r in np.unique(ranks).tolist():  # one line per rank
            sel = ranks == r
            x, y = step_means(steps[sel], vals[sel])
            left.plot(x, y, lw=1.2, label=f"rank {r}")
        left.set_ylabel(f"{m} ({UNITS[m]})")
        left.set_title(f"{m}: mean over each rank's systems", fontsize=10)
        if len(np.unique(ranks)) <= 12:
            left.legend(fontsize=7, ncol=2)
        x, q = step_quantiles(steps, vals)
        right.fill_between(x, q[0], q[4], color="C0", alpha=0.15, lw=0, label="min-max")
        right.fill_between(x, q[1], q[3], color="C0", alpha=0.35, lw=0, label="10-90 %")
        right.plot(x, q[2], color="C0", lw=1.4, label="median")
        right.set_title(f"{m}: distribution over all systems", fontsize=10)
        right.legend(fontsize=7)
        if m == "fmax" and np.all(vals[np.isfinite(vals)] > 0):
            left.set_yscale("log")
            right.set_yscale("log")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    world = run.manifest.world_size
    fig.suptitle(f"{Path(run_dir).resolve().name}: {len(steps)} rows, world size {world}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}.png"
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "metrics": metrics, "rows": int(len(steps))}
