"""The versioned binary envelope around every update and global version.

Layout: ``b"FFMU"`` | protocol version (u16 BE) | header length (u32 BE) | header JSON | payload.
The header is ``{"kind", "payload_size", "payload_sha256", "meta"}``; ``meta`` is the kind-specific
metadata (:class:`UpdateMeta`, :class:`GlobalMeta`, or :class:`ArtifactMeta` around an archive of training
artifacts). The version sits right after the magic so a peer
that speaks another version gets a precise :class:`ProtocolVersionError`, not a parse error.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

from ffm_edge.errors import (
    HashMismatchError,
    MalformedError,
    OversizedError,
    ProtocolVersionError,
    TruncatedError,
)
from ffm_edge.wire.codec import CODECS, decode_payload, encode_tensors
from ffm_edge.wire.limits import DEFAULT_LIMITS, WireLimits
from ffm_edge.wire.topics import (
    check_choice,
    check_float,
    check_int,
    check_keys,
    check_metrics,
    check_optional_int,
    check_sha256,
    check_text,
    dumps_json,
    loads_json_object,
    validate_id,
)

__all__ = [
    "ARTIFACT_FORMATS",
    "ENVELOPE_KINDS",
    "MAGIC",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "ArtifactMeta",
    "Envelope",
    "GlobalMeta",
    "UpdateMeta",
    "decode_artifacts",
    "decode_global",
    "decode_update",
    "encode_artifacts",
    "encode_global",
    "encode_update",
    "pack_envelope",
    "unpack_envelope",
]

MAGIC = b"FFMU"
PROTOCOL_VERSION = 1
ENVELOPE_KINDS = ("update", "global", "artifacts")
#: Archive formats an ``"artifacts"`` envelope may carry: an uncompressed POSIX tar (the graphs are
#: float data that barely compress, and a tar needs nothing beyond the standard library to read).
ARTIFACT_FORMATS = ("tar",)

_PREFIX = struct.Struct(">4sHI")
#: Bytes before the header JSON: magic, version, header length.
PREFIX_SIZE = _PREFIX.size

#: Longest model name in :class:`GlobalMeta` (model names may contain ``/``, so they are not ids).
MAX_MODEL_CHARS = 256
#: Longest signature string in :class:`UpdateMeta`.
MAX_SIGNATURE_CHARS = 4096


def pack_frame(magic: bytes, header: Mapping[str, Any], body: bytes, *, limits: WireLimits) -> bytes:
    """Build ``magic | version | header length | header JSON | body`` (shared with chunk frames)."""
    header_bytes = dumps_json(header)
    if len(header_bytes) > limits.max_header_bytes:
        raise ValueError(f"header of {len(header_bytes)} bytes exceeds {limits.max_header_bytes}")
    return _PREFIX.pack(magic, PROTOCOL_VERSION, len(header_bytes)) + header_bytes + body


def read_frame(
    data: bytes, *, magic: bytes, max_size: int, limits: WireLimits, what: str
) -> tuple[int, dict[str, Any], memoryview]:
    """Check a frame's prefix and header in the documented order; return version, header and body.

    The body is a view into ``data`` so that hashing a large payload does not copy it.
    """
    if len(data) > max_size:
        raise OversizedError(f"{what} of {len(data)} bytes exceeds the limit of {max_size}")
    if len(data) < PREFIX_SIZE:
        raise TruncatedError(f"{what} of {len(data)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    found_magic, version, header_len = _PREFIX.unpack_from(data)
    if found_magic != magic:
        raise MalformedError(f"{what} has magic {found_magic!r}, expected {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"{what} uses protocol version {version}; this code speaks version {PROTOCOL_VERSION}"
        )
    if header_len > limits.max_header_bytes:
        raise OversizedError(f"{what} header of {header_len} bytes exceeds {limits.max_header_bytes}")
    end = PREFIX_SIZE + header_len
    if end > len(data):
        raise TruncatedError(f"{what} header of {header_len} bytes runs past the end of the frame")
    view = memoryview(data)
    header = loads_json_object(bytes(view[PREFIX_SIZE:end]), f"{what} header")
    return version, header, view[end:]


@dataclass(frozen=True)
class Envelope:
    """A verified frame: its kind, its metadata (still untyped) and its payload."""

    kind: str
    meta: dict[str, Any]
    payload: bytes
    protocol_version: int = PROTOCOL_VERSION


def pack_envelope(kind: str, meta: Mapping[str, Any], payload: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """Frame ``payload`` with its sha256, size and ``meta`` (``ValueError`` for an unknown kind or a
    header larger than ``limits.max_header_bytes``)."""
    if kind not in ENVELOPE_KINDS:
        raise ValueError(f"unknown envelope kind {kind!r}; expected one of {ENVELOPE_KINDS}")
    header = {
        "kind": kind,
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "meta": dict(meta),
    }
    return pack_frame(MAGIC, header, payload, limits=limits)


def unpack_envelope(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS, expected_kind: str | None = None) -> Envelope:
    """Verify a frame from :func:`pack_envelope` and return it; every failure is a typed DecodeError."""
    version, header, body = read_frame(
        data, magic=MAGIC, max_size=limits.max_frame_bytes, limits=limits, what="envelope"
    )
    fields_ = check_keys(header, "envelope header", required=("kind", "payload_size", "payload_sha256", "meta"))
    kind = check_choice(fields_["kind"], "envelope kind", ENVELOPE_KINDS)
    if expected_kind is not None and kind != expected_kind:
        raise MalformedError(f"expected an envelope of kind {expected_kind!r}, got {kind!r}")
    size = check_int(fields_["payload_size"], "payload_size", minimum=0, maximum=limits.max_frame_bytes)
    digest = check_sha256(fields_["payload_sha256"], "payload_sha256")
    meta = fields_["meta"]
    if not isinstance(meta, dict):
        raise MalformedError("envelope meta must be a JSON object")
    if len(body) < size:
        raise TruncatedError(f"payload has {len(body)} bytes, header declares {size}")
    if len(body) > size:
        raise MalformedError(f"payload has {len(body) - size} bytes more than the header declares")
    if hashlib.sha256(body).hexdigest() != digest:
        raise HashMismatchError("payload sha256 does not match the envelope header")
    return Envelope(kind=kind, meta=meta, payload=bytes(body), protocol_version=version)


_M = TypeVar("_M", bound="_StrictMeta")


class _StrictMeta:
    """Shared ``to_dict``/``from_dict`` for wire records (metadata here, control messages in
    :mod:`ffm_edge.wire.messages`) that validate in ``__post_init__``."""

    _what: ClassVar[str]
    #: Optional fields left out of the JSON while None, so records without them stay byte-identical to
    #: those of peers that never had them (e.g. an unsigned manifest).
    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields (metrics copied; ``_omit_when_none`` fields left out while None)."""
        result: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self._omit_when_none:
                continue
            result[f.name] = dict(value) if isinstance(value, dict) else value
        return result

    @classmethod
    def from_dict(cls: type[_M], data: Mapping[str, Any]) -> _M:
        """Build from a JSON object: unknown or missing fields and wrong types are MalformedErrors."""
        all_fields = fields(cls)  # type: ignore[arg-type]
        required = [f.name for f in all_fields if f.default is MISSING and f.default_factory is MISSING]
        optional = [f.name for f in all_fields if f.name not in required]
        return cls(**check_keys(data, cls._record_name(), required=required, optional=optional))

    @classmethod
    def _record_name(cls) -> str:
        """What error messages call this record."""
        return cls._what

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class UpdateMeta(_StrictMeta):
    """What a device says about its update; validated on construction (``MalformedError``).

    ``signature`` carries the device's signature (``ed25519:1:<timestamp_ms>:<sig>``, written by
    :func:`ffm_edge.signing.sign_update_frame`); it is carried but not verified here (the hub verifies it
    against the device's enrolled key when it requires signatures).
    """

    _what: ClassVar[str] = "update metadata"

    federation: str
    device: str
    update_id: str
    base_version: int
    strategy: str
    num_samples: int
    codec: str
    created_at: float
    metrics: dict[str, float] = field(default_factory=dict)
    signature: str | None = None

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation id")
        validate_id(self.device, "device id")
        validate_id(self.update_id, "update id")
        check_int(self.base_version, "base_version", minimum=0)
        validate_id(self.strategy, "strategy")
        check_int(self.num_samples, "num_samples", minimum=1)
        check_choice(self.codec, "codec", CODECS)
        self._set("created_at", check_float(self.created_at, "created_at", minimum=0.0))
        self._set("metrics", check_metrics(self.metrics))
        if self.signature is not None:
            check_text(self.signature, "signature", max_chars=MAX_SIGNATURE_CHARS)


