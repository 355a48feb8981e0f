"""``ffm-edge``: run an edge device from the command line.

Device apps embed :class:`ffm_edge.EdgeClient`; this command is the same client with its local data
taken from a shard of a dataset, which is how the demo and the benchmarks simulate a fleet.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from ffm_edge.errors import FFMError
from ffm_edge.logs import LOG_FORMATS, setup_logging

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ffm_edge.strategies.base import Strategy
    from ffm_edge.transport.mqtt import TlsOptions

__all__ = ["main"]

log = logging.getLogger("ffm.edge.cli")

_EPILOG = """\
examples:
  # device 0 of 3, a non-IID shard of SST-2 (FFM_DATA_DIR names the GLUE folder), hub found by zeroconf
  FFM_DATA_DIR=../shared/data ffm-edge run --task sst2 --shard 0/3 --rounds 5

  # an explicit broker, the offline digits data with EfficientNet-Lite0
  ffm-edge run --broker mqtt://127.0.0.1:1883 --model efficientnet-lite0 --task digits --shard 1/3

  # set a strategy's config fields (`ffm-edge strategies` lists them): full_q8 sending the top 1% of its delta
  ffm-edge run --strategy full_q8 --strategy-option top_k=0.01 --task sst2 --shard 0/3

  # train without torch: build ONNX Runtime artifacts once (where torch is), then run on ORT
  ffm-edge ort-build --model minilm-l6-v2 --strategy lora --task sst2 --out ort-lora
  ffm-edge run --runtime ort --ort-artifacts ort-lora --task sst2 --shard 0/3

  # ... or let a hub started with `ffm-hub serve --ort-artifacts` build and send them
  ffm-edge run --runtime ort --task sst2 --shard 0/3          # fetched into the state dir first
  ffm-edge ort-fetch --broker mqtt://hub:1883 --strategy lora --task sst2 --out ort-lora
