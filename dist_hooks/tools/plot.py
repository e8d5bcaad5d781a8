"""``dist-hooks plot``: energy, fmax and temperature versus step, per rank and over systems.

Why two views: the per-rank mean shows whether one rank (one GPU, one batch) behaves unlike the
others; the spread over all systems shows whether the batch as a whole converges or heats up,
which a mean hides. Energy is per atom by default: clusters of 8 and of 64 atoms differ eightfold
in total energy, which would read as a difference between ranks. The atom counts come from the
run's own record groups (``atoms_ptr`` of each (rank, sample_id)), since the CSV has none.
Aggregation is vectorised numpy (one sort per metric), so a run of millions of rows plots in
seconds. Uses matplotlib's Agg canvas directly (no pyplot state, works without a display); the
output format is the suffix of ``out`` (PNG, SVG or PDF).
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from ..reader import RunError, RunReader, load_manifest, open_run
from ..store.layout import MANIFEST
from ..errors import DamageError, MissingDependencyError
from .mirror import is_url, naming_url

__all__ = ["FORMATS", "draw", "output_format", "plot", "step_quantiles"]

METRICS = ("energy", "fmax", "temperature")
UNITS = {"energy": "eV", "fmax": "eV/Å", "temperature": "K"}
#: ``--out`` suffix -> matplotlib format
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: fewer systems than this: each system's own line instead of percentile bands
MIN_SYSTEMS_FOR_BANDS = 10


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


def output_format(out: str | os.PathLike) -> str:
    """The format ``out``'s suffix names; :class:`RunError` (exit 2) for any other suffix."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise RunError(f"--out {out}: cannot tell the format from {suffix or 'no suffix'!r}; "
                       f"use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


# ----------------------------------------------------------------------------- run settings
@dataclass(frozen=True)
class Schedule:
    """What the run's ``settings`` say about its steps (each ``None`` when they do not).

    ``md_start``: the first MD step (0: MD from the start); ``switch``: the relax-to-MD step
    when both phases ran; ``dt_fs``: the MD time step; ``fmax``: FIRE's convergence threshold
    (eV/Å), which applies before ``switch``. Read keys: ``phase``, ``steps``, ``relax_steps``,
    ``md_steps`` (split as the demo splits them), ``dt`` or ``dt_fs`` (fs), ``fmax``.
    """

    md_start: int | None = None
    switch: int | None = None
    dt_fs: float | None = None
    fmax: float | None = None

    @classmethod
    def of(cls, settings: Any) -> "Schedule":
        s = settings if isinstance(settings, dict) else {}

        def num(key: str) -> float | None:
            v = s.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            return float(v) if ok else None

        phase = s.get("phase")
        relax, md, steps = num("relax_steps"), num("md_steps"), num("steps")
        md_start: int | None = None
        if phase == "md":
            md_start = 0
        elif phase != "relax":
            if relax is None and steps is not None and phase == "both":
                relax = max(steps - md, 0) if md is not None else steps // 2
            if relax is not None and relax >= 0:
                md_start = int(relax)
            elif phase is None:
                md_start = 0  # no phases named: the steps are MD steps
        total = steps if steps is not None else (relax or 0) + (md or 0) if phase == "both" else None
        if md_start is not None and total and md_start >= total:
            md_start = None  # the MD part is empty
        dt = num("dt_fs") if num("dt_fs") is not None else num("dt")
        fmax = num("fmax") if phase != "md" else None
        return cls(md_start=md_start, switch=md_start if md_start else None,
                   dt_fs=dt if dt is not None and dt > 0 and md_start is not None else None,
                   fmax=fmax if fmax is not None and fmax > 0 else None)


# ------------------------------------------------------------------------------- atom counts
def _pairs(rank: np.ndarray, sample_id: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(rank, np.int64), np.asarray(sample_id, np.int64)], axis=1)


def _groups_with_counts(run: RunReader) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(pairs (n, 2) of (rank, sample_id), atom counts (n,))]`` of every record group the
    run can read: the merged converged group, then each snapshot hook's group(s)."""
    found = []
    readers: list[tuple[Any, int | None]] = []
    try:
        readers.append((run.converged(), None))
    except (RunError, KeyError, OSError):
        pass
    hooks = sorted({u.hook for u in run.units if u.kind == "zarr"})
    for h in hooks:
        try:
            readers.append((run.trajectory(h), None))  # consolidated: all ranks, rank column
            continue
        except (RunError, KeyError, OSError):
            pass
        for r in run.ranks:
            try:
                readers.append((run.group(r, h), r))
            except (RunError, KeyError, OSError):
                pass
    for g, rank in readers:
        try:
            if not len(g):
                continue
            sid = g.column("sample_id")
            rk = g.column("rank") if rank is None else np.full(len(sid), rank, np.int64)
            found.append((_pairs(rk, sid), np.diff(g.atoms_ptr())))
        except (KeyError, OSError, ValueError, DamageError):
            continue  # a group without those columns, or damaged (verify names it)
    return found


