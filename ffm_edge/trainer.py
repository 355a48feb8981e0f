"""Local training with PyTorch: the device-side optimizer loop, and evaluation.

The trainer owns one model prepared by a strategy. Its *trainable state* — the tensors the strategy
trains, under stable names — is what the hub averages and what a global version carries; everything
else is the frozen pretrained base, which every party loads from the same checkpoint.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ffm_edge.data import LabeledData, TaskInfo
from ffm_edge.errors import ConfigError
from ffm_edge.metrics import compute_metrics
from ffm_edge.modeling import BaseModel, load_base_model
from ffm_edge.runtime import ProgressCallback, TrainReport
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies import Strategy, get_strategy
from ffm_edge.strategies.lora import is_kbit_model

__all__ = ["ProgressCallback", "TorchTrainer", "TrainReport", "canonical_tensor_name", "enable_gradient_checkpointing"]

log = logging.getLogger("ffm.trainer")


_PROMPT_EMBEDDING = re.compile(r"^prompt_encoder\.[^.]+\.embedding\.weight$")


def canonical_tensor_name(name: str) -> str:
    """The wire name of a parameter: peft's wrapper prefixes and adapter names stripped.

    ``base_model.model.bert...query.lora_A.default.weight`` becomes ``bert...query.lora_A.weight`` and
    ``base_model.model.classifier.modules_to_save.default.weight`` becomes ``classifier.weight`` (LoRA);
    a prompt-tuning model's ``prompt_encoder.default.embedding.weight`` becomes ``prompt_embeddings`` and
    ``base_model.classifier.modules_to_save.default.weight`` becomes ``classifier.weight``. These match
    the keys of peft's saved adapter format less its ``base_model.model.`` / ``base_model.`` prefix (and
    the function maps those keys to the same names), and stay the same for every runtime. A plain
    model's own parameter names (``head``, ``full_q8``) pass through unchanged.
    """
    if _PROMPT_EMBEDDING.match(name):
        return "prompt_embeddings"
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    elif name.startswith("base_model."):
        name = name[len("base_model.") :]
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Turn on non-reentrant gradient checkpointing if the (possibly peft-wrapped) model supports it.

    Uses transformers' ``activation_checkpointing_enable`` (5.x) or ``gradient_checkpointing_enable``
    (older), with ``use_reentrant=False`` (no need for inputs that require grad, so frozen embeddings
    are fine). Returns whether it was enabled; models that are not transformers models (EfficientNet)
    are left as they are, with a warning.
    """
    get_base = getattr(model, "get_base_model", None)
    target = get_base() if callable(get_base) else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; training without it", type(target).__name__)
        return False
    enable = getattr(target, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return True
    enable = getattr(target, "gradient_checkpointing_enable", None)
    if not callable(enable):  # pragma: no cover - every transformers model has one of the two
        log.warning("%s has no way to enable gradient checkpointing", type(target).__name__)
        return False
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


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
        micro_batch_size: int | None = None,
        device: str = "cpu",
    ) -> None:
        if task.modality != spec.modality:
            raise ConfigError(f"model {spec.name} is for {spec.modality}, task {task.name} is {task.modality}")
        self.spec = spec
        self.task = task
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.strategy.validate_spec(spec)
        self.seed = seed
        self.learning_rate = learning_rate or spec.training.learning_rate * self.strategy.lr_scale
        self.batch_size = batch_size or spec.training.batch_size
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.micro_batch_size = micro_batch_size
        self.device = torch.device(device)
        torch.manual_seed(seed)
        base = self._load_base(spec, task.num_labels)
        self._encode = base.encode
        self._logits_of = base.logits_of
        self._freeze_batchnorm = base.freeze_batchnorm
        self._compute_dtype = self.strategy.compute_dtype
        model = self.strategy.prepare(base.module, spec)
        # bitsandbytes places a quantized model when loading it, and transformers refuses to move some.
        self.model = model if is_kbit_model(model) else model.to(self.device)
        self.gradient_checkpointing = (
            enable_gradient_checkpointing(self.model) if self.strategy.gradient_checkpointing else False
        )
        self._params: dict[str, nn.Parameter] = {
            canonical_tensor_name(n): p for n, p in self.model.named_parameters() if p.requires_grad
        }
        # For weights held below fp32 (bf16): what a loaded fp32 state lost in the cast, added back by
        # trainable_state() so a delta carries the training, not the rounding of the global version.
        self._residual: dict[str, torch.Tensor] = {}
        if not self._params:
            raise ConfigError(f"strategy {self.strategy.name} left no trainable tensor in {spec.name}")

    def _load_base(self, spec: ModelSpec, num_labels: int) -> BaseModel:
        precision = self.strategy.base_precision
        if precision == "fp32":  # the plain call: works with every version of the loader
            return load_base_model(spec, num_labels)
        if "precision" not in inspect.signature(load_base_model).parameters:
            raise ConfigError(
                f"strategy {self.strategy.name} wants a {precision} base, but this ffm_edge.modeling cannot "
                "load quantized bases yet (load_base_model has no precision argument)"
            )
        loader: Callable[..., BaseModel] = load_base_model
        return loader(spec, num_labels, precision=precision)

    @property
    def micro_batch_size(self) -> int:
        """At most this many examples go through the model at once (gradient accumulation)."""
        return self._micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None) -> None:
        """``None`` means the whole batch; a value above ``batch_size`` is the whole batch too."""
        if value is None:
            self._micro_batch_size = self.batch_size
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"micro_batch_size must be an int >= 1 or None, got {value!r}")
        self._micro_batch_size = min(value, self.batch_size)

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
        out: dict[str, np.ndarray] = {}
        for name, param in sorted(self._params.items()):
            value = param.detach().to("cpu", torch.float32)
            residual = self._residual.get(name)
            if residual is not None:
                value = value + residual.to(torch.float32)
            out[name] = value.numpy().copy()
        return out

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
                exact = torch.as_tensor(np.asarray(value), dtype=torch.float32)
                param.copy_(exact.to(param.device, param.dtype))
                if param.dtype != torch.float32:
                    self._residual[name] = (exact - param.detach().to("cpu", torch.float32)).to(param.dtype)

    # -- training -----------------------------------------------------------------------------------
    def _set_train_mode(self, training: bool) -> None:
        self.model.train(training)
        if training and self._freeze_batchnorm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task.num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
        return nn.functional.cross_entropy(logits, labels.long())

    def _forward(self, data: LabeledData, index: np.ndarray) -> torch.Tensor:
        inputs = data.inputs[index] if isinstance(data.inputs, np.ndarray) else [data.inputs[i] for i in index]
        batch: dict[str, Any] = {
            k: v.to(self.device, self._compute_dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in self._encode(inputs).items()
        }
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
        """Run ``epochs`` over ``data`` with the strategy's optimizer (a fresh one each call, as in FedAvg).

        Each optimizer step covers ``batch_size`` examples; they go through the model in micro-batches of
        at most ``micro_batch_size``, whose gradients are accumulated (each micro-batch's mean loss
        weighted by its share of the batch, so the step equals a full-batch step; BatchNorm layers left
        in train mode would see micro-batch statistics, which is why specs freeze them).
        """
        if len(data) == 0:
            raise ConfigError("cannot train on an empty dataset")
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        optimizer = self.strategy.make_optimizer(
            list(self._params.values()), self.learning_rate, self.spec.training.weight_decay
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
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                for micro in range(0, len(index), self.micro_batch_size):
                    part = index[micro : micro + self.micro_batch_size]
                    loss = self._loss(self._forward(data, part), labels[part].to(self.device))
                    loss = loss * (len(part) / len(index))
                    loss.backward()
                    batch_loss += float(loss.detach())
                optimizer.step()
                step += 1
                losses.append(batch_loss)
                if progress is not None:
                    progress(step, total, losses[-1])
        optimizer.zero_grad(set_to_none=True)  # gradients are not kept between rounds
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
    def loss(self, data: LabeledData, *, batch_size: int = 64) -> float:
        """The mean training loss over ``data`` in eval mode (no dropout, no update)."""
        if len(data) == 0:
            raise ConfigError("cannot compute a loss on an empty dataset")
        self._set_train_mode(False)
        labels = torch.as_tensor(data.labels)
        total = 0.0
        for start in range(0, len(data), batch_size):
            index = np.arange(start, min(start + batch_size, len(data)))
            total += float(self._loss(self._forward(data, index), labels[index].to(self.device))) * len(index)
        return total / len(data)

    @torch.no_grad()
    def evaluate(self, data: LabeledData, *, batch_size: int = 64) -> dict[str, float]:
        """The task's metrics on ``data``."""
        return compute_metrics(self.task.metrics, self.predict(data, batch_size=batch_size), data.labels)
