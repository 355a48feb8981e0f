"""FFM edge SDK: take part in a federation from a device app.

The public names load lazily, so ``import ffm_edge.wire`` (the wire format), the client and the ORT
runtime (``ffm_edge.ort``) stay free of torch for devices that cannot ship it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "EdgeClient": "ffm_edge.client",
    "ProgressEvent": "ffm_edge.client",
    "RoundResult": "ffm_edge.client",
    "ModelSpec": "ffm_edge.spec",
    "load_model_spec": "ffm_edge.spec",
    "available_specs": "ffm_edge.spec",
    "LabeledData": "ffm_edge.data",
    "TaskInfo": "ffm_edge.data",
    "get_task": "ffm_edge.data",
    "load_split": "ffm_edge.data",
    "dirichlet_partition": "ffm_edge.data",
    "TorchTrainer": "ffm_edge.trainer",
    "OrtTrainer": "ffm_edge.ort.trainer",
    "FFMError": "ffm_edge.errors",
    "RejectedUpdateError": "ffm_edge.errors",
    "TransportError": "ffm_edge.errors",
}

__all__ = [
    "EdgeClient",
    "FFMError",
    "LabeledData",
    "ModelSpec",
    "OrtTrainer",
    "ProgressEvent",
    "RejectedUpdateError",
    "RoundResult",
    "TaskInfo",
    "TorchTrainer",
    "TransportError",
    "available_specs",
    "dirichlet_partition",
    "get_task",
    "load_model_spec",
    "load_split",
]

if TYPE_CHECKING:
    from ffm_edge.client import EdgeClient, ProgressEvent, RoundResult
    from ffm_edge.data import LabeledData, TaskInfo, dirichlet_partition, get_task, load_split
    from ffm_edge.errors import FFMError, RejectedUpdateError, TransportError
    from ffm_edge.ort.trainer import OrtTrainer
    from ffm_edge.spec import ModelSpec, available_specs, load_model_spec
    from ffm_edge.trainer import TorchTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ffm_edge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
