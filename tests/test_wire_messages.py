"""JSON control messages and MQTT topic names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ffm_edge.errors import MalformedError, OversizedError, ProtocolVersionError
from ffm_edge.wire import (
    ARTIFACT_ERROR_REASONS,
    MAX_DETAIL_CHARS,
    MESSAGE_TYPES,
    PULL_ERROR_REASONS,
    REJECTION_REASONS,
    TOPIC_ROOT,
    ArtifactError,
    ArtifactPending,
    ArtifactRequest,
    Heartbeat,
    Hello,
    Manifest,
    Message,
    PullError,
    PullRequest,
    Receipt,
    Rejection,
    Topics,
    WireLimits,
    decode_message,
    encode_message,
    validate_id,
)

SHA = "ab" * 32
MESSAGES: list[Message] = [
    Hello(device="dev-1", have_version=None, strategy="lora"),
    Hello(device="dev-1", have_version=7, strategy="prompt", runtime="onnxruntime"),
    PullRequest(device="dev-1", version=-1, transfer_id="pull-1"),
    PullRequest(device="dev-1", version=12, transfer_id="pull-2"),
    Heartbeat(device="dev-1", sent_at=1_700_000_000.25),
    Receipt(update_id="u1", global_version=3, queue_length=2, duplicate=False),
    Receipt(update_id="u1", global_version=3, queue_length=0, duplicate=True),
    Rejection(update_id="u1", reason="non_finite", detail="tensor 'w' has NaN"),
    Rejection(update_id="u1", reason="stale", detail=""),
    Manifest(
        federation="fed",
        version=4,
        parent=3,
        sha256=SHA,
        size=1024,
        model="org/model-name",
        strategy="lora",
        codec="fp16",
        created_at=1.5,
        metrics={"eval_loss": 0.3},
        tensors=12,
    ),
    Manifest("fed", 0, None, SHA, 0, "m", "full_q8", "int8", 0.0, {}, 0),
    PullError(transfer_id="pull-9", reason="unknown_version", detail="no version 99"),
    ArtifactRequest(device="dev-1", transfer_id="ort-1", model="org/model-name", task="sst2", strategy="lora"),
    ArtifactPending(transfer_id="ort-1", detail="building minilm-l6-v2/lora artifacts"),
    ArtifactError(transfer_id="ort-1", reason="unsupported", detail="the ORT runtime trains head, lora, prompt"),
]


def _obj(msg: Message) -> dict[str, Any]:
    return json.loads(encode_message(msg))


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    obj = json.loads(data)
    assert obj["v"] == 1 and obj["type"] == msg.type
    decoded = decode_message(data)
    assert decoded == msg and type(decoded) is type(msg)


def test_every_type_is_registered_once() -> None:
    assert set(MESSAGE_TYPES) == {
        "hello",
        "pull_request",
        "heartbeat",
        "receipt",
        "rejection",
        "manifest",
        "pull_error",
        "artifact_request",
        "artifact_pending",
        "artifact_error",
    }
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES.values())


def test_rejection_reasons_are_the_documented_set() -> None:
    assert REJECTION_REASONS == {
        "malformed",
        "hash_mismatch",
        "oversized",
        "wrong_federation",
        "device_mismatch",
        "unknown_tensors",
        "unknown_strategy",
        "shape_mismatch",
        "wrong_dtype",
        "norm_exceeded",
        "non_finite",
        "stale",
        "protocol_version",
        "internal",
        "unknown_device",
        "bad_signature",
        "replayed",
        "stale_timestamp",
        "budget_exhausted",
    }
    for reason in REJECTION_REASONS:
        assert decode_message(encode_message(Rejection("u", reason, ""))).reason == reason  # type: ignore[union-attr]
    assert "unknown_version" in PULL_ERROR_REASONS


def test_pull_request_strategy_is_optional_and_validated() -> None:
    old = decode_message(b'{"v":1,"type":"pull_request","device":"d","version":-1,"transfer_id":"t"}')
    assert isinstance(old, PullRequest) and old.strategy is None
    new = decode_message(encode_message(PullRequest("d", 3, "t", "prompt")))
    assert isinstance(new, PullRequest) and new.strategy == "prompt"
    with pytest.raises(MalformedError):
        decode_message(b'{"v":1,"type":"pull_request","device":"d","version":-1,"transfer_id":"t","strategy":"a/b"}')


def test_artifact_messages() -> None:
    request = decode_message(
        b'{"v":1,"type":"artifact_request","device":"d","transfer_id":"t","model":"m","task":"sst2","strategy":"head"}'
    )
    assert request == ArtifactRequest("d", "t", "m", "sst2", "head", "ort")  # the runtime defaults to ort
    assert ARTIFACT_ERROR_REASONS >= {"disabled", "unknown_strategy", "unsupported", "build_failed"}
    for reason in ARTIFACT_ERROR_REASONS:
        assert decode_message(encode_message(ArtifactError("t", reason, ""))).reason == reason  # type: ignore[union-attr]
    for key, bad in [("task", "a/b"), ("strategy", ""), ("runtime", "+"), ("model", ""), ("transfer_id", 1)]:
        obj = {**_obj(MESSAGES[12]), key: bad}
        with pytest.raises(MalformedError):
            decode_message(json.dumps(obj).encode())
    with pytest.raises(MalformedError):
        decode_message(json.dumps({**_obj(MESSAGES[14]), "reason": "Unknown-Version"}).encode())
    with pytest.raises(MalformedError):
        decode_message(json.dumps({**_obj(MESSAGES[13]), "detail": None}).encode())


def test_hello_defaults_to_torch() -> None:
    msg = decode_message(b'{"v":1,"type":"hello","device":"d","have_version":null,"strategy":"lora"}')
    assert msg == Hello("d", None, "lora", "torch")


def test_int_timestamps_are_accepted_as_floats() -> None:
    msg = decode_message(b'{"v":1,"type":"heartbeat","device":"d","sent_at":5}')
    assert isinstance(msg, Heartbeat) and msg.sent_at == 5.0 and isinstance(msg.sent_at, float)


def test_oversized_message() -> None:
    data = encode_message(Rejection("u", "internal", "x" * 1000))
    with pytest.raises(OversizedError):
        decode_message(data, limits=WireLimits(max_message_bytes=len(data) - 1))


@pytest.mark.parametrize("version", [2, 0, -1])
def test_other_versions_are_protocol_errors(version: int) -> None:
    obj = {**_obj(MESSAGES[0]), "v": version}
    with pytest.raises(ProtocolVersionError, match=str(version)):
        decode_message(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'"hello"',
        b"\xff\xfe",
        b'{"v": NaN, "type": "hello"}',
        b'{"v": 1, "v": 1, "type": "heartbeat", "device": "d", "sent_at": 1}',
        b'{"type": "heartbeat", "device": "d", "sent_at": 1}',
        b'{"v": 1, "device": "d", "sent_at": 1}',
        b'{"v": true, "type": "heartbeat", "device": "d", "sent_at": 1}',
        b'{"v": "1", "type": "heartbeat", "device": "d", "sent_at": 1}',
        b'{"v": 1, "type": "launch", "device": "d"}',
        b'{"v": 1, "type": ["hello"], "device": "d"}',
        b'{"v": 1, "type": "heartbeat", "device": "d", "sent_at": 1, "extra": 2}',
        b'{"v": 1, "type": "heartbeat", "device": "d"}',
        b"{" * 50_000,
    ],
)
def test_malformed_messages(data: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_message(data)


@pytest.mark.parametrize(
    ("index", "key", "bad"),
    [
        (0, "device", "a/b"),
        (0, "device", "+"),
        (0, "have_version", True),
        (0, "have_version", -1),
        (0, "have_version", 1.0),
        (0, "strategy", ""),
        (0, "runtime", "py torch"),
        (2, "version", -2),
        (2, "version", False),
        (2, "transfer_id", "#"),
        (4, "sent_at", True),
        (4, "sent_at", "now"),
        (4, "sent_at", 1e400),
        (5, "global_version", True),
        (5, "global_version", -1),
        (5, "queue_length", 1.5),
        (5, "duplicate", 1),
        (5, "duplicate", "false"),
        (5, "update_id", None),
        (7, "reason", "Bored"),
        (7, "reason", None),
        (7, "detail", 5),
        (7, "detail", "x" * (MAX_DETAIL_CHARS + 1)),
        (9, "sha256", "AB" * 32),
        (9, "sha256", "ab" * 31),
        (9, "parent", 4),
        (9, "parent", True),
        (9, "size", -1),
        (9, "codec", "fp8"),
        (9, "metrics", {"loss": None}),
        (9, "metrics", None),
        (9, "tensors", True),
        (9, "model", ""),
        (11, "reason", "non finite"),
    ],
)
def test_bad_field_values(index: int, key: str, bad: Any) -> None:
    obj = {**_obj(MESSAGES[index]), key: bad}
    with pytest.raises(MalformedError):
        decode_message(json.dumps(obj).encode())


def test_lone_surrogates_and_control_characters_are_refused() -> None:
    for detail in ("\ud800", "a\x00b", "bell\x07"):
        obj = {**_obj(MESSAGES[7]), "detail": detail}
        with pytest.raises(MalformedError, match="detail"):
            decode_message(json.dumps(obj).encode())


def test_direct_construction_validates() -> None:
    with pytest.raises(MalformedError):
        Receipt("u", 1, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        Rejection("u", "no/pe", "")


# --- reason codes: an open set ------------------------------------------------------------------------


def _with_reason(kind: type[Rejection | PullError | ArtifactError], reason: object) -> Message:
    return kind("id-1", reason, "from a newer hub")  # type: ignore[arg-type]


REASON_KINDS = [Rejection, PullError, ArtifactError]
FUTURE_CODES = ["some_future_reason", "x", "a" * 40, "quota_v2"]


@pytest.mark.parametrize("kind", REASON_KINDS)
@pytest.mark.parametrize("code", FUTURE_CODES)
def test_unknown_well_formed_reason_codes_round_trip(
    kind: type[Rejection | PullError | ArtifactError], code: str
) -> None:
    msg = _with_reason(kind, code)
    decoded = decode_message(encode_message(msg))
    assert decoded == msg and isinstance(decoded, kind)
    assert decoded.reason == code and decoded.known_reason is False


def test_known_reason_is_true_for_this_sdks_codes() -> None:
    assert all(Rejection("u", r, "").known_reason for r in REJECTION_REASONS)
    assert all(PullError("t", r, "").known_reason for r in PULL_ERROR_REASONS)
    assert all(ArtifactError("t", r, "").known_reason for r in ARTIFACT_ERROR_REASONS)


MALFORMED_CODES: list[object] = ["", "Stale", "STALE", "no such", " stale", "stale\n", "a" * 41, "9lives", "_x",
                                 "stale-ish", "ünknown", None, 7, 1.5, True, ["stale"]]  # fmt: skip


@pytest.mark.parametrize("kind", REASON_KINDS)
@pytest.mark.parametrize("bad", MALFORMED_CODES)
def test_malformed_reason_codes_are_refused(kind: type[Rejection | PullError | ArtifactError], bad: object) -> None:
    with pytest.raises(MalformedError, match="reason"):
        _with_reason(kind, bad)
    obj = {**_obj(_with_reason(kind, "internal")), "reason": bad}
    with pytest.raises(MalformedError, match="reason"):
        decode_message(json.dumps(obj).encode())


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode_message({"type": "hello"})  # type: ignore[arg-type]


# --- topics -------------------------------------------------------------------------------------------


def test_topic_names() -> None:
    topics = Topics("fed-1")
    assert TOPIC_ROOT == "ffm/v1"
    assert topics.uplink_update("dev") == "ffm/v1/fed-1/up/dev/update"
    assert topics.uplink_control("dev") == "ffm/v1/fed-1/up/dev/ctl"
    assert topics.downlink_control("dev") == "ffm/v1/fed-1/down/dev/ctl"
    assert topics.downlink_global("dev") == "ffm/v1/fed-1/down/dev/global"
    assert topics.downlink_artifacts("dev") == "ffm/v1/fed-1/down/dev/artifacts"
    assert topics.presence("dev") == "ffm/v1/fed-1/presence/dev"
    assert topics.hub_presence() == "ffm/v1/fed-1/hub/presence"
    assert topics.manifest() == "ffm/v1/fed-1/global/manifest"
    assert topics.uplink_filter() == "ffm/v1/fed-1/up/+/+"
    assert topics.presence_filter() == "ffm/v1/fed-1/presence/+"


BAD_IDS = ["", "a/b", "+", "#", "a+", "a#", "$SYS", "-x", "_x", "x" * 65, "x y", "ü", None, 1]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_topics_validate_ids(bad: Any) -> None:
    with pytest.raises(MalformedError):
        Topics(bad)
    with pytest.raises(MalformedError):
        Topics("fed").uplink_update(bad)
    with pytest.raises(MalformedError):
        Topics("fed").downlink_global(bad)
    with pytest.raises(MalformedError):
        validate_id(bad, "thing")


@pytest.mark.parametrize("good", ["a", "A1", "dev.42", "x_y-z", "9" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_id(good, "thing") == good
    assert Topics(good).presence(good).endswith("/" + good)


def test_parse_uplink_round_trips() -> None:
    topics = Topics("fed")
    assert topics.parse_uplink(topics.uplink_update("dev.1")) == ("dev.1", "update")
    assert topics.parse_uplink(topics.uplink_control("dev.1")) == ("dev.1", "ctl")
    assert topics.parse_presence(topics.presence("dev.1")) == "dev.1"


@pytest.mark.parametrize(
    "topic",
    [
        "ffm/v1/other/up/dev/update",
        "ffm/v2/fed/up/dev/update",
        "ffm/v1/fed/down/dev/ctl",
        "ffm/v1/fed/up/dev/global",
        "ffm/v1/fed/up/dev",
        "ffm/v1/fed/up/dev/update/extra",
        "ffm/v1/fed/up/+/update",
        "ffm/v1/fed/up//update",
        "ffm/v1/fed/up/a b/ctl",
        "/ffm/v1/fed/up/dev/ctl",
        "",
    ],
)
def test_parse_uplink_rejects_other_topics(topic: str) -> None:
    with pytest.raises(MalformedError):
        Topics("fed").parse_uplink(topic)


@pytest.mark.parametrize("topic", ["ffm/v1/fed/presence/+", "ffm/v1/fed/hub/presence", "ffm/v1/x/presence/d"])
def test_parse_presence_rejects_other_topics(topic: str) -> None:
    with pytest.raises(MalformedError):
        Topics("fed").parse_presence(topic)
