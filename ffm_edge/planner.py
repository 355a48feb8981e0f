"""Pick the most capable training strategy that fits the device's memory budget, and say why.

Candidates are tried from the most capable down (:func:`capability_order`): quantized full fine-tuning,
LoRA on an fp32 base, on an 8-bit base, on a 4-bit NF4 base (QLoRA), soft prompts, and last the adapter
head alone. Within one
strategy and precision, the cheap levers come first — gradient checkpointing, then smaller micro-batches
— because activations, not weights, dominate training memory on small batches (``../shared/MODELS.md``).
The first candidate whose predicted peak fits the budget wins. An app may force a strategy; when it
cannot fit, :class:`InsufficientMemoryError` says so before any weight is loaded.

Two runtimes: PyTorch (every strategy, precision and lever) and onnxruntime-training (``ort``: lora, prompt
and head on an fp32 base, from prebuilt artifacts, without torch). Within one strategy the torch
configurations come first, the reference runtime, and ORT's next: a device that cannot hold a strategy
on torch may still hold it on ORT before the planner gives up capability.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ffm_edge.errors import ConfigError
from ffm_edge.memory import (
    ORT_FAMILIES,
    ORT_STRATEGIES,
    MemoryEstimate,
    TrainingShape,
    estimate_memory,
    micro_batch_options,
)
from ffm_edge.spec import ModelSpec

if TYPE_CHECKING:
    from ffm_edge.strategies import Strategy

__all__ = [
    "Candidate",
    "InsufficientMemoryError",
    "Plan",
    "capability_order",
    "format_plan",
    "plan_training",
    "strategy_for",
]


def capability_order(*, registry: bool = True) -> tuple[tuple[str, str], ...]:
    """(strategy, base precision) from the most to the least capable.

    Strategies by their ``capability_rank``; within one, the fp32 base before the 8-bit and the 4-bit
    one (quantization costs accuracy and, on CPU, speed). Full fine-tuning has no quantized base.
    ``registry=False`` uses the built-in order instead of the strategy registry, which imports torch (for
    a plan over the ORT runtime alone).
    """
    order: list[tuple[str, str]] = []
    for name in _strategy_names() if registry else _STATIC_ORDER:
        order += [(name, "fp32")] if name == "full_q8" else [(name, p) for p in ("fp32", "int8", "nf4")]
    return tuple(order)


_STATIC_ORDER = ("full_q8", "lora", "prompt", "head")  # the registry's order, for devices without torch


def _strategy_names() -> list[str]:
    """Strategy names by capability: from the registry when torch is here, else the built-in order."""
    try:
        from ffm_edge.strategies import strategies_by_capability
    except ImportError:  # a torch-less device (ORT runtime): the registry imports torch
        return list(_STATIC_ORDER)
    return strategies_by_capability()


class InsufficientMemoryError(ConfigError):
    """No configuration of the requested strategy fits the memory budget."""


@dataclass(frozen=True)
class Candidate:
    """One configuration the planner considered."""

    strategy: str
    precision: str
    gradient_checkpointing: bool
    micro_batch_size: int
    estimate: MemoryEstimate
    fits: bool
    required_bytes: int = 0  # the predicted peak plus the planner's safety margin
    runtime: str = "torch"  # "torch" or "ort" (onnxruntime-training)

    @property
    def label(self) -> str:
        """A short human name, e.g. ``lora/nf4 +ckpt mb=4`` (``lora/fp32 ort mb=16`` on ORT)."""
        extra = (" +ckpt" if self.gradient_checkpointing else "") + f" mb={self.micro_batch_size}"
        return f"{self.strategy}/{self.precision}{' ort' if self.runtime == 'ort' else ''}{extra}"


@dataclass(frozen=True)
class Plan:
    """The planner's decision, every candidate it looked at, and the reason."""

    budget_bytes: int
    choice: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""


def _candidates(
    spec: ModelSpec,
    batch_size: int,
    seq_len: int,
    num_labels: int,
    allowed: Sequence[tuple[str, str]],
    runtimes: Sequence[str],
    ort_strategies: Sequence[str] | None,
) -> Iterator[tuple[str, str, bool, int, MemoryEstimate, str]]:
    for strategy, precision in allowed:
        if precision not in spec.precisions:
            continue
        if "torch" in runtimes:
            levers = [(False, batch_size)] + [(True, mb) for mb in micro_batch_options(batch_size)]
            if strategy == "head":  # no graph through the backbone: nothing to checkpoint, only micro-batches
                levers = [(False, mb) for mb in micro_batch_options(batch_size)]
            for checkpointing, micro in levers:
                shape = TrainingShape(batch_size, seq_len, micro, checkpointing, num_labels)
                est = estimate_memory(spec, strategy, shape, precision=precision)
                yield strategy, precision, checkpointing, micro, est, "torch"
        if (
            "ort" in runtimes
            and precision == "fp32"
            and strategy in ORT_STRATEGIES
            and spec.family in ORT_FAMILIES
            and (ort_strategies is None or strategy in ort_strategies)
        ):  # whole batches, no checkpointing: the artifacts fix the graph
            shape = TrainingShape(batch_size, seq_len, batch_size, False, num_labels)
            est = estimate_memory(spec, strategy, shape, precision=precision, runtime="ort")
            yield strategy, precision, False, batch_size, est, "ort"


