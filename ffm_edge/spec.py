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
    "LoraSettings",
    "ModelSpec",
    "TrainingSettings",
    "available_specs",
    "load_model_spec",
    "specs_dir",
]

FAMILIES = ("hf-sequence-classification", "efficientnet-lite")


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
    max_length: int = 128
    image_size: int = 224
    freeze_batchnorm: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    source: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelSpecError(f"spec {self.name!r}: unknown family {self.family!r}; known: {FAMILIES}")
        if self.modality not in ("text", "image"):
            raise ModelSpecError(f"spec {self.name!r}: modality must be 'text' or 'image'")
        if not (self.hub_id or self.checkpoint_path or self.checkpoint_package):
            raise ModelSpecError(f"spec {self.name!r}: give checkpoint.path, checkpoint.package or hub_id")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> ModelSpec:
        """Build a spec from parsed TOML; unknown keys are errors so typos do not pass silently."""
        data = dict(data)
        known = {
            "name", "family", "modality", "description", "hub_id", "max_length", "image_size",
            "freeze_batchnorm", "checkpoint", "lora", "training",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelSpecError(f"spec {source or data.get('name')!r}: unknown keys {unknown}")
        checkpoint = dict(data.pop("checkpoint", {}))
        lora = dict(data.pop("lora", {}))
        training = dict(data.pop("training", {}))
        lora_kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()}
        try:
            return cls(
                checkpoint_path=checkpoint.pop("path", None),
                checkpoint_package=checkpoint.pop("package", None),
                checkpoint_subdir=checkpoint.pop("subdir", ""),
                lora=LoraSettings(**lora_kwargs),
                training=TrainingSettings(**training),
                source=source,
                **data,
            )
        except TypeError as exc:
            raise ModelSpecError(f"spec {source or data.get('name')!r}: {exc}") from exc

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
