"""The training strategies (lora, QLoRA, head, prompt, full_q8) on the real all-MiniLM-L6-v2.

Each strategy trains a few short epochs on 16 sentences built here and its loss (measured in eval mode,
without dropout) falls; each trains exactly the tensors it promises. Also: config validation, the
registry, gradient accumulation (micro-batches give the full batch's gradients), top-k sparsification,
AdamW8bit and its fallback, and bf16 weights.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ffm_edge.data import LabeledData, get_task
from ffm_edge.errors import ConfigError
from ffm_edge.modeling import load_base_model
from ffm_edge.spec import ModelSpec, load_model_spec
from ffm_edge.strategies import (
    STRATEGIES,
    FullQ8Config,
    FullQ8Strategy,
    HeadConfig,
    HeadStrategy,
    LoraConfig,
    LoraStrategy,
    PromptConfig,
    PromptStrategy,
    get_strategy,
    strategies_by_capability,
    topk_sparsify,
)
from ffm_edge.strategies import full_q8 as full_q8_module
from ffm_edge.trainer import TorchTrainer

POSITIVE = [
    "a wonderful, moving film", "great acting and a smart script", "i loved every minute", "superb",
    "a joy to watch", "brilliant and funny", "truly great", "what a delight",
]  # fmt: skip
NEGATIVE = [
    "a dull, lifeless mess", "terrible acting and a silly plot", "i hated every minute", "awful",
    "a bore to watch", "stupid and unfunny", "truly bad", "what a waste",
]  # fmt: skip
TASK = get_task("sst2")
HAS_PRECISION = "precision" in inspect.signature(load_base_model).parameters


def sentences(n: int = 16) -> LabeledData:
    """``n`` short labelled sentences (half positive), interleaved."""
    inputs: list[tuple[str, str | None]] = [(s, None) for pair in zip(POSITIVE, NEGATIVE, strict=True) for s in pair]
    inputs = inputs[:n]
    labels = np.array([1, 0] * (n // 2) + [1] * (n % 2), dtype=np.int64)
    return LabeledData(TASK, inputs, labels)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=16)


@pytest.fixture
def cache_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized bases are cached on disk: keep the test's cache in its own folder."""
    monkeypatch.setenv("FFM_CACHE_DIR", str(tmp_path / "cache"))


# -- registry and configs ---------------------------------------------------------------------------------
def test_registry_and_capability_order() -> None:
    assert {"lora", "head", "prompt", "full_q8"} <= set(STRATEGIES)
    assert strategies_by_capability()[:4] == ["full_q8", "lora", "prompt", "head"]
    ranks = [STRATEGIES[n].capability_rank for n in ("full_q8", "lora", "prompt", "head")]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == 4
    assert isinstance(get_strategy("lora", r=4).config, LoraConfig)
    prompt = get_strategy("prompt", PromptConfig(num_virtual_tokens=4))
    assert isinstance(prompt, PromptStrategy) and prompt.config.num_virtual_tokens == 4
    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'.*full_q8"):
        get_strategy("nope")
    with pytest.raises(ConfigError, match="rank"):
        get_strategy("lora", rank=4)  # a typo of r
    with pytest.raises(ConfigError, match="not both"):
        get_strategy("lora", LoraConfig(), r=4)
    with pytest.raises(ConfigError, match="LoraConfig"):
        LoraStrategy(HeadConfig())


