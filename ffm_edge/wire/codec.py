"""Tensor payloads: safetensors bytes in one of three codecs (never pickle).

``fp32`` and ``fp16`` ship values as they are; ``int8`` ships per-channel symmetric quantized values and
float32 scales, which cuts an update to about a quarter of its fp32 size with an error of at most half a
quantization step per element. A 0-d or 1-d tensor gets a single scale, of shape ``(1,)``. A tensor of
``ndim >= 2`` is quantized per channel along axis 0 or along its last axis, whichever needs fewer scales
(axis 0 on a tie), and its scale tensor has the broadcastable shape that names the axis:
``(shape[0], 1, ..., 1)`` for axis 0, ``(1, ..., 1, shape[-1])`` for the last axis. So a LoRA ``lora_B``
of 384×8 carries 8 scales, not 384. The decoder accepts either of the two shapes and nothing else.

Sparse tensors (format ``"2"``, opt-in with ``encode_tensors(..., sparse=True)``): a tensor that is
mostly zeros (a top-k delta) travels as its nonzero values, a 1-d tensor under its own name in the
codec's dtype (int8: one per-tensor scale of shape ``(1,)``), plus their flat C-order indices under
``name::index`` (uint32 when the element count fits, else int64), strictly increasing; the dense shapes
are a JSON object ``{name: shape}`` in the metadata key ``ffm_sparse``. A tensor goes sparse only when
that is smaller than dense for it; a payload without sparse tensors is format ``"1"``, byte for byte
what this module wrote before sparse tensors existed. Decoders read both formats and return dense
arrays, so a format-2 payload needs an upgraded reader: upgrade hubs before devices.

Decoding validates the safetensors header itself, with the limits, *before* safetensors allocates
anything, and maps every failure onto :class:`~ffm_edge.errors.DecodeError` subclasses. For a sparse
tensor that includes its dense shape, bounded by ``WireLimits.max_tensor_elements`` and, per byte of
payload, by ``WireLimits.max_sparse_expansion``, so a small payload cannot make a decoder allocate a
large dense array; indices are checked (sorted, unique, in range) before the dense array is built.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from ffm_edge.errors import MalformedError, OversizedError, ProtocolVersionError, TruncatedError, WrongDtypeError
from ffm_edge.wire.limits import DEFAULT_LIMITS, WireLimits
from ffm_edge.wire.topics import check_int, check_keys, loads_json_object

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "INDEX_SUFFIX",
    "SCALE_SUFFIX",
    "SPARSE_FORMAT_VERSION",
    "decode_payload",
    "decode_tensors",
    "encode_tensors",
    "quantization_step",
]

CODECS = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "::scale"
#: Suffix of the flat indices of a sparse tensor's values.
INDEX_SUFFIX = "::index"
#: Format of payloads without sparse tensors (what every reader understands).
FORMAT_VERSION = "1"
#: Format of payloads with at least one sparse tensor.
SPARSE_FORMAT_VERSION = "2"
_FORMATS = (FORMAT_VERSION, SPARSE_FORMAT_VERSION)
_SPARSE_KEY = "ffm_sparse"

_META_KEY = "__metadata__"
_MAX_NDIM = 32
_INT8_MAX = 127
#: Largest scale whose product with any int8 value stays finite in float32.
_MAX_SCALE = float(np.finfo(np.float32).max) / 128.0
_TINY_SCALE = np.float32(np.finfo(np.float32).smallest_subnormal)
_ITEMSIZE = {"F32": 4, "F16": 2, "I8": 1, "U32": 4, "I64": 8}
_CODEC_ITEMSIZE = {"fp32": 4, "fp16": 2, "int8": 1}
_INDEX_DTYPES = ("U32", "I64")
#: Largest element count whose flat indices fit uint32.
_U32_ELEMENTS = 1 << 32


def _c_order(array: np.ndarray) -> np.ndarray:
    """C-contiguous without promoting 0-d arrays to 1-d (``np.ascontiguousarray`` would)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if "::" in name:
        raise ValueError(f"tensor name {name!r} contains '::', which the wire reserves")
    if name == _META_KEY:
        raise ValueError(f"tensor name {name!r} is reserved by safetensors")
    return name