"""


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes INDEX/COUNT like 0/3, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard index must be in [0, {count}), got {index}")
    return index, count


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_broker_login(parser: argparse.ArgumentParser) -> None:
    """The broker login flags (``ffm-hub broker-config`` files), the same on every command that connects."""
    parser.add_argument("--username", default=None,
                        help="broker username (default with --password-file or --tls-cert: the device id)")  # fmt: skip
    parser.add_argument("--password-file", default=None, help="file holding the broker password (passwords/<device>)")
    parser.add_argument("--tls-ca", default=None, help="CA of the broker's TLS certificate (turns TLS on; ca.crt)")
    parser.add_argument("--tls-cert", default=None, help="TLS client certificate (clients/<device>.crt)")
    parser.add_argument("--tls-key", default=None, help="key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="ffm-edge",
        description="FFM edge device: trains on local private data and sends compact updates to the hub.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text lines, or one JSON object per line for log shippers (default: $FFM_LOG_FORMAT, else text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="take part in a federation for some rounds",
        description="Join a federation: pull the global version, train locally, upload, repeat. "
        "With --stream-initial and --stream-per-round the local shard is revealed over time, like a device "
        "whose data keep arriving (lifelong learning); --max-local-examples keeps only the newest examples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--device-id", default=None, help="this device's id (default: edge-<shard index>)")
    run.add_argument("--federation", default="default", help="federation name (must match the hub's)")
    run.add_argument("--broker", default=None, help="mqtt://host:port; without it the hub is found with zeroconf")
    _add_broker_login(run)
    run.add_argument("--model", default="minilm-l6-v2", help="model spec name (models/*.toml) or path")
    run.add_argument(
        "--strategy",
        default="lora",
        help="what to train: lora, prompt, head, full_q8, or auto (the planner picks what fits --budget)",
    )
    run.add_argument(
        "--strategy-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="set a field of the named strategy's config (repeatable), e.g. top_k=0.01 for full_q8 (send the "
        "largest 1%% of each delta, sparse), r=16 for lora, num_virtual_tokens=8 for prompt, base_precision=int8 "
        "for head; `ffm-edge strategies` lists every field with its type, default and help. Torch runtime only",
    )
    run.add_argument(
        "--budget", default=None, help="memory the SDK may use, e.g. 600MB; a named strategy is checked against it"
    )
    run.add_argument("--task", default="sst2", help="dataset the local shard comes from (sst2, mrpc, digits, ...)")
    run.add_argument("--data-dir", default=None, help="GLUE-format data folder (default: $FFM_DATA_DIR)")
    run.add_argument("--shard", type=_shard, default=(0, 1), help="INDEX/COUNT: which non-IID shard is local")
    run.add_argument("--samples", type=int, default=600, help="examples drawn from the train split, all shards")
    run.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew α (smaller = more non-IID)")
    run.add_argument("--partition-seed", type=int, default=0, help="seed of the sample and the partition")
    run.add_argument("--codec", default="int8", choices=("fp32", "fp16", "int8"), help="update encoding")
    run.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    run.add_argument("--lr", type=float, default=None, help="learning rate (default: the model spec's)")
    run.add_argument("--batch-size", type=int, default=None, help="batch size (default: the model spec's)")
    run.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: forever)")
    run.add_argument("--state-dir", default=None, help="where the outbox lives (default: a temp folder)")
    run.add_argument("--threads", type=int, default=1, help="CPU threads (torch, or ORT's intra-op threads)")
    run.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "torch", "ort"),
        help="training runtime: torch, ort (onnxruntime-training, no torch), or auto (torch when installed; the "
        "planner may choose ORT with --budget and --ort-artifacts)",
    )
    run.add_argument(
        "--ort-artifacts",
        default=None,
        help="folder of ORT training artifacts (ffm-edge ort-build); with --runtime ort, a missing or empty folder "
        "is first fetched from the hub, and without this flag they are fetched into the state dir",
    )
    run.add_argument(
        "--fetch-timeout",
        type=float,
        default=60.0,
        help="--runtime ort: ask the hub again for artifacts after this many seconds without progress",
    )
    run.add_argument("--seed", type=int, default=0, help="training seed")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    run.add_argument(
        "--stream-initial",
        type=_positive_int,
        default=None,
        metavar="K",
        help="simulate data that arrive over time: the device starts with the first K examples of its shard "
        "(needs --stream-per-round; default: the whole shard from the start)",
    )
    run.add_argument(
        "--stream-per-round",
        type=_positive_int,
        default=None,
        metavar="M",
        help="with --stream-initial: M more examples of the shard arrive before each round (the first included) "
        "until the shard is used up; then the device keeps training on what it has",
    )
    run.add_argument(
        "--max-local-examples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep only the newest N local examples, a sliding window over data that keep arriving "
        "(default: keep every example)",
    )
    run.add_argument("--device-key", default=None, metavar="FILE",
                     help="sign every update with this private key (ffm-edge keygen; enrolled on the hub)")  # fmt: skip
    run.add_argument("--hub-key", default=None, metavar="FILE",
                     help="the hub's public key: refuse manifests and global versions it did not sign")  # fmt: skip
    run.add_argument("--key-passphrase-file", default=None, metavar="FILE",
                     help="file whose first line is the passphrase of an encrypted --device-key (default: "
                     "$FFM_KEY_PASSPHRASE)")  # fmt: skip
    sub.add_parser(
        "strategies",
        help="list every strategy with the config fields --strategy-option sets (types, defaults, help)",
        description="Every registered training strategy, most capable first, with its config fields: the "
        "KEY=VALUE options of `ffm-edge run --strategy NAME --strategy-option KEY=VALUE`. Needs torch.",
    )
    keygen = sub.add_parser("keygen", help="write a device signing key: OUT/NAME.key (0600) and OUT/NAME.pub")
    keygen.add_argument("--out", required=True, help="folder to write (created)")
    keygen.add_argument("--name", default="device", help="file name stem, e.g. the device id (default: device)")
    keygen.add_argument("--passphrase-file", default=None, metavar="FILE",
                        help="encrypt the private key with the first line of FILE (default: $FFM_KEY_PASSPHRASE "
                        "when set, else unencrypted)")  # fmt: skip
    prof = sub.add_parser(
        "profile",
        help="print what this device can do (RAM, budget, cores, accelerator, bitsandbytes, onnxruntime)",
        description="Probe this device: total and available RAM, the memory budget the SDK may use, CPU cores, "
        "the accelerator and its free memory, and whether bitsandbytes (int8, nf4, 8-bit AdamW) and "
        "onnxruntime-training really work here. The capability checks run once and are cached.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prof.add_argument("--budget", default=None, help="memory the SDK may use, e.g. 600MB or 2GiB")
    prof.add_argument("--json", action="store_true", help="print JSON instead of text")
    prof.add_argument("--refresh", action="store_true", help="re-run the capability checks (they are cached)")
    plan = sub.add_parser(
        "plan",
        help="predict peak memory per strategy and pick the most capable one that fits",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Predict each strategy's peak memory (load and training, above bare torch) for a model spec, "
        "batch size and sequence length, and pick the most capable configuration that fits the budget: "
        "full_q8 > lora (fp32, int8, nf4 base) > prompt > head, trying gradient checkpointing and "
        "micro-batches before giving up capability.",
    )
    plan.add_argument("--model", default="minilm-l6-v2", help="model spec name (models/*.toml) or path")
    plan.add_argument("--budget", default=None, help="memory the SDK may use, e.g. 600MB (default: the profile's)")
    plan.add_argument("--batch-size", type=int, default=None, help="batch size (default: the model spec's)")
    plan.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the spec's max_length)")
    plan.add_argument("--num-labels", type=int, default=2, help="classes of the task head")
    plan.add_argument("--force", default=None, help="only consider this strategy (error if it cannot fit)")
    plan.add_argument(
        "--runtimes",
        default=None,
        help="comma-separated runtimes to consider: torch, ort (default: what the device profile reports)",
    )
    build = sub.add_parser(
        "ort-build",
        help="export a model spec and strategy to ONNX Runtime training artifacts (needs torch and the ort extra)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build training, eval and optimizer graphs plus a checkpoint for onnxruntime-training, with "
        "only the strategy's tensors trainable, under the same names TorchTrainer uses, and a manifest "
        "(ffm-ort.json) that records the spec, strategy, task, tensors, versions, the global version and "
        "the sha256 of every file. A device then trains with `ffm-edge run --runtime ort --ort-artifacts OUT` "
        "without PyTorch.",
    )
    build.add_argument("--model", default="minilm-l6-v2", help="model spec name (models/*.toml) or path")
    build.add_argument("--strategy", default="lora", choices=("lora", "prompt", "head"), help="what trains")
    build.add_argument("--task", default="sst2", help="task (sets the head size and the loss)")
    build.add_argument("--out", required=True, help="folder to write the artifacts to (replaced)")
    build.add_argument(
        "--global-frame",
        default=None,
        help="a global version frame (.ffmg, e.g. <hub state>/store/versions/0000000003.ffmg): start from its "
        "trainable values and record its version",
    )
    build.add_argument(
        "--opset", type=int, default=14, help="ONNX opset (14 is what ORT 1.19's gradient builder takes)"
    )
    build.add_argument("--no-dropout", action="store_true", help="export with dropout off (deterministic training)")
    build.add_argument(
        "--seed", type=int, default=0, help="seed of the fresh trainable values (without --global-frame)"
    )
    build.add_argument("--max-length", type=int, default=None, help="override the spec's max_length (tokens)")
    fetch = sub.add_parser(
        "ort-fetch",
        help="fetch ONNX Runtime training artifacts from a hub (started with `ffm-hub serve --ort-artifacts`)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Ask the hub for training artifacts of a model, task and strategy; the hub builds them from its "
        "current global version (the first time) and sends them as one chunked, hashed transfer. Every file is "
        "checked against the sha256 in the manifest before OUT is replaced. Needs no torch.",
    )
    fetch.add_argument("--broker", default=None, help="mqtt://host:port; without it the hub is found with zeroconf")
    fetch.add_argument("--federation", default="default", help="federation name (must match the hub's)")
    fetch.add_argument("--device-id", default="edge-0", help="this device's id (its downlink carries the transfer)")
    _add_broker_login(fetch)
    fetch.add_argument("--model", default="minilm-l6-v2", help="model spec name (models/*.toml) or path")
    fetch.add_argument("--strategy", default="lora", choices=("lora", "prompt", "head"), help="what trains")
    fetch.add_argument("--task", default="sst2", help="task (must be the hub's)")
    fetch.add_argument("--out", required=True, help="folder to write the artifacts to (replaced)")
    fetch.add_argument("--timeout", type=float, default=60.0, help="ask again after this many seconds without progress")
    return parser


def _ort_build(args: argparse.Namespace) -> int:
    import dataclasses

    from ffm_edge.ort.artifacts import build_artifacts, global_state_from_frame
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec(args.model)
    if args.max_length is not None:
        spec = dataclasses.replace(spec, max_length=args.max_length)
    version, state = (None, None) if args.global_frame is None else global_state_from_frame(args.global_frame)
    manifest = build_artifacts(
        spec, args.task, args.strategy, args.out, global_state=state, global_version=version,
        opset=args.opset, dropout=not args.no_dropout, seed=args.seed,
    )  # fmt: skip
    print(
        f"built ORT artifacts for {manifest.spec}/{manifest.strategy}/{manifest.task} in {args.out}: "
        f"{len(manifest.tensors)} trainable tensors ({manifest.num_trainable:,} scalars), opset {manifest.opset}, "
        f"global version {manifest.global_version if manifest.global_version is not None else '-'}"
    )
    return 0


def _ort_fetch(args: argparse.Namespace) -> int:
    import time

    from ffm_edge.ort.fetch import fetch_artifacts_from_hub
    from ffm_edge.spec import load_model_spec

    started = time.perf_counter()
    manifest = fetch_artifacts_from_hub(
        args.broker, args.out, federation=args.federation, device_id=args.device_id,
        model=load_model_spec(args.model).name, task=args.task, strategy=args.strategy, idle_timeout=args.timeout,
        **_broker_login(args, args.device_id)._asdict(),
    )  # fmt: skip
    print(
        f"fetched ORT artifacts for {manifest.spec}/{manifest.strategy}/{manifest.task} (global version "
        f"{manifest.global_version}) into {args.out} in {time.perf_counter() - started:.1f}s; every file verified"
    )
    return 0


def _artifacts_for_run(args: argparse.Namespace, device_id: str, login: _BrokerLogin | None = None) -> str:
    """The artifact folder ``run --runtime ort`` trains from, fetched from the hub when there is none yet.

    Without ``--ort-artifacts`` the folder is ``<state dir>/ort-artifacts/<strategy>``, reused while it
    verifies and is for this model, task and strategy. ``login`` is the run's broker login (read from the
    flags when not given), so a secured broker lets the fetch in as the device.
    """
    import tempfile
    from pathlib import Path

    from ffm_edge.errors import ConfigError, OrtArtifactError
    from ffm_edge.ort.fetch import fetch_artifacts_from_hub, has_artifacts
    from ffm_edge.ort.manifest import load_manifest
    from ffm_edge.spec import load_model_spec

    if args.ort_artifacts is not None and has_artifacts(args.ort_artifacts):
        return str(args.ort_artifacts)
    if args.strategy not in ("lora", "prompt", "head"):
        raise ConfigError(f"fetching ORT artifacts needs --strategy lora, prompt or head, not {args.strategy!r}")
    model = load_model_spec(args.model).name
    if args.ort_artifacts is not None:
        folder = Path(args.ort_artifacts)
    else:
        root = Path(args.state_dir) if args.state_dir else Path(tempfile.gettempdir()) / "ffm-edge" / device_id
        folder = root / "ort-artifacts" / args.strategy
        if has_artifacts(folder):
            try:
                manifest = load_manifest(folder, verify=True)
                manifest.check(spec=model, strategy=args.strategy)
                if manifest.task == args.task:
                    log.info("%s: using the ORT artifacts fetched earlier into %s", device_id, folder)
                    return str(folder)
            except OrtArtifactError as exc:
                log.warning("%s: fetching ORT artifacts again: %s", device_id, exc)
    log.info("%s: fetching %s/%s ORT artifacts from the hub into %s", device_id, model, args.strategy, folder)
    fetch_artifacts_from_hub(
        args.broker, folder, federation=args.federation, device_id=device_id, model=model, task=args.task,
        strategy=args.strategy, idle_timeout=args.fetch_timeout, **(login or _broker_login(args, device_id))._asdict(),
    )  # fmt: skip
    return str(folder)


def _plan(args: argparse.Namespace) -> int:
    from ffm_edge.planner import format_plan, plan_training
    from ffm_edge.profile import parse_bytes, probe_device
    from ffm_edge.spec import load_model_spec

    spec = load_model_spec(args.model)
    profile = probe_device(args.budget)
    budget = parse_bytes(args.budget) if args.budget else profile.budget_bytes
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] if args.runtimes else profile.runtimes
    result = plan_training(
        spec,
        budget,
        batch_size=args.batch_size or spec.training.batch_size,
        seq_len=args.seq_len or spec.max_length,
        num_labels=args.num_labels,
        force=args.force,
        available=profile.base_precisions,
        runtimes=runtimes or ("torch",),
    )
    print(f"model {spec.name}, batch {args.batch_size or spec.training.batch_size}, "
          f"sequence {args.seq_len or spec.max_length}")  # fmt: skip
    print(format_plan(result))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import json

    from ffm_edge.profile import format_profile, probe_device

    profile = probe_device(args.budget, refresh=args.refresh)
    print(json.dumps(profile.to_dict(), indent=2) if args.json else format_profile(profile))
    return 0


class _BrokerLogin(NamedTuple):
    """The broker login from --username/--password-file/--tls-*, read once per command."""

    username: str | None
    password: str | None
    tls: TlsOptions | None


def _broker_login(args: argparse.Namespace, device_id: str) -> _BrokerLogin:
    """The login the flags describe (none by default); the same for the device's session and its fetches."""
    from pathlib import Path

    from ffm_edge.errors import ConfigError
    from ffm_edge.transport.mqtt import TlsOptions

    password = None
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the broker password from {args.password_file}: {exc}") from exc
    username = args.username
    if username is None and (password is not None or args.tls_cert is not None):
        username = device_id
    tls = None
    if args.tls_ca is not None or args.tls_cert is not None:
        tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key)
    return _BrokerLogin(username, password, tls)


