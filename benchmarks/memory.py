"""Memory and bandwidth per training strategy: the SDK's memory model (predicted) against measured peaks.

For each model and configuration (LoRA on an fp32 / int8 / nf4 base, head only, soft prompt, full_q8, the
configuration the planner picks at the smallest budget that still lets a device train LoRA or a prompt,
and the plain peft + torch loops as the baseline) one **fresh subprocess** (``--worker``) measures:

* the bytes of resident memory above the bare interpreter-with-torch process (``VmRSS`` right after
  ``import torch``), at its high-water mark (``VmHWM``, reset per phase through ``/proc/self/clear_refs``):
  the LOAD phase (importing transformers/peft, loading the base, ``strategy.prepare``: building the
  ``TorchTrainer``) and the TRAINING phase (``--steps`` optimizer steps on built sentences that fill the
  sequence length);
* seconds per optimizer step (median of the steps after the first), trainable parameters, and the bytes
  of the real update on the wire per codec (``encode_update`` + ``split_frame`` with 64 KiB chunks).

The parent process puts ``ffm_edge.memory.estimate_memory`` next to each measurement, derives the
constants the measurements imply (``calibration_fit`` in the JSON), runs a budget sweep through
``plan_training`` with a real run per pick, and writes ``memory.json``, ``memory.md`` and ``memory.png``.

    python benchmarks/memory.py                       # both models, sweep included (6-12 minutes on 2 cores)
    python benchmarks/memory.py --models minilm-l6-v2 --skip-sweep
    python benchmarks/memory.py --quick               # small shapes, 2 steps, no sweep: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MiB = 1024 * 1024

#: Printed before the worker's JSON record on stdout (everything else a worker says goes to stderr).
RESULT_MARKER = "FFM-MEMORY-RESULT "
#: The client's default chunk size (``EdgeClient(chunk_size=64 * 1024)``).
CHUNK_SIZE = 64 * 1024
CODECS = ("fp32", "fp16", "int8")
#: Batch size and sequence length per model: the reference settings (``../shared/MODELS.md`` for SmolLM2).
SHAPES = {"minilm-l6-v2": (16, 128), "smollm2-135m": (8, 64)}
QUICK_SHAPES = {"minilm-l6-v2": (4, 32), "smollm2-135m": (2, 32)}
DEFAULT_MODELS = ("minilm-l6-v2", "smollm2-135m")
#: Models whose nf4 base is also measured quantized on the fly (without the cached quantized checkpoint).
ON_THE_FLY = ("smollm2-135m",)
#: Models that get the budget sweep.
SWEEP_MODELS = ("smollm2-135m",)
PRECISIONS = ("fp32", "int8", "nf4")
WORKER_TIMEOUT_S = 420

_WORDS = (
    "the film was a wonderful moving story about a family that lost everything and found its way back "
    "through music while the cast gave brilliant performances and the direction never slowed although "
    "some critics found the ending tedious and the soundtrack a little loud for such a quiet script"
).split()


# -------------------------------------------------------------------------------------------------------
# Measuring a phase: VmHWM above the VmRSS of the bare interpreter-with-torch process
# -------------------------------------------------------------------------------------------------------


def read_status_bytes(key: str, path: str = "/proc/self/status") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in {path}")


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current ``VmRSS`` (Linux ``clear_refs`` value 5).

    Returns whether it worked; where it does not, a phase's peak is the process's lifetime peak.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@dataclass
class PhaseRecord:
    """One phase: its high-water mark and resident size after it, in bytes above the baseline."""

    name: str
    peak_bytes: int = 0
    rss_after_bytes: int = 0
    rss_before_bytes: int = 0
    seconds: float = 0.0
    peak_was_reset: bool = True
    rss_anon_after_bytes: int = 0
    rss_file_after_bytes: int = 0


class PhaseMeter:
    """Peak resident memory per phase, above the process's resident size when the meter was made.

    Make it right after ``import torch``: the baseline is then the bare interpreter-with-torch process,
    which is what a device app already pays before it uses the SDK.
    """

    def __init__(self) -> None:
        self.baseline_bytes = read_status_bytes("VmRSS")
        self.phases: list[PhaseRecord] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseRecord]:
        """Measure the ``with`` body; the record's fields are filled in when the body ends."""
        record = PhaseRecord(name)
        gc.collect()
        record.peak_was_reset = reset_peak()
        record.rss_before_bytes = read_status_bytes("VmRSS") - self.baseline_bytes
        started = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - started
            record.peak_bytes = read_status_bytes("VmHWM") - self.baseline_bytes
            record.rss_after_bytes = read_status_bytes("VmRSS") - self.baseline_bytes
            with contextlib.suppress(KeyError):  # absolute, not above the baseline: anonymous vs file pages
                record.rss_anon_after_bytes = read_status_bytes("RssAnon")
                record.rss_file_after_bytes = read_status_bytes("RssFile")
            self.phases.append(record)


