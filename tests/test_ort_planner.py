"""Runtime selection: the memory model and planner cover torch and ORT, and EdgeClient picks or is forced.

ORT estimates are above the bare interpreter (a device on ORT never imports torch), calibrated by
benchmarks/ort_runtime.py; the planner prefers torch within a strategy and falls back to ORT before giving
up capability.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ort_helpers import built_artifacts, require_ort, sentiment_data, short_spec

from ffm_edge.cli import build_parser
from ffm_edge.client import EdgeClient
from ffm_edge.errors import ConfigError
from ffm_edge.memory import TrainingShape, estimate_memory
from ffm_edge.planner import format_plan, plan_training

MiB = 2**20


def test_ort_memory_model_covers_what_the_runtime_trains() -> None:
    spec = short_spec()
    shape = TrainingShape(16, 64)
    ort = {s: estimate_memory(spec, s, shape, runtime="ort") for s in ("lora", "prompt", "head")}
    torch = {s: estimate_memory(spec, s, shape) for s in ("lora", "prompt", "head")}
    for strategy, est in ort.items():
        assert est.train_bytes == sum(est.parts.values())
        assert est.trainable_params == torch[strategy].trainable_params
        assert est.peak_bytes < torch[strategy].peak_bytes
    assert ort["head"].train_bytes < ort["prompt"].train_bytes <= ort["lora"].train_bytes
    with pytest.raises(ConfigError, match="ORT runtime trains"):
        estimate_memory(spec, "full_q8", shape, runtime="ort")
    with pytest.raises(ConfigError, match="fp32 base"):
        estimate_memory(spec, "lora", shape, precision="nf4", runtime="ort")
    with pytest.raises(ConfigError, match="runtime"):
        estimate_memory(spec, "lora", shape, runtime="tensorflow")


def test_planner_falls_back_to_ort_before_giving_up_capability() -> None:
    spec = short_spec()
    everything = plan_training(spec, 10**12, batch_size=8, seq_len=32, runtimes=("torch", "ort"))
    torch_lora = min(
        c.required_bytes
        for c in everything.candidates
        if (c.strategy, c.precision, c.runtime) == ("lora", "fp32", "torch")
    )
    ort_lora = next(c for c in everything.candidates if (c.strategy, c.runtime) == ("lora", "ort"))
    assert everything.choice is not None and everything.choice.runtime == "torch"  # torch first when it fits
    assert ort_lora.required_bytes < torch_lora
    budget = ort_lora.required_bytes + MiB
    plan = plan_training(spec, budget, batch_size=8, seq_len=32, runtimes=("torch", "ort"), available=("fp32",))
    assert plan.choice is not None
    assert (plan.choice.strategy, plan.choice.runtime) == ("lora", "ort")
    assert "ort" in plan.choice.label and "| runtime |" in format_plan(plan)
    only_prompt = plan_training(spec, 10**12, batch_size=8, seq_len=32, runtimes=("ort",), ort_strategies=("prompt",))
    assert {(c.strategy, c.runtime) for c in only_prompt.candidates} == {("prompt", "ort")}
    torch_only = plan_training(spec, 10**12, batch_size=8, seq_len=32)
    assert all(c.runtime == "torch" for c in torch_only.candidates)
    assert "| runtime |" not in format_plan(torch_only)  # the torch-only table is unchanged
    with pytest.raises(ConfigError, match="runtimes"):
        plan_training(spec, 10**12, batch_size=8, seq_len=32, runtimes=("jax",))


def test_client_runtime_must_be_known_and_ort_needs_artifacts(tmp_path: Path) -> None:
    data = sentiment_data(8, seed=0)
    with pytest.raises(ConfigError, match="runtime must be one of"):
        EdgeClient(short_spec(), data, device_id="d", runtime="tensorflow", state_dir=tmp_path)
    require_ort()
    with pytest.raises(ConfigError, match="ort_artifacts"):
        EdgeClient(short_spec(), data, device_id="d", runtime="ort", state_dir=tmp_path)


@pytest.mark.slow
def test_client_planner_picks_ort_when_only_ort_fits(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    require_ort()
    from ffm_edge.ort.trainer import OrtTrainer

    artifacts = built_artifacts(tmp_path_factory.mktemp("ort-artifacts"), "lora", dropout=False, from_frame=True)
    spec = short_spec()
    ort_only = plan_training(spec, 10**12, batch_size=8, seq_len=32, runtimes=("ort",), ort_strategies=("lora",))
    assert ort_only.choice is not None
    budget = ort_only.choice.required_bytes + MiB  # below every torch configuration of lora on an fp32 base
    client = EdgeClient(
        spec,
        sentiment_data(8, seed=0),
        device_id="small",
        strategy="auto",
        memory_budget=budget,
        batch_size=8,
        runtime="auto",
        ort_artifacts=artifacts,
        state_dir=tmp_path,
        threads=1,
    )
    # ORT lora on an fp32 base comes before torch lora on a quantized base in capability order.
    assert client.plan is not None and client.plan.choice is not None
    assert (client.plan.choice.strategy, client.plan.choice.runtime) == ("lora", "ort")
    assert client.runtime == "ort" and isinstance(client.trainer, OrtTrainer)
    assert client.trainer.strategy.name == "lora"
    forced = EdgeClient(
        spec,
        sentiment_data(8, seed=0),
        device_id="forced",
        runtime="ort",
        ort_artifacts=artifacts,
        state_dir=tmp_path / "forced",
    )
    assert forced.runtime == "ort" and isinstance(forced.trainer, OrtTrainer)


def test_cli_has_the_runtime_flags_and_the_builder() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "--runtime", "ort", "--ort-artifacts", "folder"])
    assert (args.runtime, args.ort_artifacts) == ("ort", "folder")
    args = parser.parse_args(["ort-build", "--strategy", "prompt", "--task", "sst2", "--out", "x", "--no-dropout"])
    assert (args.command, args.strategy, args.out, args.no_dropout) == ("ort-build", "prompt", "x", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["ort-build", "--strategy", "full_q8", "--out", "x"])
