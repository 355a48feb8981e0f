"""Fetch ORT training artifacts from the hub, for a device that cannot build them (it has no torch).

The device asks over its normal uplink (:class:`~ffm_edge.wire.ArtifactRequest`); the hub answers on the
device's artifact downlink with one chunked transfer (the same hashed chunks as global versions) of an
``"artifacts"`` envelope around a tar of the artifact folder. Three checks stand between the network and
the trainer: each chunk's and the whole transfer's sha256 (:class:`~ffm_edge.wire.ChunkAssembler`), the
envelope's payload sha256, and every file's sha256 in the manifest (``load_manifest(verify=True)``).

No broker is trusted to hold anything, so every wait is bounded. Until the first chunk arrives the device
repeats its request every ``ask_interval`` seconds (a hub that was not yet subscribed never saw the first;
during a build the hub answers each repeat, so a hub that died mid-build is noticed). A transfer that
stops making progress for ``idle_timeout`` (a lost chunk, a hub gone away) is asked for again under a new
transfer id, and after ``attempts`` tries the fetch fails with a :class:`TransportError` that says what
was missing. A refusal from the hub is an :class:`ArtifactRejectedError` at once (asking again would not
help). Torch-free.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ffm_edge.errors import ArtifactRejectedError, DecodeError, OrtArtifactError, TransportError
from ffm_edge.ort.archive import unpack_archive
from ffm_edge.ort.manifest import MANIFEST_NAME, ArtifactManifest, load_manifest
from ffm_edge.transport import TlsOptions, Transport
from ffm_edge.wire import (
    DEFAULT_LIMITS,
    ArtifactError,
    ArtifactMeta,
    ArtifactPending,
    ArtifactRequest,
    ChunkAssembler,
    Topics,
    WireLimits,
    decode_artifacts,
    decode_message,
    encode_message,
    parse_chunk,
)

__all__ = ["FetchProgress", "fetch_artifacts", "fetch_artifacts_from_hub", "has_artifacts"]

log = logging.getLogger("ffm.ort.fetch")


@dataclass(frozen=True)
class FetchProgress:
    """Progress of one fetch, for an app's UI: ``stage`` is request | building | receiving | verifying."""

    stage: str
    received: int
    total: int


class _Receiver:
    """Collects the answer to one transfer id (transport thread in, caller's thread out)."""

    def __init__(self, limits: WireLimits) -> None:
        self._limits = limits
        self._cond = threading.Condition()
        self._assembler = ChunkAssembler(limits=limits, max_transfers=1)
        self.transfer_id = ""
        self.frame: bytes | None = None
        self.error: ArtifactError | None = None
        self.pending = False
        self.pending_since = 0.0
        self.broken: str | None = None  # the transfer arrived whole but did not verify
        self.received = 0
        self.total = 0
        self.last_activity = time.monotonic()

    def expect(self, transfer_id: str) -> None:
        with self._cond:
            if self.transfer_id:
                self._assembler.forget(self.transfer_id)
            self.transfer_id = transfer_id
            self.frame = self.error = self.broken = None
            self.pending = False
            self.received = self.total = 0
            self.last_activity = time.monotonic()

    def on_control(self, topic: str, payload: bytes) -> None:
        try:
            message = decode_message(payload, limits=self._limits)
        except DecodeError as exc:
            log.warning("ignoring an unreadable message on %s: %s", topic, exc)
            return
        with self._cond:
            if isinstance(message, ArtifactError) and message.transfer_id == self.transfer_id:
                self.error = message
            elif isinstance(message, ArtifactPending) and message.transfer_id == self.transfer_id:
                if not self.pending:
                    self.pending, self.pending_since = True, time.monotonic()
                    log.info("the hub is building the artifacts: %s", message.detail)
            else:
                return
            self.last_activity = time.monotonic()
            self._cond.notify_all()

    def on_chunk(self, _topic: str, payload: bytes) -> None:
        try:
            chunk = parse_chunk(payload, limits=self._limits)
        except DecodeError as exc:
            log.warning("dropping a bad artifact chunk: %s", exc)
            return
        with self._cond:
            if chunk.transfer_id != self.transfer_id or self.frame is not None:
                return  # an earlier attempt's transfer, or a redelivery after completion
            try:
                completed = self._assembler.add(payload)
            except DecodeError as exc:
                self.broken = f"the transfer did not verify: {exc}"
                self._cond.notify_all()
                return
            self.received += len(chunk.data)
            self.total = chunk.total_size
            self.last_activity = time.monotonic()
            if completed is not None:
                self.frame = completed.data
            self._cond.notify_all()

    def missing(self) -> str:
        with self._cond:
            if self.received == 0:
                return "no chunk arrived" + (" after the hub said it was building" if self.pending else "")
            count = len(self._assembler.missing(self.transfer_id))
            return f"{count} chunk(s) never arrived ({self.received} of {self.total} bytes received)"


