"""The hub's protocol logic: accept updates, aggregate at τ, publish and serve global versions.

This module knows MQTT only through the :class:`~ffm_edge.transport.Transport` seam and the model only
through two injected functions (the initial trainable state, and an evaluation of a state), so it
runs unchanged against the in-memory fake, a real broker, a torch model or plain arrays.

All protocol state is touched by one worker thread: transport callbacks only enqueue messages.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ffm_edge.errors import (
    ConfigError,
    DecodeError,
    FFMError,
    HashMismatchError,
    OversizedError,
    ProtocolVersionError,
    TransportError,
    WrongDtypeError,
)
from ffm_edge.transport import Transport
from ffm_edge.wire import (
    CODECS,
    DEFAULT_LIMITS,
    MAX_DETAIL_CHARS,
    ArtifactError,
    ArtifactRequest,
    ChunkAssembler,
    GlobalMeta,
    Hello,
    Manifest,
    PullError,
    PullRequest,
    Receipt,
    Rejection,
    Topics,
    UpdateMeta,
    WireLimits,
    decode_global,
    decode_message,
    decode_update,
    encode_global,
    encode_message,
    parse_chunk,
    split_frame,
    validate_id,
)
from ffm_hub.aggregate import (
    STALENESS_KINDS,
    PartialSum,
    ServerOptimizer,
    is_too_stale,
    make_server_optimizer,
    staleness_weight,
)
from ffm_hub.faults import crash_point
from ffm_hub.privacy import compose_mu, gdp_epsilon, round_mu
from ffm_hub.robust import AGGREGATORS, check_aggregator, robust_aggregate, update_norm
from ffm_hub.store import HubStore, QueuedUpdate, VersionRecord
from ffm_hub.switching import ACTIONS, Decision, SwitchingPolicy

if TYPE_CHECKING:
    from ffm_hub.artifacts import ArtifactService
    from ffm_hub.signing import HubSecurity

__all__ = ["STORED_CODEC", "Hub", "HubSettings", "downlink_codec_for"]

log = logging.getLogger("ffm.hub")

# Aggregators that need every update to carry the same tensors.
_WHOLE_UPDATE = frozenset({"krum", "multi_krum"})

State = dict[str, np.ndarray]
Evaluator = Callable[[Mapping[str, np.ndarray]], dict[str, float]]


#: How the hub stores global versions: exact, so that aggregation, evaluation and recovery never see the
#: rounding of the downlink codec (``HubSettings.downlink_codec``), which applies only to what devices pull.
STORED_CODEC = "fp32"

_FP16_MAX = float(np.finfo(np.float16).max)


def downlink_codec_for(state: Mapping[str, np.ndarray], codec: str) -> tuple[str, str | None]:
    """The codec to send ``state`` to devices with: ``codec``, or fp32 and the reason when ``codec`` would turn
    a value into inf (fp16 above 65504) or cannot encode one (int8 of a non-finite value). A device must never
    train from a global version that differs from the hub's by more than rounding."""
    if codec == STORED_CODEC:
        return codec, None
    for name, value in state.items():
        if not np.isfinite(value).all():
            return STORED_CODEC, f"{name} holds non-finite values"
        if codec == "fp16" and value.size and float(np.abs(value).max()) > _FP16_MAX:
            return STORED_CODEC, f"{name} holds values beyond fp16's range (|x| > {_FP16_MAX:.0f})"
    return codec, None


def _newest_only(cache: dict[tuple[int, str], bytes], version: int) -> dict[tuple[int, str], bytes]:
    """``cache`` without the entries of other versions (devices pull the newest; one entry per strategy)."""
    return {key: frame for key, frame in cache.items() if key[0] == version}


