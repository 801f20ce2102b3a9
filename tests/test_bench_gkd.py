"""Smoke test of benchmarks/bench_gkd.py at a tiny size: it runs, and its table has a GKD row (and
each pass's) for both variants, with finite, positive costs and ratios."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_gkd(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their shared `_timing` as a script does
    import bench_gkd

    yield bench_gkd
    sys.modules.pop("bench_gkd", None)


@pytest.mark.slow
def test_bench_gkd_tiny(bench_gkd, tmp_path, capsys):
    out = tmp_path / "gkd.json"
    rows = bench_gkd.main(["--threads", "1", "--repeats", "1", "--warmup", "0", "--batch", "2", "--crop", "32",
                           "--memory-steps", "1", "--json", str(out)])
    printed = capsys.readouterr().out

    by_key = {(r["method"], r["variant"]): r for r in rows}
    assert ("scratch", "-") in by_key and ("logit-KD", "-") in by_key
    for variant in ("faithful", "light"):
        for method in ("gkd (cvae+net)", "cvae pass", "net pass"):
            assert (method, variant) in by_key, (method, variant)
    for r in rows:
        for key in ("ms_per_step", "time_x_scratch", "time_x_kd", "peak_mb", "mem_x_scratch", "mem_x_kd",
                    "gflop", "flop_x_scratch", "flop_x_kd"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["config"], key, r[key])
    assert by_key[("scratch", "-")]["time_x_scratch"] == pytest.approx(1.0)
    assert by_key[("logit-KD", "-")]["time_x_kd"] == pytest.approx(1.0)
    for variant in ("faithful", "light"):
        # A GKD step is both passes: more FLOPs than either, and than logit KD (same teacher trunk)
        gkd = by_key[("gkd (cvae+net)", variant)]
        assert gkd["gflop"] == pytest.approx(by_key[("cvae pass", variant)]["gflop"] + by_key[("net pass", variant)]["gflop"])
        assert gkd["flop_x_kd"] > 1

    # the table printed, one line per row, and the JSON written
    for r in rows:
        assert any(r["variant"] in line and f"{r['ms_per_step']:.1f}" in line for line in printed.splitlines())
    saved = json.loads(out.read_text())
    assert [r["config"] for r in saved["rows"]] == [r["config"] for r in rows]
    assert saved["settings"]["batch"] == 2
    # at GKD's CPU preset, every row's trunks keep a time axis, and the ratio the grid is planned with is printed
    assert saved["settings"]["keep_time"] == 2 and saved["settings"]["t_prime"] == {"student": 4, "teacher": 4}
    assert saved["settings"]["teacher_modality"] == "rgb"
    for variant in ("faithful", "light"):
        ratio = by_key[("gkd (cvae+net)", variant)]["time_x_kd"]
        assert f"GKD step / logit-KD step ({variant}): {ratio:.2f}" in printed
