"""`kdhar bench gpu`: the dry run goes through every configuration and writes what the GPU run would."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from kdhar.gpu_check import DEFAULT_JSON, EAGER, default_json_path, peak_tflops

KDHAR = [sys.executable, "-m", "kdhar.cli"]


@pytest.mark.slow
def test_dry_run_measures_every_configuration_and_writes_the_chosen_settings(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    # Run from an empty folder: the default dataset root is absent there, as on a clean clone, so
    # the check makes its own small synthetic set.
    done = subprocess.run([*KDHAR, "bench", "gpu", "--dry-run", "--json", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())

    assert res["dry_run"] is True and res["device"]["type"] == "cpu"
    # bf16 x channels_last_3d eager, and torch.compile on the best of them, for teacher and student
    for role in ("teacher", "student"):
        rows = [c for c in res["configs"] if c["model"] == role]
        assert {c["setting"] for c in rows if not c["compile"]} == {s.name for s in EAGER}
        assert [c["setting"].endswith("+compile") for c in rows].count(True) == 1
    assert len(res["configs"]) == 10
    for c in res["configs"]:
        assert c["error"] is None, c
        assert math.isfinite(c["clips_per_s"]) and c["clips_per_s"] > 0, c
        assert "mfu" in c and c["mfu"] is None  # no known peak for a CPU
    assert [m["arch"] for m in res["models"].values()] == ["c3d", "tiny3d"]  # kdhar distill's defaults
    assert res["models"]["student"]["teacher_forward_gflops_per_clip"] > 0
    assert set(res["chosen"]) == {"bf16", "channels_last", "compile"}
    assert all(isinstance(v, bool) for v in res["chosen"].values())
    assert res["engine_default"] == {"bf16": True, "channels_last": True, "compile": False}
    assert res["peak_tflops"] is None and res["peak_source"] == "unknown"
    assert res["data"]["generated"] is True
    assert res["loader"]["clips_per_s"] > 0 and set(res["loader_bound"]) == {"teacher", "student"}
    assert res["end_to_end"] and all(e["clips_per_s"] > 0 for e in res["end_to_end"])

    table = done.stdout
    assert "clips/s" in table and "peak MiB" in table and "MFU" in table
    for c in res["configs"]:
        assert c["setting"] in table
    assert "chosen settings on cpu (not for CUDA): bf16 autocast" in table
    assert "loader-bound" in table and "took " in table
    assert f"wrote {out}" in table


def test_peak_table_matches_device_names_and_leaves_others_unknown():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.0)
    assert peak_tflops("NVIDIA H100 PCIe")[1] == 756.0
    assert peak_tflops("NVIDIA H200")[1] == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[1] == 312.0
    assert peak_tflops("NVIDIA A10")[1] == 125.0
    assert peak_tflops("NVIDIA L4")[1] == 121.0
    assert peak_tflops("NVIDIA L40S")[1] == 362.0
    assert peak_tflops("NVIDIA GeForce RTX 4090")[1] == 165.0
    assert peak_tflops("NVIDIA A10G") is None
    assert peak_tflops("Tesla T4") is None  # no bf16 tensor cores


def test_results_go_to_out_when_it_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    assert default_json_path() == DEFAULT_JSON
    monkeypatch.setenv("OUT", str(tmp_path))
    assert default_json_path() == tmp_path / "gpu.json"
