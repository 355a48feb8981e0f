"""``EdgeClient``: the SDK's public face for device apps.

One round is: make sure the device holds the current global version (pull it in chunks when not),
train the strategy's tensors on local data, encode the delta, keep it in the on-disk outbox, send it
in chunks, and wait for the hub's receipt. Local data never leaves the device; only the trainable
tensors' deltas do.

Lifelong learning: a device's data may keep arriving. :meth:`EdgeClient.add_data` adds examples at any time
(from any thread), ``data_stream=`` hands the client an iterator it takes one batch from before each round,
and ``max_local_examples=`` keeps only the newest examples. Each round trains on a snapshot of the local
data, and its update's ``num_samples`` is that snapshot's size.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ffm_edge.data import LabeledData, check_same_task, concat_data
from ffm_edge.errors import (
    ConfigError,
    DecodeError,
    FFMError,
    RejectedUpdateError,
    SignatureError,
    TransportError,
)
from ffm_edge.outbox import Outbox
from ffm_edge.runtime import RUNTIMES, Trainer, TrainReport, torch_available
from ffm_edge.spec import ModelSpec, load_model_spec
from ffm_edge.transport import Transport
from ffm_edge.wire import (
    CODECS,
    ChunkAssembler,
    Heartbeat,
    Hello,
    Manifest,
    PullError,
    PullRequest,
    Receipt,
    Rejection,
    Topics,
    UpdateMeta,
    decode_global,
    decode_message,
    encode_message,
    encode_update,
    split_frame,
    validate_id,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from ffm_edge.planner import Plan
    from ffm_edge.strategies import Strategy
    from ffm_edge.transport.mqtt import TlsOptions

__all__ = ["ClientStopped", "EdgeClient", "PreparedUpdate", "ProgressEvent", "RoundResult"]

log = logging.getLogger("ffm.edge")


class ClientStopped(FFMError):
    """A round was interrupted by :meth:`EdgeClient.stop`; pending updates stay in the outbox."""


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of long work, for an app's UI: ``stage`` is pull | train | upload | wait."""

    stage: str
    done: int
    total: int
    detail: str = ""


@dataclass(frozen=True)
class RoundResult:
    """What one federated round did on this device."""

    round: int
    base_version: int
    update_id: str
    num_samples: int
    train: TrainReport
    bytes_up: int
    bytes_down: int
    queue_length: int
    seconds: float


@dataclass(frozen=True)
class PreparedUpdate:
    """A trained, encoded update already in the outbox, not yet receipted (see :meth:`EdgeClient.prepare_update`)."""

    meta: UpdateMeta
    frame: bytes
    train: TrainReport
    bytes_down: int
    seconds: float


