"""What every training runtime offers the client, with no runtime imported.

:class:`~ffm_edge.trainer.TorchTrainer` (PyTorch) and :class:`~ffm_edge.ort.trainer.OrtTrainer`
(onnxruntime-training, no torch) both satisfy :class:`Trainer`; the client and the hub only ever use
this interface, so they cannot tell the runtimes apart. Kept free of torch so that a device without it
can import the client.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ffm_edge.data import LabeledData

__all__ = ["RUNTIMES", "ProgressCallback", "TrainReport", "Trainer", "UpdateStrategy", "torch_available"]

RUNTIMES = ("auto", "torch", "ort")
"""``auto`` lets the planner choose; ``torch`` and ``ort`` force one."""

ProgressCallback = Callable[[int, int, float], None]
"""Called after each optimizer step with (step, total_steps, loss)."""


def torch_available() -> bool:
    """Whether ``import torch`` can work here, without importing it (an import hook that refuses it counts)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked by an import hook, or a None entry in sys.modules
        return False


@dataclass(frozen=True)
class TrainReport:
    """What one call of a trainer's ``train`` did."""

    num_samples: int
    steps: int
    epochs: int
    mean_loss: float
    first_loss: float
    last_loss: float
    seconds: float


@runtime_checkable
class UpdateStrategy(Protocol):
    """The part of a strategy the client needs: its name and the last transform of a delta."""

    name: str

    def finalize_update(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Trainer(Protocol):
    """The trainer interface the client uses (TorchTrainer and OrtTrainer)."""

    strategy: Any
    batch_size: int
    learning_rate: float

    @property
    def tensor_names(self) -> list[str]: ...

    def num_trainable(self) -> int: ...

    def trainable_state(self) -> dict[str, np.ndarray]: ...

    def load_trainable_state(self, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None: ...

    def train(
        self,
        data: LabeledData,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        progress: ProgressCallback | None = None,
        seed: int | None = None,
    ) -> TrainReport: ...

    def predict(self, data: LabeledData, *, batch_size: int = 64) -> np.ndarray: ...

    def loss(self, data: LabeledData, *, batch_size: int = 64) -> float: ...

    def evaluate(self, data: LabeledData, *, batch_size: int = 64) -> dict[str, float]: ...
