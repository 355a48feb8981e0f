"""Export a model spec and strategy to ONNX Runtime training artifacts (runs where torch is installed).

The model is built by :class:`ffm_edge.trainer.TorchTrainer` itself, so the graph, the frozen base and
the trainable tensors are exactly what a torch device trains. What makes the export work, found by
trying (onnxruntime-training 1.19.2, torch 2.13, transformers 5):

* the TorchScript exporter (``dynamo=False``) at opset 14, in training mode, without constant folding,
  and with eager attention: the default (dynamo, opset 20) graph, and opset 17 in eval mode, fail in
  ORT's gradient builder;
* the exporter merges initializers with identical values, and freshly initialised LoRA ``B`` matrices
  are all zeros, so they collapse into one shared tensor. Trainable tensors are therefore exported with
  distinct random values, found in the graph by value, renamed to their canonical (wire) names, and
  given their real values afterwards;
* only the strategy's tensors are trainable (``requires_grad``); every other float initializer is a
  frozen parameter, kept once in the checkpoint that the training and eval sessions share.

The optimizer graph is AdamW in PyTorch's formulation (``adam_mode=0``, eps 1e-8, the spec's weight
decay), matching ``torch.optim.AdamW``, which every strategy trained here uses on torch. Models over
the 2 GB protobuf limit are saved with external data and handed to ORT by path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ffm_edge.data import TaskInfo, get_task
from ffm_edge.errors import ConfigError, OrtArtifactError, OrtUnavailableError
from ffm_edge.memory import ORT_FAMILIES, ORT_STRATEGIES
from ffm_edge.ort.compat import check_onnx_version, dist_version
from ffm_edge.ort.manifest import MANIFEST_NAME, PIXELS_INPUT, ArtifactManifest, TensorInfo, file_sha256
from ffm_edge.spec import ModelSpec, load_model_spec

__all__ = [
    "DEFAULT_OPSET",
    "ORT_FAMILIES",
    "ORT_STRATEGIES",
    "PIXELS_INPUT",
    "TOKENIZER_DIR",
    "build_artifacts",
    "global_state_from_frame",
]

log = logging.getLogger("ffm.ort.artifacts")

DEFAULT_OPSET = 14
"""The opset ORT 1.19's gradient builder handled for the BERT graphs (17 and 20 failed)."""

TOKENIZER_DIR = "tokenizer"

_PROTOBUF_LIMIT = 2**31 - 1
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def global_state_from_frame(path: str | Path) -> tuple[int, dict[str, np.ndarray]]:
    """The version and tensors of a global-version frame (``.ffmg``, as the hub stores and serves them)."""
    from ffm_edge.wire import decode_global

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the global version {path}: {exc}") from exc
    meta, tensors = decode_global(data)
    return meta.version, tensors


def _import_builders() -> tuple[Any, Any, Any]:
    check_onnx_version()
    try:
        import onnx
        import torch
        from onnxruntime.training import artifacts
    except ImportError as exc:
        raise OrtUnavailableError(
            f"building ORT training artifacts needs torch, onnx<1.18 and onnxruntime-training: {exc}"
        ) from exc
    return torch, onnx, artifacts