def _strategy_for_run(args: argparse.Namespace) -> Strategy | str:
    """``--strategy`` as EdgeClient takes it: the name, or with ``--strategy-option`` a configured Strategy.

    Options configure a torch strategy, so they are refused on ORT, whose artifacts fix the strategy.
    """
    from ffm_edge.errors import ConfigError

    if not args.strategy_option:
        return args.strategy
    if args.runtime == "ort" or (args.runtime == "auto" and args.ort_artifacts is not None):
        raise ConfigError(
            "--strategy-option configures a torch strategy, but on the ORT runtime the artifacts fix the strategy "
            "and its config (ffm-edge ort-build); pass --runtime torch, or drop the options"
        )
    try:
        from ffm_edge.strategies import parse_strategy_options, strategy_from_options
    except ImportError as exc:
        raise ConfigError(f"--strategy-option needs PyTorch, which is not usable here: {exc}") from exc
    return strategy_from_options(args.strategy, parse_strategy_options(args.strategy_option))


def _strategies(args: argparse.Namespace) -> int:
    from ffm_edge.errors import ConfigError

    try:
        from ffm_edge.strategies import format_strategy_options
    except ImportError as exc:
        raise ConfigError(f"the strategies need PyTorch, which is not usable here: {exc}") from exc
    print(format_strategy_options())
    return 0


