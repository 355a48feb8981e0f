"""Run one :class:`~ffm_hub.experiments.spec.RunSpec` through the project's own hub and edge code.

* **centralized**: the hub's central step (``TorchTrainer.train`` on the public shard, a fresh optimizer
  per call, exactly what ``ffm_hub.service`` builds for ``--central-epochs``) applied in ``R`` chunks
  that total ``centralized_epochs``; the private shards are never loaded into a trainer.
* **fl**: a :class:`~ffm_hub.hub.Hub` (FedAvg, τ = C, synchronous) and C
  :class:`~ffm_edge.client.EdgeClient` s, one per institution, each with its private shard, for ``R``
  rounds of ``local_epochs``; the hub holds no public data.
* **ffm**: the same federation plus the hub's central step on the public shard, scheduled by
  ``ffm_hub.switching.make_policy(ffm_order)``: after every aggregation (``federated-then-central``, paper
  section 5.1) or once before round 1 (``central-then-federated``, paper section 5.3).

Transport: the in-process broker (``memory``) or a managed Mosquitto (``mqtt``); the protocol code is the
same. Institutions run their rounds one after the other in a fixed order (the hub aggregates when the
C-th update arrives), and every training call seeds torch from the run's seed, the party and the round,
so a run gives the same numbers over either transport and on a rerun.

A :class:`Ledger` wraps each trainer's ``train`` and records which example ids every party trained on; a
trainer asked to train on data the ledger does not know raises. Each result stores that record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ffm_edge.data import LabeledData, describe, get_task, load_split
from ffm_edge.errors import ConfigError, FFMError
from ffm_edge.metrics import compute_metrics
from ffm_edge.spec import load_model_spec
from ffm_hub.experiments.spec import RUNNER_VERSION, RunSpec
from ffm_hub.experiments.splits import Splits, make_splits

__all__ = [
    "REPORT_METRICS",
    "Ledger",
    "RunOutcome",
    "environment",
    "load_result",
    "result_path",
    "run_many",
    "run_one",
]

log = logging.getLogger("ffm.experiment")

Say = Callable[[str], None]

#: Metrics stored for each task, first = the table's primary one. The paper gives one "%" per task and does
#: not say which metric: accuracy fits its CoLA figures (majority class = 69 %) and a correlation its STS-B.
REPORT_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "rte": ("accuracy",),
    "cola": ("accuracy", "matthews"),
    "stsb": ("pearson", "spearman"),
    "qnli": ("accuracy",),
    "mnli": ("accuracy",),
    "qqp": ("accuracy", "f1"),
    "digits": ("accuracy", "macro_f1"),
    "cifar10": ("accuracy", "macro_f1"),
}

_UPDATE_CHUNK = 64 * 1024  # EdgeClient's default
_GLOBAL_CHUNK = 128 * 1024  # HubSettings' default
_VERSION_TIMEOUT_S = 3 * 3600.0


def metrics_for(task: str) -> tuple[str, ...]:
    """The metrics stored for ``task``."""
    info = get_task(task)
    return REPORT_METRICS.get(info.name, info.metrics)


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """sha256 over the names, shapes and float32 bytes of a trainable state: equal weights, equal digest."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name], dtype=np.float32)
        h.update(f"{name}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# -- what each party touched ------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Which example ids each party trained on, recorded at every ``train`` call."""

    touched: dict[str, set[int]] = field(default_factory=dict)
    shards_used: dict[str, set[str]] = field(default_factory=dict)
    _known: dict[int, tuple[LabeledData, np.ndarray, str]] = field(default_factory=dict)

    def register(self, data: LabeledData, ids: np.ndarray, shard: str) -> LabeledData:
        """Make ``data`` (whose rows are the train split's rows ``ids``) known as ``shard``."""
        if len(ids) != len(data):
            raise ConfigError(f"shard {shard}: {len(ids)} ids for {len(data)} examples")
        self._known[id(data)] = (data, np.asarray(ids, dtype=np.int64), shard)
        return data

    def watch(self, trainer: Any, party: str) -> None:
        """Record every ``trainer.train(data, ...)`` call as ``party`` touching ``data``'s ids."""
        original = trainer.train

        def train(data: LabeledData, *args: Any, **kwargs: Any) -> Any:
            entry = self._known.get(id(data))
            if entry is None or entry[0] is not data:
                raise ConfigError(f"{party} was asked to train on data the experiment did not hand out")
            self.touched.setdefault(party, set()).update(int(i) for i in entry[1])
            self.shards_used.setdefault(party, set()).add(entry[2])
            return original(data, *args, **kwargs)

        trainer.train = train

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": {party: sorted(ids) for party, ids in sorted(self.touched.items())},
            "shards": {party: sorted(names) for party, names in sorted(self.shards_used.items())},
        }