# -------------------------------------------------------------------------------------------------------
# What one worker runs
# -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One measured configuration; travels to the worker as JSON.

    ``kind``: ``ffm`` (a ``TorchTrainer`` with a strategy), ``plain-lora`` / ``plain-full`` (the plain peft
    + torch AdamW loop on the fp32 model), or ``prepare`` (build the checkpoint cache; nothing measured).
    """

    model: str
    kind: str = "ffm"
    strategy: str = "lora"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    micro_batch_size: int | None = None
    batch_size: int = 8
    seq_len: int = 64
    steps: int = 3
    from_cache: bool = True
    label: str = ""
    group: str = "strategy"
    seed: int = 0

    @property
    def name(self) -> str:
        """A readable name, e.g. ``lora/nf4 +ckpt mb=1 (on the fly)``."""
        if self.label:
            return self.label
        if self.kind != "ffm":
            return self.kind
        extra = " +ckpt" if self.gradient_checkpointing else ""
        if self.micro_batch_size is not None and self.micro_batch_size < self.batch_size:
            extra += f" mb={self.micro_batch_size}"
        if self.precision != "fp32" and not self.from_cache:
            extra += " (on the fly)"
        return f"{self.strategy}/{self.precision}{extra}"

    def key(self) -> tuple[Any, ...]:
        """What makes two configurations the same run (label and group aside)."""
        micro = self.micro_batch_size if self.micro_batch_size not in (None, self.batch_size) else None
        return (
            self.model,
            self.kind,
            self.strategy,
            self.precision,
            self.gradient_checkpointing,
            micro,
            self.batch_size,
            self.seq_len,
            self.steps,
            self.from_cache,
        )


def training_sentences(n: int, seq_len: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` sentences of ``2 * seq_len`` words (more tokens than ``seq_len``: truncation fills it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts = [" ".join(str(w) for w in rng.choice(_WORDS, size=2 * seq_len)) for _ in range(n)]
    labels = [int(i % 2) for i in range(n)]
    return texts, labels


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _save_state(tensors: Mapping[str, Any], folder: str) -> str:
    """Write the trainable tensors to a file without copying them in memory (``tofile`` of a view).

    Copies (``trainer.trainable_state()``) of a fully trained model would leave freed arrays in the
    allocator's heap and inflate the training peak that follows, so the snapshot streams to disk.
    """
    path = os.path.join(folder, "initial.bin")
    with open(path, "wb") as fh:
        for value in tensors.values():
            value.detach().contiguous().float().numpy().tofile(fh)
    Path(path + ".names").write_text(json.dumps(list(tensors)), encoding="utf-8")
    return path


def _load_delta(trained: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``trained − saved`` per tensor; ``trained`` holds float32 arrays in the order they were saved."""
    import numpy as np

    names = json.loads(Path(path + ".names").read_text(encoding="utf-8"))
    if names != list(trained):
        raise AssertionError(f"trained tensors {list(trained)[:3]}... differ from the saved {names[:3]}...")
    delta: dict[str, Any] = {}
    offset = 0
    for name, value in trained.items():
        initial = np.fromfile(path, dtype=np.float32, count=value.size, offset=offset).reshape(value.shape)
        offset += value.size * 4
        delta[name] = (value - initial).astype(np.float32)
    return delta


def update_sizes(delta: Mapping[str, Any], strategy: str, num_samples: int) -> dict[str, Any]:
    """Bytes of ``delta`` on the wire per codec: ``encode_update`` + ``split_frame`` at 64 KiB chunks.

    A frame larger than the wire's default limits (``max_frame_bytes`` 256 MiB) is encoded again with
    raised limits so its size is known, and flagged ``over_default_limit`` (a hub would refuse it).
    """
    from ffm_edge.wire import DEFAULT_LIMITS, UpdateMeta, WireLimits, encode_tensors, encode_update, split_frame

    raised = WireLimits(max_frame_bytes=2**40, max_tensor_elements=2**40)
    out: dict[str, Any] = {}
    for codec in CODECS:
        update_id = uuid.uuid4().hex
        meta = UpdateMeta(
            federation="bench",
            device="edge-0",
            update_id=update_id,
            base_version=0,
            strategy=strategy.replace("_", "-"),
            num_samples=num_samples,
            codec=codec,
            created_at=time.time(),
        )
        over = False
        try:
            frame = encode_update(meta, delta)
            chunks = split_frame(frame, chunk_size=CHUNK_SIZE, transfer_id=update_id)
        except Exception as exc:  # OversizedError (a DecodeError) or ValueError from split_frame
            over = True
            _log(f"    {codec}: over the default wire limits ({type(exc).__name__}: {exc}); sizing with raised limits")
            frame = encode_update(meta, delta, limits=raised)
            chunks = split_frame(frame, chunk_size=CHUNK_SIZE, transfer_id=update_id, limits=raised)
        out[codec] = {
            "payload_bytes": len(encode_tensors(delta, codec)),
            "frame_bytes": len(frame),
            "chunk_bytes": sum(len(c) for c in chunks),
            "chunks": len(chunks),
            "over_default_limit": over or len(frame) > DEFAULT_LIMITS.max_frame_bytes,
        }
        del frame, chunks
    return out


def _spec_for(cfg: RunConfig) -> Any:
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec(cfg.model)
    return spec if spec.max_length == cfg.seq_len else dataclasses.replace(spec, max_length=cfg.seq_len)


def _quantize_on_the_fly() -> None:
    """Make the loader skip the cached quantized checkpoint, as it does when the cache cannot be written."""
    from ffm_edge import checkpoints

    original = checkpoints.prepare_checkpoint

    def no_quantized_cache(spec: Any, precision: str = "fp32") -> Path:
        if precision != "fp32":
            raise checkpoints.CheckpointCacheError("benchmark: quantize while loading (cache not used)")
        return original(spec, precision)

    checkpoints.prepare_checkpoint = no_quantized_cache


