"""Robust and private aggregation (issue 7, part 4): each rule on hand-computed arrays, argument checks,
and the hub with 2 of 10 devices attacking, over the in-memory transport and a real Mosquitto."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.errors import ConfigError
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, Transport
from ffm_edge.transport.mqtt import MqttTransport
from ffm_edge.wire import Receipt, Rejection
from ffm_hub.aggregate import weighted_mean
from ffm_hub.brokers import MosquittoBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.robust import (
    clip_update,
    coordinate_median,
    dp_fedavg,
    krum_scores,
    krum_select,
    multi_krum,
    trimmed_mean,
    update_norm,
)
from ffm_hub.store import SqliteStore
from tests.wire_device import FED, STATE, Device


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# -- median and trimmed mean ----------------------------------------------------------------------------


def test_coordinate_median_odd_and_even_counts_per_tensor() -> None:
    deltas = [
        {"a": arr(1, -4), "b": arr(1)},
        {"a": arr(5, 0), "b": arr(2)},
        {"a": arr(3, 2), "b": arr(10)},
        {"b": arr(4)},  # a mixed federation: only "b" here
    ]
    out = coordinate_median(deltas)
    np.testing.assert_array_equal(out["a"], arr(3, 0))  # odd (3 carry "a"): the middle value
    np.testing.assert_array_equal(out["b"], arr(3))  # even (1, 2, 4, 10): mean of 2 and 4
    assert out["a"].dtype == np.float32


def test_trimmed_mean_cuts_floor_fraction_times_count_from_each_end() -> None:
    deltas = [{"a": arr(v, -v)} for v in (1, 2, 3, 4, 100)]
    np.testing.assert_allclose(trimmed_mean(deltas, 0.2)["a"], arr(3, -3))  # cut 1 each end: mean(2, 3, 4)
    np.testing.assert_allclose(trimmed_mean(deltas, 0.39)["a"], arr(3, -3))  # floor(1.95) = 1
    np.testing.assert_allclose(trimmed_mean(deltas, 0.4)["a"], arr(3, -3))  # cut 2 each end: the median
    np.testing.assert_allclose(trimmed_mean(deltas, 0.0)["a"], arr(22, -22))  # the plain mean
    # Per tensor over the updates that carry it: 4 carry "b", floor(0.25 * 4) = 1 cut each end.
    mixed = [*deltas[:4], {"a": arr(0, 0), "b": arr(7)}] + [{"b": arr(v)} for v in (1, 2, 9)]
    np.testing.assert_allclose(trimmed_mean(mixed, 0.25)["b"], arr(4.5))  # sorted 1 2 7 9: mean(2, 7)


# -- Krum -------------------------------------------------------------------------------------------------

# Five updates, each a point (x, y) split over two tensors: a = [x], b = [y]. With f = 1 every score sums
# the n - f - 2 = 2 smallest squared distances to the others (over both tensors together):
#   p0 (0.5, 0.5): to p1 .5, p2 .5, p3 2.5, p4 60.5  -> 1.0
#   p1 (0, 0):     to p0 .5, p2 1,  p3 4,   p4 72    -> 1.5
#   p2 (1, 0):     to p0 .5, p1 1,  p3 5,   p4 61    -> 1.5
#   p3 (0, 2):     to p0 2.5, p1 4, p2 5,   p4 52    -> 6.5
#   p4 (6, 6):     to p3 52, p0 60.5, p2 61, p1 72   -> 112.5
POINTS = [(0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (6.0, 6.0)]
KRUM_DELTAS = [{"a": arr(x), "b": arr(y)} for x, y in POINTS]


def test_krum_scores_and_selection_pinned() -> None:
    np.testing.assert_allclose(krum_scores(KRUM_DELTAS, f=1), [1.0, 1.5, 1.5, 6.5, 112.5])
    assert krum_select(KRUM_DELTAS, f=1) == [0]
    assert krum_select(KRUM_DELTAS, f=1, m=3) == [0, 1, 2]  # the tie 1.5 / 1.5 goes by index
    krum = multi_krum(KRUM_DELTAS, f=1, m=1)
    np.testing.assert_array_equal(krum["a"], arr(0.5))  # Krum returns the chosen update itself
    np.testing.assert_array_equal(krum["b"], arr(0.5))
    three = multi_krum(KRUM_DELTAS, f=1, m=3)  # mean of p0, p1, p2
    np.testing.assert_allclose(three["a"], arr(0.5))
    np.testing.assert_allclose(three["b"], arr(0.5 / 3))
    # f = 0: 3 nearest each; p0 -> .5 + .5 + 2.5 = 3.5, p4 -> 52 + 60.5 + 61 = 173.5
    np.testing.assert_allclose(krum_scores(KRUM_DELTAS, f=0), [3.5, 5.5, 6.5, 11.5, 173.5])


def test_krum_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2"):
        krum_scores(KRUM_DELTAS[:4], f=1)  # n = 4 is not > 4
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2"):
        krum_scores(KRUM_DELTAS, f=2)
    with pytest.raises(ConfigError, match="krum m must be <= n - f = 4"):
        krum_select(KRUM_DELTAS, f=1, m=5)
    for bad_f in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="krum f"):
            krum_scores(KRUM_DELTAS, f=bad_f)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="krum m"):
        multi_krum(KRUM_DELTAS, f=1, m=0)
    with pytest.raises(ValueError, match="same tensors"):
        krum_scores([*KRUM_DELTAS[:4], {"a": arr(1)}], f=1)  # Krum refuses mixed tensor sets
    with pytest.raises(ValueError, match="shape"):
        krum_scores([*KRUM_DELTAS[:4], {"a": arr(1, 2), "b": arr(0)}], f=1)


def test_median_and_trimmed_mean_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="at least one update"):
        coordinate_median([])
    for bad in (0.5, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="trim_fraction"):
            trimmed_mean([{"a": arr(1)}], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        coordinate_median([{"a": arr(1)}, {"a": arr(1, 2)}])


# -- clipping and DP-FedAvg ---------------------------------------------------------------------------


def test_clip_update_scales_the_whole_update() -> None:
    delta = {"a": arr(3, 0), "b": arr(4)}  # norm 5 over both tensors
    assert update_norm(delta) == 5.0
    clipped = clip_update(delta, 1.0)
    np.testing.assert_allclose(clipped["a"], arr(0.6, 0))
    np.testing.assert_allclose(clipped["b"], arr(0.8))  # same direction, norm 1
    assert update_norm(clip_update(delta, 10.0)) == 5.0  # already within C: unchanged
    assert update_norm(clip_update({"a": arr(0, 0)}, 1.0)) == 0.0
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError, match="clip norm C"):
            clip_update(delta, bad)


def test_dp_fedavg_without_noise_is_the_unweighted_mean_of_clipped_updates() -> None:
    deltas = [{"a": arr(3, 0), "b": arr(4)}, {"a": arr(0.3, 0)}]  # the second lacks "b": it counts as 0
    result = dp_fedavg(deltas, clip=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(result.mean["a"], arr(0.45, 0), rtol=1e-6)  # (0.6 + 0.3) / 2
    np.testing.assert_allclose(result.mean["b"], arr(0.4), rtol=1e-6)  # (0.8 + 0) / 2: fixed denominator τ
    assert (result.sigma, result.tau) == (0.0, 2)


def test_dp_fedavg_noise_has_sigma_z_c_over_tau_and_is_reproducible() -> None:
    deltas = [{"w": np.zeros(40_000, np.float32)} for _ in range(4)]
    result = dp_fedavg(deltas, clip=2.0, noise_multiplier=1.5, rng=np.random.default_rng(7))
    assert result.sigma == 1.5 * 2.0 / 4  # 0.75
    assert result.metrics() == {"dp_clip": 2.0, "dp_noise_multiplier": 1.5, "dp_sigma": 0.75, "dp_tau": 4.0}
    noise = result.mean["w"].astype(np.float64)
    # Standard errors with 40 000 draws: std ~ 0.75 / sqrt(2 * 40000) = 0.0027, mean ~ 0.75 / 200 = 0.0038.
    assert abs(noise.std() - 0.75) < 0.02
    assert abs(noise.mean()) < 0.02
    again = dp_fedavg(deltas, clip=2.0, noise_multiplier=1.5, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(again.mean["w"], result.mean["w"])
    other = dp_fedavg(deltas, clip=2.0, noise_multiplier=1.5, rng=np.random.default_rng(8))
    assert not np.array_equal(other.mean["w"], result.mean["w"])


def test_dp_fedavg_arguments_are_checked() -> None:
    deltas = [{"a": arr(1)}]
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="noise multiplier"):
        dp_fedavg(deltas, clip=1.0, noise_multiplier=-1.0, rng=rng)
    with pytest.raises(ConfigError, match="clip norm"):
        dp_fedavg(deltas, clip=0.0, noise_multiplier=1.0, rng=rng)
    with pytest.raises(ConfigError, match="Generator"):
        dp_fedavg(deltas, clip=1.0, noise_multiplier=1.0, rng=np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one update"):
        dp_fedavg([], clip=1.0, noise_multiplier=1.0, rng=rng)


# -- hub settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aggregator": "mean"}, "aggregator must be one of"),
        ({"aggregator": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction"),
        ({"aggregator": "krum", "tau": 4, "krum_f": 1}, r"tau > 2f \+ 2"),
        ({"aggregator": "multi_krum", "tau": 5, "krum_f": 1, "krum_m": 5}, "krum_m <= tau - krum_f = 4"),
        ({"aggregator": "multi_krum", "tau": 5, "krum_m": 0}, "krum m"),
        ({"aggregator": "dp_fedavg", "dp_clip": 0.0}, "clip norm"),
        ({"aggregator": "dp_fedavg", "dp_noise_multiplier": -1.0}, "noise multiplier"),
        ({"aggregator": "dp_fedavg", "dp_seed": -3}, "dp_seed"),
    ],
)
def test_hub_settings_check_the_aggregator(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HubSettings(**overrides)  # type: ignore[arg-type]


def test_parameters_of_an_unused_aggregator_are_not_checked() -> None:
    assert HubSettings(tau=2, trim_fraction=0.9, krum_f=5).aggregator == "fedavg"


# -- the hub under attack -------------------------------------------------------------------------------

TARGET = {"lora_A": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3) + 0.2, "head": arr(0.5, -0.7)}
N_DEVICES, N_ATTACKERS = 10, 2


def honest_deltas() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    return [
        {k: (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32) for k, v in TARGET.items()}
        for _ in range(N_DEVICES)
    ]


def attacked(deltas: list[dict[str, np.ndarray]], attack: str) -> list[dict[str, np.ndarray]]:
    factor = -1.0 if attack == "sign_flip" else 10.0
    bad = [{k: (v * factor).astype(np.float32) for k, v in d.items()} for d in deltas[:N_ATTACKERS]]
    return bad + deltas[N_ATTACKERS:]


def relative_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    diff = sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in want)
    return float(np.sqrt(diff / sum(float(np.sum(np.square(want[k], dtype=np.float64))) for k in want)))


def run_round(
    tmp_path: Path, settings: HubSettings, deltas: list[dict[str, np.ndarray]], make: Callable[[str], Transport]
) -> tuple[dict[str, np.ndarray], SqliteStore]:
    """One round on a fresh hub: every delta from its own device; returns the new global state − the old."""
    transport = make("hub")
    transport.connect()
    store = SqliteStore(tmp_path / f"store-{settings.aggregator}-{len(list(tmp_path.iterdir()))}")
    hub = Hub(settings, transport, store, initial_state=lambda: STATE)
    hub.start()
    devices = [Device(None, f"d{i}", transport=make(f"d{i}")) for i in range(len(deltas))]
    try:
        for device, delta in zip(devices, deltas, strict=True):
            device.send_update(delta, n=10)
            device.next(Receipt)
        assert hub.wait_idle() and hub.current_version == 1
        new = hub.global_state()
    finally:
        hub.stop()
        for device in devices:
            device.transport.close()
        transport.close()
    return {k: new[k] - STATE[k] for k in STATE}, store


# Measured (numpy 42-seeded deltas, 10 devices, 2 attackers): FedAvg is off by 0.40 (sign flip) and 1.80
# (x10) relative L2; median and trimmed mean (0.2) stay within 0.03 of the clean FedAvg.
ROBUST_BOUND = 0.1


@pytest.mark.parametrize("attack", ["sign_flip", "scale_x10"])
def test_median_and_trimmed_mean_resist_two_attackers_where_fedavg_does_not(tmp_path: Path, attack: str) -> None:
    broker = InMemoryBroker()
    make: Callable[[str], Transport] = lambda client_id: InMemoryTransport(broker, client_id)  # noqa: E731
    clean = weighted_mean(honest_deltas(), [10.0] * N_DEVICES)  # the clean run's FedAvg pseudo-gradient
    deltas = attacked(honest_deltas(), attack)
    errors = {}
    for aggregator, extra in (("fedavg", {}), ("median", {}), ("trimmed_mean", {"trim_fraction": 0.2})):
        settings = HubSettings(federation=FED, tau=N_DEVICES, aggregator=aggregator, **extra)  # type: ignore[arg-type]
        step, store = run_round(tmp_path, settings, deltas, make)
        record = store.latest_version()
        store.close()
        assert record is not None
        assert record.kind == ("fedavg" if aggregator == "fedavg" else f"{aggregator}+fedavg")
        assert ("trim_fraction" in record.metrics) == (aggregator == "trimmed_mean")
        errors[aggregator] = relative_error(step, clean)
    assert errors["fedavg"] > 0.3, errors  # the baseline is pulled away
    assert errors["median"] < ROBUST_BOUND, errors
    assert errors["trimmed_mean"] < ROBUST_BOUND, errors


def test_multi_krum_drops_the_attackers_and_dp_records_its_parameters(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    make: Callable[[str], Transport] = lambda client_id: InMemoryTransport(broker, client_id)  # noqa: E731
    clean = weighted_mean(honest_deltas(), [10.0] * N_DEVICES)
    deltas = attacked(honest_deltas(), "scale_x10")
    krum = HubSettings(federation=FED, tau=N_DEVICES, aggregator="multi_krum", krum_f=2, krum_m=6)
    step, store = run_round(tmp_path, krum, deltas, make)
    record = store.latest_version()
    store.close()
    assert record is not None and record.kind == "multi_krum+fedavg"
    assert (record.metrics["krum_f"], record.metrics["krum_m"]) == (2.0, 6.0)
    assert relative_error(step, clean) < ROBUST_BOUND
    # DP-FedAvg on 3 updates: the step is the seeded dp_fedavg of the queue, and σ = z·C/τ is recorded.
    dp = HubSettings(federation=FED, tau=3, aggregator="dp_fedavg", dp_clip=0.5, dp_noise_multiplier=0.3, dp_seed=11)
    step, store = run_round(tmp_path, dp, deltas[2:5], make)
    record = store.latest_version()
    store.close()
    assert record is not None and record.kind == "dp_fedavg+fedavg"
    sigma = 0.3 * 0.5 / 3
    assert record.metrics["dp_sigma"] == pytest.approx(sigma)
    assert (record.metrics["dp_clip"], record.metrics["dp_noise_multiplier"], record.metrics["dp_tau"]) == (
        0.5,
        0.3,
        3.0,
    )
    expected = dp_fedavg(deltas[2:5], 0.5, 0.3, np.random.default_rng([11, 1]))  # seeded per version
    for name in STATE:
        np.testing.assert_allclose(step[name], expected.mean[name], atol=1e-6)


def test_krum_hub_refuses_partial_updates_and_mixed_strategies(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    settings = HubSettings(federation=FED, tau=5, aggregator="krum")
    with pytest.raises(ConfigError, match="cannot mix strategies"):
        Hub(settings, transport, store, initial_state=lambda: STATE, strategy_tensors={"a": ["lora_A"], "b": ["head"]})
    hub = Hub(settings, transport, store, initial_state=lambda: STATE)
    hub.start()
    device = Device(broker, "d1")
    try:
        device.send_update({"lora_A": np.ones((2, 3), np.float32)})
        rejection = device.next(Rejection)
        assert isinstance(rejection, Rejection)
        assert rejection.reason == "unknown_tensors" and "krum needs every global tensor" in rejection.detail
    finally:
        hub.stop()
        store.close()


@pytest.mark.mosquitto
def test_trimmed_mean_over_a_real_broker(tmp_path: Path, mosquitto_broker: MosquittoBroker) -> None:
    def make(client_id: str) -> Transport:
        return MqttTransport(mosquitto_broker.host, mosquitto_broker.port, client_id=f"{client_id}-{tmp_path.name}")

    clean = weighted_mean(honest_deltas()[:5], [10.0] * 5)
    deltas = [{k: (v * -1.0).astype(np.float32) for k, v in honest_deltas()[0].items()}, *honest_deltas()[1:5]]
    settings = HubSettings(federation=FED, tau=5, aggregator="trimmed_mean", trim_fraction=0.2)
    step, store = run_round(tmp_path, settings, deltas, make)
    record = store.latest_version()
    store.close()
    assert record is not None and record.kind == "trimmed_mean+fedavg"
    assert relative_error(step, clean) < 0.15


# -- command line and config file -------------------------------------------------------------------------


def test_serve_flags_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from ffm_hub.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--aggregator", "dp_fedavg", "--dp-clip", "0.5", "--dp-noise-multiplier", "1.1", "--dp-seed", "3"]
    )
    assert (args.aggregator, args.dp_clip, args.dp_noise_multiplier, args.dp_seed) == ("dp_fedavg", 0.5, 1.1, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--aggregator", "--trim-fraction", "--krum-f", "--krum-m", "--dp-clip", "--dp-noise-multiplier"):
        assert flag in text
    assert "sigma = z * C / tau" in text and "tau > 2f + 2" in text


def test_config_file_keys_and_cross_checks() -> None:
    from ffm_hub.config import validate_hub_config

    options = validate_hub_config(
        {"aggregation": {"tau": 5, "aggregator": "multi_krum", "krum_f": 1, "krum_m": 3}}
    ).options
    assert (options.aggregator, options.krum_f, options.krum_m) == ("multi_krum", 1, 3)
    with pytest.raises(ConfigError, match=r"aggregation.krum: .*tau > 2f \+ 2"):
        validate_hub_config({"aggregation": {"tau": 3, "aggregator": "krum"}})
    with pytest.raises(ConfigError, match=r"aggregation.trim_fraction: must be in \[0, 0.5\)"):
        validate_hub_config({"aggregation": {"aggregator": "trimmed_mean", "trim_fraction": 0.5}})
    with pytest.raises(ConfigError, match="did you mean 'median'"):
        validate_hub_config({"aggregation": {"aggregator": "medain"}})
