"""benchmarks/downlink.py: its frame measurement and report, on a small state built here (the real run
trains MiniLM and runs the demo per codec; see benchmarks/results/downlink.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "downlink.py"


@pytest.fixture(scope="module")
def downlink() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ffm_benchmark_downlink", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # also checks that a script loaded by path finds benchmarks/_common.py
    return module


def test_frames_shrink_with_the_codec_and_only_lossy_codecs_err(downlink: ModuleType) -> None:
    rng = np.random.default_rng(0)
    state = {"a": rng.normal(0, 0.1, (256, 64)).astype(np.float32), "b": rng.normal(0, 1, 64).astype(np.float32)}
    rows = {r["codec"]: r for r in downlink.measure_frames(state, "lora", "tiny", repeats=1)}
    assert list(rows) == ["fp32", "fp16", "int8"]
    assert rows["fp32"]["vs_fp32"] == 1.0 and rows["fp32"]["rel_l2_error"] == 0.0
    assert 0.45 < rows["fp16"]["vs_fp32"] < 0.55 and 0.2 < rows["int8"]["vs_fp32"] < 0.3
    assert 0 < rows["fp16"]["rel_l2_error"] < rows["int8"]["rel_l2_error"] < 0.01
    assert all(r["served_as"] == r["codec"] and r["elements"] == 256 * 64 + 64 for r in rows.values())


def test_frames_report_the_fp32_fallback(downlink: ModuleType) -> None:
    rows = downlink.measure_frames({"w": np.array([1.0, 1e5], np.float32)}, "full_q8", "tiny", repeats=1)
    fp16 = next(r for r in rows if r["codec"] == "fp16")
    assert fp16["served_as"] == "fp32" and "fp16" in fp16["fallback_reason"] and fp16["rel_l2_error"] == 0.0


def test_report_renders_frames_and_federations(downlink: ModuleType) -> None:
    rng = np.random.default_rng(1)
    frames = downlink.measure_frames({"a": rng.normal(size=(32, 8)).astype(np.float32)}, "lora", "tiny", repeats=1)
    runs = [
        {"codec": c, "repeat": 0, "metric": "accuracy", "values": [0.5, v], "bytes_down_per_client_round": b,
         "wall_s": 10.0}
        for c, v, b in (("fp32", 0.8, 300_000.0), ("int8", 0.79, 80_000.0))
    ]  # fmt: skip
    result = {
        "model": "tiny", "sentences": 8, "repeats": 1, "cpus": 2, "timestamp": "now", "frames": frames,
        "federations": runs, "demo": {"clients": 3, "rounds": 1, "data": "built"}, "plot": None,
    }  # fmt: skip
    text = downlink.render_markdown(result)
    assert "| lora | int8 | int8 | 256 |" in text
    assert "| int8 | 0.5000 | 0.7900 | 80,000 | 0.267 | 10 |" in text
    assert "fp32-0 0.8000, int8-0 0.7900" in text
