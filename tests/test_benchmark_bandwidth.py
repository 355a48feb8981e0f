"""The bandwidth benchmark (benchmarks/bandwidth.py) on a small configuration with the real MiniLM.

Flower is optional here: the benchmark uses benchmarks/.flower-venv when it exists, otherwise the Flower
entry must say plainly that it is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_helpers import load_benchmark


@pytest.fixture(scope="module")
def bandwidth() -> ModuleType:
    return load_benchmark("bandwidth")


@pytest.mark.parametrize("payload_size", [0, 1, 100, 16_000, 16_400, 65_536, 65_900, 2_100_000])
def test_publish_overhead_matches_amqtt(bandwidth: ModuleType, payload_size: int) -> None:
    pytest.importorskip("amqtt")
    from amqtt.mqtt.publish import PublishPacket

    topic = "ffm/v1/demo/up/edge-0/update"
    payload = b"\x00" * payload_size
    for qos in (0, 1):
        packet = PublishPacket.build(topic, payload, 1 if qos else None, False, qos, False)
        assert len(packet.to_bytes()) == payload_size + bandwidth.publish_overhead(topic, payload_size, qos)


def test_remaining_length_boundaries(bandwidth: ModuleType) -> None:
    size = bandwidth.remaining_length_size
    assert [size(v) for v in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455)] == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
    ]
    with pytest.raises(ValueError):
        size(268_435_456)


def test_flower_missing_is_explicit(bandwidth: ModuleType, tmp_path: Path) -> None:
    import numpy as np

    delta = {"w": np.ones((2, 3), np.float32)}
    assert bandwidth.measure_flower(delta, None, "no flower here", 1) == {
        "status": "missing",
        "reason": "no flower here",
    }
    broken = bandwidth.measure_flower(delta, tmp_path / "no-such-python", "test", 1)
    assert broken["status"] == "missing" and broken["reason"]


def test_benchmark_small_run(bandwidth: ModuleType, tmp_path: Path) -> None:
    python, reason = bandwidth.find_flower_python(None, setup=False)
    settings = bandwidth.Settings(num_sentences=8, repeats=1, chunk_size=32 * 1024)
    result = bandwidth.run_benchmark(settings, flower_python=python, flower_reason=reason, out_dir=tmp_path)

    written = json.loads((tmp_path / "bandwidth.json").read_text(encoding="utf-8"))
    assert written["settings"]["num_sentences"] == 8
    markdown = (tmp_path / "bandwidth.md").read_text(encoding="utf-8")
    assert "| FFM int8 |" in markdown

    rows = {row["codec"]: row for row in written["codecs"]}
    assert set(rows) == {"fp32", "fp16", "int8"}
    for key in ("payload_bytes", "envelope_bytes", "chunk_frames_bytes", "mqtt_publish_bytes"):
        assert rows["int8"][key] < rows["fp16"][key] < rows["fp32"][key], key
    for row in rows.values():
        assert row["payload_bytes"] < row["envelope_bytes"] < row["chunk_frames_bytes"] < row["mqtt_publish_bytes"]
        assert row["chunk_headers_bytes"] > 0 and row["mqtt_messages"] >= 1
        assert row["mqtt_publish_overhead_bytes"] == row["mqtt_publish_bytes"] - row["chunk_frames_bytes"]
        assert sum(row["payload_breakdown"].values()) == row["payload_bytes"]
        assert (row["payload_breakdown"]["scale_bytes"] > 0) == (row["codec"] == "int8")
    assert rows["fp32"]["max_abs_error"] == 0.0
    assert 0 < rows["fp16"]["relative_l2_error"] < rows["int8"]["relative_l2_error"] < 0.05

    model = written["model"]
    assert 0 < model["trainable_parameters"] < model["model_parameters"]
    assert written["delta"]["l2_norm"] > 0  # a real training delta, not zeros
    for codec, ratio in written["ratios"].items():
        assert ratio["ffm_wire_over_full_model_fp32"] == pytest.approx(
            rows[codec]["chunk_frames_bytes"] / model["full_model_fp32_bytes"]
        )

    flower = written["flower"]
    assert flower["status"] in ("measured", "missing")
    if flower["status"] == "measured":
        assert flower["total_bytes"] == flower["tensors_bytes"] + flower["tensor_type_bytes"]
        assert flower["tensors_bytes"] > flower["raw_float32_bytes"] == 4 * model["trainable_parameters"]
        assert written["ratios"]["fp32"]["ffm_wire_over_flower"] == pytest.approx(
            rows["fp32"]["chunk_frames_bytes"] / flower["total_bytes"]
        )
    else:
        assert flower["reason"]
        assert all(r["ffm_wire_over_flower"] is None for r in written["ratios"].values())
        assert "Flower column missing" in markdown
    assert result["environment"]["torch"] and result["environment"]["cpu_count"]
