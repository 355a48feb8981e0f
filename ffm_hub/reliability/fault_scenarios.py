"""Fault injection on real brokers (issue 7, "Fault tolerance on real brokers").

Four scenarios break a real hub's surroundings and count, from the hub's durable store, what became of
every update a device tried:

* ``resets``: 20 devices x 10 rounds through a :class:`~ffm_hub.reliability.proxy.ChaosProxy` that resets
  connections at random in the middle of chunked uploads;
* ``broker_restart``: the broker restarts while the hub holds part of a 4 MiB upload;
* ``edge_kill``: an edge process dies like ``kill -9`` with its update in its outbox, and the restarted
  process sends it;
* ``hub_kill``: the hub process dies like ``kill -9`` at four points, three trials each.

The devices are the real :class:`~ffm_edge.client.EdgeClient` (see
:class:`~ffm_hub.reliability.crash_runner.ArrayEdgeClient`) or, for ``hub_kill``, a device that resends
whatever has no receipt; the hub is the real :class:`~ffm_hub.hub.Hub` on an SQLite store.
:func:`audit_store` turns the store into the figures: accepted, lost, counted twice, and whether every
version is its parent plus the n_k-weighted mean of exactly the updates it consumed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import numpy as np

from ffm_edge.client import EdgeClient, ProgressEvent, RoundResult
from ffm_edge.errors import DecodeError, TransportError
from ffm_edge.outbox import Outbox
from ffm_edge.transport import MqttTransport
from ffm_edge.wire import (
    Manifest,
    Receipt,
    Topics,
    UpdateMeta,
    decode_global,
    decode_message,
    decode_update,
    encode_update,
    split_frame,
)
from ffm_hub.aggregate import staleness_weight
from ffm_hub.brokers import ManagedBroker
from ffm_hub.faults import CRASH_POINTS
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.reliability.crash_runner import (
    UPLOAD_STATE,
    ArrayEdgeClient,
    crash_hub_settings,
    edge_command,
    start_hub_process,
)
from ffm_hub.reliability.outcome import Context, Outcome, Scenario, Timer
from ffm_hub.reliability.proxy import ChaosProxy
from ffm_hub.store import HubStore, QueuedUpdate, SqliteStore, VersionRecord

__all__ = [
    "SCENARIOS",
    "HubCrashRun",
    "LocalHub",
    "StoreAudit",
    "audit_store",
    "run_broker_restart",
    "run_edge_kill",
    "run_hub_crash",
    "run_hub_kill",
    "run_resets",
]

log = logging.getLogger("ffm.reliability.faults")

_T = TypeVar("_T")


# -- counting what the hub did ----------------------------------------------------------------------
@dataclass(frozen=True)
class StoreAudit:
    """What a hub's store says became of the updates devices tried.

    ``accepted``: tried updates the store holds. ``lost``: updates a device holds a receipt for that the
    store does not hold, whose frame is gone, or that it says were aggregated into a version it does not
    have (an accepted update still queued is not lost). ``duplicates``:
    updates a version counted beyond the ones it consumed, plus versions that are not their parent plus
    the weighted mean of exactly what they consumed (an update counted twice shows up as one of those).
    ``stale``: aggregated updates built on an older version than their version's parent (a figure, not
    a fault: a resent update may be). ``problems`` says what else is wrong (a corrupt checkpoint, a gap
    in the versions, strangers).
    """

    accepted: int
    queued: int
    lost: int
    duplicates: int
    latest_version: int
    stale: int = 0
    problems: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and not self.problems


def audit_store(
    store: HubStore, tried: Collection[str], receipted: Collection[str], settings: HubSettings
) -> StoreAudit:
    """Check a FedAvg hub's store against the updates devices tried and the receipts they hold.

    Every version must be whole (its frame has the sha256 and size of its row and decodes as that
    version), the versions must run 0, 1, 2, ... each the child of the one before, and each aggregated
    version must equal its parent plus ``server_lr`` times the mean of the updates it consumed, weighted by
    n_k and the staleness weight — recomputed here in float64 from the stored frames.
    """
    if settings.server_optimizer != "fedavg" or settings.aggregator != "fedavg":
        raise ValueError("audit_store recomputes plain FedAvg versions only")
    records = {update_id: store.get_update(update_id) for update_id in set(tried) | set(receipted)}
    held = {update_id: record for update_id, record in records.items() if record is not None}
    problems: list[str] = []
    strangers = sum(store.counts().values()) - len(held)
    if strangers:
        problems.append(f"{strangers} update(s) in the store that no device tried")
    versions = {record.version: record for record in store.versions()}
    states, checkpoint_problems = _load_checkpoints(store, versions)
    problems += checkpoint_problems
    lost = sum(1 for update_id in receipted if update_id not in held)
    consumed: dict[int, list[QueuedUpdate]] = {}
    unreadable = {update_id for update_id in held if not _frame_readable(store, update_id)}
    lost += len(unreadable)
    problems += [f"update {update_id} has a row but no readable frame" for update_id in sorted(unreadable)]
    for update in held.values():
        if update.status == "aggregated":
            if update.aggregated_into not in versions:
                lost += 1
                problems.append(f"update {update.update_id} was aggregated into a missing version")
            else:
                consumed.setdefault(update.aggregated_into, []).append(update)
    duplicates = stale = 0
    for number, version in versions.items():
        if version.parent is None:
            continue
        mine = consumed.get(number, [])
        stale += sum(1 for update in mine if update.base_version != version.parent)
        if version.num_updates != len(mine):
            duplicates += max(0, version.num_updates - len(mine))
            problems.append(f"version {number} says {version.num_updates} updates but consumed {len(mine)}")
        if number in states and version.parent in states and mine and not unreadable & {u.update_id for u in mine}:
            expected = _fedavg_version(store, states[version.parent], version.parent, mine, settings)
            if not _same_state(states[number], expected):
                duplicates += 1
                problems.append(f"version {number} is not its parent plus the mean of the updates it consumed")
    return StoreAudit(
        accepted=sum(1 for update_id in tried if update_id in held),
        queued=sum(1 for update in held.values() if update.status == "queued"),
        lost=lost,
        duplicates=duplicates,
        latest_version=max(versions, default=-1),
        stale=stale,
        problems=tuple(problems),
    )


def _frame_readable(store: HubStore, update_id: str) -> bool:
    try:
        decode_update(store.load_update(update_id))
    except (KeyError, DecodeError):
        return False
    return True


def _load_checkpoints(
    store: HubStore, versions: Mapping[int, VersionRecord]
) -> tuple[dict[int, dict[str, np.ndarray]], list[str]]:
    """Every stored version's state, and what is wrong with the checkpoints (corrupt, gaps, backwards)."""
    states: dict[int, dict[str, np.ndarray]] = {}
    problems: list[str] = []
    numbers = sorted(versions)
    if numbers != list(range(len(numbers))):
        problems.append(f"versions are not 0..{len(numbers) - 1} without gaps: {numbers}")
    for number in numbers:
        record = versions[number]
        if record.parent != (None if number == 0 else number - 1):
            problems.append(f"version {number} has parent {record.parent}")
        try:
            frame = store.load_version(number)
            meta, state = decode_global(frame)
        except (KeyError, DecodeError) as exc:
            problems.append(f"checkpoint of version {number} is unreadable: {exc!r}")
            continue
        if hashlib.sha256(frame).hexdigest() != record.sha256 or len(frame) != record.size or meta.version != number:
            problems.append(f"checkpoint of version {number} does not match its row")
            continue
        states[number] = state
    return states, problems