def plan_training(
    spec: ModelSpec,
    budget_bytes: int,
    *,
    batch_size: int,
    seq_len: int,
    num_labels: int = 2,
    strategies: Sequence[str] | None = None,
    force: str | None = None,
    available: Sequence[str] = ("fp32", "int8", "nf4"),
    safety_margin: float = 0.10,
    runtimes: Sequence[str] = ("torch",),
    ort_strategies: Sequence[str] | None = None,
) -> Plan:
    """Choose a strategy and its levers for ``budget_bytes``; ``available`` lists precisions this device runs.

    ``runtimes`` lists the runtimes this device can train with (``torch``, ``ort``); ``ort_strategies``
    the strategies it has ORT artifacts for (``None``: any the ORT runtime trains).

    A configuration fits when its predicted peak plus ``safety_margin`` (a fraction; the memory model's
    error on the benchmarked configurations is mostly within ±15 %) is within the budget.
    """
    if not 0 <= safety_margin < 1:
        raise ConfigError(f"safety_margin must be in [0, 1), got {safety_margin}")
    unknown = sorted(set(runtimes) - {"torch", "ort"})
    if unknown or not runtimes:
        raise ConfigError(f"runtimes must name torch and/or ort, got {list(runtimes)}")
    allowed = [
        (s, p)
        for s, p in capability_order(registry="torch" in runtimes)
        if (force is None or s == force) and (strategies is None or s in strategies) and p in available
    ]
    if force is not None and not allowed:
        raise ConfigError(f"cannot force {force!r}: unknown strategy or no usable precision on this device")
    considered: list[Candidate] = []
    choice: Candidate | None = None
    candidates = _candidates(spec, batch_size, seq_len, num_labels, allowed, runtimes, ort_strategies)
    for strategy, precision, ckpt, micro, est, runtime in candidates:
        required = int(est.peak_bytes * (1 + safety_margin))
        candidate = Candidate(strategy, precision, ckpt, micro, est, required <= budget_bytes, required, runtime)
        considered.append(candidate)
        if candidate.fits and choice is None:
            choice = candidate
    if choice is None:
        smallest = min(considered, key=lambda c: c.required_bytes, default=None)
        need = f"{smallest.required_bytes / 2**20:.0f} MiB ({smallest.label})" if smallest else "n/a"
        what = f"strategy {force!r}" if force else "any strategy"
        raise InsufficientMemoryError(
            f"{what} needs at least {need} on {spec.name} at batch {batch_size}, sequence {seq_len}; "
            f"the budget is {budget_bytes / 2**20:.0f} MiB"
        )
    better = [c for c in considered if c is not choice and considered.index(c) < considered.index(choice)]
    reason = f"{choice.label} is the most capable configuration that fits: predicted peak " + (
        f"{choice.estimate.peak_bytes / 2**20:.0f} MiB (+{safety_margin:.0%} margin) <= budget "
        f"{budget_bytes / 2**20:.0f} MiB"
    )
    if better:
        tightest = min(better, key=lambda c: c.required_bytes)
        reason += f"; more capable options need >= {tightest.required_bytes / 2**20:.0f} MiB"
    return Plan(budget_bytes=budget_bytes, choice=choice, candidates=considered, reason=reason)


def format_plan(plan: Plan) -> str:
    """A table of the first configuration per strategy/precision and the choice, for ``ffm-edge plan``."""
    seen: dict[tuple[str, str, str], Candidate] = {}
    for c in plan.candidates:
        key = (c.strategy, c.precision, c.runtime)
        if key not in seen or (c.fits and not seen[key].fits):
            seen[key] = c
    with_runtime = any(c.runtime != "torch" for c in plan.candidates)
    lines = [
        f"budget {plan.budget_bytes / 2**20:.0f} MiB",
        "| strategy | base |"
        + (" runtime |" if with_runtime else "")
        + " levers | trainable | load MiB | train MiB | fits |",
        "|---|---|" + ("---|" if with_runtime else "") + "---|---:|---:|---:|---|",
    ]
    for c in seen.values():
        levers = ("checkpointing, " if c.gradient_checkpointing else "") + f"micro-batch {c.micro_batch_size}"
        mark = "yes" if c.fits else "no"
        if plan.choice is not None and c is plan.choice:
            mark = "**chosen**"
        runtime = f" {c.runtime} |" if with_runtime else ""
        lines.append(
            f"| {c.strategy} | {c.precision} |{runtime} {levers} | {c.estimate.trainable_params:,} | "
            f"{c.estimate.load_bytes / 2**20:.0f} | {c.estimate.train_bytes / 2**20:.0f} | {mark} |"
        )
    lines.append(plan.reason)
    return "\n".join(lines)


def strategy_for(candidate: Candidate) -> tuple[Strategy, int]:
    """The configured strategy and micro-batch size a plan's choice stands for."""
    from ffm_edge.strategies import get_strategy

    config: dict[str, Any] = {"gradient_checkpointing": candidate.gradient_checkpointing}
    if candidate.strategy != "full_q8":
        config["base_precision"] = candidate.precision
    return get_strategy(candidate.strategy, **config), candidate.micro_batch_size