def _run_prepare(cfg: RunConfig) -> dict[str, Any]:
    """Build the checkpoint cache entries the measured runs read (the GGUF conversion, int8, nf4)."""
    from ffm_edge import checkpoints
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec(cfg.model)
    out: dict[str, Any] = {"source": None, "entries": {}, "errors": {}}
    started = time.perf_counter()
    out["source"] = checkpoints.source_checkpoint(spec)
    for precision in PRECISIONS:
        if precision not in spec.precisions:
            continue
        try:
            path = checkpoints.prepare_checkpoint(spec, precision)
            out["entries"][precision] = str(path)
        except Exception as exc:
            out["errors"][precision] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = time.perf_counter() - started
    return out


def _train_ffm(cfg: RunConfig, meter: PhaseMeter, record: dict[str, Any], tmp: str) -> None:
    import numpy as np

    with meter.phase("load") as load:
        if not cfg.from_cache:
            _quantize_on_the_fly()
        from ffm_edge.data import LabeledData, get_task
        from ffm_edge.strategies import get_strategy
        from ffm_edge.trainer import TorchTrainer

        spec = _spec_for(cfg)
        task = get_task("sst2")
        options: dict[str, Any] = {"gradient_checkpointing": cfg.gradient_checkpointing}
        if cfg.strategy != "full_q8":
            options["base_precision"] = cfg.precision
        strategy = get_strategy(cfg.strategy, **options)
        trainer = TorchTrainer(
            spec, task, strategy, seed=cfg.seed, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size
        )
    record["load"] = asdict(load)
    record["trainable_params"] = int(trainer.num_trainable())
    record["gradient_checkpointing_enabled"] = bool(trainer.gradient_checkpointing)
    record["micro_batch_size"] = int(trainer.micro_batch_size)
    record["model_class"] = type(trainer.model).__name__
    from ffm_edge.trainer import canonical_tensor_name

    named = {canonical_tensor_name(n): p for n, p in trainer.model.named_parameters() if p.requires_grad}
    initial = _save_state(dict(sorted(named.items())), tmp)  # trainable_state() is sorted by name too
    texts, labels = training_sentences(cfg.batch_size * cfg.steps, cfg.seq_len, cfg.seed)
    data = LabeledData(task, [(t, None) for t in texts], labels=np.array(labels), split="train")
    marks: list[float] = []
    losses: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        marks.append(time.perf_counter())
        losses.append(float(loss))

    with meter.phase("train") as train:
        marks.append(time.perf_counter())
        trainer.train(data, epochs=1, max_steps=cfg.steps, progress=progress)
    record["train"] = asdict(train)
    record["step_seconds"] = [b - a for a, b in itertools.pairwise(marks)]
    record["losses"] = losses
    delta = trainer.strategy.finalize_update(_load_delta(trainer.trainable_state(), initial))
    record["update"] = update_sizes(delta, cfg.strategy, len(data))


def _train_plain(cfg: RunConfig, meter: PhaseMeter, record: dict[str, Any], tmp: str, source: str) -> None:
    """The plain way: transformers + peft LoRA (or every weight) + torch AdamW, fp32, no levers."""
    import torch

    with meter.phase("load") as load:
        import peft
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from ffm_edge.spec import load_model_spec

        hf_logging.set_verbosity_error()
        spec = load_model_spec(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, dtype=torch.float32)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if cfg.kind == "plain-lora":
            lora = peft.LoraConfig(
                r=spec.lora.r,
                lora_alpha=spec.lora.alpha,
                lora_dropout=spec.lora.dropout,
                target_modules=list(spec.lora.target_modules),
                modules_to_save=list(spec.lora.modules_to_save),
            )
            model = peft.get_peft_model(model, lora)
        else:
            model.requires_grad_(True)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    record["load"] = asdict(load)
    record["trainable_params"] = int(sum(p.numel() for p in params.values()))
    record["gradient_checkpointing_enabled"] = False
    record["micro_batch_size"] = cfg.batch_size
    record["model_class"] = type(model).__name__
    initial = _save_state(params, tmp)
    texts, labels = training_sentences(cfg.batch_size * cfg.steps, cfg.seq_len, cfg.seed)
    marks: list[float] = []
    losses: list[float] = []
    with meter.phase("train") as train:
        optimizer = torch.optim.AdamW(list(params.values()), lr=spec.training.learning_rate)
        model.train()
        marks.append(time.perf_counter())
        for step in range(cfg.steps):
            part = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            batch = tokenizer(texts[part], truncation=True, max_length=cfg.seq_len, padding=True, return_tensors="pt")
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels[part]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            losses.append(float(loss.detach()))
    record["train"] = asdict(train)
    record["step_seconds"] = [b - a for a, b in itertools.pairwise(marks)]
    record["losses"] = losses
    trained = {n: p.detach().numpy().copy() for n, p in params.items()}
    record["update"] = update_sizes(_load_delta(trained, initial), cfg.kind, cfg.batch_size * cfg.steps)