def _fedavg_version(
    store: HubStore,
    parent_state: Mapping[str, np.ndarray],
    parent: int,
    updates: list[QueuedUpdate],
    settings: HubSettings,
) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for update in updates:
        _meta, tensors = decode_update(store.load_update(update.update_id))
        weight = update.num_samples * staleness_weight(
            parent - update.base_version, kind=settings.staleness, alpha=settings.staleness_alpha
        )
        for name, value in tensors.items():
            sums[name] = sums.get(name, 0.0) + weight * value.astype(np.float64)
            weights[name] = weights.get(name, 0.0) + weight
    return {
        name: value + (settings.server_lr * sums[name] / weights[name] if name in sums else 0.0)
        for name, value in parent_state.items()
    }


def _same_state(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> bool:
    return set(actual) == set(expected) and all(
        np.allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6) for name in actual
    )


def _outcome(
    scenario: str,
    case: str,
    broker: str,
    *,
    tried: int,
    expected: int,
    audit: StoreAudit,
    seconds: float,
    detail: str,
    metrics: Mapping[str, float],
    failures: Collection[str] = (),
    extra_ok: bool = True,
) -> Outcome:
    """One row from an audit: passed when every update was accepted, nothing was lost or counted twice,
    the store is sound, nothing failed on the way and the scenario's own condition (``extra_ok``) holds."""
    notes = [detail, *audit.problems, *failures]
    passed = audit.accepted == expected and audit.clean and not failures and extra_ok
    return Outcome(
        scenario,
        case,
        broker,
        tried=tried,
        accepted=audit.accepted,
        expected_accepted=expected,
        lost=audit.lost,
        duplicates=audit.duplicates,
        seconds=round(seconds, 2),
        detail="; ".join(n for n in notes if n)[:1000],
        metrics=dict(metrics),
        passed=passed,
    )


