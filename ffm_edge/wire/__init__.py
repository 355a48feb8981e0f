"""The FFM wire format, shared by edge and hub: stdlib + numpy + safetensors only, never pickle.

- :mod:`~ffm_edge.wire.codec`: tensors ↔ safetensors bytes (fp32 / fp16 / per-channel int8; optionally
  sparse values + indices for mostly-zero tensors).
- :mod:`~ffm_edge.wire.envelope`: the versioned, hashed frame around updates, global versions and
  archives of training artifacts.
- :mod:`~ffm_edge.wire.chunking`: large frames as hashed chunks, reassembled with bounded memory.
- :mod:`~ffm_edge.wire.topics`: MQTT topic names and id validation.
- :mod:`~ffm_edge.wire.messages`: small JSON control messages.

Every decoder raises only :class:`ffm_edge.errors.DecodeError` subclasses on bad bytes.
"""

from __future__ import annotations

from ffm_edge.wire.chunking import (
    CHUNK_MAGIC,
    Chunk,
    ChunkAssembler,
    Completed,
    iter_chunks,
    parse_chunk,
    split_frame,
)
from ffm_edge.wire.codec import (
    CODECS,
    INDEX_SUFFIX,
    SCALE_SUFFIX,
    decode_payload,
    decode_tensors,
    encode_tensors,
    quantization_step,
)
from ffm_edge.wire.envelope import (
    ARTIFACT_FORMATS,
    ENVELOPE_KINDS,
    MAGIC,
    PROTOCOL_VERSION,
    ArtifactMeta,
    Envelope,
    GlobalMeta,
    UpdateMeta,
    decode_artifacts,
    decode_global,
    decode_update,
    encode_artifacts,
    encode_global,
    encode_update,
    pack_envelope,
    unpack_envelope,
)
from ffm_edge.wire.limits import DEFAULT_LIMITS, WireLimits
from ffm_edge.wire.messages import (
    ARTIFACT_ERROR_REASONS,
    MAX_DETAIL_CHARS,
    MESSAGE_TYPES,
    MESSAGE_VERSION,
    PULL_ERROR_REASONS,
    REJECTION_REASONS,
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
    decode_message,
    encode_message,
)
from ffm_edge.wire.topics import TOPIC_ROOT, Topics, validate_id

__all__ = [
    "ARTIFACT_ERROR_REASONS",
    "ARTIFACT_FORMATS",
    "CHUNK_MAGIC",
    "CODECS",
    "DEFAULT_LIMITS",
    "ENVELOPE_KINDS",
    "INDEX_SUFFIX",
    "MAGIC",
    "MAX_DETAIL_CHARS",
    "MESSAGE_TYPES",
    "MESSAGE_VERSION",
    "PROTOCOL_VERSION",
    "PULL_ERROR_REASONS",
    "REJECTION_REASONS",
    "SCALE_SUFFIX",
    "TOPIC_ROOT",
    "ArtifactError",
    "ArtifactMeta",
    "ArtifactPending",
    "ArtifactRequest",
    "Chunk",
    "ChunkAssembler",
    "Completed",
    "Envelope",
    "GlobalMeta",
    "Heartbeat",
    "Hello",
    "Manifest",
    "Message",
    "PullError",
    "PullRequest",
    "Receipt",
    "Rejection",
    "Topics",
    "UpdateMeta",
    "WireLimits",
    "decode_artifacts",
    "decode_global",
    "decode_message",
    "decode_payload",
    "decode_tensors",
    "decode_update",
    "encode_artifacts",
    "encode_global",
    "encode_message",
    "encode_tensors",
    "encode_update",
    "iter_chunks",
    "pack_envelope",
    "parse_chunk",
    "quantization_step",
    "split_frame",
    "unpack_envelope",
    "validate_id",
]
