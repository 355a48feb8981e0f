"""Declarative model specs (``models/*.toml``) and checkpoint resolution.

A spec names a base checkpoint and how to adapt it; adding a model is adding a spec file. Checkpoints
resolve offline first (a package that ships the weights, or an explicit local path) and fall back to
the Hugging Face hub id for online users, so real hub ids keep working.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffm_edge.errors import ModelSpecError

__all__ = [
    "FAMILIES",
    "PRECISIONS",
    "LoraSettings",
    "MemorySettings",
    "ModelSpec",
    "TrainingSettings",
    "available_specs",
    "load_model_spec",
    "specs_dir",
]

FAMILIES = ("hf-sequence-classification", "efficientnet-lite")

PRECISIONS = ("fp32", "int8", "nf4")
"""Base-model precisions: full float32, bitsandbytes 8-bit, bitsandbytes 4-bit NF4."""

_FAMILY_PRECISIONS = {
    "hf-sequence-classification": PRECISIONS,
    "efficientnet-lite": ("fp32",),  # not a transformers model: BitsAndBytesConfig cannot load it
}


@dataclass(frozen=True)
class LoraSettings:
    """Default LoRA hyper-parameters for this model (strategies may override them)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ModelSpecError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelSpecError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ModelSpecError("lora.target_modules must name at least one module")