def test_defaults_and_describe() -> None:
    for name, cls in STRATEGIES.items():
        strategy = cls()
        assert strategy.base_precision == "fp32"
        json.dumps(strategy.describe())
        assert strategy.describe()["strategy"] == name
    assert get_strategy("full_q8").gradient_checkpointing is True  # activations dominate full fine-tuning
    assert get_strategy("lora").gradient_checkpointing is False
    assert get_strategy("lora", base_precision="nf4").base_precision == "nf4"
    assert get_strategy("full_q8", weight_dtype="bf16").compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (LoraConfig, {"r": 0}, "r must be"),
        (LoraConfig, {"alpha": 0}, "alpha"),
        (LoraConfig, {"dropout": 1.0}, "dropout"),
        (LoraConfig, {"target_modules": ()}, "target_modules"),
        (LoraConfig, {"base_precision": "fp16"}, "base_precision"),
        (LoraConfig, {"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        (HeadConfig, {"base_precision": "int4"}, "base_precision"),
        (HeadConfig, {"modules_to_save": ()}, "modules_to_save"),
        (PromptConfig, {"num_virtual_tokens": 0}, "num_virtual_tokens"),
        (PromptConfig, {"num_virtual_tokens": 2.5}, "num_virtual_tokens"),
        (PromptConfig, {"init": "ZEROS"}, "init"),
        (PromptConfig, {"init": "TEXT"}, "init_text"),
        (PromptConfig, {"init": "RANDOM", "init_text": "hi"}, "init_text"),
        (PromptConfig, {"modules_to_save": ()}, "modules_to_save"),
        (FullQ8Config, {"weight_dtype": "fp16"}, "weight_dtype"),
        (FullQ8Config, {"top_k": 0.0}, "top_k"),
        (FullQ8Config, {"top_k": 1.5}, "top_k"),
        (FullQ8Config, {"top_k": True}, "top_k"),
        (FullQ8Config, {"optimizer_fallback": "sgd"}, "optimizer_fallback"),
        (FullQ8Config, {"base_precision": "nf4"}, "must be fp32"),
    ],
)
def test_config_validation(config: Callable[..., Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**kwargs)


def test_prompt_is_for_text_models_only() -> None:
    image_spec = load_model_spec("efficientnet-lite0")
    with pytest.raises(ConfigError, match="text"):
        PromptStrategy().validate_spec(image_spec)
    with pytest.raises(ConfigError, match="text"):  # refused before the model is loaded
        TorchTrainer(image_spec, get_task("digits"), "prompt")


def test_head_strategy_checks_its_modules(spec: ModelSpec) -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

    module = HeadStrategy().prepare(Tiny(), spec)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ConfigError, match="matches the head"):
        HeadStrategy(HeadConfig(modules_to_save=("score",))).prepare(Tiny(), spec)
    quantized = Tiny()
    quantized.classifier.weight = nn.Parameter(torch.zeros(2, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ConfigError, match="quantized"):
        HeadStrategy().prepare(quantized, spec)


# -- top-k ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_topk_sparsify_keeps_exactly_the_largest(fraction: float) -> None:
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(size=(30, 7)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    before = {k: v.copy() for k, v in delta.items()}
    out = topk_sparsify(delta, fraction)
    for name, value in delta.items():
        np.testing.assert_array_equal(value, before[name])  # pure
        kept = out[name]
        assert kept.shape == value.shape and kept.dtype == value.dtype
        k = math.ceil(fraction * value.size)
        assert np.count_nonzero(kept) == k
        nonzero = kept != 0
        np.testing.assert_array_equal(kept[nonzero], value[nonzero])
        if k < value.size:
            assert np.abs(value[nonzero]).min() >= np.abs(value[~nonzero]).max()


def test_topk_sparsify_validates_and_full_q8_applies_it() -> None:
    delta = {"w": np.arange(1, 11, dtype=np.float32)}
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ConfigError):
            topk_sparsify(delta, bad)
    assert get_strategy("full_q8").finalize_update(delta)["w"] is delta["w"]  # dense: unchanged
    sparse = get_strategy("full_q8", top_k=0.3).finalize_update(delta)["w"]
    np.testing.assert_array_equal(sparse, [0, 0, 0, 0, 0, 0, 0, 8, 9, 10])
    assert get_strategy("lora").finalize_update(delta)["w"] is delta["w"]


# -- the 8-bit optimizer ----------------------------------------------------------------------------------
def test_full_q8_uses_adamw8bit_and_falls_back_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes as bnb

    params = [nn.Parameter(torch.zeros(4096))]
    assert full_q8_module.adamw8bit_problem() is None, "AdamW8bit works on this CPU (bitsandbytes >= 0.45)"
    assert isinstance(FullQ8Strategy().make_optimizer(params, 1e-3, 0.0), bnb.optim.AdamW8bit)
    monkeypatch.setattr(full_q8_module, "adamw8bit_problem", lambda: "no kernel for this CPU")
    with pytest.raises(ConfigError, match="no kernel for this CPU"):
        FullQ8Strategy().make_optimizer(params, 1e-3, 0.0)
    fallback = FullQ8Strategy(FullQ8Config(optimizer_fallback="adamw")).make_optimizer(params, 1e-3, 0.0)
    assert type(fallback) is torch.optim.AdamW
    assert type(LoraStrategy().make_optimizer(params, 1e-3, 0.0)) is torch.optim.AdamW


# -- training each strategy -------------------------------------------------------------------------------
def lora_tensors(names: set[str]) -> None:
    assert {"classifier.weight", "classifier.bias"} <= names
    adapters = names - {"classifier.weight", "classifier.bias"}
    assert len(adapters) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all((".lora_A." in n or ".lora_B." in n) and n.startswith("bert.encoder.layer.") for n in adapters)


def head_tensors(names: set[str]) -> None:
    assert names == {"classifier.weight", "classifier.bias"}


def prompt_tensors(names: set[str]) -> None:
    assert names == {"prompt_embeddings", "classifier.weight", "classifier.bias"}


TRAINING = [
    pytest.param("lora", {}, 1e-2, 4, lora_tensors, id="lora"),
    pytest.param("lora", {"base_precision": "nf4"}, 1e-2, 4, lora_tensors, id="qlora-nf4"),
    pytest.param("head", {}, 1e-2, 4, head_tensors, id="head"),
    pytest.param("prompt", {"num_virtual_tokens": 8}, 3e-2, 8, prompt_tensors, id="prompt"),
    pytest.param(
        "prompt",
        {"num_virtual_tokens": 8, "init": "TEXT", "init_text": "the sentiment of this review is"},
        3e-2,
        8,
        prompt_tensors,
        id="prompt-text-init",
    ),
    pytest.param("full_q8", {}, 1e-4, 2, None, id="full_q8"),
]


@pytest.mark.parametrize(("name", "kwargs", "lr", "epochs", "check_tensors"), TRAINING)
def test_strategy_trains_and_loss_falls(
    spec: ModelSpec,
    cache_dir: None,
    name: str,
    kwargs: dict[str, Any],
    lr: float,
    epochs: int,
    check_tensors: Callable[[set[str]], None] | None,
) -> None:
    strategy = get_strategy(name, **kwargs)
    if strategy.base_precision != "fp32" and not HAS_PRECISION:
        pytest.skip("ffm_edge.modeling.load_base_model has no precision argument yet (quantized bases)")
    data = sentences()
    trainer = TorchTrainer(spec, TASK, strategy, batch_size=8, learning_rate=lr, seed=0)
    names = set(trainer.tensor_names)
    if check_tensors is None:  # full_q8: every parameter, under the model's own names
        assert names == {n for n, _ in trainer.model.named_parameters()}
        assert trainer.num_trainable() == sum(p.numel() for p in trainer.model.parameters()) > 20_000_000
        assert trainer.gradient_checkpointing
    else:
        check_tensors(names)
        assert trainer.num_trainable() < 100_000
    before = trainer.loss(data)
    report = trainer.train(data, epochs=epochs)
    after = trainer.loss(data)
    assert report.steps == 2 * epochs
    assert np.isfinite(report.mean_loss)
    assert after < before - 0.02, f"{name}: loss {before:.4f} -> {after:.4f}"
    assert set(trainer.trainable_state()) == names


def test_gradient_checkpointing_is_enabled_on_request(spec: ModelSpec) -> None:
    trainer = TorchTrainer(spec, TASK, get_strategy("lora", gradient_checkpointing=True), batch_size=8)
    assert trainer.gradient_checkpointing
    peft_model: Any = trainer.model
    base = peft_model.get_base_model()
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
    report = trainer.train(sentences(8), max_steps=1)
    assert np.isfinite(report.last_loss)


def test_micro_batches_give_the_full_batch_gradient(spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """One plain-SGD step (lr 1: the step is minus the gradient) per micro-batch size, dropout off."""
    trainer = TorchTrainer(spec, TASK, get_strategy("lora", dropout=0.0), batch_size=8, learning_rate=1.0)
    for module in trainer.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    monkeypatch.setattr(trainer.strategy, "make_optimizer", lambda params, lr, wd: torch.optim.SGD(params, lr=lr))
    data = sentences(8)
    start = trainer.trainable_state()
    steps: dict[int, dict[str, np.ndarray]] = {}
    for micro in (8, 4, 3):
        trainer.load_trainable_state(start)
        trainer.micro_batch_size = micro
        assert trainer.micro_batch_size == micro
        trainer.train(data, max_steps=1, seed=0)
        steps[micro] = {k: v - start[k] for k, v in trainer.trainable_state().items()}
    assert any(np.abs(v).max() > 1e-4 for v in steps[8].values())
    for micro in (4, 3):
        for name, step in steps[8].items():
            np.testing.assert_allclose(steps[micro][name], step, rtol=1e-3, atol=2e-6, err_msg=f"{micro}: {name}")
    trainer.micro_batch_size = 100
    assert trainer.micro_batch_size == 8  # above the batch: the whole batch
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="micro_batch_size"):
            trainer.micro_batch_size = bad  # type: ignore[assignment]


def test_full_q8_bf16_weights(spec: ModelSpec) -> None:
    trainer = TorchTrainer(spec, TASK, get_strategy("full_q8", weight_dtype="bf16", gradient_checkpointing=False))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    # A global version in fp32 survives the round trip through bf16 weights: the delta of an untrained
    # device is (almost) zero, not the bf16 rounding of every weight.
    rng = np.random.default_rng(0)
    state = {
        k: v + rng.normal(scale=1e-4, size=v.shape).astype(np.float32) for k, v in trainer.trainable_state().items()
    }
    trainer.load_trainable_state(state)
    back = trainer.trainable_state()
    for name, value in state.items():
        np.testing.assert_allclose(back[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
    report = trainer.train(sentences(8), max_steps=1)
    assert np.isfinite(report.last_loss)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert any(not np.array_equal(trainer.trainable_state()[k], state[k]) for k in state)


def test_quantized_base_needs_a_loader_that_supports_it(spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import ffm_edge.trainer as trainer_module

    def old_loader(spec: ModelSpec, num_labels: int) -> Any:
        raise AssertionError("not reached")

    monkeypatch.setattr(trainer_module, "load_base_model", old_loader)
    with pytest.raises(ConfigError, match="no precision argument"):
        TorchTrainer(spec, TASK, get_strategy("head", base_precision="int8"))
