"""A live status snapshot of a running hub, written to ``<state_dir>/status.json`` for ``ffm-hub status``.

The hub's counters, its devices and its round bytes live only in the hub's memory, so another process
(an operator's ``ffm-hub status``, a script, a health check) cannot see them in the store. A
:class:`StatusWriter` thread therefore writes them to a small JSON file every few seconds, atomically,
and once more with ``"running": false`` on a clean stop. A reader tells a live hub from a dead one by
the snapshot's age and its ``pid``: a hub killed with ``kill -9`` never writes its last snapshot.

The hub is read the way :mod:`ffm_hub.metrics` reads it from its scrape thread: its dicts and sets are
copied in one step each (atomic under the GIL) and the durable facts (queue, newest version) come from
the store, which is thread-safe.

:func:`read_store` reads the store's versions and update counts through a *read-only* SQLite connection:
opening a :class:`~ffm_hub.store.SqliteStore` runs its crash recovery, which deletes the frame files
it finds without a committed row, and a running hub writes each frame just before its row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffm_edge.errors import FFMError
from ffm_edge.fsutil import write_durably
from ffm_hub.store import VersionRecord

if TYPE_CHECKING:
    from ffm_hub.hub import Hub

__all__ = [
    "DEFAULT_INTERVAL",
    "STATUS_FILE",
    "Liveness",
    "StatusWriter",
    "StoreSummary",
    "format_status",
    "hub_snapshot",
    "is_live",
    "liveness",
    "pid_alive",
    "read_status",
    "read_store",
]

log = logging.getLogger("ffm.hub.status")

STATUS_FILE = "status.json"
DEFAULT_INTERVAL = 5.0
SNAPSHOT_FORMAT = 1
# A snapshot older than this many intervals (and at least _MIN_STALE_S) is stale: the writer is dead
# or stuck. A few intervals, not one, so a slow disk or a long store lock does not flap the state.
_STALE_INTERVALS = 3
_MIN_STALE_S = 10.0


def _finite(value: Any) -> Any:
    """``value`` with NaN/Inf floats as None, recursively: strict JSON has no NaN, and jq rejects it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def hub_snapshot(hub: Hub, *, started_at: float | None = None, now: float | None = None) -> dict[str, Any]:
    """What ``hub`` is doing right now, as a JSON-serializable dict (see the README for the fields).

    ``started_at`` is when the hub started serving (None: unknown). A store that cannot be read (a
    closed or failing one) leaves ``version`` and ``queue_length`` None and says why in
    ``store_error`` rather than failing: the in-memory part is still worth writing.
    """
    now = time.time() if now is None else now
    settings = hub.settings
    counters = dict(hub.counters)
    rejections = dict(hub.rejections)
    devices = dict(hub.devices)
    online = set(hub.online)
    snapshot: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "running": True,
        "federation": settings.federation,
        "hub_id": settings.hub_id,
        "model": settings.model,
        "strategy": settings.strategy,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": started_at,
        "written_at": now,
        "uptime_s": None if started_at is None else max(0.0, now - started_at),
        "tau": settings.tau,
        "device_timeout_s": settings.device_timeout,
        "version": None,
        "queue_length": None,
        "counters": counters,
        "rejections": rejections,
        "devices_known": len(devices),
        "devices_online": len(online),
        "devices": [
            {
                "device": device,
                "online": device in online,
                "last_seen": last_seen,
                "seconds_since": max(0.0, now - last_seen),
            }
            for device, last_seen in sorted(devices.items())
        ],
    }
    # Bytes of the round in progress (reset at each version, whose metrics hold its totals).
    for direction in ("in", "out"):
        value = getattr(hub, f"_bytes_{direction}", None)
        if isinstance(value, int):
            snapshot[f"round_bytes_{direction}"] = value
    privacy = getattr(hub, "privacy", None)
    if isinstance(privacy, Mapping):
        snapshot["privacy"] = dict(privacy)
    try:
        snapshot["queue_length"] = len(hub.store.queued())
        latest = hub.store.latest_version()
    except Exception as exc:  # a closed or failing store must not stop the snapshot
        snapshot["store_error"] = str(exc) or type(exc).__name__
        return _finite(snapshot)
    if latest is not None:
        snapshot["version"] = {
            "version": latest.version,
            "parent": latest.parent,
            "kind": latest.kind,
            "num_updates": latest.num_updates,
            "created_at": latest.created_at,
            "metrics": dict(latest.metrics),
        }
    return _finite(snapshot)


