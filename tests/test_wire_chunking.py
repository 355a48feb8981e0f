"""Chunked transfers: splitting, per-chunk checks, and reassembly with bounded memory."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from typing import Any

import numpy as np
import pytest

from ffm_edge.errors import (
    ChunkError,
    ConfigError,
    DecodeError,
    HashMismatchError,
    MalformedError,
    OversizedError,
    ProtocolVersionError,
    TruncatedError,
)
from ffm_edge.wire import (
    CHUNK_MAGIC,
    PROTOCOL_VERSION,
    ChunkAssembler,
    Completed,
    UpdateMeta,
    WireLimits,
    decode_update,
    encode_update,
    parse_chunk,
    split_frame,
)


class FakeClock:
    """A settable clock so that TTL behaviour is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _chunk_frame(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return CHUNK_MAGIC + struct.pack(">HI", PROTOCOL_VERSION, len(raw)) + raw + data


def _chunk_header(data: bytes, **overrides: Any) -> dict[str, Any]:
    header = {
        "transfer_id": "t1",
        "index": 0,
        "count": 1,
        "total_size": len(data),
        "total_sha256": hashlib.sha256(data).hexdigest(),
        "chunk_sha256": hashlib.sha256(data).hexdigest(),
    }
    header.update(overrides)
    return header


def test_split_and_reassemble_shuffled_with_duplicates() -> None:
    data = _payload(10_000)
    frames = split_frame(data, chunk_size=333, transfer_id="t1")
    assert len(frames) == 31
    deliveries = frames + random.Random(1).sample(frames, 10)
    random.Random(2).shuffle(deliveries)
    assembler = ChunkAssembler()
    results = [assembler.add(frame) for frame in deliveries]
    completed = [r for r in results if r is not None]
    assert completed == [Completed("t1", data)]
    assert assembler.pending() == 0
    assert assembler.buffered_bytes == 0
    assert all(assembler.add(frame) is None for frame in frames)  # late redeliveries
    assert assembler.pending() == 0


def test_chunks_carry_an_update_end_to_end() -> None:
    meta = UpdateMeta("fed", "dev", "u1", 0, "full_q8", 10, "int8", 1.0)
    frame = encode_update(meta, {"w": np.linspace(-1, 1, 5000).reshape(50, 100)})
    assembler = ChunkAssembler()
    results = [assembler.add(c) for c in reversed(split_frame(frame, chunk_size=1024, transfer_id="u1"))]
    done = results[-1]
    assert done is not None and all(r is None for r in results[:-1])
    decoded_meta, tensors = decode_update(done.data)
    assert decoded_meta == meta and tensors["w"].shape == (50, 100)


def test_parse_chunk_reports_header_fields() -> None:
    data = _payload(250)
    frames = split_frame(data, chunk_size=100, transfer_id="abc")
    chunks = [parse_chunk(f) for f in frames]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert {c.count for c in chunks} == {3}
    assert {c.total_size for c in chunks} == {250}
    assert {c.total_sha256 for c in chunks} == {hashlib.sha256(data).hexdigest()}
    assert b"".join(c.data for c in chunks) == data
    assert [len(c.data) for c in chunks] == [100, 100, 50]
    assert all(c.chunk_sha256 == hashlib.sha256(c.data).hexdigest() for c in chunks)


@pytest.mark.parametrize(("size", "chunk_size", "count"), [(0, 10, 1), (1, 10, 1), (30, 10, 3), (31, 10, 4)])
def test_chunk_counts(size: int, chunk_size: int, count: int) -> None:
    data = _payload(size)
    frames = split_frame(data, chunk_size=chunk_size, transfer_id="t")
    assert len(frames) == count
    assembler = ChunkAssembler()
    results = [assembler.add(f) for f in frames]
    assert results[-1] == Completed("t", data)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": 0, "transfer_id": "t"},
        {"chunk_size": True, "transfer_id": "t"},
        {"chunk_size": 5 * 1024 * 1024, "transfer_id": "t"},
        {"chunk_size": 10, "transfer_id": "a/b"},
        {"chunk_size": 10, "transfer_id": ""},
        {"chunk_size": 1, "transfer_id": "t", "limits": WireLimits(max_chunks=99)},
        {"chunk_size": 10, "transfer_id": "t", "limits": WireLimits(max_frame_bytes=99)},
    ],
)
def test_split_frame_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        split_frame(_payload(100), **kwargs)


def test_bad_magic_and_version() -> None:
    frame = split_frame(b"abc", chunk_size=10, transfer_id="t")[0]
    with pytest.raises(MalformedError, match="magic"):
        parse_chunk(b"FFMU" + frame[4:])
    with pytest.raises(ProtocolVersionError):
        parse_chunk(frame[:4] + struct.pack(">H", 9) + frame[6:])


