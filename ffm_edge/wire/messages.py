"""Small JSON control messages between edge devices and the hub.

Each message is a frozen dataclass validated on construction; on the wire it is one JSON object with
``"v"`` (the control protocol version) and ``"type"`` next to the fields. Unknown types, unknown
fields and wrong types are refused, so a hub and a device never guess at each other's intent.

Reason codes (of :class:`Rejection`, :class:`PullError`, :class:`ArtifactError`) are the exception: they are
an open set, like HTTP status codes. Any well-formed code decodes, so a newer hub can add one without an
older device dropping its answer; ``known_reason`` tells whether this SDK knows the code, and a code it does
not know is handled as the generic failure of that kind. Senders stay strict (the hub sends known codes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Self

from ffm_edge.errors import MalformedError, OversizedError, ProtocolVersionError
from ffm_edge.wire.codec import CODECS
from ffm_edge.wire.envelope import MAX_MODEL_CHARS, MAX_SIGNATURE_CHARS, _StrictMeta
from ffm_edge.wire.limits import DEFAULT_LIMITS, WireLimits
from ffm_edge.wire.topics import (
    check_bool,
    check_choice,
    check_code,
    check_float,
    check_int,
    check_metrics,
    check_optional_int,
    check_sha256,
    check_text,
    dumps_json,
    loads_json_object,
    validate_id,
)

__all__ = [
    "ARTIFACT_ERROR_REASONS",
    "MAX_DETAIL_CHARS",
    "MESSAGE_TYPES",
    "MESSAGE_VERSION",
    "PULL_ERROR_REASONS",
    "REJECTION_REASONS",
    "ArtifactError",
    "ArtifactPending",
    "ArtifactRequest",
    "Heartbeat",
    "Hello",
    "Manifest",
    "Message",
    "PullError",
    "PullRequest",
    "Receipt",
    "Rejection",
    "decode_message",
    "encode_message",
]

MESSAGE_VERSION = 1

#: Reason codes of a :class:`Rejection` (the hub's answer to an update it refuses).
REJECTION_REASONS = frozenset(
    {
        "malformed",
        "hash_mismatch",
        "oversized",
        "wrong_federation",
        "device_mismatch",
        "unknown_tensors",
        "unknown_strategy",
        "shape_mismatch",
        "wrong_dtype",  # a tensor's dtype is not the one its codec declares
        "non_finite",
        "norm_exceeded",  # the update's L2 norm is above the hub's max_update_norm
        "stale",
        "protocol_version",
        "internal",
        # Signed updates (``--require-signatures``): see ffm_hub.signing.
        "unknown_device",  # no enrolled key for the device
        "bad_signature",  # missing, malformed or not verifying with the device's key
        "replayed",  # the update id was already accepted with a different payload
        "stale_timestamp",  # the signature's timestamp is outside the hub's tolerance
        "budget_exhausted",  # dp_fedavg: another round would spend more privacy than the hub's budget allows
    }
)

#: Reason codes of a :class:`PullError` (the hub cannot serve a requested global version).
PULL_ERROR_REASONS = frozenset({"unknown_version", "unavailable", "malformed", "internal"})

#: Reason codes of an :class:`ArtifactError` (the hub cannot serve the training artifacts a device asked for).
ARTIFACT_ERROR_REASONS = frozenset(
    {
        "disabled",  # this hub does not serve artifacts (``ffm-hub serve`` without ``--ort-artifacts``)
        "unknown_model",  # the device asked for another model than the federation trains
        "unknown_task",  # ... or another task
        "unknown_strategy",  # a strategy this federation does not accept
        "unknown_runtime",  # a runtime the hub builds no artifacts for
        "unsupported",  # the runtime cannot train this strategy or model (full_q8, a non-text model)
        "build_failed",  # building the artifacts failed on the hub
        "too_large",  # the artifacts exceed the wire's frame limit
        "internal",
    }
)

#: Longest ``detail`` text of a rejection or pull error; senders should truncate longer texts.
MAX_DETAIL_CHARS = 1024


class _Message(_StrictMeta):
    """A control message; subclasses validate in ``__post_init__``. ``to_dict`` leaves out ``v`` and ``type``."""

    type: ClassVar[str]

    @classmethod
    def _record_name(cls) -> str:
        return f"{cls.type} message"


class _Refusal(_Message):
    """A hub's "no" with a reason code. Codes are an open set on decode (a newer hub may add one) and the
    listed ones on send; the rule lives here once for :class:`Rejection`, :class:`PullError` and
    :class:`ArtifactError`."""

    #: The codes this SDK knows for this kind of refusal.
    KNOWN_REASONS: ClassVar[frozenset[str]]
    reason: str

    @property
    def known_reason(self) -> bool:
        """Whether this SDK knows ``reason`` (False: a newer hub's code, handled as the generic refusal)."""
        return self.reason in self.KNOWN_REASONS

    def sendable(self) -> Self:
        """This message, if its reason is one this SDK lists; ``ValueError`` otherwise. Devices decode any
        well-formed code, so only the sender can catch a misspelt or undocumented one."""
        if not self.known_reason:
            raise ValueError(f"the hub must not send the unknown {self.type} reason {self.reason!r}")
        return self

    def warn_if_unknown(self, logger: logging.Logger) -> None:
        """Log that a newer hub sent a code this SDK does not know (it is handled as any other)."""
        if not self.known_reason:
            logger.warning(
                "the hub's %s reason %r is not known to this SDK version (a newer hub?); handled as any other",
                self.type,
                self.reason,
            )


@dataclass(frozen=True)
class Hello(_Message):
    """Edge → hub on connect: who I am, which global version I hold, how I train."""

    type: ClassVar[str] = "hello"

    device: str
    have_version: int | None
    strategy: str
    runtime: str = "torch"

    def __post_init__(self) -> None:
        validate_id(self.device, "device id")
        check_optional_int(self.have_version, "have_version", minimum=0)
        validate_id(self.strategy, "strategy")
        validate_id(self.runtime, "runtime")


@dataclass(frozen=True)
class PullRequest(_Message):
    """Edge → hub: send global ``version`` (``-1``: the latest) as chunks tagged ``transfer_id``."""

    type: ClassVar[str] = "pull_request"
    LATEST: ClassVar[int] = -1

    device: str
    version: int
    transfer_id: str
    strategy: str | None = None  # only the tensors this strategy trains (None: every tensor)

    def __post_init__(self) -> None:
        validate_id(self.device, "device id")
        check_int(self.version, "version", minimum=self.LATEST)
        validate_id(self.transfer_id, "transfer id")
        if self.strategy is not None:
            validate_id(self.strategy, "strategy")


@dataclass(frozen=True)
class Heartbeat(_Message):
    """Edge → hub: still alive (the hub does not rely on the broker's Last Will alone)."""

    type: ClassVar[str] = "heartbeat"

    device: str
    sent_at: float

    def __post_init__(self) -> None:
        validate_id(self.device, "device id")
        object.__setattr__(self, "sent_at", check_float(self.sent_at, "sent_at", minimum=0.0))


@dataclass(frozen=True)
class Receipt(_Message):
    """Hub → edge: the update is durably accepted (the edge may now drop it from its outbox)."""

    type: ClassVar[str] = "receipt"

    update_id: str
    global_version: int
    queue_length: int
    duplicate: bool

    def __post_init__(self) -> None:
        validate_id(self.update_id, "update id")
        check_int(self.global_version, "global_version", minimum=0)
        check_int(self.queue_length, "queue_length", minimum=0)
        check_bool(self.duplicate, "duplicate")


@dataclass(frozen=True)
class Rejection(_Refusal):
    """Hub → edge: the update is refused for ``reason`` (:data:`REJECTION_REASONS`, or a newer hub's code)."""

    type: ClassVar[str] = "rejection"
    KNOWN_REASONS: ClassVar[frozenset[str]] = REJECTION_REASONS

    update_id: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        validate_id(self.update_id, "update id")
        check_code(self.reason, "rejection reason")
        check_text(self.detail, "detail", max_chars=MAX_DETAIL_CHARS, allow_empty=True)


@dataclass(frozen=True)
class Manifest(_Message):
    """Hub → all (retained) and hub → device on Hello: the latest global version, small enough to poll."""

    type: ClassVar[str] = "manifest"

    federation: str
    version: int
    parent: int | None
    sha256: str
    size: int
    model: str
    strategy: str
    codec: str
    created_at: float
    metrics: dict[str, float]
    tensors: int
    #: The hub's signature (``ed25519:1:<sig>``, see :mod:`ffm_edge.signing`); left off the wire when None
    #: so that unsigned manifests stay byte-identical to those of hubs without a key.
    signature: str | None = None
    _omit_when_none: ClassVar[tuple[str, ...]] = ("signature",)

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation id")
        check_int(self.version, "version", minimum=0)
        parent = check_optional_int(self.parent, "parent", minimum=0)
        if parent is not None and parent >= self.version:
            raise MalformedError(f"parent {parent} must be older than version {self.version}")
        check_sha256(self.sha256, "sha256")
        check_int(self.size, "size", minimum=0)
        check_text(self.model, "model", max_chars=MAX_MODEL_CHARS)
        validate_id(self.strategy, "strategy")
        check_choice(self.codec, "codec", CODECS)
        object.__setattr__(self, "created_at", check_float(self.created_at, "created_at", minimum=0.0))
        object.__setattr__(self, "metrics", check_metrics(self.metrics))
        check_int(self.tensors, "tensors", minimum=0)
        if self.signature is not None:
            check_text(self.signature, "signature", max_chars=MAX_SIGNATURE_CHARS)


@dataclass(frozen=True)
class PullError(_Refusal):
    """Hub → edge: a :class:`PullRequest` cannot be served (``reason``: :data:`PULL_ERROR_REASONS` or newer)."""

    type: ClassVar[str] = "pull_error"
    KNOWN_REASONS: ClassVar[frozenset[str]] = PULL_ERROR_REASONS

    transfer_id: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        validate_id(self.transfer_id, "transfer id")
        check_code(self.reason, "pull error reason")
        check_text(self.detail, "detail", max_chars=MAX_DETAIL_CHARS, allow_empty=True)


@dataclass(frozen=True)
class ArtifactRequest(_Message):
    """Edge → hub: send training artifacts of ``runtime`` for ``model``/``task``/``strategy`` as the chunked
    transfer ``transfer_id`` on the device's artifact downlink (a device without torch cannot build them)."""

    type: ClassVar[str] = "artifact_request"

    device: str
    transfer_id: str
    model: str
    task: str
    strategy: str
    runtime: str = "ort"

    def __post_init__(self) -> None:
        validate_id(self.device, "device id")
        validate_id(self.transfer_id, "transfer id")
        check_text(self.model, "model", max_chars=MAX_MODEL_CHARS)
        validate_id(self.task, "task")
        validate_id(self.strategy, "strategy")
        validate_id(self.runtime, "runtime")


@dataclass(frozen=True)
class ArtifactPending(_Message):
    """Hub → edge: the artifacts of ``transfer_id`` are being built; the chunks follow when they are ready.

    Tells the device to wait for a build (seconds to minutes) instead of timing out as for a lost transfer.
    """

    type: ClassVar[str] = "artifact_pending"

    transfer_id: str
    detail: str

    def __post_init__(self) -> None:
        validate_id(self.transfer_id, "transfer id")
        check_text(self.detail, "detail", max_chars=MAX_DETAIL_CHARS, allow_empty=True)


@dataclass(frozen=True)
class ArtifactError(_Refusal):
    """Hub → edge: an :class:`ArtifactRequest` cannot be served (``reason``: :data:`ARTIFACT_ERROR_REASONS` or new)."""

    type: ClassVar[str] = "artifact_error"
    KNOWN_REASONS: ClassVar[frozenset[str]] = ARTIFACT_ERROR_REASONS

    transfer_id: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        validate_id(self.transfer_id, "transfer id")
        check_code(self.reason, "artifact error reason")
        check_text(self.detail, "detail", max_chars=MAX_DETAIL_CHARS, allow_empty=True)


Message = (
    Hello
    | PullRequest
    | Heartbeat
    | Receipt
    | Rejection
    | Manifest
    | PullError
    | ArtifactRequest
    | ArtifactPending
    | ArtifactError
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (
        Hello,
        PullRequest,
        Heartbeat,
        Receipt,
        Rejection,
        Manifest,
        PullError,
        ArtifactRequest,
        ArtifactPending,
        ArtifactError,
    )
}


def encode_message(msg: Message) -> bytes:
    """One control message as compact JSON bytes with ``"v"`` and ``"type"``."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise TypeError(f"not a control message: {type(msg).__name__}")
    return dumps_json({**msg.to_dict(), "v": MESSAGE_VERSION, "type": msg.type})


def decode_message(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one control message; every failure is a typed DecodeError."""
    if len(data) > limits.max_message_bytes:
        raise OversizedError(f"control message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    obj = loads_json_object(bytes(data), "control message")
    if "v" not in obj or "type" not in obj:
        raise MalformedError("control message lacks 'v' or 'type'")
    version = check_int(obj.pop("v"), "message version")
    if version != MESSAGE_VERSION:
        raise ProtocolVersionError(f"control message version {version}; this code speaks version {MESSAGE_VERSION}")
    kind = obj.pop("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedError(f"unknown control message type {kind!r}")
    return cls.from_dict(obj)