# -- data ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _train_split(task: str, data_dir: str | None) -> LabeledData:
    return load_split(task, "train", data_dir=data_dir)


@lru_cache(maxsize=8)
def _dev_split(task: str, data_dir: str | None, limit: int) -> LabeledData:
    return load_split(task, "dev", data_dir=data_dir, limit=limit or None, seed=0)


def splits_for(spec: RunSpec, data_dir: str | None) -> tuple[LabeledData, Splits]:
    """The task's train split (cached per process) and this seed's shards."""
    train = _train_split(spec.task, data_dir)
    splits = make_splits(
        train.labels,
        seed=spec.seed,
        institutions=spec.institutions,
        k_public=spec.k_public,
        k_private=spec.k_private,
        alpha=spec.alpha,
        regression=train.info.is_regression,
    )
    return train, splits


class Evaluation:
    """The task's report metrics of a trainer's current weights on a fixed dev subset; times itself."""

    def __init__(self, trainer: Any, data: LabeledData, names: Sequence[str]) -> None:
        self.trainer, self.data, self.names = trainer, data, tuple(names)
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, state: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        started = time.perf_counter()
        if state is not None:
            self.trainer.load_trainable_state({k: state[k] for k in self.trainer.tensor_names})
        predictions = self.trainer.predict(self.data)
        metrics = compute_metrics(self.names, predictions, self.data.labels)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return metrics


def _make_trainer(spec: RunSpec, model: Any, task: Any) -> Any:
    from ffm_edge.trainer import TorchTrainer

    return TorchTrainer(
        model, task, spec.strategy, seed=spec.seed, learning_rate=spec.learning_rate, batch_size=spec.batch_size
    )


def _central_step(
    spec: RunSpec, trainer: Any, public: LabeledData, stats: dict[str, float]
) -> Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]:
    """The hub's central step (as ``ffm_hub.service`` builds it), seeded per call."""
    calls = itertools.count()

    def step(state: dict[str, np.ndarray], epochs: int) -> dict[str, np.ndarray]:
        import torch

        n = next(calls)
        trainer.load_trainable_state({k: state[k] for k in trainer.tensor_names})
        torch.manual_seed(derive_seed(spec.seed, "central", n))
        report = trainer.train(public, epochs=epochs, seed=derive_seed(spec.seed, "central-order", n))
        stats["train_s"] = stats.get("train_s", 0.0) + report.seconds
        stats["steps"] = stats.get("steps", 0.0) + report.steps
        return {**state, **trainer.trainable_state()}

    return step


# -- the methods --------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    spec: RunSpec
    model: Any
    task: Any
    train: LabeledData
    splits: Splits
    final_eval: LabeledData
    curve_eval: LabeledData | None
    ledger: Ledger
    say: Say


