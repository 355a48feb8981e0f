"""Local training on onnxruntime-training, without PyTorch: :class:`OrtTrainer`.

Same interface as :class:`ffm_edge.trainer.TorchTrainer` (:class:`ffm_edge.runtime.Trainer`): the same
tensor names, the same float32 trainable state, the same optimizer (AdamW in torch's formulation, a
fresh one per :meth:`OrtTrainer.train` call as in FedAvg), the same shuffling of batches for a seed.
So the update a device sends, encoded by the same wire codec, cannot be told apart from a torch
device's. Text models only; the tokenizer is the model's own fast tokenizer (``tokenizers``, saved
with the artifacts), so tokenization needs neither torch nor transformers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ffm_edge.data import LabeledData, TaskInfo
from ffm_edge.errors import ConfigError, OrtArtifactError, OrtUnavailableError
from ffm_edge.metrics import compute_metrics
from ffm_edge.ort.compat import load_training_api
from ffm_edge.ort.manifest import PIXELS_INPUT, ArtifactManifest, load_manifest
from ffm_edge.runtime import ProgressCallback, TrainReport
from ffm_edge.spec import ModelSpec

__all__ = ["OrtStrategy", "OrtTrainer"]

log = logging.getLogger("ffm.ort.trainer")


@dataclass(frozen=True)
class OrtStrategy:
    """The strategy an ORT trainer trains, as the client sees it (name, config, delta transform).

    ``lora``, ``prompt`` and ``head`` send their delta unchanged, so no strategy class (and no torch) is
    needed on the device.
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def finalize_update(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The delta as it travels: unchanged for the strategies this runtime trains."""
        return dict(delta)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for logs and manifests."""
        return {"strategy": self.name, **{k: v for k, v in self.config.items() if k != "strategy"}}


class _Tokenizer:
    """The model's fast tokenizer, configured as the torch path calls it (truncate, pad to the longest)."""

    def __init__(self, folder: Path, manifest: ArtifactManifest) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise OrtUnavailableError("the ORT runtime needs the tokenizers package (pip install tokenizers)") from exc
        info = manifest.tokenizer
        path = folder / str(info.get("folder", "tokenizer")) / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise OrtArtifactError(f"cannot load the tokenizer {path}: {exc}") from exc
        self._tok.enable_truncation(
            max_length=manifest.max_length, strategy="longest_first", direction=info.get("truncation_side", "right")
        )
        self._tok.enable_padding(
            pad_id=int(info["pad_token_id"]),
            pad_token=str(info["pad_token"]),
            direction=info.get("padding_side", "right"),
        )
        self._inputs = manifest.inputs

    def __call__(self, pairs: Sequence[tuple[str, str | None]]) -> dict[str, np.ndarray]:
        if any(second is not None for _, second in pairs):
            encodings = self._tok.encode_batch([(a, b if b is not None else "") for a, b in pairs])
        else:
            encodings = self._tok.encode_batch([a for a, _ in pairs])
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(columns[name], dtype=np.int64) for name in self._inputs}