class StatusWriter:
    """Writes :func:`hub_snapshot` to ``<state_dir>/status.json`` every ``interval`` seconds.

    :meth:`start` writes the first snapshot before it returns (so the file exists as soon as the hub
    serves); :meth:`stop` writes a last one with ``"running": false`` so a reader can tell a clean stop
    from a crash. Writes are atomic (temporary file, fsync, rename): a reader never sees half a file.
    """

    def __init__(
        self, hub: Hub, state_dir: str | Path, interval: float = DEFAULT_INTERVAL, *, started_at: float | None = None
    ) -> None:
        if not interval > 0:
            raise ValueError(f"status interval must be > 0, got {interval}")
        self.hub = hub
        self.path = Path(state_dir) / STATUS_FILE
        self.interval = float(interval)
        self.started_at = time.time() if started_at is None else started_at
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False

    def write(self, *, running: bool = True) -> dict[str, Any] | None:
        """Write one snapshot now and return it; None (and a log line) when it could not be written."""
        with self._lock:
            try:
                snapshot = hub_snapshot(self.hub, started_at=self.started_at)
                snapshot["running"] = running
                snapshot["interval"] = self.interval
                data = json.dumps(snapshot, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_durably(self.path, data)
            except Exception as exc:  # a full disk must not take the hub down; say so once, not every 5 s
                (log.debug if self._failing else log.warning)("cannot write %s: %s", self.path, exc)
                self._failing = True
                return None
            if self._failing:
                log.info("writing %s again", self.path)
                self._failing = False
            return snapshot

    def start(self) -> StatusWriter:
        """Write a first snapshot, then keep writing from a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self.write()
        self._thread = threading.Thread(target=self._run, name="ffm-hub-status", daemon=True)
        self._thread.start()
        log.debug("status snapshot every %.3g s in %s", self.interval, self.path)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def stop(self) -> None:
        """Stop the thread and write a final ``"running": false`` snapshot (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=10)
        self.write(running=False)

    def __enter__(self) -> StatusWriter:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def read_status(state_dir: str | Path) -> dict[str, Any] | None:
    """The hub's last snapshot from ``<state_dir>/status.json``; None when absent or unreadable."""
    path = Path(state_dir) / STATUS_FILE
    try:
        snapshot = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    if not isinstance(snapshot, dict):
        log.warning("cannot read %s: not a JSON object", path)
        return None
    return snapshot


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Liveness:
    """Whether a snapshot describes a running hub: ``state`` is running, stopped or stale, ``reason`` why."""

    state: str
    reason: str
    age_s: float

    @property
    def running(self) -> bool:
        return self.state == "running"


def liveness(snapshot: Mapping[str, Any], now: float | None = None) -> Liveness:
    """Judge a snapshot: ``stopped`` (the hub said so), ``stale`` (it died or hangs) or ``running``.

    A hub that crashes leaves ``"running": true`` behind, so a snapshot is only believed while its
    process exists (checked when it was written on this host) and it is fresh: written within a few
    of its own intervals.
    """
    now = time.time() if now is None else now
    age = max(0.0, now - float(snapshot.get("written_at") or 0.0))
    if not snapshot.get("running", False):
        return Liveness("stopped", "the hub stopped cleanly", age)
    pid = snapshot.get("pid")
    same_host = snapshot.get("host") in (None, socket.gethostname())
    if same_host and isinstance(pid, int) and not pid_alive(pid):
        return Liveness("stale", f"process {pid} is gone (crashed or killed?)", age)
    interval = float(snapshot.get("interval") or DEFAULT_INTERVAL)
    stale_after = max(_STALE_INTERVALS * interval, _MIN_STALE_S)
    if age > stale_after:
        why = "hung?" if same_host else f"on host {snapshot.get('host')}"
        return Liveness("stale", f"not updated for {_duration(age)} ({why})", age)
    return Liveness("running", f"pid {pid} on {snapshot.get('host') or 'this host'}", age)


def is_live(snapshot: Mapping[str, Any] | None, now: float | None = None) -> bool:
    """Whether ``snapshot`` (from :func:`read_status`) comes from a hub that is running now."""
    return snapshot is not None and liveness(snapshot, now).running


@dataclass(frozen=True)
class StoreSummary:
    """The durable part of ``ffm-hub status``: update counts per status and every version kept."""

    path: Path
    updates: dict[str, int]
    versions: list[VersionRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "updates": dict(self.updates),
            "versions": [_finite(dataclasses.asdict(v)) for v in self.versions],
        }


def read_store(state_dir: str | Path) -> StoreSummary | None:
    """Versions and update counts of the hub store under ``state_dir``, read-only; None when there is none.

    Safe while the hub runs: unlike opening a :class:`~ffm_hub.store.SqliteStore`, it writes nothing
    and removes no file. Raises :class:`FFMError` for a store that exists but cannot be read.
    """
    root = Path(state_dir) / "store"
    db = root / "hub.sqlite"
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall()
            updates = {str(status): int(n) for status, n in rows}
            version_rows = conn.execute(
                "SELECT version, parent, sha256, size, created_at, num_updates, kind, metrics"
                " FROM versions ORDER BY version"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise FFMError(f"cannot read the hub store {db}: {exc}") from exc
    versions = [
        VersionRecord(
            version=version,
            parent=parent,
            sha256=sha256,
            size=size,
            created_at=created_at,
            num_updates=num_updates,
            kind=kind,
            metrics=json.loads(metrics),
        )
        for version, parent, sha256, size, created_at, num_updates, kind, metrics in version_rows
    ]
    return StoreSummary(root, updates, versions)


# -- text for `ffm-hub status` ---------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _metrics_text(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in sorted(metrics.items()))


def format_status(snapshot: Mapping[str, Any] | None, now: float | None = None, *, where: str = "") -> str:
    """The live section of ``ffm-hub status``: running or not, queue, counters, version, devices."""
    if snapshot is None:
        return (
            f"hub: no status snapshot{f' in {where}' if where else ''} "
            "(the hub is not running, has not started yet, or predates status snapshots)"
        )
    now = time.time() if now is None else now
    live = liveness(snapshot, now)
    heading = {
        "running": "running",
        "stopped": "stopped (last snapshot, written at shutdown)",
        "stale": "NOT running (last snapshot is stale)",
    }[live.state]
    lines = [f"hub: {heading}: {live.reason}; status updated {_duration(live.age_s)} ago"]
    uptime = snapshot.get("uptime_s")
    lines.append(
        f"federation {snapshot.get('federation')}, hub {snapshot.get('hub_id')}, model {snapshot.get('model')}, "
        f"strategy {snapshot.get('strategy')}" + (f", up {_duration(float(uptime))}" if uptime is not None else "")
    )
    version = snapshot.get("version")
    if isinstance(version, Mapping):
        metrics = _metrics_text(version.get("metrics") or {})
        lines.append(
            f"version {version.get('version')} ({version.get('kind')}, {version.get('num_updates')} updates)"
            + (f": {metrics}" if metrics else "")
        )
    privacy = snapshot.get("privacy")
    if isinstance(privacy, Mapping):
        lines.append(_privacy_text(privacy))
    queue = snapshot.get("queue_length")
    lines.append(f"queue: {'?' if queue is None else queue}/{snapshot.get('tau')} (aggregates at tau)")
    if snapshot.get("store_error"):
        lines.append(f"store: unreadable by the hub: {snapshot['store_error']}")
    counters = snapshot.get("counters") or {}
    rejections = snapshot.get("rejections") or {}
    by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(rejections.items()))
    lines.append(
        f"since start: {counters.get('accepted', 0)} accepted, {counters.get('duplicates', 0)} duplicates, "
        f"{counters.get('rejected', 0)} rejected{f' ({by_reason})' if by_reason else ''}, "
        f"{counters.get('versions', 0)} versions"
    )
    if "round_bytes_in" in snapshot or "round_bytes_out" in snapshot:
        lines.append(
            f"this round: {snapshot.get('round_bytes_in', 0)} B in, {snapshot.get('round_bytes_out', 0)} B out"
        )
    devices = snapshot.get("devices") or []
    online = sum(1 for d in devices if d.get("online"))
    lines.append(f"devices: {len(devices)} known, {online} online" + ("" if live.running else " (when written)"))
    if devices:
        written_at = float(snapshot.get("written_at") or now)
        lines.append("| device | online | last seen |\n|---|---|---:|")
        for device in devices:
            # Seen relative to now, not to the snapshot: an old snapshot must not look recent.
            seen = max(0.0, now - float(device.get("last_seen") or written_at))
            lines.append(
                f"| {device.get('device')} | {'yes' if device.get('online') else 'no'} | {_duration(seen)} ago |"
            )
    return "\n".join(lines)


def _privacy_text(privacy: Mapping[str, Any]) -> str:
    """One line on what dp_fedavg has spent: ε at δ, against the budget, and whether it is used up."""
    epsilon, budget = privacy.get("epsilon"), privacy.get("max_epsilon")
    spent = "no privacy (a round ran with z = 0)" if epsilon is None else f"ε = {float(epsilon):.4g}"
    line = f"privacy (dp_fedavg): {spent} at δ = {float(privacy.get('delta') or 0):g}"
    line += f" of a budget of {float(budget):g}" if budget is not None else " (no budget set)"
    if privacy.get("spent"):
        line += f"; BUDGET SPENT, updates are refused: {privacy['spent']}"
    return line
