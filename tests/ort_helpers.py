"""Shared pieces of the ORT runtime tests: the skip when onnxruntime-training is missing, a short-sequence
all-MiniLM-L6-v2 spec, built sentences, and artifacts built once per test session (building takes seconds)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.data import LabeledData, get_task
from ffm_edge.spec import ModelSpec, load_model_spec

MAX_LENGTH = 32
GLOBAL_VERSION = 3
REPO_ROOT = Path(__file__).resolve().parent.parent

_BLOCK_TORCH = """\
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this process ({name})")
        return None

sys.meta_path.insert(0, _NoTorch())
"""

POSITIVE = ["a wonderful, moving film", "great acting and a smart script", "i loved every minute", "superb"]
NEGATIVE = ["a dull, lifeless mess", "terrible acting and a silly plot", "i hated every minute", "awful"]


def require_ort() -> None:
    """Skip (with the reason) where the ``ort`` extra is not installed; CI installs it."""
    missing = [m for m in ("onnxruntime", "onnx", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"onnxruntime-training is not installed (missing {missing}); pip install 'ffm[ort]'")
    from ffm_edge.ort.compat import ort_runtime_problem

    problem = ort_runtime_problem()
    if problem is not None:
        pytest.skip(f"the ORT runtime is not usable here: {problem}")


def device_env(tmp_path: Path, *, block_torch: bool) -> dict[str, str]:
    """The environment of a device subprocess: this repository importable and, with ``block_torch``, a
    ``sitecustomize`` under ``tmp_path/site`` that makes every ``import torch`` fail (a device without torch)."""
    path = [str(REPO_ROOT)]
    if block_torch:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_BLOCK_TORCH)
        path.insert(0, str(site))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), TOKENIZERS_PARALLELISM="false")


def short_spec() -> ModelSpec:
    """all-MiniLM-L6-v2 with short sequences, so the tests stay quick."""
    return dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=MAX_LENGTH)


def sentiment_data(n: int, seed: int, skew: float = 0.5, pairs: bool = False) -> LabeledData:
    """Labelled sentences built here; ``skew`` is the share of positive examples."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < skew).astype(np.int64)
    inputs = [
        (f"{rng.choice(POSITIVE if y else NEGATIVE)} number {i}", "a second sentence" if pairs else None)
        for i, y in enumerate(labels)
    ]
    return LabeledData(get_task("sst2"), inputs, labels)


_BUILT: dict[tuple[str, bool, bool], Path] = {}


def built_artifacts(root: Path, strategy: str, *, dropout: bool = False, from_frame: bool = False) -> Path:
    """Artifacts for ``strategy`` on :func:`short_spec`, built once per session (in this process, with torch).

    ``from_frame``: built from a global-version frame (version :data:`GLOBAL_VERSION`, trainable values of a
    fresh TorchTrainer, shifted so they differ from any fresh start), the way a hub would build them.
    """
    key = (strategy, dropout, from_frame)
    if key in _BUILT:
        return _BUILT[key]
    from ffm_edge.ort.artifacts import build_artifacts, global_state_from_frame

    folder = root / f"{strategy}-{'dropout' if dropout else 'nodropout'}-{'frame' if from_frame else 'fresh'}"
    state = version = None
    if from_frame:
        frame = write_global_frame(root / f"global-{strategy}.ffmg", strategy)
        version, state = global_state_from_frame(frame)
    build_artifacts(short_spec(), "sst2", strategy, folder, global_state=state, global_version=version, dropout=dropout)
    _BUILT[key] = folder
    return folder


def write_global_frame(path: Path, strategy: str) -> Path:
    """A global-version frame as the hub stores it: a fresh trainer's tensors plus 0.01, at GLOBAL_VERSION."""
    from ffm_edge.trainer import TorchTrainer
    from ffm_edge.wire import GlobalMeta, encode_global

    trainer = TorchTrainer(short_spec(), get_task("sst2"), strategy, seed=0)
    state = {k: v + np.float32(0.01) for k, v in trainer.trainable_state().items()}
    meta = GlobalMeta(
        federation="ort",
        version=GLOBAL_VERSION,
        parent=GLOBAL_VERSION - 1,
        model="minilm-l6-v2",
        strategy=strategy,
        codec="fp32",
        created_at=0.0,
        num_updates=2,
    )
    path.write_bytes(encode_global(meta, state))
    return path
