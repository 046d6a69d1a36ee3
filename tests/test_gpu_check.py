"""bench/gpu_check.py (scripts/gpu_check.sh's Python part) runs end to end in its tiny CPU mode, so
that the GPU check cannot rot between the sessions that get a GPU."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before Triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_quick_cpu(tmp_path):
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["models"]) == {"builtin", "qwen3-tiny"}
    checked = report["models"]["qwen3-tiny"]
    assert checked["kernels"]["ok"] and checked["checks"]["graphs_equal_eager_fp32"]
    assert 0 <= checked["checks"]["bf16_vs_fp32_match_rate"] <= 1
    for m in report["models"].values():
        plans = {r["plan"] for r in m["throughput"]}
        assert {"AR", "two-pass K=2", "fused K=2", "auto"} <= plans
        assert all(r["tokens"] > 0 for r in m["throughput"] if "skipped" not in r)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| auto | 2 |" in table and "qwen3-tiny" in table
