"""The hook benchmarks run end to end at tiny sizes and report what they promise (no timing limits).

``bench_hooks.py`` and ``bench_firing.py`` are run as scripts (a subprocess, under a timeout), the way
people run them; their JSON is checked for every size, variant and count. In-process: the seed-style
reference logger writes the rows ``LoggingHook`` writes (the comparison is of designs, not of data),
and ``bench_firing`` skips a LoggingHook option the installed hook refuses instead of failing.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from dist_hooks import LoggingHook
from dist_hooks.demo.workload import LennardJones, make_batch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TINY = ["--systems", "1,4", "--steps", "5", "--reps", "1", "--min-atoms", "8", "--max-atoms", "16"]
FIRING_TINY = TINY + ["--warmup", "1", "--buffers", "1", "--profile-firings", "3"]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(name: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args, "--device", "cpu",
                           "--out", str(tmp_path / "scratch"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_hooks_runs_every_size(tmp_path):
    res = run_script("bench_hooks", TINY, tmp_path)
    assert sorted(res["sizes"]) == ["1", "4"]
    for B, size in res["sizes"].items():
        assert size["systems"] == int(B) and size["atoms"] >= 8 * int(B)
        assert list(size["variants"]) == ["none", "seed_csv", "log", "snap10", "all"]
        for v in size["variants"].values():
            assert positive(v["ms_per_step"]) and positive(v["ratio"]) and len(v["all_ms"]) == 1
        assert size["variants"]["none"]["ratio"] == 1.0
    assert "variants" not in res  # the one-size layout is only kept for one size


def test_bench_hooks_one_size_keeps_the_earlier_layout(tmp_path):
    js = tmp_path / "h.json"
    assert load("bench_hooks").main(["--device", "cpu", "--systems", "3", "--steps", "3", "--warmup", "1",
                                     "--reps", "1", "--variants", "none,seed_csv", "--out",
                                     str(tmp_path / "s"), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["systems"] == 3 and list(res["variants"]) == ["none", "seed_csv"]
    assert res["variants"] == res["sizes"]["3"]["variants"]


def test_bench_firing_reports_every_hook(tmp_path):
    res = run_script("bench_firing", FIRING_TINY, tmp_path)
    assert positive(res["sizes"]["1"]["unit_us"])
    assert sorted(res["sizes"]) == ["1", "4"]
    for size in res["sizes"].values():
        assert positive(size["unit_us"]) and size["unit_launches"]["aten_top"] == 1.0
        assert list(size["hooks"]) == ["log", "snap", "converged"] and not size["skipped"]
        for h in size["hooks"].values():
            for k in ("us_per_firing", "us_median_call", "units", "flush_ms"):
                assert positive(h[k]), k
            c = h["launches_per_firing"]
            # a fused LoggingHook may dispatch no aten op at all: then it launched Warp kernels
            assert c["aten_events"] >= c["aten_top"] >= 0 and c["warp_launches"] >= 0
            assert c["aten_top"] + c["warp_launches"] >= 0.9, c


def test_seed_logger_writes_the_rows_of_logging_hook(tmp_path):
    """Same header, same integer columns, float columns equal to float32 precision."""
    bench = load("bench_hooks")
    batch = make_batch(5, min_atoms=4, max_atoms=12, seed=1, temperature_k=30.0)
    out = LennardJones()(batch)
    batch.forces.copy_(out["forces"])
    batch.energy.copy_(out["energy"].reshape(batch.energy.shape))
    batch.status[1, 0] = 1
    seed = bench.SeedStyleLogger(tmp_path / "seed.csv")
    ours = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    for step in range(3):
        ctx = SimpleNamespace(batch=batch, step_count=step)
        seed(ctx)
        ours(ctx)
        batch.velocities.mul_(1.5)
    seed.close()
    ours.close()
    with open(tmp_path / "seed.csv", newline="") as fh:
        a = list(csv.reader(fh))
    with open(ours.path, newline="") as fh:
        b = list(csv.reader(fh))
    assert a[0] == b[0] == list(bench.SeedStyleLogger.COLUMNS)
    assert len(a) == len(b) == 1 + 3 * 5
    for ra, rb in zip(a[1:], b[1:]):
        assert ra[:5] == rb[:5]
        assert [float(x) for x in ra[5:]] == pytest.approx([float(x) for x in rb[5:]], rel=1e-5)


def test_bench_firing_skips_an_option_the_hook_refuses(tmp_path, monkeypatch, capsys):
    """A reductions= value refused at construction or at the first firing is a note, not a failure."""
    bench = load("bench_firing")

    class Hook(LoggingHook):
        def __init__(self, *a, reductions=None, **kw):
            if reductions == "auto":
                raise TypeError("unexpected keyword argument 'reductions'")
            super().__init__(*a, **kw)
            self.reductions = reductions

        def __call__(self, ctx, stage=None):
            if self.reductions == "fused":
                raise ValueError("no Warp kernel for this device")
            return super().__call__(ctx, stage)

    monkeypatch.setattr(bench, "LoggingHook", Hook)
    js = tmp_path / "f.json"
    assert bench.main(["--device", "cpu", "--systems", "2", "--steps", "3", "--reps", "2", "--warmup", "1",
                       "--buffers", "1", "--profile-firings", "2", "--hooks", "log",
                       "--log-reductions", "auto,eager,fused", "--out", str(tmp_path / "s"),
                       "--json", str(js)]) == 0
    size = json.loads(js.read_text())["sizes"]["2"]
    assert list(size["hooks"]) == ["log", "log[eager]"]
    assert len(size["hooks"]["log[eager]"]["all_us"]) == 2
    assert size["skipped"]["log[auto]"].startswith("refused at construction: TypeError")
    assert size["skipped"]["log[fused]"].startswith("refused at its first firing: ValueError")
    printed = capsys.readouterr().out
    assert "log[auto] skipped" in printed and "log[fused] skipped" in printed


def test_bench_boundary_runs_on_disk_and_on_the_object_store(tmp_path):
    """Both storages at the smallest size, side by side: a row each, every figure there."""
    out = tmp_path / "boundary.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_boundary.py"), "--procs", "1",
                           "--volumes", "small", "--storage", "local,s3", "--boundaries", "3",
                           "--steps", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["storage"] for r in rows] == ["local", "s3"]
    for r in rows:
        assert all(positive(r[k]) for k in ("stall_ms", "coordinate_ms", "interval_ms",
                                            "MB_per_s_per_rank", "record_bytes")), r