def run_worker(cfg: RunConfig, source: str | None = None) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process and return its record."""
    import torch

    meter = PhaseMeter()  # right after `import torch`: the bare interpreter-with-torch process
    record: dict[str, Any] = {
        "config": asdict(cfg),
        "name": cfg.name,
        "status": "ok",
        "pid": os.getpid(),
        "baseline_rss_bytes": meter.baseline_bytes,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }
    if cfg.kind == "prepare":
        record["prepare"] = _run_prepare(cfg)
        return record
    with tempfile.TemporaryDirectory(prefix="ffm-memory-") as tmp:
        if cfg.kind == "ffm":
            _train_ffm(cfg, meter, record, tmp)
        elif cfg.kind in ("plain-lora", "plain-full"):
            if source is None:
                raise ValueError("plain runs need the fp32 source checkpoint folder")
            _train_plain(cfg, meter, record, tmp, source)
        else:
            raise ValueError(f"unknown run kind {cfg.kind!r}")
    steps = record["step_seconds"]
    record["step_median_s"] = statistics.median(steps[1:] if len(steps) > 1 else steps)
    record["peak_bytes"] = max(record["load"]["peak_bytes"], record["train"]["peak_bytes"])
    record["loadavg_end"] = os.getloadavg()
    return record


def _worker_main(payload: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    data = json.loads(payload)
    source = data.pop("_source", None)
    record = run_worker(RunConfig(**data), source)
    print(RESULT_MARKER + json.dumps(record), flush=True)
    return 0


# -------------------------------------------------------------------------------------------------------
# The parent: spawn workers, predict, compare
# -------------------------------------------------------------------------------------------------------


def spawn(cfg: RunConfig, *, source: str | None = None, timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run ``cfg`` in a fresh ``sys.executable benchmarks/memory.py --worker`` process; its record."""
    payload = asdict(cfg)
    if source is not None:
        payload["_source"] = source
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(payload)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False)
    except subprocess.TimeoutExpired as exc:
        return {
            "config": asdict(cfg),
            "name": cfg.name,
            "status": "failed",
            "error": f"timed out after {exc.timeout} s",
        }
    wall = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            record: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            record["wall_s"] = wall
            return record
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
    return {
        "config": asdict(cfg),
        "name": cfg.name,
        "status": "failed",
        "error": f"worker exited {proc.returncode} without a record; stderr tail:\n{tail}",
        "wall_s": wall,
    }


def _shape(cfg: RunConfig) -> Any:
    from ffm_edge.memory import TrainingShape

    return TrainingShape(cfg.batch_size, cfg.seq_len, cfg.micro_batch_size, cfg.gradient_checkpointing, 2)


def predict(spec: Any, cfg: RunConfig) -> dict[str, Any]:
    """``estimate_memory`` for ``cfg``; for the plain loops, the model's estimate of the same computation."""
    from ffm_edge.memory import estimate_memory

    if cfg.kind == "ffm":
        est = estimate_memory(
            spec, cfg.strategy, _shape(cfg), precision=cfg.precision, quantized_checkpoint_cached=cfg.from_cache
        )
    elif cfg.kind == "plain-lora":
        est = estimate_memory(spec, "lora", _shape(cfg), precision="fp32")
    elif cfg.kind == "plain-full":
        est = estimate_memory(spec, "full_q8", _shape(cfg), optimizer="adamw")
    else:
        raise ValueError(cfg.kind)
    return {
        "load_bytes": est.load_bytes,
        "train_bytes": est.train_bytes,
        "peak_bytes": est.peak_bytes,
        "trainable_params": est.trainable_params,
        "parts": dict(est.parts),
    }


def relative_error(predicted: float, measured: float) -> float | None:
    """(predicted − measured) / measured, or ``None`` when nothing was measured."""
    return (predicted - measured) / measured if measured > 0 else None


def attach_prediction(spec: Any, record: dict[str, Any]) -> None:
    """Add the prediction and its error per phase to a measured record."""
    cfg = RunConfig(**record["config"])
    pred = predict(spec, cfg)
    record["prediction"] = pred
    if record.get("status") != "ok":
        return
    record["error"] = {
        "load": relative_error(pred["load_bytes"], record["load"]["peak_bytes"]),
        "train": relative_error(pred["train_bytes"], record["train"]["peak_bytes"]),
        "peak": relative_error(pred["peak_bytes"], record["peak_bytes"]),
    }


def strategy_configs(model: str, batch: int, seq: int, steps: int) -> list[RunConfig]:
    """The fixed configurations of the table: every strategy, the quantized bases, and the plain loops."""
    common: dict[str, Any] = {"model": model, "batch_size": batch, "seq_len": seq, "steps": steps}
    configs = [
        RunConfig(strategy="lora", precision="fp32", **common),
        RunConfig(strategy="lora", precision="int8", **common),
        RunConfig(strategy="lora", precision="nf4", **common),
    ]
    if model in ON_THE_FLY:
        configs.append(RunConfig(strategy="lora", precision="nf4", from_cache=False, **common))
    configs += [
        RunConfig(strategy="head", precision="fp32", **common),
        RunConfig(strategy="prompt", precision="fp32", **common),
        RunConfig(strategy="full_q8", precision="fp32", gradient_checkpointing=True, **common),  # its default
        RunConfig(kind="plain-lora", group="baseline", label="plain LoRA (peft + AdamW, fp32)", **common),
        RunConfig(kind="plain-full", group="baseline", label="plain full AdamW (fp32)", **common),
    ]
    return configs


def config_from_candidate(candidate: Any, model: str, batch: int, seq: int, steps: int, group: str) -> RunConfig:
    """The run that stands for a planner candidate (quantized bases from the cached checkpoint)."""
    return RunConfig(
        model=model,
        strategy=candidate.strategy,
        precision=candidate.precision,
        gradient_checkpointing=bool(candidate.gradient_checkpointing),
        micro_batch_size=int(candidate.micro_batch_size),
        batch_size=batch,
        seq_len=seq,
        steps=steps,
        group=group,
    )


