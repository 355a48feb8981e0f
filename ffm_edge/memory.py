"""Predict peak memory of local training, per strategy, before any weight is loaded.

The model is deliberately simple — a sum of parts a person can check — and its constants come from
the model spec's ``[memory]`` table plus a few per-family defaults that the memory benchmark
(``benchmarks/memory.py``) calibrates against measured peak RSS. All figures are bytes *above* the
bare interpreter-with-torch process, which is what a device app already pays before using the SDK.

Parts:
- ``runtime``: what importing and initialising the model libraries costs (transformers, peft, the
  tokenizer), a per-family constant;
- ``weights``: the base at its precision (bitsandbytes quantizes the Linear layers; embeddings,
  norms and the head stay fp32);
- ``trainable``: gradients plus optimizer state of the trainable tensors (AdamW: 8 B per scalar,
  bitsandbytes 8-bit AdamW: 2 B), plus the fp32 master copy where weights are kept in reduced precision;
- ``activations``: what backpropagation keeps per token and layer, scaled by the spec's
  ``activation_factor``; gradient checkpointing keeps only each layer's input plus one layer's full
  activations; micro-batching divides by the number of micro-batches; a frozen backbone (head only)
  keeps none. An image model's activations are per input pixel per example instead (a CNN's feature
  maps; :data:`IMAGE_ACTIVATION_BYTES_PER_PIXEL`).
- ``load``: the peak while loading. Checkpoints are memory-mapped, so an fp32 base costs little until the
  first forward pass; a base read from the cached quantized checkpoint is partly resident; one quantized
  on the fly needs the whole fp32 model first.

The ORT runtime (``runtime="ort"``, onnxruntime-training without torch) has its own, equally simple
model, measured *above the bare interpreter* (a device on ORT never pays for torch): ORT's runtime
(onnxruntime, the tokenizer, two sessions), the whole fp32 model (the checkpoint is read into memory at
load, not memory-mapped), gradients plus AdamW state of the trainable tensors, and the activations of the
torch model scaled by :data:`ORT_ACTIVATION_SCALE` (ORT's memory planner frees what the gradient graph no
longer needs). Constants from ``benchmarks/ort_runtime.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ffm_edge.errors import ConfigError
from ffm_edge.spec import MemorySettings, ModelSpec

__all__ = [
    "BYTES_PER_WEIGHT",
    "ORT_STRATEGIES",
    "MemoryEstimate",
    "TrainingShape",
    "estimate_memory",
    "trainable_count",
]

MiB = 1024 * 1024

#: Bytes per base weight of a quantized Linear layer (NF4 packs two per byte plus one fp32 absmax per 64).
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 4.0, "nf4": 0.5 + 4.0 / 64}

#: Bytes per weight of a quantized Linear layer as stored (BYTES_PER_WEIGHT is its effective training
#: cost, which for int8 on CPU is larger: its layers keep fp16/fp32 copies while computing).
STORED_BYTES_PER_WEIGHT = {"int8": 1.0 + 4.0 / 4096, "nf4": 0.5 + 4.0 / 64}

#: Cost of the libraries a family needs, above bare torch (calibrated by benchmarks/memory.py).
RUNTIME_OVERHEAD = {"hf-sequence-classification": 200 * MiB, "efficientnet-lite": 60 * MiB}

#: Importing and applying peft (LoRA, prompt tuning) on top of that (measured: 41-54 MiB).
PEFT_OVERHEAD = 50 * MiB

#: Strategies that go through peft.
PEFT_STRATEGIES = frozenset({"lora", "prompt"})

#: Extra bytes per trained scalar that bitsandbytes' 8-bit AdamW needs on CPU during a step: it works on
#: fp32 copies of the state (measured on SmolLM2-135M; on the 22.7M-parameter MiniLM the gap is larger).
ADAMW8BIT_CPU_TEMPORARIES = 8.0

#: Fraction of a quantized checkpoint resident after loading (the rest is paged in by the first forward).
QUANTIZED_RESIDENT_AT_LOAD = 0.5

#: Floats kept per token, per hidden unit, per layer for backprop in a transformer block (calibrated).
ACTIVATION_FLOATS_PER_HIDDEN = 34.0

#: Activation bytes an image model keeps for backprop, per input pixel (image_size²) per example: a CNN's
#: feature maps over every layer, times the spec's activation_factor. Calibrated on EfficientNet-Lite0 at
#: 96x96, batch 16, LoRA: about 163 MiB of the 291 MiB measured above torch (benchmarks/ort_runtime.py
#: --model efficientnet-lite0). One shape only, so a rough figure; gradient checkpointing is not modelled
#: for images (the torch trainer checkpoints transformers layers only).
IMAGE_ACTIVATION_BYTES_PER_PIXEL = 1160.0

#: The same with a frozen backbone (head only): the largest forward temporaries, no graph kept (about 96 of
#: the 175 MiB measured above torch in the same run).
IMAGE_HEAD_BYTES_PER_PIXEL = 680.0

#: Strategies the ORT runtime trains, from artifacts with an fp32 base (full_q8 needs bitsandbytes' 8-bit
#: AdamW, quantized bases need bitsandbytes layers: neither exists in ONNX Runtime).
ORT_STRATEGIES = frozenset({"lora", "prompt", "head"})

#: Model families the ORT runtime can export and train (ffm_edge.ort.artifacts): transformers text
#: classifiers, and EfficientNet-Lite image classifiers (whose graph takes raw pixels, so a device needs
#: neither torch nor an image library).
ORT_FAMILIES = frozenset({"hf-sequence-classification", "efficientnet-lite"})

#: onnxruntime, the tokenizer and the training + eval sessions, above the bare interpreter (calibrated by
#: benchmarks/ort_runtime.py: the head-only run's peak less the fp32 weights and forward temporaries;
#: 107 MiB in the recorded run, 115 MiB in an earlier one).
ORT_RUNTIME_OVERHEAD = 107 * MiB

#: Share of the torch activation estimate ORT holds at its training peak (measured 0.63 for lora and 0.57
#: for prompt at batch 16, sequence 64; one shape only, so treat it as a rough figure).
ORT_ACTIVATION_SCALE = 0.6


@dataclass(frozen=True)
class TrainingShape:
    """The work a device does per optimizer step."""

    batch_size: int
    seq_len: int
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    num_labels: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError("batch_size and seq_len must be >= 1")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ConfigError(f"micro_batch_size must be in [1, {self.batch_size}], got {self.micro_batch_size}")

    @property
    def micro(self) -> int:
        """Examples that go through the model at once."""
        return self.micro_batch_size or self.batch_size


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory above bare torch, with its parts."""

    strategy: str
    precision: str
    shape: TrainingShape
    trainable_params: int
    parts: dict[str, int] = field(default_factory=dict)
    load_bytes: int = 0
    train_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """The larger of the load and the training peak."""
        return max(self.load_bytes, self.train_bytes)