def _run_centralized(s: _Setup) -> dict[str, Any]:
    spec = s.spec
    trainer = _make_trainer(spec, s.model, s.task)
    s.ledger.watch(trainer, "hub")
    public = s.ledger.register(s.train.subset(s.splits.public), s.splits.public, "public")
    stats: dict[str, float] = {}
    step = _central_step(spec, trainer, public, stats)
    names = metrics_for(spec.task)
    curve_eval = Evaluation(trainer, s.curve_eval, names) if s.curve_eval is not None else None
    state = trainer.trainable_state()
    curve = []
    if curve_eval is not None:
        curve.append({"version": 0, "round": 0, "kind": "init", "epochs": 0, "metrics": curve_eval(state)})
    # R chunks (fewer when there are fewer epochs), each one central step with a fresh optimizer.
    parts = np.array_split(np.arange(spec.centralized_epochs), min(spec.rounds, spec.centralized_epochs))
    chunks = [len(part) for part in parts]
    done = 0
    for r, epochs in enumerate(chunks, 1):
        started = time.perf_counter()
        state = step(state, epochs)
        done += epochs
        point: dict[str, Any] = {"version": r, "round": r, "kind": "central", "epochs": done}
        if curve_eval is not None:
            point["metrics"] = curve_eval(state)
        point["seconds"] = time.perf_counter() - started
        curve.append(point)
        s.say(f"  central chunk {r}/{len(chunks)} ({done} epochs){_fmt_point(point, names)}")
    final = Evaluation(trainer, s.final_eval, names)(state)
    return {
        "final": final,
        "final_state_sha256": state_digest(state),
        "curve": curve,
        "timing": {
            "central_train_s": stats.get("train_s", 0.0),
            "curve_eval_s": curve_eval.seconds if curve_eval else 0.0,
        },
        "central_steps": len(chunks),
    }


@contextlib.contextmanager
def _transports(spec: RunSpec, federation: str, workdir: Path) -> Iterator[Callable[[str], Any]]:
    """A factory of connected-to-be transports for each party, on the spec's broker."""
    if spec.transport == "memory":
        from ffm_edge.transport import InMemoryBroker, InMemoryTransport

        broker = InMemoryBroker()
        yield lambda name: InMemoryTransport(broker, f"{federation}-{name}")
        return
    from ffm_edge.transport import MqttTransport
    from ffm_hub.brokers import start_managed_broker

    managed = start_managed_broker("mosquitto", port=0, workdir=workdir / "broker")
    try:
        yield lambda name: MqttTransport(managed.host, managed.port, client_id=f"{federation}-{name}")
    finally:
        managed.stop()


def _wait_for_version(hub: Any, version: int, timeout: float) -> None:
    if not hub.wait_for_version(version, timeout):
        raise FFMError(f"the hub did not reach version {version} within {timeout:.0f}s")


