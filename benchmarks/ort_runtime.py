"""The torch-free ORT edge runtime against the torch runtime: step time, device peak memory, install size.

For each strategy (lora, prompt, head) on all-MiniLM-L6-v2, the parent process (which has torch) builds
ONNX Runtime training artifacts once (``ffm_edge.ort.build_artifacts``, dropout as in torch training),
then runs two **fresh subprocesses** on the same built sentences (they fill the sequence length):

* ``ort``: torch is blocked (a meta-path finder makes any ``import torch`` fail), the device
  loads the artifacts with ``OrtTrainer`` and trains;
* ``torch``: the device imports torch and trains with ``TorchTrainer`` (the same model and strategy).

Each child takes one warm-up step, then ``--steps`` optimizer steps, and reports the median seconds per
step (from the per-step progress callback), the process's peak resident memory (``VmHWM``: everything
the device process ever held, libraries included) and its resident memory before any runtime was
imported. Both runtimes are limited to ``--threads`` CPU threads (torch.set_num_threads / ORT
intra_op_num_threads). Ratios are ORT / torch from the same run. The install footprint is the bytes on
disk of each runtime's distributions (from their installed-file records): torch + transformers + peft +
tokenizers + numpy + safetensors against onnxruntime-training + onnx + numpy + tokenizers.

    python benchmarks/ort_runtime.py                   # 3 strategies, 8 steps, batch 16, sequence 64
    python benchmarks/ort_runtime.py --strategies lora --steps 3
    python benchmarks/ort_runtime.py --model efficientnet-lite0   # lora and head on 8x8 digits images

Writes ``benchmarks/results/ort_runtime.json`` and ``ort_runtime.md`` (printed too); another ``--model``
writes ``ort_runtime_<model>.json`` and ``.md``. With an image model the data are scikit-learn's digits
(the graph takes the raw pixels and resizes them to the spec's image size) and ``--seq-len`` is unused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.abc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MiB = 1024 * 1024
RESULT_MARKER = "FFM-ORT-RESULT "
TARGET_RSS = 0.6
TARGET_STEP = 1.2
TORCH_DISTS = ("torch", "transformers", "peft", "tokenizers", "numpy", "safetensors")
ORT_DISTS = ("onnxruntime-training-cpu", "onnx", "numpy", "tokenizers")
_WORDS = (
    "the film was a wonderful moving story about a family that lost everything and found its way back "
    "through music while the cast gave brilliant performances and the direction never slowed although "
    "some critics found the ending tedious and the soundtrack a little loud for such a quiet script"
).split()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _sentences(n: int) -> list[tuple[str, str | None]]:
    return [(" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(120)), None) for i in range(n)]


def _spec(args: argparse.Namespace) -> Any:
    """The model spec measured: a text model at ``--seq-len`` tokens, an image model as it is."""
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec(args.model)
    return dataclasses.replace(spec, max_length=args.seq_len) if spec.modality == "text" else spec


def _task_name(model: str) -> str:
    from ffm_edge.spec import load_model_spec

    return "sst2" if load_model_spec(model).modality == "text" else "digits"


def _data(model: str, n: int) -> tuple[Any, Any]:
    """The task and ``n`` examples: built sentences that fill the sequence, or digits images (repeated)."""
    import numpy as np

    from ffm_edge.data import LabeledData, get_task, load_split

    task = get_task(_task_name(model))
    if task.name == "sst2":
        return task, LabeledData(task, _sentences(n), np.array([i % 2 for i in range(n)]))
    digits = load_split("digits", "train")
    index = np.arange(n) % len(digits)
    return task, LabeledData(task, digits.images[index], np.asarray(digits.labels)[index])


# -- children -------------------------------------------------------------------------------------------
class _NoTorch(importlib.abc.MetaPathFinder):
    """Makes every ``import torch`` fail, as on a device without it. (Not ``sys.modules["torch"] = None``:
    scipy, which loading the digits imports, looks ``torch`` up in ``sys.modules`` and breaks on None.)"""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this process ({name})")
        return None


def _child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "ort":
        sys.meta_path.insert(0, _NoTorch())
    sys.path.insert(0, str(REPO_ROOT))
    bare = _status_bytes("VmRSS")
    n = args.batch_size * (args.steps + 1)
    task, data = _data(args.model, n)
    started = time.perf_counter()
    trainer: Any
    if args.child == "ort":
        from ffm_edge.ort.trainer import OrtTrainer

        runtime_bare = bare
        trainer = OrtTrainer(args.artifacts, task, threads=args.threads, batch_size=args.batch_size)
    else:
        import torch

        torch.set_num_threads(args.threads)
        runtime_bare = _status_bytes("VmRSS")
        from ffm_edge.trainer import TorchTrainer

        trainer = TorchTrainer(_spec(args), task, args.strategy, batch_size=args.batch_size)
    load_s = time.perf_counter() - started
    trainer.train(data, max_steps=1, seed=0)  # warm-up: first-run allocations and kernel choices
    stamps: list[float] = []
    start = time.perf_counter()
    report = trainer.train(data, max_steps=args.steps, seed=1, progress=lambda *_: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    return {
        "runtime": args.child,
        "strategy": args.strategy,
        "torch_imported": sys.modules.get("torch") is not None,
        "trainable": trainer.num_trainable(),
        "tensor_names": trainer.tensor_names,
        "load_s": load_s,
        "step_s": statistics.median(steps),
        "steps": len(steps),
        "mean_loss": report.mean_loss,
        "bare_rss": bare,
        "runtime_bare_rss": runtime_bare,
        "peak_rss": _status_bytes("VmHWM"),
    }


def _run_child(args: argparse.Namespace, runtime: str, strategy: str, artifacts: Path | None) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", runtime, "--strategy", strategy, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
        "--model", args.model,
    ]  # fmt: skip
    if artifacts is not None:
        cmd += ["--artifacts", str(artifacts)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO_ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return dict(json.loads(line[len(RESULT_MARKER) :]))
    raise RuntimeError(f"{runtime}/{strategy} child failed ({proc.returncode}): {proc.stderr[-2000:]}")


# -- footprint ------------------------------------------------------------------------------------------
def _dist_bytes(name: str) -> int:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def footprint() -> dict[str, Any]:
    """Bytes on disk per distribution and per runtime."""
    sizes = {name: _dist_bytes(name) for name in dict.fromkeys(TORCH_DISTS + ORT_DISTS)}
    return {
        "dists": sizes,
        "torch_runtime": sum(sizes[d] for d in TORCH_DISTS),
        "ort_runtime": sum(sizes[d] for d in ORT_DISTS),
        "torch_alone": sizes["torch"],
    }


# -- report ---------------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def _what(result: dict[str, Any]) -> str:
    """The model and its input, as the table's caption says them (results before --model were MiniLM)."""
    model = result.get("model", "minilm-l6-v2")
    if result.get("task", "sst2") == "sst2":
        return f"{model} on sentences of {result['settings']['seq_len']} tokens"
    return f"{model} on 8x8 digits images (resized to the model's input size inside the graph)"


