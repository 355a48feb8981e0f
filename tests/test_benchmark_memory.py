"""The memory benchmark (benchmarks/memory.py): its phase meter, and one real worker run on a small MiniLM setup."""

from __future__ import annotations

import mmap
from pathlib import Path
from types import ModuleType

import pytest
from bench_helpers import load_benchmark

MiB = 1024 * 1024

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def memory_bench() -> ModuleType:
    return load_benchmark("memory")


def test_read_status_bytes_parses_kb_fields(memory_bench: ModuleType, tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t    1024 kB\n", encoding="ascii")
    assert memory_bench.read_status_bytes("VmRSS", str(status)) == 1024 * 1024
    assert memory_bench.read_status_bytes("VmHWM", str(status)) == 2048 * 1024
    with pytest.raises(KeyError):
        memory_bench.read_status_bytes("VmSwap", str(status))


@linux_only
def test_phase_meter_resets_the_peak_per_phase(memory_bench: ModuleType) -> None:
    def touch(size: int) -> None:
        """Fresh anonymous pages, every one written (malloc could reuse resident heap memory instead)."""
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        block.close()

    meter = memory_bench.PhaseMeter()
    with meter.phase("big") as big:
        touch(96 * MiB)
    with meter.phase("small") as small:
        touch(8 * MiB)
    assert [p.name for p in meter.phases] == ["big", "small"]
    assert big.peak_bytes - big.rss_before_bytes >= 90 * MiB
    assert big.rss_after_bytes < big.peak_bytes - 80 * MiB  # freed again (mmap-sized blocks go back)
    assert big.seconds >= 0.0
    if not small.peak_was_reset:
        pytest.skip("/proc/self/clear_refs is not writable here: peaks cannot be reset per phase")
    # The second phase's peak starts from the current RSS, not from the first phase's high-water mark.
    assert small.peak_bytes < big.peak_bytes - 60 * MiB
    assert small.peak_bytes - small.rss_before_bytes >= 7 * MiB


def test_run_config_names_and_keys(memory_bench: ModuleType) -> None:
    cfg = memory_bench.RunConfig(model="smollm2-135m", strategy="lora", precision="nf4", gradient_checkpointing=True,
                                 micro_batch_size=2, batch_size=8, from_cache=False)  # fmt: skip
    assert cfg.name == "lora/nf4 +ckpt mb=2 (on the fly)"
    full_batch = memory_bench.RunConfig(model="m", micro_batch_size=8, batch_size=8, group="sweep")
    assert full_batch.key() == memory_bench.RunConfig(model="m", batch_size=8).key()
    assert memory_bench.relative_error(115, 100) == pytest.approx(0.15)
    assert memory_bench.relative_error(1, 0) is None


@linux_only
def test_worker_measures_a_small_minilm_run(memory_bench: ModuleType) -> None:
    """One fresh worker: MiniLM, LoRA on the fp32 base, batch 4, sequence 32, one step (about 10 s)."""
    from ffm_edge.spec import load_model_spec

    cfg = memory_bench.RunConfig(model="minilm-l6-v2", strategy="lora", batch_size=4, seq_len=32, steps=1)
    record = memory_bench.spawn(cfg, timeout=240)
    assert record["status"] == "ok", record.get("error")
    assert record["baseline_rss_bytes"] > 0
    assert record["load"]["peak_bytes"] > 0 and record["train"]["peak_bytes"] > 0
    assert record["load"]["peak_was_reset"] and record["train"]["peak_was_reset"]
    assert record["peak_bytes"] == max(record["load"]["peak_bytes"], record["train"]["peak_bytes"])
    assert len(record["step_seconds"]) == 1 and record["step_median_s"] > 0
    assert record["trainable_params"] == 74_498  # LoRA r=8 on query/value of 6 layers + the 2-class head
    for codec in ("fp32", "fp16", "int8"):
        sizes = record["update"][codec]
        assert sizes["chunk_bytes"] >= sizes["frame_bytes"] > sizes["payload_bytes"] > 0
        assert not sizes["over_default_limit"]
    assert record["update"]["int8"]["chunk_bytes"] < record["update"]["fp16"]["chunk_bytes"]
    assert record["update"]["fp16"]["chunk_bytes"] < record["update"]["fp32"]["chunk_bytes"]

    memory_bench.attach_prediction(load_model_spec("minilm-l6-v2"), record)
    prediction = record["prediction"]
    assert prediction["load_bytes"] > 0 and prediction["train_bytes"] > 0
    assert set(prediction["parts"]) == {"runtime", "weights", "trainable", "activations"}
    assert set(record["error"]) == {"load", "train", "peak"}
    assert all(isinstance(value, float) for value in record["error"].values())


@linux_only
def test_memory_model_predicts_a_small_measured_run(memory_bench: ModuleType) -> None:
    """The planner's memory model against a real run of MiniLM (LoRA, fp32 base, batch 8, sequence 64).

    Tolerance 25 % per phase: the benchmark's full-size runs are mostly within 15 % (benchmarks/README.md);
    a small run is dominated by library overheads, which vary more between processes.
    """
    from ffm_edge.spec import load_model_spec

    cfg = memory_bench.RunConfig(model="minilm-l6-v2", strategy="lora", batch_size=8, seq_len=64, steps=2)
    record = memory_bench.spawn(cfg, timeout=240)
    assert record["status"] == "ok", record.get("error")
    memory_bench.attach_prediction(load_model_spec("minilm-l6-v2"), record)
    errors = record["error"]
    assert abs(errors["load"]) <= 0.25, errors
    assert abs(errors["train"]) <= 0.25, errors
