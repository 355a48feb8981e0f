"""Reason codes are an open set: a device on an older SDK handles a newer hub's code as the generic failure
of its kind (at once, never by timing out), while the hub itself only ever sends codes its SDK knows."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from wire_device import STATE, Device, memory_hub

from ffm_edge.client import EdgeClient, PreparedUpdate
from ffm_edge.errors import ArtifactRejectedError, DecodeError, MalformedError, RejectedUpdateError, TransportError
from ffm_edge.ort.fetch import fetch_artifacts
from ffm_edge.runtime import TrainReport
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport, Transport
from ffm_edge.wire import (
    ARTIFACT_ERROR_REASONS,
    PULL_ERROR_REASONS,
    REJECTION_REASONS,
    ArtifactError,
    ArtifactRequest,
    PullError,
    PullRequest,
    Rejection,
    Topics,
    UpdateMeta,
    decode_message,
    encode_message,
    encode_update,
    parse_chunk,
)
from ffm_hub.brokers import ManagedBroker
from ffm_hub.reliability.crash_runner import ArrayEdgeClient

FED = "fed"
DEVICE = "phone"
FUTURE = "some_future_reason"  # a code a newer hub might send; well-formed, unknown to this SDK


class ScriptedHub:
    """The hub's side of the wire for one device, scripted: every update is rejected, every pull and artifact
    request refused, each for ``reason``. Records what the device sent (one entry per send of an update)."""

    def __init__(self, transport: Transport, federation: str, device: str, reason: str) -> None:
        self.topics, self.device, self.reason = Topics(federation), device, reason
        self.sends: list[str] = []  # the update id of each send (first chunk seen), resends included
        self.requests: list[object] = []  # pull and artifact requests
        self._lock = threading.Lock()
        self.transport = transport
        transport.subscribe(self.topics.uplink_update(device), self._on_chunk)
        transport.subscribe(self.topics.uplink_control(device), self._on_control)
        transport.connect()

    def _answer(self, message: Rejection | PullError | ArtifactError) -> None:
        self.transport.publish(self.topics.downlink_control(self.device), encode_message(message))

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        chunk = parse_chunk(payload)
        with self._lock:
            if chunk.index == 0:
                self.sends.append(chunk.transfer_id)
        if chunk.index == chunk.count - 1:
            self._answer(Rejection(chunk.transfer_id, self.reason, "refused by a newer hub"))

    def _on_control(self, _topic: str, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except DecodeError:
            return
        if isinstance(message, PullRequest):
            with self._lock:
                self.requests.append(message)
            self._answer(PullError(message.transfer_id, self.reason, "cannot serve it, for a new reason"))
        elif isinstance(message, ArtifactRequest):
            with self._lock:
                self.requests.append(message)
            self._answer(ArtifactError(message.transfer_id, self.reason, "cannot build them, for a new reason"))


def _prepared(client: EdgeClient) -> PreparedUpdate:
    """An update in the client's outbox, as :meth:`EdgeClient.prepare_update` leaves it (without training)."""
    meta = UpdateMeta(client.federation, client.device_id, uuid.uuid4().hex, 0, "lora", 1, "fp32", time.time())
    frame = encode_update(meta, {name: value + 0.5 for name, value in STATE.items()})
    client.outbox.put(meta.update_id, frame)
    return PreparedUpdate(meta, frame, TrainReport(1, 1, 1, 0.0, 0.0, 0.0, 0.0), bytes_down=0, seconds=0.0)


def _warned_unknown(caplog: pytest.LogCaptureFixture, logger: str) -> bool:
    return any(
        r.levelno == logging.WARNING and r.name == logger and FUTURE in r.getMessage() and "not known" in r.getMessage()
        for r in caplog.records
    )


# -- the device side, against a real broker ----------------------------------------------------------------
def test_an_update_rejected_for_an_unknown_reason_is_set_aside_after_one_send(
    mqtt_broker: ManagedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ffm.edge")
    federation = "rc-" + uuid.uuid4().hex[:12]
    hub_transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"scripted-hub-{federation}")
    hub = ScriptedHub(hub_transport, federation, DEVICE, FUTURE)
    receipt_timeout = 15.0  # an undecodable Rejection would cost this much per attempt, then a resend
    client = ArrayEdgeClient(
        STATE,
        device_id=DEVICE,
        federation=federation,
        broker=mqtt_broker.url,
        state_dir=tmp_path / DEVICE,
        receipt_timeout=receipt_timeout,
        max_send_attempts=2,
    )
    try:
        with client:
            prepared = _prepared(client)
            started = time.monotonic()
            with pytest.raises(RejectedUpdateError) as caught:
                client.send_update(prepared)
            elapsed = time.monotonic() - started
    finally:
        hub_transport.close()
    update_id = prepared.meta.update_id
    assert caught.value.reason == FUTURE and caught.value.update_id == update_id
    assert elapsed < receipt_timeout, "the Rejection was read, not waited out"
    assert hub.sends == [update_id], "sent exactly once: a rejection is permanent, whatever its reason"
    assert client.outbox.pending() == []
    record = json.loads((tmp_path / DEVICE / "outbox" / "rejected" / f"{update_id}.json").read_text())
    assert record["reason"] == FUTURE and record["detail"] == "refused by a newer hub"
    assert _warned_unknown(caplog, "ffm.edge")


