"""What a reliability scenario is and what it reports.

A :class:`Scenario` is a function of a :class:`Context` (which broker, a scratch folder, a seed) that
returns :class:`Outcome` rows. Counts are what the hub actually did — updates in its store and in its
versions, its rejection counters — never what a client believes it sent (a PUBACK says nothing about
whether the hub took an update).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffm_hub.brokers import ManagedBroker, start_managed_broker
from ffm_hub.security import BrokerSecurity

__all__ = ["BROKERS", "Context", "Outcome", "Scenario", "Timer"]

#: The real brokers every scenario runs against unless it says otherwise.
BROKERS = ("mosquitto", "amqtt")


@dataclass
class Outcome:
    """One row of the figures table: what one case of a scenario tried and what the hub made of it.

    ``accepted`` counts updates the hub durably accepted (and receipted); ``lost`` counts accepted updates
    that never reached a version or the queue; ``duplicates`` counts updates aggregated more than once.
    ``passed`` defaults to "accepted as expected, nothing lost, nothing doubled"; a scenario whose
    criterion is a metric (the attack runs) sets it itself and says the bound in ``detail``.
    """

    scenario: str
    case: str
    broker: str
    tried: int
    accepted: int
    expected_accepted: int
    lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    passed: bool | None = None

    def __post_init__(self) -> None:
        if self.passed is None:
            self.passed = self.accepted == self.expected_accepted and self.lost == 0 and self.duplicates == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """Where a scenario runs: ``broker`` is ``"mosquitto"`` or ``"amqtt"``; ``workdir`` is its own
    scratch folder; ``say`` reports progress (a line per step a person would wait on)."""

    broker: str
    workdir: Path
    seed: int = 0
    say: Callable[[str], None] = lambda _line: None

    def start_broker(self, security: BrokerSecurity | None = None, workdir: Path | None = None) -> ManagedBroker:
        """A fresh broker of this context's kind on a free port (the caller stops it)."""
        folder = workdir or self.workdir / f"broker-{time.monotonic_ns()}"
        folder.mkdir(parents=True, exist_ok=True)
        return start_managed_broker(self.broker, workdir=folder, security=security)

    @contextmanager
    def broker_running(self, security: BrokerSecurity | None = None) -> Iterator[ManagedBroker]:
        broker = self.start_broker(security)
        try:
            yield broker
        finally:
            broker.stop()


@dataclass(frozen=True)
class Scenario:
    """A named scenario: ``run(ctx)`` returns its outcome rows for ``ctx.broker``."""

    name: str
    title: str
    run: Callable[[Context], list[Outcome]]
    brokers: tuple[str, ...] = BROKERS


class Timer:
    """``with Timer() as t: ...; t.seconds``: wall time of a case, for the table."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
