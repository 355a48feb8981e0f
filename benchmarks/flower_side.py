"""Flower's side of ``benchmarks/bandwidth.py``: what Flower puts in ``Parameters`` for the same tensors.

Run with the Python of a separate virtualenv that has ``flwr==1.42.*``, ``safetensors`` and ``numpy``
(flwr and the project's amqtt need incompatible ``typer`` versions, so Flower cannot live in the project's
venv). It reads float32 tensors from a safetensors file, serializes them the way a Flower client does for
its trainable tensors (``flwr.common.ndarrays_to_parameters`` on a list of numpy arrays), deserializes
them again (``parameters_to_ndarrays``), and prints one JSON object with the sizes and timings on stdout.

This script imports nothing from FFM: it must run in an environment where FFM is not installed.

    benchmarks/.flower-venv/bin/python benchmarks/flower_side.py TENSORS.safetensors --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any


def measure(path: str, repeats: int) -> dict[str, Any]:
    """Serialize the tensors in ``path`` with Flower ``repeats`` times; sizes, timings and a round-trip check."""
    import flwr
    import numpy as np
    import safetensors.numpy
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    loaded = safetensors.numpy.load_file(path)
    names = sorted(loaded)  # the order FFM uses too; Flower sends a plain list, without names
    arrays = [np.ascontiguousarray(loaded[name], dtype=np.float32) for name in names]

    serialize_s: list[float] = []
    deserialize_s: list[float] = []
    parameters = None
    restored: list[Any] = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        parameters = ndarrays_to_parameters(arrays)
        serialize_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        restored = parameters_to_ndarrays(parameters)
        deserialize_s.append(time.perf_counter() - started)
    assert parameters is not None

    exact = len(restored) == len(arrays) and all(
        r.dtype == a.dtype and r.shape == a.shape and np.array_equal(r, a)
        for r, a in zip(restored, arrays, strict=True)
    )
    tensor_bytes = sum(len(t) for t in parameters.tensors)
    tensor_type_bytes = len(parameters.tensor_type.encode("utf-8"))
    result: dict[str, Any] = {
        "flwr_version": flwr.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "api": "flwr.common.ndarrays_to_parameters / parameters_to_ndarrays",
        "tensor_type": parameters.tensor_type,
        "num_tensors": len(parameters.tensors),
        "num_elements": int(sum(a.size for a in arrays)),
        "raw_float32_bytes": int(sum(a.nbytes for a in arrays)),
        "tensors_bytes": tensor_bytes,
        "tensor_type_bytes": tensor_type_bytes,
        "total_bytes": tensor_bytes + tensor_type_bytes,
        "serialize_ms": 1000 * statistics.median(serialize_s),
        "deserialize_ms": 1000 * statistics.median(deserialize_s),
        "repeats": max(1, repeats),
        "roundtrip_exact": bool(exact),
    }
    # The protobuf message the legacy gRPC API puts on the wire for these Parameters (gRPC/HTTP2 framing
    # and the surrounding FitRes fields not counted). Optional: it depends on Flower's internal serde.
    try:
        from flwr.common.serde import parameters_to_proto

        result["protobuf_bytes"] = int(parameters_to_proto(parameters).ByteSize())
    except Exception as exc:  # pragma: no cover - only when Flower moves its serde
        result["protobuf_bytes"] = None
        result["protobuf_error"] = f"{type(exc).__name__}: {exc}"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure Flower's Parameters for the float32 tensors in a safetensors file; print JSON.",
    )
    parser.add_argument("tensors", help="safetensors file with float32 tensors (written by bandwidth.py)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repetitions; the median is reported")
    args = parser.parse_args(argv)
    json.dump(measure(args.tensors, args.repeats), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