@dataclass(frozen=True)
class HubSettings:
    """Protocol settings of one hub."""

    federation: str = "default"
    hub_id: str = "hub"
    model: str = "unknown"
    strategy: str = "lora"
    tau: int = field(default=3, metadata={"help": "aggregate when this many accepted updates are queued"})
    server_lr: float = field(default=1.0, metadata={"help": "server learning rate η"})
    server_optimizer: str = field(
        default="fedavg", metadata={"help": "fedavg, fedavgm (server momentum) or fedadam (Reddi et al. 2021)"}
    )
    server_momentum: float = field(default=0.9, metadata={"help": "fedavgm: momentum of the server step"})
    server_beta1: float = field(default=0.9, metadata={"help": "fedadam: first-moment decay"})
    server_beta2: float = field(default=0.99, metadata={"help": "fedadam: second-moment decay"})
    server_epsilon: float = field(default=1e-3, metadata={"help": "fedadam: adaptivity τ added to sqrt(v)"})
    aggregator: str = field(
        default="fedavg",
        metadata={"help": "rule that makes the pseudo-gradient: " + ", ".join(AGGREGATORS) + " (ffm_hub.robust)"},
    )
    trim_fraction: float = field(default=0.1, metadata={"help": "trimmed_mean: share cut from each end, [0, 0.5)"})
    krum_f: int = field(default=1, metadata={"help": "krum, multi_krum: attackers tolerated (tau > 2f + 2)"})
    krum_m: int = field(default=1, metadata={"help": "multi_krum: lowest-scoring updates averaged (<= tau - f)"})
    dp_clip: float = field(default=1.0, metadata={"help": "dp_fedavg: L2 norm C each whole update is clipped to"})
    dp_noise_multiplier: float = field(default=1.0, metadata={"help": "dp_fedavg: z in sigma = z * C / tau"})
    dp_seed: int | None = field(
        default=None, metadata={"help": "dp_fedavg: seed of the noise (None: OS entropy; a known seed voids privacy)"}
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "dp_fedavg: the δ at which ε is reported, in (0, 1)"})
    dp_max_epsilon: float | None = field(
        default=None,
        metadata={"help": "dp_fedavg: stop aggregating before a round would take ε above this (None: no budget)"},
    )
    downlink_codec: str = field(
        default="fp32",
        metadata={
            "help": "codec of the global versions devices pull: fp32, fp16 (half the bytes) or int8 "
            "(per-channel, about a quarter); the hub stores, aggregates and evaluates fp32 either way"
        },
    )
    chunk_size: int = field(default=128 * 1024, metadata={"help": "bytes per MQTT message for large frames"})
    publish_timeout: float = 30.0
    device_timeout: float = field(default=90.0, metadata={"help": "a device silent this long is offline"})
    staleness: str = field(
        default="polynomial",
        metadata={"help": "weight of an update built on an older version: " + ", ".join(STALENESS_KINDS)},
    )
    staleness_alpha: float = field(default=0.5, metadata={"help": "exponent (polynomial) or slope (hinge)"})
    keep_versions: int | None = field(
        default=None, metadata={"help": "keep only the newest N global versions (None: keep every one)"}
    )
    max_staleness: int | None = field(
        default=None, metadata={"help": "reject updates more than this many versions behind (None: never)"}
    )
    max_update_norm: float | None = field(
        default=None,
        metadata={"help": "reject an update whose L2 norm over all its tensors exceeds this (None: no bound)"},
    )
    limits: WireLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        errors = []
        for what, value in (("federation", self.federation), ("hub_id", self.hub_id)):
            try:
                validate_id(value, what)
            except DecodeError as exc:
                errors.append(str(exc))
        if not self.device_timeout > 0:
            errors.append(f"device_timeout must be > 0, got {self.device_timeout}")
        try:
            staleness_weight(0, kind=self.staleness, alpha=self.staleness_alpha, max_staleness=self.max_staleness)
        except ConfigError as exc:
            errors.append(str(exc))
        if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            errors.append(f"max_update_norm must be a finite number > 0, got {self.max_update_norm}")
        if self.keep_versions is not None and self.keep_versions < 1:
            errors.append(f"keep_versions must be >= 1, got {self.keep_versions}")
        if self.tau < 1:
            errors.append(f"tau must be >= 1, got {self.tau}")
        if not self.server_lr > 0:
            errors.append(f"server_lr must be > 0, got {self.server_lr}")
        else:
            try:
                self.make_server_optimizer()
            except ConfigError as exc:
                errors.append(str(exc))
        errors.extend(
            check_aggregator(
                self.aggregator,
                tau=self.tau,
                trim_fraction=self.trim_fraction,
                krum_f=self.krum_f,
                krum_m=self.krum_m,
                dp_clip=self.dp_clip,
                dp_noise_multiplier=self.dp_noise_multiplier,
            )
        )
        if self.dp_seed is not None and (isinstance(self.dp_seed, bool) or not isinstance(self.dp_seed, int)):
            errors.append(f"dp_seed must be an integer or None, got {self.dp_seed!r}")
        elif self.dp_seed is not None and self.dp_seed < 0:
            errors.append(f"dp_seed must be >= 0, got {self.dp_seed}")
        if self.downlink_codec not in CODECS:
            errors.append(f"downlink_codec must be one of {', '.join(CODECS)}, got {self.downlink_codec!r}")
        if not (isinstance(self.dp_delta, float | int) and 0 < self.dp_delta < 1):
            errors.append(f"dp_delta must be in (0, 1), got {self.dp_delta!r}")
        budget = self.dp_max_epsilon
        if budget is not None and not (isinstance(budget, float | int) and math.isfinite(budget) and budget > 0):
            errors.append(f"dp_max_epsilon must be a finite number > 0 or None, got {budget!r}")
        if not 1024 <= self.chunk_size <= self.limits.max_chunk_bytes:
            errors.append(f"chunk_size must be in [1024, {self.limits.max_chunk_bytes}], got {self.chunk_size}")
        if errors:
            raise ConfigError("; ".join(errors))

    def make_server_optimizer(self) -> ServerOptimizer:
        """The configured server optimizer, with fresh buffers."""
        name = self.server_optimizer.lower()
        kwargs: dict[str, float] = {"server_lr": self.server_lr}
        if name == "fedavgm":
            kwargs["momentum"] = self.server_momentum
        elif name == "fedadam":
            kwargs.update(beta1=self.server_beta1, beta2=self.server_beta2, tau=self.server_epsilon)
        return make_server_optimizer(name, **kwargs)


