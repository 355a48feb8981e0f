"""Privacy accounting of dp_fedavg: ε per version, the budget, and that nothing is lost when it is spent.

The conversion from GDP to (ε, δ) is checked against Google's dp_accounting (a PLD accountant, which is
exact for Gaussian mechanisms up to its discretization) and against the definition of δ(ε) itself. The
hub is checked on the in-memory fake and on both real brokers (a ``budget_exhausted`` rejection reaches
the device), and across a restart (the privacy spent comes back from the store).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from wire_device import FED, Device, start_hub

from ffm_edge.errors import ConfigError
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport, Transport
from ffm_edge.wire import Receipt, Rejection
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.privacy import compose_mu, gdp_delta, gdp_epsilon, round_mu
from ffm_hub.status import format_status, hub_snapshot
from ffm_hub.store import SqliteStore

STATE = {"w": np.zeros(4, np.float32)}
STEP = {"w": np.full(4, 0.1, np.float32)}


# -- the accountant ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (1.0, 10), (4.0, 50), (10.0, 1), (0.8, 30)])
def test_epsilon_matches_dp_accounting_pld_and_rdp_is_looser(z: float, rounds: int) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    mu = compose_mu([round_mu(z)] * rounds)
    ours = gdp_epsilon(mu, 1e-5)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(z), rounds)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert ours == pytest.approx(pld.get_epsilon(1e-5), rel=1e-3)
    assert ours < rdp.get_epsilon(1e-5)  # RDP's conversion is an upper bound, ours is the tight one


def test_epsilon_inverts_delta_and_edge_cases() -> None:
    for mu in (0.05, 0.5, 1.0, 3.0, 20.0):
        for delta in (1e-3, 1e-5, 1e-9):
            epsilon = gdp_epsilon(mu, delta)
            assert gdp_delta(mu, epsilon) == pytest.approx(delta, rel=1e-6)
            assert gdp_delta(mu, epsilon * 0.99) > delta  # and it is the smallest such ε
    assert gdp_epsilon(0.0, 1e-5) == 0.0  # no rounds: nothing spent
    assert gdp_epsilon(1e-4, 0.5) == 0.0  # δ so large that ε = 0 holds
    assert math.isinf(gdp_epsilon(round_mu(0.0), 1e-5))  # z = 0: no noise, no privacy
    assert compose_mu([round_mu(2.0)] * 4) == pytest.approx(1.0)  # sqrt(4) / 2
    assert round_mu(2.0, device_updates=3) == 1.5  # one device with 3 updates: 3x the sensitivity
    assert gdp_epsilon(1.0, 1e-5) < gdp_epsilon(2.0, 1e-5) < gdp_epsilon(2.0, 1e-7)
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, 0.0)
    with pytest.raises(ValueError, match="device_updates"):
        round_mu(1.0, 0)


# -- the hub ----------------------------------------------------------------------------------------------
def _dp_settings(**kwargs: object) -> HubSettings:
    return HubSettings(federation=FED, tau=2, aggregator="dp_fedavg", dp_noise_multiplier=2.0, dp_seed=1, **kwargs)  # type: ignore[arg-type]


def _hub(store: SqliteStore, settings: HubSettings, transport: Transport) -> Hub:
    return start_hub(transport, store, settings, STATE)


def test_every_dp_version_records_the_privacy_spent_so_far(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    store = SqliteStore(tmp_path / "store")
    hub = _hub(store, _dp_settings(dp_delta=1e-6), InMemoryTransport(broker, "hub"))
    d1, d2 = Device(broker, "d1"), Device(broker, "d2")
    try:
        for round_ in (1, 2, 3):
            d1.send_update(STEP, base=round_ - 1)
            d1.next(Receipt)
            # Round 3: d1 sends both updates, so one device holds 2 of them: μ_3 = 2 / z = 1.
            (d1 if round_ == 3 else d2).send_update(STEP, base=round_ - 1)
            (d1 if round_ == 3 else d2).next(Receipt)
            assert hub.wait_for_version(round_) and hub.wait_idle()
        mus = [0.5, 0.5, 1.0]
        for version in (1, 2, 3):
            record = store.get_version(version)
            assert record is not None
            mu = compose_mu(mus[:version])
            assert record.metrics["dp_device_updates"] == (2.0 if version == 3 else 1.0)
            assert record.metrics["dp_mu"] == pytest.approx(mu)
            assert record.metrics["dp_epsilon"] == pytest.approx(gdp_epsilon(mu, 1e-6))
            assert record.metrics["dp_delta"] == 1e-6
        privacy = hub.privacy
        assert privacy is not None and privacy["spent"] is None and privacy["max_epsilon"] is None
        assert privacy["epsilon"] == pytest.approx(gdp_epsilon(math.sqrt(1.5), 1e-6))
        text = format_status(hub_snapshot(hub))
        assert f"privacy (dp_fedavg): ε = {privacy['epsilon']:.4g} at δ = 1e-06 (no budget set)" in text
    finally:
        hub.stop()
        store.close()


def test_no_round_overspends_the_budget_and_nothing_queued_is_lost(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    # z = 2: a round of one update per device is μ = 0.5, one with a device's 2 updates μ = 1.
    one, two = gdp_epsilon(0.5, 1e-5), gdp_epsilon(compose_mu([0.5, 1.0]), 1e-5)
    budget = (gdp_epsilon(compose_mu([0.5, 0.5]), 1e-5) + two) / 2  # round 2 fits with 1 update each, not with 2
    store = SqliteStore(tmp_path / "store")
    hub = _hub(store, _dp_settings(dp_max_epsilon=budget), transport)
    d1, d2 = Device(broker, "d1"), Device(broker, "d2")
    d1.send_update(STEP)
    d1.next(Receipt)
    d2.send_update(STEP)
    d2.next(Receipt)
    assert hub.wait_for_version(1) and hub.wait_idle()
    latest = store.latest_version()
    assert latest is not None and latest.metrics["dp_epsilon"] == pytest.approx(one)
    # d1 sends 2 updates: that round would cost more than the budget, so it does not run.
    for _ in range(2):
        d1.send_update(STEP, base=1)
        d1.next(Receipt)
    assert hub.wait_idle()
    assert hub.current_version == 1 and len(store.queued()) == 2  # kept, not aggregated, not dropped
    privacy = hub.privacy
    assert privacy is not None and isinstance(privacy["spent"], str) and "budget ε" in privacy["spent"]
    update_id = d2.send_update(STEP, base=1)  # from now on updates are refused with a reason
    rejection = d2.next(Rejection)
    assert isinstance(rejection, Rejection) and rejection.known_reason
    assert (rejection.update_id, rejection.reason) == (update_id, "budget_exhausted")
    assert "BUDGET SPENT" in format_status(hub_snapshot(hub))
    hub.stop()
    store.close()

    # A restart with the same budget: still spent (the privacy spent comes from the store).
    store = SqliteStore(tmp_path / "store")
    hub = _hub(store, _dp_settings(dp_max_epsilon=budget), transport)
    assert hub.wait_idle() and hub.current_version == 1 and len(store.queued()) == 2
    assert hub.privacy is not None and hub.privacy["spent"] is not None
    hub.stop()
    # The operator raises the budget: the queued updates are aggregated, none was lost.
    hub = _hub(store, _dp_settings(dp_max_epsilon=2 * two), transport)
    assert hub.wait_for_version(2) and hub.wait_idle()
    latest = store.latest_version()
    assert latest is not None and latest.num_updates == 2 and latest.metrics["dp_device_updates"] == 2.0
    assert latest.metrics["dp_epsilon"] == pytest.approx(two)
    hub.stop()
    store.close()


def test_a_round_without_noise_has_no_privacy(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    store = SqliteStore(tmp_path / "store")
    settings = HubSettings(federation=FED, tau=1, aggregator="dp_fedavg", dp_noise_multiplier=0.0)
    hub = _hub(store, settings, InMemoryTransport(broker, "hub"))
    d1 = Device(broker, "d1")
    d1.send_update(STEP)
    d1.next(Receipt)
    assert hub.wait_for_version(1) and hub.wait_idle()
    latest = store.latest_version()
    assert latest is not None and "dp_epsilon" not in latest.metrics and latest.metrics["dp_device_updates"] == 1
    assert hub.privacy is not None and hub.privacy["epsilon"] is None
    assert "no privacy" in format_status(hub_snapshot(hub))
    hub.stop()
    hub = _hub(store, settings, InMemoryTransport(broker, "hub-2"))  # resumed: still no privacy, not zero
    assert hub.privacy is not None and hub.privacy["epsilon"] is None
    hub.stop()
    store.close()


def test_budget_exhausted_reaches_the_device_over_a_real_broker(tmp_path: Path, mqtt_broker: ManagedBroker) -> None:
    make: Callable[[str], Transport] = lambda name: MqttTransport(  # noqa: E731
        mqtt_broker.host, mqtt_broker.port, client_id=f"{name}-{tmp_path.name}"
    )
    store = SqliteStore(tmp_path / "store")
    # One round at z = 2 spends ε(0.5); a budget just above it allows exactly one round.
    hub = _hub(store, _dp_settings(dp_max_epsilon=gdp_epsilon(0.5, 1e-5) * 1.01), make("hub"))
    d1, d2 = Device(None, "d1", transport=make("d1")), Device(None, "d2", transport=make("d2"))
    try:
        for device in (d1, d2):
            device.send_update(STEP)
            device.next(Receipt, timeout=30)
        assert hub.wait_for_version(1, timeout=30) and hub.wait_idle()
        update_id = d1.send_update(STEP, base=1)
        rejection = d1.next(Rejection, timeout=30)
        assert isinstance(rejection, Rejection)
        assert (rejection.update_id, rejection.reason) == (update_id, "budget_exhausted")
        assert "ε = " in rejection.detail and store.queued() == []
    finally:
        d1.transport.close()
        d2.transport.close()
        hub.stop()
        hub.transport.close()
        store.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dp_delta": 0.0}, "dp_delta must be in"), ({"dp_delta": 1.5}, "dp_delta"), ({"dp_max_epsilon": -1.0}, "dp_max")],
)
def test_privacy_settings_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HubSettings(aggregator="dp_fedavg", **kwargs)  # type: ignore[arg-type]


def test_privacy_flags_and_config_keys() -> None:
    from ffm_hub.cli import build_parser
    from ffm_hub.config import validate_hub_config

    argv = ["serve", "--aggregator", "dp_fedavg", "--dp-max-epsilon", "8", "--dp-delta", "1e-6"]
    args = build_parser().parse_args(argv)
    assert (args.dp_max_epsilon, args.dp_delta) == (8.0, 1e-6)
    options = validate_hub_config({"aggregation": {"aggregator": "dp_fedavg", "dp_max_epsilon": 4.0}}).options
    assert (options.dp_max_epsilon, options.dp_delta) == (4.0, 1e-5)
    with pytest.raises(ConfigError, match=r"aggregation\.dp_delta: must be in"):
        validate_hub_config({"aggregation": {"dp_delta": 2.0}})
