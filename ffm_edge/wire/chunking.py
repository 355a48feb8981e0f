"""Chunked transfers: large frames travel as many small MQTT messages, each hashed.

Chunk frame: ``b"FFMC"`` | protocol version (u16 BE) | header length (u32 BE) | header JSON
``{transfer_id, index, count, total_size, total_sha256, chunk_sha256}`` | chunk data.

Brokers cap message sizes and QoS 1 redelivers, so the receiver must accept chunks in any order, more than
once, and must bound the memory an unfinished or hostile transfer can hold: :class:`ChunkAssembler`
does that.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ffm_edge.errors import ChunkError, ConfigError, HashMismatchError, MalformedError, OversizedError
from ffm_edge.wire.envelope import PREFIX_SIZE, pack_frame, read_frame
from ffm_edge.wire.limits import DEFAULT_LIMITS, WireLimits
from ffm_edge.wire.topics import check_int, check_keys, check_sha256, validate_id

__all__ = ["CHUNK_MAGIC", "Chunk", "ChunkAssembler", "Completed", "iter_chunks", "parse_chunk", "split_frame"]

CHUNK_MAGIC = b"FFMC"

_HEADER_FIELDS = ("transfer_id", "index", "count", "total_size", "total_sha256", "chunk_sha256")


@dataclass(frozen=True)
class Chunk:
    """One verified chunk of a transfer."""

    transfer_id: str
    index: int
    count: int
    total_size: int
    total_sha256: str
    chunk_sha256: str
    data: bytes


@dataclass(frozen=True)
class Completed:
    """A whole frame, reassembled and verified against its sha256."""

    transfer_id: str
    data: bytes


def split_frame(data: bytes, *, chunk_size: int, transfer_id: str, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes]:
    """Cut ``data`` into chunk frames of at most ``chunk_size`` data bytes (an empty frame is one chunk).

    ``ValueError`` when the transfer would break ``limits`` (receivers would reject it anyway).
    """
    return list(iter_chunks(data, chunk_size=chunk_size, transfer_id=transfer_id, limits=limits))


def iter_chunks(
    data: bytes, *, chunk_size: int, transfer_id: str, limits: WireLimits = DEFAULT_LIMITS
) -> Iterator[bytes]:
    """:func:`split_frame` one chunk frame at a time, so a large transfer is never held twice in memory.

    The arguments are checked (``ValueError``) before the first chunk is produced.
    """
    validate_id(transfer_id, "transfer id")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if chunk_size > limits.max_chunk_bytes:
        raise ValueError(f"chunk_size {chunk_size} exceeds max_chunk_bytes {limits.max_chunk_bytes}")
    if len(data) > limits.max_frame_bytes:
        raise ValueError(f"frame of {len(data)} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    count = max(1, math.ceil(len(data) / chunk_size))
    if count > limits.max_chunks:
        raise ValueError(f"{count} chunks exceed max_chunks {limits.max_chunks}; use larger chunks")
    return _chunk_frames(data, chunk_size, transfer_id, count, limits)


def _chunk_frames(data: bytes, chunk_size: int, transfer_id: str, count: int, limits: WireLimits) -> Iterator[bytes]:
    total_sha256 = hashlib.sha256(data).hexdigest()
    view = memoryview(data)
    for index in range(count):
        piece = bytes(view[index * chunk_size : (index + 1) * chunk_size])
        header = {
            "transfer_id": transfer_id,
            "index": index,
            "count": count,
            "total_size": len(data),
            "total_sha256": total_sha256,
            "chunk_sha256": hashlib.sha256(piece).hexdigest(),
        }
        yield pack_frame(CHUNK_MAGIC, header, piece, limits=limits)


def parse_chunk(frame: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> Chunk:
    """Verify one chunk frame on its own (structure, limits, chunk sha256)."""
    max_size = PREFIX_SIZE + limits.max_header_bytes + limits.max_chunk_bytes
    _, header, body = read_frame(frame, magic=CHUNK_MAGIC, max_size=max_size, limits=limits, what="chunk")
    fields_ = check_keys(header, "chunk header", required=_HEADER_FIELDS)
    transfer_id = validate_id(fields_["transfer_id"], "transfer id")
    count = check_int(fields_["count"], "chunk count", minimum=1)
    index = check_int(fields_["index"], "chunk index", minimum=0, maximum=count - 1)
    total_size = check_int(fields_["total_size"], "total_size", minimum=0)
    if count > limits.max_chunks:
        raise OversizedError(
            f"transfer of {count} chunks exceeds max_chunks {limits.max_chunks}",
            transfer_id=transfer_id,
            chunk_index=index,
        )
    if total_size > limits.max_frame_bytes:
        raise OversizedError(
            f"transfer of {total_size} bytes exceeds max_frame_bytes {limits.max_frame_bytes}",
            transfer_id=transfer_id,
            chunk_index=index,
        )
    if len(body) > limits.max_chunk_bytes:
        raise OversizedError(
            f"chunk of {len(body)} bytes exceeds max_chunk_bytes {limits.max_chunk_bytes}",
            transfer_id=transfer_id,
            chunk_index=index,
        )
    if len(body) > total_size:
        raise MalformedError(f"chunk of {len(body)} bytes is larger than its transfer ({total_size} bytes)")
    if count > max(1, total_size) or total_size > count * limits.max_chunk_bytes:
        raise MalformedError(f"{count} chunks cannot carry {total_size} bytes within the chunk limit")
    total_sha256 = check_sha256(fields_["total_sha256"], "total_sha256")
    chunk_sha256 = check_sha256(fields_["chunk_sha256"], "chunk_sha256")
    if hashlib.sha256(body).hexdigest() != chunk_sha256:
        raise HashMismatchError(f"chunk {index} of transfer {transfer_id} does not match its sha256")
    return Chunk(transfer_id, index, count, total_size, total_sha256, chunk_sha256, bytes(body))


@dataclass
class _Transfer:
    count: int
    total_size: int
    total_sha256: str
    last_seen: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    buffered: int = 0


class ChunkAssembler:
    """Reassemble chunked transfers, tolerating reordering and duplicates, with bounded memory.

    Memory: at most ``max_transfers`` unfinished transfers, together at most ``limits.max_frame_bytes``
    buffered bytes; the least recently active transfer is evicted first, and a transfer with no chunk
    for ``ttl_seconds`` expires. Completed transfer ids are remembered for ``ttl_seconds`` so that late
    QoS 1 redeliveries do not start the same transfer again.

    Not thread-safe: feed it from one thread (e.g. the MQTT client's callback thread) or lock around it.
    """

    def __init__(
        self,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        max_transfers: int = 256,
        ttl_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_transfers, bool) or not isinstance(max_transfers, int) or max_transfers < 1:
            raise ConfigError(f"max_transfers must be a positive int, got {max_transfers!r}")
        if not ttl_seconds > 0:
            raise ConfigError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
        self._limits = limits
        self._max_transfers = max_transfers
        self._ttl = float(ttl_seconds)
        self._clock = clock
        self._transfers: OrderedDict[str, _Transfer] = OrderedDict()  # least recently active first
        self._completed: OrderedDict[str, float] = OrderedDict()  # oldest completion first
        self._max_completed = max(64, 4 * max_transfers)
        self._buffered = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes currently held by unfinished transfers."""
        return self._buffered

    def pending(self) -> int:
        """Number of unfinished transfers."""
        return len(self._transfers)

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._transfers

    def missing(self, transfer_id: str) -> list[int]:
        """Indices not yet received for an unfinished transfer; ``[]`` for an unknown or finished one."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return []
        return [i for i in range(transfer.count) if i not in transfer.chunks]

    def forget(self, transfer_id: str) -> None:
        """Drop a transfer and its completion marker (the same id may then be sent again)."""
        self._drop(transfer_id)
        self._completed.pop(transfer_id, None)

    def add(self, frame: bytes) -> Completed | None:
        """Take one chunk frame; return the whole frame exactly once, when its last chunk arrives.

        Raises the errors of :func:`parse_chunk`, :class:`ChunkError` for a chunk that contradicts its
        transfer, and :class:`HashMismatchError` when the reassembled frame does not match (the transfer
        is then dropped).
        """
        chunk = parse_chunk(frame, limits=self._limits)
        now = self._clock()
        self._expire(now)
        if chunk.transfer_id in self._completed:
            return None
        transfer = self._transfers.get(chunk.transfer_id)
        if transfer is None:
            transfer = self._start(chunk, now)
        elif (transfer.count, transfer.total_size, transfer.total_sha256) != (
            chunk.count,
            chunk.total_size,
            chunk.total_sha256,
        ):
            raise ChunkError(f"chunk {chunk.index} contradicts transfer {chunk.transfer_id}")
        transfer.last_seen = now
        self._transfers.move_to_end(chunk.transfer_id)
        known = transfer.chunks.get(chunk.index)
        if known is not None:
            if known != chunk.data:
                raise ChunkError(f"chunk {chunk.index} of {chunk.transfer_id} arrived with other data")
            return None
        if transfer.buffered + len(chunk.data) > transfer.total_size:
            raise ChunkError(f"chunks of {chunk.transfer_id} exceed its declared {transfer.total_size} bytes")
        self._make_room(len(chunk.data), keep=chunk.transfer_id)
        transfer.chunks[chunk.index] = chunk.data
        transfer.buffered += len(chunk.data)
        self._buffered += len(chunk.data)
        if len(transfer.chunks) < transfer.count:
            return None
        return self._finish(chunk.transfer_id, transfer, now)

    def _start(self, chunk: Chunk, now: float) -> _Transfer:
        while len(self._transfers) >= self._max_transfers:
            self._drop(next(iter(self._transfers)))
        transfer = _Transfer(chunk.count, chunk.total_size, chunk.total_sha256, now)
        self._transfers[chunk.transfer_id] = transfer
        return transfer

    def _finish(self, transfer_id: str, transfer: _Transfer, now: float) -> Completed:
        data = b"".join(transfer.chunks[i] for i in range(transfer.count))
        self._drop(transfer_id)
        if len(data) != transfer.total_size:
            raise ChunkError(f"transfer {transfer_id} has {len(data)} bytes, declared {transfer.total_size}")
        if hashlib.sha256(data).hexdigest() != transfer.total_sha256:
            raise HashMismatchError(f"transfer {transfer_id} does not match its sha256")
        self._completed[transfer_id] = now
        while len(self._completed) > self._max_completed:
            self._completed.popitem(last=False)
        return Completed(transfer_id, data)

    def _make_room(self, size: int, *, keep: str) -> None:
        """Evict the least recently active other transfers until ``size`` more bytes fit."""
        while self._buffered + size > self._limits.max_frame_bytes:
            victim = next((t for t in self._transfers if t != keep), None)
            if victim is None:
                return
            self._drop(victim)

    def _expire(self, now: float) -> None:
        while self._transfers:
            transfer_id, transfer = next(iter(self._transfers.items()))
            if now - transfer.last_seen < self._ttl:
                break
            self._drop(transfer_id)
        while self._completed:
            transfer_id, done_at = next(iter(self._completed.items()))
            if now - done_at < self._ttl:
                break
            del self._completed[transfer_id]

    def _drop(self, transfer_id: str) -> None:
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            self._buffered -= transfer.buffered