def _run(args: argparse.Namespace) -> int:
    from ffm_edge.client import EdgeClient, ProgressEvent, RoundResult
    from ffm_edge.data import describe, dirichlet_partition, load_split, reveal_stream
    from ffm_edge.errors import ConfigError

    strategy = _strategy_for_run(args)  # bad options fail before any data or weight is loaded
    if args.runtime != "ort":  # a device on ORT never imports torch
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    index, count = args.shard
    device_id = args.device_id or f"edge-{index}"
    if (args.stream_initial is None) != (args.stream_per_round is None):
        raise ConfigError("--stream-initial and --stream-per-round go together: give both or neither")
    pool = load_split(args.task, "train", data_dir=args.data_dir, limit=args.samples, seed=args.partition_seed)
    shards = dirichlet_partition(pool.labels, count, args.alpha, seed=args.partition_seed, min_per_client=2)
    local = pool.subset(shards[index])
    log.info("%s local data: %s", device_id, describe(local))
    stream = None
    if args.stream_initial is not None:
        shard_size = len(local)
        stream = reveal_stream(local, args.stream_initial, args.stream_per_round)
        local = next(stream)
        log.info(
            "%s streams its shard: %d of %d examples at the start, %d more before each round",
            device_id, len(local), shard_size, args.stream_per_round,
        )  # fmt: skip

    login = _broker_login(args, device_id)
    ort_artifacts = _artifacts_for_run(args, device_id, login) if args.runtime == "ort" else args.ort_artifacts

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=0, desc=f"{device_id}", unit="step", leave=False, dynamic_ncols=True)

    def on_progress(event: ProgressEvent) -> None:
        if bar is None:
            return
        if event.stage == "train":
            if bar.total != event.total or event.done == 1:
                bar.reset(total=event.total)
            bar.set_description(f"{device_id} train")
            bar.update(event.done - bar.n)
            bar.set_postfix_str(event.detail)
        else:
            bar.set_description(f"{device_id} {event.stage}")

    def on_round(result: RoundResult) -> None:
        log.info(
            "%s round %d on v%d: n=%d loss %.4f, %d B up, %d B down, %.1fs",
            device_id, result.round, result.base_version, result.num_samples, result.train.mean_loss,
            result.bytes_up, result.bytes_down, result.seconds,
        )  # fmt: skip

    client = EdgeClient(
        args.model,
        local,
        device_id=device_id,
        federation=args.federation,
        broker=args.broker,
        strategy=strategy,
        memory_budget=args.budget,
        codec=args.codec,
        local_epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        seed=args.seed + index,
        state_dir=args.state_dir,
        on_progress=on_progress,
        on_round=on_round,
        data_stream=stream,
        max_local_examples=args.max_local_examples,
        runtime=args.runtime,
        ort_artifacts=ort_artifacts,
        threads=args.threads,
        device_key=_device_key(args),
        hub_public_key=args.hub_key,
        broker_username=login.username,
        broker_password=login.password,
        broker_tls=login.tls,
    )
    log.info("%s trains %s on the %s runtime", device_id, client.trainer.strategy.name, client.runtime)
    if args.strategy_option:
        log.info("%s strategy config: %s", device_id, client.trainer.strategy.describe())
    signal.signal(signal.SIGTERM, lambda *_: client.stop())
    signal.signal(signal.SIGINT, lambda *_: client.stop())
    with client:
        results = client.run_forever(args.rounds)
    if bar is not None:
        bar.close()
    log.info("%s finished %d rounds", device_id, len(results))
    return 0


