"""Switching between federated and central optimization: when the hub trains on its public data, and
what it does with a new aggregate.

The paper's FFM hub alternates FedAvg over private updates with optimization on its own public data
(sections 4.1, 5.1 and 5.3). A policy says whether a central step runs before the first federated round
(``central_first``) and after each aggregation (``central_after_aggregate``); an adaptive one also says,
after each central step, whether to run another, stop, or undo it (``after_central``), and finally
whether to publish the candidate, revert to the previous version, or publish part of the step
(``decide``). Policies are pure: they see numbers, never models, so they are tested on constructed
metric sequences; the hub applies them and logs every decision with its reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ffm_edge.errors import ConfigError

__all__ = [
    "ACTIONS",
    "CENTRAL_ACTIONS",
    "ORDERS",
    "POLICIES",
    "AdaptivePolicy",
    "Decision",
    "FixedSchedule",
    "SwitchingPolicy",
    "make_policy",
]

#: What becomes of a candidate version: publish it, discard it (the previous version stays and the next
#: federated round starts from it), or publish part of its step.
ACTIONS = ("publish", "revert", "downweight")
#: After one central step: run another, stop here, or undo the step just taken.
CENTRAL_ACTIONS = ("central", "stop", "undo")
#: Fixed orders of central and federated optimization (sections 4.1, 5.1 and 5.3 of the paper).
ORDERS = ("federated-then-central", "central-then-federated", "federated-only")


@dataclass(frozen=True)
class Decision:
    """What to do next, and why (logged and stored with the version)."""

    action: str
    reason: str
    mix: float = 1.0  # downweight: the share of the step kept (previous + mix * (candidate - previous))

    def __post_init__(self) -> None:
        if self.action not in ACTIONS + CENTRAL_ACTIONS:
            raise ConfigError(f"unknown action {self.action!r}")
        if not 0.0 <= self.mix <= 1.0:
            raise ConfigError(f"mix must be in [0, 1], got {self.mix}")


class SwitchingPolicy(ABC):
    """Decides, from held-out metrics, when the hub optimizes centrally and what it publishes."""

    #: Run a central step on public data before the first federated round (version 1 is central).
    central_first: bool = False
    #: Run the central step on public data after each aggregation (before evaluating the candidate).
    central_after_aggregate: bool = True
    #: Evaluate after every central step and ask :meth:`after_central` whether to go on (costs evaluations).
    adapts_central: bool = False

    @abstractmethod
    def decide(self, previous: float | None, candidate: float | None) -> Decision:
        """``previous``: the metric of the current version; ``candidate``: of the new aggregate."""

    def after_central(self, before: float | None, after: float | None, steps: int) -> Decision:
        """After central step number ``steps``: ``central`` (another), ``stop`` or ``undo`` (drop it)."""
        return Decision("stop", "one central step per aggregation")


@dataclass
class FixedSchedule(SwitchingPolicy):
    """Always publish, in a fixed order of central and federated optimization.

    ``federated-then-central``: every aggregate gets a central step (the paper's FFM, section 5.1).
    ``central-then-federated``: one central step before the first federated round, then federated
    rounds only (the paper's section 5.3 setting). ``federated-only``: plain FL, the public data unused.
    """

    order: str = field(default="federated-then-central", metadata={"help": "one of " + ", ".join(ORDERS)})

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        self.central_first = self.order == "central-then-federated"
        self.central_after_aggregate = self.order == "federated-then-central"

    def decide(self, previous: float | None, candidate: float | None) -> Decision:
        return Decision("publish", f"fixed schedule ({self.order})")


@dataclass
class AdaptivePolicy(SwitchingPolicy):
    """Optimize centrally while it helps; publish what does not make the held-out metric worse.

    After each central step the held-out metric decides: a step that lowered it by more than
    ``tolerance`` is undone (the aggregate goes on without it), a step that gained more than
    ``central_min_gain`` is followed by another, up to ``max_central_steps``. Then a candidate more than
    ``tolerance`` below the current version is reverted when ``on_worse`` is "revert", or published at
    ``mix`` of its step when "downweight".
    """

    tolerance: float = field(default=0.0, metadata={"help": "a drop this small still counts as not worse"})
    on_worse: str = field(default="revert", metadata={"help": "revert or downweight"})
    mix: float = field(default=0.5, metadata={"help": "share of a worse step kept when down-weighting"})
    central: bool = field(default=True, metadata={"help": "run central steps after each aggregation"})
    central_first: bool = field(default=False, metadata={"help": "also run a central step before round 1"})
    max_central_steps: int = field(default=1, metadata={"help": "most central steps after one aggregation"})
    central_min_gain: float = field(
        default=0.0, metadata={"help": "another central step only after a step that gained more than this"}
    )

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.on_worse not in ("revert", "downweight"):
            raise ConfigError(f"on_worse must be revert or downweight, got {self.on_worse!r}")
        if not 0.0 < self.mix < 1.0:
            raise ConfigError(f"mix must be in (0, 1), got {self.mix}")
        if self.max_central_steps < 1:
            raise ConfigError(f"max_central_steps must be >= 1, got {self.max_central_steps}")
        if self.central_min_gain < 0:
            raise ConfigError(f"central_min_gain must be >= 0, got {self.central_min_gain}")
        self.central_after_aggregate = self.central
        self.adapts_central = self.central

    def after_central(self, before: float | None, after: float | None, steps: int) -> Decision:
        if before is None or after is None:
            return Decision("stop", "no held-out metric to compare")
        change = f"central step {steps} moved the held-out metric from {before:.4f} to {after:.4f}"
        if after < before - self.tolerance:
            return Decision("undo", change + ": undoing it, the federated aggregate goes on without it")
        if after - before > self.central_min_gain and steps < self.max_central_steps:
            return Decision("central", change + f": gained more than {self.central_min_gain}, another central step")
        if steps >= self.max_central_steps:
            return Decision("stop", change + f": {steps} of at most {self.max_central_steps} central steps done")
        return Decision("stop", change + f": gained no more than {self.central_min_gain}, back to federated rounds")

    def decide(self, previous: float | None, candidate: float | None) -> Decision:
        if previous is None or candidate is None:
            return Decision("publish", "no held-out metric to compare")
        if candidate >= previous - self.tolerance:
            return Decision("publish", f"held-out metric {candidate:.4f} vs {previous:.4f}: not worse")
        why = f"held-out metric fell from {previous:.4f} to {candidate:.4f} (tolerance {self.tolerance})"
        if self.on_worse == "revert":
            return Decision("revert", why + ": keeping the previous version for the next federated round")
        return Decision("downweight", why + f": keeping {self.mix:.0%} of the step", mix=self.mix)


POLICIES = ("fixed", "central-then-federated", "federated-only", "adaptive")


def make_policy(name: str, **kwargs: object) -> SwitchingPolicy:
    """``fixed`` (federated then central), ``central-then-federated``, ``federated-only`` or ``adaptive``."""
    try:
        if name == "fixed":
            return FixedSchedule(**kwargs)  # type: ignore[arg-type]
        if name in ("federated-only", "central-then-federated", "federated-then-central"):
            return FixedSchedule(order=name)
        if name == "adaptive":
            return AdaptivePolicy(**kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"policy {name!r}: {exc}") from exc
    raise ConfigError(f"unknown switching policy {name!r}; use {', '.join(POLICIES)}")