@dataclass(frozen=True)
class GlobalMeta(_StrictMeta):
    """What the hub says about a global version; validated on construction (``MalformedError``)."""

    _what: ClassVar[str] = "global metadata"

    federation: str
    version: int
    parent: int | None
    model: str
    strategy: str
    codec: str
    created_at: float
    num_updates: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: The hub's signature over this metadata and the payload sha256 (``ed25519:1:<sig>``, see
    #: :mod:`ffm_edge.signing`); left out of the header when None, so unsigned frames are unchanged.
    signature: str | None = None
    _omit_when_none: ClassVar[tuple[str, ...]] = ("signature",)

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation id")
        check_int(self.version, "version", minimum=0)
        parent = check_optional_int(self.parent, "parent", minimum=0)
        if parent is not None and parent >= self.version:
            raise MalformedError(f"parent {parent} must be older than version {self.version}")
        check_text(self.model, "model", max_chars=MAX_MODEL_CHARS)
        validate_id(self.strategy, "strategy")
        check_choice(self.codec, "codec", CODECS)
        self._set("created_at", check_float(self.created_at, "created_at", minimum=0.0))
        check_int(self.num_updates, "num_updates", minimum=0)
        self._set("metrics", check_metrics(self.metrics))
        if self.signature is not None:
            check_text(self.signature, "signature", max_chars=MAX_SIGNATURE_CHARS)