def smallest_participating_budget(spec: Any, batch: int, seq: int, available: Sequence[str]) -> tuple[int, Any]:
    """The smallest budget at which the planner still picks LoRA or a soft prompt, and its plan."""
    from ffm_edge.planner import plan_training

    everything = plan_training(spec, 2**50, batch_size=batch, seq_len=seq, available=available)
    budget = min(c.required_bytes for c in everything.candidates if c.strategy in ("lora", "prompt"))
    plan = plan_training(spec, budget, batch_size=batch, seq_len=seq, available=available)
    return budget, plan


def sweep_budgets(spec: Any, batch: int, seq: int, available: Sequence[str], count: int) -> list[int]:
    """``count`` budgets, generous to tight: geometric from the most capable unlevered candidate's peak
    (+5 %) down to the smallest budget that still lets the device train LoRA or a prompt, then one below it."""
    from ffm_edge.planner import plan_training

    everything = plan_training(spec, 2**50, batch_size=batch, seq_len=seq, available=available)
    top = int(max(c.required_bytes for c in everything.candidates) * 1.05)
    low, _ = smallest_participating_budget(spec, batch, seq, available)
    steps = max(1, count - 2)
    budgets = [int(top * (low / top) ** (i / steps)) for i in range(steps + 1)]
    budgets.append(int(low * 0.9))
    return sorted(set(budgets), reverse=True)


# -------------------------------------------------------------------------------------------------------
# Calibration: what the measurements imply for the memory model's constants
# -------------------------------------------------------------------------------------------------------


def calibration_fit(spec: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per measurement, the constant it implies when the model's other parts are taken as they are.

    - ``runtime_bytes`` from fp32 loads: measured load − fp32 weights;
    - ``bytes_per_weight[int8|nf4]`` from loads of the cached quantized base: (load − runtime − the
      unquantized rest in fp32) / the quantized Linear weights;
    - ``activation_floats`` (``ACTIVATION_FLOATS_PER_HIDDEN × activation_factor``) from fp32 LoRA and
      plain-LoRA training peaks without levers: what is left per layer after runtime, weights, trainable
      state and the attention term, per token and hidden unit, in floats.
    """
    from ffm_edge.memory import RUNTIME_OVERHEAD, _linear_params, estimate_memory

    mem = spec.memory
    linear = _linear_params(mem)
    other = mem.params - linear
    runtime = RUNTIME_OVERHEAD.get(spec.family, 200 * MiB)
    out: dict[str, Any] = {"runtime_bytes": [], "bytes_per_weight": {"int8": [], "nf4": []}, "activation_floats": []}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        cfg = RunConfig(**rec["config"])
        load = rec["load"]["peak_bytes"]
        if cfg.precision == "fp32" and cfg.kind == "ffm":
            out["runtime_bytes"].append({"run": cfg.name, "value": load - mem.params * 4})
        elif cfg.kind == "ffm" and cfg.from_cache and cfg.precision in ("int8", "nf4"):
            out["bytes_per_weight"][cfg.precision].append(
                {"run": cfg.name, "value": (load - runtime - other * 4) / linear}
            )
        lora_like = cfg.kind == "plain-lora" or (cfg.kind == "ffm" and cfg.strategy == "lora")
        no_levers = not cfg.gradient_checkpointing and cfg.micro_batch_size in (None, cfg.batch_size)
        if lora_like and cfg.precision == "fp32" and no_levers:
            est = estimate_memory(spec, "lora", _shape(cfg))
            tokens = cfg.batch_size * cfg.seq_len
            heads = max(1, mem.hidden_size // 64)
            attention = cfg.batch_size * heads * cfg.seq_len**2 * 4.0 * 2
            rest = rec["train"]["peak_bytes"] - est.parts["runtime"] - est.parts["weights"] - est.parts["trainable"]
            floats = (rest / mem.num_layers - attention) / (tokens * mem.hidden_size * 4.0)
            out["activation_floats"].append({"run": cfg.name, "value": floats})
    return out


# -------------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f} %"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _baseline_for(rec: dict[str, Any]) -> str:
    cfg = rec["config"]
    return "plain-full" if cfg["strategy"] == "full_q8" or cfg["kind"] == "plain-full" else "plain-lora"


def add_ratios(records: Sequence[dict[str, Any]]) -> None:
    """Peak memory and step time of each run against its plain loop (full_q8 against plain full AdamW)."""
    plain = {r["config"]["kind"]: r for r in records if r.get("status") == "ok" and r["config"]["kind"] != "ffm"}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        base = plain.get(_baseline_for(rec))
        if base is None:
            continue
        rec["vs_plain"] = {
            "baseline": base["name"],
            "peak_ratio": rec["peak_bytes"] / base["peak_bytes"],
            "train_ratio": rec["train"]["peak_bytes"] / base["train"]["peak_bytes"],
            "step_ratio": rec["step_median_s"] / base["step_median_s"],
        }


def table_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    """The Markdown table of one model's runs."""
    lines = [
        "| configuration | trainable | update B fp32 | fp16 | int8 | load pred MiB | load meas MiB | err | "
        "train pred MiB | train meas MiB | err | step s | peak vs plain | step vs plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        name = rec["name"]
        if rec["config"].get("group") == "planner-min":
            name = f"**{name}** (planner, smallest)"
        elif rec["config"].get("group") == "sweep":
            name = f"{name} (sweep)"
        if rec.get("status") != "ok":
            lines.append(f"| {name} | failed: {rec.get('error', '').splitlines()[0][:80]} |" + " |" * 12)
            continue
        up = rec["update"]
        sizes = [f"{up[c]['chunk_bytes']:,}" + ("†" if up[c]["over_default_limit"] else "") for c in CODECS]
        pred, err, vs = rec["prediction"], rec["error"], rec.get("vs_plain", {})
        which = " (full)" if _baseline_for(rec) == "plain-full" and rec["config"]["kind"] == "ffm" else ""
        lines.append(
            f"| {name} | {rec['trainable_params']:,} | {' | '.join(sizes)} | {_mib(pred['load_bytes'])} | "
            f"{_mib(rec['load']['peak_bytes'])} | {_pct(err['load'])} | {_mib(pred['train_bytes'])} | "
            f"{_mib(rec['train']['peak_bytes'])} | {_pct(err['train'])} | {rec['step_median_s']:.2f} | "
            f"{_ratio(vs.get('peak_ratio'))}{which} | {_ratio(vs.get('step_ratio'))}{which} |"
        )
    return lines


def evaluate_targets(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets on one model's runs, with the numbers that decide them."""
    ok = [r for r in records if r.get("status") == "ok"]
    by_kind = {r["config"]["kind"]: r for r in ok if r["config"]["kind"] != "ffm"}
    minimal = next((r for r in ok if r["config"]["group"] == "planner-min"), None)
    full = next((r for r in ok if r["config"]["strategy"] == "full_q8" and r["config"]["group"] == "strategy"), None)
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, detail: str) -> None:
        targets.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "met": value is not None and value <= limit,
                "detail": detail,
            }
        )

    plain_lora, plain_full = by_kind.get("plain-lora"), by_kind.get("plain-full")
    if minimal and plain_lora:
        add(
            "smallest participating peak ≤ 0.5× plain fp32 LoRA",
            minimal["peak_bytes"] / plain_lora["peak_bytes"],
            0.5,
            f"{minimal['name']}: {_mib(minimal['peak_bytes'])} MiB vs {_mib(plain_lora['peak_bytes'])} MiB",
        )
        add(
            "its step time ≤ 1.5× plain fp32 LoRA",
            minimal["step_median_s"] / plain_lora["step_median_s"],
            1.5,
            f"{minimal['step_median_s']:.2f} s vs {plain_lora['step_median_s']:.2f} s",
        )
    if full and plain_full:
        add(
            "full_q8 peak ≤ 0.8× plain full AdamW",
            full["peak_bytes"] / plain_full["peak_bytes"],
            0.8,
            f"{_mib(full['peak_bytes'])} MiB vs {_mib(plain_full['peak_bytes'])} MiB",
        )
        add(
            "full_q8 step time ≤ 1.5× plain full AdamW",
            full["step_median_s"] / plain_full["step_median_s"],
            1.5,
            f"{full['step_median_s']:.2f} s vs {plain_full['step_median_s']:.2f} s",
        )
    for rec in ok:
        if rec["config"]["kind"] != "ffm":
            continue
        for phase in ("train", "load"):
            err = rec["error"][phase]
            add(
                f"{phase} prediction within ±15 %: {rec['name']}",
                None if err is None else abs(err),
                0.15,
                f"predicted {_mib(rec['prediction'][phase + '_bytes'])} MiB, measured "
                f"{_mib(rec[phase]['peak_bytes'])} MiB ({_pct(err)})",
            )
    return targets


