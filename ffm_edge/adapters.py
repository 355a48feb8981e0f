"""Interoperable artifacts: peft adapter folders for ``lora`` and ``prompt``, whole models for the rest.

A peft adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; anyone can load
it onto the same base model with ``peft.PeftModel.from_pretrained(base_model, folder)``. Three ways to
get one:

* :func:`save_adapter` — a trained :class:`~ffm_edge.trainer.TorchTrainer`'s adapter, written by peft
  itself (``trainer.model.save_pretrained``).
* :func:`save_state_as_adapter` — a *federated global state* (our canonical tensor names, e.g. what the
  hub publishes) written as an adapter folder without loading the model: the canonical names are peft's
  own file keys less the ``base_model.model.`` (LoRA) or ``base_model.`` (prompt tuning) prefix, and
  the config is the one the strategy applies. The config's ``base_model_name_or_path`` is the spec's
  hub id when it has one (portable), else its local checkpoint.
* :func:`load_adapter` — the reverse: an adapter folder (ours or anyone's, if it matches the strategy's
  config) loaded into a trainer's trainable tensors.

``head`` and ``full_q8`` do not produce peft adapters (no peft wrapper is involved): their artifact is
the whole model, :func:`save_full_model` (``save_pretrained``), or ``trainer.trainable_state()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ffm_edge.data import TaskInfo
from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies import LoraStrategy, PromptStrategy, Strategy, get_strategy

if TYPE_CHECKING:
    from ffm_edge.trainer import TorchTrainer

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "load_adapter",
    "save_adapter",
    "save_full_model",
    "save_state_as_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft_strategy(strategy: Strategy) -> LoraStrategy | PromptStrategy:
    if isinstance(strategy, LoraStrategy | PromptStrategy):
        return strategy
    if strategy.name == "full_q8":
        raise ConfigError(
            "full_q8 trains every weight of a plain model, so there is no peft adapter to save; save the whole "
            "model with save_full_model (save_pretrained) instead"
        )
    if strategy.name == "head":
        raise ConfigError(
            "head trains only the task head of a plain (unwrapped) model, so there is no peft adapter to save; "
            "save trainer.trainable_state() or the whole model with save_full_model instead"
        )
    raise ConfigError(f"strategy {strategy.name!r} has no peft adapter format")


def save_adapter(trainer: TorchTrainer, folder: str | Path) -> Path:
    """Write the trainer's adapter in peft's own format (``lora`` and ``prompt`` only); returns the folder."""
    _peft_strategy(trainer.strategy)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save = getattr(trainer.model, "save_pretrained", None)
    if not callable(save):  # pragma: no cover - lora and prompt always give a PeftModel
        raise ConfigError(f"the {trainer.strategy.name} model of {trainer.spec.name} cannot save_pretrained")
    save(str(path), safe_serialization=True)
    return path


def _same_targets(a: object, b: object) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return set(a or ()) == set(b or ())  # type: ignore[call-overload]


def load_adapter(trainer: TorchTrainer, folder: str | Path) -> None:
    """Load a peft adapter folder into ``trainer``'s trainable tensors.

    The folder's config must be the strategy's (peft type; LoRA rank, alpha and target modules) and its
    weights must be exactly the trainer's tensors, with the same shapes; otherwise :class:`ConfigError`.
    """
    import peft
    import torch
    from peft.utils import load_peft_weights

    from ffm_edge.trainer import canonical_tensor_name

    strategy = _peft_strategy(trainer.strategy)
    path = Path(folder)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{path} is not a peft adapter folder (no {ADAPTER_CONFIG})")
    try:
        saved = peft.PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the adapter config in {path}: {exc}") from exc
    expected = strategy.peft_config(trainer.spec)
    if saved.peft_type != expected.peft_type:
        raise ConfigError(f"{path} is a {saved.peft_type} adapter; the trainer's strategy needs {expected.peft_type}")
    if isinstance(expected, peft.LoraConfig):
        for key in ("r", "lora_alpha"):
            if getattr(saved, key) != getattr(expected, key):
                raise ConfigError(f"{path}: {key} is {getattr(saved, key)}, the trainer's is {getattr(expected, key)}")
        if not _same_targets(saved.target_modules, expected.target_modules):
            raise ConfigError(
                f"{path}: target_modules {saved.target_modules} differ from the trainer's {expected.target_modules}"
            )
    try:
        weights = load_peft_weights(str(path), device="cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the adapter weights in {path}: {exc}") from exc
    state = {canonical_tensor_name(k): v.detach().to(torch.float32).numpy() for k, v in weights.items()}
    trainer.load_trainable_state(state, strict=True)


def _check_state(
    strategy: LoraStrategy | PromptStrategy, spec: ModelSpec, state: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Check names, values and (for prompts) the shape of a canonical state; float32 copies of it."""
    if not state:
        raise ConfigError("the state is empty")
    expected = strategy.peft_config(spec)
    heads = tuple(expected.modules_to_save or ())
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise ConfigError(f"{name}: expected floating-point values, got {array.dtype}")
        if not np.isfinite(array).all():
            raise ConfigError(f"{name}: NaN or Inf values")
        module = name.rsplit(".", 1)[0]
        in_head = any(f".{h}." in f".{module}." for h in heads)  # whole name components only
        if isinstance(strategy, LoraStrategy):
            known = ".lora_A." in name or ".lora_B." in name or in_head
        else:
            known = name == "prompt_embeddings" or in_head
        if not known:
            raise ConfigError(f"{name} is not a tensor of a {strategy.name} adapter for {spec.name}")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    if isinstance(strategy, PromptStrategy):
        prompt = out.get("prompt_embeddings")
        tokens = strategy.config.num_virtual_tokens
        if prompt is None or prompt.ndim != 2 or prompt.shape[0] != tokens:
            shape = None if prompt is None else prompt.shape
            raise ConfigError(f"prompt_embeddings must have shape ({tokens}, hidden), got {shape}")
    return out


