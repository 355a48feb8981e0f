"""Switching between federated and central optimization: what the hub does with a new aggregate.

The paper's FFM hub alternates FedAvg over private updates with optimization on its own public data
(sections 4.1 and 5.1). After each aggregation the hub may run a central step, evaluates the candidate
on held-out public data, and a policy decides: publish it, revert to the previous version, or publish
only part of the step. Policies are pure: they see numbers, never models, so they are tested on
constructed metric sequences.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ffm_edge.errors import ConfigError

__all__ = ["ACTIONS", "AdaptivePolicy", "Decision", "FixedSchedule", "SwitchingPolicy", "make_policy"]

ACTIONS = ("publish", "revert", "downweight")


@dataclass(frozen=True)
class Decision:
    """What to do with a candidate version, and why (logged and stored with the version)."""

    action: str
    reason: str
    mix: float = 1.0  # downweight: the share of the step kept (previous + mix * (candidate - previous))

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown action {self.action!r}")
        if not 0.0 <= self.mix <= 1.0:
            raise ConfigError(f"mix must be in [0, 1], got {self.mix}")


class SwitchingPolicy(ABC):
    """Decides, from held-out metrics, what becomes the next global version."""

    #: Run the central step on public data after each aggregation (before evaluating the candidate).
    central_after_aggregate: bool = True

    @abstractmethod
    def decide(self, previous: float | None, candidate: float | None) -> Decision:
        """``previous``: the metric of the current version; ``candidate``: of the new aggregate."""


@dataclass
class FixedSchedule(SwitchingPolicy):
    """Always publish. ``order`` says whether the central step follows aggregation (the paper's FFM)."""

    order: str = field(default="federated-then-central", metadata={"help": "or federated-only"})

    def __post_init__(self) -> None:
        if self.order not in ("federated-then-central", "federated-only"):
            raise ConfigError(f"order must be federated-then-central or federated-only, got {self.order!r}")
        self.central_after_aggregate = self.order == "federated-then-central"

    def decide(self, previous: float | None, candidate: float | None) -> Decision:
        return Decision("publish", f"fixed schedule ({self.order})")


@dataclass
class AdaptivePolicy(SwitchingPolicy):
    """Publish what does not make the held-out metric worse; revert or down-weight what does.

    A candidate more than ``tolerance`` below the current version is reverted when ``on_worse`` is
    "revert", or published at ``mix`` of its step when "downweight".
    """

    tolerance: float = field(default=0.0, metadata={"help": "a drop this small still publishes"})
    on_worse: str = field(default="revert", metadata={"help": "revert or downweight"})
    mix: float = field(default=0.5, metadata={"help": "share of a worse step kept when down-weighting"})
    central: bool = field(default=True, metadata={"help": "run the central step after each aggregation"})

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.on_worse not in ("revert", "downweight"):
            raise ConfigError(f"on_worse must be revert or downweight, got {self.on_worse!r}")
        if not 0.0 < self.mix < 1.0:
            raise ConfigError(f"mix must be in (0, 1), got {self.mix}")
        self.central_after_aggregate = self.central

    def decide(self, previous: float | None, candidate: float | None) -> Decision:
        if previous is None or candidate is None:
            return Decision("publish", "no held-out metric to compare")
        if candidate >= previous - self.tolerance:
            return Decision("publish", f"held-out metric {candidate:.4f} vs {previous:.4f}: not worse")
        why = f"held-out metric fell from {previous:.4f} to {candidate:.4f} (tolerance {self.tolerance})"
        if self.on_worse == "revert":
            return Decision("revert", why + ": keeping the previous version")
        return Decision("downweight", why + f": keeping {self.mix:.0%} of the step", mix=self.mix)


def make_policy(name: str, **kwargs: object) -> SwitchingPolicy:
    """``fixed`` (federated then central), ``federated-only`` or ``adaptive``."""
    try:
        if name == "fixed":
            return FixedSchedule(**kwargs)  # type: ignore[arg-type]
        if name == "federated-only":
            return FixedSchedule(order="federated-only")
        if name == "adaptive":
            return AdaptivePolicy(**kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"policy {name!r}: {exc}") from exc
    raise ConfigError(f"unknown switching policy {name!r}; use fixed, federated-only or adaptive")