# -- a hub in this process --------------------------------------------------------------------------
class LocalHub:
    """A real :class:`Hub` in this process on a real broker and an SQLite store in ``store_dir``.

    :meth:`stop` then :meth:`start` is a clean hub restart: it resumes from its store.
    """

    def __init__(
        self,
        broker: ManagedBroker,
        settings: HubSettings,
        store_dir: Path,
        initial_state: Mapping[str, np.ndarray],
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.store_dir = store_dir
        self._initial_state = dict(initial_state)
        self._parts: tuple[Hub, MqttTransport, SqliteStore] | None = None
        self._starts = 0

    @property
    def running(self) -> bool:
        return self._parts is not None

    @property
    def hub(self) -> Hub:
        if self._parts is None:
            raise RuntimeError("the hub is not running")
        return self._parts[0]

    def start(self) -> Hub:
        self._starts += 1
        transport = _transport(self.broker.host, self.broker.port, f"{self.settings.federation}-hub-{self._starts}")
        transport.connect(timeout=30)
        store = SqliteStore(self.store_dir)
        hub = Hub(self.settings, transport, store, initial_state=self._fresh_initial_state)
        hub.start()
        self._parts = (hub, transport, store)
        return hub

    def _fresh_initial_state(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._initial_state.items()}  # never the caller's arrays

    def stop(self) -> None:
        parts, self._parts = self._parts, None
        if parts is not None:
            hub, transport, store = parts
            hub.stop()
            transport.close()
            store.close()

    def audit(self, tried: Collection[str], receipted: Collection[str]) -> StoreAudit:
        """:func:`audit_store` on a fresh handle of the store (the hub may be running or not)."""
        with contextlib.closing(SqliteStore(self.store_dir)) as store:
            return audit_store(store, tried, receipted, self.settings)

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _transport(host: str, port: int, client_id: str) -> MqttTransport:
    """An MQTT connection that reconnects within a second or two (the default backs off to 30 s)."""
    return MqttTransport(host, port, client_id=client_id, reconnect_min_delay=0.1, reconnect_max_delay=2.0)


def _until_done(action: Callable[[], _T], deadline: float, what: str) -> _T:
    """Retry ``action`` on TransportError (a reset cost it its answer) until ``deadline``."""
    while True:
        try:
            return action()
        except TransportError as exc:
            if time.monotonic() >= deadline:
                raise TransportError(f"{what} still failing at the deadline: {exc}") from exc
            log.info("%s failed (%s); trying again", what, exc)


@dataclass
class _Ledger:
    """What the devices tried and what they hold receipts for (appended to from device threads)."""

    tried: list[str] = field(default_factory=list)
    receipted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# -- resets ----------------------------------------------------------------------------------------
def run_resets(
    ctx: Context, *, clients: int = 20, rounds: int = 10, reset_probability: float = 0.05, timeout: float = 600.0
) -> list[Outcome]:
    """``clients`` devices run ``rounds`` rounds through a chaos proxy that resets a connection with
    ``reset_probability`` per chunk of upload bytes; the hub (tau = ``clients``) is on the broker directly.

    Each round every device waits for the newest version, pulls it, builds its update on it and uploads
    it in 1 KiB chunks (nine MQTT messages), resending until the hub's receipt: the real EdgeClient path.
    Passes when all ``clients * rounds`` updates were accepted once, ``rounds`` versions were made, each
    the weighted mean of exactly its ``clients`` updates, and the proxy really reset connections.
    """
    settings = HubSettings(federation="resets", tau=clients, chunk_size=4096)
    ledger = _Ledger()
    with Timer() as timer, ctx.broker_running() as broker, contextlib.ExitStack() as stack:
        local = stack.enter_context(LocalHub(broker, settings, ctx.workdir / "hub", UPLOAD_STATE))
        proxy = stack.enter_context(
            ChaosProxy(
                broker.host, broker.port, reset_probability=reset_probability, min_reset_bytes=1024, seed=ctx.seed
            )
        )
        ctx.say(f"resets: {clients} devices x {rounds} rounds through the chaos proxy on {broker.kind}")
        devices = [_resets_device(ctx, proxy, settings.federation, index, stack) for index in range(clients)]
        deadline = time.monotonic() + timeout
        threads = [
            threading.Thread(target=_device_rounds, args=(client, rounds, deadline, ledger), name=client.device_id)
            for client in devices
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if stuck:
            ledger.failures.append(f"devices still running at the deadline: {stuck}")
            for client in devices:
                client.stop()
        reached = local.hub.wait_for_version(rounds, timeout=60)
        counters = dict(local.hub.counters)
        resets, connections = proxy.resets, proxy.connections
    audit = local.audit(ledger.tried, ledger.receipted)
    return [
        _outcome(
            "resets",
            f"{clients} clients x {rounds} rounds, random resets",
            ctx.broker,
            tried=len(ledger.tried),
            expected=clients * rounds,
            audit=audit,
            seconds=timer.seconds,
            detail=f"{resets} connections reset mid-traffic, {audit.latest_version} versions"
            + ("" if reached else f", version {rounds} never came"),
            metrics={
                "resets": float(resets),
                "connections": float(connections),
                "versions": float(audit.latest_version),
                "receipts_resent": float(counters["duplicates"]),
                "rejected": float(counters["rejected"]),
                "stale": float(audit.stale),
            },
            failures=ledger.failures,
            extra_ok=resets > 0 and reached and audit.latest_version == rounds and audit.stale == 0,
        )
    ]


def _resets_device(
    ctx: Context, proxy: ChaosProxy, federation: str, index: int, stack: contextlib.ExitStack
) -> ArrayEdgeClient:
    device = f"dev{index:02d}"
    transport = stack.enter_context(contextlib.closing(_transport(proxy.host, proxy.port, f"resets-{device}")))
    return ArrayEdgeClient(
        UPLOAD_STATE,
        device_id=device,
        num_samples=1 + index % 7,  # unequal n_k: the audit checks the weighting
        federation=federation,
        transport=transport,
        state_dir=ctx.workdir / device,
        seed=1000 * index + ctx.seed,
        chunk_size=1024,
        receipt_timeout=5.0,
        pull_timeout=5.0,
        version_timeout=120.0,
    )


def _device_rounds(client: EdgeClient, rounds: int, deadline: float, ledger: _Ledger) -> None:
    """``rounds`` rounds of one device, each on the newest version; a round's failures are retried."""
    try:
        with client:
            for _ in range(rounds):
                prepared = _until_done(client.prepare_update, deadline, f"{client.device_id}: prepare")
                ledger.tried.append(prepared.meta.update_id)
                send = functools.partial(client.send_update, prepared)
                result: RoundResult = _until_done(send, deadline, f"{client.device_id}: send")
                ledger.receipted.append(result.update_id)
    except Exception as exc:  # reported in the row: one device's failure must not hide the others' figures
        ledger.failures.append(f"{client.device_id}: {exc!r}"[:200])


# -- broker restart --------------------------------------------------------------------------------
def run_broker_restart(ctx: Context, *, megabytes: int = 4, chunk_size: int = 64 * 1024) -> list[Outcome]:
    """One device uploads a ``megabytes`` MiB update in ``chunk_size`` chunks; when half of them have
    reached the hub (a second subscriber counts what the broker delivered, then the hub's inbox is
    drained), the broker restarts. Passes when the upload is accepted exactly once and its version is made.

    Either the rest of the upload completes the hub's partial transfer, or (when the device reconnected
    before the hub subscribed again, so the broker dropped chunks for want of a subscriber) the missing
    receipt makes the device send the whole update again; ``upload_attempts`` says which happened.
    """
    state = {"lora_A": np.zeros((megabytes * 256, 1024), np.float32)}
    settings = HubSettings(federation="restart", tau=1)
    ledger = _Ledger()
    facts: dict[str, float] = {}
    with Timer() as timer, ctx.broker_running() as broker, contextlib.ExitStack() as stack:
        local = stack.enter_context(LocalHub(broker, settings, ctx.workdir / "hub", state))
        topics = Topics(settings.federation)
        delivered = _Counter()
        spy = stack.enter_context(contextlib.closing(_transport(broker.host, broker.port, "restart-spy")))
        spy.subscribe(topics.uplink_update("big"), lambda _topic, _payload: delivered.add())
        spy.connect(timeout=30)
        restart = _RestartMidUpload(broker, local, delivered, facts)
        device = stack.enter_context(contextlib.closing(_transport(broker.host, broker.port, "restart-big")))
        client = ArrayEdgeClient(
            state,
            device_id="big",
            federation=settings.federation,
            transport=device,
            state_dir=ctx.workdir / "big",
            chunk_size=chunk_size,
            receipt_timeout=4.0,  # the chunks sent while the hub was not yet subscribed again are lost
            pull_timeout=60.0,
            on_progress=restart,
        )
        ctx.say(f"broker_restart: a {megabytes} MiB upload on {broker.kind}, the broker restarted halfway")
        with client:
            try:
                prepared = client.prepare_update()
                ledger.tried.append(prepared.meta.update_id)
                ledger.receipted.append(client.send_update(prepared).update_id)
                announced = client.latest_manifest(60.0, newer_than=prepared.meta.base_version).version
            except Exception as exc:
                ledger.failures.append(f"the device failed: {exc!r}"[:300])
                announced = -1
        reached = local.hub.wait_for_version(1, timeout=30)
        accepted_by_hub = local.hub.counters["accepted"]
    audit = local.audit(ledger.tried, ledger.receipted)
    restarted = facts.get("restarted", 0.0) == 1.0
    return [
        _outcome(
            "broker_restart",
            f"{megabytes} MiB upload, broker restarted halfway",
            ctx.broker,
            tried=len(ledger.tried),
            expected=1,
            audit=audit,
            seconds=timer.seconds,
            detail=(
                f"restarted after {facts.get('delivered_before', 0):.0f} of {facts.get('chunks', 0):.0f} chunks "
                f"reached the hub; {restart.attempts} upload attempt(s); the device saw version {announced}"
                if restarted
                else "the broker was never restarted"
            ),
            metrics={**facts, "upload_attempts": float(restart.attempts), "hub_accepted": float(accepted_by_hub)},
            failures=ledger.failures,
            extra_ok=restarted and reached and announced == 1 and accepted_by_hub == 1,
        )
    ]


class _Counter:
    """A thread-safe count of messages seen, with a wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0

    def add(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= count, timeout)


class _RestartMidUpload:
    """The device's ``on_progress``: at the first upload's middle chunk, once that many chunks reached
    the hub and it handled them with no update accepted yet, restart the broker (once)."""

    def __init__(self, broker: ManagedBroker, local: LocalHub, delivered: _Counter, facts: dict[str, float]) -> None:
        self.broker, self.local, self.delivered, self.facts = broker, local, delivered, facts
        self.attempts = 0

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != "upload":
            return
        if event.done == 1:
            self.attempts += 1
        if self.attempts != 1 or event.done != event.total // 2 or "restarted" in self.facts:
            return
        self.delivered.wait_for(event.done, timeout=30)
        self.local.hub.wait_idle(30)
        if self.local.hub.counters["accepted"]:
            return  # the hub already has the whole update: this would not test a restart mid-upload
        self.facts.update(chunks=float(event.total), delivered_before=float(self.delivered.count))
        self.broker.restart()
        self.facts["restarted"] = 1.0


# -- edge kill -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _EdgeKillCase:
    name: str
    hub_up: bool  # whether the hub runs while the first process sends
    die_at: str  # the crash_runner edge's --die-at


EDGE_KILL_CASES = (
    _EdgeKillCase("hub down, edge killed mid-upload", hub_up=False, die_at="upload:4"),
    _EdgeKillCase("hub up, edge killed mid-upload", hub_up=True, die_at="upload:4"),
    _EdgeKillCase("hub up, edge killed awaiting its receipt", hub_up=True, die_at="wait"),
)


def run_edge_kill(ctx: Context, *, trials: int = 2) -> list[Outcome]:
    """For each case, ``trials`` times: an edge process trains an update on the current version and
    keeps it in its outbox, starts sending it (the hub stopped or running), and dies like ``kill -9``;
    then the same device restarts from its state folder. Passes when every update was accepted exactly
    once (tau = 1: each makes one version) and was still in the outbox after the kill."""
    with ctx.broker_running() as broker:
        return [_edge_kill_case(ctx, broker, case, index, trials) for index, case in enumerate(EDGE_KILL_CASES)]


def _edge_kill_case(ctx: Context, broker: ManagedBroker, case: _EdgeKillCase, index: int, trials: int) -> Outcome:
    settings = HubSettings(federation=f"edgekill{index}", tau=1)
    ledger = _Ledger()
    duplicate_receipts = 0
    ctx.say(f"edge_kill: {case.name}, {trials} trial(s) on {broker.kind}")
    with Timer() as timer, LocalHub(broker, settings, ctx.workdir / f"hub{index}", UPLOAD_STATE) as local:
        for trial in range(trials):
            device = f"edge{trial}"
            state_dir = ctx.workdir / f"case{index}-{device}"
            try:
                if not local.running:
                    local.start()
                update_id = _killed_edge(broker, local, case, device, state_dir, settings.federation)
                ledger.tried.append(update_id)
                if update_id not in {item.update_id for item in Outbox(state_dir / "outbox").pending()}:
                    ledger.failures.append(f"trial {trial}: the update was not in the outbox after the kill")
                if not local.running:
                    local.start()
                receipts = _resumed_edge(broker, device, state_dir, settings.federation)
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                ledger.failures.append(f"trial {trial}: {exc}"[:300])
                continue
            ledger.receipted += list(receipts)
            duplicate_receipts += sum(receipts.values())
        local.hub.wait_for_version(len(ledger.tried), timeout=30)
    audit = local.audit(ledger.tried, ledger.receipted)
    return _outcome(
        "edge_kill",
        case.name,
        ctx.broker,
        tried=len(ledger.tried),
        expected=trials,
        audit=audit,
        seconds=timer.seconds,
        detail=f"{trials} edge process(es) killed at {case.die_at}; {duplicate_receipts} resend(s) receipted as "
        "duplicates",
        metrics={
            "trials": float(trials),
            "duplicate_receipts": float(duplicate_receipts),
            "versions": float(audit.latest_version),
        },
        failures=ledger.failures,
        extra_ok=audit.latest_version == trials,
    )


def _killed_edge(
    broker: ManagedBroker, local: LocalHub, case: _EdgeKillCase, device: str, state_dir: Path, federation: str
) -> str:
    """Run the first edge process until it dies; returns the id of the update it had prepared."""
    command = [*edge_command("edge", broker.url, state_dir, device, federation), "--die-at", case.die_at]
    state_dir.mkdir(parents=True, exist_ok=True)
    with (
        (state_dir / "killed-edge.log").open("w") as errors,  # the process's log, for a failed trial
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True) as process,
    ):
        assert process.stdin is not None and process.stdout is not None
        try:
            line = _read_line(process, timeout=60)
            if not line.startswith("PREPARED "):
                raise RuntimeError(f"the edge process did not prepare an update (said {line!r})")
            if not case.hub_up:
                local.stop()
            process.stdin.write("send\n")
            process.stdin.flush()
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        if returncode != -9:
            raise RuntimeError(f"the edge process was not killed at {case.die_at} (exit status {returncode})")
        return line.split()[1]


def _resumed_edge(broker: ManagedBroker, device: str, state_dir: Path, federation: str) -> dict[str, int]:
    """Run the restarted edge process; returns the receipts it got (update id -> 1 if a duplicate)."""
    command = edge_command("resume", broker.url, state_dir, device, federation)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the restarted edge exited with {done.returncode}: {done.stderr[-300:]}")
    receipts = [line.split() for line in done.stdout.splitlines() if line.startswith("RECEIPT ")]
    return {update_id: int(duplicate) for _, update_id, duplicate in receipts}


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"no word from the edge process within {timeout:g} s")
    return process.stdout.readline().strip()


# -- hub kill --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubCrashRun:
    """One hub process killed at a point and restarted: what the device sent and saw."""

    frames: dict[str, bytes]
    receipted: frozenset[str]
    exit_codes: tuple[int, ...]  # of each hub process that ended by itself (-9: the fault)
    stop_code: int | None  # of the restarted hub, stopped with SIGTERM once everything was receipted
    announced: tuple[int, ...]  # every version the hub announced, in the order the device saw them
    state_dir: Path

    @property
    def restarts(self) -> int:
        return len(self.exit_codes)

    @property
    def went_backwards(self) -> bool:
        return any(later < earlier for earlier, later in zip(self.announced, self.announced[1:], strict=False))


def run_hub_crash(
    broker: ManagedBroker,
    state_dir: Path,
    point: str,
    trial: int,
    *,
    updates: int = 6,
    tau: int = 2,
    optimizer: str = "fedavg",
    timeout: float = 120.0,
) -> HubCrashRun:
    """Send ``updates`` updates to a hub process that dies like ``kill -9`` at the ``trial``-th pass of
    ``point``; restart it (without the fault) as soon as it is gone; resend whatever has no receipt, as
    the edge's outbox does; once every update is receipted, stop the hub with SIGTERM (it finishes what
    it holds, an aggregation included) so its store is final.

    How many versions the updates make depends on timing: a restarted hub aggregates its whole queue,
    which may hold more than tau updates when resent ones arrive before its first look at the queue.
    """
    federation = f"crash-{state_dir.name}"[:64]
    topics = Topics(federation)
    inbox: queue.Queue[object] = queue.Queue()
    device = _transport(broker.host, broker.port, f"crash-dev-{state_dir.name}"[:64])
    device.subscribe(topics.downlink_control("dev"), lambda _t, payload: inbox.put(decode_message(payload)))
    device.subscribe(topics.manifest(), lambda _t, payload: inbox.put(decode_message(payload)))
    device.connect(timeout=30)
    frames = {}
    for i in range(updates):
        meta = UpdateMeta(federation, "dev", f"u{i}", 0, "lora", 10 + i, "fp32", time.time())
        frames[meta.update_id] = encode_update(meta, {"lora_A": np.full((2, 3), float(i + 1), np.float32)})
    hub = start_hub_process(
        broker.url, state_dir, tau, crash_at=f"{point}:{trial}", optimizer=optimizer, federation=federation
    )
    pending, receipted, announced = dict(frames), set(), []
    exit_codes: list[int] = []
    deadline = time.monotonic() + timeout

    def take(wait: float) -> bool:
        """Handle one message from the hub; True when it was a manifest (the hub is up and subscribed)."""
        try:
            message = inbox.get(timeout=wait)
        except queue.Empty:
            return False
        if isinstance(message, Receipt):
            pending.pop(message.update_id, None)
            receipted.add(message.update_id)
        elif isinstance(message, Manifest):
            announced.append(message.version)
            return True
        return False

    def wait_until_up(process: subprocess.Popen[bytes]) -> None:
        while time.monotonic() < deadline and process.poll() is None and not take(0.1):
            pass

    def restart() -> subprocess.Popen[bytes]:
        """The hub again, without the fault, once it is subscribed (its manifest came)."""
        process = start_hub_process(broker.url, state_dir, tau, optimizer=optimizer, federation=federation)
        wait_until_up(process)
        return process

    try:
        wait_until_up(hub)
        while pending and time.monotonic() < deadline:
            for update_id, frame in list(pending.items()):
                for chunk in split_frame(frame, chunk_size=1024, transfer_id=update_id):
                    device.publish(topics.uplink_update("dev"), chunk)
            resend_at = time.monotonic() + 3.0
            while pending and time.monotonic() < min(resend_at, deadline) and hub.poll() is None:
                take(0.1)
            if hub.poll() is not None:  # it died at the crash point: restart it without the fault
                exit_codes.append(hub.returncode)
                hub = restart()
        while not exit_codes and time.monotonic() < deadline:
            # Everything is receipted but the fault has not fired: it is due in the work the hub does
            # after its last receipt (an aggregation), which the stop lets it finish.
            hub.terminate()
            if hub.wait(30) != -9:
                break
            exit_codes.append(-9)
            hub = restart()
    finally:
        if hub.poll() is None:
            hub.terminate()
        stop_code = hub.wait(30)
        while not inbox.empty():  # the manifests announced up to the stop
            take(0.0)
        device.close()
    return HubCrashRun(frames, frozenset(receipted), tuple(exit_codes), stop_code, tuple(announced), state_dir)


def run_hub_kill(ctx: Context, *, trials: int = 3, updates: int = 6, tau: int = 2) -> list[Outcome]:
    """The hub process dies like ``kill -9`` at each point of :data:`ffm_hub.faults.CRASH_POINTS` —
    after an update is durable but before its receipt (``accepted``), after the receipt (``receipted``),
    during aggregation (``aggregating``) and while the version is written (``committing``) — at its 1st,
    2nd, ... ``trials``-th pass there. One row per point: nothing receipted lost, nothing counted twice,
    no full queue left unaggregated, the versions the hub announced never went backwards, every stored
    checkpoint sound."""
    with ctx.broker_running() as broker:
        return [_hub_kill_point(ctx, broker, point, trials, updates, tau) for point in CRASH_POINTS]


def _hub_kill_point(ctx: Context, broker: ManagedBroker, point: str, trials: int, updates: int, tau: int) -> Outcome:
    ctx.say(f"hub_kill: kill -9 at {point!r}, {trials} trial(s) on {broker.kind}")
    settings = crash_hub_settings(tau)
    totals = {"accepted": 0, "lost": 0, "duplicates": 0, "restarts": 0, "backwards": 0, "versions": 0}
    notes: list[str] = []
    with Timer() as timer:
        for trial in range(1, trials + 1):
            run = run_hub_crash(broker, ctx.workdir / f"{point}{trial}", point, trial, updates=updates, tau=tau)
            with contextlib.closing(SqliteStore(run.state_dir)) as store:
                audit = audit_store(store, run.frames, run.receipted, settings)
                small = [v.version for v in store.versions() if v.parent is not None and v.num_updates < tau]
            for key, value in (("accepted", audit.accepted), ("lost", audit.lost), ("duplicates", audit.duplicates),
                               ("restarts", run.restarts), ("backwards", int(run.went_backwards)),
                               ("versions", audit.latest_version)):  # fmt: skip
                totals[key] += value
            trouble = list(audit.problems)
            if run.exit_codes != (-9,):
                trouble.append(f"hub exit statuses {list(run.exit_codes)}, not one kill -9")
            if run.stop_code != 0:
                trouble.append(f"the restarted hub did not stop cleanly ({run.stop_code})")
            if audit.queued >= tau:
                trouble.append(f"{audit.queued} updates left queued (tau {tau})")
            if small:
                trouble.append(f"versions {small} aggregated fewer than tau updates")
            if run.went_backwards:
                trouble.append(f"announced versions went backwards: {list(run.announced)}")
            notes += [f"trial {trial}: {problem}" for problem in trouble]
    return Outcome(
        "hub_kill",
        f"kill -9 at {point}",
        ctx.broker,
        tried=updates * trials,
        accepted=totals["accepted"],
        expected_accepted=updates * trials,
        lost=totals["lost"],
        duplicates=totals["duplicates"],
        seconds=round(timer.seconds, 2),
        detail="; ".join(notes)[:1000] or f"{trials} kills, each restarted once; checkpoints sound",
        metrics={k: float(v) for k, v in totals.items()} | {"trials": float(trials)},
        passed=not notes and totals["accepted"] == updates * trials and not totals["lost"] and not totals["duplicates"],
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("resets", "20 clients x 10 rounds, connections reset at random during uploads", run_resets),
    Scenario("broker_restart", "Broker restarted in the middle of a large chunked upload", run_broker_restart),
    Scenario("edge_kill", "Edge kill -9 with an unacknowledged update: sent after restart", run_edge_kill),
    Scenario("hub_kill", "Hub kill -9 at four points, three trials each", run_hub_kill),
)
