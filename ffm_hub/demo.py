"""The one-command demo: a hub and N edge clients as separate processes on this machine.

The demo process only orchestrates and observes: it starts ``ffm-hub serve`` (which runs the managed
broker), then one ``ffm-edge run`` per client, each holding its own non-IID shard, and watches the
hub's retained manifests over MQTT to print one row per global version.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ffm_edge.data import resolve_data_dir
from ffm_edge.errors import FFMError, TransportError
from ffm_edge.transport.mqtt import MqttTransport, parse_broker_url
from ffm_edge.wire import Manifest, Topics, decode_message

__all__ = ["DemoOptions", "DemoRow", "choose_demo_data", "run_demo"]

log = logging.getLogger("ffm.demo")


@dataclass
class DemoOptions:
    """Settings of ``ffm-hub demo`` (each is a flag)."""

    clients: int = 3
    rounds: int = 5
    task: str | None = None
    model: str | None = None
    samples: int = 900
    alpha: float = 1.0
    epochs: int = 2
    codec: str = "int8"
    downlink_codec: str = "fp32"  # what the clients pull; the hub keeps fp32
    strategy_options: tuple[str, ...] = ()  # KEY=VALUE strategy settings for every torch client
    seed: int = 0  # training seed: client i trains with seed + i (the data shards do not change)
    eval_limit: int = 500
    broker_kind: str = "auto"
    workdir: Path | None = None
    data_dir: str | None = None
    timeout: float = 1800.0
    federation: str = "demo"
    progress: bool = True
    client_strategies: tuple[str, ...] = ()  # per client, cycled; "auto" lets the planner pick
    client_budgets: tuple[str, ...] = ()  # per client, cycled, e.g. ("2GB", "600MB")
    ort_clients: int = 0  # the last N clients train on onnxruntime-training (no torch), artifacts from the hub


@dataclass(frozen=True)
class DemoRow:
    """One global version as the demo reports it."""

    version: int
    metric: str
    value: float | None
    devices: int
    samples: int
    bytes_up: int
    bytes_down: int
    round_s: float
    others: dict[str, float] = field(default_factory=dict)  # the metric of each other strategy's view


def choose_demo_data(task: str | None, model: str | None, data_dir: str | None) -> tuple[str, str, str]:
    """Pick (task, model, why): GLUE SST-2 from the data folder, the HF hub, or the offline digits."""
    if task is not None:
        default_model = "efficientnet-lite0" if task.lower() in ("digits", "cifar10") else "minilm-l6-v2"
        return task, model or default_model, f"task {task} as asked"
    try:
        folder = resolve_data_dir(data_dir)
    except FFMError:
        folder = None
    if folder is not None and (folder / "glue" / "SST-2" / "train.tsv").is_file():
        return "sst2", model or "minilm-l6-v2", f"GLUE SST-2 from {folder}"
    if importlib.util.find_spec("datasets") is not None and not os.environ.get("HF_HUB_OFFLINE"):
        return "sst2", model or "minilm-l6-v2", "GLUE SST-2 from the Hugging Face hub (datasets is installed)"
    return (
        "digits",
        model or "efficientnet-lite0",
        "no GLUE data found (set FFM_DATA_DIR to a folder with glue/SST-2, or install `datasets` when online),"
        " so the demo uses scikit-learn's handwritten digits, which ship with scikit-learn",
    )


def _assign_strategies(opts: DemoOptions, model: str) -> list[tuple[str, str | None, str]]:
    """(asked strategy, budget, strategy it will train) per client; the planner resolves "auto" here too.

    The hub must know every strategy its devices train, so the demo runs the same planner the edges run
    (it is deterministic for a model, batch and budget) to learn what each "auto" client will pick.
    """
    from ffm_edge.planner import plan_training
    from ffm_edge.profile import parse_bytes, probe_device
    from ffm_edge.spec import load_model_spec

    asked = opts.client_strategies or ("lora",)
    out: list[tuple[str, str | None, str]] = []
    spec = load_model_spec(model)
    for i in range(opts.clients):
        strategy = asked[i % len(asked)]
        budget = opts.client_budgets[i % len(opts.client_budgets)] if opts.client_budgets else None
        chosen = strategy
        if strategy == "auto":
            if budget is None:
                raise FFMError("a client with strategy auto needs a budget (--client-budgets)")
            profile = probe_device(budget)
            plan = plan_training(
                spec, parse_bytes(budget), batch_size=spec.training.batch_size, seq_len=spec.max_length,
                available=profile.base_precisions,
            )  # fmt: skip
            assert plan.choice is not None
            chosen = plan.choice.strategy
        out.append((strategy, budget, chosen))
    return out


def _check_ort_strategies(strategies: list[str]) -> None:
    """The ORT clients fetch their artifacts from the hub; fail before starting anything if it cannot build them."""
    from ffm_edge.memory import ORT_STRATEGIES

    for strategy in dict.fromkeys(strategies):
        if strategy not in ORT_STRATEGIES:
            raise FFMError(f"an ORT client cannot train {strategy!r}; the ORT runtime trains {sorted(ORT_STRATEGIES)}")


def _check_strategy_options(options: tuple[str, ...], strategies: set[str]) -> None:
    """Refuse bad ``--strategy-option`` values here, not in N edge logs: each torch client's strategy must take
    them (so the planner's ``auto`` cannot, as the options would not know which strategy they set)."""
    if not options:
        return
    if "auto" in strategies:
        raise FFMError("--strategy-option sets a named strategy; give each client one with --client-strategies")
    from ffm_edge.strategies import parse_strategy_options, strategy_from_options

    parsed = parse_strategy_options(options)  # as each `ffm-edge run` will parse them
    for name in sorted(strategies):
        strategy_from_options(name, parsed)  # ConfigError: unknown key or bad value for this strategy


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    handle: IO[bytes] = open(log_path, "wb")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _row(manifest: Manifest, metric: str) -> DemoRow:
    m = manifest.metrics
    return DemoRow(
        version=manifest.version,
        metric=metric,
        value=m.get(metric),
        devices=int(m.get("devices", 0)),
        samples=int(m.get("num_samples", 0)),
        bytes_up=int(m.get("bytes_in", 0)),
        bytes_down=int(m.get("bytes_out", 0)),
        round_s=float(m.get("round_s", 0.0)),
        others={k: v for k, v in m.items() if k.startswith(metric + "@")},
    )


def format_table(rows: list[DemoRow]) -> str:
    """The per-round table, as Markdown a person can read in a terminal."""
    metric = rows[0].metric if rows else "accuracy"
    extra = sorted({k for r in rows for k in r.others})
    lines = [
        f"| version | {metric} | {''.join(k + ' | ' for k in extra)}devices | samples | bytes up | bytes down "
        "| round time (s) |",
        "|---:|---:|" + "---:|" * len(extra) + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        values = ["n/a" if r.value is None else f"{r.value:.4f}"]
        values += [f"{r.others[k]:.4f}" if k in r.others else "n/a" for k in extra]
        cells = " | ".join(values)
        if r.version == 0:
            lines.append(f"| 0 (initial) | {cells} | - | - | - | - | - |")
        else:
            lines.append(
                f"| {r.version} | {cells} | {r.devices} | {r.samples} | {r.bytes_up:,} | {r.bytes_down:,} "
                f"| {r.round_s:.1f} |"
            )
    return "\n".join(lines)


def run_demo(opts: DemoOptions) -> list[DemoRow]:
    """Run the demo end to end; returns one row per global version."""
    from ffm_edge.data import get_task

    task, model, why = choose_demo_data(opts.task, opts.model, opts.data_dir)
    print(f"data:  {why}\nmodel: {model}\ntask:  {task}", flush=True)
    metric = get_task(task).metrics[0]
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="ffm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if opts.data_dir:
        env["FFM_DATA_DIR"] = opts.data_dir
    py = sys.executable
    assignments = _assign_strategies(opts, model)
    primary, *others = dict.fromkeys(chosen for _, _, chosen in assignments)
    if not 0 <= opts.ort_clients <= opts.clients:
        raise FFMError(f"--ort-clients must be between 0 and --clients ({opts.clients}), got {opts.ort_clients}")
    on_ort = set(range(opts.clients - opts.ort_clients, opts.clients))
    if len(assignments) > 1 or primary != "lora":
        for i, (asked, budget, chosen) in enumerate(assignments):
            print(f"edge-{i}: strategy {asked}{f' with budget {budget}' if budget else ''} -> {chosen}", flush=True)
    _check_ort_strategies([assignments[i][2] for i in sorted(on_ort)])
    _check_strategy_options(opts.strategy_options, {assignments[i][0] for i in range(opts.clients) if i not in on_ort})
    for i in sorted(on_ort):
        print(f"edge-{i}: runtime ort (onnxruntime-training, no torch; artifacts fetched from the hub)", flush=True)
    hub_cmd = [
        py, "-m", "ffm_hub.cli", "serve", "--federation", opts.federation, "--model", model, "--task", task,
        "--tau", str(opts.clients), "--state-dir", str(workdir / "hub"), "--broker-kind", opts.broker_kind,
        "--broker-port", str(port), "--eval-limit", str(opts.eval_limit), "--threads", "1",
        "--strategy", primary, "--also-strategies", ",".join(others), "--downlink-codec", opts.downlink_codec,
    ] + (["--ort-artifacts"] if on_ort else [])  # fmt: skip
    print(f"logs:  {workdir}", flush=True)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so the clean-up below stops every child

    signal.signal(signal.SIGTERM, interrupted)
    hub = _spawn(hub_cmd, workdir / "hub.log", env)
    edges: list[subprocess.Popen[bytes]] = []
    manifests: queue.Queue[Manifest] = queue.Queue()
    rows: list[DemoRow] = []
    observer: MqttTransport | None = None
    started = time.monotonic()
    try:
        url_file = workdir / "hub" / "broker.url"
        while not url_file.exists():
            if hub.poll() is not None:
                raise TransportError(f"the hub exited early; see {workdir / 'hub.log'}")
            if time.monotonic() - started > 120:
                raise TransportError("the hub did not start its broker within 120 s")
            time.sleep(0.2)
        url = url_file.read_text().strip()
        address = parse_broker_url(url)
        topics = Topics(opts.federation)

        def on_manifest(_topic: str, payload: bytes) -> None:
            try:
                message = decode_message(payload)
            except FFMError:
                return
            if isinstance(message, Manifest):
                manifests.put(message)

        observer = MqttTransport(address.host, address.port, client_id="ffm-demo-observer")
        observer.subscribe(topics.manifest(), on_manifest)
        observer.connect(timeout=30)
        for i in range(opts.clients):
            edge_cmd = [
                py, "-m", "ffm_edge.cli", "run", "--broker", url, "--federation", opts.federation,
                "--model", model, "--task", task, "--shard", f"{i}/{opts.clients}", "--samples", str(opts.samples),
                "--alpha", str(opts.alpha), "--rounds", str(opts.rounds), "--epochs", str(opts.epochs),
                "--codec", opts.codec, "--state-dir", str(workdir / f"edge-{i}"), "--no-progress",
                "--seed", str(opts.seed),
                "--strategy", assignments[i][0],
            ]  # fmt: skip
            budget = assignments[i][1]
            if i in on_ort:  # a named strategy: the hub builds and sends its artifacts on the first request
                edge_cmd[edge_cmd.index("--strategy") + 1] = assignments[i][2]
                edge_cmd += ["--runtime", "ort"]
            elif budget:
                edge_cmd += ["--budget", budget]
            if i not in on_ort:
                edge_cmd += [arg for option in opts.strategy_options for arg in ("--strategy-option", option)]
            edges.append(_spawn(edge_cmd, workdir / f"edge-{i}.log", env))
        print(f"started a hub and {opts.clients} edge clients on {url}", flush=True)
        rows = _observe(opts, manifests, metric, hub, edges, workdir, started)
    finally:
        if observer is not None:
            observer.close()
        for proc in edges:
            _stop(proc)
        _stop(hub)
    result = {
        "task": task,
        "model": model,
        "data": why,
        "clients": opts.clients,
        "rounds": opts.rounds,
        "wall_s": time.monotonic() - started,
        "rows": [asdict(r) for r in rows],
    }
    (workdir / "demo.json").write_text(json.dumps(result, indent=2))
    print("\n" + format_table(rows))
    print(f"\n{len(rows) - 1} rounds in {result['wall_s']:.0f} s; results in {workdir / 'demo.json'}")
    return rows


def _observe(
    opts: DemoOptions,
    manifests: queue.Queue[Manifest],
    metric: str,
    hub: subprocess.Popen[bytes],
    edges: list[subprocess.Popen[bytes]],
    workdir: Path,
    started: float,
) -> list[DemoRow]:
    from tqdm import tqdm

    seen: dict[int, DemoRow] = {}
    bar = tqdm(total=opts.rounds, desc="rounds", unit="round", disable=not opts.progress, dynamic_ncols=True)
    try:
        while max(seen, default=-1) < opts.rounds:
            if time.monotonic() - started > opts.timeout:
                raise TransportError(f"the demo did not finish within {opts.timeout:.0f} s; see logs in {workdir}")
            if hub.poll() is not None:
                raise TransportError(f"the hub exited (code {hub.returncode}); see {workdir / 'hub.log'}")
            failed = [i for i, p in enumerate(edges) if p.poll() not in (None, 0)]
            if failed:
                raise TransportError(f"edge client(s) {failed} failed; see {workdir}/edge-N.log")
            try:
                manifest = manifests.get(timeout=1.0)
            except queue.Empty:
                continue
            if manifest.version in seen:
                continue
            row = _row(manifest, metric)
            seen[manifest.version] = row
            if manifest.version > 0:
                bar.update(1)
            value = "n/a" if row.value is None else f"{row.value:.4f}"
            bar.write(f"version {row.version}: {metric} {value}")
    finally:
        bar.close()
    return [seen[v] for v in sorted(seen)]
