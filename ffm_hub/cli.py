"""``ffm-hub``: run the hub service, inspect its state, or run the one-command demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ffm_edge.errors import FFMError
from ffm_edge.logs import LOG_FORMATS, setup_logging

if TYPE_CHECKING:
    from ffm_hub.service import ServeOptions

__all__ = ["main"]

log = logging.getLogger("ffm.hub.cli")

_EPILOG = """\
examples:
  ffm-hub demo                                  # a hub + 3 edge clients on this machine, 5 rounds
  FFM_DATA_DIR=../shared/data ffm-hub demo --clients 4 --rounds 8
  ffm-hub serve --task sst2 --tau 10            # a hub with its own broker on port 1883
  ffm-hub serve --broker mqtt://broker:1883     # a hub on an existing broker
  ffm-hub status --state-dir ffm-hub-state      # is it running? queue, devices, counters, versions
  ffm-hub status --json | jq .status.queue_length
  ffm-hub --log-format json serve               # one JSON object per log line (or FFM_LOG_FORMAT=json)
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="ffm-hub",
        description="FFM hub: collects edge updates over MQTT, aggregates them (FedAvg) and publishes global versions.",
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
    fmt = argparse.ArgumentDefaultsHelpFormatter

    serve = sub.add_parser("serve", help="run the hub service", formatter_class=fmt,
                           description="Run the hub until SIGTERM/Ctrl-C. Without --broker it runs a broker "
                           "itself: Mosquitto when installed, else the in-process amqtt broker.")  # fmt: skip
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML file (see `ffm-hub example-config`); replaces the other serve flags")  # fmt: skip
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: off)")
    serve.add_argument("--metrics-bind", default="127.0.0.1", help="address of the metrics endpoint")
    serve.add_argument("--federation", default="default", help="federation name")
    serve.add_argument("--model", default="minilm-l6-v2", help="model spec name (models/*.toml) or path")
    serve.add_argument("--task", default="sst2", help="task of the head, and of the held-out evaluation data")
    serve.add_argument("--strategy", default="lora", help="strategy whose tensors the federation trains")
    serve.add_argument("--also-strategies", default="",
                       help="comma-separated further strategies devices may train (a mixed federation)")  # fmt: skip
    serve.add_argument("--tau", type=int, default=3, help="aggregate when this many updates are queued")
    serve.add_argument("--staleness", default="polynomial", choices=("constant", "polynomial", "hinge"),
                       help="how an update built on an older global version is weighted down")  # fmt: skip
    serve.add_argument("--staleness-alpha", type=float, default=0.5, help="exponent (polynomial) or slope (hinge)")
    serve.add_argument("--max-staleness", type=int, default=None,
                       help="reject updates more than this many versions behind (default: never)")  # fmt: skip
    serve.add_argument("--max-update-norm", type=float, default=None,
                       help="reject an update whose L2 norm (all tensors together) exceeds this; a device "
                       "learns the reason norm_exceeded (default: no bound)")  # fmt: skip
    serve.add_argument("--keep-versions", type=int, default=None,
                       help="keep only the newest N global versions on disk (default: all)")  # fmt: skip
    serve.add_argument("--central-epochs", type=int, default=0,
                       help="epochs on the hub's public data after each aggregation (0 = none)")  # fmt: skip
    serve.add_argument("--public-limit", type=int, default=64, help="public training examples the hub holds")
    serve.add_argument("--policy", default="fixed",
                       choices=("fixed", "central-then-federated", "federated-only", "adaptive"),
                       help="fixed: federated then central, always publish; central-then-federated: one central "
                       "step before round 1, then federated only; adaptive: central steps while they help, "
                       "revert an aggregate that does worse")  # fmt: skip
    serve.add_argument("--policy-tolerance", type=float, default=0.0, help="adaptive: a drop this small publishes")
    serve.add_argument("--max-central-steps", type=int, default=1,
                       help="adaptive: most central steps after one aggregation")  # fmt: skip
    serve.add_argument("--central-min-gain", type=float, default=0.0,
                       help="adaptive: another central step only after one that gained more than this")  # fmt: skip
    serve.add_argument("--validation-limit", type=int, default=0,
                       help="public examples held out for the policy decisions (0: decide on eval data)")  # fmt: skip
    serve.add_argument("--server-lr", type=float, default=1.0, help="server learning rate η")
    serve.add_argument("--server-optimizer", default="fedavg", choices=("fedavg", "fedavgm", "fedadam"),
                       help="server step on the mean delta; buffers persist with each version")  # fmt: skip
    serve.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm: server momentum")
    serve.add_argument("--aggregator", default="fedavg",
                       choices=("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "dp_fedavg"),
                       help="how the queued updates become one pseudo-gradient before the server step: fedavg "
                       "(sample- and staleness-weighted mean); median or trimmed_mean (coordinate-wise, resist a "
                       "minority of poisoned or scaled updates); krum or multi_krum (keep the update(s) closest "
                       "to their neighbours, Blanchard et al. 2017; every update must carry every tensor); "
                       "dp_fedavg (central DP: clip each update to --dp-clip, average over tau, add Gaussian "
                       "noise). All but fedavg are unweighted")  # fmt: skip
    serve.add_argument("--trim-fraction", type=float, default=0.1,
                       help="trimmed_mean: share of values cut from each end of every coordinate, in [0, 0.5); "
                       "set it to at least the share of attackers you expect")  # fmt: skip
    serve.add_argument("--krum-f", type=int, default=1,
                       help="krum, multi_krum: attackers tolerated among tau updates (needs tau > 2f + 2)")  # fmt: skip
    serve.add_argument("--krum-m", type=int, default=1,
                       help="multi_krum: how many lowest-scoring updates are averaged (<= tau - f)")  # fmt: skip
    serve.add_argument("--dp-clip", type=float, default=1.0,
                       help="dp_fedavg: L2 norm C every whole update is clipped to")  # fmt: skip
    serve.add_argument("--dp-noise-multiplier", type=float, default=1.0,
                       help="dp_fedavg: z; noise std sigma = z * C / tau, recorded with each version")  # fmt: skip
    serve.add_argument("--dp-seed", type=int, default=None,
                       help="dp_fedavg: seed of the noise, for reproducible experiments only (default: OS "
                       "entropy; anyone who knows the seed can remove the noise)")  # fmt: skip
    serve.add_argument("--dp-delta", type=float, default=1e-5,
                       help="dp_fedavg: the δ at which the privacy spent is reported as ε (with every version and "
                       "in `ffm-hub status`)")  # fmt: skip
    serve.add_argument("--dp-max-epsilon", type=float, default=None,
                       help="dp_fedavg: privacy budget; no round runs that would take ε above it, and new updates "
                       "are then refused with the reason budget_exhausted (default: no budget)")  # fmt: skip
    serve.add_argument("--downlink-codec", default="fp32", choices=("fp32", "fp16", "int8"),
                       help="codec of the global versions devices pull: fp16 halves the bytes down, int8 "
                       "(per-channel scales) quarters them; the hub keeps, aggregates and evaluates fp32")  # fmt: skip
    serve.add_argument("--state-dir", type=Path, default=Path("ffm-hub-state"), help="durable queue and versions")
    serve.add_argument("--broker", default=None, help="mqtt://host:port of an existing broker")
    serve.add_argument("--broker-kind", default="auto", choices=("auto", "mosquitto", "amqtt"),
                       help="managed broker to run when --broker is not given")  # fmt: skip
    serve.add_argument("--broker-port", type=int, default=1883, help="port of the managed broker (0 = any)")
    serve.add_argument("--broker-bind", default="127.0.0.1", help="address the managed broker listens on")
    serve.add_argument("--secure", type=Path, default=None, metavar="DIR",
                       help="run the managed broker with the credentials, ACLs and TLS of a `broker-config` "
                       "folder (the hub logs in as its hub user)")  # fmt: skip
    serve.add_argument("--broker-username", default=None, help="username on --broker")
    serve.add_argument("--broker-password-file", type=Path, default=None, help="file holding the password")
    serve.add_argument("--broker-tls-ca", type=Path, default=None, help="CA of --broker's TLS certificate")
    serve.add_argument("--broker-tls-cert", type=Path, default=None, help="client certificate for --broker")
    serve.add_argument("--broker-tls-key", type=Path, default=None, help="key of --broker-tls-cert")
    serve.add_argument("--eval-limit", type=int, default=500, help="held-out examples evaluated per version")
    serve.add_argument("--data-dir", default=None, help="GLUE-format data folder (default: $FFM_DATA_DIR)")
    serve.add_argument("--no-advertise", action="store_true", help="do not advertise the hub with zeroconf")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    serve.add_argument("--seed", type=int, default=0, help="seed of the initial global version")
    serve.add_argument("--ort-artifacts", action="store_true",
                       help="serve ONNX Runtime training artifacts to devices that ask (built on the first request "
                       "per strategy from the current global version, cached in STATE_DIR/ort-artifacts; needs "
                       "the ort extra)")  # fmt: skip
    serve.add_argument("--require-signatures", action="store_true",
                       help="accept only updates signed by an enrolled device key (ffm-hub enroll)")  # fmt: skip
    serve.add_argument("--enrolled-keys", type=Path, default=None, metavar="DIR",
                       help="folder of <device_id>.pub files (default: STATE_DIR/enrolled-keys)")  # fmt: skip
    serve.add_argument("--hub-key", type=Path, default=None, metavar="FILE",
                       help="the hub's private key (ffm-hub keygen): signs manifests and global versions")  # fmt: skip
    serve.add_argument("--hub-key-passphrase-file", type=Path, default=None, metavar="FILE",
                       help="file whose first line is the passphrase of an encrypted --hub-key (default: "
                       "$FFM_KEY_PASSPHRASE)")  # fmt: skip
    serve.add_argument("--timestamp-tolerance", type=float, default=None, metavar="SECONDS",
                       help="largest clock difference of a signed update (default 300)")  # fmt: skip

    keygen = sub.add_parser("keygen", help="write the hub's Ed25519 signing key (OUT/hub.key 0600, OUT/hub.pub)")
    keygen.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    keygen.add_argument("--name", default="hub", help="file name stem (default: hub)")
    keygen.add_argument("--passphrase-file", type=Path, default=None, metavar="FILE",
                        help="encrypt the private key with the first line of FILE (default: $FFM_KEY_PASSPHRASE "
                        "when set, else unencrypted)")  # fmt: skip
    enroll = sub.add_parser("enroll", help="enroll a device's public key (copied to ENROLLED_KEYS/DEVICE_ID.pub)")
    enroll.add_argument("device_id", help="the device's id")
    enroll.add_argument("public_key", type=Path, help="the device's .pub file (ffm-edge keygen)")
    enroll.add_argument("--state-dir", type=Path, default=Path("ffm-hub-state"), help="the hub's state folder")
    enroll.add_argument("--enrolled-keys", type=Path, default=None, metavar="DIR",
                        help="enrolled-keys folder (default: STATE_DIR/enrolled-keys)")  # fmt: skip

    sub.add_parser("example-config", help="print a commented hub.toml with every setting and its default")

    bc = sub.add_parser(
        "broker-config",
        help="write a secured Mosquitto deployment: config, passwords, per-device ACLs, TLS files",
        formatter_class=fmt,
        description="Write a ready Mosquitto deployment into DIR: mosquitto.conf (no anonymous access), a "
        "password file, an ACL file with which a device writes only its own uplink and presence and reads "
        "only its own downlink and the global topics, credentials.txt and passwords/<user> (0600, for "
        "distribution), and with --tls a self-signed CA and broker certificate. `ffm-hub serve --secure DIR` "
        "runs the managed broker with the same rules.",
    )
    bc.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    bc.add_argument("--federation", required=True, help="federation name")
    bc.add_argument("--devices", required=True, help="comma-separated device ids (their MQTT usernames)")
    bc.add_argument("--hub-user", default="hub", help="username of the hub")
    bc.add_argument("--port", type=int, default=None, help="listener port (default: 8883 with --tls, else 1883)")
    bc.add_argument("--bind", default="0.0.0.0", help="listener address")
    bc.add_argument("--tls", action="store_true", help="TLS listener with a generated CA and broker certificate")
    bc.add_argument("--client-certs", action="store_true",
                    help="require client certificates (CN = username) instead of passwords; implies --tls")  # fmt: skip
    bc.add_argument("--hostname", action="append", default=[],
                    help="name or IP clients dial (repeatable; localhost and 127.0.0.1 always)")  # fmt: skip

    status = sub.add_parser(
        "status",
        help="is the hub running? its queue, devices, counters and versions",
        formatter_class=fmt,
        description="Print what a hub is doing, from its state folder (run it on the hub's machine, or "
        "wherever that folder is mounted). A running hub writes status.json there every few seconds: "
        "whether it runs (pid, how long ago it wrote), the queue against tau, updates accepted, duplicated "
        "and rejected by reason since it started, every device with when it was last heard from, and the "
        "current version's metrics. A snapshot whose process is gone, or that stopped being updated, is "
        "reported as stale (the hub crashed or hangs). Below it, the versions table comes from the durable "
        "store, read-only, so it is safe while the hub runs.",
    )
    status.add_argument("--state-dir", type=Path, default=Path("ffm-hub-state"), help="the hub's state folder")
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (store versions, the status snapshot and its liveness) for scripts",
    )

    demo = sub.add_parser(
        "demo",
        help="run a hub and N edge clients on this machine and print a per-round table",
        formatter_class=fmt,
        description="Start a hub (with its managed broker) and N edge clients as separate processes, each "
        "client with a non-IID shard of a real dataset, run R rounds and print one row per global version. "
        "Data: GLUE SST-2 from $FFM_DATA_DIR when present, else the Hugging Face hub when `datasets` is "
        "installed, else scikit-learn's handwritten digits (offline) with EfficientNet-Lite0.",
    )
    demo.add_argument("--clients", type=int, default=3, help="number of edge clients")
    demo.add_argument("--rounds", type=int, default=5, help="federated rounds (global versions)")
    demo.add_argument("--task", default=None, help="force a task (sst2, mrpc, digits, ...)")
    demo.add_argument("--model", default=None, help="force a model spec")
    demo.add_argument("--samples", type=int, default=900, help="training examples shared out to the clients")
    demo.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label-skew α of the shards")
    demo.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    demo.add_argument("--client-strategies", default="",
                      help="comma-separated strategy per client, cycled (lora, prompt, head, full_q8, auto); "
                      "a mixed federation")  # fmt: skip
    demo.add_argument("--client-budgets", default="",
                      help="comma-separated memory budget per client, cycled (e.g. 2GB,500MB): with auto the "
                      "planner picks what fits")  # fmt: skip
    demo.add_argument("--ort-clients", type=int, default=0,
                      help="the last N clients train on onnxruntime-training without torch (the hub runs with "
                      "--ort-artifacts and sends them the artifacts it builds; needs the ort extra)")  # fmt: skip
    demo.add_argument("--codec", default="int8", choices=("fp32", "fp16", "int8"), help="update encoding")
    demo.add_argument("--downlink-codec", default="fp32", choices=("fp32", "fp16", "int8"),
                      help="encoding of the global versions the clients pull (the hub keeps fp32)")  # fmt: skip
    demo.add_argument("--seed", type=int, default=0,
                      help="training seed: client i trains with SEED + i (the data shards stay the same)")  # fmt: skip
    demo.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE",
                      help="a strategy setting passed to every torch client (repeatable; see `ffm-edge "
                      "strategies`), e.g. lora's r=16")  # fmt: skip
    demo.add_argument("--eval-limit", type=int, default=500, help="held-out examples evaluated per version")
    demo.add_argument("--broker-kind", default="auto", choices=("auto", "mosquitto", "amqtt"), help="broker")
    demo.add_argument("--workdir", type=Path, default=None, help="logs and state (default: a temp folder)")
    demo.add_argument("--data-dir", default=None, help="GLUE-format data folder (default: $FFM_DATA_DIR)")
    demo.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")

    from ffm_hub.experiments.cli import DESCRIPTION, EPILOG, add_arguments

    experiment = sub.add_parser(
        "experiment",
        help="reproduce the paper's tables (centralized / FL / FFM) through this hub and edge code, resumably",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(experiment)

    from ffm_hub.reliability import suite

    reliability = sub.add_parser(
        "reliability",
        help="the fault and attack suite on real brokers: updates tried / accepted / lost, as a table",
        description=suite.DESCRIPTION,
        epilog=suite.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suite.add_arguments(reliability)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from ffm_hub.service import ServeOptions, serve

    metrics_port, metrics_bind, threads = args.metrics_port, args.metrics_bind, args.threads
    if args.config is not None:
        from ffm_hub.config import load_hub_config

        config = load_hub_config(args.config)
        opts = config.options
        if args.ort_artifacts:
            opts.ort_artifacts = True
        if args.secure is not None:
            opts.secure = args.secure
        metrics_port = metrics_port if metrics_port is not None else config.metrics_port
        metrics_bind = config.metrics_bind if args.metrics_bind == "127.0.0.1" else args.metrics_bind
        threads = threads or config.threads
    else:
        opts = ServeOptions(
            federation=args.federation,
            model=args.model,
            task=args.task,
            strategy=args.strategy,
            extra_strategies=tuple(s for s in args.also_strategies.split(",") if s),
            tau=args.tau,
            server_lr=args.server_lr,
            staleness=args.staleness,
            staleness_alpha=args.staleness_alpha,
            max_staleness=args.max_staleness,
            max_update_norm=args.max_update_norm,
            keep_versions=args.keep_versions,
            central_epochs=args.central_epochs,
            public_limit=args.public_limit,
            policy=args.policy,
            policy_tolerance=args.policy_tolerance,
            max_central_steps=args.max_central_steps,
            central_min_gain=args.central_min_gain,
            validation_limit=args.validation_limit,
            server_optimizer=args.server_optimizer,
            server_momentum=args.server_momentum,
            aggregator=args.aggregator,
            trim_fraction=args.trim_fraction,
            krum_f=args.krum_f,
            krum_m=args.krum_m,
            dp_clip=args.dp_clip,
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_seed=args.dp_seed,
            dp_delta=args.dp_delta,
            dp_max_epsilon=args.dp_max_epsilon,
            downlink_codec=args.downlink_codec,
            state_dir=args.state_dir,
            broker=args.broker,
            broker_kind=args.broker_kind,
            broker_port=args.broker_port,
            broker_bind=args.broker_bind,
            eval_limit=args.eval_limit,
            data_dir=args.data_dir,
            seed=args.seed,
            advertise=not args.no_advertise,
            ort_artifacts=args.ort_artifacts,
            secure=args.secure,
            broker_username=args.broker_username,
            broker_password_file=args.broker_password_file,
            broker_tls_ca=args.broker_tls_ca,
            broker_tls_cert=args.broker_tls_cert,
            broker_tls_key=args.broker_tls_key,
        )
    _apply_signing_flags(opts, args)
    if threads:
        import torch

        torch.set_num_threads(threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(opts, stop, metrics_port=metrics_port, metrics_bind=metrics_bind)
    return 0


def _apply_signing_flags(opts: ServeOptions, args: argparse.Namespace) -> None:
    """Signed-update flags override the config file (they only ever turn checks on)."""
    if args.require_signatures:
        opts.require_signatures = True
    if args.enrolled_keys is not None:
        opts.enrolled_keys = args.enrolled_keys
    if args.hub_key is not None:
        opts.hub_key = args.hub_key
    if args.hub_key_passphrase_file is not None:
        opts.hub_key_passphrase_file = args.hub_key_passphrase_file
    if args.timestamp_tolerance is not None:
        opts.timestamp_tolerance = args.timestamp_tolerance


def _keygen(args: argparse.Namespace) -> int:
    from ffm_edge.signing import read_passphrase, write_keypair

    passphrase = read_passphrase(args.passphrase_file)
    private, public = write_keypair(args.out, args.name, passphrase=passphrase)
    state = "encrypted with the passphrase" if passphrase else "unencrypted: protect the file"
    print(f"private key {private} ({state}; keep it on the hub: serve --hub-key)")
    print(f"public key  {public} (give it to devices: ffm-edge run --hub-key)")
    print(public.read_text(encoding="utf-8").strip())
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from ffm_hub.signing import enroll_device

    folder = args.enrolled_keys if args.enrolled_keys is not None else args.state_dir / "enrolled-keys"
    print(f"enrolled {args.device_id}: {enroll_device(folder, args.device_id, args.public_key)}")
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    from ffm_hub.security import write_broker_config

    tls = args.tls or args.client_certs
    port = args.port if args.port is not None else (8883 if tls else 1883)
    hostnames = ("localhost", "127.0.0.1", *args.hostname)
    security = write_broker_config(
        args.out,
        args.federation,
        args.devices.split(","),
        hub_user=args.hub_user,
        port=port,
        bind=args.bind,
        tls=tls,
        client_certs=args.client_certs,
        hostnames=hostnames,
    )
    print(f"wrote {args.out}/mosquitto.conf for {len(security.devices)} device(s) of {security.federation}")
    print(f"run:        mosquitto -c {args.out.resolve()}/mosquitto.conf")
    print(f"credentials: {security.credentials_file} (0600; give each device its passwords/<device> file)")
    return 0


def _example_config(args: argparse.Namespace) -> int:
    from ffm_hub.config import example_config

    print(example_config(), end="")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    from ffm_hub.status import format_status, liveness, read_status, read_store

    now = time.time()
    # Read-only: opening a SqliteStore would run its crash recovery under a running hub's feet.
    store = read_store(args.state_dir)
    snapshot = read_status(args.state_dir)
    if store is None and snapshot is None:
        log.error("no hub store and no status snapshot in %s", args.state_dir)
        return 2
    if args.json:
        live = None if snapshot is None else liveness(snapshot, now)
        document = {
            "state_dir": str(args.state_dir),
            "state": "absent" if live is None else live.state,
            "reason": None if live is None else live.reason,
            "status": snapshot,
            "store": None if store is None else store.to_dict(),
        }
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    print(format_status(snapshot, now, where=str(args.state_dir)))
    print()
    if store is None:
        print(f"store: none in {args.state_dir}")
        return 0
    print(f"store: {store.path}")
    print(f"updates: {store.updates}")
    print("| version | parent | kind | updates | metrics |\n|---:|---:|---|---:|---|")
    for v in store.versions:
        metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()))
        parent = "-" if v.parent is None else v.parent
        print(f"| {v.version} | {parent} | {v.kind} | {v.num_updates} | {metrics} |")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ffm_hub.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            clients=args.clients,
            rounds=args.rounds,
            task=args.task,
            model=args.model,
            samples=args.samples,
            alpha=args.alpha,
            epochs=args.epochs,
            codec=args.codec,
            downlink_codec=args.downlink_codec,
            strategy_options=tuple(args.strategy_option),
            seed=args.seed,
            eval_limit=args.eval_limit,
            broker_kind=args.broker_kind,
            workdir=args.workdir,
            data_dir=args.data_dir,
            timeout=args.timeout,
            client_strategies=tuple(x for x in args.client_strategies.split(",") if x),
            client_budgets=tuple(x for x in args.client_budgets.split(",") if x),
            ort_clients=args.ort_clients,
        )
    )
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from ffm_hub.experiments.cli import run_from_args

    return run_from_args(args)


def _reliability(args: argparse.Namespace) -> int:
    from ffm_hub.reliability.suite import run_from_args

    return run_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ffm-hub``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_format)
    except FFMError as exc:  # a bad $FFM_LOG_FORMAT: say so like a bad flag, before any work starts
        parser.error(str(exc))
    commands = {
        "serve": _serve,
        "status": _status,
        "demo": _demo,
        "example-config": _example_config,
        "broker-config": _broker_config,
        "keygen": _keygen,
        "enroll": _enroll,
        "experiment": _experiment,
        "reliability": _reliability,
    }
    try:
        return commands[args.command](args)
    except FFMError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
