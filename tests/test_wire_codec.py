"""Tensor payload codec: round trips, error bounds, and typed rejection of bad payloads."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from ffm_edge.errors import (
    ConfigError,
    DecodeError,
    MalformedError,
    OversizedError,
    ProtocolVersionError,
    TruncatedError,
)
from ffm_edge.wire import (
    CODECS,
    DEFAULT_LIMITS,
    SCALE_SUFFIX,
    WireLimits,
    decode_payload,
    decode_tensors,
    encode_tensors,
    quantization_step,
)

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3), (0,), (0, 5), (3, 0)]
DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8]
META = {"ffm_codec": "fp32", "ffm_format": "1"}


def _sample(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        low = 0 if np.issubdtype(dtype, np.unsignedinteger) else -100
        return rng.integers(low, 100, size=shape).astype(dtype)
    return (rng.normal(size=shape) * 3).astype(dtype)


def _raw(header: dict[str, Any], data: bytes = b"") -> bytes:
    """A safetensors payload with an arbitrary header (to build what the encoder never writes)."""
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def _stored(payload: bytes) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(payload)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_codec_dtype_and_shape(codec: str, dtype: Any, shape: tuple[int, ...]) -> None:
    original = _sample(shape, dtype)
    decoded = decode_tensors(encode_tensors({"w": original}, codec))
    assert list(decoded) == ["w"]
    out = decoded["w"]
    assert out.dtype == np.float32
    assert out.shape == shape
    assert out.flags.writeable
    exact = original.astype(np.float64)
    if codec == "fp32":
        np.testing.assert_array_equal(out, original.astype(np.float32))
    elif codec == "fp16":
        np.testing.assert_array_equal(out, original.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(out, exact, rtol=2**-10, atol=0)
    else:
        steps = quantization_step(original)  # broadcastable against the tensor
        bound = steps.astype(np.float64) / 2 * (1 + 1e-5)
        error = np.abs(out.astype(np.float64) - exact)
        assert np.all(error <= bound)


@pytest.mark.parametrize(
    ("shape", "scale_shape"),
    [
        ((384, 8), (1, 8)),  # LoRA lora_B: 8 column scales, not 384 row scales
        ((8, 384), (8, 1)),  # LoRA lora_A: 8 row scales
        ((10, 10), (10, 1)),  # tie: axis 0
        ((1, 1), (1, 1)),
        ((6, 5), (1, 5)),
        ((5, 6), (5, 1)),
        ((4, 3, 3, 3), (1, 1, 1, 3)),
        ((2, 5, 3), (2, 1, 1)),
        ((3, 7, 3), (3, 1, 1)),
        ((0, 5), (0, 1)),
        ((3, 0), (1, 0)),
        ((9,), (1,)),
        ((0,), (1,)),
        ((), (1,)),
    ],
)
def test_int8_picks_the_axis_with_fewest_scales(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> None:
    original = _sample(shape, np.float32, seed=4)
    stored = _stored(encode_tensors({"w": original}, "int8"))
    assert stored["w" + SCALE_SUFFIX].shape == scale_shape
    assert quantization_step(original).shape == scale_shape
    decoded = decode_tensors(encode_tensors({"w": original}, "int8"))["w"]
    assert decoded.shape == shape and decoded.dtype == np.float32


@pytest.mark.parametrize("shape", [(6, 5), (5, 6), (4, 3, 3, 3), (2, 5, 3), (9,), ()])
def test_int8_scales_are_per_channel_and_stored_as_float32(shape: tuple[int, ...]) -> None:
    original = _sample(shape, np.float32, seed=3)
    stored = _stored(encode_tensors({"w": original}, "int8"))
    assert set(stored) == {"w", "w" + SCALE_SUFFIX}
    assert stored["w"].dtype == np.int8 and stored["w"].shape == shape
    scale = stored["w" + SCALE_SUFFIX]
    assert scale.dtype == np.float32
    magnitude = np.abs(original.astype(np.float64))
    if len(shape) >= 2 and shape[-1] < shape[0]:
        assert scale.shape == (1,) * (len(shape) - 1) + (shape[-1],)
        columns = magnitude.reshape(-1, shape[-1]).max(axis=0)
        np.testing.assert_allclose(scale.reshape(-1), columns / 127, rtol=1e-6)
    elif len(shape) >= 2:
        assert scale.shape == (shape[0],) + (1,) * (len(shape) - 1)
        rows = magnitude.reshape(shape[0], -1).max(axis=1)
        np.testing.assert_allclose(scale.reshape(-1), rows / 127, rtol=1e-6)
    else:
        assert scale.shape == (1,)
        np.testing.assert_allclose(scale[0], magnitude.max() / 127, rtol=1e-6)
    np.testing.assert_array_equal(scale, quantization_step(original))
    assert np.abs(stored["w"]).max() == 127


@pytest.mark.parametrize("transpose", [False, True])
def test_int8_error_bound_uses_the_scale_of_each_elements_channel(transpose: bool) -> None:
    """Channels of very different magnitude: each element is within half a step of *its* channel."""
    rng = np.random.default_rng(11)
    lora_b = rng.normal(size=(384, 8)) * 10.0 ** np.arange(-4, 4)  # column j has magnitude 10**(j-4)
    lora_b[:, 2] = 0.0  # an all-zero channel gets scale 1.0 and decodes to exact zeros
    original = lora_b.T if transpose else lora_b  # (8, 384): the same channels along axis 0
    payload = encode_tensors({"w": original}, "int8")
    scale = _stored(payload)["w" + SCALE_SUFFIX].astype(np.float64)
    channel_absmax = np.abs(lora_b).max(axis=0)
    expected = np.where(channel_absmax == 0, 1.0, channel_absmax / 127)
    if transpose:
        assert scale.shape == (8, 1)
        np.testing.assert_allclose(scale[:, 0], expected, rtol=1e-6)
    else:
        assert scale.shape == (1, 8)
        np.testing.assert_allclose(scale[0], expected, rtol=1e-6)
    decoded = decode_tensors(payload)["w"].astype(np.float64)
    error = np.abs(decoded - original)
    assert np.all(error <= np.broadcast_to(scale, original.shape) / 2 * (1 + 1e-5))
    zero_channel = decoded[2] if transpose else decoded[:, 2]
    np.testing.assert_array_equal(zero_channel, 0.0)
    # the small channels keep their precision: a single tensor-wide scale would round them all to zero
    small = (slice(0, 2), slice(None)) if transpose else (slice(None), slice(0, 2))
    assert np.all(error[small] <= np.abs(original[small]).max() / 127)
    assert np.count_nonzero(decoded[small]) > 0


@pytest.mark.parametrize("axis", [0, -1])
def test_int8_decodes_either_allowed_scale_layout(axis: int) -> None:
    """The decoder takes both broadcast layouts, even the one the encoder would not pick for the shape."""
    quantized = np.array([[1, -2, 3], [4, 5, -6]], np.int8)  # (2, 3): the encoder would use axis 0
    scale = np.array([[0.5], [2.0]], np.float32) if axis == 0 else np.array([[0.5, 1.0, 2.0]], np.float32)
    payload = safetensors.numpy.save(
        {"w": quantized, "w" + SCALE_SUFFIX: scale}, metadata={"ffm_codec": "int8", "ffm_format": "1"}
    )
    decoded = decode_tensors(payload)["w"]
    np.testing.assert_array_equal(decoded, quantized.astype(np.float32) * scale)


def test_int8_all_zero_rows_get_unit_scale_and_decode_to_zero() -> None:
    original = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    payload = encode_tensors({"w": original, "z": np.zeros(4)}, "int8")
    stored = _stored(payload)
    np.testing.assert_array_equal(stored["w" + SCALE_SUFFIX], np.array([[1.0], [2 / 127], [1.0]], np.float32))
    np.testing.assert_array_equal(stored["z" + SCALE_SUFFIX], np.array([1.0], np.float32))
    decoded = decode_tensors(payload)
    np.testing.assert_array_equal(decoded["w"][[0, 2]], 0.0)
    np.testing.assert_array_equal(decoded["z"], np.zeros(4, np.float32))


def test_int8_handles_tiny_values_within_the_bound() -> None:
    original = np.array([1e-42, -3e-43, 0.0])
    decoded = decode_tensors(encode_tensors({"w": original}, "int8"))["w"]
    step = float(quantization_step(original)[0])
    assert step > 0
    assert np.all(np.abs(decoded.astype(np.float64) - original) <= step / 2 * (1 + 1e-5) + 1e-45)


@pytest.mark.parametrize("block", [7, 2])
@pytest.mark.parametrize("shape", [(50,), (3, 40), (40, 3), (2, 3, 7, 5), (7, 5, 3), (30, 4, 2)])
def test_int8_blockwise_quantization_matches_one_block(shape: tuple[int, ...], block: int, monkeypatch: Any) -> None:
    import ffm_edge.wire.codec as codec_module

    original = _sample(shape, np.float64, seed=5)
    whole = _stored(encode_tensors({"w": original}, "int8"))
    monkeypatch.setattr(codec_module, "_BLOCK", block)
    blocked = _stored(encode_tensors({"w": original}, "int8"))
    np.testing.assert_array_equal(blocked["w"], whole["w"])
    np.testing.assert_array_equal(blocked["w" + SCALE_SUFFIX], whole["w" + SCALE_SUFFIX])


def test_quantization_step_refuses_non_finite_values() -> None:
    with pytest.raises(ValueError):
        quantization_step(np.array([1.0, np.nan]))


def test_only_the_given_tensors_travel_with_their_metadata() -> None:
    tensors = {"layer.0.weight": np.ones((2, 2)), "head.bias": np.zeros(3)}
    for codec in CODECS:
        payload = encode_tensors(tensors, codec)
        assert sorted(decode_tensors(payload)) == sorted(tensors)
        expected = set(tensors) if codec != "int8" else set(tensors) | {n + SCALE_SUFFIX for n in tensors}
        assert set(_stored(payload)) == expected
        header_len = struct.unpack("<Q", payload[:8])[0]
        header = json.loads(payload[8 : 8 + header_len])
        assert header["__metadata__"] == {"ffm_codec": codec, "ffm_format": "1"}
        assert decode_payload(payload)[0] == codec


def test_empty_mapping_round_trips() -> None:
    for codec in CODECS:
        assert decode_tensors(encode_tensors({}, codec)) == {}


def test_fp32_and_fp16_carry_non_finite_values_as_they_are() -> None:
    original = np.array([np.nan, np.inf, -np.inf, 1.0])
    for codec in ("fp32", "fp16"):
        out = decode_tensors(encode_tensors({"w": original}, codec))["w"]
        assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and out[3] == 1.0


def test_fp16_overflow_becomes_inf() -> None:
    out = decode_tensors(encode_tensors({"w": np.array([1e6, -1e6])}, "fp16"))["w"]
    assert list(out) == [np.inf, -np.inf]


def test_non_contiguous_input_is_encoded_correctly() -> None:
    original = np.arange(12.0).reshape(3, 4).T
    for codec in ("fp32", "fp16"):
        np.testing.assert_array_equal(decode_tensors(encode_tensors({"w": original}, codec))["w"], original)


@pytest.mark.parametrize("name", ["", "a::b", "w::scale", "__metadata__", 3])
def test_encode_rejects_bad_names(name: Any) -> None:
    with pytest.raises(ValueError):
        encode_tensors({name: np.zeros(2)}, "fp32")


@pytest.mark.parametrize(
    ("value", "codec"),
    [
        (np.array([True, False]), "fp32"),
        (np.array([1 + 2j]), "fp16"),
        (np.array(["a"]), "fp32"),
        (np.array([1.0, np.nan]), "int8"),
        (np.array([[1.0], [np.inf]]), "int8"),
        (np.array([1e39, 1.0]), "int8"),
        (np.zeros(2), "bf16"),
    ],
)
def test_encode_rejects_programming_errors(value: np.ndarray, codec: str) -> None:
    with pytest.raises(ValueError) as info:
        encode_tensors({"w": value}, codec)
    assert not isinstance(info.value, DecodeError)


def test_decode_rejects_missing_metadata() -> None:
    payload = safetensors.numpy.save({"w": np.zeros(2, np.float32)})
    with pytest.raises(MalformedError, match="metadata"):
        decode_tensors(payload)


@pytest.mark.parametrize(
    "metadata",
    [
        {"ffm_codec": "bf16", "ffm_format": "1"},
        {"ffm_codec": "fp32"},
        {"ffm_codec": "fp32", "ffm_format": "1", "extra": "x"},
    ],
)
def test_decode_rejects_bad_codec_metadata(metadata: dict[str, str]) -> None:
    payload = safetensors.numpy.save({"w": np.zeros(2, np.float32)}, metadata=metadata)
    with pytest.raises(MalformedError):
        decode_tensors(payload)


def test_decode_rejects_unknown_format_version() -> None:
    payload = safetensors.numpy.save({"w": np.zeros(2, np.float32)}, metadata={**META, "ffm_format": "3"})
    with pytest.raises(ProtocolVersionError, match="'3'"):  # "2" is the sparse format (tests/test_sparse_codec.py)
        decode_tensors(payload)


def test_decode_rejects_int8_tensor_without_scale_and_scale_without_tensor() -> None:
    meta = {"ffm_codec": "int8", "ffm_format": "1"}
    lonely_tensor = safetensors.numpy.save({"w": np.zeros(2, np.int8)}, metadata=meta)
    with pytest.raises(MalformedError, match="no scale"):
        decode_tensors(lonely_tensor)
    lonely_scale = safetensors.numpy.save({"w" + SCALE_SUFFIX: np.ones(1, np.float32)}, metadata=meta)
    with pytest.raises(MalformedError, match="no tensor"):
        decode_tensors(lonely_scale)


@pytest.mark.parametrize(
    ("shape", "scale_shape"),
    [
        ((3, 2), (2,)),
        ((3, 2), (3,)),  # the former axis-0 layout: no longer valid
        ((3, 2), (1,)),
        ((3, 2), (1, 1)),
        ((3, 2), (2, 1)),
        ((3, 2), (1, 3)),
        ((3, 2), (3, 2)),
        ((3, 2), (3, 1, 1)),
        ((3, 2), (1, 1, 2)),
        ((3, 2), ()),
        ((384, 8), (8,)),
        ((384, 8), (1, 1, 8)),
        ((4, 3, 5), (4, 1)),
        ((4, 3, 5), (1, 5)),
        ((4, 3, 5), (1, 3, 1)),
        ((4, 3, 5), (4, 1, 5)),
        ((3, 0), (1, 1)),
        ((4,), (4,)),
        ((4,), (1, 1)),
        ((), ()),
    ],
)
def test_decode_rejects_wrong_scale_shape(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> None:
    tensors: dict[str, np.ndarray] = {
        "w": np.zeros(shape, np.int8),
        "w" + SCALE_SUFFIX: np.ones(scale_shape, np.float32),
    }
    payload = safetensors.numpy.save(tensors, metadata={"ffm_codec": "int8", "ffm_format": "1"})
    with pytest.raises(MalformedError, match="shape"):
        decode_tensors(payload)


@pytest.mark.parametrize("scale", [0.0, -1.0, np.inf, np.nan, 3e38])
def test_decode_rejects_bad_scale_values(scale: float) -> None:
    tensors: dict[str, np.ndarray] = {"w": np.ones(3, np.int8), "w" + SCALE_SUFFIX: np.array([scale], np.float32)}
    payload = safetensors.numpy.save(tensors, metadata={"ffm_codec": "int8", "ffm_format": "1"})
    with pytest.raises(MalformedError, match="scale"):
        decode_tensors(payload)


@pytest.mark.parametrize(
    ("codec", "tensors"),
    [
        ("fp32", {"w": np.zeros(2, np.float64)}),
        ("fp32", {"w": np.zeros(2, np.float16)}),
        ("fp16", {"w": np.zeros(2, np.float32)}),
        ("fp32", {"w": np.zeros(2, np.int8)}),
        ("int8", {"w": np.zeros(2, np.float32), "w::scale": np.ones(1, np.float32)}),
        ("int8", {"w": np.zeros(2, np.int8), "w::scale": np.ones(1, np.float16)}),
        ("fp32", {"w::scale": np.zeros(1, np.float32)}),
        ("int8", {"a::b": np.zeros(1, np.int8), "a::b::scale": np.ones(1, np.float32)}),
    ],
)
def test_decode_rejects_unexpected_dtypes_and_names(codec: str, tensors: dict[str, np.ndarray]) -> None:
    payload = safetensors.numpy.save(tensors, metadata={"ffm_codec": codec, "ffm_format": "1"})
    with pytest.raises(MalformedError):
        decode_tensors(payload)


def test_decode_rejects_dtypes_numpy_cannot_hold() -> None:
    payload = _raw({"__metadata__": META, "w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(MalformedError, match="dtype"):
        decode_tensors(payload)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": [1]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1},
        {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]},
        [1, 2],
    ],
)
def test_decode_rejects_malformed_entries(entry: Any) -> None:
    with pytest.raises(MalformedError):
        decode_tensors(_raw({"__metadata__": META, "w": entry}, b"\0" * 4))


def test_decode_rejects_gaps_overlaps_and_trailing_bytes() -> None:
    def entry(begin: int, end: int) -> dict[str, Any]:
        return {"dtype": "F32", "shape": [1], "data_offsets": [begin, end]}

    gap = _raw({"__metadata__": META, "a": entry(0, 4), "b": entry(8, 12)}, b"\0" * 12)
    overlap = _raw({"__metadata__": META, "a": entry(0, 4), "b": entry(0, 4)}, b"\0" * 4)
    trailing = _raw({"__metadata__": META, "a": entry(0, 4)}, b"\0" * 5)
    for payload in (gap, overlap, trailing):
        with pytest.raises(MalformedError):
            decode_tensors(payload)


@pytest.mark.parametrize(
    "header",
    [b"[]", b"{", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b"1" * 5000],
)
def test_decode_rejects_bad_header_json(header: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_tensors(struct.pack("<Q", len(header)) + header)


def test_decode_rejects_every_truncation_with_truncated_error() -> None:
    payload = encode_tensors({"a": np.arange(6.0).reshape(2, 3), "b": np.ones(2)}, "int8")
    for length in range(len(payload)):
        with pytest.raises(TruncatedError):
            decode_tensors(payload[:length])


def test_decode_rejects_too_many_tensors_and_elements() -> None:
    tensors = {f"t{i}": np.zeros(2) for i in range(3)}
    for codec in CODECS:
        payload = encode_tensors(tensors, codec)
        with pytest.raises(OversizedError):
            decode_tensors(payload, limits=WireLimits(max_tensors=2))
        with pytest.raises(OversizedError):
            decode_tensors(payload, limits=WireLimits(max_tensor_elements=5))
        assert len(decode_tensors(payload, limits=WireLimits(max_tensors=3, max_tensor_elements=12))) == 3


def test_decode_rejects_huge_declared_shapes_before_allocating() -> None:
    header = {"__metadata__": META, "w": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 4]}}
    with pytest.raises(OversizedError):
        decode_tensors(_raw(header, b"\0" * 4))


def test_decode_rejects_oversized_payload() -> None:
    payload = encode_tensors({"w": np.zeros(100)}, "fp32")
    with pytest.raises(OversizedError):
        decode_tensors(payload, limits=WireLimits(max_frame_bytes=len(payload) - 1))


def test_decode_maps_garbage_to_decode_errors() -> None:
    for data in (b"", b"hello world, not safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}"):
        with pytest.raises(DecodeError):
            decode_tensors(data)


@pytest.mark.parametrize("field", ["max_frame_bytes", "max_tensors", "max_chunk_bytes", "max_message_bytes"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_wire_limits_validate(field: str, value: Any) -> None:
    with pytest.raises(ConfigError):
        WireLimits(**{field: value})


def test_wire_limits_defaults() -> None:
    assert DEFAULT_LIMITS.max_frame_bytes == 256 * 1024 * 1024
    assert DEFAULT_LIMITS.max_header_bytes == 64 * 1024
    assert DEFAULT_LIMITS.max_chunk_bytes == 4 * 1024 * 1024
    assert DEFAULT_LIMITS.max_chunks == 65_536
    assert DEFAULT_LIMITS.max_tensors == 10_000
    assert DEFAULT_LIMITS.max_tensor_elements == 200_000_000
    assert DEFAULT_LIMITS.max_message_bytes == 64 * 1024