@dataclass(frozen=True)
class ArtifactMeta(_StrictMeta):
    """What the hub says about an archive of training artifacts; validated on construction (``MalformedError``).

    ``global_version`` is the global version whose trainable values the artifacts start from.
    """

    _what: ClassVar[str] = "artifact metadata"

    federation: str
    model: str
    task: str
    strategy: str
    runtime: str
    global_version: int
    archive: str
    files: int
    created_at: float

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation id")
        check_text(self.model, "model", max_chars=MAX_MODEL_CHARS)
        validate_id(self.task, "task")
        validate_id(self.strategy, "strategy")
        validate_id(self.runtime, "runtime")
        check_int(self.global_version, "global_version", minimum=0)
        check_choice(self.archive, "archive format", ARTIFACT_FORMATS)
        check_int(self.files, "files", minimum=1)
        self._set("created_at", check_float(self.created_at, "created_at", minimum=0.0))


def _decode_payload(payload: bytes, codec: str, limits: WireLimits) -> dict[str, np.ndarray]:
    found, tensors = decode_payload(payload, limits=limits)
    if found != codec:
        raise MalformedError(f"payload codec {found!r} differs from the metadata codec {codec!r}")
    return tensors


def encode_update(
    meta: UpdateMeta, tensors: Mapping[str, np.ndarray], *, limits: WireLimits = DEFAULT_LIMITS, sparse: bool = False
) -> bytes:
    """An update frame: ``tensors`` encoded with ``meta.codec`` inside an ``"update"`` envelope.

    ``sparse=True`` sends mostly-zero tensors (a top-k delta) as values and indices: a format-2 payload
    that only hubs with this SDK version or later decode (upgrade hubs before devices).
    """
    return pack_envelope("update", meta.to_dict(), encode_tensors(tensors, meta.codec, sparse=sparse), limits=limits)


def decode_update(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> tuple[UpdateMeta, dict[str, np.ndarray]]:
    """Verify and decode an update frame into its metadata and float32 tensors."""
    envelope = unpack_envelope(data, limits=limits, expected_kind="update")
    meta = UpdateMeta.from_dict(envelope.meta)
    return meta, _decode_payload(envelope.payload, meta.codec, limits)


def encode_global(meta: GlobalMeta, tensors: Mapping[str, np.ndarray], *, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """A global-version frame: ``tensors`` encoded with ``meta.codec`` inside a ``"global"`` envelope."""
    return pack_envelope("global", meta.to_dict(), encode_tensors(tensors, meta.codec), limits=limits)


def decode_global(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> tuple[GlobalMeta, dict[str, np.ndarray]]:
    """Verify and decode a global-version frame into its metadata and float32 tensors."""
    envelope = unpack_envelope(data, limits=limits, expected_kind="global")
    meta = GlobalMeta.from_dict(envelope.meta)
    return meta, _decode_payload(envelope.payload, meta.codec, limits)


def encode_artifacts(meta: ArtifactMeta, archive: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """An artifacts frame: the archive bytes (sha256 and size in the header) inside an ``"artifacts"`` envelope."""
    return pack_envelope("artifacts", meta.to_dict(), archive, limits=limits)


def decode_artifacts(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> tuple[ArtifactMeta, bytes]:
    """Verify an artifacts frame (size, sha256, metadata) and return its metadata and archive bytes."""
    envelope = unpack_envelope(data, limits=limits, expected_kind="artifacts")
    return ArtifactMeta.from_dict(envelope.meta), envelope.payload
