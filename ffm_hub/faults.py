"""Fault injection for crash tests: ``FFM_CRASH_AT=point[:n]`` kills the hub with SIGKILL at the n-th
time it passes ``point`` (default the first). Unset in production, where each check is one dict lookup.

Points: ``accepted`` (update durable, receipt not yet sent), ``receipted`` (receipt sent),
``aggregating`` (deltas averaged, new version not yet written), ``committing`` (version file written,
its database row not yet committed).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["CRASH_POINTS", "crash_point"]

CRASH_POINTS = ("accepted", "receipted", "aggregating", "committing")

_hits: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``FFM_CRASH_AT`` names this point."""
    spec = os.environ.get("FFM_CRASH_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
