"""Synchronous FedAvg, asynchronous aggregation (τ < N) and FFM switching: accuracy against wall time.

Issue 4's benchmark. A real :class:`~ffm_hub.hub.Hub` and real :class:`~ffm_edge.client.EdgeClient` s talk over
the in-memory broker, all in this process, on a non-IID split of GLUE SST-2 read from ``FFM_DATA_DIR``.
Wall time is **simulated** by a discrete-event loop from costs measured on this machine at start-up, so
the timings do not depend on how loaded the machine is while the benchmark runs:

* cost model: seconds per training example (median of a few timed ``TorchTrainer.train`` calls on a
  device-sized sample) and per evaluated example, update decode and aggregation per update, and the
  link speeds (the real encoded bytes of every pull and update travel at them);
* a device round = pull (waits while the hub is busy) + download + ``c_train × examples × local epochs
  × slowness`` + upload; the device's real ``prepare_update()`` runs when the round starts, its
  ``send_update()`` when the update arrives;
* the hub is one worker: receiving an update, aggregating, the central step on its public shard and the
  held-out validation evaluations that drive switching occupy it (counted from the calls the real hub
  makes); a pull or send that falls inside busy time waits until the hub is free.

Modes (same splits, initial weights and seed; each a fresh hub store):

* ``sync``: τ = N, every device trains on the newest version and waits for the next (synchronous FedAvg,
  staleness 0);
* ``async``: τ < N, devices restart at once on the newest version; polynomial staleness weight and a
  ``max_staleness`` cut-off;
* ``ffm``: ``async`` + the central step on the hub's public shard after each aggregation, with the
  adaptive switching policy deciding on a held-out public validation set (never the dev set);
* ``ffm-sync``: ``sync`` + the same central step and adaptive policy (the paper's section 5.1 setting).

Accuracy of every global version is measured on the GLUE dev split by an observer (it costs no
simulated time). Results: ``benchmarks/results/async_switching.json``, ``.md`` and ``.png``.

    FFM_DATA_DIR=/path/to/data python benchmarks/async_switching.py
    python benchmarks/async_switching.py --quick        # a small smoke run, writes async_switching-quick.*
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
STEM = "async_switching"

MODES = ("sync", "async", "ffm", "ffm-sync")
MODE_HELP = {
    "sync": "synchronous FedAvg: τ = N, staleness 0",
    "async": "asynchronous: τ < N, polynomial staleness weight, max staleness",
    "ffm": "async + central step on the hub's public shard, adaptive switching on held-out validation",
    "ffm-sync": "sync + central step, adaptive switching (the paper's 5.1 setting)",
}
FEDERATION = "bench"
#: The client's default chunk size (``EdgeClient(chunk_size=64 * 1024)``).
CHUNK_SIZE = 64 * 1024
#: Real-time limits of the in-process protocol: short, so that a stuck run fails instead of hanging.
PROTOCOL_TIMEOUT_S = 60.0
#: A small hub ``device_timeout`` makes its worker wake often, so ``Hub.wait_idle`` returns quickly.
HUB_DEVICE_TIMEOUT_S = 0.1

log = logging.getLogger("ffm.bench.async")


# -------------------------------------------------------------------------------------------------------
# Settings
# -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that defines one benchmark run (written into the JSON)."""

    task: str = "sst2"
    model: str = "minilm-l6-v2"
    strategy: str = "lora"
    codec: str = "int8"
    devices: int = 10
    per_device: int = 64
    alpha: float = 0.5
    pool_factor: int = 4
    slow: int = 3
    slowdown: float = 4.0
    hub_slowdown: float = 1.0
    public: int = 64
    validation: int = 128
    eval_limit: int = 500
    local_epochs: int = 1
    central_epochs: int = 1
    tau: int = 3
    staleness: str = "polynomial"
    staleness_alpha: float = 0.5
    max_staleness: int | None = 16
    policy: str = "adaptive"
    policy_tolerance: float = 0.0
    uplink_mbps: float = 5.0
    downlink_mbps: float = 20.0
    budget: float | None = None
    budget_rounds: float = 10.0
    seeds: tuple[int, ...] = (0,)
    modes: tuple[str, ...] = MODES
    targets: tuple[float, ...] = ()
    threads: int | None = None
    calibration_repeats: int = 3
    data_dir: str | None = None
    costs_from: str | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.devices < 2:
            problems.append(f"--devices must be >= 2, got {self.devices}")
        if not 0 <= self.slow <= self.devices:
            problems.append(f"--slow must be in 0..{self.devices}, got {self.slow}")
        if not 1 <= self.tau < self.devices and any(m in ("async", "ffm") for m in self.modes):
            problems.append(f"--tau must be in 1..{self.devices - 1} (asynchronous: τ < N), got {self.tau}")
        if self.slowdown < 1 or self.hub_slowdown <= 0:
            problems.append("--slowdown must be >= 1 and --hub-slowdown > 0")
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            problems.append(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
        if min(self.per_device, self.public, self.validation, self.eval_limit, self.pool_factor) < 1:
            problems.append("--per-device, --public, --validation, --eval-limit and the pool factor must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    def slowness(self, device: int) -> float:
        """Compute slowness of ``device``: the last ``slow`` devices are ``slowdown`` × slower."""
        return self.slowdown if device >= self.devices - self.slow else 1.0


@dataclass(frozen=True)
class ModeConfig:
    """How one mode sets up the hub and schedules its devices."""

    name: str
    tau: int
    synchronous: bool
    central: bool
    staleness: str
    staleness_alpha: float
    max_staleness: int | None

    def describe(self) -> str:
        if self.synchronous:
            rule = "all N devices per version, staleness 0"
        else:
            cut = "none" if self.max_staleness is None else str(self.max_staleness)
            rule = f"{self.staleness} (1+s)^-{self.staleness_alpha:g}, max staleness {cut}"
        return rule + (" + central step, adaptive switching" if self.central else "")


def mode_config(mode: str, s: Settings) -> ModeConfig:
    synchronous = mode in ("sync", "ffm-sync")
    return ModeConfig(
        name=mode,
        tau=s.devices if synchronous else s.tau,
        synchronous=synchronous,
        central=mode.startswith("ffm"),
        staleness=s.staleness,
        staleness_alpha=s.staleness_alpha,
        max_staleness=None if synchronous else s.max_staleness,
    )


# -------------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """The disjoint draws of one seed: device shards, hub public shard, hub validation set, and dev."""

    shards: list[Any]
    public: Any
    validation: Any
    dev: Any
    pool: Any
    info: dict[str, Any]


def _counts(data: Any) -> dict[str, int]:
    return {str(k): v for k, v in data.label_counts().items()}


def make_split(s: Settings, seed: int) -> Split:
    """Draw the device pool, the public shard and the validation set from train (disjoint), and partition.

    The pool holds ``pool_factor × devices × per_device`` random train rows; ``dirichlet_partition`` splits
    it with label skew ``alpha`` (at least ``per_device`` rows each) and every device keeps a random
    ``per_device`` of its part, so shards are equally large and label-skewed.
    """
    from ffm_edge.data import describe, dirichlet_partition, load_split

    train = load_split(s.task, "train", data_dir=s.data_dir)
    dev = load_split(s.task, "dev", data_dir=s.data_dir, limit=s.eval_limit, seed=seed)
    need = s.devices * s.per_device
    room = len(train) - s.public - s.validation
    if room < need:
        raise ValueError(
            f"{s.task} train has {len(train)} rows: too few for {s.devices} x {s.per_device} device rows "
            f"+ {s.public} public + {s.validation} validation"
        )
    pool_n = min(need * s.pool_factor, room)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    pool = train.subset(order[:pool_n])
    public = train.subset(order[pool_n : pool_n + s.public])
    validation = train.subset(order[pool_n + s.public : pool_n + s.public + s.validation])
    parts = dirichlet_partition(pool.labels, s.devices, s.alpha, seed=seed, min_per_client=s.per_device)
    shards = [pool.subset(np.sort(rng.choice(part, size=s.per_device, replace=False))) for part in parts]
    info = {
        "seed": seed,
        "train_source": train.source,
        "dev": describe(dev),
        "pool_rows": pool_n,
        "pool_label_counts": _counts(pool),
        "partition_sizes_before_subsampling": [len(p) for p in parts],
        "device_label_counts": {f"edge-{i}": _counts(d) for i, d in enumerate(shards)},
        "device_slowness": {f"edge-{i}": s.slowness(i) for i in range(s.devices)},
        "public_label_counts": _counts(public),
        "validation_label_counts": _counts(validation),
        "dev_label_counts": _counts(dev),
    }
    return Split(shards, public, validation, dev, pool, info)


# -------------------------------------------------------------------------------------------------------
# Cost model
# -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Simulated seconds of each kind of work, measured on this machine (1× device = this machine)."""

    train_s_per_example: float
    eval_s_per_example: float
    update_decode_s: float
    aggregate_s_per_update: float
    uplink_bps: float
    downlink_bps: float
    update_bytes: int
    global_bytes: int
    samples: dict[str, list[float]] = field(default_factory=dict)

    def train_s(self, examples: int, epochs: int, slowness: float) -> float:
        return self.train_s_per_example * examples * epochs * slowness

    def sync_round_s(self, s: Settings) -> float:
        """Predicted time of one synchronous round (slowest device, no central step): sizes the budget."""
        device = self.train_s(s.per_device, s.local_epochs, max(s.slowness(i) for i in range(s.devices)))
        transfer = 8 * self.global_bytes / self.downlink_bps + 8 * self.update_bytes / self.uplink_bps
        return device + transfer + self.update_decode_s + s.devices * self.aggregate_s_per_update


def load_costs(path: Path, s: Settings) -> CostModel:
    """The cost model of an earlier result JSON (to repeat its timings exactly); link speeds from ``s``."""
    stored = json.loads(path.read_text(encoding="utf-8"))["cost_model"]
    stored.update(uplink_bps=s.uplink_mbps * 1e6, downlink_bps=s.downlink_mbps * 1e6)
    return CostModel(**stored)


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def calibrate(s: Settings, trainer: Any, split: Split, initial: Mapping[str, np.ndarray]) -> CostModel:
    """Time training, evaluation, update decoding and aggregation on this machine; leave ``trainer`` at ``initial``."""
    import torch

    from ffm_edge.wire import GlobalMeta, UpdateMeta, decode_update, encode_global, encode_update, split_frame
    from ffm_hub.aggregate import PartialSum

    rng = np.random.default_rng(12345)
    sample = split.pool.subset(np.sort(rng.choice(len(split.pool), size=s.per_device, replace=False)))
    repeats = max(1, s.calibration_repeats)
    trainer.load_trainable_state(initial)
    trainer.train(sample, epochs=1, seed=0)  # warm-up: first calls pay for lazy initialisation
    train_samples = []
    for r in range(repeats):
        trainer.load_trainable_state(initial)
        torch.manual_seed(r)
        report = trainer.train(sample, epochs=1, seed=r)
        train_samples.append(report.seconds / len(sample))
    trained = trainer.trainable_state()
    delta = {k: (trained[k] - initial[k]).astype(np.float32) for k in trained}
    trainer.evaluate(split.validation)  # warm-up
    _, eval_times = _median_time(lambda: trainer.evaluate(split.validation), repeats)
    eval_samples = [t / len(split.validation) for t in eval_times]
    trainer.load_trainable_state(initial)

    meta = UpdateMeta(
        federation=FEDERATION, device="edge-0", update_id="0" * 32, base_version=0, strategy=s.strategy,
        num_samples=s.per_device, codec=s.codec, created_at=time.time(), metrics={},
    )  # fmt: skip
    frame = encode_update(meta, delta)
    update_bytes = sum(len(c) for c in split_frame(frame, chunk_size=CHUNK_SIZE, transfer_id=meta.update_id))
    decode_s, decode_samples = _median_time(lambda: decode_update(frame), 7)
    _, tensors = decode_update(frame)
    add_s, add_samples = _median_time(lambda: PartialSum().add(tensors, float(s.per_device)), 7)
    gmeta = GlobalMeta(
        federation=FEDERATION, version=0, parent=None, model=s.model, strategy=s.strategy, codec="fp32",
        created_at=time.time(), num_updates=0, metrics={},
    )  # fmt: skip
    global_bytes = sum(
        len(c)
        for c in split_frame(encode_global(gmeta, dict(initial)), chunk_size=128 * 1024, transfer_id="pull-" + "0" * 24)
    )
    return CostModel(
        train_s_per_example=statistics.median(train_samples),
        eval_s_per_example=statistics.median(eval_samples),
        update_decode_s=decode_s,
        aggregate_s_per_update=decode_s + add_s,
        uplink_bps=s.uplink_mbps * 1e6,
        downlink_bps=s.downlink_mbps * 1e6,
        update_bytes=update_bytes,
        global_bytes=global_bytes,
        samples={
            "train_s_per_example": train_samples,
            "eval_s_per_example": eval_samples,
            "update_decode_s": decode_samples,
            "partial_sum_add_s": add_samples,
        },
    )


# -------------------------------------------------------------------------------------------------------
# One mode: real hub + real clients, driven by a discrete-event loop in simulated time
# -------------------------------------------------------------------------------------------------------


def _state_key(state: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(state[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


class DevEvaluator:
    """Dev accuracy of a state, cached by the state's bytes (reverted versions and version 0 repeat)."""

    def __init__(self, trainer: Any, dev: Any) -> None:
        self.trainer = trainer
        self.dev = dev
        self.cache: dict[str, float] = {}
        self.calls = 0

    def __call__(self, state: Mapping[str, np.ndarray]) -> float:
        key = _state_key(state)
        if key not in self.cache:
            self.trainer.load_trainable_state({k: state[k] for k in self.trainer.tensor_names})
            self.cache[key] = float(self.trainer.evaluate(self.dev)["accuracy"])
            self.calls += 1
        return self.cache[key]


def _round_seed(seed: int, device: int, round_index: int) -> int:
    return (seed * 1_000_003 + device * 10_007 + round_index) % (2**31)


class _Progress:
    """A tqdm bar over simulated seconds (or nothing)."""

    def __init__(self, enabled: bool, total: float, desc: str) -> None:
        self.bar = None
        self.done = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total, 1), desc=desc, unit="sim s", dynamic_ncols=True, leave=True)

    def to(self, sim_s: float, **postfix: object) -> None:
        if self.bar is None:
            return
        target = round(min(sim_s, float(self.bar.total)), 1)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        if target > self.done:
            self.bar.n = self.done = target  # set, not added: no accumulated float error in the display
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_mode(
    mode: str,
    s: Settings,
    costs: CostModel,
    split: Split,
    hub_trainer: Any,
    initial: Mapping[str, np.ndarray],
    seed: int,
    budget: float,
    dev_eval: DevEvaluator,
    progress: bool,
) -> dict[str, Any]:
    """Run one mode to ``budget`` simulated seconds; per-version and per-update records."""
    import torch

    from ffm_edge.client import EdgeClient
    from ffm_edge.errors import RejectedUpdateError
    from ffm_edge.spec import load_model_spec
    from ffm_edge.transport.memory import InMemoryBroker, InMemoryTransport
    from ffm_edge.wire import decode_global, split_frame
    from ffm_hub.hub import Hub, HubSettings
    from ffm_hub.store import MemoryStore, VersionRecord
    from ffm_hub.switching import ACTIONS, make_policy

    cfg = mode_config(mode, s)
    spec = load_model_spec(s.model)
    started = time.perf_counter()
    work = Counter[str]()
    fresh: list[VersionRecord] = []

    def evaluate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The hub's held-out validation: what the switching policy decides on (never the dev set)."""
        hub_trainer.load_trainable_state({k: state[k] for k in hub_trainer.tensor_names})
        work["eval_examples"] += len(split.validation)
        work["evaluations"] += 1
        return hub_trainer.evaluate(split.validation)

    def central_step(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Training on the hub's public shard, as ``ffm_hub.service`` builds it."""
        work["central_steps"] += 1
        torch.manual_seed(_round_seed(seed, 999, work["central_steps"]))
        hub_trainer.load_trainable_state({k: state[k] for k in hub_trainer.tensor_names})
        hub_trainer.train(split.public, epochs=s.central_epochs, seed=seed + work["central_steps"])
        work["train_examples"] += len(split.public) * s.central_epochs
        return {**state, **hub_trainer.trainable_state()}

    def hub_work_s() -> float:
        compute = work["train_examples"] * costs.train_s_per_example + work["eval_examples"] * costs.eval_s_per_example
        return compute * s.hub_slowdown

    hub_settings = HubSettings(
        federation=FEDERATION,
        model=spec.name,
        strategy=s.strategy,
        tau=cfg.tau,
        staleness=cfg.staleness,
        staleness_alpha=cfg.staleness_alpha,
        max_staleness=cfg.max_staleness,
        device_timeout=HUB_DEVICE_TIMEOUT_S,
        publish_timeout=PROTOCOL_TIMEOUT_S,
    )
    policy_kwargs: dict[str, object] = {"tolerance": s.policy_tolerance} if s.policy == "adaptive" else {}
    broker = InMemoryBroker()
    store = MemoryStore()
    hub_transport = InMemoryTransport(broker, "hub")
    hub = Hub(
        hub_settings,
        hub_transport,
        store,
        initial_state=lambda: {k: v.copy() for k, v in initial.items()},
        evaluate=evaluate if cfg.central else None,
        on_version=fresh.append,
        central_step=central_step if cfg.central else None,
        policy=make_policy(s.policy, **policy_kwargs) if cfg.central else None,
    )
    versions: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    hub_busy = 0.0

    def record(rec: VersionRecord, sim_s: float) -> None:
        _meta, state = decode_global(store.load_version(rec.version))
        decision = _decision(rec.kind, rec.metrics.get("decision"), ACTIONS)
        versions.append(
            {
                "version": rec.version,
                "sim_s": sim_s,
                "real_s": time.perf_counter() - started,
                "kind": rec.kind,
                "dev_accuracy": dev_eval(state),
                "validation_accuracy": rec.metrics.get("accuracy"),
                "candidate_validation_accuracy": rec.metrics.get("candidate_accuracy"),
                "decision": decision,
                "num_updates": rec.num_updates,
                "hub_mean_staleness": rec.metrics.get("mean_staleness"),
                "after_budget": sim_s > budget,
            }
        )

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ffm-async-bench-")))
        hub_transport.connect()
        stack.callback(hub_transport.close)
        hub.start()
        stack.callback(hub.stop)
        if not hub.wait_idle(PROTOCOL_TIMEOUT_S):
            raise RuntimeError("the hub did not become idle after start")
        # Work the hub did while starting (FFM: the validation of version 0) occupies it from t = 0.
        hub_free = hub_work_s()
        hub_busy += hub_free
        hub_busy_in_budget = min(hub_free, budget)
        start_versions = list(fresh)
        fresh.clear()
        record(store.get_version(0) or _missing(0), 0.0)
        for rec in start_versions:
            record(rec, hub_free)

        transports = [InMemoryTransport(broker, f"edge-{i}") for i in range(s.devices)]
        clients = []
        for i in range(s.devices):
            client = EdgeClient(
                spec,
                split.shards[i],
                device_id=f"edge-{i}",
                federation=FEDERATION,
                strategy=s.strategy,
                codec=s.codec,
                local_epochs=s.local_epochs,
                seed=seed * 1000 + i,
                state_dir=folder / f"edge-{i}",
                transport=transports[i],
                chunk_size=CHUNK_SIZE,
                receipt_timeout=PROTOCOL_TIMEOUT_S,
                pull_timeout=PROTOCOL_TIMEOUT_S,
                version_timeout=PROTOCOL_TIMEOUT_S,
                max_send_attempts=2,
                wait_for_new_version=cfg.synchronous,
                heartbeat_interval=0,
            )
            client.connect()
            stack.callback(transports[i].close)
            stack.callback(client.close)
            clients.append(client)

        seq = itertools.count()
        events: list[tuple[float, int, str, int]] = [(0.0, next(seq), "start", i) for i in range(s.devices)]
        heapq.heapify(events)
        pending: dict[int, tuple[Any, dict[str, Any]]] = {}
        rounds = [0] * s.devices
        waiting: list[int] = []
        bar = _Progress(progress, budget, f"seed {seed} {mode}")
        try:
            while events:
                t, _, kind, i = heapq.heappop(events)
                if t > budget:
                    break
                if kind == "start":
                    pull_s = max(t, hub_free)  # the hub serves pulls only when it is free
                    train_s = costs.train_s(len(split.shards[i]), s.local_epochs, s.slowness(i))
                    if pull_s + train_s > budget:
                        continue  # this round could not arrive within the budget: the device stops
                    client = clients[i]
                    client.latest_manifest(PROTOCOL_TIMEOUT_S, newer_than=hub.current_version - 1)
                    torch.manual_seed(_round_seed(seed, i, rounds[i]))  # dropout: same draws in every mode
                    prepared = client.prepare_update()
                    up_bytes = sum(
                        len(c)
                        for c in split_frame(prepared.frame, chunk_size=CHUNK_SIZE, transfer_id=prepared.meta.update_id)
                    )
                    down_s = 8 * prepared.bytes_down / costs.downlink_bps
                    up_s = 8 * up_bytes / costs.uplink_bps
                    arrive = pull_s + down_s + train_s + up_s
                    entry: dict[str, Any] = {
                        "device": f"edge-{i}",
                        "round": rounds[i],
                        "slowness": s.slowness(i),
                        "start_s": t,
                        "pull_s": pull_s,
                        "arrive_s": arrive,
                        "base_version": prepared.meta.base_version,
                        "update_id": prepared.meta.update_id,
                        "num_samples": prepared.meta.num_samples,
                        "bytes_down": prepared.bytes_down,
                        "bytes_up": up_bytes,
                        "train_sim_s": train_s,
                        "train_real_s": prepared.train.seconds,
                        "train_loss": prepared.train.mean_loss,
                    }
                    rounds[i] += 1
                    pending[i] = (prepared, entry)
                    heapq.heappush(events, (arrive, next(seq), "arrive", i))
                    continue
                prepared, entry = pending.pop(i)
                send_s = max(t, hub_free)  # a send inside hub busy time waits until the hub is free
                if send_s > budget:
                    continue
                work.clear()
                fresh.clear()
                entry["send_s"] = send_s
                try:
                    clients[i].send_update(prepared)
                    entry["status"] = "accepted"
                except RejectedUpdateError as exc:
                    entry["status"] = "rejected"
                    entry["reason"] = exc.reason
                if not hub.wait_idle(PROTOCOL_TIMEOUT_S):
                    raise RuntimeError(f"the hub did not become idle after an update from edge-{i}")
                new = list(fresh)
                cost = costs.update_decode_s + hub_work_s()
                cost += sum(rec.num_updates for rec in new) * costs.aggregate_s_per_update
                hub_free = send_s + cost
                hub_busy += cost
                hub_busy_in_budget += max(0.0, min(hub_free, budget) - send_s)
                entry["hub_s"] = cost
                updates.append(entry)
                for rec in new:
                    record(rec, hub_free)
                if cfg.synchronous:
                    waiting.append(i)
                    if new:  # the next version is out: every waiting device starts on it
                        for j in waiting:
                            heapq.heappush(events, (hub_free, next(seq), "start", j))
                        waiting.clear()
                else:
                    heapq.heappush(events, (send_s, next(seq), "start", i))  # its pull waits for the hub
                last = versions[-1]
                bar.to(send_s, v=last["version"], acc=f"{last['dev_accuracy']:.3f}")
            bar.to(budget)
        finally:
            bar.close()
        hub.wait_idle(PROTOCOL_TIMEOUT_S)
        for entry in updates:
            stored = store.get_update(entry["update_id"]) if entry["status"] == "accepted" else None
            into = stored.aggregated_into if stored is not None else None
            entry["aggregated_into"] = into
            entry["staleness"] = None if into is None else into - 1 - entry["base_version"]
        counters = dict(hub.counters)
        rejections = dict(hub.rejections)

    by_version: dict[int, list[dict[str, Any]]] = {}
    for entry in updates:
        if entry["aggregated_into"] is not None:
            by_version.setdefault(entry["aggregated_into"], []).append(entry)
    for row in versions:
        consumed = by_version.get(row["version"], [])
        row["devices"] = [e["device"] for e in consumed]
        row["staleness"] = [e["staleness"] for e in consumed]
    return {
        "mode": mode,
        "seed": seed,
        "config": asdict(cfg),
        "rule": cfg.describe(),
        "budget_s": budget,
        "versions": versions,
        "updates": updates,
        "hub_busy_s": hub_busy,
        "hub_busy_in_budget_s": hub_busy_in_budget,
        "hub_counters": counters,
        "hub_rejections": rejections,
        "dev_evaluations": dev_eval.calls,
        "real_s": time.perf_counter() - started,
    }


def _decision(kind: str, stored: float | None, actions: Sequence[str]) -> str | None:
    """The policy's decision on a version: from its kind where that says it, else the stored metric.

    A reverted version carries the previous version's metrics, and with them its ``decision``, so the
    metric alone would report a revert as the previous version's decision.
    """
    if kind == "reverted":
        return "revert"
    if kind == "downweighted":
        return "downweight"
    if stored is None or not 0 <= stored < len(actions):
        return None
    return actions[int(stored)]


def _missing(version: int) -> Any:
    raise RuntimeError(f"the hub has no version {version}")


# -------------------------------------------------------------------------------------------------------
# Analysis
# -------------------------------------------------------------------------------------------------------


def in_budget(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [v for v in run["versions"] if not v["after_budget"]]


def time_to(run: Mapping[str, Any], target: float) -> float | None:
    """Simulated seconds until a version's dev accuracy first reaches ``target`` (None: not reached)."""
    for row in in_budget(run):
        if row["dev_accuracy"] >= target - 1e-12:
            return float(row["sim_s"])
    return None


def accuracy_at(run: Mapping[str, Any], sim_s: float) -> float:
    """Dev accuracy of the newest version published at or before ``sim_s``."""
    value = run["versions"][0]["dev_accuracy"]
    for row in in_budget(run):
        if row["sim_s"] <= sim_s + 1e-9:
            value = row["dev_accuracy"]
    return float(value)


def segments(run: Mapping[str, Any]) -> list[tuple[float, float, float]]:
    """The dev-accuracy step function within the budget as (from, to, accuracy) pieces covering [0, budget]."""
    rows = in_budget(run)
    budget = float(run["budget_s"])
    ends = [float(r["sim_s"]) for r in rows[1:]] + [budget]
    return [
        (float(r["sim_s"]), end, float(r["dev_accuracy"]))
        for r, end in zip(rows, ends, strict=True)
        if end > r["sim_s"]
    ]


def window_stats(run: Mapping[str, Any], lo: float, hi: float) -> dict[str, float]:
    """Time-weighted mean, min and max of the dev accuracy over simulated time [lo, hi]."""
    total = 0.0
    weighted = 0.0
    seen = []
    for start, end, acc in segments(run):
        overlap = min(end, hi) - max(start, lo)
        if overlap > 0:
            total += overlap
            weighted += overlap * acc
            seen.append(acc)
    if not seen:
        value = accuracy_at(run, lo)
        return {"mean": value, "min": value, "max": value}
    return {"mean": weighted / total, "min": min(seen), "max": max(seen)}


def share_at_or_above(run: Mapping[str, Any], target: float, since: float) -> float | None:
    """Share of the simulated time from ``since`` to the end of the budget with dev accuracy >= ``target``."""
    budget = float(run["budget_s"])
    if since >= budget:
        return None
    above = sum(
        max(0.0, min(end, budget) - max(start, since)) for start, end, acc in segments(run) if acc >= target - 1e-12
    )
    return above / (budget - since)


def summarize(run: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The per-mode figures of the report (from the run's records alone)."""
    rows = in_budget(run)
    accepted = [u for u in run["updates"] if u["status"] == "accepted"]
    staleness = [u["staleness"] for u in accepted if u["staleness"] is not None]
    best = max(rows, key=lambda r: (r["dev_accuracy"], -r["sim_s"]))
    fast = [u for u in accepted if u["slowness"] == 1.0]
    slow = [u for u in accepted if u["slowness"] != 1.0]
    n_fast, n_slow = settings["devices"] - settings["slow"], settings["slow"]
    budget = float(run["budget_s"])
    return {
        "versions": len(rows) - 1,
        "kinds": dict(Counter(r["kind"] for r in rows[1:])),
        "decisions": dict(Counter(r["decision"] for r in rows[1:] if r["decision"] is not None)),
        "updates_accepted": len(accepted),
        "updates_rejected": sum(1 for u in run["updates"] if u["status"] == "rejected"),
        "updates_aggregated": len(staleness),
        "rounds_per_fast_device": len(fast) / n_fast if n_fast else None,
        "rounds_per_slow_device": len(slow) / n_slow if n_slow else None,
        "mean_staleness": statistics.fmean(staleness) if staleness else None,
        "max_staleness": max(staleness) if staleness else None,
        "hub_busy_fraction": run["hub_busy_in_budget_s"] / run["budget_s"],
        "initial_dev_accuracy": rows[0]["dev_accuracy"],
        "final_dev_accuracy": rows[-1]["dev_accuracy"],
        "best_dev_accuracy": best["dev_accuracy"],
        "best_at_s": best["sim_s"],
        "best_version": best["version"],
        "second_half_dev_accuracy": window_stats(run, budget / 2, budget),
        "real_s": run["real_s"],
    }


def targets_for(runs: Sequence[Mapping[str, Any]], fixed: Sequence[float]) -> list[dict[str, Any]]:
    """Target accuracies: the best synchronous FedAvg reached, 95 % of it, and any fixed ``--targets``."""
    out = []
    sync = next((r for r in runs if r["mode"] == "sync"), None)
    if sync is not None:
        best = max(v["dev_accuracy"] for v in in_budget(sync))
        out.append({"name": "best of sync FedAvg", "accuracy": best})
        out.append({"name": "95 % of sync's best", "accuracy": 0.95 * best})
    out += [{"name": f"fixed {t:g}", "accuracy": float(t)} for t in fixed]
    for target in out:
        times = {r["mode"]: time_to(r, target["accuracy"]) for r in runs}
        target["sim_s"] = times
        held: dict[str, float | None] = {}
        for r in runs:
            first = times[r["mode"]]
            held[r["mode"]] = None if first is None else share_at_or_above(r, target["accuracy"], first)
        target["share_at_or_above_after"] = held
        base = times.get("sync")
        target["speedup_vs_sync"] = {
            mode: (base / t if base is not None and t is not None and t > 0 else None)
            for mode, t in times.items()
            if mode != "sync"
        }
    return out


def analyse(result: dict[str, Any]) -> None:
    """(Re)compute every run's summary and the time-to-target tables from the records in ``result``."""
    settings = result["settings"]
    for run in result["runs"]:
        run["summary"] = summarize(run, settings)
    result["targets"] = {
        str(seed): targets_for([r for r in result["runs"] if r["seed"] == seed], settings["targets"])
        for seed in settings["seeds"]
    }


# -------------------------------------------------------------------------------------------------------
# The whole benchmark
# -------------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions and machine facts for the JSON."""
    import torch

    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "numpy": np.__version__,
        "ffm_data_dir_set": bool(os.environ.get("FFM_DATA_DIR")),
        **_git(),
    }


def _git() -> dict[str, Any]:
    """The commit the code ran at, and whether ffm_edge/ffm_hub differed from it (read-only git calls)."""
    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=20)
        diff = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "ffm_edge", "ffm_hub"], cwd=repo, capture_output=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "library_modified_since_commit": None}
    return {
        "git_commit": head.stdout.strip() or None,
        "library_modified_since_commit": {0: False, 1: True}.get(diff.returncode),
    }


def run_benchmark(s: Settings, *, out_dir: Path | None = RESULTS_DIR, progress: bool = True) -> dict[str, Any]:
    """Calibrate, run every mode for every seed, analyse; write JSON, Markdown and PNG into ``out_dir``."""
    import torch

    from ffm_edge.data import get_task
    from ffm_edge.spec import load_model_spec
    from ffm_edge.trainer import TorchTrainer

    started = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    spec = load_model_spec(s.model)
    task = get_task(s.task)
    costs: CostModel | None = None
    budget = s.budget
    runs: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in s.seeds:
        split = make_split(s, seed)
        data[str(seed)] = split.info
        _say(f"seed {seed}: {split.info['dev']}; devices {split.info['device_label_counts']}")
        hub_trainer = TorchTrainer(spec, task, s.strategy, seed=seed)
        initial = hub_trainer.trainable_state()
        if costs is None:
            if s.costs_from:
                _say(f"cost model from {s.costs_from} (not measured again)")
                costs = load_costs(Path(s.costs_from), s)
            else:
                _say("calibrating the cost model on this machine ...")
                costs = calibrate(s, hub_trainer, split, initial)
            if budget is None:  # 1 % over R predicted rounds, so that the R-th synchronous round lands inside
                budget = math.ceil(10 * 1.01 * s.budget_rounds * costs.sync_round_s(s)) / 10
            _say(
                f"cost model: train {1000 * costs.train_s_per_example:.2f} ms/example, eval "
                f"{1000 * costs.eval_s_per_example:.2f} ms/example; sync round ≈ {costs.sync_round_s(s):.2f} s; "
                f"budget {budget:.1f} simulated s"
            )
        assert budget is not None
        dev_eval = DevEvaluator(hub_trainer, split.dev)
        for mode in s.modes:
            run = run_mode(mode, s, costs, split, hub_trainer, initial, seed, budget, dev_eval, progress)
            run["summary"] = summarize(run, asdict(s))
            runs.append(run)
            sm = run["summary"]
            _say(
                f"seed {seed} {mode}: {sm['versions']} versions, best dev acc {sm['best_dev_accuracy']:.4f} "
                f"at {sm['best_at_s']:.1f} sim s, final {sm['final_dev_accuracy']:.4f}; real {run['real_s']:.0f} s"
            )
        per_seed[seed] = [r for r in runs if r["seed"] == seed]
    assert costs is not None and budget is not None
    result: dict[str, Any] = {
        "benchmark": "async_switching",
        "description": (
            "accuracy per global version against simulated wall time for synchronous FedAvg, asynchronous "
            "aggregation (tau < N) with slow devices, and FFM switching; real Hub and EdgeClients over the "
            "in-memory broker, timings simulated from costs measured on this machine"
        ),
        "settings": {**asdict(s), "budget_s": budget, "mode_help": {m: MODE_HELP[m] for m in s.modes}},
        "cost_model": asdict(costs),
        "simulation": {
            "device_round": "pull (waits while the hub is busy) + download (real bytes / downlink) + "
            "train_s_per_example x examples x local epochs x slowness + upload (real chunk bytes / uplink)",
            "hub": "one worker; per received update: update_decode_s; per new version: aggregate_s_per_update x "
            "updates + (central-step training examples x train_s_per_example + validation examples x "
            "eval_s_per_example) x hub_slowdown, counted from the calls the hub made; pulls and commits not "
            "charged; a pull or send inside busy time waits until the hub is free",
            "dev_accuracy": "measured by an observer on the GLUE dev split for every version; costs no simulated time",
            "device_rounds": "a device stops when its next round could not arrive within the budget",
        },
        "data": data,
        "runs": runs,
        "targets": {str(seed): targets_for(per_seed[seed], s.targets) for seed in s.seeds},
        "environment": environment(),
    }
    result["seconds"] = time.perf_counter() - started
    if out_dir is not None:
        write_outputs(result, out_dir, f"{STEM}-quick" if s.quick else STEM)
    return result


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_outputs(result: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / f"{stem}.md").write_text(render_markdown(result), encoding="utf-8")
    problem = render_plot(result, out_dir / f"{stem}.png")
    if problem:
        _say(f"no plot: {problem}")


# -------------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _f(v: float | None, fmt: str = ".4f", missing: str = "—") -> str:
    return missing if v is None else format(v, fmt)


def _window(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "—"
    return f"{stats['mean']:.4f} [{stats['min']:.3f}, {stats['max']:.3f}]"


def _secs(v: float | None) -> str:
    return "not reached" if v is None else f"{v:,.1f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The person-readable report (also printed to stdout)."""
    s = result["settings"]
    c = result["cost_model"]
    env = result["environment"]
    runs = result["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    n_slow, n = s["slow"], s["devices"]
    slow_names = f"edge-{n - n_slow}…edge-{n - 1}" if n_slow > 1 else (f"edge-{n - 1}" if n_slow else "none")
    seeds = ", ".join(str(x) for x in s["seeds"])
    lines = [
        "# Synchronous FedAvg vs asynchronous aggregation vs FFM switching: accuracy against wall time",
        "",
        f"Task GLUE SST-2 (train rows for devices, hub and validation; accuracy on {s['eval_limit']} rows of the "
        f"dev split), model `{s['model']}` with `{s['strategy']}`, updates `{s['codec']}`. {n} devices × "
        f"{s['per_device']} sentences, label skew Dirichlet α = {s['alpha']:g} (per-device label counts in the "
        f"JSON), {s['local_epochs']} local epoch(s); {n_slow} slow device(s) ({slow_names}) compute "
        f"{s['slowdown']:g}× slower. Hub: public shard {s['public']} rows for the central step "
        f"({s['central_epochs']} epoch), held-out validation {s['validation']} rows for switching decisions only, "
        f"policy `{s['policy']}` (tolerance {s['policy_tolerance']:g}). Seed(s): {seeds}.",
        "",
        f"**Wall time is simulated** from costs measured on this machine at start-up ({env['cpu_count']} CPU "
        f"cores shared with other work, torch threads {env['torch_threads']}): training "
        f"{1000 * c['train_s_per_example']:.2f} ms "
        f"per example (median of {len(c['samples']['train_s_per_example'])} timed `TorchTrainer.train` calls), "
        f"evaluation {1000 * c['eval_s_per_example']:.2f} ms per example, update decode "
        f"{1000 * c['update_decode_s']:.2f} ms, aggregation {1000 * c['aggregate_s_per_update']:.2f} ms per "
        f"update; uplink {s['uplink_mbps']:g} Mbit/s, downlink {s['downlink_mbps']:g} Mbit/s (real bytes: update "
        f"≈ {c['update_bytes']:,} B, global version ≈ {c['global_bytes']:,} B); the hub is one worker at "
        f"{s['hub_slowdown']:g}× a fast device's compute time. Every mode runs {s['budget_s']:,.1f} simulated s "
        f"(≈ {s['budget_rounds']:g} synchronous rounds). {env['date_utc']}."
        + (f" Cost model reused from `{s['costs_from']}`, not measured in this run." if s.get("costs_from") else ""),
        "",
        "## Per mode",
        "",
    ]
    header = [
        "mode",
        "seed",
        "τ",
        "rule",
        "versions",
        "updates accepted / rejected",
        "rounds per fast / slow device",
        "staleness mean / max",
        "hub busy",
        "dev acc start → end",
        "best dev acc (at sim s)",
        "dev acc, 2nd half: mean [min, max]",
        "real s",
    ]
    rows = []
    for r in runs:
        m = r["summary"]
        rows.append(
            [
                f"`{r['mode']}`",
                str(r["seed"]),
                str(r["config"]["tau"]),
                r["rule"],
                str(m["versions"]),
                f"{m['updates_accepted']} / {m['updates_rejected']}",
                f"{_f(m['rounds_per_fast_device'], '.1f')} / {_f(m['rounds_per_slow_device'], '.1f')}",
                f"{_f(m['mean_staleness'], '.2f')} / {_f(m['max_staleness'], 'd')}",
                f"{100 * m['hub_busy_fraction']:.0f} %",
                f"{m['initial_dev_accuracy']:.4f} → {m['final_dev_accuracy']:.4f}",
                f"{m['best_dev_accuracy']:.4f} ({m['best_at_s']:,.1f})",
                _window(m.get("second_half_dev_accuracy")),
                f"{m['real_s']:,.0f}",
            ]
        )
    lines += _table(header, rows)
    lines += [
        "",
        "Staleness of an update aggregated into version t = t − 1 − the version it trained on. *hub busy*: share of "
        "the budget the hub worker spent receiving, aggregating, on central steps and validation. *2nd half*: "
        "dev accuracy over the second half of the simulated budget, weighted by how long each version was the "
        "newest, with the lowest and highest version there. *real s*: elapsed seconds of the mode on this machine "
        "(training, the protocol and the dev evaluations).",
        "",
        "## Time to target accuracy (simulated seconds) and speedup over synchronous FedAvg",
        "",
    ]
    for seed, targets in result["targets"].items():
        if not targets:
            lines.append(f"Seed {seed}: no target (run `sync` or give `--targets`).")
            continue
        others = [m for m in modes if m != "sync"]
        header = ["target", "dev acc", *[f"`{m}`" for m in modes], *[f"speedup `{m}` (sync / {m})" for m in others]]
        rows = []
        for target in targets:
            cells = [f"{target['name']} (seed {seed})", f"{target['accuracy']:.4f}"]
            cells += [_secs(target["sim_s"].get(m)) for m in modes]
            for m in others:
                speedup = target["speedup_vs_sync"].get(m)
                if speedup is not None:
                    cells.append(f"{speedup:.2f}×")
                elif target["sim_s"].get("sync") is None:
                    cells.append("— (sync not reached)")
                elif target["sim_s"].get("sync") == 0.0:
                    cells.append("— (the initial version meets it)")
                else:
                    cells.append("— (not reached)")
            rows.append(cells)
        lines += _table(header, rows)
        lines.append("")
    lines += [
        "A mode *reaches* a target when a version published within the budget has at least that dev accuracy; "
        '"not reached" means no version did (no number is extrapolated).',
        "",
        "Does a mode stay there? Share of the simulated time from first reaching the target to the end of the "
        "budget during which the newest version is at or above it:",
        "",
    ]
    for seed, targets in result["targets"].items():
        rows = []
        for target in targets:
            held = target.get("share_at_or_above_after", {})
            cells = [f"{target['name']} (seed {seed})", f"{target['accuracy']:.4f}"]
            cells += ["—" if held.get(m) is None else f"{100 * held[m]:.0f} %" for m in modes]
            rows.append(cells)
        if rows:
            lines += _table(["target", "dev acc", *[f"`{m}`" for m in modes]], rows)
            lines.append("")
    lines += [
        "## Dev accuracy at fractions of the budget",
        "",
    ]
    fractions = (0.1, 0.25, 0.5, 0.75, 1.0)
    header = ["mode", "seed", *[f"{int(100 * f)} % ({f * s['budget_s']:,.0f} s)" for f in fractions]]
    rows = [
        [f"`{r['mode']}`", str(r["seed"]), *[f"{accuracy_at(r, f * s['budget_s']):.4f}" for f in fractions]]
        for r in runs
    ]
    lines += _table(header, rows)
    switching = [r for r in runs if r["config"]["central"]]
    if switching:
        lines += ["", "## FFM switching (decisions on the held-out validation set)", ""]
        rows = []
        for r in switching:
            m = r["summary"]
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(m["kinds"].items())) or "—"
            decisions = ", ".join(f"{k} {v}" for k, v in sorted(m["decisions"].items())) or "—"
            rows.append([f"`{r['mode']}`", str(r["seed"]), kinds, decisions, str(r["hub_counters"].get("versions"))])
        lines += _table(["mode", "seed", "version kinds", "policy decisions", "hub versions (incl. 0)"], rows)
    lines += [
        "",
        "Per-version records (simulated and real time, kind, decision, dev and validation accuracy, staleness, "
        f"devices) and per-update records are in `{STEM}.json`; the plot is `{STEM}.png`.",
        "",
    ]
    return "\n".join(lines)


def render_plot(result: Mapping[str, Any], path: Path) -> str | None:
    """Dev accuracy against simulated wall time, one step line per mode; ``None`` or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib missing: {exc}"
    s = result["settings"]
    runs = result["runs"]
    colors = {"sync": "#1f77b4", "async": "#d62728", "ffm": "#2ca02c", "ffm-sync": "#9467bd"}
    fig, ax = plt.subplots(figsize=(10, 5.8))
    first_seed = s["seeds"][0]
    for r in runs:
        rows = in_budget(r)
        xs = [row["sim_s"] for row in rows] + [s["budget_s"]]
        ys = [row["dev_accuracy"] for row in rows] + [rows[-1]["dev_accuracy"]]
        main = r["seed"] == first_seed
        label = f"{r['mode']} (τ={r['config']['tau']})" if main else None
        ax.step(xs, ys, where="post", color=colors.get(r["mode"]), lw=1.8 if main else 0.8,
                alpha=1.0 if main else 0.45, label=label)  # fmt: skip
    for target in result["targets"].get(str(first_seed), [])[:2]:
        ax.axhline(target["accuracy"], color="grey", ls="--" if "best" in target["name"] else ":", lw=0.9)
        ax.text(0, target["accuracy"], f" {target['name']} {target['accuracy']:.3f}", va="bottom", fontsize=7,
                color="grey")  # fmt: skip
        for mode, t in target["sim_s"].items():
            if t is not None:
                ax.plot([t], [target["accuracy"]], "o", ms=4, color=colors.get(mode))
    ax.set_xlabel("simulated wall time (s), from costs measured on this machine")
    ax.set_ylabel(f"accuracy on GLUE SST-2 dev ({s['eval_limit']} rows)")
    seeds = ",".join(str(x) for x in s["seeds"])
    ax.set_title(
        f"{s['model']} {s['strategy']}, {s['devices']} devices × {s['per_device']} (Dirichlet α={s['alpha']:g}), "
        f"{s['slow']} at {s['slowdown']:g}× slower\nasync τ={s['tau']}, {s['staleness']} α={s['staleness_alpha']:g}, "
        f"max staleness {s['max_staleness']}; FFM: central {s['public']} public, {s['policy']} on "
        f"{s['validation']} validation; seed(s) {seeds}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.set_xlim(0, s["budget_s"])
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -------------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _staleness_cut(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'none', got {value}")
    return value


QUICK = {"devices": 4, "slow": 1, "per_device": 16, "public": 16, "validation": 32, "eval_limit": 100,
         "budget_rounds": 3.0, "calibration_repeats": 1, "tau": 2}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/async_switching.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Accuracy per global version against wall time for synchronous FedAvg, asynchronous aggregation "
            "(tau < N) with\nsimulated slow devices, and FFM switching (central step on the hub's public data, "
            "adaptive policy on a\nheld-out validation set), on a non-IID split of GLUE SST-2 from FFM_DATA_DIR "
            "(or --data-dir).\n\n"
            "A real Hub and real EdgeClients run in this process over the in-memory broker. Wall time is "
            "SIMULATED by a\ndiscrete-event loop from costs measured on this machine at start-up (seconds per "
            "training and evaluation\nexample, update decoding and aggregation; link speeds for the real bytes), "
            "so timings do not depend on the\nmachine's load. Every mode runs to the same simulated budget; dev "
            "accuracy of every version is measured by an\nobserver and costs no simulated time. Modes:\n"
            + "".join(f"  {m:9s} {h}\n" for m, h in MODE_HELP.items())
        ),
        epilog=(
            "Writes benchmarks/results/async_switching.json (settings, cost model, environment, per-version and "
            "per-update\nrecords), async_switching.md (the tables, also printed) and async_switching.png "
            "(accuracy vs simulated time).\n"
            "Example: FFM_DATA_DIR=/data HF_HUB_OFFLINE=1 python benchmarks/async_switching.py --budget-rounds 12"
        ),
    )
    d = Settings()
    parser.add_argument("--data-dir", metavar="DIR", help="data folder with glue/SST-2 (default: $FFM_DATA_DIR)")
    parser.add_argument("--devices", type=_positive_int, default=d.devices, help=f"devices N (default {d.devices})")
    parser.add_argument(
        "--per-device",
        type=_positive_int,
        default=d.per_device,
        help=f"train sentences per device (default {d.per_device})",
    )
    parser.add_argument(
        "--alpha", type=_positive_float, default=d.alpha, help=f"Dirichlet label-skew α (default {d.alpha:g})"
    )
    parser.add_argument(
        "--slow", type=int, default=d.slow, help=f"how many devices are slow: the last ones (default {d.slow})"
    )
    parser.add_argument(
        "--slowdown", type=float, default=d.slowdown, help=f"compute slowdown of a slow device (default {d.slowdown:g})"
    )
    parser.add_argument(
        "--hub-slowdown",
        type=_positive_float,
        default=d.hub_slowdown,
        help="the hub's compute time relative to a fast device (default 1: this machine)",
    )
    parser.add_argument(
        "--tau", type=_positive_int, default=d.tau, help=f"τ of the asynchronous modes, < devices (default {d.tau})"
    )
    parser.add_argument(
        "--staleness-alpha",
        type=float,
        default=d.staleness_alpha,
        help=f"exponent of the polynomial staleness weight (1+s)^-a (default {d.staleness_alpha:g})",
    )
    parser.add_argument(
        "--max-staleness",
        type=_staleness_cut,
        default=d.max_staleness,
        help="asynchronous modes reject updates more versions behind than this; 'none' = never "
        f"(default {d.max_staleness})",
    )
    parser.add_argument("--public", type=_positive_int, default=d.public, help=f"hub public rows (default {d.public})")
    parser.add_argument(
        "--validation",
        type=_positive_int,
        default=d.validation,
        help=f"hub held-out validation rows, for switching decisions only (default {d.validation})",
    )
    parser.add_argument(
        "--eval-limit", type=_positive_int, default=d.eval_limit, help=f"dev rows for accuracy (default {d.eval_limit})"
    )
    parser.add_argument(
        "--local-epochs",
        type=_positive_int,
        default=d.local_epochs,
        help=f"device epochs per round (default {d.local_epochs})",
    )
    parser.add_argument(
        "--central-epochs",
        type=_positive_int,
        default=d.central_epochs,
        help=f"hub epochs on its public rows per central step (default {d.central_epochs})",
    )
    parser.add_argument(
        "--uplink-mbps", type=_positive_float, default=d.uplink_mbps, help=f"device uplink (default {d.uplink_mbps:g})"
    )
    parser.add_argument(
        "--downlink-mbps",
        type=_positive_float,
        default=d.downlink_mbps,
        help=f"device downlink (default {d.downlink_mbps:g})",
    )
    parser.add_argument(
        "--budget",
        type=_positive_float,
        default=None,
        help="simulated seconds every mode runs (default: --budget-rounds synchronous rounds, from the cost model)",
    )
    parser.add_argument(
        "--budget-rounds",
        type=_positive_float,
        default=d.budget_rounds,
        help=f"budget in predicted synchronous rounds when --budget is not given (default {d.budget_rounds:g})",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(d.seeds), help="seeds, each a full run (default 0)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run (default: all)")
    parser.add_argument(
        "--targets", type=float, nargs="*", default=[], help="extra fixed target accuracies for time-to-target"
    )
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--calibration-repeats",
        type=_positive_int,
        default=d.calibration_repeats,
        help=f"timed calls per calibrated cost, median (default {d.calibration_repeats})",
    )
    parser.add_argument(
        "--costs-from",
        metavar="JSON",
        help="take the cost model from an earlier async_switching.json instead of measuring it (exact timings)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON, Markdown and PNG go")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + "; writes async_switching-quick.* (explicit flags still win)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: reload async_switching.json (or -quick with --quick) from --out-dir, recompute the "
        "summaries and time-to-target tables from its records, rewrite the JSON, Markdown and PNG",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="log the hub's and clients' INFO messages")
    return parser


def settings_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Settings:
    values: dict[str, Any] = {
        "data_dir": args.data_dir,
        "devices": args.devices,
        "per_device": args.per_device,
        "alpha": args.alpha,
        "slow": args.slow,
        "slowdown": args.slowdown,
        "hub_slowdown": args.hub_slowdown,
        "tau": args.tau,
        "staleness_alpha": args.staleness_alpha,
        "max_staleness": args.max_staleness,
        "public": args.public,
        "validation": args.validation,
        "eval_limit": args.eval_limit,
        "local_epochs": args.local_epochs,
        "central_epochs": args.central_epochs,
        "uplink_mbps": args.uplink_mbps,
        "downlink_mbps": args.downlink_mbps,
        "budget": args.budget,
        "budget_rounds": args.budget_rounds,
        "seeds": tuple(args.seeds),
        "modes": tuple(dict.fromkeys(args.modes)),
        "targets": tuple(args.targets),
        "threads": args.threads,
        "calibration_repeats": args.calibration_repeats,
        "costs_from": args.costs_from,
        "quick": args.quick,
    }
    if args.quick:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                values[key] = value
    return Settings(**values)


def report_only(out_dir: Path, stem: str) -> int:
    """Re-derive the analysis and the report from the records of an earlier run (nothing is measured)."""
    path = out_dir / f"{stem}.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    analyse(result)
    result["report_rendered_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_outputs(result, out_dir, stem)
    print(render_markdown(result))
    _say(f"rewrote {out_dir / stem}.json, .md and .png from the records in {path}")
    return 0


@contextlib.contextmanager
def _quiet_logs(verbose: bool) -> Iterator[None]:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ffm = logging.getLogger("ffm")
    previous = ffm.level
    # Rejections of stale updates are expected in asynchronous modes; they are counted, not logged.
    ffm.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        yield
    finally:
        ffm.setLevel(previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, argv)
    except ValueError as exc:
        parser.error(str(exc))
    stem = f"{STEM}-quick" if settings.quick else STEM
    if args.report_only:
        return report_only(args.out_dir, stem)
    with _quiet_logs(args.verbose):
        result = run_benchmark(settings, out_dir=args.out_dir, progress=not args.no_progress)
    print(render_markdown(result))
    _say(f"wrote {args.out_dir / stem}.json, .md and .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
