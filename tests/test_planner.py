"""The memory model's arithmetic and the planner's decisions on synthetic budgets (table-driven)."""

from __future__ import annotations

import pytest

from ffm_edge.errors import ConfigError
from ffm_edge.memory import (
    ADAMW8BIT_CPU_TEMPORARIES,
    TrainingShape,
    estimate_memory,
    micro_batch_options,
    trainable_count,
)
from ffm_edge.planner import InsufficientMemoryError, format_plan, plan_training
from ffm_edge.spec import ModelSpec

MiB = 2**20


def spec(**memory: float) -> ModelSpec:
    table = {"params": 100_000_000, "hidden_size": 768, "num_layers": 12, "vocab_size": 30_000, **memory}
    return ModelSpec.from_dict(
        {
            "name": "synthetic",
            "family": "hf-sequence-classification",
            "modality": "text",
            "hub_id": "none/none",
            "lora": {"r": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
            "memory": table,
        }
    )


def test_trainable_counts_by_hand() -> None:
    s = spec()
    head = 768 * 2 + 2
    assert trainable_count(s, "head") == head
    assert trainable_count(s, "lora") == 12 * 2 * 8 * 2 * 768 + head  # layers x targets x r x (in + out)
    assert trainable_count(s, "prompt", prompt_tokens=16) == 16 * 768 + head
    assert trainable_count(s, "full_q8") == 100_000_000 + head


def test_levers_lower_the_prediction_in_the_expected_order() -> None:
    s = spec()
    plain = estimate_memory(s, "lora", TrainingShape(16, 128))
    ckpt = estimate_memory(s, "lora", TrainingShape(16, 128, gradient_checkpointing=True))
    micro = estimate_memory(s, "lora", TrainingShape(16, 128, micro_batch_size=4, gradient_checkpointing=True))
    nf4 = estimate_memory(s, "lora", TrainingShape(16, 128), precision="nf4")
    assert plain.train_bytes > ckpt.train_bytes > micro.train_bytes
    assert nf4.parts["weights"] < plain.parts["weights"] / 2  # Linear layers at ~4.5 bits, embeddings fp32
    assert estimate_memory(s, "head", TrainingShape(16, 128)).train_bytes < micro.train_bytes
    full = estimate_memory(s, "full_q8", TrainingShape(16, 128))
    # grads + 8-bit AdamW state + the fp32 temporaries bitsandbytes' 8-bit AdamW makes on CPU
    assert full.parts["trainable"] == (100_000_000 + 768 * 2 + 2) * (4 + 2 + ADAMW8BIT_CPU_TEMPORARIES)


def test_quantizing_without_a_cached_checkpoint_costs_the_fp32_model_at_load() -> None:
    s = spec()
    cached = estimate_memory(s, "lora", TrainingShape(8, 64), precision="nf4", quantized_checkpoint_cached=True)
    fresh = estimate_memory(s, "lora", TrainingShape(8, 64), precision="nf4", quantized_checkpoint_cached=False)
    assert fresh.load_bytes - cached.load_bytes >= 100_000_000 * 4


def cheapest(strategy: str, precisions: tuple[str, ...] = ("fp32", "int8", "nf4")) -> int:
    """The smallest predicted peak over every configuration the planner tries for ``strategy``."""
    plan = plan_training(spec(), 10**15, batch_size=16, seq_len=128, force=strategy)
    return min(c.required_bytes for c in plan.candidates if c.precision in precisions)


def most_expensive_first_choice() -> int:
    plan = plan_training(spec(), 10**15, batch_size=16, seq_len=128)
    assert plan.choice is not None
    return plan.choice.required_bytes


@pytest.mark.parametrize(
    ("budget", "strategy", "precisions"),
    [
        # Plenty of memory: the most capable strategy without any lever.
        (lambda: most_expensive_first_choice(), "full_q8", ("fp32",)),
        # Just below what full fine-tuning needs at its cheapest: LoRA on an fp32 base.
        (lambda: cheapest("full_q8") - 1, "lora", ("fp32",)),
        # Just below LoRA on fp32 at its cheapest: LoRA on a quantized base (QLoRA).
        (lambda: cheapest("lora", ("fp32",)) - 1, "lora", ("int8", "nf4")),
        # Below anything that backpropagates through the backbone: the adapter head alone.
        (lambda: min(cheapest("lora"), cheapest("prompt")) - 1, "head", ("fp32", "nf4")),
    ],
    ids=["plenty", "no-full", "qlora", "head-only"],
)
def test_planner_picks_the_most_capable_fit(budget, strategy: str, precisions: tuple[str, ...]) -> None:
    limit = budget()
    plan = plan_training(spec(), limit, batch_size=16, seq_len=128)
    assert plan.choice is not None
    assert (plan.choice.strategy, plan.choice.precision in precisions) == (strategy, True), format_plan(plan)
    assert plan.choice.required_bytes <= limit
    assert plan.choice.required_bytes >= plan.choice.estimate.peak_bytes * 1.09  # the default 10 % safety margin
    # Everything considered before the choice did not fit (the order is the preference).
    index = plan.candidates.index(plan.choice)
    assert not any(c.fits for c in plan.candidates[:index])
    assert "fits" in plan.reason


def test_plenty_of_memory_uses_no_lever() -> None:
    plan = plan_training(spec(), 10**15, batch_size=16, seq_len=128)
    assert plan.choice is not None
    assert (plan.choice.gradient_checkpointing, plan.choice.micro_batch_size) == (False, 16)


def test_forcing_an_unfit_strategy_fails_before_training() -> None:
    with pytest.raises(InsufficientMemoryError, match="strategy 'full_q8' needs at least"):
        plan_training(spec(), cheapest("full_q8") - 1, batch_size=16, seq_len=128, force="full_q8")
    forced = plan_training(spec(), 100_000 * MiB, batch_size=16, seq_len=128, force="prompt")
    assert forced.choice is not None and forced.choice.strategy == "prompt"


def test_nothing_fits_and_unknown_choices_are_clear_errors() -> None:
    with pytest.raises(InsufficientMemoryError, match="any strategy needs at least"):
        plan_training(spec(), 10 * MiB, batch_size=16, seq_len=128)
    with pytest.raises(ConfigError, match="cannot force"):
        plan_training(spec(), 10 * MiB, batch_size=16, seq_len=128, force="telepathy")


def test_device_without_bitsandbytes_gets_no_quantized_plan() -> None:
    plan = plan_training(spec(), cheapest("lora", ("fp32",)) - 1, batch_size=16, seq_len=128, available=("fp32",))
    assert plan.choice is not None and plan.choice.precision == "fp32"


def test_micro_batch_options() -> None:
    assert micro_batch_options(16) == [16, 8, 4, 2, 1]
    assert micro_batch_options(6) == [6, 3, 2, 1]
    assert micro_batch_options(1) == [1]


def test_image_models_are_estimated_by_pixels_not_tokens() -> None:
    """A CNN's activations scale with images x pixels; seq_len means nothing to it. At the calibration shape
    (EfficientNet-Lite0, 96x96, batch 16) the estimates are near what benchmarks/ort_runtime.py measured
    above torch / above the bare interpreter (torch lora 291 MiB, head 175; ORT lora 215, head 196)."""
    import dataclasses

    from ffm_edge.memory import TrainingShape, estimate_memory
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec("efficientnet-lite0")
    mib = 1024 * 1024

    def train(strategy: str, micro: int = 16, seq_len: int = 128, runtime: str = "torch", size: int = 96) -> float:
        sized = dataclasses.replace(spec, image_size=size)
        shape = TrainingShape(16, seq_len, micro, False, 10)
        return estimate_memory(sized, strategy, shape, runtime=runtime).parts["activations"] / mib

    assert train("lora", seq_len=128) == train("lora", seq_len=4096)
    assert train("lora", micro=8) == pytest.approx(train("lora") / 2)
    assert train("lora", size=192) == pytest.approx(4 * train("lora"))
    for strategy, runtime, measured in (("lora", "torch", 291), ("head", "torch", 175), ("lora", "ort", 215),
                                        ("head", "ort", 196)):  # fmt: skip
        shape = TrainingShape(16, spec.max_length, 16, False, 10)
        total = estimate_memory(spec, strategy, shape, runtime=runtime).train_bytes / mib
        assert 0.8 * measured < total < 1.25 * measured, (strategy, runtime, total, measured)