def render_markdown(result: dict[str, Any]) -> str:
    """The report: settings, then per model the table, the targets and the sweep."""
    s = result["settings"]
    lines = [
        "# Memory and update size per strategy: predicted vs measured",
        "",
        f"Generated by `benchmarks/memory.py` on {result['environment']['date']} "
        f"({result['environment']['cpu_count']} CPUs, torch {result['environment']['versions'].get('torch')}, "
        f"transformers {result['environment']['versions'].get('transformers')}, peft "
        f"{result['environment']['versions'].get('peft')}, bitsandbytes "
        f"{result['environment']['versions'].get('bitsandbytes')}). {s['steps']} optimizer steps per run, each "
        "run in a fresh process. MiB are resident bytes above the bare interpreter-with-torch process "
        "(VmHWM per phase, reset with /proc/self/clear_refs). Predicted = `ffm_edge.memory.estimate_memory`; "
        "err = (predicted − measured) / measured. Update bytes: all 64 KiB chunk frames of the real delta "
        "(† = over the wire's default 256 MiB frame limit). Ratios: peak (max of load and train) and median "
        "step time against the plain fp32 LoRA loop, or against plain full AdamW where marked (full).",
        "",
    ]
    for model, block in result["models"].items():
        lines += [f"## {model} (batch {block['batch_size']}, sequence {block['seq_len']})", ""]
        lines += table_rows(block["runs"] + block.get("sweep_runs", []))
        lines.append("")
        if block.get("planner_min"):
            pm = block["planner_min"]
            lines += [
                f"Smallest participating budget: {_mib(pm['budget_bytes'])} MiB → {pm['choice']}. {pm['reason']}",
                "",
            ]
        if block.get("targets"):
            lines += ["| target | value | limit | met | numbers |", "|---|---:|---:|---|---|"]
            for t in block["targets"]:
                value = "-" if t["value"] is None else f"{t['value']:.2f}"
                lines.append(
                    f"| {t['target']} | {value} | {t['limit']} | {'yes' if t['met'] else '**no**'} | {t['detail']} |"
                )
            lines.append("")
        if block.get("sweep"):
            lines += [
                "Budget sweep: the planner's pick at each budget, run for real (peak = max of load and train).",
                "",
                "| budget MiB | planner's pick | predicted peak MiB | measured peak MiB | under budget |",
                "|---:|---|---:|---:|---|",
            ]
            for row in block["sweep"]:
                measured = row.get("measured_peak_bytes")
                verdict = "-" if row.get("under_budget") is None else ("yes" if row["under_budget"] else "**no**")
                lines.append(
                    f"| {_mib(row['budget_bytes'])} | {row['choice'] or 'none: ' + row.get('reason', '')} | "
                    f"{_mib(row.get('predicted_peak_bytes'))} | {_mib(measured)} | {verdict} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def render_plot(result: dict[str, Any], path: Path) -> str | None:
    """Peak memory (predicted vs measured) and update size per configuration; ``None`` or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib missing: {exc}"
    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(15, 4.8 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        runs = [r for r in result["models"][model]["runs"] if r.get("status") == "ok"]
        names = [r["name"] for r in runs]
        xs = range(len(runs))
        ax = axes[row][0]
        width = 0.2
        series = [
            ("load predicted", [r["prediction"]["load_bytes"] for r in runs], -1.5, "#9ecae1", None),
            ("load measured", [r["load"]["peak_bytes"] for r in runs], -0.5, "#3182bd", None),
            ("train predicted", [r["prediction"]["train_bytes"] for r in runs], 0.5, "#fdae6b", None),
            ("train measured", [r["train"]["peak_bytes"] for r in runs], 1.5, "#e6550d", None),
        ]
        for label, values, offset, color, _ in series:
            ax.bar([x + offset * width for x in xs], [v / MiB for v in values], width, label=label, color=color)
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("MiB above bare torch")
        ax.set_title(f"{model}: peak memory per phase")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        for i, codec in enumerate(CODECS):
            ax.bar(
                [x + (i - 1) * 0.27 for x in xs], [r["update"][codec]["chunk_bytes"] for r in runs], 0.27, label=codec
            )
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("bytes per update (chunk frames)")
        ax.set_title(f"{model}: update size per codec")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def environment() -> dict[str, Any]:
    """Versions and machine facts for the JSON."""
    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy", "gguf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "ffm_cache_dir": os.environ.get("FFM_CACHE_DIR"),
    }


# -------------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------------


class Runner:
    """Spawns each distinct configuration once (one worker at a time) and remembers its record."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.done: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.count = 0

    def run(self, spec: Any, cfg: RunConfig, source: str | None) -> dict[str, Any]:
        if cfg.key() in self.done:
            earlier = self.done[cfg.key()]
            print(f"  = {cfg.name}: same configuration as '{earlier['name']}', reusing that run", flush=True)
            return earlier
        self.count += 1
        print(f"  [{self.count}] {cfg.model} {cfg.name} ...", end="", flush=True)
        record = spawn(cfg, source=source if cfg.kind != "ffm" else None, timeout=self.timeout)
        record["run_id"] = self.count
        attach_prediction(spec, record)
        if record["status"] == "ok":
            err = record["error"]
            print(
                f" load {_mib(record['load']['peak_bytes'])} MiB (pred {_pct(err['load'])}), "
                f"train {_mib(record['train']['peak_bytes'])} MiB (pred {_pct(err['train'])}), "
                f"{record['step_median_s']:.2f} s/step, {record['wall_s']:.0f} s",
                flush=True,
            )
        else:
            print(" FAILED: " + record["error"].splitlines()[0], flush=True)
            print("    " + "\n    ".join(record["error"].splitlines()[1:]), flush=True)
        self.done[cfg.key()] = record
        return record


def benchmark_model(model: str, args: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    """Every configuration of one model; the sweep when asked."""
    from ffm_edge.planner import format_plan, plan_training
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec(model)
    batch, seq = (QUICK_SHAPES if args.quick else SHAPES)[model]
    steps = args.steps or (2 if args.quick else 3)
    print(f"{model}: batch {batch}, sequence {seq}, {steps} steps", flush=True)
    prepare = spawn(RunConfig(model=model, kind="prepare", label="prepare cache"), timeout=args.timeout)
    if prepare["status"] != "ok":
        raise SystemExit(f"{model}: preparing the checkpoint cache failed: {prepare['error']}")
    prep = prepare["prepare"]
    print(
        f"  checkpoint cache ready in {prepare['wall_s']:.0f} s: {sorted(prep['entries'])}"
        + (f"; failed: {prep['errors']}" if prep["errors"] else ""),
        flush=True,
    )
    source = prep["source"]
    available = [p for p in PRECISIONS if p == "fp32" or p in prep["entries"]]
    block: dict[str, Any] = {
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "prepare": prep,
        "available_precisions": available,
        "runs": [],
    }
    for cfg in strategy_configs(model, batch, seq, steps):
        block["runs"].append(runner.run(spec, cfg, source))
    budget, plan = smallest_participating_budget(spec, batch, seq, available)
    choice = plan.choice
    block["planner_min"] = {
        "budget_bytes": budget,
        "choice": choice.label if choice else None,
        "reason": plan.reason,
        "plan_table": format_plan(plan),
    }
    if choice is not None:
        cfg = config_from_candidate(choice, model, batch, seq, steps, "planner-min")
        record = runner.run(spec, cfg, source)
        if record in block["runs"]:  # the same run as a strategy row: show it once more as the planner's
            record = {**record, "config": {**record["config"], "group": "planner-min"}}
        block["runs"].append(record)
    if model in SWEEP_MODELS and not args.skip_sweep and not args.quick:
        block["sweep"] = []
        print(f"  budget sweep ({args.sweep_budgets} budgets)", flush=True)
        for budget_bytes in sweep_budgets(spec, batch, seq, available, args.sweep_budgets):
            row: dict[str, Any] = {"budget_bytes": budget_bytes}
            try:
                picked = plan_training(spec, budget_bytes, batch_size=batch, seq_len=seq, available=available)
            except Exception as exc:  # InsufficientMemoryError: nothing fits
                row.update(choice=None, reason=str(exc))
                print(f"  budget {_mib(budget_bytes)} MiB: nothing fits", flush=True)
                block["sweep"].append(row)
                continue
            assert picked.choice is not None
            row.update(
                choice=picked.choice.label, reason=picked.reason, predicted_peak_bytes=picked.choice.estimate.peak_bytes
            )
            print(f"  budget {_mib(budget_bytes)} MiB -> {picked.choice.label}", flush=True)
            cfg = config_from_candidate(picked.choice, model, batch, seq, steps, "sweep")
            record = runner.run(spec, cfg, source)
            row["run_id"] = record.get("run_id")
            if record["status"] == "ok":
                row["measured_peak_bytes"] = record["peak_bytes"]
                row["under_budget"] = record["peak_bytes"] <= budget_bytes
            else:
                row["error"] = record["error"]
                row["under_budget"] = None
            block["sweep"].append(row)
        sweep_runs = {r["run_id"] for r in block["sweep"] if r.get("run_id") is not None}
        known = {r.get("run_id") for r in block["runs"]}
        block["sweep_runs"] = [r for r in runner.done.values() if r.get("run_id") in sweep_runs - known]
    finish_block(spec, block)
    return block


def finish_block(spec: Any, block: dict[str, Any]) -> None:
    """Ratios, targets and the calibration fit of one model's measured runs."""
    every = block["runs"] + block.get("sweep_runs", [])
    add_ratios(every)
    block["targets"] = evaluate_targets(every)
    block["calibration_fit"] = calibration_fit(spec, every)


def write_report(result: dict[str, Any], out_dir: Path, stem: str) -> str:
    """Write ``<stem>.json``, ``.md`` and ``.png``; return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = render_markdown(result)
    (out_dir / f"{stem}.md").write_text(markdown, encoding="utf-8")
    problem = render_plot(result, out_dir / f"{stem}.png")
    if problem:
        print(f"no plot: {problem}")
    return markdown


def report_only(path: Path) -> int:
    """Re-derive predictions and the report from the measurements in ``path`` (nothing is measured)."""
    from ffm_edge.spec import load_model_spec

    result = json.loads(path.read_text(encoding="utf-8"))
    for model, block in result["models"].items():
        spec = load_model_spec(model)
        for record in block["runs"] + block.get("sweep_runs", []):
            attach_prediction(spec, record)
        for row in block.get("sweep", []):
            if row.get("measured_peak_bytes") is not None:
                row["under_budget"] = row["measured_peak_bytes"] <= row["budget_bytes"]
        finish_block(spec, block)
    result["report_rendered"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(write_report(result, path.parent, path.stem))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Peak memory (load and training, bytes above bare torch) and update size per training strategy, "
            "measured in fresh subprocesses and set against ffm_edge.memory's prediction; plain peft + AdamW "
            "loops as the baseline; a planner budget sweep with real runs. Writes memory.json, memory.md and "
            "memory.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(SHAPES), help="model specs to measure"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes (MiniLM batch 4 seq 32, SmolLM2 batch 2 seq 32), 2 steps, no sweep; "
        "writes memory-quick.* so the committed results stay",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON, Markdown and PNG go")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the SmolLM2 planner budget sweep")
    parser.add_argument("--sweep-budgets", type=int, default=8, help="number of budgets in the sweep")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 3; 2 with --quick)")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S, help="seconds allowed per worker")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: reload memory.json from --out-dir, recompute predictions, errors, ratios and "
        "targets with the current ffm_edge.memory constants, and rewrite memory.md and memory.png "
        "(the sweep's picks stay those of the run)",
    )
    parser.add_argument("--worker", metavar="JSON", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return _worker_main(args.worker)
    if args.report_only:
        return report_only(args.out_dir / ("memory-quick.json" if args.quick else "memory.json"))
    started = time.perf_counter()
    runner = Runner(args.timeout)
    result: dict[str, Any] = {
        "settings": {
            "models": args.models,
            "quick": args.quick,
            "steps": args.steps or (2 if args.quick else 3),
            "shapes": {m: (QUICK_SHAPES if args.quick else SHAPES)[m] for m in args.models},
            "codecs": list(CODECS),
            "chunk_size": CHUNK_SIZE,
            "measure": "VmHWM - VmRSS after `import torch`, per phase (clear_refs 5), fresh process per run",
            "task": "sst2 (2 labels); built sentences of 2 x seq_len words, truncated to seq_len tokens",
        },
        "environment": environment(),
        "models": {},
    }
    for model in args.models:
        result["models"][model] = benchmark_model(model, args, runner)
    result["wall_s"] = time.perf_counter() - started
    stem = "memory-quick" if args.quick else "memory"
    markdown = write_report(result, args.out_dir, stem)
    print()
    print(markdown)
    print(f"wrote {args.out_dir / stem}.json, .md, .png in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