def _constants(spec: ModelSpec) -> MemorySettings:
    if spec.memory is None:
        raise ConfigError(f"model spec {spec.name} has no [memory] table; the planner cannot size it")
    return spec.memory


def _linear_params(mem: MemorySettings) -> int:
    """Parameters in the transformer blocks' Linear layers (what bitsandbytes quantizes)."""
    blocks = max(0, mem.params - mem.vocab_size * mem.hidden_size)
    return int(blocks * 0.98)  # norms and biases are the rest


def trainable_count(spec: ModelSpec, strategy: str, *, num_labels: int = 2, prompt_tokens: int = 16) -> int:
    """How many scalars ``strategy`` trains on ``spec`` (what the update carries)."""
    mem = _constants(spec)
    head = mem.hidden_size * num_labels + num_labels
    if strategy == "full_q8":
        return mem.params + head
    if strategy == "head":
        return head
    if strategy == "prompt":
        return prompt_tokens * mem.hidden_size + head
    if strategy == "lora":
        # r x (in + out) per adapted square projection; the spec's targets are the attention projections.
        per_layer = len(spec.lora.target_modules) * spec.lora.r * 2 * mem.hidden_size
        return mem.num_layers * per_layer + head
    raise ConfigError(f"no memory model for strategy {strategy!r}")