class EdgeClient:
    """Takes part in a federation with a model and local data.

    >>> client = EdgeClient("minilm-l6-v2", my_data, device_id="phone-42", broker="mqtt://hub:1883")
    >>> with client:
    ...     client.run_forever(rounds=10)

    Data that keep arriving (lifelong learning): ``client.add_data(batch)`` adds examples, from any thread,
    at any time; ``data_stream`` is an iterable of batches the client takes one from before each round
    (see :meth:`add_data` and :func:`ffm_edge.data.reveal_stream`); ``max_local_examples`` keeps only the
    newest N examples, a sliding window, so that a device's data cannot grow forever.

    Runtimes: ``runtime="torch"`` trains with PyTorch, ``runtime="ort"`` with onnxruntime-training from the
    artifacts in ``ort_artifacts`` (built by ``ffm-edge ort-build``; torch is never imported), and ``"auto"``
    (default) uses torch when it is installed, else ORT, or lets the planner choose with a memory budget.
    ``threads`` sets ORT's intra-op threads (torch's are process-wide: the app sets them). ``trainer``
    replaces all of that with the app's own :class:`~ffm_edge.runtime.Trainer` (another runtime, or plain
    arrays in a simulation); the protocol (outbox, upload, receipts, pulls, signing) stays the SDK's.
    """

    def __init__(
        self,
        model: ModelSpec | str,
        local_data: LabeledData,
        *,
        device_id: str,
        federation: str = "default",
        broker: str | None = None,
        strategy: Strategy | str = "lora",
        memory_budget: int | str | None = None,
        codec: str = "int8",
        local_epochs: int = 1,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        state_dir: str | Path | None = None,
        transport: Transport | None = None,
        chunk_size: int = 64 * 1024,
        receipt_timeout: float = 60.0,
        pull_timeout: float = 120.0,
        version_timeout: float = 600.0,
        max_send_attempts: int = 5,
        wait_for_new_version: bool = True,
        heartbeat_interval: float = 30.0,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
        discovery_timeout: float = 10.0,
        data_stream: Iterable[LabeledData | None] | None = None,
        max_local_examples: int | None = None,
        runtime: str = "auto",
        ort_artifacts: str | Path | None = None,
        threads: int | None = None,
        device_key: Ed25519PrivateKey | str | Path | None = None,
        hub_public_key: Ed25519PublicKey | str | Path | None = None,
        broker_username: str | None = None,
        broker_password: str | None = None,
        broker_tls: TlsOptions | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        try:
            validate_id(device_id, "device id")
            validate_id(federation, "federation")
        except DecodeError as exc:
            raise ConfigError(str(exc)) from exc
        if codec not in CODECS:
            raise ConfigError(f"codec must be one of {CODECS}, got {codec!r}")
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if local_epochs < 1:
            raise ConfigError(f"local_epochs must be >= 1, got {local_epochs}")
        if not isinstance(local_data, LabeledData):
            raise ConfigError(f"local_data must be a LabeledData, got {type(local_data).__name__}")
        if len(local_data) == 0:
            raise ConfigError("local_data is empty")
        if max_local_examples is not None and (
            isinstance(max_local_examples, bool) or not isinstance(max_local_examples, int) or max_local_examples < 1
        ):
            raise ConfigError(f"max_local_examples must be a positive integer or None, got {max_local_examples!r}")
        self.max_local_examples = max_local_examples
        self._data_lock = threading.Lock()  # guards _data: add_data may run while a round trains
        self._data = local_data if max_local_examples is None else local_data.tail(max_local_examples)
        self._stream: Iterator[LabeledData | None] | None = iter(data_stream) if data_stream is not None else None
        self.spec = load_model_spec(model) if isinstance(model, str) else model
        self.device_id = device_id
        self.federation = federation
        self.topics = Topics(federation)
        self.broker = broker
        self.codec = codec
        self.local_epochs = local_epochs
        self.seed = seed
        self.chunk_size = chunk_size
        self.receipt_timeout = receipt_timeout
        self.pull_timeout = pull_timeout
        self.version_timeout = version_timeout
        self.max_send_attempts = max_send_attempts
        self.wait_for_new_version = wait_for_new_version
        self.heartbeat_interval = heartbeat_interval
        self.discovery_timeout = discovery_timeout
        # Broker login (``ffm-hub broker-config``: the username is the device id); TLS also with mqtts://.
        self._broker_login = (broker_username, broker_password, broker_tls)
        self.on_progress = on_progress
        self.on_round = on_round
        root = Path(state_dir) if state_dir is not None else Path(tempfile.gettempdir()) / "ffm-edge" / device_id
        self.outbox = Outbox(root / "outbox")
        self.plan: Plan | None = None
        self.ort_artifacts = Path(ort_artifacts) if ort_artifacts is not None else None
        # Signed updates and hub signatures (ffm_edge.signing): with ``device_key`` every upload is signed;
        # with ``hub_public_key`` manifests and global frames must carry the hub's valid signature.
        self._device_key, self._hub_key = _load_keys(device_key, hub_public_key)
        self._manifest_refusal: str | None = None
        self.trainer: Trainer
        if trainer is not None:  # the app's own runtime: nothing is planned or loaded here
            self.runtime, self.trainer = "custom", trainer
        else:
            runtimes = self._usable_runtimes(runtime)
            micro_batch_size = None
            chosen = runtimes[0]
            if strategy == "auto" or memory_budget is not None:
                strategy, micro_batch_size, chosen = self._plan(strategy, memory_budget, batch_size, runtimes)
            self.runtime = chosen
            self.trainer = self._make_trainer(
                strategy, seed=seed, learning_rate=learning_rate, batch_size=batch_size,
                micro_batch_size=micro_batch_size, threads=threads,
            )  # fmt: skip
        self._transport = transport
        self._own_transport = transport is None
        self._cond = threading.Condition()
        self._manifest: Manifest | None = None
        self._results: dict[str, Receipt | Rejection] = {}
        self._pull_frames: dict[str, bytes] = {}
        self._pull_errors: dict[str, PullError] = {}
        self._assembler = ChunkAssembler()
        self._bytes_down = 0
        self._version = -1
        self._global: dict[str, np.ndarray] = {}
        self._last_base: int | None = None
        self._rounds = 0
        self._stop = threading.Event()  # set by close(): ends the heartbeat thread
        self._abort = threading.Event()  # set by stop(): ends any wait of a running round
        self._heartbeat: threading.Thread | None = None

    def _usable_runtimes(self, runtime: str) -> list[str]:
        """The runtimes this client may train with, preferred first (torch, the reference, before ORT).

        ``torch`` and ``ort`` are what the app forced; ``auto`` is torch when it is installed, and ORT when
        onnxruntime-training works here and ``ort_artifacts`` names a folder of artifacts.
        """
        from ffm_edge.ort.compat import ort_runtime_problem

        if runtime == "ort" or (runtime == "auto" and self.ort_artifacts is not None):
            problem = ort_runtime_problem()
            if runtime == "ort" and problem is not None:
                raise ConfigError(f"runtime 'ort' is not usable on this device: {problem}")
            if runtime == "ort" and self.ort_artifacts is None:
                raise ConfigError("runtime 'ort' needs ort_artifacts: a folder built by `ffm-edge ort-build`")
            ort_ok = problem is None
        else:
            ort_ok = False
        if runtime == "ort":
            return ["ort"]
        torch_ok = torch_available()
        if runtime == "torch":
            if not torch_ok:
                raise ConfigError("runtime 'torch' needs PyTorch, which is not installed here")
            return ["torch"]
        usable = ["torch"] * torch_ok + ["ort"] * ort_ok
        if not usable:
            raise ConfigError(
                "no training runtime here: install torch, or onnxruntime-training (pip install 'ffm[ort]') and "
                "pass ort_artifacts"
            )
        return usable

    def _ort_strategy(self) -> str:
        from ffm_edge.ort.manifest import load_manifest

        assert self.ort_artifacts is not None
        return load_manifest(self.ort_artifacts, verify=False).strategy

    def _make_trainer(
        self,
        strategy: Strategy | str,
        *,
        seed: int,
        learning_rate: float | None,
        batch_size: int | None,
        micro_batch_size: int | None,
        threads: int | None,
    ) -> Trainer:
        if self.runtime == "ort":
            from ffm_edge.ort.trainer import OrtTrainer

            assert self.ort_artifacts is not None
            name = strategy if isinstance(strategy, str) else strategy.name
            return OrtTrainer(
                self.ort_artifacts,
                self._data.info,
                spec=self.spec,
                strategy=None if name == "auto" else name,
                seed=seed,
                learning_rate=learning_rate,
                batch_size=batch_size,
                threads=threads,
            )
        from ffm_edge.trainer import TorchTrainer

        return TorchTrainer(
            self.spec,
            self._data.info,
            strategy,
            seed=seed,
            learning_rate=learning_rate,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
        )

    def _plan(
        self, strategy: Strategy | str, budget: int | str | None, batch_size: int | None, runtimes: list[str]
    ) -> tuple[Strategy | str, int | None, str]:
        """Let the planner pick (``"auto"``) or check (a named strategy) what fits this device's budget.

        Returns the strategy, the micro-batch size and the runtime (one of ``runtimes``).
        """
        from ffm_edge.planner import plan_training, strategy_for
        from ffm_edge.profile import probe_device

        if self.spec.memory is None:
            if strategy == "auto":
                fallback = self._ort_strategy() if runtimes == ["ort"] else "lora"
                log.warning("model %s has no memory model: using %s without planning", self.spec.name, fallback)
                return fallback, None, runtimes[0]
            return strategy, None, runtimes[0]
        profile = probe_device(budget)
        forced = None if strategy == "auto" else (strategy if isinstance(strategy, str) else strategy.name)
        self.plan = plan_training(
            self.spec,
            profile.budget_bytes,
            batch_size=batch_size or self.spec.training.batch_size,
            seq_len=self.spec.max_length,
            num_labels=self.data.info.num_labels,
            force=forced,
            available=profile.base_precisions,
            runtimes=runtimes,
            ort_strategies=(self._ort_strategy(),) if "ort" in runtimes else (),
        )  # raises InsufficientMemoryError before any weight is loaded
        choice = self.plan.choice
        assert choice is not None
        log.info("%s: %s", self.device_id, self.plan.reason)
        if choice.runtime == "ort":
            return choice.strategy, None, "ort"
        if not isinstance(strategy, str):  # the app configured the strategy itself: keep it, size the batches
            return strategy, choice.micro_batch_size, "torch"
        configured, micro = strategy_for(choice)
        return configured, micro, "torch"

    # -- local data -----------------------------------------------------------------------------------
    @property
    def data(self) -> LabeledData:
        """The local data right now (the next round trains on a snapshot of it); change it with :meth:`add_data`."""
        with self._data_lock:
            return self._data

    def add_data(self, new: LabeledData) -> int:
        """Add examples that arrived on the device; returns how many examples are local now.

        ``new`` must be the task the client trains (same task name, modality and labels; ConfigError
        otherwise). With ``max_local_examples`` only the newest that many are kept (the oldest are dropped).
        Safe to call from any thread while a round runs: a round trains on a snapshot taken when its
        training starts, so examples added during training count from the next round on (and
        ``num_samples`` of an update is always the size of the data it was trained on). The client keeps
        its own copy of ``new``'s rows.
        """
        if not isinstance(new, LabeledData):
            raise ConfigError(f"add_data takes a LabeledData, got {type(new).__name__}")
        check_same_task(self._data.info, new.info)  # info never changes: no lock needed
        with self._data_lock:
            if len(new) == 0:
                return len(self._data)
            old = self._data
            if self.max_local_examples is not None:
                keep_new = min(len(new), self.max_local_examples)
                old, new = old.tail(self.max_local_examples - keep_new), new.tail(keep_new)
            self._data = concat_data([old, new])
            return len(self._data)

    def _take_from_stream(self) -> None:
        """Add the next batch of ``data_stream`` (if any); an exhausted stream leaves the data as they are."""
        if self._stream is None:
            return
        try:
            batch = next(self._stream)
        except StopIteration:
            log.info("%s: data stream exhausted; training on the %d examples it has", self.device_id, len(self.data))
            self._stream = None
            return
        if batch is None or len(batch) == 0:
            return
        size = self.add_data(batch)
        log.info("%s: %d new examples arrived, %d local", self.device_id, len(batch), size)

    # -- connection -----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect to the broker (finding the hub with zeroconf when no broker was given) and say hello."""
        if self._transport is None:
            from ffm_edge.transport.mqtt import MqttTransport, parse_broker_url

            url = self.broker
            if url is None:
                from ffm_edge.discovery import discover_hub

                hub = discover_hub(self.federation, timeout=self.discovery_timeout)
                log.info("found hub %s at %s", hub.hub_id, hub.broker_url)
                url = hub.broker_url
            address = parse_broker_url(url)
            presence = self.topics.presence(self.device_id)
            username, password, tls = self._broker_login
            self._transport = MqttTransport(
                address.host,
                address.port,
                username=username,
                password=password,
                tls=tls if tls is not None else address.tls,
                client_id=f"ffm-edge-{self.device_id}",
                will=(presence, b"offline", True),
                online=(presence, b"online", True),
            )
        transport = self._transport
        transport.subscribe(self.topics.downlink_control(self.device_id), self._on_control)
        transport.subscribe(self.topics.downlink_global(self.device_id), self._on_global_chunk)
        transport.subscribe(self.topics.manifest(), self._on_control)
        transport.connect()
        self._say_hello()
        self._stop.clear()
        if self.heartbeat_interval > 0:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="ffm-heartbeat", daemon=True)
            self._heartbeat.start()

    def close(self) -> None:
        """Stop heartbeats and disconnect (pending updates stay in the outbox)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
        if self._transport is not None and self._own_transport:
            self._transport.close()

    def __enter__(self) -> EdgeClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_transport(self) -> Transport:
        if self._transport is None:
            raise TransportError("not connected: call connect() first")
        return self._transport

    def _say_hello(self) -> None:
        hello = Hello(self.device_id, self._version if self._version >= 0 else None, self.trainer.strategy.name)
        self._require_transport().publish(self.topics.uplink_control(self.device_id), encode_message(hello))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                beat = encode_message(Heartbeat(self.device_id, time.time()))
                self._require_transport().publish(self.topics.uplink_control(self.device_id), beat, timeout=5)
            except TransportError as exc:
                log.debug("heartbeat not sent: %s", exc)

    # -- incoming (transport thread: keep it quick) ---------------------------------------------------
    def _on_control(self, topic: str, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except DecodeError as exc:
            log.warning("ignoring an unreadable message on %s: %s", topic, exc)
            return
        with self._cond:
            if isinstance(message, Manifest) and not self._manifest_trusted(message):
                pass  # refused (logged); latest_manifest says why if no trusted one arrives
            elif isinstance(message, Manifest):
                if message.federation == self.federation and (
                    self._manifest is None or message.version > self._manifest.version
                ):
                    self._manifest = message
            elif isinstance(message, (Receipt, Rejection)):
                self._results[message.update_id] = message
            elif isinstance(message, PullError):
                self._pull_errors[message.transfer_id] = message
            self._cond.notify_all()

    def _on_global_chunk(self, topic: str, payload: bytes) -> None:
        try:
            completed = self._assembler.add(payload)
        except DecodeError as exc:
            log.warning("dropping a bad global-version chunk: %s", exc)
            return
        with self._cond:
            self._bytes_down += len(payload)
            if completed is not None:
                self._pull_frames[completed.transfer_id] = completed.data
                self._cond.notify_all()

    # -- global versions ------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The global version this device holds (-1 before the first pull)."""
        return self._version

    def latest_manifest(self, timeout: float = 30.0, *, newer_than: int | None = None) -> Manifest:
        """Wait for the hub's manifest (newer than ``newer_than`` when given).

        The retained manifest is only a shortcut: no broker is trusted to hold it, so while waiting the
        client says hello every few seconds and the hub answers with its manifest directly.
        """
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            return self._manifest is not None and (newer_than is None or self._manifest.version > newer_than)

        while True:
            remaining = deadline - time.monotonic()
            with self._cond:
                if self._wait(ready, max(0.0, min(remaining, 5.0))):
                    assert self._manifest is not None
                    return self._manifest
            if time.monotonic() >= deadline:
                what = "a manifest" if newer_than is None else f"a version newer than {newer_than}"
                if self._manifest_refusal is not None:
                    raise SignatureError(f"no trusted {what} within {timeout:.0f}s: {self._manifest_refusal}")
                raise TransportError(f"no {what} from the hub within {timeout:.0f}s")
            self._say_hello()

    def pull_global(self, version: int = -1) -> int:
        """Download a global version (``-1`` = the latest) and load it into the model."""
        transport = self._require_transport()
        for attempt in range(1, 4):
            transfer_id = "pull-" + uuid.uuid4().hex[:24]
            request = PullRequest(self.device_id, version, transfer_id, self.trainer.strategy.name)
            self._progress("pull", 0, 1, f"requesting version {version if version >= 0 else 'latest'}")
            transport.publish(self.topics.uplink_control(self.device_id), encode_message(request))
            with self._cond:
                ok = self._wait(partial(self._pull_done, transfer_id), self.pull_timeout)
                frame = self._pull_frames.pop(transfer_id, None)
                error = self._pull_errors.pop(transfer_id, None)
            if error is not None:
                error.warn_if_unknown(log)
                raise TransportError(f"hub cannot serve version {version}: {error.reason} ({error.detail})")
            if ok and frame is not None:
                return self._load_global(frame)
            log.warning("pull of version %s timed out (attempt %d), asking again", version, attempt)
            self._assembler.forget(transfer_id)
        raise TransportError(f"could not download global version {version} after 3 attempts")

    def stop(self) -> None:
        """Ask a running round to end at its next wait (safe from a signal handler or another thread)."""
        self._abort.set()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """``Condition.wait_for`` that also ends when :meth:`stop` is called (call with the lock held)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._abort.is_set():
                raise ClientStopped("the client was stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._cond.wait(min(remaining, 0.5))
        return True

    def _pull_done(self, transfer_id: str) -> bool:
        return transfer_id in self._pull_frames or transfer_id in self._pull_errors

    def _manifest_trusted(self, manifest: Manifest) -> bool:
        """With the hub's key, only a manifest it signed counts (a broker or a discovery answer is no proof)."""
        if self._hub_key is None:
            return True
        from ffm_edge.signing import verify_record

        try:
            verify_record("manifest", manifest.to_dict(), self._hub_key)
        except SignatureError as exc:
            self._manifest_refusal = str(exc)
            log.warning("%s: refusing a manifest: %s", self.device_id, exc)
            return False
        return True

    def _load_global(self, frame: bytes) -> int:
        if self._hub_key is not None:
            from ffm_edge.signing import verify_global_frame

            verify_global_frame(frame, self._hub_key)  # SignatureError: never load what the hub did not sign
        meta, state = decode_global(frame)
        if meta.federation != self.federation:
            raise TransportError(f"hub sent a version of federation {meta.federation!r}")
        # Integrity: the chunk transfer's and the envelope's sha256 were checked on the way in. The frame
        # may hold only this strategy's tensors, so it is not byte-equal to the manifest's full version.
        self.trainer.load_trainable_state(state)
        self._global = state
        self._version = meta.version
        self._progress("pull", 1, 1, f"loaded version {meta.version}")
        log.info("%s now holds global version %d", self.device_id, meta.version)
        return meta.version

    # -- updates --------------------------------------------------------------------------------------
    def send_pending(self) -> list[Receipt]:
        """Send every update left in the outbox (e.g. from before a crash) until receipted."""
        receipts = []
        for item in self.outbox.pending():
            try:
                receipts.append(self._deliver(item.update_id, self.outbox.read(item.update_id)))
            except RejectedUpdateError as exc:
                log.warning("%s", exc)
        return receipts

    def _deliver(self, update_id: str, frame: bytes) -> Receipt:
        transport = self._require_transport()
        if self._device_key is not None:
            from ffm_edge.signing import sign_update_frame

            # Signed when sent, not when trained: the timestamp must be fresh after a stay in the outbox.
            frame = sign_update_frame(frame, self._device_key)
        chunks = split_frame(frame, chunk_size=self.chunk_size, transfer_id=update_id)
        for attempt in range(1, self.max_send_attempts + 1):
            for i, chunk in enumerate(chunks, 1):
                transport.publish(self.topics.uplink_update(self.device_id), chunk)
                self._progress("upload", i, len(chunks), update_id)
            self._progress("wait", 0, 1, f"waiting for the receipt of {update_id}")
            with self._cond:
                self._wait(lambda: update_id in self._results, self.receipt_timeout)
                result = self._results.pop(update_id, None)
            if isinstance(result, Receipt):
                self.outbox.acknowledge(update_id)
                return result
            if isinstance(result, Rejection):  # permanent, whatever the reason: a resend gets the same answer
                result.warn_if_unknown(log)
                self.outbox.reject(update_id, result.reason, result.detail)
                raise RejectedUpdateError(update_id, result.reason, result.detail)
            delay = min(2.0**attempt, 30.0)
            log.warning("no receipt for %s (attempt %d), sending again in %.0fs", update_id, attempt, delay)
            if self._abort.wait(delay):
                raise ClientStopped("stopped while sending")
        raise TransportError(
            f"no receipt for update {update_id} after {self.max_send_attempts} attempts; "
            "it stays in the outbox and is sent again later"
        )

    def prepare_update(self) -> PreparedUpdate:
        """First half of a round: hold the current global version, train on it, keep the delta in the outbox.

        Split from :meth:`send_update` so an app can train while offline and send later (or a simulator
        can decide when the update arrives); the update is durable in the outbox either way.

        Once it holds the global version, the round takes the next batch of ``data_stream`` (if one was
        given and is not exhausted), then trains on a snapshot of the local data: :meth:`add_data` calls
        made during training are used from the next round on.
        """
        started = time.perf_counter()
        self.send_pending()
        down_before = self._bytes_down
        manifest = self.latest_manifest(
            self.version_timeout,
            newer_than=self._last_base if self.wait_for_new_version and self._last_base is not None else None,
        )
        if manifest.version != self._version:
            self.pull_global(manifest.version)
        base = self._version
        self._take_from_stream()
        data = self.data  # the snapshot this round trains on; add_data from now on counts next round
        self.trainer.load_trainable_state(self._global)  # every round starts from the global version
        report = self.trainer.train(
            data,
            epochs=self.local_epochs,
            seed=self.seed + self._rounds,
            progress=lambda step, total, loss: self._progress("train", step, total, f"loss {loss:.4f}"),
        )
        local = self.trainer.trainable_state()
        delta = self.trainer.strategy.finalize_update({name: local[name] - self._global[name] for name in local})
        meta = UpdateMeta(
            federation=self.federation,
            device=self.device_id,
            update_id=uuid.uuid4().hex,
            base_version=base,
            strategy=self.trainer.strategy.name,
            num_samples=len(data),
            codec=self.codec,
            created_at=time.time(),
            metrics={"train_loss": report.mean_loss, "train_seconds": report.seconds},
        )
        # A strategy that sparsifies (full_q8 top_k < 1) says so; an ORT strategy has no such attribute.
        frame = encode_update(meta, delta, sparse=bool(getattr(self.trainer.strategy, "sends_sparse", False)))
        self.outbox.put(meta.update_id, frame)
        self._last_base = base
        self._rounds += 1
        return PreparedUpdate(
            meta=meta,
            frame=frame,
            train=report,
            bytes_down=self._bytes_down - down_before,
            seconds=time.perf_counter() - started,
        )

    def send_update(self, prepared: PreparedUpdate) -> RoundResult:
        """Second half of a round: send a prepared update and wait for the hub's receipt."""
        started = time.perf_counter()
        meta = prepared.meta
        receipt = self._deliver(meta.update_id, prepared.frame)
        result = RoundResult(
            round=self._rounds,
            base_version=meta.base_version,
            update_id=meta.update_id,
            num_samples=meta.num_samples,
            train=prepared.train,
            bytes_up=sum(
                len(c) for c in split_frame(prepared.frame, chunk_size=self.chunk_size, transfer_id=meta.update_id)
            ),
            bytes_down=prepared.bytes_down,
            queue_length=receipt.queue_length,
            seconds=prepared.seconds + time.perf_counter() - started,
        )
        if self.on_round is not None:
            self.on_round(result)
        return result

    def run_round(self) -> RoundResult:
        """One federated round; returns when the hub has receipted the update."""
        return self.send_update(self.prepare_update())

    def run_forever(self, rounds: int | None = None, *, stop: threading.Event | None = None) -> list[RoundResult]:
        """Run rounds until ``rounds`` are done or :meth:`stop` is called; transient failures are retried.

        ``stop`` is an optional event that has the same effect as calling :meth:`stop`.
        """
        results: list[RoundResult] = []
        failures = 0
        watcher = None
        if stop is not None:

            def watch() -> None:
                stop.wait()
                self.stop()

            watcher = threading.Thread(target=watch, name="ffm-stop-watcher", daemon=True)
            watcher.start()
        while (rounds is None or len(results) < rounds) and not self._abort.is_set():
            try:
                results.append(self.run_round())
                failures = 0
            except ClientStopped:
                break
            except RejectedUpdateError as exc:
                log.warning("%s; training again on the next round", exc)
            except TransportError as exc:
                failures += 1
                delay = min(2.0**failures, 60.0)
                log.warning("round failed (%s); retrying in %.0fs", exc, delay)
                self._abort.wait(delay)
        return results

    def _progress(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(stage, done, total, detail))


def _load_keys(
    device_key: Ed25519PrivateKey | str | Path | None, hub_key: Ed25519PublicKey | str | Path | None
) -> tuple[Ed25519PrivateKey | None, Ed25519PublicKey | None]:
    """Keys given as objects or file paths; cryptography is imported only when signing is used."""
    if device_key is None and hub_key is None:
        return None, None
    from ffm_edge.signing import load_private_key, load_public_key

    private = load_private_key(device_key) if isinstance(device_key, str | Path) else device_key
    public = load_public_key(hub_key) if isinstance(hub_key, str | Path) else hub_key
    return private, public