def _adamw_block(weight_decay: float) -> Any:
    """ORT's AdamW block with PyTorch's update rule (``adam_mode=0``) and torch's default eps."""
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock.optim.optim import AdamWOptimizer

    class TorchAdamWOptimizer(AdamWOptimizer):
        def build(self, *names: str) -> str:
            attributes = {
                "alpha": self._betas[0],
                "beta": self._betas[1],
                "epsilon": self._eps,
                "weight_decay": self._weight_decay,
                "correct_bias": 1,
                "adam_mode": 0,  # 0: torch.optim.AdamW; ORT's default block uses 1 (Hugging Face's AdamW)
            }
            return str(self._build_optimizer_node(list(names), "adamw.updated_flag", "AdamWOptimizer", attributes))

    block = onnxblock.optim.AdamW(weight_decay=weight_decay)
    block._adamw = TorchAdamWOptimizer(betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return block


def _rename(graph: Any, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for value in list(graph.input) + list(graph.value_info):
        if value.name == old:
            value.name = new


def build_artifacts(
    spec: ModelSpec | str,
    task: TaskInfo | str,
    strategy: Any = "lora",
    out: str | Path = "ort-artifacts",
    *,
    global_state: Mapping[str, np.ndarray] | None = None,
    global_version: int | None = None,
    opset: int = DEFAULT_OPSET,
    dropout: bool = True,
    seed: int = 0,
) -> ArtifactManifest:
    """Build training, eval and optimizer graphs plus a checkpoint for ``spec``/``strategy`` into ``out``.

    ``global_state`` (tensor name -> array, e.g. from :func:`global_state_from_frame`) sets the trainable
    tensors' starting values and ``global_version`` records where they came from; without it they are
    the values a fresh TorchTrainer with ``seed`` starts from. ``dropout=False`` exports with every
    dropout at 0 (deterministic training, for comparisons with torch). Returns the manifest written as
    ``out/ffm-ort.json``. Raises :class:`OrtUnavailableError` (missing or too new onnx/ORT) or
    :class:`ConfigError` (a model or strategy this runtime does not train).
    """
    torch, onnx, ort_artifacts = _import_builders()
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT's graph-transformer chatter is not for people
    from torch import nn

    from ffm_edge.strategies import get_strategy
    from ffm_edge.trainer import TorchTrainer

    spec = load_model_spec(spec) if isinstance(spec, str) else spec
    task = get_task(task) if isinstance(task, str) else task
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    if strategy.name not in ORT_STRATEGIES:
        raise ConfigError(f"the ORT runtime trains {', '.join(sorted(ORT_STRATEGIES))}; not {strategy.name!r}")
    if strategy.base_precision != "fp32":
        raise ConfigError(f"the ORT runtime needs an fp32 base; strategy {strategy.name} has {strategy.base_precision}")
    if spec.family not in ORT_FAMILIES:
        families = ", ".join(sorted(ORT_FAMILIES))
        raise ConfigError(f"the ORT runtime exports {families} models; {spec.name} is {spec.family}")
    out = Path(out)
    started = time.perf_counter()

    trainer = TorchTrainer(spec, task, strategy, seed=seed)
    if global_state is not None:
        missing = [n for n in trainer.tensor_names if n not in global_state]
        if missing:
            raise OrtArtifactError(f"the global state lacks {strategy.name} tensors {missing[:3]} of {spec.name}")
        trainer.load_trainable_state({n: global_state[n] for n in trainer.tensor_names})
    real = trainer.trainable_state()
    model = trainer.model
    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    config = getattr(base, "config", None)
    if config is not None:  # ORT's gradient builder handles the eager attention graph, not SDPA's
        setter = getattr(base, "set_attn_implementation", None)
        if callable(setter):
            setter("eager")
        else:
            config._attn_implementation = "eager"
    if not dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    # Distinct random values, so the exporter cannot merge trainable tensors with anything.
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    from ffm_edge.trainer import canonical_tensor_name

    generator = torch.Generator().manual_seed(1234)
    marks: dict[bytes, str] = {}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05 + 0.01)
            marks[hashlib.sha256(param.detach().numpy().tobytes()).digest()] = canonical_tensor_name(name)

    tokenizer = _load_tokenizer(spec) if spec.modality == "text" else None
    wrapper, dummy, inputs, axes, mode = (
        _text_export(torch, nn, model, tokenizer) if tokenizer is not None else _image_export(torch, nn, trainer)
    )
    buffer = io.BytesIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shapes the dynamic axes cover
            torch.onnx.export(
                wrapper,
                dummy,
                buffer,
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=False,
                training=mode,
                export_params=True,
                dynamo=False,
            )
    except Exception as exc:
        raise OrtArtifactError(f"exporting {spec.name}/{strategy.name} to ONNX failed: {exc}") from exc
    proto = onnx.load_from_string(buffer.getvalue())

    from onnx import numpy_helper

    graph = proto.graph
    found: dict[str, str] = {}
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        digest = hashlib.sha256(numpy_helper.to_array(init).astype(np.float32).tobytes()).digest()
        canonical = marks.get(digest)
        if canonical is not None:
            found[canonical] = init.name
    missing = sorted(set(real) - set(found))
    if missing:
        raise OrtArtifactError(f"trainable tensors not found in the exported graph of {spec.name}: {missing[:3]}")
    taken = {i.name for i in graph.initializer} - set(found.values())
    for canonical, onnx_name in found.items():
        if canonical in taken:
            raise OrtArtifactError(f"tensor name {canonical!r} is already used in the exported graph")
        _rename(graph, onnx_name, canonical)
    for init in graph.initializer:  # the real starting values replace the export-time marks
        if init.name in real:
            init.CopyFrom(numpy_helper.from_array(real[init.name].astype(np.float32), init.name))
    trainable = sorted(real)
    frozen = [i.name for i in graph.initializer if i.name not in real and i.data_type == onnx.TensorProto.FLOAT]

    loss = ort_artifacts.LossType.MSELoss if task.num_labels == 1 else ort_artifacts.LossType.CrossEntropyLoss
    weight_decay = spec.training.weight_decay
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        work = Path(tmp)
        (work / "out").mkdir()
        model_arg: Any = proto
        if proto.ByteSize() > _PROTOBUF_LIMIT - (64 << 20):  # over the protobuf limit: external data, by path
            path = work / "model.onnx"
            onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data")
            model_arg = str(path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                ort_artifacts.generate_artifacts(
                    model_arg,
                    requires_grad=trainable,
                    frozen_params=frozen,
                    loss=loss,
                    optimizer=_adamw_block(weight_decay),
                    artifact_directory=str(work / "out"),
                    additional_output_names=["logits"],
                )
        except Exception as exc:
            raise OrtArtifactError(f"onnxruntime could not build training graphs for {spec.name}: {exc}") from exc
        for old in out.iterdir():  # replace a previous build of this folder as a whole
            if old.name != work.name:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        for item in (work / "out").iterdir():
            shutil.move(str(item), out / item.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        if not (out / TOKENIZER_DIR / "tokenizer.json").is_file():
            raise OrtArtifactError(
                f"{spec.name}'s tokenizer has no fast (tokenizers) version; the ORT runtime needs one"
            )

    files = {
        str(p.relative_to(out)): file_sha256(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = ArtifactManifest(
        spec=spec.name,
        strategy=strategy.name,
        strategy_config={k: v for k, v in strategy.describe().items() if _jsonable(v)},
        task=task.name,
        num_labels=task.num_labels,
        tensors=tuple(TensorInfo(n, tuple(int(d) for d in real[n].shape)) for n in trainable),
        inputs=inputs,
        max_length=spec.max_length,
        opset=opset,
        dropout=dropout,
        optimizer={"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay, "mode": "torch"},
        training={
            "learning_rate": trainer.learning_rate,
            "batch_size": trainer.batch_size,
            "weight_decay": weight_decay,
        },
        tokenizer={}  # an image model's graph takes pixels
        if tokenizer is None
        else {
            "folder": TOKENIZER_DIR,
            "pad_token": tokenizer.pad_token,
            "pad_token_id": int(tokenizer.pad_token_id),
            "padding_side": getattr(tokenizer, "padding_side", "right"),
            "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        },
        global_version=global_version,
        versions={
            name: dist_version(*dists)
            for name, dists in (
                ("onnx", ("onnx",)),
                ("onnxruntime", ("onnxruntime-training-cpu", "onnxruntime-training")),
                ("torch", ("torch",)),
                ("transformers", ("transformers",)),
                ("peft", ("peft",)),
                ("ffm", ("ffm",)),
            )
        },
        files=files,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        extra={"build_seconds": round(time.perf_counter() - started, 2)}
        | ({} if tokenizer is not None else {"image_size": spec.image_size, "stochastic_depth": False}),
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    log.info("built ORT artifacts for %s/%s in %s (%d trainable tensors)", spec.name, strategy.name, out, len(real))
    return manifest


#: What an export needs: the module to trace, dummy inputs, input names, dynamic axes, training mode.
_Export = tuple[Any, tuple[Any, ...], tuple[str, ...], dict[str, dict[int, str]], Any]


def _text_export(torch: Any, nn: Any, model: Any, tokenizer: Any) -> _Export:
    """What to export for a transformers text classifier: token ids in, logits out, in training mode."""
    sample = tokenizer(["an example sentence", "another one"], None, padding=True, return_tensors="np")
    inputs = tuple(n for n in _MODEL_INPUTS if n in sample)

    class Logits(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return self.inner(**dict(zip(inputs, args, strict=True))).logits

    dummy = tuple(torch.as_tensor(sample[n], dtype=torch.long) for n in inputs)
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs} | {"logits": {0: "batch"}}
    model.train()
    return Logits(model), dummy, inputs, axes, torch.onnx.TrainingMode.TRAINING


def _image_export(torch: Any, nn: Any, trainer: Any) -> _Export:
    """What to export for an image classifier: raw pixels in (resized and normalized inside the graph, as
    TorchTrainer's encoder does), logits out.

    Exported with each module's own mode (``PRESERVE``): the model trains, its frozen BatchNorm layers stay
    in eval mode exactly as TorchTrainer keeps them. EfficientNet's stochastic depth (drop connect) is left
    out, because it is traced as random ops that ORT's eval graph would keep; ORT devices train without it.
    """
    model = trainer.model
    size = trainer.spec.image_size
    logits_of = trainer._logits_of
    for module in model.modules():
        params = getattr(module, "_global_params", None)
        if params is not None and getattr(params, "drop_connect_rate", None):
            module._global_params = params._replace(drop_connect_rate=None)

    class PixelLogits(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: Any) -> Any:
            images = pixels.permute(0, 3, 1, 2) / 255.0
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            return logits_of(self.inner(inputs=(images - 0.5) / 0.5))

    trainer._set_train_mode(True)  # BatchNorm frozen (eval) where the spec says so, like a torch round
    dummy = (torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(0)) * 255.0,)
    axes = {PIXELS_INPUT: {0: "batch", 1: "height", 2: "width"}, "logits": {0: "batch"}}
    return PixelLogits(model), dummy, (PIXELS_INPUT,), axes, torch.onnx.TrainingMode.PRESERVE


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.resolve_checkpoint())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