def test_every_truncation_is_a_typed_error() -> None:
    frame = split_frame(b"some chunk data", chunk_size=100, transfer_id="t")[0]
    (header_len,) = struct.unpack(">I", frame[6:10])
    for length in range(len(frame)):
        expected = TruncatedError if length < 10 + header_len else HashMismatchError
        with pytest.raises(expected):
            parse_chunk(frame[:length])


def test_flipped_data_byte_is_a_hash_mismatch() -> None:
    frame = bytearray(split_frame(b"some chunk data", chunk_size=100, transfer_id="t")[0])
    frame[-1] ^= 0x40
    with pytest.raises(HashMismatchError):
        parse_chunk(bytes(frame))


def test_oversized_chunks_and_transfers() -> None:
    data = _payload(200)
    limits = WireLimits(max_chunk_bytes=100)
    with pytest.raises(OversizedError):
        parse_chunk(_chunk_frame(_chunk_header(data, count=2), data), limits=limits)
    small = _payload(10)
    with pytest.raises(OversizedError):
        parse_chunk(_chunk_frame(_chunk_header(small, count=70_000, total_size=10**6), small))
    with pytest.raises(OversizedError) as caught:
        parse_chunk(_chunk_frame(_chunk_header(small, total_size=300 * 1024 * 1024, count=100), small))
    # The header was readable: the error names the transfer, so the hub can answer the device.
    assert caught.value.chunk_index == 0 and caught.value.transfer_id is not None
    with pytest.raises(OversizedError) as caught:
        parse_chunk(b"\0" * (10 + 64 * 1024 + 4 * 1024 * 1024 + 1))
    assert caught.value.transfer_id is None  # nothing was read: nobody to answer
    declared = CHUNK_MAGIC + struct.pack(">HI", PROTOCOL_VERSION, 64 * 1024 + 1)
    with pytest.raises(OversizedError):
        parse_chunk(declared)


@pytest.mark.parametrize(
    "overrides",
    [
        {"index": 1},
        {"index": -1},
        {"index": True},
        {"count": 0},
        {"count": True},
        {"total_size": 5},
        {"total_size": "10"},
        {"transfer_id": "a/b"},
        {"transfer_id": 5},
        {"total_sha256": "xyz"},
        {"chunk_sha256": None},
        {"extra": 1},
    ],
)
def test_bad_chunk_headers_are_malformed(overrides: dict[str, Any]) -> None:
    small = _payload(10)
    with pytest.raises(MalformedError):
        parse_chunk(_chunk_frame(_chunk_header(small, **overrides), small))


def test_impossible_chunk_counts_are_malformed() -> None:
    data = _payload(3)
    with pytest.raises(MalformedError, match="cannot carry"):
        parse_chunk(_chunk_frame(_chunk_header(data, count=4), data))  # more chunks than bytes
    limits = WireLimits(max_chunk_bytes=10)
    with pytest.raises(MalformedError, match="cannot carry"):  # two 10-byte chunks cannot carry 21 bytes
        parse_chunk(_chunk_frame(_chunk_header(data, count=2, total_size=21), data), limits=limits)


def test_conflicting_chunks_raise_chunk_error() -> None:
    first = split_frame(_payload(300, seed=1), chunk_size=100, transfer_id="t")
    other_data = split_frame(_payload(300, seed=2), chunk_size=100, transfer_id="t")
    other_count = split_frame(_payload(300, seed=1), chunk_size=60, transfer_id="t")
    assembler = ChunkAssembler()
    assert assembler.add(first[0]) is None
    with pytest.raises(ChunkError):
        assembler.add(other_data[1])
    with pytest.raises(ChunkError):
        assembler.add(other_count[1])
    assert assembler.missing("t") == [1, 2]
    assert assembler.add(first[1]) is None
    done = assembler.add(first[2])
    assert done is not None and done.data == _payload(300, seed=1)


def test_same_index_with_other_data_is_a_chunk_error() -> None:
    data = _payload(20)
    total = hashlib.sha256(data).hexdigest()

    def piece(index: int, content: bytes) -> bytes:
        header = _chunk_header(content, index=index, count=2, total_size=20, total_sha256=total)
        return _chunk_frame(header, content)

    assembler = ChunkAssembler()
    assembler.add(piece(0, data[:10]))
    with pytest.raises(ChunkError):
        assembler.add(piece(0, data[10:]))
    with pytest.raises(ChunkError, match="exceed"):
        assembler.add(piece(1, data[:10] + b"x"))
    assert assembler.add(piece(1, data[10:])) == Completed("t1", data)