@dataclass(frozen=True)
class TrainingSettings:
    """Default local-training hyper-parameters for this model."""

    learning_rate: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ModelSpecError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ModelSpecError(f"training.batch_size must be >= 1, got {self.batch_size}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MemorySettings:
    """Constants of the model's memory footprint, for planning what a device can hold.

    ``params`` counts every parameter of the pretrained model (tied weights once); ``vocab_size`` is 0
    for models without a token embedding; ``activation_factor`` scales the planner's generic activation
    estimate for architectures whose activations it under- or over-counts.
    """

    params: int
    hidden_size: int
    num_layers: int
    vocab_size: int = 0
    activation_factor: float = 1.0

    def __post_init__(self) -> None:
        for key in ("params", "hidden_size", "num_layers"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ModelSpecError(f"memory.{key} must be an integer >= 1, got {value!r}")
        if not _is_int(self.vocab_size) or self.vocab_size < 0:
            raise ModelSpecError(f"memory.vocab_size must be an integer >= 0, got {self.vocab_size!r}")
        factor = self.activation_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor < float("inf"):
            raise ModelSpecError(f"memory.activation_factor must be a number > 0, got {factor!r}")
        object.__setattr__(self, "activation_factor", float(factor))


@dataclass(frozen=True)
class ModelSpec:
    """Everything FFM needs to know to load and adapt one base model."""

    name: str
    family: str
    modality: str
    description: str = ""
    hub_id: str | None = None
    checkpoint_path: str | None = None
    checkpoint_package: str | None = None
    checkpoint_subdir: str = ""
    gguf_file: str | None = None
    quant_skip_modules: tuple[str, ...] = ()
    max_length: int = 128
    image_size: int = 224
    freeze_batchnorm: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    memory: MemorySettings | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelSpecError(f"spec {self.name!r}: unknown family {self.family!r}; known: {FAMILIES}")
        if self.modality not in ("text", "image"):
            raise ModelSpecError(f"spec {self.name!r}: modality must be 'text' or 'image'")
        if not (self.hub_id or self.checkpoint_path or self.checkpoint_package):
            raise ModelSpecError(f"spec {self.name!r}: give checkpoint.path, checkpoint.package or hub_id")
        if self.gguf_file is not None:
            if self.family != "hf-sequence-classification":
                raise ModelSpecError(
                    f"spec {self.name!r}: checkpoint.gguf_file needs family 'hf-sequence-classification'"
                )
            name = self.gguf_file
            if not isinstance(name, str) or not name.endswith(".gguf") or "/" in name or "\\" in name:
                raise ModelSpecError(
                    f"spec {self.name!r}: checkpoint.gguf_file must be a file name ending in .gguf, got {name!r}"
                )
        skip = self.quant_skip_modules
        if not isinstance(skip, tuple) or not all(isinstance(m, str) and m.strip() for m in skip):
            raise ModelSpecError(f"spec {self.name!r}: quant_skip_modules must be a list of module names, got {skip!r}")
        if skip and self.precisions == ("fp32",):
            raise ModelSpecError(
                f"spec {self.name!r}: quant_skip_modules given, but family {self.family!r} is fp32 only"
            )
        if self.memory is not None and not isinstance(self.memory, MemorySettings):
            raise ModelSpecError(f"spec {self.name!r}: memory must be a table")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The base-model precisions this spec's family can load (see :data:`PRECISIONS`)."""
        return _FAMILY_PRECISIONS[self.family]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> ModelSpec:
        """Build a spec from parsed TOML; unknown keys are errors so typos do not pass silently."""
        data = dict(data)
        known = {
            "name", "family", "modality", "description", "hub_id", "max_length", "image_size",
            "freeze_batchnorm", "checkpoint", "lora", "training", "quant_skip_modules", "memory",
        }  # fmt: skip
        where = source or data.get("name")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelSpecError(f"spec {where!r}: unknown keys {unknown}")
        tables = {key: data.pop(key, {}) for key in ("checkpoint", "lora", "training")}
        memory = data.pop("memory", None)
        for key, table in [*tables.items(), ("memory", memory if memory is not None else {})]:
            if not isinstance(table, dict):
                raise ModelSpecError(f"spec {where!r}: {key} must be a table")
        checkpoint = dict(tables["checkpoint"])
        unknown = sorted(set(checkpoint) - {"path", "package", "subdir", "gguf_file"})
        if unknown:
            raise ModelSpecError(f"spec {where!r}: unknown keys in [checkpoint] {unknown}")
        lora_kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in tables["lora"].items()}
        if isinstance(data.get("quant_skip_modules"), list):
            data["quant_skip_modules"] = tuple(data["quant_skip_modules"])
        try:
            return cls(
                checkpoint_path=checkpoint.get("path"),
                checkpoint_package=checkpoint.get("package"),
                checkpoint_subdir=checkpoint.get("subdir", ""),
                gguf_file=checkpoint.get("gguf_file"),
                lora=LoraSettings(**lora_kwargs),
                training=TrainingSettings(**tables["training"]),
                memory=MemorySettings(**memory) if memory is not None else None,
                source=source,
                **data,
            )
        except TypeError as exc:
            raise ModelSpecError(f"spec {where!r}: {exc}") from exc

    def resolve_checkpoint(self) -> str:
        """Return a local path for the weights when one exists here, else the hub id.

        Order: ``FFM_CHECKPOINT_<NAME>`` env override, explicit path, a package that ships the
        weights, then the hub id (which needs network access at load time).
        """
        override = os.environ.get("FFM_CHECKPOINT_" + self.name.upper().replace("-", "_"))
        if override:
            return override
        if self.checkpoint_path:
            path = Path(os.path.expanduser(self.checkpoint_path))
            if not path.is_absolute() and self.source:
                path = Path(self.source).parent / path
            if path.exists():
                return str(path)
        if self.checkpoint_package:
            spec = importlib.util.find_spec(self.checkpoint_package)
            if spec is not None and spec.origin is not None:
                return str(Path(spec.origin).parent / self.checkpoint_subdir)
        if self.hub_id:
            return self.hub_id
        raise ModelSpecError(
            f"model {self.name!r}: no local checkpoint found (package {self.checkpoint_package!r} "
            f"not installed, path {self.checkpoint_path!r} missing) and no hub id to fall back on"
        )

    def resolve_gguf(self) -> Path | None:
        """The GGUF file to convert from, when the resolved checkpoint is a local folder that holds it.

        A spec's ``gguf_file`` names a file inside its checkpoint folder (package or path). When that
        folder is not here (the hub id is used instead, or an override points at a regular checkpoint),
        the checkpoint loads the ordinary way and this returns ``None``.
        """
        if not self.gguf_file:
            return None
        checkpoint = Path(self.resolve_checkpoint())
        candidate = checkpoint / self.gguf_file
        return candidate if candidate.is_file() else None


def specs_dir() -> Path:
    """The folder of bundled specs: ``FFM_MODELS_DIR`` or the repository's ``models/``."""
    env = os.environ.get("FFM_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


def available_specs() -> list[str]:
    """Names of the bundled specs."""
    folder = specs_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """Load a spec by bundled name (``minilm-l6-v2``) or by the path of a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = specs_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise ModelSpecError(
            f"no model spec {str(name_or_path)!r}; bundled specs: {', '.join(available_specs()) or 'none'}"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelSpecError(f"cannot read model spec {path}: {exc}") from exc
    return ModelSpec.from_dict(data, source=str(path))