class Hub:
    """One federation's hub. ``start()`` subscribes and begins serving; ``stop()`` ends it."""

    def __init__(
        self,
        settings: HubSettings,
        transport: Transport,
        store: HubStore,
        *,
        initial_state: Callable[[], Mapping[str, np.ndarray]],
        evaluate: Evaluator | None = None,
        on_version: Callable[[VersionRecord], None] | None = None,
        strategy_tensors: Mapping[str, Collection[str]] | None = None,
        central_step: Callable[[State], State] | None = None,
        policy: SwitchingPolicy | None = None,
        validate: Evaluator | None = None,
        artifacts: ArtifactService | None = None,
        security: HubSecurity | None = None,
    ) -> None:
        """``evaluate`` gives the metrics stored with each version (e.g. on a test split); ``validate``,
        when given, the held-out public metrics the switching policy decides on (stored as ``heldout_*``),
        so decisions never look at the test split. Without it the policy decides on ``evaluate``.
        ``artifacts``, when given, serves ORT training artifacts to devices that ask for them (without it
        such requests are refused with the reason ``disabled``). ``security``, when given, checks device
        signatures before an update is queued and signs manifests and served frames (ffm_hub.signing)."""
        self.settings = settings
        self.transport = transport
        self.store = store
        self.topics = Topics(settings.federation)
        self._initial_state = initial_state
        # Which tensors each strategy trains, in a federation of mixed strategies (None: any subset).
        self._strategy_tensors = (
            {name: frozenset(names) for name, names in strategy_tensors.items()} if strategy_tensors else None
        )
        if settings.aggregator in _WHOLE_UPDATE and len(set((self._strategy_tensors or {}).values())) > 1:
            raise ConfigError(
                f"aggregator {settings.aggregator} compares whole updates and cannot mix strategies that train "
                "different tensors; use median or trimmed_mean in a mixed federation"
            )
        # Frames served to devices, per (version, strategy): only the newest version's are kept.
        self._variant_cache: dict[tuple[int, str], bytes] = {}
        self._central_step = central_step  # optimization on the hub's public data (the paper's FFM)
        self._policy = policy
        self._evaluate = evaluate
        self._validator = validate
        self._optimizer = settings.make_server_optimizer()
        self._on_version = on_version
        self._artifacts = artifacts
        self._security = security
        self._signed_frames: dict[tuple[int, str], bytes] = {}  # the newest signed frame served
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._assembler = ChunkAssembler(limits=settings.limits)
        self._worker: threading.Thread | None = None
        self._global: State = {}
        self._current: VersionRecord | None = None
        self._bytes_in = 0
        self._bytes_out = 0
        self._dp_mu = 0.0  # GDP μ spent over every dp_fedavg round so far (ffm_hub.privacy); from the store
        self._dp_spent: str | None = None  # why the privacy budget allows no further round, once it does not
        self._round_started = time.time()
        self.devices: dict[str, float] = {}  # device -> when it was last heard from
        self.online: set[str] = set()
        self.counters: dict[str, int] = {"accepted": 0, "duplicates": 0, "rejected": 0, "versions": 0}
        self.rejections: dict[str, int] = {}
        self._recent_rejections: dict[str, Rejection] = {}
        self._received = 0  # messages ever enqueued (wait_idle watches it)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load or create the global state, subscribe, announce the current version."""
        self._load_or_init()
        if self._artifacts is not None:
            self._artifacts.start(self.transport, self.settings.federation)
        self.transport.subscribe(self.topics.uplink_filter(), self._enqueue)
        self.transport.subscribe(self.topics.presence_filter(), self._enqueue)
        self._worker = threading.Thread(target=self._run, name="ffm-hub-worker", daemon=True)
        self._worker.start()
        self._publish_manifest()
        # A restart may find a full queue (updates receipted just before a crash): aggregate now.
        self._inbox.put(("__tick__", b""))

    def stop(self) -> None:
        """Finish the message in hand, then stop the worker."""
        if self._worker is not None:
            self._inbox.put(None)
            self._worker.join(timeout=60)
            self._worker = None
        if self._artifacts is not None:
            self._artifacts.stop()

    @property
    def current_version(self) -> int:
        """The newest global version id."""
        return -1 if self._current is None else self._current.version

    def global_state(self) -> State:
        """A copy of the current global trainable state."""
        return {k: v.copy() for k, v in self._global.items()}

    def wait_for_version(self, version: int, timeout: float = 30.0) -> bool:
        """Block until the hub has published ``version`` (or a newer one); False on timeout (for tools)."""
        deadline = time.monotonic() + timeout
        while self.current_version < version:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the inbox is empty and the worker is waiting (for tests and tools)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._received
            with self._inbox.all_tasks_done:  # every message taken from the inbox is marked done when handled
                while self._inbox.unfinished_tasks:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._inbox.all_tasks_done.wait(min(remaining, 0.5))
            # Transports deliver on their own threads: idle means nothing new arrived for a moment either.
            time.sleep(0.05)
            if self._received == seen and not self._inbox.unfinished_tasks:
                return True
            if time.monotonic() >= deadline:
                return False

    # -- state ----------------------------------------------------------------------------------------
    def _load_or_init(self) -> None:
        latest = self.store.latest_version()
        if latest is None:
            state = {k: np.asarray(v, dtype=np.float32) for k, v in self._initial_state().items()}
            self._commit(state, parent=None, kind="init", consumed=[], metrics=self._measure(state))
        else:
            _meta, state = decode_global(self.store.load_version(latest.version), limits=self.settings.limits)
            self._global, self._current = state, latest
            self._load_server_state(latest.version)
            if self.settings.aggregator == "dp_fedavg":  # the privacy spent so far (a z = 0 round records no μ)
                self._dp_mu = latest.metrics.get("dp_mu", math.inf if "dp_device_updates" in latest.metrics else 0.0)
                self._check_dp_budget()
            log.info("resumed at global version %d (%d updates queued)", latest.version, len(self.store.queued()))
        assert self._current is not None
        if self._central_step is not None and self._policy is not None and self._policy.central_first:
            if self._current.kind == "init":  # also after a crash between version 0 and the central version
                started = time.perf_counter()
                state = self._central_step(self.global_state())
                metrics = {**self._measure(state), "central_s": time.perf_counter() - started, "central_steps": 1.0}
                self._log_decision("central", "central-then-federated: a central step before the first round")
                self._commit(state, parent=self._current.version, kind="central", consumed=[], metrics=metrics)

    def _load_server_state(self, version: int) -> None:
        """Resume the server optimizer's buffers (momentum, moments) committed with ``version``."""
        blob = self.store.load_server_state(version)
        if blob is None:
            return
        from safetensors.numpy import load as load_tensors

        try:
            tensors = load_tensors(blob)
            self._optimizer.load_state_dict(tensors)
        except Exception as exc:  # e.g. the configured optimizer changed since: start its buffers afresh
            log.warning("server optimizer state of version %d not resumed (%s); starting it afresh", version, exc)
            self._optimizer = self.settings.make_server_optimizer()
        else:
            log.info("resumed %s server state (%d buffers)", self._optimizer.name, len(tensors))

    def _server_state_blob(self) -> bytes | None:
        buffers = self._optimizer.state_dict()
        if not buffers:
            return None
        from safetensors.numpy import save as save_tensors

        return save_tensors(buffers, metadata={"optimizer": self._optimizer.name})

    def _measure(self, state: Mapping[str, np.ndarray], heldout: Mapping[str, float] | None = None) -> dict[str, float]:
        """Metrics stored with a version: the evaluation, plus the held-out public ones when separate.

        ``heldout``: the held-out metrics of this very state when already computed (saves an evaluation).
        """
        if heldout is not None and self._validator is None:
            return dict(heldout)  # the policy decided on the evaluation itself
        metrics = dict(self._evaluate(state)) if self._evaluate else {}
        if self._validator is not None:
            metrics.update(heldout if heldout is not None else self._heldout(state))
        return metrics

    def _heldout(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The metrics the switching policy decides on."""
        if self._validator is not None:
            return {f"heldout_{k}": v for k, v in self._validator(state).items()}
        return dict(self._evaluate(state)) if self._evaluate else {}

    def _decision_key(self, metrics: Mapping[str, float]) -> str | None:
        if self._validator is not None:
            return next((k for k in metrics if k.startswith("heldout_")), None)
        return next(iter(metrics), None)

    def _commit(
        self, state: State, *, parent: int | None, kind: str, consumed: list[str], metrics: dict[str, float]
    ) -> VersionRecord:
        version = 0 if parent is None else parent + 1
        meta = GlobalMeta(
            federation=self.settings.federation,
            version=version,
            parent=parent,
            model=self.settings.model,
            strategy=self.settings.strategy,
            codec=STORED_CODEC,  # exact: recovery after a crash must resume from the state aggregated
            created_at=time.time(),
            num_updates=len(consumed),
            metrics=metrics,
        )
        frame = encode_global(meta, state)
        record = VersionRecord(
            version=version,
            parent=parent,
            sha256=hashlib.sha256(frame).hexdigest(),
            size=len(frame),
            created_at=meta.created_at,
            num_updates=len(consumed),
            kind=kind,
            metrics=metrics,
        )
        self.store.commit_version(record, frame, consumed, server_state=self._server_state_blob())
        if self.settings.keep_versions is not None:
            pruned = self.store.prune_versions(self.settings.keep_versions)
            if pruned:
                log.info("pruned global versions %s (keeping %d)", pruned, self.settings.keep_versions)
        self._global, self._current = state, record
        self.counters["versions"] += 1
        log.info("global version %d (%s, %d updates) %s", version, kind, len(consumed), _fmt(metrics))
        return record

    # -- message loop ---------------------------------------------------------------------------------
    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._received += 1
        self._inbox.put((topic, payload))

    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=min(5.0, self.settings.device_timeout / 3))
            except queue.Empty:
                self._check_liveness()
                continue
            try:
                if item is None:
                    return
                topic, payload = item
                try:
                    self._dispatch(topic, payload)
                except Exception:  # one bad message must never stop the hub
                    log.exception("error while handling a message on %s", topic)
            finally:
                self._inbox.task_done()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == "__tick__":
            self._maybe_aggregate()
            return
        if topic.startswith(self.topics.presence_filter()[:-1]):
            device = topic.rsplit("/", 1)[-1]
            if payload == b"offline":  # a clean close, or the broker's Last Will
                self._mark_offline(device, "said offline")
            elif payload:
                self._heard_from(device)
            return
        try:
            device, kind = self.topics.parse_uplink(topic)
        except DecodeError:
            log.warning("ignoring message on unexpected topic %s", topic)
            return
        self._heard_from(device)
        if kind == "update":
            self._bytes_in += len(payload)
            self._on_chunk(device, payload)
        else:
            self._on_control(device, payload)

    def _heard_from(self, device: str) -> None:
        self.devices[device] = time.time()
        if device not in self.online:
            self.online.add(device)
            log.info("device %s online (%d online)", device, len(self.online))

    def _mark_offline(self, device: str, why: str) -> None:
        if device in self.online:
            self.online.discard(device)
            log.info("device %s offline: %s (%d online)", device, why, len(self.online))

    def _check_liveness(self) -> None:
        """Hub-side liveness: no broker reliably sends a silent device's Last Will, so time them out."""
        now = time.time()
        for device in list(self.online):
            silent = now - self.devices.get(device, 0.0)
            if silent > self.settings.device_timeout:
                self._mark_offline(device, f"silent for {silent:.0f}s")

    def _on_chunk(self, device: str, frame: bytes) -> None:
        try:
            chunk = parse_chunk(frame, limits=self.settings.limits)
        except OversizedError as exc:
            if exc.transfer_id is None:
                self._count_rejection("oversized")
                log.warning("dropping an oversized chunk from %s: %s", device, exc)
            elif exc.chunk_index == 0:  # answer each send or resend of the transfer once, not every chunk
                self._reject(device, exc.transfer_id, "oversized", str(exc))
            return
        except DecodeError as exc:
            self._count_rejection(_reason(exc))
            log.warning("dropping an unreadable chunk from %s: %s", device, exc)
            return
        if self._answer_resend(device, chunk.transfer_id, last=chunk.index == chunk.count - 1):
            return
        try:
            completed = self._assembler.add(frame)
        except DecodeError as exc:
            self._reject(device, chunk.transfer_id, _reason(exc), str(exc))
            return
        if completed is not None:
            if self._security is not None and self._security.require_signatures:
                self._assembler.forget(completed.transfer_id)  # a resend is reassembled and checked again
            self._on_update(device, completed.transfer_id, completed.data)

    def _answer_resend(self, device: str, transfer_id: str, *, last: bool) -> bool:
        """A device sends an update again when it missed our answer: answer again, once per resend."""
        accepted = self.store.get_update(transfer_id)
        rejection = self._recent_rejections.get(transfer_id)
        if accepted is None and rejection is None:
            return False
        if accepted is not None and accepted.device != device:
            return False  # not this device's update: validation rejects it
        if accepted is not None and self._security is not None and self._security.require_signatures:
            return False  # verify it: only an identical payload is a duplicate, another one is a replay
        if last and accepted is not None:
            queue_length = len(self.store.queued())
            receipt = Receipt(transfer_id, self.current_version, queue_length, True)
            self.counters["duplicates"] += 1
            self._send(self.topics.downlink_control(device), encode_message(receipt))
        elif last and rejection is not None:
            self._send(self.topics.downlink_control(device), encode_message(rejection))
        return True

    def _on_control(self, device: str, payload: bytes) -> None:
        try:
            message = decode_message(payload, limits=self.settings.limits)
        except DecodeError as exc:
            log.warning("dropping an unreadable control message from %s: %s", device, exc)
            return
        if isinstance(message, Hello):
            self._send(self.topics.downlink_control(device), encode_message(self._manifest()))
        elif isinstance(message, PullRequest):
            self._serve_pull(device, message)
        elif isinstance(message, ArtifactRequest):
            self._serve_artifacts(device, message)
        # Heartbeats only refresh ``devices`` (done in _dispatch).

    def _serve_pull(self, device: str, request: PullRequest) -> None:
        version = self.current_version if request.version == -1 else request.version
        record = self.store.get_version(version)
        if record is None:
            error = PullError(request.transfer_id, "unknown_version", f"no version {version}").sendable()
            self._send(self.topics.downlink_control(device), encode_message(error))
            return
        frame = self._frame_for(version, request.strategy)
        if self._security is not None and self._security.hub_key is not None:
            key = (version, request.strategy or "")
            if key not in self._signed_frames:
                self._signed_frames = _newest_only(self._signed_frames, version)
                self._signed_frames[key] = self._security.sign_frame(frame)
            frame = self._signed_frames[key]
        for chunk in split_frame(frame, chunk_size=self.settings.chunk_size, transfer_id=request.transfer_id):
            self._bytes_out += len(chunk)
            self._send(self.topics.downlink_global(device), chunk)

    def _serve_artifacts(self, device: str, request: ArtifactRequest) -> None:
        if request.device != device:
            log.warning("dropping an artifact request for %s that came from %s", request.device, device)
            return
        if self._artifacts is None:
            detail = "this hub does not serve ORT artifacts (start it with `ffm-hub serve --ort-artifacts`)"
            error = ArtifactError(request.transfer_id, "disabled", detail).sendable()
            self._send(self.topics.downlink_control(device), encode_message(error))
            return
        self._artifacts.handle(device, request, lambda: (self.current_version, self.global_state()))

    def _frame_for(self, version: int, strategy: str | None) -> bytes:
        """What a device pulls: the stored version, cut to the tensors ``strategy`` trains (a device pulls what
        it needs), in the downlink codec. Re-encoded once per (version, strategy) and cached."""
        frame = self.store.load_version(version)
        wanted = None if self._strategy_tensors is None or strategy is None else self._strategy_tensors.get(strategy)
        if wanted is None and self.settings.downlink_codec == STORED_CODEC:
            return frame
        key = (version, strategy or "")
        if key not in self._variant_cache:
            meta, state = decode_global(frame, limits=self.settings.limits)
            changes: dict[str, object] = {}
            if wanted is not None and not set(state) <= wanted:
                state = {k: v for k, v in state.items() if k in wanted}
                changes["strategy"] = strategy
            codec, why_not = downlink_codec_for(state, self.settings.downlink_codec)
            if why_not is not None:
                wanted_codec = self.settings.downlink_codec
                log.warning("serving version %d as %s, not %s: %s", version, codec, wanted_codec, why_not)
            if codec != meta.codec:
                changes["codec"] = codec
            variant = GlobalMeta(**{**meta.to_dict(), **changes}) if changes else None
            self._variant_cache = _newest_only(self._variant_cache, version)
            self._variant_cache[key] = frame if variant is None else encode_global(variant, state)
        return self._variant_cache[key]

    # -- updates --------------------------------------------------------------------------------------
    def _on_update(self, device: str, transfer_id: str, frame: bytes) -> None:
        try:
            meta, tensors = decode_update(frame, limits=self.settings.limits)
        except DecodeError as exc:
            self._reject(device, transfer_id, _reason(exc), str(exc))
            return
        problem = None if self._security is None else self._security.check_update(meta, frame, self.store)
        if problem is not None:
            self._reject(device, meta.update_id, *problem)
            return
        problem = self._validate(device, transfer_id, meta, tensors)
        if problem is None and self._dp_spent is not None and self.store.get_update(meta.update_id) is None:
            problem = ("budget_exhausted", self._dp_spent)
        if problem is not None:
            self._reject(device, meta.update_id, *problem)
            return
        result = self.store.accept_update(
            QueuedUpdate(
                update_id=meta.update_id,
                device=meta.device,
                base_version=meta.base_version,
                num_samples=meta.num_samples,
                strategy=meta.strategy,
                codec=meta.codec,
                size=len(frame),
                received_at=time.time(),
            ),
            frame,
        )
        self.counters["duplicates" if result.duplicate else "accepted"] += 1
        crash_point("accepted")
        receipt = Receipt(meta.update_id, self.current_version, result.queue_length, result.duplicate)
        self._send(self.topics.downlink_control(device), encode_message(receipt))
        crash_point("receipted")
        log.info(
            "%s update %s from %s (n=%d, base v%d), queue %d/%d",
            "duplicate" if result.duplicate else "accepted",
            meta.update_id,
            device,
            meta.num_samples,
            meta.base_version,
            result.queue_length,
            self.settings.tau,
        )
        if not result.duplicate:
            self._maybe_aggregate()

    def _validate(
        self, device: str, transfer_id: str, meta: UpdateMeta, tensors: Mapping[str, np.ndarray]
    ) -> tuple[str, str] | None:
        if meta.update_id != transfer_id:
            return "malformed", f"transfer id {transfer_id} != update id {meta.update_id}"
        if meta.federation != self.settings.federation:
            return "wrong_federation", f"update is for federation {meta.federation!r}"
        if meta.device != device:
            return "device_mismatch", f"update names device {meta.device!r} but came from {device!r}"
        if self.store.get_update(meta.update_id) is not None:
            return None  # a duplicate of an accepted update: receipt it again
        if meta.base_version > self.current_version:
            return "malformed", f"base version {meta.base_version} is newer than the hub's {self.current_version}"
        staleness = self.current_version - meta.base_version  # versions it will be behind when aggregated
        if is_too_stale(staleness, self.settings.max_staleness):
            return (
                "stale",
                f"built on version {meta.base_version}, {staleness} behind (max {self.settings.max_staleness})",
            )
        if self._strategy_tensors is not None:
            allowed = self._strategy_tensors.get(meta.strategy)
            if allowed is None:
                return "unknown_strategy", f"this federation trains {sorted(self._strategy_tensors)}"
            outside = sorted(set(tensors) - allowed)
            if outside:
                return "unknown_tensors", f"not trained by {meta.strategy}: {outside[:3]}"
        unknown = sorted(set(tensors) - set(self._global))
        if unknown or not tensors:
            return "unknown_tensors", f"not in the global model: {unknown[:3]}" if unknown else "no tensors"
        if self.settings.aggregator in _WHOLE_UPDATE and set(tensors) != set(self._global):
            missing = sorted(set(self._global) - set(tensors))
            return "unknown_tensors", f"{self.settings.aggregator} needs every global tensor; missing {missing[:3]}"
        for name, value in tensors.items():
            if value.shape != self._global[name].shape:
                return "shape_mismatch", f"{name}: {value.shape} != {self._global[name].shape}"
            if not np.isfinite(value).all():
                return "non_finite", f"{name} holds NaN or Inf"
        if self.settings.max_update_norm is not None:
            norm = update_norm(tensors)
            if norm > self.settings.max_update_norm:
                return "norm_exceeded", f"L2 norm {norm:.4g} is above the bound {self.settings.max_update_norm:g}"
        return None

    def _maybe_aggregate(self) -> None:
        queued = self.store.queued()
        if len(queued) < self.settings.tau:
            return
        dp_round = None
        if self.settings.aggregator == "dp_fedavg":
            dp_round = self._dp_round(queued)
            if dp_round is None:
                return  # over the privacy budget: the updates stay queued, nothing is published
        started = time.perf_counter()
        partial = PartialSum()
        robust = self.settings.aggregator != "fedavg"
        deltas: list[Mapping[str, np.ndarray]] = []
        staleness = [self.current_version - item.base_version for item in queued]
        for item, behind in zip(queued, staleness, strict=True):
            _meta, tensors = decode_update(self.store.load_update(item.update_id), limits=self.settings.limits)
            if robust:  # robust rules are unweighted: neither sample counts nor staleness weigh in
                deltas.append(tensors)
                continue
            weight = staleness_weight(behind, kind=self.settings.staleness, alpha=self.settings.staleness_alpha)
            partial.add(tensors, float(item.num_samples) * weight)
        robust_metrics: dict[str, float] = {}
        if robust:
            mean_delta, robust_metrics = self._robust_mean(deltas)
        else:
            mean_delta = partial.mean()
        if dp_round is not None:
            robust_metrics.update(dp_round)
            self._dp_mu = dp_round.get("dp_mu", math.inf)
        buffers_before = self._optimizer.state_dict()
        state = self._optimizer.step(self._global, mean_delta)
        aggregation_s = time.perf_counter() - started
        crash_point("aggregating")
        kind = f"{self.settings.aggregator}+{self._optimizer.name}" if robust else self._optimizer.name
        state, central_steps, central_s, heldout = self._central_phase(state)
        if central_steps:
            kind += "+central"
        metrics = self._measure(state, heldout)
        if self._policy is not None:
            state, kind, metrics = self._switch(state, kind, metrics, buffers_before)
        if self._central_step is not None:
            metrics.update(central_s=central_s, central_steps=float(central_steps))
        metrics.update(
            {
                "aggregation_s": aggregation_s,
                "round_s": time.time() - self._round_started,
                "bytes_in": float(self._bytes_in),
                "bytes_out": float(self._bytes_out),
                "num_samples": float(sum(item.num_samples for item in queued)),
                "devices": float(len({item.device for item in queued})),
                "mean_staleness": float(sum(staleness) / len(staleness)),
            }
        )
        metrics.update(robust_metrics)  # this round's aggregation parameters, even when the policy reverted
        parent = self.current_version
        record = self._commit(state, parent=parent, kind=kind, consumed=[q.update_id for q in queued], metrics=metrics)
        self._bytes_in = self._bytes_out = 0
        self._round_started = time.time()
        self._publish_manifest()
        if self._on_version is not None:
            self._on_version(record)
        self._check_dp_budget()

    def _dp_round(self, queued: list[QueuedUpdate]) -> dict[str, float] | None:
        """The privacy this dp_fedavg round spends, as version metrics; None when the budget forbids it.

        One device with ``k`` of the round's updates makes it ``k / z``-GDP (ffm_hub.privacy). A round that
        would take ε above ``dp_max_epsilon`` is not run; the hub then refuses new updates
        (``budget_exhausted``) and keeps the queued ones, so an operator who raises the budget loses nothing.
        """
        s = self.settings
        device_updates = max(Counter(item.device for item in queued).values())
        mu = compose_mu([self._dp_mu, round_mu(s.dp_noise_multiplier, device_updates)])
        epsilon = gdp_epsilon(mu, s.dp_delta)
        if s.dp_max_epsilon is not None and epsilon > s.dp_max_epsilon:
            self._budget_spent(epsilon, len(queued))
            return None
        metrics = {"dp_device_updates": float(device_updates), "dp_delta": float(s.dp_delta)}
        if math.isfinite(mu):  # z = 0: no noise, no privacy, and JSON has no inf
            metrics.update(dp_mu=mu, dp_epsilon=epsilon)
        return metrics

    def _check_dp_budget(self) -> None:
        """Refuse updates as soon as even the smallest next round (one update per device) would overspend, so
        devices stop uploading what can never be aggregated."""
        s = self.settings
        if s.aggregator != "dp_fedavg" or s.dp_max_epsilon is None or self._dp_spent is not None:
            return
        epsilon = gdp_epsilon(compose_mu([self._dp_mu, round_mu(s.dp_noise_multiplier)]), s.dp_delta)
        if epsilon > s.dp_max_epsilon:
            self._budget_spent(epsilon, len(self.store.queued()))

    def _budget_spent(self, epsilon_next: float, queued: int) -> None:
        if self._dp_spent is None:
            s = self.settings
            self._dp_spent = (
                f"the privacy budget ε = {s.dp_max_epsilon:g} at δ = {s.dp_delta:g} is spent: ε = "
                f"{gdp_epsilon(self._dp_mu, s.dp_delta):.4g} so far, {epsilon_next:.4g} after another round"
            )
            log.error("not aggregating any more: %s; %d updates stay queued", self._dp_spent, queued)

    @property
    def privacy(self) -> dict[str, float | str | None] | None:
        """What dp_fedavg has spent so far (for status and tools); None with another aggregator."""
        s = self.settings
        if s.aggregator != "dp_fedavg":
            return None
        epsilon = gdp_epsilon(self._dp_mu, s.dp_delta)
        return {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "delta": s.dp_delta,
            "mu": self._dp_mu if math.isfinite(self._dp_mu) else None,
            "max_epsilon": s.dp_max_epsilon,
            "spent": self._dp_spent,
        }

    def _robust_mean(self, deltas: list[Mapping[str, np.ndarray]]) -> tuple[State, dict[str, float]]:
        """The configured robust or private pseudo-gradient, and the parameters to record with it."""
        s = self.settings
        version = self.current_version + 1
        # Seeded per version, so a resumed hub redraws the same noise for the same version.
        rng = np.random.default_rng(None if s.dp_seed is None else [s.dp_seed, version])
        return robust_aggregate(
            s.aggregator,
            deltas,
            trim_fraction=s.trim_fraction,
            krum_f=s.krum_f,
            krum_m=s.krum_m,
            dp_clip=s.dp_clip,
            dp_noise_multiplier=s.dp_noise_multiplier,
            rng=rng,
        )

    def _central_phase(self, state: State) -> tuple[State, int, float, dict[str, float] | None]:
        """Central steps on public data after an aggregation.

        Returns the state, how many steps the policy kept, their time, and the held-out metrics of the
        returned state when they were computed on the way (None otherwise).
        """
        policy = self._policy
        if self._central_step is None or (policy is not None and not policy.central_after_aggregate):
            return state, 0, 0.0, None
        started = time.perf_counter()
        if policy is None or not policy.adapts_central:
            return self._central_step(state), 1, time.perf_counter() - started, None
        heldout = self._heldout(state)
        key = self._decision_key(heldout)
        steps = kept = 0
        while True:
            candidate = self._central_step(dict(state))
            steps += 1
            after = self._heldout(candidate)
            decision = policy.after_central(heldout.get(key) if key else None, after.get(key) if key else None, steps)
            self._log_decision(decision.action, decision.reason)
            if decision.action == "undo":
                break
            state, heldout, kept = candidate, after, steps
            if decision.action == "stop":
                break
        return state, kept, time.perf_counter() - started, heldout

    def _switch(
        self, candidate: State, kind: str, metrics: dict[str, float], buffers_before: Mapping[str, np.ndarray]
    ) -> tuple[State, str, dict[str, float]]:
        """Let the policy keep, revert or down-weight a candidate version (the adaptive rule)."""
        assert self._policy is not None and self._current is not None
        key = self._decision_key(metrics)
        previous = self._current.metrics.get(key) if key else None
        decision: Decision = self._policy.decide(previous, metrics.get(key) if key else None)
        self._log_decision(decision.action, decision.reason)
        metrics = {**metrics, "decision": float(ACTIONS.index(decision.action))}
        if decision.action == "publish":
            return candidate, kind, metrics
        if key is not None:
            metrics[f"candidate_{key}"] = metrics[key]
        if decision.action == "revert":
            self._optimizer.load_state_dict(buffers_before)  # the discarded step leaves no momentum behind
            # The published state is the previous one: so are its metrics, but not its decision or candidates.
            kept = {
                k: self._current.metrics[k]
                for k in metrics
                if k in self._current.metrics and "@" not in k and k != "decision" and not k.startswith("candidate_")
            }
            return self.global_state(), "reverted", {**metrics, **kept}
        mixed = {
            name: (self._global[name] + decision.mix * (candidate[name] - self._global[name])).astype(np.float32)
            for name in candidate
        }
        return mixed, "downweighted", {**metrics, **self._measure(mixed)}

    def _log_decision(self, action: str, reason: str) -> None:
        log.info("switching: %s (%s)", action, reason, extra={"event": "switching", "action": action, "reason": reason})

    # -- output ---------------------------------------------------------------------------------------
    def _manifest(self) -> Manifest:
        record = self._current
        assert record is not None
        manifest = Manifest(
            federation=self.settings.federation,
            version=record.version,
            parent=record.parent,
            sha256=record.sha256,
            size=record.size,
            model=self.settings.model,
            strategy=self.settings.strategy,
            codec=self.settings.downlink_codec,  # of the frames devices pull; sha256 and size are the stored fp32
            created_at=record.created_at,
            metrics=record.metrics,
            tensors=len(self._global),
        )
        return manifest if self._security is None else self._security.sign_manifest(manifest)

    def _publish_manifest(self) -> None:
        self._send(self.topics.manifest(), encode_message(self._manifest()), retain=True)

    def _send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            self.transport.publish(topic, payload, qos=1, retain=retain, timeout=self.settings.publish_timeout)
        except TransportError as exc:
            # The device retries (its outbox, its pull timeout); nothing durable is lost here.
            log.warning("could not publish to %s: %s", topic, exc)

    def _reject(self, device: str, update_id: str, reason: str, detail: str) -> None:
        # Built before counting: an unlisted reason is a bug (ValueError), not a rejection.
        rejection = Rejection(update_id, reason, detail[:MAX_DETAIL_CHARS]).sendable()
        self._count_rejection(reason)
        log.warning("rejected update %s from %s: %s (%s)", update_id, device, reason, detail)
        if reason not in _UNCACHED_REASONS:  # a forger must not poison the answer to the real device's id
            self._recent_rejections[update_id] = rejection
        while len(self._recent_rejections) > 4096:  # bounded: oldest first
            self._recent_rejections.pop(next(iter(self._recent_rejections)))
        self._send(self.topics.downlink_control(device), encode_message(rejection))

    def _count_rejection(self, reason: str) -> None:
        self.counters["rejected"] += 1
        self.rejections[reason] = self.rejections.get(reason, 0) + 1


#: Rejections not replayed to a resend: they depend on who signed and when, so each resend is checked anew.
_UNCACHED_REASONS = frozenset({"unknown_device", "bad_signature", "replayed", "stale_timestamp"})


def _reason(exc: FFMError) -> str:
    if isinstance(exc, ProtocolVersionError):
        return "protocol_version"
    if isinstance(exc, HashMismatchError):
        return "hash_mismatch"
    if isinstance(exc, OversizedError):
        return "oversized"
    if isinstance(exc, WrongDtypeError):
        return "wrong_dtype"
    return "malformed"


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
