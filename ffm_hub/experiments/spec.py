"""Declarative experiment specs: one run (:class:`RunSpec`) and a grid of runs (:class:`ExperimentSpec`).

A :class:`RunSpec` names everything that decides a result — task, model, strategy, method, number of
institutions, k-shot sizes, the Dirichlet label skew, rounds, epochs, seed, evaluation sizes, codec and
transport — so its canonical JSON is the cache key of the run. An :class:`ExperimentSpec` (a TOML file
under ``benchmarks/paper/``) expands into runs: tasks × shots × seeds × methods over shared settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ffm_edge.data import get_task
from ffm_edge.errors import ConfigError

__all__ = [
    "LAYOUTS",
    "MAIN",
    "METHODS",
    "ORDERS",
    "RUNNER_VERSION",
    "TRANSPORTS",
    "ExperimentSpec",
    "RunSpec",
    "Variant",
    "load_experiment",
]

#: Bumped whenever a change of the runner changes results: it is part of every cache key.
RUNNER_VERSION = "ffm-paper-runner/1"

#: centralized: the hub's public shard only; fl: FedAvg over the private shards only; ffm: both.
METHODS = ("centralized", "fl", "ffm")
#: When FFM's hub optimizes on its public shard (ffm_hub.switching): after every aggregation (paper
#: section 5.1, GLUE) or once before the first federated round (paper section 5.3, CV).
ORDERS = ("federated-then-central", "central-then-federated")
TRANSPORTS = ("memory", "mqtt")
#: How the report lays a grid out, after the paper's tables.
LAYOUTS = ("table1", "table2", "table3")
#: The name of an experiment's own grid among its variants (``--variants main,smollm2``).
MAIN = "main"


def _positive(value: object, what: str, errors: list[str], *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        errors.append(f"{what} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RunSpec:
    """One run: one method on one seed's data splits. Every field is part of the cache key."""

    task: str = field(metadata={"help": "GLUE task (sst2, mrpc, ...) or cifar10 / digits"})
    method: str = field(metadata={"help": "centralized | fl | ffm"})
    seed: int = field(metadata={"help": "seeds the data splits, the initial weights and every training call"})
    model: str = field(default="minilm-l6-v2", metadata={"help": "model spec name (models/*.toml) or path"})
    strategy: str = field(default="lora", metadata={"help": "what trains: lora, head, prompt, full_q8"})
    institutions: int = field(default=10, metadata={"help": "C, the number of private institutions (edges)"})
    k_public: int = field(
        default=32, metadata={"help": "examples per class in the hub's public shard (regression: 2k in all)"}
    )
    k_private: int = field(
        default=32,
        metadata={"help": "examples per class per institution on average (C·k per class drawn, then split)"},
    )
    alpha: float = field(
        default=0.5, metadata={"help": "Dirichlet label-skew α of the private split (inf = IID, even split)"}
    )
    rounds: int = field(default=3, metadata={"help": "federated rounds R (global versions after aggregation)"})
    local_epochs: int = field(default=1, metadata={"help": "epochs each institution trains per round"})
    central_epochs: int = field(default=1, metadata={"help": "FFM: epochs of one hub central step on public data"})
    centralized_epochs: int = field(default=10, metadata={"help": "centralized baseline: epochs on public data"})
    ffm_order: str = field(default="federated-then-central", metadata={"help": " | ".join(ORDERS)})
    eval_limit: int = field(
        default=1000, metadata={"help": "dev examples of the final evaluation (stratified, fixed; 0 = all)"}
    )
    curve_eval_limit: int = field(
        default=200, metadata={"help": "dev examples evaluated at every global version (0 = final only)"}
    )
    learning_rate: float | None = field(default=None, metadata={"help": "local and central lr (None: the spec's)"})
    batch_size: int | None = field(default=None, metadata={"help": "batch size (None: the model spec's)"})
    codec: str = field(default="fp32", metadata={"help": "encoding of the edge updates (fp32, fp16, int8)"})
    transport: str = field(default="memory", metadata={"help": "memory (in-process broker) or mqtt (Mosquitto)"})

    def __post_init__(self) -> None:
        errors: list[str] = []
        try:
            info = get_task(self.task)
        except ConfigError as exc:
            errors.append(str(exc))
        else:
            object.__setattr__(self, "task", info.name)  # one spelling per task: one cache key
        if self.method not in METHODS:
            errors.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            errors.append(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("institutions", "k_public", "k_private", "rounds", "local_epochs", "central_epochs"):
            _positive(getattr(self, name), name, errors)
        _positive(self.centralized_epochs, "centralized_epochs", errors)
        _positive(self.eval_limit, "eval_limit", errors, minimum=0)
        _positive(self.curve_eval_limit, "curve_eval_limit", errors, minimum=0)
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError):
            errors.append(f"alpha must be a positive number or inf, got {self.alpha!r}")
        else:
            if math.isnan(alpha) or alpha <= 0:
                errors.append(f"alpha must be a positive number or inf, got {self.alpha!r}")
            object.__setattr__(self, "alpha", alpha)
        if self.ffm_order not in ORDERS:
            errors.append(f"ffm_order must be one of {', '.join(ORDERS)}, got {self.ffm_order!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            errors.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size is not None:
            _positive(self.batch_size, "batch_size", errors)
        if self.codec not in ("fp32", "fp16", "int8"):
            errors.append(f"codec must be fp32, fp16 or int8, got {self.codec!r}")
        if self.transport not in TRANSPORTS:
            errors.append(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if errors:
            raise ConfigError("; ".join(errors))

    # -- identity -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (alpha inf becomes the string "inf")."""
        out = asdict(self)
        if math.isinf(self.alpha):
            out["alpha"] = "inf"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown run settings {unknown}; known: {sorted(known)}")
        values = dict(data)
        if values.get("alpha") == "inf":
            values["alpha"] = math.inf
        return cls(**values)

    @property
    def key(self) -> str:
        """sha256 of the canonical JSON of the spec and the runner version: the run's cache key."""
        return run_key(self)

    @property
    def data_key(self) -> tuple[Any, ...]:
        """What decides the data splits: runs that share it train on exactly the same examples."""
        return (self.task, self.seed, self.institutions, self.k_public, self.k_private, self.to_dict()["alpha"])

    def cell(self) -> tuple[Any, ...]:
        """The spec without its seed: runs of one table cell differ only in the seed."""
        d = self.to_dict()
        d.pop("seed")
        return tuple(sorted(d.items()))

    def label(self) -> str:
        """A short human label for logs."""
        return f"{self.task} k={self.k_private} {self.method} seed={self.seed}" + (
            f" [{self.transport}]" if self.transport != "memory" else ""
        )


def run_key(spec: RunSpec) -> str:
    canonical = json.dumps(
        {"runner": RUNNER_VERSION, "spec": spec.to_dict()}, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Variant:
    """More rows of the same table: the grid again with some run settings changed (another model or strategy).

    Unset ``tasks``, ``methods``, ``seeds`` and ``shots`` are the experiment's; ``run`` overrides its
    shared settings. A variant with fewer seeds says why in ``note``, and the table prints it.
    """

    name: str = field(metadata={"help": "short id, for --variants and the JSON (e.g. smollm2, full_q8)"})
    label: str = field(default="", metadata={"help": "row label in the table (default: model and strategy)"})
    tasks: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    shots: tuple[int, ...] | None = None
    run: Mapping[str, Any] = field(default_factory=dict)
    note: str = field(default="", metadata={"help": "why it differs (e.g. fewer seeds: compute), shown in the table"})

    def __post_init__(self) -> None:
        errors: list[str] = []
        if not isinstance(self.name, str) or not self.name or self.name == MAIN or "," in self.name:
            errors.append(f"variant name must be a non-empty string other than {MAIN!r}, without commas")
        for what in ("tasks", "methods", "seeds", "shots"):
            value = getattr(self, what)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                errors.append(f"{what} must be a non-empty list, got {value!r}")
            else:
                object.__setattr__(self, what, tuple(value))
        if not isinstance(self.run, Mapping):
            errors.append(f"run must be a table of settings, got {self.run!r}")
        if errors:
            raise ConfigError(f"variant {self.name!r}: " + "; ".join(errors))


@dataclass(frozen=True)
class ExperimentSpec:
    """A grid of runs after one of the paper's tables: tasks × shots × seeds × methods.

    ``run`` holds the shared :class:`RunSpec` settings (every field but task, method, seed and the shots).
    ``shots`` sets k for the public and the private shards alike, unless ``run`` fixes ``k_public``.
    """

    name: str = field(metadata={"help": "file stem of the report (table1 -> table1.md, table1_*.png)"})
    tasks: tuple[str, ...] = field(metadata={"help": "tasks in run order (the first ones finish first)"})
    layout: str = field(default="table1", metadata={"help": "report layout: " + " | ".join(LAYOUTS)})
    title: str = ""
    description: str = ""
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (13, 21, 42, 87, 100)
    shots: tuple[int, ...] = (32,)
    run: Mapping[str, Any] = field(default_factory=dict)
    variants: tuple[Variant, ...] = field(
        default=(), metadata={"help": "[[variants]]: more rows with other settings (model, strategy, seeds)"}
    )

    def __post_init__(self) -> None:
        errors: list[str] = []
        variants = []
        known = {f.name for f in fields(Variant)}
        for v in self.variants:
            if not isinstance(v, Variant):
                unknown = sorted(set(v) - known) if isinstance(v, Mapping) else ["(not a table)"]
                if unknown or "name" not in v:
                    errors.append(f"a variant has unknown keys {unknown} or no name; known: {sorted(known)}")
                    continue
            try:
                variants.append(v if isinstance(v, Variant) else Variant(**v))
            except ConfigError as exc:
                errors.append(str(exc))
        object.__setattr__(self, "variants", tuple(variants))
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            errors.append(f"variant names repeat: {names}")
        if self.layout not in LAYOUTS:
            errors.append(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for what in ("tasks", "methods", "seeds", "shots"):
            value = getattr(self, what)
            if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                errors.append(f"{what} must be a non-empty list, got {value!r}")
            elif len(set(value)) != len(value):
                errors.append(f"{what} has duplicates: {list(value)}")
            else:
                object.__setattr__(self, what, tuple(value))
        for where, run in [("[run]", self.run)] + [(f"variant {v.name!r} run", v.run) for v in variants]:
            reserved = {"task", "method", "seed", "k_private"} & set(run)
            if reserved:
                errors.append(f"{where} cannot set {sorted(reserved)}: use tasks, methods, seeds and shots")
        if errors:
            raise ConfigError(f"experiment {self.name!r}: " + "; ".join(errors))
        try:
            list(self.runs())  # every run must be valid: fail on load, not after an hour of training
        except ConfigError as exc:
            raise ConfigError(f"experiment {self.name!r}: {exc}") from exc

    def grids(self) -> list[tuple[str, ExperimentSpec]]:
        """``(name, grid)`` for the experiment's own grid (:data:`MAIN`) and then each variant."""
        if not self.variants:
            return [(MAIN, self)]
        out: list[tuple[str, ExperimentSpec]] = [(MAIN, replace(self, variants=()))]
        for v in self.variants:
            grid = replace(
                self,
                tasks=v.tasks or self.tasks,
                methods=v.methods or self.methods,
                seeds=v.seeds or self.seeds,
                shots=v.shots or self.shots,
                run={**self.run, **v.run},
                variants=(),
            )
            out.append((v.name, grid))
        return out

    def variant(self, name: str) -> Variant | None:
        """The variant called ``name`` (None for :data:`MAIN` or an unknown name)."""
        return next((v for v in self.variants if v.name == name), None)

    def runs(
        self,
        *,
        tasks: Sequence[str] | None = None,
        methods: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        shots: Sequence[int] | None = None,
        transport: str | None = None,
        variants: Sequence[str] | None = None,
    ) -> Iterator[RunSpec]:
        """The runs in execution order, optionally filtered: the main grid, then each variant's.

        Within a grid: task, then k, then seed, then method. One seed's three methods come together, so a
        partial grid already compares methods on equal data. A run two grids share is yielded once.
        """
        if variants is not None:
            unknown = sorted(set(variants) - {name for name, _ in self.grids()})
            if unknown:
                raise ConfigError(f"unknown variants {unknown}; known: {[name for name, _ in self.grids()]}")
        seen: set[str] = set()
        for name, grid in self.grids():
            if variants is not None and name not in variants:
                continue
            for spec in grid._grid_runs(tasks, methods, seeds, shots, transport):
                if spec.key not in seen:
                    seen.add(spec.key)
                    yield spec

    def _grid_runs(
        self,
        tasks: Sequence[str] | None,
        methods: Sequence[str] | None,
        seeds: Sequence[int] | None,
        shots: Sequence[int] | None,
        transport: str | None,
    ) -> Iterator[RunSpec]:
        want_tasks = None if tasks is None else {get_task(t).name for t in tasks}
        for task in self.tasks:
            if want_tasks is not None and get_task(task).name not in want_tasks:
                continue
            for k in self.shots:
                if shots is not None and k not in shots:
                    continue
                for seed in self.seeds:
                    if seeds is not None and seed not in seeds:
                        continue
                    for method in self.methods:
                        if methods is not None and method not in methods:
                            continue
                        settings = {"k_public": k, **self.run}
                        if transport is not None:
                            settings["transport"] = transport
                        yield RunSpec.from_dict(
                            {**settings, "task": task, "method": method, "seed": seed, "k_private": k}
                        )

    def with_run(self, **overrides: Any) -> ExperimentSpec:
        """A copy with some shared run settings changed."""
        return replace(self, run={**self.run, **overrides})


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Read an experiment TOML (see ``benchmarks/paper/*.toml``)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"experiment spec {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    known = {f.name for f in fields(ExperimentSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    data.setdefault("name", path.stem)
    if not isinstance(data.get("variants", []), list):
        raise ConfigError(f"{path}: variants must be an array of tables ([[variants]])")
    data["variants"] = tuple(data.get("variants", ()))
    if "tasks" not in data:
        raise ConfigError(f"{path}: 'tasks' is required")
    return ExperimentSpec(**data)