def markdown(result: dict[str, Any]) -> str:
    """The readable table."""
    s = result["settings"]
    lines = [
        "# ORT edge runtime (no torch) vs torch",
        "",
        f"Generated by `benchmarks/ort_runtime.py` on {result['generated']} ({result['cpus']} CPUs, "
        f"{s['threads']} thread(s) per runtime, {_what(result)}, batch {s['batch_size']}, "
        f"median of {s['steps']} steps after one warm-up step, each runtime in a fresh "
        f"process; versions: {result['versions']}). Peak RSS is the device process's VmHWM (everything it "
        "held, libraries included); the ORT process ran with `import torch` blocked. Ratios: ORT / torch.",
        "",
        "| strategy | trainable | same tensor names | torch s/step | ORT s/step | step ratio | torch peak MiB "
        "| ORT peak MiB | RSS ratio | targets (RSS ≤ 0.6×, step ≤ 1.2×) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        t, o = row["torch"], row["ort"]
        met = "met" if row["rss_ratio"] <= TARGET_RSS and row["step_ratio"] <= TARGET_STEP else "**missed**"
        lines.append(
            f"| {row['strategy']} | {o['trainable']:,} | {'yes' if row['same_names'] else '**no**'} | "
            f"{t['step_s']:.3f} | {o['step_s']:.3f} | {row['step_ratio']:.2f}× | {_mib(t['peak_rss'])} | "
            f"{_mib(o['peak_rss'])} | {row['rss_ratio']:.2f}× | {met} |"
        )
    f = result["footprint"]
    lines += [
        "",
        "Memory above the bare interpreter (ORT) / above the interpreter with torch imported (torch), "
        "for the memory model:",
        "",
        "| strategy | torch: bare+torch MiB | torch: peak above it | ORT: bare MiB | ORT: peak above it |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        t, o = row["torch"], row["ort"]
        lines.append(
            f"| {row['strategy']} | {_mib(t['runtime_bare_rss'])} | {_mib(t['peak_rss'] - t['runtime_bare_rss'])} | "
            f"{_mib(o['bare_rss'])} | {_mib(o['peak_rss'] - o['bare_rss'])} |"
        )
    dists = ", ".join(f"{k} {_mib(v)}" for k, v in f["dists"].items())
    lines += [
        "",
        f"Installed footprint (MiB on disk): torch runtime ({' + '.join(TORCH_DISTS)}) "
        f"**{_mib(f['torch_runtime'])}** (torch alone {_mib(f['torch_alone'])}); ORT runtime "
        f"({' + '.join(ORT_DISTS)}) **{_mib(f['ort_runtime'])}** "
        f"({f['ort_runtime'] / max(1, f['torch_runtime']):.2f}×). Per distribution: {dists}. "
        "(onnx is only needed where artifacts are built; a device needs onnxruntime-training, numpy and tokenizers.)",
    ]
    return "\n".join(lines)


def _measure(args: argparse.Namespace, spec: Any, root: Path) -> list[dict[str, Any]]:
    """Build each strategy's artifacts under ``root`` and run the ORT and torch children."""
    from ffm_edge.ort.artifacts import build_artifacts

    rows = []
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        folder = root / strategy
        started = time.perf_counter()
        build_artifacts(spec, _task_name(args.model), strategy, folder)
        build_s = time.perf_counter() - started
        print(f"[{strategy}] artifacts built in {build_s:.1f} s", file=sys.stderr, flush=True)
        ort = _run_child(args, "ort", strategy, folder)
        torch_row = _run_child(args, "torch", strategy, None)
        rows.append(
            {
                "strategy": strategy,
                "build_s": build_s,
                "artifact_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                "ort": ort,
                "torch": torch_row,
                "same_names": ort["tensor_names"] == torch_row["tensor_names"],
                "step_ratio": ort["step_s"] / torch_row["step_s"],
                "rss_ratio": ort["peak_rss"] / torch_row["peak_rss"],
            }
        )
        print(
            f"[{strategy}] step {ort['step_s']:.3f}s vs {torch_row['step_s']:.3f}s, peak "
            f"{_mib(ort['peak_rss'])} vs {_mib(torch_row['peak_rss'])} MiB",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every default."""

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--model", default="minilm-l6-v2", help="model spec: a text model, or efficientnet-lite0")
    parser.add_argument(
        "--strategies", default=None, help="comma-separated strategies (default: lora,prompt,head; images lora,head)"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per example (sentences fill it)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per runtime (shared machines: keep 1)")
    parser.add_argument(
        "--artifacts-dir", type=Path, default=None, help="where to build and keep artifacts (None: a temporary folder)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for ort_runtime.json/.md")
    parser.add_argument("--child", choices=("ort", "torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARKER + json.dumps(_child(args)), flush=True)
        return 0

    sys.path.insert(0, str(REPO_ROOT))
    import torch

    torch.set_num_threads(args.threads)
    spec = _spec(args)
    if args.strategies is None:
        args.strategies = "lora,prompt,head" if spec.modality == "text" else "lora,head"
    with tempfile.TemporaryDirectory(prefix="ffm-ort-bench-") as tmp:
        rows = _measure(args, spec, args.artifacts_dir or Path(tmp))
    versions = {
        d: (metadata.version(d) if _dist_bytes(d) else None) for d in ("torch", "onnxruntime-training-cpu", "onnx")
    }
    result = {
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
        "model": spec.name,
        "task": _task_name(args.model),
        "settings": {k: v for k, v in vars(args).items() if k in ("steps", "batch_size", "seq_len", "threads")},
        "rows": rows,
        "footprint": footprint(),
        "targets": {"rss_ratio": TARGET_RSS, "step_ratio": TARGET_STEP},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ort_runtime" if args.model == "minilm-l6-v2" else f"ort_runtime_{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