def has_artifacts(folder: str | Path) -> bool:
    """Whether ``folder`` holds anything (an empty or missing folder is where artifacts get fetched to)."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir())


def fetch_artifacts(
    transport: Transport,
    out: str | Path,
    *,
    federation: str,
    device_id: str,
    model: str,
    task: str,
    strategy: str,
    runtime: str = "ort",
    idle_timeout: float = 60.0,
    build_timeout: float = 900.0,
    ask_interval: float = 5.0,
    attempts: int = 3,
    limits: WireLimits = DEFAULT_LIMITS,
    on_progress: Callable[[FetchProgress], None] | None = None,
) -> ArtifactManifest:
    """Ask the hub for ``model``/``task``/``strategy`` artifacts and write them, verified, to ``out``.

    ``out`` is replaced as a whole once everything verified (it is the device's artifact folder, not a
    place for other files). ``transport`` is connected if it is not yet; it must not be shared with a
    running :class:`~ffm_edge.client.EdgeClient` of the same device (both would own its control
    downlink). Until the first chunk the request is repeated every ``ask_interval`` seconds; a transfer
    that makes no progress for ``idle_timeout`` seconds is asked for again under a new id; a build may
    take ``build_timeout`` while the hub keeps answering. Returns the manifest.

    Raises :class:`ArtifactRejectedError` (with the hub's ``reason``) when the hub refuses,
    :class:`TransportError` when no complete transfer arrived after ``attempts`` tries, and
    :class:`OrtArtifactError` when what arrived does not verify or is for something else.
    """
    if attempts < 1 or not idle_timeout > 0 or not build_timeout > 0 or not ask_interval > 0:
        raise ValueError("attempts must be >= 1, and the timeouts and ask_interval > 0")
    request_for = ArtifactRequest(device_id, "probe", model, task, strategy, runtime)  # validates the ids
    topics = Topics(federation)
    receiver = _Receiver(limits)
    control, downlink = topics.downlink_control(device_id), topics.downlink_artifacts(device_id)
    transport.subscribe(control, receiver.on_control)
    transport.subscribe(downlink, receiver.on_chunk)
    try:
        transport.connect()
        problem = ""
        for attempt in range(1, attempts + 1):
            transfer_id = "ort-" + uuid.uuid4().hex[:24]
            receiver.expect(transfer_id)
            request = ArtifactRequest(**{**request_for.to_dict(), "transfer_id": transfer_id})
            payload = encode_message(request)

            def ask(payload: bytes = payload) -> None:
                transport.publish(topics.uplink_control(device_id), payload)

            _report(on_progress, "request", 0, 0)
            ask()
            frame, problem = _wait(receiver, ask, idle_timeout, build_timeout, ask_interval, on_progress)
            if frame is not None:
                try:
                    meta, archive = decode_artifacts(frame, limits=limits)
                except DecodeError as exc:
                    problem = f"the artifact frame did not verify: {exc}"
                else:
                    _report(on_progress, "verifying", len(frame), len(frame))
                    return _install(meta, archive, Path(out), federation, model, task, strategy)
            log.warning("artifact fetch attempt %d of %d failed: %s", attempt, attempts, problem)
        raise TransportError(
            f"could not fetch {model}/{strategy} artifacts from the hub of federation {federation!r} "
            f"after {attempts} attempt(s): {problem}"
        )
    finally:
        transport.unsubscribe(control)
        transport.unsubscribe(downlink)


def _wait(
    receiver: _Receiver,
    ask: Callable[[], None],
    idle_timeout: float,
    build_timeout: float,
    ask_interval: float,
    on_progress: Callable[[FetchProgress], None] | None,
) -> tuple[bytes | None, str]:
    """The completed frame of the current transfer, or ``None`` and why not.

    The request is repeated (``ask``, outside the lock: publishing waits for the broker) every
    ``ask_interval`` until the first chunk arrives.
    """
    cond = receiver._cond
    last_ask = time.monotonic()
    while True:
        with cond:
            if receiver.error is not None:  # a refusal, whatever the reason: asking again would not help
                receiver.error.warn_if_unknown(log)
                raise ArtifactRejectedError(receiver.error.reason, receiver.error.detail)
            if receiver.frame is not None:
                return receiver.frame, ""
            if receiver.broken is not None:
                return None, receiver.broken
            now = time.monotonic()
            if now - receiver.last_activity >= idle_timeout:
                return None, f"no progress for {idle_timeout:.0f}s: {receiver.missing()}"
            if receiver.pending and receiver.received == 0 and now - receiver.pending_since >= build_timeout:
                return None, f"the hub's build did not finish within {build_timeout:.0f}s"
            waiting = receiver.received == 0
            stage = "receiving" if not waiting else ("building" if receiver.pending else "request")
            _report(on_progress, stage, receiver.received, receiver.total)
            if not (waiting and now - last_ask >= ask_interval):
                cond.wait(min(1.0, ask_interval))
                continue
        last_ask = time.monotonic()
        ask()


def _install(
    meta: ArtifactMeta, archive: bytes, out: Path, federation: str, model: str, task: str, strategy: str
) -> ArtifactManifest:
    """Check the metadata, unpack into a sibling folder, verify every file, then replace ``out``."""
    asked = (federation, model, task, strategy)
    got = (meta.federation, meta.model, meta.task, meta.strategy)
    if got != asked:
        raise OrtArtifactError(f"the hub sent artifacts for {got}, asked for {asked}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fetch-"))
    try:
        names = unpack_archive(archive, staging)
        if MANIFEST_NAME not in names:
            raise OrtArtifactError(f"the artifact archive has no {MANIFEST_NAME}")
        manifest = load_manifest(staging, verify=True)
        unlisted = sorted(set(names) - set(manifest.files) - {MANIFEST_NAME})
        if unlisted:
            raise OrtArtifactError(f"the artifact archive holds files its manifest does not list: {unlisted[:3]}")
        manifest.check(spec=model, strategy=strategy)
        if manifest.task != task:
            raise OrtArtifactError(f"the hub's artifacts are for task {manifest.task!r}, asked for {task!r}")
        if manifest.global_version != meta.global_version:
            raise OrtArtifactError(
                f"the artifacts' manifest says global version {manifest.global_version}, the hub {meta.global_version}"
            )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "fetched %s/%s artifacts (global version %d, %d bytes) into %s",
        model, strategy, meta.global_version, len(archive), out,
    )  # fmt: skip
    return manifest


def _report(callback: Callable[[FetchProgress], None] | None, stage: str, received: int, total: int) -> None:
    if callback is not None:
        callback(FetchProgress(stage, received, total))


def fetch_artifacts_from_hub(
    broker: str | None,
    out: str | Path,
    *,
    federation: str,
    device_id: str,
    model: str,
    task: str,
    strategy: str,
    username: str | None = None,
    password: str | None = None,
    tls: TlsOptions | None = None,
    discovery_timeout: float = 10.0,
    runtime: str = "ort",
    idle_timeout: float = 60.0,
    build_timeout: float = 900.0,
    ask_interval: float = 5.0,
    attempts: int = 3,
    limits: WireLimits = DEFAULT_LIMITS,
    on_progress: Callable[[FetchProgress], None] | None = None,
) -> ArtifactManifest:
    """:func:`fetch_artifacts` over a connection of its own to ``broker`` (``None``: find the hub with
    zeroconf), closed afterwards. Its MQTT client id differs from the device's EdgeClient's, so a fetch
    never disconnects the device's own session.

    ``username``, ``password`` and ``tls`` are the broker login, as EdgeClient's ``broker_username``,
    ``broker_password`` and ``broker_tls`` (a secured broker's ACL lets a device, logged in as itself,
    ask on its own uplink and read its own downlink); without ``tls``, an ``mqtts://`` URL means TLS
    with the system's CAs. A refused login raises :class:`~ffm_edge.errors.AuthError`.
    """
    from ffm_edge.transport.mqtt import MqttTransport, parse_broker_url

    url = broker
    if url is None:
        from ffm_edge.discovery import discover_hub

        url = discover_hub(federation, timeout=discovery_timeout).broker_url
    address = parse_broker_url(url)
    transport = MqttTransport(
        address.host,
        address.port,
        client_id=f"ffm-edge-{device_id}-fetch",
        username=username,
        password=password,
        tls=tls if tls is not None else address.tls,
    )
    try:
        return fetch_artifacts(
            transport, out, federation=federation, device_id=device_id, model=model, task=task, strategy=strategy,
            runtime=runtime, idle_timeout=idle_timeout, build_timeout=build_timeout, ask_interval=ask_interval,
            attempts=attempts, limits=limits, on_progress=on_progress,
        )  # fmt: skip
    finally:
        transport.close()