class OrtTrainer:
    """Trains a strategy from prebuilt ORT training artifacts (see :mod:`ffm_edge.ort.artifacts`).

    ``artifacts`` is the folder the builder wrote. ``spec``, ``strategy`` and ``task`` are checked against
    its manifest (an :class:`OrtArtifactError` names the mismatch); ``learning_rate`` and ``batch_size``
    default to what a TorchTrainer would use (recorded in the manifest). ``threads`` sets ORT's
    intra-op threads (``None``: ORT's default).
    """

    def __init__(
        self,
        artifacts: str | Path,
        task: TaskInfo,
        *,
        spec: ModelSpec | str | None = None,
        strategy: str | None = None,
        seed: int = 0,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(artifacts)
        self.manifest = load_manifest(self.folder, verify=verify)
        spec_name = spec if isinstance(spec, str) or spec is None else spec.name
        self.manifest.check(spec=spec_name, strategy=strategy, num_labels=task.num_labels)
        self._pixels = PIXELS_INPUT in self.manifest.inputs  # an image model's graph takes raw pixels
        if task.modality != ("image" if self._pixels else "text"):
            built = "an image" if self._pixels else "a text"
            raise ConfigError(f"these ORT artifacts are for {built} model; task {task.name} is {task.modality}")
        self.task = task
        self.strategy = OrtStrategy(self.manifest.strategy, dict(self.manifest.strategy_config))
        self.seed = seed
        self.learning_rate = float(learning_rate or self.manifest.training["learning_rate"])
        self.batch_size = int(batch_size or self.manifest.training["batch_size"])
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.micro_batch_size = self.batch_size  # ORT trains whole batches (no accumulation levers)
        self.gradient_checkpointing = False
        self._api = load_training_api()
        options = self._api.SessionOptions()
        options.log_severity_level = 3  # warnings about unused export constants are not for the app's log
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._state = self._api.CheckpointState.load_checkpoint(str(self.folder / "checkpoint"))
            self._module = self._api.Module(
                str(self.folder / "training_model.onnx"),
                self._state,
                str(self.folder / "eval_model.onnx"),
                device="cpu",
                session_options=options,
            )
        except Exception as exc:
            raise OrtArtifactError(f"onnxruntime cannot load the artifacts in {self.folder}: {exc}") from exc
        self._shapes = {t.name: t.shape for t in self.manifest.tensors}
        params = self._state.parameters
        missing = [name for name in self._shapes if name not in params]
        if missing:
            raise OrtArtifactError(f"the checkpoint in {self.folder} lacks trainable tensors {missing[:3]}")
        for name, shape in self._shapes.items():
            parameter = params[name]
            if not parameter.requires_grad or tuple(parameter.data.shape) != shape:
                raise OrtArtifactError(f"checkpoint tensor {name} does not match the manifest (shape or trainable)")
        self._tokenize = None if self._pixels else _Tokenizer(self.folder, self.manifest)
        self._train_inputs = list(self._module.input_names())
        self._module.eval()
        self._eval_inputs = list(self._module.input_names())

    # -- the state that travels -------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        """Names of the trainable tensors, in a stable order (the same as TorchTrainer's)."""
        return sorted(self._shapes)

    def num_trainable(self) -> int:
        """Number of trainable scalars (what an update carries)."""
        return self.manifest.num_trainable

    def trainable_state(self) -> dict[str, np.ndarray]:
        """A float32 copy of every trainable tensor."""
        params = self._state.parameters
        return {name: np.array(params[name].data, dtype=np.float32, copy=True) for name in self.tensor_names}

    def load_trainable_state(self, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
        """Overwrite trainable tensors in place (e.g. with a global version); shapes must match."""
        if strict and set(state) != set(self._shapes):
            missing = sorted(set(self._shapes) - set(state))[:3]
            extra = sorted(set(state) - set(self._shapes))[:3]
            raise ConfigError(f"state does not match the model: missing {missing}, unexpected {extra}")
        params = self._state.parameters
        for name, value in state.items():
            shape = self._shapes.get(name)
            if shape is None:
                continue
            array = np.ascontiguousarray(value, dtype=np.float32)
            if tuple(array.shape) != shape:
                raise ConfigError(f"{name}: shape {tuple(array.shape)} != model's {shape}")
            params[name] = array

    # -- training ---------------------------------------------------------------------------------------
    def _feeds(self, data: LabeledData, index: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if self._tokenize is None:  # uint8 (N, H, W, 3); the graph resizes and normalizes
            encoded = {PIXELS_INPUT: np.ascontiguousarray(data.images[index], dtype=np.float32)}
        elif isinstance(data.inputs, list):
            encoded = self._tokenize([data.inputs[i] for i in index])
        else:
            raise ConfigError("these ORT artifacts are for a text model; the data are not text pairs")
        labels = np.asarray(data.labels)[index]
        if self.task.num_labels == 1:
            encoded["labels"] = labels.astype(np.float32).reshape(-1, 1)
        else:
            encoded["labels"] = labels.astype(np.int64)
        feeds = []
        for name in names:
            if name not in encoded:
                raise OrtArtifactError(f"the ORT graph wants an input {name!r} this runtime does not make")
            feeds.append(encoded[name])
        return feeds

    def _new_optimizer(self) -> Any:
        """A fresh AdamW (zero moments, step 0) over the module, like a new torch optimizer each round."""
        optimizer = self._api.Optimizer(str(self.folder / "optimizer_model.onnx"), self._module)
        optimizer.set_learning_rate(self.learning_rate)
        return optimizer

    def train(
        self,
        data: LabeledData,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        progress: ProgressCallback | None = None,
        seed: int | None = None,
    ) -> TrainReport:
        """Run ``epochs`` over ``data`` (batches shuffled exactly as TorchTrainer shuffles them for ``seed``)."""
        if len(data) == 0:
            raise ConfigError("cannot train on an empty dataset")
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        from onnxruntime.capi import _pybind_state

        run_seed = self.seed if seed is None else seed
        rng = np.random.default_rng(run_seed)
        _pybind_state.set_seed(int(run_seed))  # dropout masks in the training graph
        optimizer = self._new_optimizer()
        steps_per_epoch = math.ceil(len(data) / self.batch_size)
        total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
        losses: list[float] = []
        started = time.perf_counter()
        self._module.train()
        step = 0
        for _ in range(epochs):
            order = rng.permutation(len(data))
            for start in range(0, len(order), self.batch_size):
                if step >= total:
                    break
                index = order[start : start + self.batch_size]
                self._module.lazy_reset_grad()
                outputs = self._module(*self._feeds(data, index, self._train_inputs))
                optimizer.step()
                step += 1
                losses.append(float(np.asarray(outputs[0])))
                if progress is not None:
                    progress(step, total, losses[-1])
        self._module.eval()
        return TrainReport(
            num_samples=len(data),
            steps=step,
            epochs=epochs,
            mean_loss=float(np.mean(losses)),
            first_loss=losses[0],
            last_loss=losses[-1],
            seconds=time.perf_counter() - started,
        )

    def _eval_outputs(self, data: LabeledData, index: np.ndarray) -> tuple[float, np.ndarray]:
        self._module.eval()
        loss, logits = self._module(*self._feeds(data, index, self._eval_inputs))
        return float(np.asarray(loss)), np.asarray(logits)

    def predict(self, data: LabeledData, *, batch_size: int = 64) -> np.ndarray:
        """Class ids (or regression scores) for every example."""
        out: list[np.ndarray] = []
        for start in range(0, len(data), batch_size):
            _, logits = self._eval_outputs(data, np.arange(start, min(start + batch_size, len(data))))
            out.append(logits[:, 0] if self.task.num_labels == 1 else logits.argmax(-1))
        return np.concatenate(out) if out else np.zeros(0)

    def loss(self, data: LabeledData, *, batch_size: int = 64) -> float:
        """The mean training loss over ``data`` in eval mode (no dropout, no update)."""
        if len(data) == 0:
            raise ConfigError("cannot compute a loss on an empty dataset")
        total = 0.0
        for start in range(0, len(data), batch_size):
            index = np.arange(start, min(start + batch_size, len(data)))
            total += self._eval_outputs(data, index)[0] * len(index)
        return total / len(data)

    def evaluate(self, data: LabeledData, *, batch_size: int = 64) -> dict[str, float]:
        """The task's metrics on ``data``."""
        return compute_metrics(self.task.metrics, self.predict(data, batch_size=batch_size), data.labels)