def _device_key(args: argparse.Namespace) -> Ed25519PrivateKey | None:
    """``--device-key`` loaded here, with ``--key-passphrase-file`` (or $FFM_KEY_PASSPHRASE) when encrypted."""
    if args.device_key is None:
        return None
    from ffm_edge.signing import load_private_key, read_passphrase

    return load_private_key(args.device_key, read_passphrase(args.key_passphrase_file))


def _keygen(args: argparse.Namespace) -> int:
    from ffm_edge.signing import read_passphrase, write_keypair

    passphrase = read_passphrase(args.passphrase_file)
    private, public = write_keypair(args.out, args.name, passphrase=passphrase)
    state = "encrypted with the passphrase" if passphrase else "unencrypted: protect the file"
    print(f"private key {private} ({state}; stays on the device: ffm-edge run --device-key)")
    print(f"public key  {public} (enroll it on the hub: ffm-hub enroll DEVICE_ID {public})")
    print(public.read_text(encoding="utf-8").strip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ffm-edge``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_format)
    except FFMError as exc:  # a bad $FFM_LOG_FORMAT: say so like a bad flag, before any work starts
        parser.error(str(exc))
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "ort-build":
            return _ort_build(args)
        if args.command == "ort-fetch":
            return _ort_fetch(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "strategies":
            return _strategies(args)
    except FFMError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
