"""Local training with PyTorch: the device-side optimizer loop, and evaluation.

The trainer owns one model prepared by a strategy. Its *trainable state* — the tensors the strategy
trains, under stable names — is what the hub averages and what a global version carries; everything
else is the frozen pretrained base, which every party loads from the same checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ffm_edge.data import LabeledData, TaskInfo
from ffm_edge.errors import ConfigError
from ffm_edge.metrics import compute_metrics
from ffm_edge.modeling import load_base_model
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies import Strategy, get_strategy

__all__ = ["ProgressCallback", "TorchTrainer", "TrainReport", "canonical_tensor_name"]

ProgressCallback = Callable[[int, int, float], None]
"""Called after each optimizer step with (step, total_steps, loss)."""


def canonical_tensor_name(name: str) -> str:
    """The wire name of a parameter: peft's wrapper prefixes and adapter names stripped.

    ``base_model.model.bert...query.lora_A.default.weight`` becomes ``bert...query.lora_A.weight`` and
    ``base_model.model.classifier.modules_to_save.default.weight`` becomes ``classifier.weight``, which
    match the keys of peft's saved adapter format and stay the same for every runtime.
    """
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


@dataclass(frozen=True)
class TrainReport:
    """What one call of :meth:`TorchTrainer.train` did."""

    num_samples: int
    steps: int
    epochs: int
    mean_loss: float
    first_loss: float
    last_loss: float
    seconds: float


class TorchTrainer:
    """Trains one strategy of one model on local data, on the CPU or an accelerator."""

    def __init__(
        self,
        spec: ModelSpec,
        task: TaskInfo,
        strategy: Strategy | str = "lora",
        *,
        seed: int = 0,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        device: str = "cpu",
    ) -> None:
        if task.modality != spec.modality:
            raise ConfigError(f"model {spec.name} is for {spec.modality}, task {task.name} is {task.modality}")
        self.spec = spec
        self.task = task
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.seed = seed
        self.learning_rate = learning_rate or spec.training.learning_rate
        self.batch_size = batch_size or spec.training.batch_size
        self.device = torch.device(device)
        torch.manual_seed(seed)
        base = load_base_model(spec, task.num_labels)
        self._encode = base.encode
        self._logits_of = base.logits_of
        self._freeze_batchnorm = base.freeze_batchnorm
        self.model = self.strategy.prepare(base.module, spec).to(self.device)
        self._params: dict[str, nn.Parameter] = {
            canonical_tensor_name(n): p for n, p in self.model.named_parameters() if p.requires_grad
        }
        if not self._params:
            raise ConfigError(f"strategy {self.strategy.name} left no trainable tensor in {spec.name}")

    # -- the state that travels -------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        """Names of the trainable tensors, in a stable order."""
        return sorted(self._params)

    def num_trainable(self) -> int:
        """Number of trainable scalars (what an update carries)."""
        return sum(p.numel() for p in self._params.values())

    def trainable_state(self) -> dict[str, np.ndarray]:
        """A float32 copy of every trainable tensor."""
        return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in sorted(self._params.items())}

    def load_trainable_state(self, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
        """Overwrite trainable tensors (e.g. with a global version); shapes must match."""
        if strict and set(state) != set(self._params):
            missing = sorted(set(self._params) - set(state))[:3]
            extra = sorted(set(state) - set(self._params))[:3]
            raise ConfigError(f"state does not match the model: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, value in state.items():
                param = self._params.get(name)
                if param is None:
                    continue
                if tuple(value.shape) != tuple(param.shape):
                    raise ConfigError(f"{name}: shape {tuple(value.shape)} != model's {tuple(param.shape)}")
                param.copy_(torch.as_tensor(np.asarray(value), dtype=param.dtype))

    # -- training -----------------------------------------------------------------------------------
    def _set_train_mode(self, training: bool) -> None:
        self.model.train(training)
        if training and self._freeze_batchnorm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
        return nn.functional.cross_entropy(logits, labels.long())

    def _forward(self, data: LabeledData, index: np.ndarray) -> torch.Tensor:
        inputs = data.inputs[index] if isinstance(data.inputs, np.ndarray) else [data.inputs[i] for i in index]
        batch = {k: v.to(self.device) for k, v in self._encode(inputs).items()}
        return self._logits_of(self.model(**batch))

    def train(
        self,
        data: LabeledData,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        progress: ProgressCallback | None = None,
        seed: int | None = None,
    ) -> TrainReport:
        """Run ``epochs`` of AdamW over ``data`` (a fresh optimizer each call, as in FedAvg)."""
        if len(data) == 0:
            raise ConfigError("cannot train on an empty dataset")
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        optimizer = torch.optim.AdamW(
            list(self._params.values()), lr=self.learning_rate, weight_decay=self.spec.training.weight_decay
        )
        steps_per_epoch = math.ceil(len(data) / self.batch_size)
        total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
        labels = torch.as_tensor(data.labels)
        losses: list[float] = []
        started = time.perf_counter()
        self._set_train_mode(True)
        step = 0
        for _ in range(epochs):
            order = rng.permutation(len(data))
            for start in range(0, len(order), self.batch_size):
                if step >= total:
                    break
                index = order[start : start + self.batch_size]
                loss = self._loss(self._forward(data, index), labels[index].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step, total, losses[-1])
        self._set_train_mode(False)
        return TrainReport(
            num_samples=len(data),
            steps=step,
            epochs=epochs,
            mean_loss=float(np.mean(losses)),
            first_loss=losses[0],
            last_loss=losses[-1],
            seconds=time.perf_counter() - started,
        )

    @torch.no_grad()
    def predict(self, data: LabeledData, *, batch_size: int = 64) -> np.ndarray:
        """Class ids (or regression scores) for every example."""
        self._set_train_mode(False)
        out: list[np.ndarray] = []
        for start in range(0, len(data), batch_size):
            logits = self._forward(data, np.arange(start, min(start + batch_size, len(data))))
            if self.task.num_labels == 1:
                out.append(logits.squeeze(-1).float().cpu().numpy())
            else:
                out.append(logits.argmax(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def evaluate(self, data: LabeledData, *, batch_size: int = 64) -> dict[str, float]:
        """The task's metrics on ``data``."""
        return compute_metrics(self.task.metrics, self.predict(data, batch_size=batch_size), data.labels)
