"""peft-format artifacts: adapters a user loads with plain ``peft.PeftModel.from_pretrained``.

A trained LoRA or prompt-tuning trainer saved with ``save_adapter`` gives the same logits through peft
on a freshly loaded base; a federated state written by ``save_state_as_adapter`` (without loading the
model) does too, and loads back exactly; ``head`` and ``full_q8`` are not adapters and say so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from ffm_edge.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    save_adapter,
    save_full_model,
    save_state_as_adapter,
)
from ffm_edge.data import LabeledData, get_task
from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec, load_model_spec
from ffm_edge.strategies import LoraConfig, LoraStrategy, get_strategy
from ffm_edge.trainer import TorchTrainer

TASK = get_task("sst2")
TEXTS = ["a wonderful, moving film", "a dull, lifeless mess", "i loved every minute", "awful", "superb", "truly bad"]
LABELS = np.array([1, 0, 1, 0, 1, 0])


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=16)


def fresh_base(spec: ModelSpec) -> Any:
    """The base model exactly as a user would load it: plain transformers, a new (random) head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1234)  # a different head initialisation than the trainer's: the adapter must override it
    return AutoModelForSequenceClassification.from_pretrained(spec.resolve_checkpoint(), num_labels=2)


@torch.no_grad()
def logits(model: Any, spec: ModelSpec) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.resolve_checkpoint())
    batch = tokenizer(TEXTS, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
    model.eval()
    return model(**batch).logits.numpy()


def trained(spec: ModelSpec, strategy: str, **kwargs: Any) -> TorchTrainer:
    trainer = TorchTrainer(spec, TASK, get_strategy(strategy, **kwargs), batch_size=6, learning_rate=2e-2)
    trainer.train(LabeledData(TASK, [(t, None) for t in TEXTS], LABELS), epochs=2)
    return trainer


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [("lora", {}), ("prompt", {"num_virtual_tokens": 4, "init": "TEXT", "init_text": "is it good"})],
)
def test_saved_adapter_loads_with_plain_peft(spec: ModelSpec, tmp_path: Path, strategy: str, kwargs: Any) -> None:
    import peft

    trainer = trained(spec, strategy, **kwargs)
    folder = save_adapter(trainer, tmp_path / "adapter")
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    expected = logits(trainer.model, spec)
    loaded = peft.PeftModel.from_pretrained(fresh_base(spec), str(folder))
    np.testing.assert_allclose(logits(loaded, spec), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected[:, 1] - expected[:, 0]).max() > 1e-3  # the model was actually trained
    # ... and load_adapter brings the same tensors back into a trainer.
    state = trainer.trainable_state()
    trainer.load_trainable_state({k: np.zeros_like(v) for k, v in state.items()})
    load_adapter(trainer, folder)
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


@pytest.mark.parametrize(("strategy", "kwargs"), [("lora", {"r": 4}), ("prompt", {"num_virtual_tokens": 4})])
def test_state_as_adapter_round_trips(spec: ModelSpec, tmp_path: Path, strategy: str, kwargs: Any) -> None:
    import peft

    trainer = TorchTrainer(spec, TASK, get_strategy(strategy, **kwargs))
    rng = np.random.default_rng(0)
    state = {k: rng.normal(scale=0.2, size=v.shape).astype(np.float32) for k, v in trainer.trainable_state().items()}
    folder = save_state_as_adapter(spec, TASK, get_strategy(strategy, **kwargs), state, tmp_path / "global")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == ("LORA" if strategy == "lora" else "PROMPT_TUNING")
    assert config["base_model_name_or_path"] == spec.hub_id
    # Into a trainer: exactly the state.
    load_adapter(trainer, folder)
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    # Through plain peft: the same logits as the trainer holding that state.
    loaded = peft.PeftModel.from_pretrained(fresh_base(spec), str(folder))
    np.testing.assert_allclose(logits(loaded, spec), logits(trainer.model, spec), rtol=1e-5, atol=1e-5)
    # Same files as peft itself writes for that trainer.
    own = save_adapter(trainer, tmp_path / "own")
    from safetensors.numpy import load_file

    ours, theirs = load_file(str(folder / ADAPTER_WEIGHTS)), load_file(str(own / ADAPTER_WEIGHTS))
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_load_adapter_refuses_a_mismatched_adapter(spec: ModelSpec, tmp_path: Path) -> None:
    trainer = TorchTrainer(spec, TASK, "lora")  # the spec's r = 8
    small = LoraStrategy(LoraConfig(r=4))
    state = {
        name: np.zeros((4, *value.shape[1:]) if ".lora_A." in name else (*value.shape[:-1], 4), np.float32)
        if ".lora_" in name
        else value
        for name, value in trainer.trainable_state().items()
    }
    folder = save_state_as_adapter(spec, TASK, small, state, tmp_path / "r4")
    with pytest.raises(ConfigError, match="r is 4"):
        load_adapter(trainer, folder)
    prompt = save_state_as_adapter(
        spec,
        TASK,
        get_strategy("prompt", num_virtual_tokens=2),
        {"prompt_embeddings": np.zeros((2, 384), np.float32)},
        tmp_path / "prompt",
    )
    with pytest.raises(ConfigError, match="PROMPT_TUNING"):
        load_adapter(trainer, prompt)
    with pytest.raises(ConfigError, match="not a peft adapter folder"):
        load_adapter(trainer, tmp_path / "nothing")


@pytest.mark.parametrize(
    ("strategy", "state", "message"),
    [
        ("lora", {}, "empty"),
        ("lora", {"bert.encoder.layer.0.attention.self.query.weight": np.zeros((2, 2), np.float32)}, "not a tensor"),
        ("lora", {"classifier.weight": np.full((2, 2), np.nan, np.float32)}, "NaN"),
        ("lora", {"classifier.weight": np.zeros((2, 2), np.int64)}, "floating"),
        ("prompt", {"classifier.weight": np.zeros((2, 2), np.float32)}, "prompt_embeddings"),
        ("prompt", {"prompt_embeddings": np.zeros((3, 384), np.float32)}, "shape"),
        ("head", {"classifier.weight": np.zeros((2, 2), np.float32)}, "no peft adapter"),
        ("full_q8", {"classifier.weight": np.zeros((2, 2), np.float32)}, "save_full_model"),
    ],
)
def test_state_as_adapter_validates(
    spec: ModelSpec, tmp_path: Path, strategy: str, state: dict[str, np.ndarray], message: str
) -> None:
    chosen = get_strategy(strategy, num_virtual_tokens=16) if strategy == "prompt" else get_strategy(strategy)
    with pytest.raises(ConfigError, match=message):
        save_state_as_adapter(spec, TASK, chosen, state, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_head_and_full_models_are_not_adapters(spec: ModelSpec, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    for name in ("head", "full_q8"):
        with pytest.raises(ConfigError, match="no peft adapter"):
            save_adapter(SimpleNamespace(strategy=get_strategy(name)), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="save_adapter"):
        save_full_model(SimpleNamespace(strategy=get_strategy("lora")), tmp_path)  # type: ignore[arg-type]
    trainer = trained(spec, "head")
    folder = save_full_model(trainer, tmp_path / "full")
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(folder))
    np.testing.assert_allclose(logits(reloaded, spec), logits(trainer.model, spec), rtol=1e-5, atol=1e-5)
