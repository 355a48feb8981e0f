"""Size limits every decoder checks before it allocates.

Bytes from the network are untrusted: a declared length is checked against these limits before any
buffer of that length is built, so a hostile peer cannot make a hub or a device run out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ffm_edge.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "MiB", "WireLimits"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds for frames, headers, tensors, chunks and control messages (all positive ints)."""

    #: Largest whole frame (envelope, or a reassembled chunked transfer) in bytes.
    max_frame_bytes: int = 256 * MiB
    #: Largest JSON header of an envelope or chunk frame, in bytes.
    max_header_bytes: int = 64 * 1024
    #: Most tensors in one payload (int8 scales are not counted as tensors).
    max_tensors: int = 10_000
    #: Most elements summed over every stored tensor of a payload (int8 scales included); also bounds the
    #: elements a payload decodes to, sparse tensors counted at their dense size.
    max_tensor_elements: int = 200_000_000
    #: Most dense elements the sparse tensors of a payload may decode to, per byte of the payload. A dense
    #: tensor decodes to at most one element per byte; this keeps a small sparse payload from making a
    #: decoder allocate a large array (1 KiB decodes to at most 4 MiB of float32). The encoder sends a
    #: tensor dense when it is sparser than this allows (below about 1/5,000 nonzero with int8).
    max_sparse_expansion: int = 1024
    #: Largest data part of one chunk frame, in bytes (keep well under the broker's message limit).
    max_chunk_bytes: int = 4 * MiB
    #: Most chunks in one transfer.
    max_chunks: int = 65_536
    #: Largest JSON control message, in bytes.
    max_message_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"WireLimits.{field.name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = WireLimits()
