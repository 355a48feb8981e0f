"""Bytes a device pulls per round with each downlink codec, and what the rounding does to accuracy.

The hub stores, aggregates and evaluates global versions in fp32; ``ffm-hub serve --downlink-codec`` only
changes what devices pull (``HubSettings.downlink_codec``). Two parts, each against fp32 measured in the
same run:

1. **Frames** (always; about a minute). A real global state: ``--model`` trained for one short epoch on
   sentiment sentences built here, per strategy (``lora``: the LoRA matrices and the head a LoRA device
   pulls; ``full_q8``: every weight). Each is encoded as the hub serves it (``encode_global`` with the codec
   ``downlink_codec_for`` allows) and cut into the hub's MQTT chunks. Per codec: bytes on MQTT, the ratio to
   fp32, the relative L2 and largest absolute error of what the device decodes, the hub's encode time (once
   per version and strategy, then cached) and a device's decode time (median of ``--repeats``).
2. **Federations** (``--demo``; minutes per codec). ``ffm-hub demo`` (a hub process, the managed broker, 3
   ``ffm-edge run`` processes) once per codec on the same data and seeds: accuracy of every global version
   and bytes sent down. fp32 runs ``--fp32-repeats`` times, so the spread between two identical fp32 runs
   shows how much of a codec's difference is run-to-run noise (the order updates arrive in changes float
   sums). Data: SST-2 with all-MiniLM-L6-v2 LoRA when ``--data-dir``/``$FFM_DATA_DIR`` has it, else the
   digits with EfficientNet-Lite0 (what the demo picks).

Results go to ``benchmarks/results/downlink.json``, ``downlink.md`` and (with ``--demo``) ``downlink.png``;
the tables are printed too.

    python benchmarks/downlink.py                      # frames only
    FFM_DATA_DIR=../shared/data python benchmarks/downlink.py --demo
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # run as a script it is; loaded by path (as tests do) it is not
    sys.path.insert(0, str(BENCH_DIR))
from _common import median_seconds, package_version, positive_int, sentiment_sentences, write_results  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
CODECS = ("fp32", "fp16", "int8")
CHUNK = 128 * 1024  # the hub's default chunk size


def trained_state(model: str, strategy: str, sentences: int, seed: int) -> tuple[dict[str, np.ndarray], float]:
    """The trainable state a hub would hold after a round: ``strategy`` trained one epoch on built sentences."""
    from ffm_edge.data import LabeledData, get_task
    from ffm_edge.spec import load_model_spec
    from ffm_edge.trainer import TorchTrainer

    task = get_task("sst2")
    trainer = TorchTrainer(load_model_spec(model), task, strategy, seed=seed)
    texts, labels = sentiment_sentences(sentences, seed)
    data = LabeledData(task, [(t, None) for t in texts], labels, split="train", source="built:sentiment")
    report = trainer.train(data, epochs=1)
    return trainer.trainable_state(), report.last_loss


def measure_frames(state: Mapping[str, np.ndarray], strategy: str, model: str, repeats: int) -> list[dict[str, Any]]:
    """One row per codec: the frame the hub would serve for ``state``, its bytes on MQTT and its rounding."""
    from ffm_edge.wire import GlobalMeta, decode_global, encode_global, split_frame
    from ffm_hub.hub import downlink_codec_for

    rows = []
    exact = {k: np.asarray(v, np.float64) for k, v in state.items()}
    norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in exact.values())))
    for wanted in CODECS:
        codec, why_not = downlink_codec_for(state, wanted)
        meta = GlobalMeta("bench", 1, 0, model, strategy, codec, time.time(), 3)
        encode_s, frame = median_seconds(lambda meta=meta: encode_global(meta, state), repeats)
        decode_s, (_, pulled) = median_seconds(lambda frame=frame: decode_global(frame), repeats)
        chunks = split_frame(frame, chunk_size=CHUNK, transfer_id="pull-" + "0" * 24)
        diff = sum(float(np.sum((pulled[k] - exact[k]) ** 2)) for k in exact)
        rows.append(
            {
                "strategy": strategy,
                "codec": wanted,
                "served_as": codec,
                "fallback_reason": why_not,
                "tensors": len(state),
                "elements": int(sum(v.size for v in state.values())),
                "frame_bytes": len(frame),
                "mqtt_bytes": sum(len(c) for c in chunks),
                "chunks": len(chunks),
                "rel_l2_error": float(np.sqrt(diff)) / norm if norm else 0.0,
                "max_abs_error": max(float(np.max(np.abs(pulled[k] - exact[k]))) for k in exact),
                "encode_ms": encode_s * 1e3,
                "decode_ms": decode_s * 1e3,
            }
        )
    base = rows[0]["mqtt_bytes"]
    for row in rows:
        row["vs_fp32"] = row["mqtt_bytes"] / base
    return rows


def run_federations(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """``ffm-hub demo`` once per codec (fp32 ``--fp32-repeats`` times) with the same data and seeds."""
    from ffm_hub.demo import DemoOptions, run_demo

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    plan = [(codec, seed, 0) for seed in seeds for codec in CODECS]
    plan += [("fp32", seeds[0], repeat) for repeat in range(1, args.fp32_repeats)]  # same seed: determinism
    runs = []
    for codec, seed, repeat in plan:
        print(f"\n== demo, --downlink-codec {codec} --seed {seed} (run {repeat + 1}) ==", file=sys.stderr, flush=True)
        started = time.monotonic()
        rows = run_demo(
            DemoOptions(
                clients=args.clients,
                rounds=args.rounds,
                data_dir=args.data_dir,
                downlink_codec=codec,
                seed=seed,
                workdir=workdir / f"{codec}-{seed}-{repeat}",
                progress=False,
            )
        )
        rounds = [r for r in rows if r.version > 0]
        runs.append(
            {
                "codec": codec,
                "seed": seed,
                "repeat": repeat,
                "metric": rows[0].metric,
                "values": [r.value for r in rows],
                "bytes_down": [r.bytes_down for r in rows],
                "bytes_up": [r.bytes_up for r in rows],
                "bytes_down_total": sum(r.bytes_down for r in rounds),
                "bytes_down_per_client_round": sum(r.bytes_down for r in rounds) / (len(rounds) * args.clients),
                "wall_s": time.monotonic() - started,
                "rows": [asdict(r) for r in rows],
            }
        )
    return runs


def _name(run: Mapping[str, Any]) -> str:
    repeat = f", run {run['repeat'] + 1}" if run.get("repeat") else ""
    return f"{run['codec']}, seed {run.get('seed', 0)}{repeat}"


def plot(runs: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    """Accuracy per global version, one line per run (colour: codec, marker: seed); returns why not when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib missing: {exc}"
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red"}
    styles = {"fp32": "-", "fp16": "--", "int8": ":"}
    markers = "osD^v"
    seeds = sorted({run.get("seed", 0) for run in runs})
    for run in runs:
        if run.get("repeat"):
            continue  # an identical repeat would only hide under its first run
        kb = run["bytes_down_per_client_round"] / 1e3
        ax.plot(
            range(len(run["values"])),
            run["values"],
            styles[run["codec"]],
            color=colours[run["codec"]],
            marker=markers[seeds.index(run.get("seed", 0)) % len(markers)],
            label=f"{_name(run)} ({kb:,.0f} kB down per client-round)",
        )
    ax.set_xlabel("global version")
    ax.set_ylabel(runs[0]["metric"])
    ax.set_title("ffm-hub demo: accuracy per version by downlink codec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def paired_differences(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Final and mean-over-rounds metric of each codec minus fp32's at the same seed, and fp32's own spread
    between seeds (the change any perturbation of the training trajectory makes)."""
    first = {(r["codec"], r.get("seed", 0)): r for r in runs if not r.get("repeat")}
    fp32 = {seed: run for (codec, seed), run in first.items() if codec == "fp32"}

    def final(run: Mapping[str, Any]) -> float:
        return float(run["values"][-1])

    def mean_rounds(run: Mapping[str, Any]) -> float:
        return float(np.mean(run["values"][1:]))

    out: dict[str, Any] = {}
    for codec in CODECS[1:]:
        pairs = [(first[(codec, seed)], base) for seed, base in sorted(fp32.items()) if (codec, seed) in first]
        out[codec] = {
            "seeds": [base.get("seed", 0) for _, base in pairs],
            "final_minus_fp32": [final(a) - final(b) for a, b in pairs],
            "mean_minus_fp32": [mean_rounds(a) - mean_rounds(b) for a, b in pairs],
        }
    ordered = [fp32[seed] for seed in sorted(fp32)]
    out["fp32_seed_spread"] = {
        "final": [final(b) - final(a) for a, b in itertools.pairwise(ordered)],
        "mean": [mean_rounds(b) - mean_rounds(a) for a, b in itertools.pairwise(ordered)],
    }
    repeats = [r for r in runs if r.get("repeat") and r.get("seed", 0) in fp32]
    out["fp32_repeat_identical"] = [r["values"] == fp32[r.get("seed", 0)]["values"] for r in repeats]
    return out


def render_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "# Downlink codec: what a device pulls per round",
        "",
        f"Model `{result['model']}`; each state trained one epoch on {result['sentences']} built sentences. "
        f"Times are medians of {result['repeats']} runs, one torch thread, {result['cpus']} CPU(s) shared with "
        f"other jobs, {result['timestamp']}. fp32 is the baseline (what hubs served before the option).",
        "",
        "| strategy | codec | served as | elements | bytes on MQTT | vs fp32 | rel. L2 error | max abs error | "
        "hub encode ms | device decode ms |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in result["frames"]:
        lines.append(
            f"| {row['strategy']} | {row['codec']} | {row['served_as']} | {row['elements']:,} | "
            f"{row['mqtt_bytes']:,} | {row['vs_fp32']:.3f} | {row['rel_l2_error']:.2e} | {row['max_abs_error']:.2e} "
            f"| {row['encode_ms']:.1f} | {row['decode_ms']:.1f} |"
        )
    lines += [
        "",
        "*bytes on MQTT* = the global frame (envelope + safetensors payload) plus chunk headers, at the hub's "
        "128 KiB chunks. The hub encodes once per version and strategy and caches the frame, so the encode time "
        "is paid once per round, not per device.",
        "",
    ]
    runs = result.get("federations") or []
    if runs:
        metric = runs[0]["metric"]
        versions = len(runs[0]["values"])
        lines += [
            f"## Federations: `ffm-hub demo`, {result['demo']['clients']} clients, {result['demo']['rounds']} rounds",
            "",
            f"Data: {result['demo']['data']}. Same shards and broker for every run; the seed is the clients' "
            f"training seed (`ffm-hub demo --seed`). {metric.capitalize()} of each global version on the held-out data "
            "(version 0 = before training).",
            "",
            "| run | " + " | ".join(f"v{v}" for v in range(versions)) + " | bytes down per client-round | "
            "vs fp32 | wall s |",
            "|---|" + "--:|" * versions + "--:|--:|--:|",
        ]
        base = runs[0]["bytes_down_per_client_round"]
        for run in runs:
            cells = " | ".join("n/a" if v is None else f"{v:.4f}" for v in run["values"])
            lines.append(
                f"| {_name(run)} | {cells} | {run['bytes_down_per_client_round']:,.0f} | "
                f"{run['bytes_down_per_client_round'] / base:.3f} | {run['wall_s']:.0f} |"
            )
        diffs = result.get("paired") or paired_differences(runs)
        lines += ["", f"Paired by seed, {metric} points (codec minus fp32 at the same seed):", ""]
        for codec in CODECS[1:]:
            d = diffs[codec]
            finals = ", ".join(f"{100 * x:+.1f}" for x in d["final_minus_fp32"])
            means = ", ".join(f"{100 * x:+.1f}" for x in d["mean_minus_fp32"])
            lines.append(f"- {codec}: final version {finals}; mean over versions 1-{versions - 1} {means}.")
        spread = diffs["fp32_seed_spread"]
        lines.append(
            "- for scale, fp32 at one seed minus fp32 at the other: final "
            + ", ".join(f"{100 * x:+.1f}" for x in spread["final"])
            + "; mean over versions "
            + ", ".join(f"{100 * x:+.1f}" for x in spread["mean"])
            + "."
        )
        if diffs["fp32_repeat_identical"]:
            same = all(diffs["fp32_repeat_identical"])
            lines.append(
                f"- fp32 repeated at the same seed gave {'identical' if same else '**different**'} accuracies."
            )
        lines.append("")
        if result.get("plot"):
            lines += [f"![accuracy per version]({result['plot']})", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="minilm-l6-v2", help="model spec of the frames part (default minilm-l6-v2)")
    parser.add_argument("--strategies", default="lora,full_q8", help="strategies of the frames part")
    parser.add_argument("--sentences", type=positive_int, default=32, help="training sentences (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, data and order (default 0)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timing repetitions, median (default 3)")
    parser.add_argument("--demo", action="store_true", help="also run `ffm-hub demo` once per codec (minutes each)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="demo rounds (default 5)")
    parser.add_argument("--clients", type=positive_int, default=3, help="demo clients (default 3)")
    parser.add_argument("--seeds", default="0,1", help="demo training seeds, each run with every codec (default 0,1)")
    parser.add_argument(
        "--fp32-repeats", type=positive_int, default=2, help="fp32 runs at the first seed, to check determinism"
    )
    parser.add_argument("--data-dir", default=os.environ.get("FFM_DATA_DIR"), help="demo data (default $FFM_DATA_DIR)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where downlink.json/.md/.png go")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    frames: list[dict[str, Any]] = []
    losses = {}
    for strategy in [s for s in args.strategies.split(",") if s]:
        state, losses[strategy] = trained_state(args.model, strategy, args.sentences, args.seed)
        frames += measure_frames(state, strategy, args.model, args.repeats)
        print(f"{strategy}: " + ", ".join(f"{r['codec']} {r['vs_fp32']:.3f}" for r in frames[-3:]), file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "downlink",
        "model": args.model,
        "sentences": args.sentences,
        "seed": args.seed,
        "repeats": args.repeats,
        "train_last_loss": losses,
        "torch_threads": 1,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {p: package_version(p) for p in ("torch", "transformers", "peft", "safetensors", "paho-mqtt")},
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "frames": frames,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        from ffm_hub.demo import choose_demo_data

        task, model, why = choose_demo_data(None, None, args.data_dir)
        with tempfile.TemporaryDirectory(prefix="ffm-downlink-") as tmp:
            runs = run_federations(args, Path(tmp))
        result["demo"] = {"task": task, "model": model, "data": why, "clients": args.clients, "rounds": args.rounds}
        result["federations"] = runs
        result["paired"] = paired_differences(runs)
        problem = plot(runs, args.out_dir / "downlink.png")
        result["plot"] = "downlink.png" if problem is None else None
        if problem:
            print(problem, file=sys.stderr)
    result["total_seconds"] = time.perf_counter() - started
    write_results(args.out_dir, "downlink", result, render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
