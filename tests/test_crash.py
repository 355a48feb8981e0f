"""``kill -9`` of the hub with server momentum: the momentum committed with each version is the one its
step used, across a SIGKILL and a restart.

The loss-free, count-once side of a hub crash (four points, three trials each, on both brokers) is the
``hub_kill`` scenario of the reliability suite (tests/test_reliability_faults.py); this test reuses its
runner, :func:`ffm_hub.reliability.fault_scenarios.run_hub_crash`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ffm_edge.wire import decode_global, decode_update
from ffm_hub.brokers import ManagedBroker
from ffm_hub.reliability.fault_scenarios import run_hub_crash
from ffm_hub.store import SqliteStore


@pytest.mark.parametrize("point", ["aggregating", "committing"])
def test_hub_kill_9_keeps_server_momentum_with_its_version(
    point: str, mqtt_broker: ManagedBroker, tmp_path: Path
) -> None:
    """FedAvgM: the momentum committed with each version is the one its step used, across a SIGKILL."""
    from safetensors.numpy import load as load_tensors

    run = run_hub_crash(mqtt_broker, tmp_path / "hub", point, 2, optimizer="fedavgm")
    assert run.exit_codes == (-9,), "the fault fired exactly once"
    assert run.stop_code == 0 and run.receipted == set(run.frames) and not run.went_backwards
    store = SqliteStore(run.state_dir)
    try:
        versions = store.versions()
        assert len(versions) > 1 and [v.version for v in versions] == list(range(len(versions)))
        momentum = np.zeros((2, 3), np.float64)
        for record in versions[1:]:  # u = 0.5 u + mean delta; version = parent + u (η = 1)
            ids = [u for u in run.frames if store.get_update(u).aggregated_into == record.version]  # type: ignore[union-attr]
            metas = [decode_update(store.load_update(u)) for u in ids]
            total = sum(m.num_samples for m, _ in metas)
            momentum = 0.5 * momentum + sum(d["lora_A"] * m.num_samples / total for m, d in metas)
            assert record.parent is not None
            _, before = decode_global(store.load_version(record.parent))
            _, after = decode_global(store.load_version(record.version))
            np.testing.assert_allclose(after["lora_A"], before["lora_A"] + momentum, rtol=1e-6)
            blob = store.load_server_state(record.version)
            assert blob is not None
            np.testing.assert_allclose(load_tensors(blob)["momentum_buffer/lora_A"], momentum, rtol=1e-6)
    finally:
        store.close()