def estimate_memory(
    spec: ModelSpec,
    strategy: str,
    shape: TrainingShape,
    *,
    precision: str = "fp32",
    quantized_checkpoint_cached: bool = True,
    weight_dtype: str = "fp32",
    optimizer: str | None = None,
    runtime: str = "torch",
) -> MemoryEstimate:
    """Predict the load and training peaks of ``strategy`` on ``spec`` at ``precision``.

    ``runtime="ort"``: onnxruntime-training without torch (see the module docstring); its figures are above
    the bare interpreter, torch's above the interpreter with torch imported.
    """
    if precision not in BYTES_PER_WEIGHT:
        raise ConfigError(f"unknown precision {precision!r}")
    if runtime == "ort":
        return _estimate_ort(spec, strategy, shape, precision)
    if runtime != "torch":
        raise ConfigError(f"runtime must be 'torch' or 'ort', got {runtime!r}")
    mem = _constants(spec)
    linear = _linear_params(mem)
    other = mem.params - linear
    overhead = RUNTIME_OVERHEAD.get(spec.family, 200 * MiB) + (PEFT_OVERHEAD if strategy in PEFT_STRATEGIES else 0)
    if strategy == "full_q8":
        precision = weight_dtype  # every weight trains: no quantized base
    weights = int(linear * BYTES_PER_WEIGHT[precision] + other * BYTES_PER_WEIGHT.get(weight_dtype, 4.0))
    trainable = trainable_count(spec, strategy, num_labels=shape.num_labels)
    optimizer = optimizer or ("adamw8bit" if strategy == "full_q8" else "adamw")
    state_per_scalar = 2.0 + ADAMW8BIT_CPU_TEMPORARIES if optimizer == "adamw8bit" else 8.0
    grad_bytes = 2.0 if weight_dtype == "bf16" else 4.0
    master = 4.0 if weight_dtype == "bf16" and strategy == "full_q8" else 0.0
    trainable_bytes = int(trainable * (grad_bytes + state_per_scalar + master))

    tokens = shape.micro * shape.seq_len
    per_layer = tokens * mem.hidden_size * ACTIVATION_FLOATS_PER_HIDDEN * mem.activation_factor * 4.0
    heads = max(1, mem.hidden_size // 64)
    attention = shape.micro * heads * shape.seq_len**2 * 4.0 * 2  # scores and probabilities
    if spec.modality == "image":  # feature maps scale with pixels; seq_len means nothing to a CNN
        activations = _image_activations(spec, mem, strategy, shape.micro)
    elif strategy == "head":
        activations = tokens * mem.hidden_size * 4.0 * 4  # forward temporaries only, no graph kept
    elif shape.gradient_checkpointing:
        activations = mem.num_layers * tokens * mem.hidden_size * 4.0 + per_layer + attention
    else:
        activations = mem.num_layers * (per_layer + attention)
    if precision in ("int8", "nf4"):
        # bitsandbytes layers dequantize a layer's weight for the matmul: one fp32 layer in flight.
        activations += 4.0 * linear / max(1, mem.num_layers) / 4
    activations = int(activations)

    # Safetensors checkpoints are memory-mapped: an fp32 base is paged in by the first forward pass (the
    # training phase), not at load. Quantizing on the fly needs the whole fp32 model resident first.
    if precision in ("fp32", "bf16") or strategy == "full_q8":
        load = overhead
    else:
        stored = linear * STORED_BYTES_PER_WEIGHT[precision]  # the quantized Linear layers as stored
        if quantized_checkpoint_cached:
            load = overhead + int(QUANTIZED_RESIDENT_AT_LOAD * stored)
        else:
            load = overhead + int(mem.params * 4.0 + stored)
    train = overhead + weights + trainable_bytes + activations
    return MemoryEstimate(
        strategy=strategy,
        precision=precision,
        shape=shape,
        trainable_params=trainable,
        parts={"runtime": overhead, "weights": weights, "trainable": trainable_bytes, "activations": activations},
        load_bytes=int(load),
        train_bytes=int(train),
    )


def _image_activations(spec: ModelSpec, mem: MemorySettings, strategy: str, examples: int) -> float:
    """An image model's activation bytes for ``examples`` images (see IMAGE_ACTIVATION_BYTES_PER_PIXEL)."""
    per_pixel = IMAGE_HEAD_BYTES_PER_PIXEL if strategy == "head" else IMAGE_ACTIVATION_BYTES_PER_PIXEL
    return examples * spec.image_size**2 * per_pixel * mem.activation_factor


def _activations_no_checkpointing(mem: MemorySettings, shape: TrainingShape) -> float:
    """The torch model's activation bytes for a whole batch without checkpointing (see estimate_memory)."""
    tokens = shape.batch_size * shape.seq_len
    per_layer = tokens * mem.hidden_size * ACTIVATION_FLOATS_PER_HIDDEN * mem.activation_factor * 4.0
    attention = shape.batch_size * max(1, mem.hidden_size // 64) * shape.seq_len**2 * 4.0 * 2
    return mem.num_layers * (per_layer + attention)


def _estimate_ort(spec: ModelSpec, strategy: str, shape: TrainingShape, precision: str) -> MemoryEstimate:
    if strategy not in ORT_STRATEGIES:
        raise ConfigError(f"the ORT runtime trains {sorted(ORT_STRATEGIES)}, not {strategy!r}")
    if precision != "fp32":
        raise ConfigError(f"the ORT runtime trains on an fp32 base, not {precision}")
    mem = _constants(spec)
    trainable = trainable_count(spec, strategy, num_labels=shape.num_labels)
    weights = int(mem.params * 4.0)
    trainable_bytes = int(trainable * (4.0 + 8.0))  # gradient + AdamW moments
    tokens = shape.batch_size * shape.seq_len
    if spec.modality == "image":  # head: forward temporaries, as torch's (measured 0.73x); lora measured 0.55x
        scale = 1.0 if strategy == "head" else ORT_ACTIVATION_SCALE
        activations = int(_image_activations(spec, mem, strategy, shape.batch_size) * scale)
    elif strategy == "head":
        activations = int(tokens * mem.hidden_size * 4.0 * 4)  # forward temporaries only
    else:
        activations = int(_activations_no_checkpointing(mem, shape) * ORT_ACTIVATION_SCALE)
    load = ORT_RUNTIME_OVERHEAD + weights
    train = load + trainable_bytes + activations
    return MemoryEstimate(
        strategy=strategy,
        precision=precision,
        shape=shape,
        trainable_params=trainable,
        parts={
            "runtime": ORT_RUNTIME_OVERHEAD,
            "weights": weights,
            "trainable": trainable_bytes,
            "activations": activations,
        },
        load_bytes=int(load),
        train_bytes=int(train),
    )


def micro_batch_options(batch_size: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the batch, then halvings down to 1."""
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sorted(set(sizes), reverse=True)