def save_state_as_adapter(
    spec: ModelSpec,
    task: TaskInfo,
    strategy: Strategy | str,
    state: Mapping[str, np.ndarray],
    folder: str | Path,
) -> Path:
    """Write a federated state (canonical tensor names) as a peft adapter folder, without loading the model.

    ``strategy`` must be ``lora`` or ``prompt`` with the config the federation trained (the adapter's
    config comes from it and ``spec``). Shapes are checked by peft when the adapter is loaded onto the
    base model (and by :func:`load_adapter`). Returns the folder.
    """
    from safetensors.numpy import save_file

    chosen = get_strategy(strategy) if isinstance(strategy, str) else strategy
    peft_strategy = _peft_strategy(chosen)
    peft_strategy.validate_spec(spec)
    if task.modality != spec.modality:
        raise ConfigError(f"model {spec.name} is for {spec.modality}, task {task.name} is {task.modality}")
    arrays = _check_state(peft_strategy, spec, state)
    config = peft_strategy.peft_config(spec)
    config.base_model_name_or_path = spec.hub_id or spec.resolve_checkpoint()
    config.inference_mode = True  # as peft writes it
    if isinstance(peft_strategy, LoraStrategy):
        tensors = {"base_model.model." + name: value for name, value in arrays.items()}
    else:
        tensors = {
            name if name == "prompt_embeddings" else "base_model." + name: value for name, value in arrays.items()
        }
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return path


def save_full_model(trainer: TorchTrainer, folder: str | Path) -> Path:
    """Write the whole trained model with ``save_pretrained`` (``full_q8`` and ``head``); returns the folder.

    The folder loads with ``AutoModelForSequenceClassification.from_pretrained``. Adapter strategies
    save adapters instead (:func:`save_adapter`); models that are not transformers models (EfficientNet)
    have no ``save_pretrained`` — save ``trainer.trainable_state()`` for them.
    """
    if trainer.strategy.peft_adapter:
        raise ConfigError(f"strategy {trainer.strategy.name!r} trains a peft adapter: save it with save_adapter")
    save = getattr(trainer.model, "save_pretrained", None)
    if not callable(save):
        raise ConfigError(
            f"{trainer.spec.name} is not a transformers model and has no save_pretrained; "
            "save trainer.trainable_state() instead"
        )
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save(str(path))
    return path
