"""Prometheus metrics of a real hub (in-memory transport, plain arrays), scraped over HTTP."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from wire_device import FED, Device, memory_hub

from ffm_edge.errors import ConfigError
from ffm_edge.wire import (
    Receipt,
    Rejection,
)
from ffm_hub.metrics import start_metrics_server  # imports prometheus_client lazily

parser = pytest.importorskip("prometheus_client.parser")


def delta(value: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), value, np.float32), "head": np.zeros(2, np.float32)}


@pytest.fixture()
def hub(tmp_path: Path):
    with memory_hub(tmp_path / "store") as running:
        yield running


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_of_a_running_hub(hub) -> None:
    broker, h = hub
    device = Device(broker, "d1")
    device.send_update(delta(1.0))
    assert device.next(Receipt).queue_length == 1
    device.send_update(delta(float("nan")))
    # The hub counts before it answers, so the rejection's arrival means the counters are final.
    assert device.next(Rejection).reason == "non_finite"

    server, port = start_metrics_server(h, 0)
    try:
        assert port > 0 and server.port == port
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.stop()

    assert samples[("ffm_updates_accepted_total", ())] == 1
    assert samples[("ffm_updates_duplicate_total", ())] == 0
    assert samples[("ffm_updates_rejected_total", (("reason", "non_finite"),))] == 1
    assert samples[("ffm_queue_length", ())] == 1
    assert samples[("ffm_global_version", ())] == 0
    assert samples[("ffm_versions_total", ())] == 1  # the initial version
    assert samples[("ffm_devices_online", ())] == 1
    assert samples[("ffm_devices_known", ())] == 1
    assert samples[("ffm_tau", ())] == 2
    info = (("federation", FED), ("hub_id", "hub"), ("model", "unknown"), ("strategy", "lora"))
    assert samples[("ffm_hub_info", info)] == 1
    assert samples[("ffm_round_bytes_in", ())] > 0
    # The initial version has no metrics yet (no evaluator).
    assert not [key for key in samples if key[0] == "ffm_global_version_metric"]


def test_version_metrics_after_an_aggregation(hub) -> None:
    broker, h = hub
    device = Device(broker, "d1")
    for value in (1.0, 3.0):
        device.send_update(delta(value))
        device.next(Receipt)
    deadline = time.monotonic() + 10  # the hub aggregates just after its second receipt
    while h.counters["versions"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.current_version == 1

    with start_metrics_server(h, 0)[0] as server:
        samples = scrape(server.url)

    assert samples[("ffm_global_version", ())] == 1
    assert samples[("ffm_global_version_updates", ())] == 2
    assert samples[("ffm_queue_length", ())] == 0
    assert samples[("ffm_versions_total", ())] == 2
    metric = {dict(labels)["name"]: value for (name, labels), value in samples.items() if name.endswith("_metric")}
    assert metric["bytes_in"] > 0 and metric["aggregation_s"] >= 0
    assert {"bytes_out", "num_samples", "devices", "round_s"} <= set(metric)
    assert metric["num_samples"] == 20 and metric["devices"] == 1


def test_server_stops_and_reports_a_busy_port(hub) -> None:
    _broker, h = hub
    server, port = start_metrics_server(h, 0)
    try:
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_metrics_server(h, port)
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with pytest.raises(ConfigError, match=r"must be in \[0, 65535\]"):
        start_metrics_server(h, 70000)


def test_missing_package_is_a_config_error(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    _broker, h = hub
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match="pip install prometheus-client"):
        start_metrics_server(h, 0)
