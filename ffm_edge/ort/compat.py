"""Is the ONNX Runtime training stack usable here, and load its on-device API without importing torch.

``import onnxruntime.training`` pulls in torch (its package ``__init__`` imports the amp and optim
helpers), which would cost a device the very gigabytes this runtime exists to save. The on-device
classes (``Module``, ``Optimizer``, ``CheckpointState``) live in the native bindings, and the thin
Python wrappers in ``onnxruntime/training/api/`` only need those, so they are loaded from their files
without running the package ``__init__``.

Known constraint: onnxruntime-training-cpu 1.19.x reads ONNX IR versions up to 10; onnx 1.18 and later
write IR 11, so artifacts built with them do not load. The ``ort`` extra pins ``onnx<1.18``;
:func:`check_onnx_version` turns a newer onnx into a clear error instead of a failure deep in ORT.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ffm_edge.errors import OrtUnavailableError

__all__ = [
    "MAX_ONNX_VERSION",
    "TrainingApi",
    "check_onnx_version",
    "dist_version",
    "load_training_api",
    "ort_runtime_problem",
]

MAX_ONNX_VERSION = (1, 18)
"""onnx releases from this one on write an IR version onnxruntime-training 1.19 cannot load."""

_INSTALL_HINT = "pip install 'ffm[ort]' (onnxruntime-training-cpu==1.19.2, onnx<1.18)"


def dist_version(*names: str) -> str | None:
    """The installed version of the first distribution found among ``names`` (no import)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_onnx_version(version: str | None = None) -> str:
    """Raise :class:`OrtUnavailableError` unless onnx is installed and older than 1.18; return its version."""
    version = version if version is not None else dist_version("onnx")
    if version is None:
        raise OrtUnavailableError(f"building ONNX training artifacts needs the onnx package: {_INSTALL_HINT}")
    if _release(version) >= MAX_ONNX_VERSION:
        raise OrtUnavailableError(
            f"onnx {version} is too new for onnxruntime-training 1.19: onnx >= 1.18 writes ONNX IR version 11, "
            "which this onnxruntime cannot load; install onnx<1.18 (pip install 'onnx<1.18')"
        )
    return version


@dataclass(frozen=True)
class TrainingApi:
    """onnxruntime's on-device training classes, loaded without torch."""

    Module: Any
    Optimizer: Any
    CheckpointState: Any
    OrtValue: Any
    SessionOptions: Any
    version: str | None


_api: TrainingApi | None = None


def _load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OrtUnavailableError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the wrappers import each other by these names
    spec.loader.exec_module(module)
    return module


def _load_api_files(folder: Path, ort_value: Any, session_options: Any, version: str | None) -> TrainingApi:
    """Execute the three wrapper files under their real names, then forget the stand-in parent packages.

    The stand-ins exist only while the files run (their absolute imports need a parent package); removing
    them afterwards leaves ``import onnxruntime.training`` working normally later in the process.
    """
    if not folder.is_dir():
        raise OrtUnavailableError(f"onnxruntime-training's Python API is missing ({folder}); {_INSTALL_HINT}")
    added: list[str] = []
    try:
        for name, where in (("onnxruntime.training", folder.parent), ("onnxruntime.training.api", folder)):
            if name not in sys.modules:
                package = ModuleType(name)
                package.__path__ = [str(where)]
                sys.modules[name] = package
                added.append(name)
        modules = {}
        for stem in ("checkpoint_state", "module", "optimizer"):
            name = f"onnxruntime.training.api.{stem}"
            modules[stem] = _load_file(name, folder / f"{stem}.py")
            added.append(name)
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return TrainingApi(
        modules["module"].Module,
        modules["optimizer"].Optimizer,
        modules["checkpoint_state"].CheckpointState,
        ort_value,
        session_options,
        version,
    )


def _import_onnxruntime_without_torch() -> None:
    """``import onnxruntime`` without it importing torch.

    At import, onnxruntime validates its build by trying ``from onnxruntime.training.ortmodule import
    ORTModule``, and that package's ``__init__`` imports torch when torch is installed: a device that has
    torch but trains on ORT would pay for it. The runtime never uses ORTModule, so ``onnxruntime.training``
    is hidden for the duration of that first import (the validation treats the ImportError as "no
    ORTModule") and restored right after, so ``import onnxruntime.training`` still works later.
    """
    if "onnxruntime" in sys.modules or "onnxruntime.training" in sys.modules:
        return
    sys.modules["onnxruntime.training"] = None  # type: ignore[assignment]
    try:
        import onnxruntime  # noqa: F401
    finally:
        if sys.modules.get("onnxruntime.training", 0) is None:
            del sys.modules["onnxruntime.training"]


def load_training_api() -> TrainingApi:
    """The ``Module`` / ``Optimizer`` / ``CheckpointState`` wrappers, without ``onnxruntime.training.__init__``.

    When ``onnxruntime.training`` is already imported (a process with torch, e.g. the artifact builder),
    its own classes are used. Raises :class:`OrtUnavailableError` when onnxruntime has no training build.
    """
    global _api
    if _api is not None:
        return _api
    version = dist_version("onnxruntime-training-cpu", "onnxruntime-training")
    try:
        _import_onnxruntime_without_torch()
        import onnxruntime
        from onnxruntime.capi import _pybind_state
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue
        from onnxruntime.capi.onnxruntime_pybind11_state import SessionOptions
    except ImportError as exc:
        raise OrtUnavailableError(f"onnxruntime-training is not installed: {_INSTALL_HINT}") from exc
    if not hasattr(_pybind_state, "Module"):
        raise OrtUnavailableError(
            f"onnxruntime {getattr(onnxruntime, '__version__', '?')} is an inference-only build (no training "
            f"Module); {_INSTALL_HINT}"
        )
    loaded = sys.modules.get("onnxruntime.training.api")
    if loaded is None:
        api = _load_api_files(Path(onnxruntime.__file__).parent / "training" / "api", OrtValue, SessionOptions, version)
    else:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        api = TrainingApi(Module, Optimizer, CheckpointState, OrtValue, SessionOptions, version)
    _api = api
    return api


def ort_runtime_problem() -> str | None:
    """Why the ORT runtime cannot train on this device, or ``None`` when it can (cheap: no torch, no session)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return f"onnxruntime-training is not installed: {_INSTALL_HINT}"
    try:
        load_training_api()
    except OrtUnavailableError as exc:
        return str(exc)
    return None
