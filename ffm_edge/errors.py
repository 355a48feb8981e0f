"""The FFM exception tree.

Every error that crosses the public API derives from :class:`FFMError`, so an app can catch one type.
Low-level errors (``struct.error``, ``json.JSONDecodeError``, safetensors, paho) are mapped onto these
with ``raise ... from exc`` at the boundary where they happen.
"""

from __future__ import annotations

__all__ = [
    "ArtifactRejectedError",
    "AuthError",
    "BrokerError",
    "ChunkError",
    "ConfigError",
    "DataError",
    "DecodeError",
    "DiscoveryError",
    "FFMError",
    "HashMismatchError",
    "MalformedError",
    "ModelSpecError",
    "OrtArtifactError",
    "OrtUnavailableError",
    "OversizedError",
    "ProtocolVersionError",
    "RejectedUpdateError",
    "SignatureError",
    "TransportError",
    "TruncatedError",
    "WrongDtypeError",
]


class FFMError(Exception):
    """Base class of every error FFM raises on purpose."""


class ConfigError(FFMError, ValueError):
    """A configuration value is invalid (raised before any work starts)."""


class ModelSpecError(ConfigError):
    """A model spec cannot be found, parsed or resolved to a checkpoint."""


class OrtUnavailableError(ConfigError):
    """The ONNX Runtime training stack is missing or unusable here (not installed, inference-only, onnx too new)."""


class OrtArtifactError(ConfigError):
    """ONNX training artifacts are missing, damaged, or built for another model, strategy, task or tensors."""


class ArtifactRejectedError(OrtArtifactError):
    """The hub refused to serve training artifacts; ``reason`` is its machine-readable reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"the hub cannot serve ORT artifacts: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class DataError(FFMError):
    """A dataset cannot be found or parsed."""


class DecodeError(FFMError, ValueError):
    """Bytes from the network could not be decoded. Subclasses say why."""


class MalformedError(DecodeError):
    """The bytes do not follow the wire format (bad magic, bad JSON, bad fields, bad tensors)."""


class WrongDtypeError(MalformedError):
    """A tensor's dtype is not the one its codec declares (e.g. float64 in an ``fp32`` payload)."""


class TruncatedError(MalformedError):
    """The bytes end before the lengths they declare."""


class ProtocolVersionError(DecodeError):
    """The frame was written by a protocol version this code does not speak."""


class OversizedError(DecodeError):
    """The frame, header or declared payload is larger than the configured limit.

    For a chunk of a transfer that is too large, ``transfer_id`` and ``chunk_index`` say which transfer
    (its header was readable), so the hub can answer the device instead of dropping chunks silently.
    """

    def __init__(self, message: str, *, transfer_id: str | None = None, chunk_index: int | None = None) -> None:
        super().__init__(message)
        self.transfer_id = transfer_id
        self.chunk_index = chunk_index


class HashMismatchError(DecodeError):
    """A sha256 in the frame does not match its content."""


class ChunkError(DecodeError):
    """A chunk does not fit the transfer it claims to belong to."""


class TransportError(FFMError):
    """The message transport failed (connect, publish, timeout)."""


class AuthError(TransportError):
    """The broker refused this client's credentials or certificate (bad username/password, not authorized)."""


class BrokerError(TransportError):
    """A managed MQTT broker could not be started or stopped."""


class DiscoveryError(TransportError):
    """No hub was found on the local network in time."""


class SignatureError(FFMError):
    """A signature is missing, malformed or does not verify with the expected key (update, manifest, frame)."""


class RejectedUpdateError(FFMError):
    """The hub refused an update; ``reason`` is the hub's machine-readable reason code."""

    def __init__(self, update_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"update {update_id} rejected by the hub: {reason}" + (f" ({detail})" if detail else ""))
        self.update_id = update_id
        self.reason = reason
        self.detail = detail
