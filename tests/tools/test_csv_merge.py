"""The CSV merge of consolidate and its typed Parquet copy, against pandas reading the merged
CSV (an independent parser): column types that settle only after the first window, text, empty
fields, and the crc32 the summary records."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dist_hooks.reader import Unit
from dist_hooks.store.manifest import CsvCommit
from dist_hooks.store.csv_log import CsvLog
from dist_hooks.tools.csv_merge import merge_csv, write_parquet as _write_parquet


def _write_rank(run: Path, rank: int, blocks: list[dict]) -> Unit:
    rel = f"logs/log/rank-{rank:05d}.csv"
    log = CsvLog(run / rel)
    for b in blocks:
        log.append(b)
    log.sync()
    unit = Unit(rank, "log", CsvCommit(str(rel), log.size, log.rows, log.crc32))
    log.close()
    return unit


def _block(rank: int, steps: range, extra: dict) -> dict:
    n = len(steps) * 3
    step = np.repeat(np.array(steps, dtype=np.int64), 3)
    cols = {"step": step,
            "sample_id": np.tile(np.arange(3, dtype=np.int64), len(steps)) + 10 * rank,
            "graph_idx": np.tile(np.arange(3, dtype=np.int64), len(steps)),
            "status": np.zeros(n, np.int64), "energy": -1.0 - 0.25 * step.astype(np.float64)}
    cols.update({k: (v(n) if callable(v) else v) for k, v in extra.items()})
    return cols


def _run(tmp_path: Path, late: dict) -> list[Unit]:
    """Two ranks, 40 steps; ``late`` columns change from their early values at step 30."""
    units = []
    for r in range(2):
        early = {"count": lambda n: np.arange(n, dtype=np.int64),
                 "flag": lambda n: np.arange(n) % 2 == 0}
        early.update({k: v[0] for k, v in late.items()})
        later = {"count": lambda n: np.arange(n, dtype=np.int64),
                 "flag": lambda n: np.arange(n) % 3 == 0}
        later.update({k: v[1] for k, v in late.items()})
        units.append(_write_rank(tmp_path, r, [_block(r, range(0, 30), early),
                                               _block(r, range(30, 40), later)]))
    return units


def _check(tmp_path: Path, units: list[Unit], expect_inline: bool, kinds: dict) -> None:
    out, pq = tmp_path / "out.csv", tmp_path / "out.parquet"
    res = merge_csv(units, tmp_path, out, block_bytes=1 << 10, parquet_out=pq)
    assert res["problems"] == []
    assert res["crc32"] == zlib.crc32(out.read_bytes())
    assert {k: res["kinds"][k] for k in kinds} == kinds
    assert res["parquet"] is expect_inline
    assert pq.exists() is expect_inline
    if not expect_inline:  # what consolidate then does: a copy from the merged CSV
        assert _write_parquet(out, pq, res["columns"], res["kinds"])
    ref = pd.read_csv(out)
    assert len(ref) == res["rows"] == 2 * 40 * 3
    keys = ref[["step", "rank", "sample_id"]].to_numpy()
    assert (np.diff(keys[:, 0]) >= 0).all()
    got = pd.read_parquet(pq)
    assert list(got.columns) == list(ref.columns)
    for c in ref.columns:
        want = ref[c]
        if kinds.get(c) == "str":  # pandas guesses types; the copy keeps text as text
            want = pd.read_csv(out, dtype={c: str}, keep_default_na=False)[c]
            assert got[c].fillna("").tolist() == want.tolist(), c
        else:
            pd.testing.assert_series_equal(got[c], want, check_exact=True, check_names=False)


def test_types_known_from_the_first_window(tmp_path: Path) -> None:
    units = _run(tmp_path, {})
    _check(tmp_path, units, True, {"count": "int", "flag": "bool", "energy": "float"})


@pytest.mark.parametrize("late, kinds", [
    # integers first, then fractions: a float column (its first windows said int)
    ({"x": (lambda n: np.arange(n, dtype=np.int64), lambda n: np.arange(n) + 0.5)},
     {"x": "float"}),
    # numbers, then text
    ({"x": (lambda n: np.arange(n, dtype=np.int64), lambda n: np.array(["a"] * n))},
     {"x": "str"}),
    # empty fields, then floats
    ({"x": (lambda n: np.array([None] * n, dtype=object), lambda n: np.full(n, 2.5))},
     {"x": "float"}),
], ids=["int-then-float", "int-then-text", "empty-then-float"])
def test_types_that_settle_late(tmp_path: Path, late: dict, kinds: dict) -> None:
    units = _run(tmp_path, late)
    _check(tmp_path, units, False, kinds)


def test_wider_values_fit_the_first_type(tmp_path: Path) -> None:
    """Fractions first, then whole numbers: the column stays float, and the copy is written
    in one pass (1 and 2 are cast to 1.0 and 2.0)."""
    units = _run(tmp_path, {"x": (lambda n: np.arange(n) + 0.5,
                                  lambda n: np.arange(n, dtype=np.int64))})
    _check(tmp_path, units, True, {"x": "float"})
