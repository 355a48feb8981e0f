"""Sparse tensors on the wire (payload format 2): values + ``::index`` for mostly-zero (top-k) deltas.

Round trips in every codec, the choice between sparse and dense, format-1 bytes unchanged when sparse is
off (against a golden taken from the codec before format 2 existed), and strict, allocation-free refusal
of every malformed sparse payload with a typed error.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from ffm_edge.errors import DecodeError, MalformedError, OversizedError, ProtocolVersionError, WrongDtypeError
from ffm_edge.strategies import get_strategy
from ffm_edge.wire import (
    CODECS,
    DEFAULT_LIMITS,
    INDEX_SUFFIX,
    SCALE_SUFFIX,
    UpdateMeta,
    WireLimits,
    decode_payload,
    decode_tensors,
    decode_update,
    encode_tensors,
    encode_update,
    quantization_step,
)

SHAPES = [(), (7,), (300,), (64, 48), (8, 6, 5), (0,), (40, 0)]
DENSITIES = [0.0, 0.01, 0.1, 0.5, 1.0]


def _with_density(shape: tuple[int, ...], density: float, seed: int = 0) -> np.ndarray:
    """A float32 tensor with ``round(density · size)`` nonzeros (normal values, never exactly zero)."""
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    flat = np.zeros(size, np.float32)
    keep = rng.choice(size, size=round(density * size), replace=False) if size else np.zeros(0, np.int64)
    flat[keep] = (rng.normal(size=keep.size) + np.sign(rng.normal(size=keep.size)) * 0.1).astype(np.float32)
    flat[keep] = np.where(flat[keep] == 0, 1.0, flat[keep])
    return flat.reshape(shape)


def _stored(payload: bytes) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(payload)


def _metadata(payload: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", payload[:8])
    meta: dict[str, str] = json.loads(payload[8 : 8 + length])["__metadata__"]
    return meta


def _split(payload: bytes) -> tuple[dict[str, Any], str]:
    """Header as parsed JSON and sha256 of the data section (safetensors orders metadata keys arbitrarily)."""
    (length,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + length]), hashlib.sha256(payload[8 + length :]).hexdigest()


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_round_trip(codec: str, density: float, shape: tuple[int, ...]) -> None:
    original = _with_density(shape, density)
    payload = encode_tensors({"w": original}, codec, sparse=True)
    dense_payload = encode_tensors({"w": original}, codec)
    went_sparse = "w" + INDEX_SUFFIX in _stored(payload)
    assert len(payload) <= len(dense_payload), "sparse only when smaller"
    if not went_sparse:
        assert payload == dense_payload or _split(payload) == _split(dense_payload)
        assert _metadata(payload)["ffm_format"] == "1"
    else:
        assert _metadata(payload)["ffm_format"] == "2"
        assert json.loads(_metadata(payload)["ffm_sparse"]) == {"w": list(shape)}
        assert _stored(payload)["w"].shape == (np.count_nonzero(original),)
    if density == 1.0 or original.size <= 7:
        assert not went_sparse, "a dense or tiny tensor stays dense"
    if density <= 0.1 and original.size >= 300:
        assert went_sparse
    codec_found, decoded = decode_payload(payload)
    assert codec_found == codec and list(decoded) == ["w"]
    out = decoded["w"]
    assert out.dtype == np.float32 and out.shape == shape and out.flags.writeable
    zeros = original == 0
    assert np.all(out[zeros] == 0), "dropped entries decode to exactly zero"
    if codec == "fp32":
        np.testing.assert_array_equal(out, original)
    elif codec == "fp16":
        np.testing.assert_array_equal(out, original.astype(np.float16).astype(np.float32))
    else:
        kept = original[~zeros].astype(np.float64)
        if went_sparse:  # one per-tensor scale over the kept values
            step = np.abs(kept).max() / 127 if kept.size else 1.0
        else:
            step = (quantization_step(original) * np.ones(shape, np.float32)).reshape(shape)[~zeros]
        error = np.abs(out[~zeros].astype(np.float64) - kept)
        assert np.all(error <= step / 2 * (1 + 1e-5))


def test_sparse_int8_error_bound_on_kept_values_of_a_topk_delta() -> None:
    rng = np.random.default_rng(1)
    delta = rng.normal(scale=1e-3, size=(384, 1536)).astype(np.float32)
    k = delta.size // 20
    keep = np.argpartition(np.abs(delta).reshape(-1), delta.size - k)[delta.size - k :]
    flat = np.zeros(delta.size, np.float32)
    flat[keep] = delta.reshape(-1)[keep]
    sparse: np.ndarray = flat.reshape(delta.shape)
    payload = encode_tensors({"w": sparse}, "int8", sparse=True)
    stored = _stored(payload)
    assert stored["w"].dtype == np.int8 and stored["w" + INDEX_SUFFIX].dtype == np.uint32
    assert stored["w" + SCALE_SUFFIX].shape == (1,)
    out = decode_tensors(payload)["w"]
    kept = sparse != 0
    assert np.count_nonzero(out[~kept]) == 0
    bound = np.abs(sparse).max() / 127 / 2 * (1 + 1e-5)
    assert np.abs(out[kept] - sparse[kept]).max() <= bound
    assert len(payload) < 0.3 * len(encode_tensors({"w": sparse}, "int8"))  # 5 % × 5 B vs 1 B per element


def test_mixed_payload_all_zero_and_large_tensors() -> None:
    tensors: dict[str, np.ndarray] = {
        "zeros": np.zeros((128, 64), np.float32),
        "scalar": np.array(0.5, np.float32),
        "dense": np.ones((3, 3), np.float32),
        "topk": _with_density((200, 50), 0.02, seed=3),
    }
    payload = encode_tensors(tensors, "fp32", sparse=True)
    stored = _stored(payload)
    assert stored["zeros"].shape == (0,) and stored["zeros" + INDEX_SUFFIX].shape == (0,)
    assert "scalar" + INDEX_SUFFIX not in stored and "dense" + INDEX_SUFFIX not in stored
    decoded = decode_tensors(payload)
    assert list(decoded) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded[name], value)


def test_a_huge_all_zero_tensor_travels_dense_within_the_expansion_limit() -> None:
    """Sparse it would be a ~100 B entry decoding to 2M elements: above max_sparse_expansion, so dense."""
    payload = encode_tensors({"w": np.zeros(2_000_000, np.float32)}, "int8", sparse=True)
    assert _metadata(payload)["ffm_format"] == "1"
    assert DEFAULT_LIMITS.max_sparse_expansion == 1024


def test_indices_are_int64_when_uint32_cannot_hold_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from ffm_edge.wire import codec as codec_module

    monkeypatch.setattr(codec_module, "_U32_ELEMENTS", 100)
    original = _with_density((1000,), 0.01)
    payload = encode_tensors({"w": original}, "fp32", sparse=True)
    assert _stored(payload)["w" + INDEX_SUFFIX].dtype == np.int64
    np.testing.assert_array_equal(decode_tensors(payload)["w"], original)


def test_update_envelope_carries_a_sparse_payload() -> None:
    meta = UpdateMeta("fed", "dev", "u1", 0, "full_q8", 4, "fp32", time.time())
    tensors = {"w": _with_density((100, 100), 0.05)}
    frame = encode_update(meta, tensors, sparse=True)
    assert len(frame) < len(encode_update(meta, tensors)) / 2
    got_meta, decoded = decode_update(frame)
    assert got_meta == meta
    np.testing.assert_array_equal(decoded["w"], tensors["w"])


def test_strategies_say_whether_they_send_sparse() -> None:
    assert get_strategy("full_q8").sends_sparse is False
    assert get_strategy("full_q8", top_k=0.05).sends_sparse is True
    assert get_strategy("head").sends_sparse is False


# -- format 1 is unchanged --------------------------------------------------------------------------------


def _golden_tensors() -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {
        "a.weight": np.arange(-12, 12, dtype=np.float32).reshape(6, 4) / 8,
        "b": np.zeros(40, np.float32),
        "c": np.array(2.5, np.float32),
    }
    tensors["b"][[3, 17]] = [1.5, -0.25]
    return tensors


#: (payload length, sha256 of the data section) written by the codec before format 2 existed.
GOLDEN = {
    "fp32": (500, "079aea73afd6cab106c5bb28c1c0ab6bddd9e8b80d945797c4a0eb78bb7e4b86"),
    "fp16": (370, "d1081907742e88891bb0ad0fff25258e84aa447edb27a676a8da27cf710af804"),
    "int8": (521, "e4eec69a2a8407e98141719384510ed3a629b1e029dffb9850d7ef2fb4cbb9e4"),
}


@pytest.mark.parametrize("codec", CODECS)
def test_format_1_payloads_are_unchanged(codec: str) -> None:
    default = encode_tensors(_golden_tensors(), codec)
    explicit = encode_tensors(_golden_tensors(), codec, sparse=False)
    header, digest = _split(default)
    assert (len(default), digest) == GOLDEN[codec]
    assert header["__metadata__"] == {"ffm_codec": codec, "ffm_format": "1"}
    assert _split(explicit) == (header, digest)
    assert not any(name.endswith(INDEX_SUFFIX) for name in header)


# -- malformed sparse payloads ----------------------------------------------------------------------------


def _sparse_payload(
    tensors: dict[str, np.ndarray], shapes: Any, *, codec: str = "fp32", fmt: str = "2", raw_shapes: bool = False
) -> bytes:
    """A hand-built payload: ``tensors`` stored as given, ``shapes`` as the ffm_sparse metadata."""
    metadata = {"ffm_codec": codec, "ffm_format": fmt}
    if shapes is not None:
        metadata["ffm_sparse"] = shapes if raw_shapes else json.dumps(shapes)
    return safetensors.numpy.save(tensors, metadata=metadata)


VALUES = np.array([1.0, 2.0, 3.0], np.float32)


def test_a_hand_built_sparse_payload_decodes() -> None:
    payload = _sparse_payload({"w": VALUES, "w::index": np.array([0, 5, 11], np.uint32)}, {"w": [3, 4]})
    expected = np.zeros(12, np.float32)
    expected[[0, 5, 11]] = VALUES
    np.testing.assert_array_equal(decode_tensors(payload)["w"], expected.reshape(3, 4))
    scalar = _sparse_payload({"s": VALUES[:1], "s::index": np.array([0], np.int64)}, {"s": []})
    assert decode_tensors(scalar)["s"].shape == () and decode_tensors(scalar)["s"] == 1.0


@pytest.mark.parametrize(
    ("tensors", "shapes", "error", "match"),
    [
        ({"w": VALUES, "w::index": np.array([5, 0, 11], np.uint32)}, {"w": [12]}, MalformedError, "increasing"),
        ({"w": VALUES, "w::index": np.array([0, 5, 5], np.uint32)}, {"w": [12]}, MalformedError, "increasing"),
        ({"w": VALUES, "w::index": np.array([0, 5, 12], np.uint32)}, {"w": [12]}, MalformedError, "outside"),
        ({"w": VALUES, "w::index": np.array([-1, 5, 6], np.int64)}, {"w": [12]}, MalformedError, "outside"),
        ({"w": VALUES, "w::index": np.array([0, 5], np.uint32)}, {"w": [12]}, MalformedError, "3 values but 2"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": [2]}, MalformedError, "more values"),
        (
            {"w": VALUES.reshape(3, 1), "w::index": np.array([[0], [1], [2]], np.uint32)},
            {"w": [12]},
            MalformedError,
            "1-d",
        ),
        ({"w::index": np.array([0, 1, 2], np.uint32)}, {"w": [12]}, MalformedError, "no values"),
        ({"w": VALUES}, {"w": [12]}, MalformedError, "no ::index"),
        (
            {"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32), "v::index": np.array([0], np.uint32)},
            {"w": [12]},
            MalformedError,
            "belongs to no sparse tensor",
        ),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.int32)}, {"w": [12]}, WrongDtypeError, "U32 or I64"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.float32)}, {"w": [12]}, WrongDtypeError, "U32 or I64"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": [12], "x": [4]}, MalformedError, "'x'"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": [-12]}, MalformedError, "dense dimension"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": "12"}, MalformedError, "dense shape"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": [1] * 33}, MalformedError, "dense shape"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": [12.0]}, MalformedError, "must be an int"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w::index": [12]}, MalformedError, "not allowed"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {}, MalformedError, "no sparse tensor"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, [], MalformedError, "JSON object"),
        ({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, None, MalformedError, "lacks"),
    ],
)
def test_decode_rejects_malformed_sparse_payloads(
    tensors: dict[str, np.ndarray], shapes: Any, error: type[DecodeError], match: str
) -> None:
    with pytest.raises(error, match=match):
        decode_tensors(_sparse_payload(tensors, shapes))


@pytest.mark.parametrize("raw", ["{not json", '{"w": [12], "w": [12]}', '{"w": [NaN]}', "", '"w"'])
def test_decode_rejects_bad_sparse_metadata_json(raw: str) -> None:
    payload = _sparse_payload({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, raw, raw_shapes=True)
    with pytest.raises(MalformedError):
        decode_tensors(payload)


def test_decode_rejects_other_formats_and_misplaced_sparse_parts() -> None:
    tensors = {"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}
    with pytest.raises(ProtocolVersionError, match="'3'"):
        decode_tensors(_sparse_payload(tensors, {"w": [12]}, fmt="3"))
    with pytest.raises(MalformedError, match="unknown fields"):  # format 1 knows no ffm_sparse
        decode_tensors(_sparse_payload(tensors, {"w": [12]}, fmt="1"))
    with pytest.raises(MalformedError, match="not allowed"):  # nor any ::index
        decode_tensors(_sparse_payload(tensors, None, fmt="1"))


def test_decode_rejects_bad_int8_sparse_scales() -> None:
    values = np.array([10, -127, 3], np.int8)
    index = np.array([0, 1, 2], np.uint32)
    good: dict[str, np.ndarray] = {"w": values, "w::index": index, "w::scale": np.array([0.5], np.float32)}
    np.testing.assert_array_equal(
        decode_tensors(_sparse_payload(good, {"w": [4]}, codec="int8"))["w"], [5, -63.5, 1.5, 0]
    )
    for scale in (np.array([0.5, 0.5], np.float32), np.array([[0.5]], np.float32)):
        with pytest.raises(MalformedError, match="scale of 'w'"):
            decode_tensors(_sparse_payload({**good, "w::scale": scale}, {"w": [4]}, codec="int8"))
    with pytest.raises(MalformedError, match="must be finite"):
        decode_tensors(_sparse_payload({**good, "w::scale": np.array([-1.0], np.float32)}, {"w": [4]}, codec="int8"))
    with pytest.raises(MalformedError, match="no scale"):
        decode_tensors(_sparse_payload({"w": values, "w::index": index}, {"w": [4]}, codec="int8"))
    with pytest.raises(MalformedError, match="not allowed"):
        decode_tensors(_sparse_payload({**good, "w::index::scale": good["w::scale"]}, {"w": [4]}, codec="int8"))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([10**6, 10**6], "more than 200000000"),  # a terabyte-scale dense shape in a 200-byte payload
        ([2**64, 2**64, 2**64], "more than 200000000"),
        ([50_000_000], "per byte"),  # within max_tensor_elements, but far beyond what the bytes justify
    ],
)
def test_decode_refuses_huge_dense_shapes_without_allocating(shape: list[int], match: str) -> None:
    payload = _sparse_payload({"w": VALUES, "w::index": np.array([0, 1, 2], np.uint32)}, {"w": shape})
    assert len(payload) < 300
    tracemalloc.start()
    try:
        with pytest.raises(OversizedError, match=match):
            decode_tensors(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_decode_limits_bound_sparse_tensors() -> None:
    original = _with_density((100, 100), 0.01)
    payload = encode_tensors({"w": original}, "fp32", sparse=True)
    assert _metadata(payload)["ffm_format"] == "2"
    np.testing.assert_array_equal(decode_tensors(payload, limits=WireLimits(max_tensor_elements=10_000))["w"], original)
    with pytest.raises(OversizedError, match="more than 9999"):
        decode_tensors(payload, limits=WireLimits(max_tensor_elements=9_999))
    ratio = math.ceil(10_000 / len(payload))
    assert decode_tensors(payload, limits=WireLimits(max_sparse_expansion=ratio))["w"].shape == (100, 100)
    with pytest.raises(OversizedError, match="per byte"):
        decode_tensors(payload, limits=WireLimits(max_sparse_expansion=ratio - 1))
    many = encode_tensors({f"t{i}": _with_density((50, 50), 0.01, seed=i) for i in range(3)}, "int8", sparse=True)
    assert len(_stored(many)) == 9  # values, index and scale each
    assert len(decode_tensors(many, limits=WireLimits(max_tensors=3))) == 3
    with pytest.raises(OversizedError, match="tensors"):
        decode_tensors(many, limits=WireLimits(max_tensors=2))