def _run_federated(s: _Setup, *, ffm: bool) -> dict[str, Any]:
    import torch

    from ffm_edge.client import EdgeClient
    from ffm_hub.hub import Hub, HubSettings
    from ffm_hub.store import SqliteStore
    from ffm_hub.switching import make_policy

    spec = s.spec
    names = metrics_for(spec.task)
    federation = f"exp-{spec.key[:12]}"
    central_stats: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ffm-exp-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        make_transport = stack.enter_context(_transports(spec, federation, workdir))
        hub_trainer = _make_trainer(spec, s.model, s.task)
        s.ledger.watch(hub_trainer, "hub")
        initial = hub_trainer.trainable_state()
        curve_eval = Evaluation(hub_trainer, s.curve_eval, names) if s.curve_eval is not None else None
        central_step = policy = None
        if ffm:
            public = s.ledger.register(s.train.subset(s.splits.public), s.splits.public, "public")
            step = _central_step(spec, hub_trainer, public, central_stats)

            def central_step(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return step(state, spec.central_epochs)

            policy = make_policy(spec.ffm_order)
        hub_transport = make_transport("hub")
        hub_transport.connect()
        stack.callback(hub_transport.close)
        store = SqliteStore(workdir / "hub")
        stack.callback(store.close)
        settings = HubSettings(
            federation=federation,
            model=s.model.name,
            strategy=spec.strategy,
            tau=spec.institutions,
            chunk_size=_GLOBAL_CHUNK,
        )
        hub = Hub(
            settings,
            hub_transport,
            store,
            initial_state=lambda: initial,
            evaluate=curve_eval,
            central_step=central_step,
            policy=policy,
        )
        hub.start()
        stack.callback(hub.stop)
        clients = []
        for i, ids in enumerate(s.splits.private):
            name = f"inst-{i}"
            data = s.ledger.register(s.train.subset(ids), ids, name)
            transport = make_transport(name)
            stack.callback(transport.close)
            client = EdgeClient(
                s.model,
                data,
                device_id=name,
                federation=federation,
                transport=transport,
                strategy=spec.strategy,
                codec=spec.codec,
                local_epochs=spec.local_epochs,
                learning_rate=spec.learning_rate,
                batch_size=spec.batch_size,
                seed=derive_seed(spec.seed, name),
                state_dir=workdir / name,
                chunk_size=_UPDATE_CHUNK,
                receipt_timeout=300.0,
                version_timeout=_VERSION_TIMEOUT_S,
                heartbeat_interval=0,
            )
            s.ledger.watch(client.trainer, name)
            client.connect()
            stack.callback(client.close)
            clients.append(client)
        expected = hub.current_version
        rounds = []
        for r in range(1, spec.rounds + 1):
            round_started = time.perf_counter()
            train_s = 0.0
            up = down = 0
            for i, client in enumerate(clients):
                torch.manual_seed(derive_seed(spec.seed, f"inst-{i}", r))
                result = client.run_round()
                train_s += result.train.seconds
                up += result.bytes_up
                down += result.bytes_down
            expected += 1
            _wait_for_version(hub, expected, _VERSION_TIMEOUT_S)
            record = store.get_version(expected)
            point: dict[str, float] = {
                "round": r,
                "seconds": time.perf_counter() - round_started,
                "clients_train_s": train_s,
                "bytes_up": up,
                "bytes_down": down,
            }
            rounds.append(point)
            metrics = record.metrics if record is not None else {}
            s.say(
                f"  round {r}/{spec.rounds} v{expected} {record.kind if record else '?'}"
                f"{_fmt_point({'metrics': metrics}, names)} ({point['seconds']:.0f}s)"
            )
        if not hub.wait_idle(60):
            raise FFMError("the hub did not go idle after the last round")
        if hub.counters["rejected"]:
            raise FFMError(f"the hub rejected updates: {hub.rejections}")
        final_state = hub.global_state()
        versions = store.versions()
        counters = dict(hub.counters)
        final = Evaluation(hub_trainer, s.final_eval, names)(final_state)
    curve: list[dict[str, Any]] = []
    aggregations = 0
    for v in versions:
        if v.kind not in ("init", "central"):
            aggregations += 1
        entry: dict[str, Any] = {"version": v.version, "round": aggregations, "kind": v.kind, "updates": v.num_updates}
        entry["metrics"] = {k: float(v.metrics[k]) for k in names if k in v.metrics}
        entry["hub"] = {k: float(val) for k, val in v.metrics.items() if k not in names}
        curve.append(entry)
    return {
        "final": final,
        "final_state_sha256": state_digest(final_state),
        "curve": curve,
        "rounds": rounds,
        "hub": {"versions": len(versions), "counters": counters},
        "timing": {
            "clients_train_s": sum(p["clients_train_s"] for p in rounds),
            "central_train_s": central_stats.get("train_s", 0.0),
            "curve_eval_s": curve_eval.seconds if curve_eval else 0.0,
            "federation_s": time.perf_counter() - started,
        },
    }


def _fmt_point(point: Mapping[str, Any], names: Sequence[str]) -> str:
    metrics = point.get("metrics") or {}
    shown = [f"{k}={metrics[k]:.4f}" for k in names if k in metrics]
    return (" " + " ".join(shown)) if shown else ""


# -- one run, many runs -------------------------------------------------------------------------------------
def _counts(data: LabeledData) -> dict[str, int]:
    return {str(k): v for k, v in data.label_counts().items()}


def run_one(spec: RunSpec, *, data_dir: str | Path | None = None, say: Say | None = None) -> dict[str, Any]:
    """Run ``spec`` and return its complete result document (not written anywhere)."""
    say = say or (lambda _msg: None)
    started = time.perf_counter()
    root = None if data_dir is None else str(data_dir)
    model = load_model_spec(spec.model)
    task = get_task(spec.task)
    train, splits = splits_for(spec, root)
    final_eval = _dev_split(spec.task, root, spec.eval_limit)
    curve_eval = _dev_split(spec.task, root, spec.curve_eval_limit) if spec.curve_eval_limit else None
    ledger = Ledger()
    setup = _Setup(spec, model, task, train, splits, final_eval, curve_eval, ledger, say)
    if spec.method == "centralized":
        body = _run_centralized(setup)
    else:
        body = _run_federated(setup, ffm=spec.method == "ffm")
    body["timing"]["total_s"] = time.perf_counter() - started
    return {
        "runner": RUNNER_VERSION,
        "key": spec.key,
        "spec": spec.to_dict(),
        "label": spec.label(),
        "status": "done",
        **body,
        "primary_metric": metrics_for(spec.task)[0],
        "data": {
            "train": describe(train),
            "final_eval": {"examples": len(final_eval), "what": describe(final_eval)},
            "curve_eval": None if curve_eval is None else {"examples": len(curve_eval), "what": describe(curve_eval)},
            "public_counts": _counts(train.subset(splits.public)),
            "private_counts": [_counts(train.subset(p)) for p in splits.private],
            "splits": splits.to_dict(),
        },
        "touched": ledger.to_dict(),
        "environment": environment(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def result_path(out_dir: str | Path, spec: RunSpec) -> Path:
    """Where a run's result lives: ``<out_dir>/runs/<key>.json``."""
    return Path(out_dir) / "runs" / f"{spec.key}.json"


def load_result(out_dir: str | Path, spec: RunSpec) -> dict[str, Any] | None:
    """The cached result of ``spec``, or None (a file of another key or status is ignored)."""
    path = result_path(out_dir, spec)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("key") != spec.key or result.get("status") != "done":
        return None
    return dict(result)


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


@dataclass
class RunOutcome:
    """What :func:`run_many` did with one spec."""

    spec: RunSpec
    status: str  # cached | done | skipped | failed
    result: dict[str, Any] | None = None
    seconds: float = 0.0
    error: str | None = None


def run_many(
    specs: Sequence[RunSpec],
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    budget_s: float | None = None,
    max_runs: int | None = None,
    say: Say | None = None,
    keep_going: bool = False,
) -> list[RunOutcome]:
    """Run every spec not cached in ``out_dir`` yet, in order; stop starting runs after ``budget_s``."""
    say = say or (lambda _msg: None)
    started = time.monotonic()
    outcomes: list[RunOutcome] = []
    ran = 0
    todo = [s for s in specs if load_result(out_dir, s) is None]
    say(f"{len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to run")
    for n, spec in enumerate(specs, 1):
        cached = load_result(out_dir, spec)
        if cached is not None:
            outcomes.append(RunOutcome(spec, "cached", cached))
            continue
        elapsed = time.monotonic() - started
        if (budget_s is not None and elapsed >= budget_s) or (max_runs is not None and ran >= max_runs):
            outcomes.append(RunOutcome(spec, "skipped"))
            continue
        ran += 1
        say(f"[{ran}/{len(todo)}] {spec.label()} (run {n} of {len(specs)}, key {spec.key[:12]})")
        t0 = time.perf_counter()
        try:
            result = run_one(spec, data_dir=data_dir, say=say)
        except Exception as exc:
            if not keep_going:
                raise
            log.exception("run %s failed", spec.label())
            outcomes.append(RunOutcome(spec, "failed", None, time.perf_counter() - t0, repr(exc)))
            continue
        _write_json(result_path(out_dir, spec), result)
        seconds = time.perf_counter() - t0
        primary = result["primary_metric"]
        say(f"  done: {primary}={result['final'][primary]:.4f} in {seconds:.0f}s")
        outcomes.append(RunOutcome(spec, "done", result, seconds))
    skipped = sum(o.status == "skipped" for o in outcomes)
    if skipped:
        say(f"{skipped} runs left for a later invocation (budget or --max-runs reached)")
    return outcomes


# -- environment --------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Versions, CPU and thread counts: what a result was computed with."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": {p: _version(p) for p in ("torch", "transformers", "peft", "numpy", "paho-mqtt")},
        "git_commit": _git_commit(),
    }


def is_finite_result(result: Mapping[str, Any]) -> bool:
    """True when every final metric is a finite number."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in result.get("final", {}).values())
