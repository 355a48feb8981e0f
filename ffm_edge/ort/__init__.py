"""On-device training without PyTorch, on onnxruntime-training.

A machine with torch (the hub, a developer's laptop) exports a model spec and strategy once to ONNX
training artifacts (:mod:`ffm_edge.ort.artifacts`); a device loads them with :class:`OrtTrainer` and trains
the same tensors, under the same names, as :class:`ffm_edge.trainer.TorchTrainer`, so its updates are
indistinguishable on the wire. A device can also ask a hub for them (:func:`fetch_artifacts`). Nothing
here imports torch except the builder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "MANIFEST_NAME",
    "ArtifactManifest",
    "OrtTrainer",
    "build_artifacts",
    "check_onnx_version",
    "fetch_artifacts",
    "fetch_artifacts_from_hub",
    "load_manifest",
    "load_training_api",
    "ort_runtime_problem",
]

_EXPORTS = {
    "MANIFEST_NAME": "ffm_edge.ort.manifest",
    "ArtifactManifest": "ffm_edge.ort.manifest",
    "load_manifest": "ffm_edge.ort.manifest",
    "OrtTrainer": "ffm_edge.ort.trainer",
    "build_artifacts": "ffm_edge.ort.artifacts",
    "check_onnx_version": "ffm_edge.ort.compat",
    "fetch_artifacts": "ffm_edge.ort.fetch",
    "fetch_artifacts_from_hub": "ffm_edge.ort.fetch",
    "load_training_api": "ffm_edge.ort.compat",
    "ort_runtime_problem": "ffm_edge.ort.compat",
}

if TYPE_CHECKING:
    from ffm_edge.ort.artifacts import build_artifacts
    from ffm_edge.ort.compat import check_onnx_version, load_training_api, ort_runtime_problem
    from ffm_edge.ort.fetch import fetch_artifacts, fetch_artifacts_from_hub
    from ffm_edge.ort.manifest import MANIFEST_NAME, ArtifactManifest, load_manifest
    from ffm_edge.ort.trainer import OrtTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ffm_edge.ort' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