# -- the device side, in memory: pulls and artifact fetches ------------------------------------------------
def test_a_pull_error_with_an_unknown_reason_fails_the_pull_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ffm.edge")
    broker = InMemoryBroker()
    hub = ScriptedHub(InMemoryTransport(broker, "hub"), FED, DEVICE, FUTURE)
    pull_timeout = 15.0
    client = ArrayEdgeClient(
        STATE,
        device_id=DEVICE,
        federation=FED,
        transport=InMemoryTransport(broker, DEVICE),
        state_dir=tmp_path / DEVICE,
        pull_timeout=pull_timeout,
    )
    with client:
        started = time.monotonic()
        with pytest.raises(TransportError, match=f"hub cannot serve version 3: {FUTURE}"):
            client.pull_global(3)
        assert time.monotonic() - started < pull_timeout
    assert len(hub.requests) == 1, "not asked again"
    assert _warned_unknown(caplog, "ffm.edge")


def test_an_artifact_error_with_an_unknown_reason_is_a_typed_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ffm.ort.fetch")
    broker = InMemoryBroker()
    hub = ScriptedHub(InMemoryTransport(broker, "hub"), FED, DEVICE, FUTURE)
    transport = InMemoryTransport(broker, DEVICE)
    idle_timeout = 15.0
    started = time.monotonic()
    try:
        with pytest.raises(ArtifactRejectedError) as caught:
            fetch_artifacts(
                transport, tmp_path / "out", federation=FED, device_id=DEVICE, model="minilm-l6-v2", task="sst2",
                strategy="lora", idle_timeout=idle_timeout, attempts=3,
            )  # fmt: skip
    finally:
        transport.close()
    assert time.monotonic() - started < idle_timeout, "refused at once, not timed out"
    assert caught.value.reason == FUTURE and caught.value.detail == "cannot build them, for a new reason"
    assert len(hub.requests) == 1, "not asked again"
    assert not (tmp_path / "out").exists()
    assert _warned_unknown(caplog, "ffm.ort.fetch")


# -- the hub side stays strict -------------------------------------------------------------------------------
_REFUSALS: list[tuple[Callable[[str], Rejection | PullError | ArtifactError], frozenset[str], str]] = [
    (lambda reason: Rejection("u-1", reason, ""), REJECTION_REASONS, "rejection"),
    (lambda reason: PullError("t-1", reason, ""), PULL_ERROR_REASONS, "pull_error"),
    (lambda reason: ArtifactError("t-1", reason, ""), ARTIFACT_ERROR_REASONS, "artifact_error"),
]


@pytest.mark.parametrize(("build", "known", "kind"), _REFUSALS)
def test_the_hub_sends_only_reasons_its_sdk_knows(
    build: Callable[[str], Rejection | PullError | ArtifactError], known: frozenset[str], kind: str
) -> None:
    for reason in known:
        message = build(reason)
        assert message.sendable() is message and message.reason == reason
    for reason in (FUTURE, "non_finit"):  # well-formed, so a device decodes them; a hub must not send them
        with pytest.raises(ValueError, match=kind):
            build(reason).sendable()
    with pytest.raises(MalformedError):  # not even a well-formed code: cannot be built at all
        build("Stale")


def test_the_hub_refuses_to_reject_for_an_unknown_reason(tmp_path: Path) -> None:
    with memory_hub(tmp_path / "hub") as (broker, hub):
        device = Device(broker, "dev-1")
        counters, rejections = dict(hub.counters), dict(hub.rejections)
        with pytest.raises(ValueError, match=FUTURE):
            hub._reject("dev-1", "u-typo", FUTURE, "a programming error")
        assert hub.counters == counters and hub.rejections == rejections, "a bug is not counted as a rejection"
        # Its real rejections still go out, each with a code every device of this version knows.
        update_id = device.send_update({"lora_A": np.full((2, 3), np.nan, np.float32), "head": np.ones(2, np.float32)})
        rejection = device.next(Rejection)
        assert isinstance(rejection, Rejection) and rejection.update_id == update_id
        assert rejection.reason == "non_finite" and rejection.known_reason
        device.transport.close()
