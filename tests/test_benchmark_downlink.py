"""benchmarks/downlink.py: its frame measurement and report, on a small state built here (the real run
trains MiniLM and runs the demo per codec; see benchmarks/results/downlink.md)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from bench_helpers import load_benchmark


@pytest.fixture(scope="module")
def downlink() -> ModuleType:
    return load_benchmark("downlink")


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


def test_report_renders_frames_and_federations_with_paired_differences(downlink: ModuleType) -> None:
    rng = np.random.default_rng(1)
    frames = downlink.measure_frames({"a": rng.normal(size=(32, 8)).astype(np.float32)}, "lora", "tiny", repeats=1)
    finals = {("fp32", 0): 0.80, ("int8", 0): 0.79, ("fp32", 1): 0.83, ("int8", 1): 0.84}
    runs = [
        {"codec": c, "seed": seed, "repeat": 0, "metric": "accuracy", "values": [0.5, 0.7, v],
         "bytes_down_per_client_round": 300_000.0 if c == "fp32" else 80_000.0, "wall_s": 10.0}
        for (c, seed), v in finals.items()
    ] + [{"codec": "fp32", "seed": 0, "repeat": 1, "metric": "accuracy", "values": [0.5, 0.7, 0.80],
          "bytes_down_per_client_round": 300_000.0, "wall_s": 10.0}]  # fmt: skip
    paired = downlink.paired_differences(runs)
    assert paired["int8"]["seeds"] == [0, 1]
    assert paired["int8"]["final_minus_fp32"] == pytest.approx([-0.01, 0.01])
    assert paired["int8"]["mean_minus_fp32"] == pytest.approx([-0.005, 0.005])
    assert paired["fp16"]["final_minus_fp32"] == []
    assert paired["fp32_seed_spread"]["final"] == pytest.approx([0.03])
    assert paired["fp32_repeat_identical"] == [True]
    result = {
        "model": "tiny", "sentences": 8, "repeats": 1, "cpus": 2, "timestamp": "now", "frames": frames,
        "federations": runs, "demo": {"clients": 3, "rounds": 2, "data": "built"}, "plot": None, "paired": paired,
    }  # fmt: skip
    text = downlink.render_markdown(result)
    assert "| lora | int8 | int8 | 256 |" in text
    assert "| int8, seed 0 | 0.5000 | 0.7000 | 0.7900 | 80,000 | 0.267 | 10 |" in text
    assert "| fp32, seed 0, run 2 |" in text
    assert "- int8: final version -1.0, +1.0; mean over versions 1-2 -0.5, +0.5." in text
    assert "fp32 at one seed minus fp32 at the other: final +3.0" in text
    assert "gave identical accuracies" in text