def test_whole_hash_mismatch_drops_the_transfer() -> None:
    data = _payload(20)
    wrong_total = hashlib.sha256(b"something else").hexdigest()
    frames = [
        _chunk_frame(
            _chunk_header(data[i : i + 10], index=i // 10, count=2, total_size=20, total_sha256=wrong_total),
            data[i : i + 10],
        )
        for i in (0, 10)
    ]
    assembler = ChunkAssembler()
    assert assembler.add(frames[0]) is None
    with pytest.raises(HashMismatchError):
        assembler.add(frames[1])
    assert assembler.pending() == 0 and assembler.buffered_bytes == 0
    assert assembler.add(frames[0]) is None  # not marked completed: a fresh attempt starts
    assert assembler.pending() == 1


def test_eviction_of_least_recently_active_transfers() -> None:
    transfers = {
        tid: split_frame(_payload(30, seed=i), chunk_size=10, transfer_id=tid) for i, tid in enumerate(["a", "b", "c"])
    }
    assembler = ChunkAssembler(max_transfers=2)
    assembler.add(transfers["a"][0])
    assembler.add(transfers["b"][0])
    assembler.add(transfers["a"][1])  # "a" is now more recent than "b"
    assembler.add(transfers["c"][0])  # evicts "b"
    assert assembler.pending() == 2
    assert "b" not in assembler and "a" in assembler and "c" in assembler
    assert assembler.missing("b") == []
    assert assembler.add(transfers["b"][1]) is None  # starts over, evicting "a"
    assert "a" not in assembler
    assert assembler.missing("b") == [0, 2]


def test_buffered_bytes_stay_within_the_frame_limit() -> None:
    limits = WireLimits(max_frame_bytes=1000, max_chunk_bytes=100)
    assembler = ChunkAssembler(limits=limits)
    first = split_frame(_payload(800, seed=1), chunk_size=100, transfer_id="first", limits=limits)
    second = split_frame(_payload(800, seed=2), chunk_size=100, transfer_id="second", limits=limits)
    for frame in first[:7]:
        assembler.add(frame)
    assert assembler.buffered_bytes == 700
    for frame in second[:7]:
        assembler.add(frame)
        assert assembler.buffered_bytes <= 1000
    assert "first" not in assembler and assembler.buffered_bytes == 700
    results = [assembler.add(frame) for frame in second[7:]]
    assert results[-1] == Completed("second", _payload(800, seed=2))


def test_ttl_expires_stale_transfers_and_completion_markers() -> None:
    clock = FakeClock()
    assembler = ChunkAssembler(ttl_seconds=60, clock=clock)
    slow = split_frame(_payload(30), chunk_size=10, transfer_id="slow")
    fast = split_frame(_payload(5), chunk_size=10, transfer_id="fast")
    assembler.add(slow[0])
    clock.now += 50
    assembler.add(slow[1])  # activity keeps it alive
    clock.now += 50
    assert assembler.add(fast[0]) == Completed("fast", _payload(5))
    assert assembler.missing("slow") == [2]
    clock.now += 59
    assert assembler.add(fast[0]) is None  # completed 59 s ago: still remembered
    assert "slow" not in assembler and assembler.pending() == 0  # idle for 109 s: expired
    clock.now += 2
    assert assembler.add(fast[0]) == Completed("fast", _payload(5))  # marker expired: a new transfer


def test_forget_drops_transfer_and_completion_marker() -> None:
    frames = split_frame(_payload(25), chunk_size=10, transfer_id="t")
    assembler = ChunkAssembler()
    assembler.add(frames[0])
    assembler.forget("t")
    assert assembler.pending() == 0 and assembler.buffered_bytes == 0
    results = [assembler.add(f) for f in frames]
    assert results[-1] is not None
    assembler.forget("t")
    assert [assembler.add(f) for f in frames][-1] == Completed("t", _payload(25))
    assembler.forget("unknown")
    assert assembler.pending() == 0


def test_completed_markers_are_bounded() -> None:
    assembler = ChunkAssembler(max_transfers=1)
    for i in range(200):
        assert assembler.add(split_frame(b"x", chunk_size=1, transfer_id=f"t{i}")[0]) is not None
    assert assembler.add(split_frame(b"x", chunk_size=1, transfer_id="t199")[0]) is None
    assert assembler.add(split_frame(b"x", chunk_size=1, transfer_id="t0")[0]) is not None


@pytest.mark.parametrize(
    "kwargs", [{"max_transfers": 0}, {"max_transfers": True}, {"ttl_seconds": 0}, {"ttl_seconds": float("nan")}]
)
def test_assembler_config_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ChunkAssembler(**kwargs)


def test_assembler_passes_parse_errors_through() -> None:
    assembler = ChunkAssembler()
    for junk in (b"", b"FFMC", b"garbage garbage garbage"):
        with pytest.raises(DecodeError):
            assembler.add(junk)
    assert assembler.pending() == 0