def _as_real_array(name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; only floats and ints travel")
    return array


def _channels_last(shape: tuple[int, ...]) -> bool:
    """Whether int8 quantizes ``shape`` per index of its last axis (fewer scales than axis 0; ties: axis 0)."""
    return len(shape) >= 2 and shape[-1] < shape[0]


def _scale_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every scale shape the wire allows for an int8 tensor of ``shape`` (axis 0 first)."""
    if len(shape) <= 1:
        return ((1,),)
    ones = (1,) * (len(shape) - 1)
    return ((shape[0], *ones), (*ones, shape[-1]))


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale shape the encoder writes for an int8 tensor of ``shape``."""
    allowed = _scale_shapes(shape)
    return allowed[1] if _channels_last(shape) else allowed[0]


def _channel_view(values: np.ndarray) -> tuple[np.ndarray, int]:
    """View ``values`` as 2-d with the channels along one axis; return the view and that axis (0 or 1).

    Axis 0 channels give ``(shape[0], rest)`` with one row per channel (one row for ndim <= 1); last-axis
    channels give ``(rest, shape[-1])`` with one column per channel. C-contiguous input reshapes to a view.
    """
    if _channels_last(values.shape):
        channels = values.shape[-1]
        return values.reshape(values.size // channels if channels else 0, channels), 1
    channels = values.shape[0] if values.ndim >= 2 else 1
    return values.reshape(channels, values.size // channels if channels else 0), 0


def _int8_scales(view: np.ndarray, axis: int, name: str) -> np.ndarray:
    """Per-channel float32 scales (``max|channel| / 127``; 1.0 for an all-zero channel) of a 2-d view.

    The channels of ``view`` run along ``axis`` (0: rows, 1: columns); the result is 1-d, one per channel.
    ``max`` and ``-min`` avoid a full-size ``abs`` temporary; NaN and inf propagate into ``absmax``,
    which is how non-finite inputs are detected without another full-size temporary.
    """
    channels = view.shape[axis]
    over = 1 - axis
    if view.shape[over] == 0:
        absmax = np.zeros(channels)
    else:
        absmax = np.maximum(view.max(axis=over).astype(np.float64), -view.min(axis=over).astype(np.float64))
    if not np.all(np.isfinite(absmax)):
        raise ValueError(f"tensor {name!r} has non-finite values; int8 cannot carry them")
    scales = (absmax / _INT8_MAX).astype(np.float32)
    if np.any(scales > _MAX_SCALE):
        raise ValueError(f"tensor {name!r} has values too large to quantize to int8")
    scales = np.where(absmax == 0, np.float32(1.0), np.maximum(scales, _TINY_SCALE))
    return scales.astype(np.float32)


#: Elements quantized per step: bounds the float64 temporaries to a few MiB, whatever the tensor size.
_BLOCK = 1 << 20


def _quantize_int8(name: str, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``array`` block by block; return the int8 values and the scales in their wire shape."""
    view, axis = _channel_view(array)
    scales = _int8_scales(view, axis, name)
    steps = scales.astype(np.float64).reshape((-1, 1) if axis == 0 else (1, -1))
    quantized = np.empty(view.shape, dtype=np.int8)
    height, width = view.shape
    row_step = max(1, _BLOCK // max(1, width))
    col_step = max(1, min(width, _BLOCK))
    for r in range(0, height, row_step):
        for c in range(0, width, col_step):
            block = view[r : r + row_step, c : c + col_step].astype(np.float64)
            block /= steps[r : r + row_step, :] if axis == 0 else steps[:, c : c + col_step]
            np.rint(block, out=block)
            np.clip(block, -_INT8_MAX, _INT8_MAX, out=block)
            quantized[r : r + row_step, c : c + col_step] = block
    return quantized.reshape(array.shape), scales.reshape(_scale_shape(array.shape))


def quantization_step(array: np.ndarray) -> np.ndarray:
    """The int8 scales :func:`encode_tensors` would store for ``array``, in their wire shape.

    That is ``(1,)`` for ndim <= 1, else ``(shape[0], 1, ..., 1)`` or ``(1, ..., 1, shape[-1])``
    (whichever axis has fewer channels; axis 0 on a tie), so the result broadcasts against ``array``.
    Reconstruction error per element is at most half the step of its channel (plus float32 rounding).
    ``ValueError`` for non-finite values, as with :func:`encode_tensors`.
    """
    values = np.asarray(array)
    view, axis = _channel_view(values)
    return _int8_scales(view, axis, "array").reshape(_scale_shape(values.shape))


def _sparse_header_bytes(name: str) -> int:
    """A lower bound on the header bytes a sparse tensor adds (its index entry and its shape in the metadata)."""
    return 2 * len(name.encode("utf-8")) + 64


#: Header bytes a sparse tensor may add beyond :func:`_sparse_header_bytes` (offsets' digits, the
#: ``ffm_sparse`` key, padding): counted when choosing, so sparse is chosen only when clearly smaller.
_SPARSE_HEADER_SLACK = 64


def _sparse_wins(name: str, array: np.ndarray, nonzero: int, codec: str) -> bool:
    """Whether ``array`` with ``nonzero`` nonzeros is smaller sparse than dense, and decodes within the default
    ``max_sparse_expansion`` (below that density, e.g. a huge all-zero tensor, it travels dense)."""
    size = array.size
    itemsize = _CODEC_ITEMSIZE[codec]
    index_size = 4 if size <= _U32_ELEMENTS else 8
    dense = size * itemsize
    sparse = nonzero * (itemsize + index_size) + _sparse_header_bytes(name)
    if codec == "int8":
        dense += 4 * math.prod(_scale_shape(array.shape))
        sparse += 4
    return sparse + _SPARSE_HEADER_SLACK < dense and size <= DEFAULT_LIMITS.max_sparse_expansion * sparse


def encode_tensors(tensors: Mapping[str, np.ndarray], codec: str, *, sparse: bool = False) -> bytes:
    """Serialize ``tensors`` with ``codec`` into safetensors bytes.

    ``sparse=True`` sends each tensor that is smaller that way as its nonzero values and their indices
    (see the module docstring); the payload is then format ``"2"``, which readers older than format 2
    refuse. With ``sparse=False`` (default), or when no tensor is smaller sparse, the payload is format
    ``"1"`` and byte-identical to what this function always wrote.

    Raises ``ValueError`` for a programming error on the sender: unknown codec, bad names, non-numeric
    dtypes, or non-finite values with ``int8``. The bytes are not canonical (safetensors orders the
    metadata keys arbitrarily), so hash the bytes you send, never re-encoded tensors.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    stored: dict[str, np.ndarray] = {}
    dense_shapes: dict[str, list[int]] = {}
    for raw_name, value in tensors.items():
        name = _check_name(raw_name)
        array = _as_real_array(name, value)
        if sparse:
            flat = _c_order(array).reshape(-1)
            nonzero = int(np.count_nonzero(flat))
            if _sparse_wins(name, array, nonzero, codec):
                index = np.flatnonzero(flat)
                values = flat[index]
                dense_shapes[name] = [int(d) for d in array.shape]
                stored[name + INDEX_SUFFIX] = index.astype(np.uint32 if array.size <= _U32_ELEMENTS else np.int64)
                array = values  # the 1-d values take the dense tensor's place below
        if codec == "int8":
            quantized, scales = _quantize_int8(name, array)
            stored[name] = _c_order(quantized)
            stored[name + SCALE_SUFFIX] = _c_order(scales)
        else:
            target = np.float32 if codec == "fp32" else np.float16
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values travel as inf
                stored[name] = _c_order(array.astype(target))
    metadata = {"ffm_codec": codec, "ffm_format": FORMAT_VERSION}
    if dense_shapes:
        metadata["ffm_format"] = SPARSE_FORMAT_VERSION
        metadata[_SPARSE_KEY] = json.dumps(dense_shapes, sort_keys=True, separators=(",", ":"))
    return safetensors.numpy.save(stored, metadata=metadata)


def _read_header(data: bytes, limits: WireLimits) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header; return it and the size of the data section."""
    if len(data) > limits.max_frame_bytes:
        raise OversizedError(f"payload of {len(data)} bytes exceeds {limits.max_frame_bytes}")
    if len(data) < 8:
        raise TruncatedError(f"payload of {len(data)} bytes is shorter than the safetensors prefix")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise TruncatedError(f"safetensors header of {header_len} bytes exceeds the payload")
    header = loads_json_object(data[8 : 8 + header_len], "safetensors header")
    return header, len(data) - 8 - header_len


def _read_metadata(metadata: object) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The codec and the dense shapes of the sparse tensors (empty for format 1)."""
    if metadata is None:
        raise MalformedError("payload has no __metadata__ (codec unknown)")
    if not isinstance(metadata, dict):
        raise MalformedError(f"payload metadata must be an object, got {type(metadata).__name__}")
    version = metadata.get("ffm_format")
    if isinstance(version, str) and version not in _FORMATS:
        raise ProtocolVersionError(f"payload format {version!r}; this code reads formats {_FORMATS}")
    optional = (_SPARSE_KEY,) if version == SPARSE_FORMAT_VERSION else ()
    meta = check_keys(metadata, "payload metadata", required=("ffm_codec", "ffm_format", *optional))
    if not all(isinstance(v, str) for v in meta.values()):
        raise MalformedError("payload metadata values must be strings")
    codec = meta["ffm_codec"]
    if codec not in CODECS:
        raise MalformedError(f"unknown codec {codec!r}")
    sparse = _read_sparse_shapes(meta[_SPARSE_KEY]) if optional else {}
    return str(codec), sparse


def _read_sparse_shapes(raw: str) -> dict[str, tuple[int, ...]]:
    """Parse ``ffm_sparse``: a non-empty JSON object of tensor names to dense shapes."""
    shapes = loads_json_object(raw.encode("utf-8"), f"metadata {_SPARSE_KEY}")
    if not shapes:
        raise MalformedError(f"format {SPARSE_FORMAT_VERSION} payload lists no sparse tensor")
    result: dict[str, tuple[int, ...]] = {}
    for name, shape_value in shapes.items():
        if not name or "::" in name or name == _META_KEY:
            raise MalformedError(f"sparse tensor name {name!r} is not allowed")
        if not isinstance(shape_value, list) or len(shape_value) > _MAX_NDIM:
            raise MalformedError(f"sparse tensor {name!r} has an invalid dense shape")
        result[name] = tuple(check_int(d, f"dense dimension of {name!r}", minimum=0) for d in shape_value)
    return result


def _check_sparse_sizes(sparse: Mapping[str, tuple[int, ...]], payload_size: int, limits: WireLimits) -> int:
    """Bound what the sparse tensors decode to, before anything is read; return their dense element count."""
    total = 0
    for shape in sparse.values():
        total += math.prod(shape)
        if total > limits.max_tensor_elements:
            raise OversizedError(f"sparse tensors decode to more than {limits.max_tensor_elements} elements")
    if total > limits.max_sparse_expansion * payload_size:
        raise OversizedError(
            f"sparse tensors decode to {total} elements from a {payload_size}-byte payload; "
            f"limit is {limits.max_sparse_expansion} per byte"
        )
    return total


def _expected_dtypes(codec: str, name: str) -> tuple[str, ...]:
    if name.endswith(INDEX_SUFFIX):
        return _INDEX_DTYPES
    if codec == "int8":
        return ("F32",) if name.endswith(SCALE_SUFFIX) else ("I8",)
    return ("F32",) if codec == "fp32" else ("F16",)


def _base_name(name: str, codec: str, sparse: Mapping[str, tuple[int, ...]]) -> str:
    """``name`` without the one suffix it may carry (``::scale`` with int8, ``::index`` in format 2)."""
    if codec == "int8" and name.endswith(SCALE_SUFFIX):
        return name[: -len(SCALE_SUFFIX)]
    if sparse and name.endswith(INDEX_SUFFIX):
        return name[: -len(INDEX_SUFFIX)]
    return name


def _validate_entries(
    header: dict[str, Any], data_size: int, limits: WireLimits, payload_size: int
) -> tuple[str, dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Check names, dtypes, shapes, offsets and limits; return the codec, ``{name: shape}`` of every stored
    entry, and ``{name: dense shape}`` of the sparse tensors."""
    codec, sparse = _read_metadata(header.pop(_META_KEY, None))
    sparse_elements = _check_sparse_sizes(sparse, payload_size, limits)
    if len(header) > (3 if sparse else 2) * limits.max_tensors:
        raise OversizedError(f"payload holds {len(header)} entries; limit is {limits.max_tensors} tensors")
    shapes: dict[str, tuple[int, ...]] = {}
    spans: list[tuple[int, int]] = []
    elements = 0
    for name, entry in header.items():
        if not name:
            raise MalformedError("empty tensor name")
        base = _base_name(name, codec, sparse)
        if not base or "::" in base:
            raise MalformedError(f"tensor name {name!r} is not allowed with codec {codec}")
        fields = check_keys(entry, f"entry {name!r}", required=("dtype", "shape", "data_offsets"))
        dtype = fields["dtype"]
        dtypes = _expected_dtypes(codec, name)
        if dtype not in dtypes:
            wanted = " or ".join(dtypes)
            raise WrongDtypeError(f"tensor {name!r} has dtype {dtype!r}, expected {wanted} with codec {codec}")
        shape_value = fields["shape"]
        if not isinstance(shape_value, list) or len(shape_value) > _MAX_NDIM:
            raise MalformedError(f"tensor {name!r} has an invalid shape")
        shape = tuple(check_int(d, f"dimension of {name!r}", minimum=0) for d in shape_value)
        count = math.prod(shape)
        elements += count
        if elements > limits.max_tensor_elements:
            raise OversizedError(f"payload exceeds {limits.max_tensor_elements} tensor elements")
        offsets = fields["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise MalformedError(f"tensor {name!r} has invalid data_offsets")
        begin = check_int(offsets[0], f"offset of {name!r}", minimum=0)
        end = check_int(offsets[1], f"offset of {name!r}", minimum=begin)
        if end - begin != count * _ITEMSIZE[dtype]:
            raise MalformedError(f"tensor {name!r} byte size does not match its shape")
        shapes[name] = shape
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise MalformedError("tensor data is not contiguous")
        position = end
    if position > data_size:
        raise TruncatedError(f"tensor data needs {position} bytes, payload has {data_size}")
    if position < data_size:
        raise MalformedError(f"payload has {data_size - position} trailing bytes")
    tensors = {n for n in shapes if _base_name(n, codec, sparse) == n}
    if len(tensors) > limits.max_tensors:
        raise OversizedError(f"payload holds {len(tensors)} tensors; limit is {limits.max_tensors}")
    dense_elements = sum(math.prod(shapes[n]) for n in tensors if n not in sparse)
    if dense_elements + sparse_elements > limits.max_tensor_elements:
        raise OversizedError(f"payload decodes to more than {limits.max_tensor_elements} tensor elements")
    _validate_sparse(shapes, sparse)
    if codec == "int8":
        for name in tensors:
            scale_shape = shapes.get(name + SCALE_SUFFIX)
            if scale_shape is None:
                raise MalformedError(f"int8 tensor {name!r} has no scale")
            allowed = _scale_shapes(shapes[name])
            if scale_shape not in allowed:
                expected = " or ".join(str(s) for s in allowed)
                raise MalformedError(f"scale of {name!r} has shape {scale_shape}, expected {expected}")
        for name in shapes:
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in shapes:
                raise MalformedError(f"scale {name!r} has no tensor")
    return codec, shapes, sparse


def _validate_sparse(shapes: Mapping[str, tuple[int, ...]], sparse: Mapping[str, tuple[int, ...]]) -> None:
    """Each sparse tensor has 1-d values and indices of one length, no more than its dense elements;
    every ``::index`` belongs to a sparse tensor."""
    for name, dense_shape in sparse.items():
        values = shapes.get(name)
        index = shapes.get(name + INDEX_SUFFIX)
        if values is None:
            raise MalformedError(f"sparse tensor {name!r} has no values")
        if index is None:
            raise MalformedError(f"sparse tensor {name!r} has no {INDEX_SUFFIX}")
        if len(values) != 1 or len(index) != 1:
            raise MalformedError(f"sparse tensor {name!r} must store 1-d values and indices")
        if values != index:
            raise MalformedError(f"sparse tensor {name!r} has {values[0]} values but {index[0]} indices")
        if values[0] > math.prod(dense_shape):
            raise MalformedError(f"sparse tensor {name!r} has more values than its dense shape {dense_shape} holds")
    for name in shapes:
        if name.endswith(INDEX_SUFFIX) and name[: -len(INDEX_SUFFIX)] not in sparse:
            raise MalformedError(f"index {name!r} belongs to no sparse tensor")


def _densify(name: str, values: np.ndarray, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The dense float32 array of a sparse tensor, once its indices are known to be sorted, unique, in range."""
    count = math.prod(shape)
    flat_index = index.astype(np.int64)
    if flat_index.size:
        if flat_index[0] < 0 or flat_index[-1] >= count:
            raise MalformedError(f"sparse tensor {name!r} has an index outside its {count} elements")
        if flat_index.size > 1 and not np.all(flat_index[1:] > flat_index[:-1]):
            raise MalformedError(f"sparse tensor {name!r} has indices that are not strictly increasing")
    dense = np.zeros(count, dtype=np.float32)
    dense[flat_index] = values
    return dense.reshape(shape)


def _dequantize(name: str, quantized: np.ndarray, scales: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0) or np.any(scales > _MAX_SCALE):
        raise MalformedError(f"scale of {name!r} must be finite, positive and in range")
    values = quantized.astype(np.float32)
    if quantized.ndim >= 1:
        values *= scales  # validated shapes: (1,), (shape[0], 1, ..., 1) or (1, ..., 1, shape[-1])
        return values
    return np.array(values * scales[0], dtype=np.float32)  # a 0-d product is a scalar; keep an array


def decode_tensors(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Decode a payload from :func:`encode_tensors` into writable float32 arrays, sorted by name.

    Raises :class:`MalformedError`, :class:`TruncatedError`, :class:`OversizedError` or
    :class:`ProtocolVersionError` for bytes that are not a valid payload within ``limits``.
    """
    return decode_payload(data, limits=limits)[1]


def decode_payload(data: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> tuple[str, dict[str, np.ndarray]]:
    """Like :func:`decode_tensors`, and also return the codec the payload declares."""
    header, data_size = _read_header(data, limits)
    codec, shapes, sparse = _validate_entries(header, data_size, limits, len(data))
    try:
        loaded = safetensors.numpy.load(data)
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise MalformedError(f"safetensors rejected the payload: {exc}") from exc
    if set(loaded) != set(shapes):
        raise MalformedError("safetensors returned different tensors than the header lists")
    result: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        if _base_name(name, codec, sparse) != name:
            continue  # a scale or an index, read with its tensor
        if codec == "int8":
            values = _dequantize(name, loaded[name], loaded[name + SCALE_SUFFIX])
        else:
            values = loaded[name].astype(np.float32)
        if name in sparse:
            values = _densify(name, values, loaded[name + INDEX_SUFFIX], sparse[name])
        result[name] = values
    return codec, result