def atoms_per_row(run: RunReader, pairs: np.ndarray) -> np.ndarray | None:
    """The atom count of each log row's system (``pairs``: its (rank, sample_id)), or ``None``
    when some system is in no record group (then no per-atom value can be given for it)."""
    groups = _groups_with_counts(run)
    if not groups or not len(pairs):
        return None
    known = np.concatenate([p for p, _ in groups])
    counts = np.concatenate([c for _, c in groups])
    _, inv = np.unique(np.concatenate([known, pairs]), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    table = np.full(int(inv.max()) + 1, -1, np.int64)
    table[inv[:len(known)]] = counts
    got = table[inv[len(known):]]
    return got if bool(np.all(got > 0)) else None


# ------------------------------------------------------------------------------------ figure
def _refuse_tensorboard(manifest: Any, hook: str) -> None:
    if getattr(manifest.hooks.get(hook), "backend", None) == "tensorboard":
        raise RunError(f"log {hook!r} is a TensorBoard log (events, no committed rows): plot "
                       "reads CSV logs only; view it with TensorBoard (tensorboard --logdir on "
                       "its log dir)")


def _name(run_dir: str | os.PathLike) -> str:
    if is_url(run_dir):  # s3://bucket/a/b -> b (or a/b for a/b/consolidated)
        p = PurePosixPath("/" + str(run_dir)[5:].strip("/"))
        return f"{p.parent.name}/{p.name}" if p.name == "consolidated" else p.name
    p = Path(run_dir).resolve()
    return f"{p.parent.name}/{p.name}" if p.name == "consolidated" else p.name


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _mark_schedule(ax: Any, sched: Schedule, metric: str, x_lo: float) -> None:
    if sched.switch is not None:
        ax.axvline(sched.switch, color="0.35", ls="--", lw=1.0,
                   label=f"relax → MD (step {sched.switch})")
    if metric == "fmax" and sched.fmax is not None:
        end = sched.switch if sched.switch is not None else ax.get_xlim()[1]
        ax.hlines(sched.fmax, x_lo, end, colors="C3", linestyles=":", lw=1.4,
                  label=f"fmax threshold ({sched.fmax:g} {UNITS['fmax']})")


def _time_axis(ax: Any, sched: Schedule, x_lo: float, x_hi: float) -> None:
    """MD time in fs on top of ``ax`` (ticks only where MD ran: FIRE has no physical time)."""
    from matplotlib.ticker import MaxNLocator

    t0, dt = float(sched.md_start or 0), float(sched.dt_fs or 1.0)
    share = (x_hi - max(t0, x_lo)) / max(x_hi - x_lo, 1.0)  # of the axis that is MD

    class NonNegative(MaxNLocator):
        def tick_values(self, vmin: float, vmax: float) -> Any:
            t = super().tick_values(max(vmin, 0.0), max(vmax, 0.0))
            return t[t >= 0]

    sec = ax.secondary_xaxis("top", functions=(lambda s: (s - t0) * dt, lambda t: t / dt + t0))
    sec.xaxis.set_major_locator(NonNegative(nbins=max(3, round(7 * share))))
    sec.set_xlabel("MD time (fs)" if not t0 else f"MD time from step {int(t0)} (fs)",
                   fontsize=9)


def _legend_below(fig: Any, axes: Any, max_entries: int = 18) -> None:
    """One legend for the whole figure, below the axes (never over the data)."""
    seen: dict[str, Any] = {}
    for a in axes.flat:
        for h, lab in zip(*a.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen and len(seen) <= max_entries:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncol=min(len(seen), 6), fontsize=8, frameon=False)


def draw(fig: Any, run: RunReader, cols: dict[str, np.ndarray], *, per_atom: bool = True,
         title: str = "run") -> dict[str, Any]:
    """Draw the log ``cols`` of ``run`` on the empty matplotlib ``fig``; returns what it
    shows: ``{"metrics", "rows", "systems", "ranks", "energy"}``."""
    metrics = [m for m in METRICS if m in cols]
    if not metrics or "step" not in cols or "sample_id" not in cols:
        raise RunError(f"the log has none of {list(METRICS)} or no step/sample_id column "
                       f"(columns: {sorted(cols)})")
    steps = np.asarray(cols["step"], dtype=np.int64)
    ranks = np.asarray(cols["rank"], dtype=np.int64) if "rank" in cols else np.zeros_like(steps)
    pairs = _pairs(ranks, cols["sample_id"])
    systems, sys_of_row = np.unique(pairs, axis=0, return_inverse=True)
    sys_of_row = sys_of_row.reshape(-1)
    rank_ids = np.unique(ranks).tolist()
    sched = Schedule.of(run.manifest.settings)
    values = {m: np.asarray(cols[m], dtype=np.float64) for m in metrics}
    energy = "total"
    e_label = f"total energy per system ({UNITS['energy']})"
    if "energy" in values and per_atom:
        n_atoms = atoms_per_row(run, pairs)
        if n_atoms is not None:
            values["energy"] = values["energy"] / n_atoms
            energy, e_label = "per atom", f"energy per atom ({UNITS['energy']}/atom)"
        else:
            e_label = f"total energy per system ({UNITS['energy']})\nno atom counts recorded"
    ylabels = {"energy": e_label, "fmax": f"max. force on an atom, fmax ({UNITS['fmax']})",
               "temperature": f"temperature ({UNITS['temperature']})"}
    n_sys = len(systems)
    bands = n_sys >= MIN_SYSTEMS_FOR_BANDS

    fig.set_size_inches(13, 3.0 * len(metrics) + 0.8)
    axes = fig.subplots(len(metrics), 2, squeeze=False, sharex=True)
    x_lo = float(steps.min()) if len(steps) else 0.0
    for row, m in enumerate(metrics):
        vals = values[m]
        left, right = axes[row]
        for r in rank_ids:  # one line per rank
            sel = ranks == r
            x, y = step_means(steps[sel], vals[sel])
            left.plot(x, y, lw=1.2, color=f"C{r % 10}", label=f"rank {r}")
        if bands:
            x, q = step_quantiles(steps, vals)
            right.fill_between(x, q[0], q[4], color="C0", alpha=0.15, lw=0, label="min–max")
            right.fill_between(x, q[1], q[3], color="C0", alpha=0.35, lw=0, label="10–90 %")
            right.plot(x, q[2], color="C0", lw=1.4, label="median")
        else:  # too few systems for percentiles to mean anything: each system's own line
            for i, (r, sid) in enumerate(systems.tolist()):
                sel = sys_of_row == i
                order = np.argsort(steps[sel], kind="stable")
                right.plot(steps[sel][order], vals[sel][order], lw=0.9, alpha=0.8,
                           color=f"C{r % 10}", label=f"rank {r} systems")
        for ax in (left, right):
            ax.set_ylabel(ylabels[m], fontsize=9)
            ax.grid(True, lw=0.3, alpha=0.5)
            _mark_schedule(ax, sched, m, x_lo)
        if row == 0:
            left.set_title("mean over each rank's systems", fontsize=10)
            right.set_title(f"all {_plural(n_sys, 'system')}: median, 10–90 % and min–max"
                            if bands else f"each of the {_plural(n_sys, 'system')}", fontsize=10)
        if m == "fmax" and np.all(vals[np.isfinite(vals)] > 0):
            left.set_yscale("log")
            right.set_yscale("log")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if sched.dt_fs is not None:
        for ax in axes[0]:
            _time_axis(ax, sched, x_lo, float(steps.max()))
    _legend_below(fig, axes)
    parts = [_plural(n_sys, "system"), _plural(len(rank_ids), "rank")]
    if sched.dt_fs is not None:
        parts.append(f"MD time step {sched.dt_fs:g} fs")
    fig.suptitle(f"{title}: {', '.join(parts)}")
    return {"metrics": metrics, "rows": int(len(steps)), "systems": n_sys,
                 "ranks": len(rank_ids), "energy": energy}


def plot(run_dir: str | os.PathLike, out: str | os.PathLike, *, hook: str = "log",
         dpi: int = 110, rank_roots: Sequence[str | os.PathLike] = (),
         per_atom: bool = True, cache: str | os.PathLike | None = None,
         storage_options: dict[str, Any] | None = None) -> dict:
    """Write the figure to ``out`` (PNG, SVG or PDF by its suffix); returns ``{"out", "format",
    "metrics", "rows", "systems", "ranks", "energy", "figure"}``. ``per_atom=False``: total
    energy per system. ``rank_roots``, ``cache``, ``storage_options`` (an ``s3://`` run): as
    for :func:`~dist_hooks.reader.open_run`."""
    if (Path(run_dir) / MANIFEST).is_file():
        _refuse_tensorboard(load_manifest(run_dir), hook)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plot needs matplotlib: pip install 'dist_hooks[plot]' "
                                     "(or pip install matplotlib)") from None
    fmt = output_format(out)

    run = open_run(run_dir, rank_roots, storage_options=storage_options, cache=cache)
    with naming_url(run.mirror):
        if run.url is not None and run.path is not None:
            _refuse_tensorboard(run.manifest, hook)
        try:
            cols = run.logs(hook)
        except KeyError as exc:
            raise RunError(str(exc.args[0] if exc.args else exc)) from None
        fig = Figure(layout="constrained")
        FigureCanvasAgg(fig)
        try:
            info = draw(fig, run, cols, per_atom=per_atom, title=_name(run_dir))
        except RunError as exc:
            raise RunError(f"log {hook!r}: {exc}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}{out.suffix}"
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": fmt, **info, "figure": fig}
