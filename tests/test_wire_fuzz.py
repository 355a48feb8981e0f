"""Hypothesis fuzzing: on any bytes, the wire decoders raise only ``DecodeError`` subclasses.

A decoder that crashes with ``KeyError``/``struct.error``/``RecursionError`` on hostile input would take
down the hub's receive loop, so anything but a typed error fails these tests (hypothesis re-raises it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ffm_edge.errors import DecodeError
from ffm_edge.wire import (
    CODECS,
    MESSAGE_TYPES,
    ArtifactError,
    ArtifactMeta,
    ArtifactRequest,
    ChunkAssembler,
    Completed,
    Envelope,
    GlobalMeta,
    Heartbeat,
    Manifest,
    Receipt,
    UpdateMeta,
    WireLimits,
    decode_artifacts,
    decode_global,
    decode_message,
    decode_tensors,
    decode_update,
    encode_artifacts,
    encode_global,
    encode_message,
    encode_tensors,
    encode_update,
    pack_envelope,
    parse_chunk,
    quantization_step,
    split_frame,
    unpack_envelope,
)

#: FFM_FUZZ_EXAMPLES raises the example count for a longer local run (the default keeps CI quick).
FUZZ = settings(
    max_examples=int(os.environ.get("FFM_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LIMITS = WireLimits(max_chunk_bytes=64)

_META = UpdateMeta("fed", "dev", "u1", 2, "lora", 16, "int8", 123.0, {"loss": 0.5})
_TENSORS: dict[str, np.ndarray] = {
    "a": np.linspace(-2, 2, 12).reshape(3, 4),
    "b": np.array([1.5, -0.25]),
    "c": np.array(3.0, np.float32),
}
UPDATE_FRAME = encode_update(_META, _TENSORS)
GLOBAL_FRAME = encode_global(GlobalMeta("fed", 3, 2, "org/m", "lora", "fp16", 1.0, 4), _TENSORS)
ARTIFACTS_FRAME = encode_artifacts(ArtifactMeta("fed", "org/m", "sst2", "lora", "ort", 3, "tar", 2, 1.0), b"tar" * 40)
_TOPK = np.zeros((8, 25), np.float32)
_TOPK[[0, 3, 7], [1, 24, 9]] = [0.5, -1.25, 2.0]
#: Format-2 payloads: "t" travels as values + ``t::index`` (uint32), the rest dense.
SPARSE_PAYLOADS = [encode_tensors({**_TENSORS, "t": _TOPK}, codec, sparse=True) for codec in CODECS]
PAYLOADS = [encode_tensors(_TENSORS, codec) for codec in CODECS] + SPARSE_PAYLOADS
CHUNKS = split_frame(UPDATE_FRAME[:300], chunk_size=64, transfer_id="t1", limits=LIMITS)
MESSAGE_BYTES = [
    encode_message(Receipt("u1", 3, 0, False)),
    encode_message(Heartbeat("dev", 1.0)),
    encode_message(Manifest("fed", 2, 1, "0" * 64, 10, "m", "lora", "int8", 1.0, {"acc": 0.5}, 3)),
    encode_message(ArtifactRequest("dev", "t1", "org/m", "sst2", "lora")),
    encode_message(ArtifactError("t1", "unsupported", "full_q8")),
]


def _only_decode_errors(decoder: Callable[[bytes], Any], data: bytes) -> Any:
    """Run ``decoder``; a typed DecodeError is an acceptable answer, anything else fails the test."""
    try:
        return decoder(data)
    except DecodeError:
        return None


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A valid frame with random byte flips, truncation, insertions and deletions."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("9")]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=512) | mutated([UPDATE_FRAME, GLOBAL_FRAME, ARTIFACTS_FRAME]))
def test_unpack_envelope_and_typed_decoders(data: bytes) -> None:
    envelope = _only_decode_errors(unpack_envelope, data)
    assert envelope is None or isinstance(envelope, Envelope)
    update = _only_decode_errors(decode_update, data)
    assert update is None or isinstance(update[0], UpdateMeta)
    result = _only_decode_errors(decode_global, data)
    assert result is None or isinstance(result[0], GlobalMeta)
    artifacts = _only_decode_errors(decode_artifacts, data)
    assert artifacts is None or (isinstance(artifacts[0], ArtifactMeta) and isinstance(artifacts[1], bytes))


_finite_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=8,
)


@st.composite
def artifact_meta_objects(draw: st.DrawFn) -> bytes:
    """Valid artifacts envelopes around metadata with random values in its fields."""
    meta: dict[str, Any] = ArtifactMeta("fed", "m", "sst2", "lora", "ort", 0, "tar", 1, 0.0).to_dict()
    for name in list(meta):
        if draw(st.integers(0, 2)) == 0:
            meta[name] = draw(_finite_json_values)
        elif draw(st.integers(0, 9)) == 0:
            del meta[name]
    return pack_envelope("artifacts", meta, draw(st.binary(max_size=64)))


@FUZZ
@given(artifact_meta_objects())
def test_decode_artifacts_metadata(data: bytes) -> None:
    result = _only_decode_errors(decode_artifacts, data)
    assert result is None or isinstance(result[0], ArtifactMeta)


@FUZZ
@given(st.binary(max_size=512) | mutated(PAYLOADS))
def test_decode_tensors(data: bytes) -> None:
    tensors = _only_decode_errors(decode_tensors, data)
    assert tensors is None or all(v.dtype == np.float32 for v in tensors.values())


_ITEMSIZE = {"F32": 4, "F16": 2, "I8": 1, "F64": 8, "BF16": 2, "U8": 1, "BOOL": 1, "X": 1}


def _usually(draw: st.DrawFn, good: Any, bad: st.SearchStrategy[Any]) -> Any:
    """``good`` most of the time, so that the fuzzer gets past the first check and deep into decoding."""
    return good if draw(st.integers(0, 7)) else draw(bad)


@st.composite
def safetensors_like(draw: st.DrawFn) -> bytes:
    """Payloads with plausible, mostly consistent random headers (names, dtypes, shapes, offsets)."""
    codec = _usually(draw, draw(st.sampled_from(CODECS)), st.sampled_from(["fp64", "", "INT8"]))
    version = _usually(draw, "1", st.sampled_from(["2", "", "1.0"]))
    header: dict[str, Any] = {"__metadata__": {"ffm_codec": codec, "ffm_format": version}}
    offset = 0
    for base in draw(st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True)):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        for name in [base, base + "::scale"] if codec == "int8" else [base]:
            is_scale = name.endswith("::scale")
            if is_scale:
                ones = [1] * (len(shape) - 1)
                layouts = [[shape[0], *ones], [*ones, shape[-1]]] if len(shape) >= 2 else [[1]]
                shape = _usually(draw, draw(st.sampled_from(layouts)), st.lists(st.integers(0, 4)))
            expected = "F32" if is_scale or codec == "fp32" else ("I8" if codec == "int8" else "F16")
            dtype = _usually(draw, expected, st.sampled_from(sorted(_ITEMSIZE)))
            size = _usually(draw, math.prod(shape) * _ITEMSIZE[dtype], st.integers(0, 40))
            begin = _usually(draw, offset, st.integers(0, 40))
            name = _usually(draw, name, st.sampled_from(["", "x::y", "a::scale::scale", "__metadata__"]))
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
            offset = begin + size
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    length = _usually(draw, offset, st.integers(0, offset + 4))
    return len(raw).to_bytes(8, "little") + raw + draw(st.binary(min_size=length, max_size=length))


@FUZZ
@given(safetensors_like())
def test_decode_tensors_structured(data: bytes) -> None:
    tensors = _only_decode_errors(decode_tensors, data)
    assert tensors is None or all(v.dtype == np.float32 for v in tensors.values())


@FUZZ
@given(st.binary(max_size=256), st.sampled_from(PAYLOADS))
def test_envelopes_with_valid_headers_around_fuzzed_payloads(noise: bytes, payload: bytes) -> None:
    cut = len(noise) % (len(payload) + 1)
    fuzzed = payload[:cut] + noise
    frame = pack_envelope("update", _META.to_dict(), fuzzed)
    assert _only_decode_errors(unpack_envelope, frame) is not None  # the frame itself is valid
    _only_decode_errors(decode_update, frame)


@FUZZ
@given(st.binary(max_size=256) | mutated(CHUNKS))
def test_parse_chunk(data: bytes) -> None:
    chunk = _only_decode_errors(lambda d: parse_chunk(d, limits=LIMITS), data)
    assert chunk is None or len(chunk.data) <= LIMITS.max_chunk_bytes


@FUZZ
@given(st.lists(st.sampled_from(CHUNKS) | mutated(CHUNKS) | st.binary(max_size=64), max_size=20))
def test_chunk_assembler_add(frames: list[bytes]) -> None:
    assembler = ChunkAssembler(limits=LIMITS, max_transfers=4)
    for frame in frames:
        done = _only_decode_errors(assembler.add, frame)
        assert done is None or isinstance(done, Completed)
        assert assembler.buffered_bytes <= LIMITS.max_frame_bytes
        assert assembler.pending() <= 4


@FUZZ
@given(st.permutations(CHUNKS + CHUNKS[:3]))
def test_chunk_assembler_completes_once_in_any_order(frames: list[bytes]) -> None:
    assembler = ChunkAssembler(limits=LIMITS)
    results = [assembler.add(frame) for frame in frames]
    assert [r.data for r in results if r is not None] == [UPDATE_FRAME[:300]]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def message_objects(draw: st.DrawFn) -> bytes:
    """JSON objects shaped like control messages, with random values in their fields."""
    kind = draw(st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=12))
    obj: dict[str, Any] = {"v": draw(st.sampled_from([1, 1, 1, 2, True, "1"])), "type": kind}
    cls = MESSAGE_TYPES.get(kind)
    names = list(cls.__dataclass_fields__) if cls is not None else ["device"]
    for name in names:
        if draw(st.integers(0, 9)):
            obj[name] = draw(_json_values)
    if draw(st.booleans()):
        obj[draw(st.text(max_size=8))] = draw(_json_values)
    return json.dumps(obj).encode()


@FUZZ
@given(st.binary(max_size=512) | mutated(MESSAGE_BYTES) | message_objects())
def test_decode_message(data: bytes) -> None:
    msg = _only_decode_errors(decode_message, data)
    assert msg is None or type(msg) in MESSAGE_TYPES.values()


@FUZZ
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.float16]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False, "allow_infinity": False, "min_value": -6e4, "max_value": 6e4},
    ),
    st.sampled_from(CODECS),
)
def test_codec_round_trip_property(array: np.ndarray, codec: str) -> None:
    decoded = decode_tensors(encode_tensors({"x": array}, codec))["x"]
    assert decoded.shape == array.shape and decoded.dtype == np.float32
    exact = array.astype(np.float64)
    if codec == "fp32":
        np.testing.assert_array_equal(decoded, array.astype(np.float32))
    elif codec == "fp16":
        np.testing.assert_array_equal(decoded, array.astype(np.float16).astype(np.float32))
    else:
        step = quantization_step(array).astype(np.float64)  # broadcastable against the array
        assert np.all(np.abs(decoded - exact) <= step / 2 * (1 + 1e-5) + 1e-30)
