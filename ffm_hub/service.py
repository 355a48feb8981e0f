"""Wiring of the hub service: broker, transport, store, model, discovery. No protocol logic here."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ffm_edge.data import LabeledData, describe, get_task, load_split
from ffm_edge.errors import ConfigError, DataError
from ffm_edge.spec import ModelSpec, load_model_spec
from ffm_edge.transport.mqtt import MqttTransport, TlsOptions, parse_broker_url
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.security import BrokerSecurity, load_broker_security
from ffm_hub.store import SqliteStore

if TYPE_CHECKING:
    from ffm_hub.artifacts import ArtifactService
    from ffm_hub.signing import HubSecurity

__all__ = ["ServeOptions", "running_hub", "serve", "wait_for"]

log = logging.getLogger("ffm.hub.service")


@dataclass
class ServeOptions:
    """Everything ``ffm-hub serve`` takes (each field is a command-line flag)."""

    federation: str = "default"
    model: str = "minilm-l6-v2"
    task: str = "sst2"
    strategy: str = "lora"
    extra_strategies: tuple[str, ...] = ()
    tau: int = 3
    server_lr: float = 1.0
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_epsilon: float = 1e-3
    aggregator: str = "fedavg"  # fedavg | median | trimmed_mean | krum | multi_krum | dp_fedavg (ffm_hub.robust)
    trim_fraction: float = 0.1
    krum_f: int = 1
    krum_m: int = 1
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_seed: int | None = None  # None: OS entropy (a known seed lets anyone strip the noise)
    dp_delta: float = 1e-5  # the δ at which the privacy spent (ε) is reported
    dp_max_epsilon: float | None = None  # stop aggregating before ε would pass this (None: no budget)
    staleness: str = "polynomial"
    staleness_alpha: float = 0.5
    max_staleness: int | None = None
    max_update_norm: float | None = None  # reject updates with a larger L2 norm (None: no bound)
    keep_versions: int | None = None
    central_epochs: int = 0  # epochs on the hub's public data after each aggregation (0: none)
    public_limit: int = 64  # public training examples the hub holds
    policy: str = "fixed"  # fixed | central-then-federated | federated-only | adaptive
    policy_tolerance: float = 0.0
    max_central_steps: int = 1  # adaptive: central steps after one aggregation while they help
    central_min_gain: float = 0.0  # adaptive: another central step only after one that gained more
    validation_limit: int = 0  # held-out public examples the switching policy decides on (0: the eval data)
    state_dir: Path = field(default_factory=lambda: Path("ffm-hub-state"))
    broker: str | None = None
    broker_kind: str = "auto"
    broker_port: int = 1883
    broker_bind: str = "127.0.0.1"
    secure: Path | None = None  # a `ffm-hub broker-config` folder: the managed broker enforces it
    broker_username: str | None = None  # login on an existing broker (--broker)
    broker_password_file: Path | None = None
    broker_tls_ca: Path | None = None
    broker_tls_cert: Path | None = None
    broker_tls_key: Path | None = None
    eval_limit: int | None = 500
    data_dir: str | None = None
    seed: int = 0
    advertise: bool = True
    chunk_size: int = 128 * 1024
    downlink_codec: str = "fp32"  # codec of the global versions devices pull (stored fp32 either way)
    hub_id: str = "hub"
    ort_artifacts: bool = False  # serve ORT training artifacts to devices that ask (built lazily, cached)
    # Signed updates (ffm_hub.signing): all off by default.
    require_signatures: bool = False  # refuse updates not signed by an enrolled device key
    enrolled_keys: Path | None = None  # folder of <device_id>.pub files
    hub_key: Path | None = None  # the hub's Ed25519 private key: signs manifests and served frames
    hub_key_passphrase_file: Path | None = None  # its passphrase, when encrypted (else $FFM_KEY_PASSPHRASE)
    timestamp_tolerance: float = 300.0  # seconds a signature's timestamp may differ from the hub's clock

    @property
    def all_strategies(self) -> tuple[str, ...]:
        """The primary strategy first, then the others devices may use (mixed federation)."""
        return (self.strategy, *(s for s in self.extra_strategies if s != self.strategy))

    def __post_init__(self) -> None:
        if self.broker_kind not in ("auto", "mosquitto", "amqtt"):
            raise ConfigError(f"broker kind must be auto, mosquitto or amqtt, got {self.broker_kind!r}")
        self.state_dir = Path(self.state_dir)
        for name in (
            "secure",
            "broker_password_file",
            "broker_tls_ca",
            "broker_tls_cert",
            "broker_tls_key",
            "hub_key_passphrase_file",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))  # the TOML loader gives str


@dataclass(frozen=True)
class _BrokerLogin:
    """How the hub logs in to its broker, and what its managed broker enforces."""

    security: BrokerSecurity | None = None
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None


def _broker_login(opts: ServeOptions) -> _BrokerLogin:
    """With ``secure``, the hub user of that folder; else the --broker-* flags (nothing by default)."""
    tls_files = (opts.broker_tls_ca, opts.broker_tls_cert, opts.broker_tls_key)
    if opts.secure is not None:
        if opts.broker is not None:
            raise ConfigError("secure configures the managed broker; with an existing broker use the broker_* options")
        security = load_broker_security(opts.secure)
        if security.federation != opts.federation:
            raise ConfigError(f"{opts.secure} was made for federation {security.federation!r}, not {opts.federation!r}")
        tls = None
        if security.tls is not None:
            client_cert, client_key = (str(p) for p in security.client_cert(security.hub_user))
            if security.client_certs:
                tls = TlsOptions(str(security.tls.ca_file), client_cert, client_key)
            else:
                tls = TlsOptions(str(security.tls.ca_file))
        password = None if security.client_certs else _read_password(security.password_path(security.hub_user))
        return _BrokerLogin(security, security.hub_user, password, tls)
    password = _read_password(opts.broker_password_file) if opts.broker_password_file is not None else None
    tls = None
    if any(f is not None for f in tls_files):
        ca_file, cert_file, key_file = (None if f is None else str(f) for f in tls_files)
        tls = TlsOptions(ca_file, cert_file, key_file)
    return _BrokerLogin(None, opts.broker_username, password, tls)


def _read_password(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the broker password from {path}: {exc}") from exc


def _load_eval_data(opts: ServeOptions) -> LabeledData | None:
    try:
        data = load_split(opts.task, "dev", data_dir=opts.data_dir, limit=opts.eval_limit, seed=opts.seed)
    except DataError as exc:
        log.warning("no held-out data for %s, versions will carry no accuracy: %s", opts.task, exc)
        return None
    log.info("held-out evaluation data: %s", describe(data))
    return data


def _load_public_data(opts: ServeOptions) -> tuple[LabeledData | None, LabeledData | None]:
    """The hub's public shard: the first ``public_limit`` examples train (the central step), the next
    ``validation_limit`` are held out for the switching decisions, so those never see the test split."""
    if opts.central_epochs <= 0 and opts.validation_limit <= 0:
        return None, None
    drawn = load_split(
        opts.task, "train", data_dir=opts.data_dir, limit=opts.public_limit + opts.validation_limit, seed=opts.seed + 1
    )
    public = drawn.subset(range(min(opts.public_limit, len(drawn))))
    log.info("public data for the central step: %s", describe(public))
    if opts.validation_limit <= 0:
        return public, None
    heldout = drawn.subset(range(len(public), len(drawn)))
    if len(heldout) == 0:
        raise ConfigError(f"no public examples left for validation after {len(public)} training ones")
    log.info("held-out public data for switching decisions: %s", describe(heldout))
    return public, heldout


def _artifact_service(opts: ServeOptions, spec: ModelSpec) -> ArtifactService:
    """The ORT artifact server; refuses to start where artifacts could not be built at all."""
    from ffm_edge.errors import OrtUnavailableError
    from ffm_edge.ort.compat import check_onnx_version, ort_runtime_problem
    from ffm_hub.artifacts import ArtifactService

    check_onnx_version()
    problem = ort_runtime_problem()
    if problem is not None:
        raise OrtUnavailableError(f"--ort-artifacts needs onnxruntime-training (pip install 'ffm[ort]'): {problem}")
    log.info("serving ORT training artifacts (built on first request, cached in %s)", opts.state_dir / "ort-artifacts")
    return ArtifactService(
        spec, opts.task, opts.state_dir / "ort-artifacts", strategies=opts.all_strategies, seed=opts.seed
    )


@contextlib.contextmanager
def running_hub(opts: ServeOptions) -> Iterator[Hub]:
    """Start every part of the hub and stop them in reverse order on exit."""
    from ffm_edge.trainer import TorchTrainer
    from ffm_hub.advertise import HubAdvertiser
    from ffm_hub.brokers import start_managed_broker

    spec = load_model_spec(opts.model)
    task = get_task(opts.task)
    settings = HubSettings(
        federation=opts.federation,
        hub_id=opts.hub_id,
        model=spec.name,
        strategy=opts.strategy,
        tau=opts.tau,
        server_lr=opts.server_lr,
        server_optimizer=opts.server_optimizer,
        server_momentum=opts.server_momentum,
        server_beta1=opts.server_beta1,
        server_beta2=opts.server_beta2,
        server_epsilon=opts.server_epsilon,
        aggregator=opts.aggregator,
        trim_fraction=opts.trim_fraction,
        krum_f=opts.krum_f,
        krum_m=opts.krum_m,
        dp_clip=opts.dp_clip,
        dp_noise_multiplier=opts.dp_noise_multiplier,
        dp_seed=opts.dp_seed,
        dp_delta=opts.dp_delta,
        dp_max_epsilon=opts.dp_max_epsilon,
        staleness=opts.staleness,
        staleness_alpha=opts.staleness_alpha,
        max_staleness=opts.max_staleness,
        max_update_norm=opts.max_update_norm,
        keep_versions=opts.keep_versions,
        chunk_size=opts.chunk_size,
        downlink_codec=opts.downlink_codec,
    )
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    artifacts = _artifact_service(opts, spec) if opts.ort_artifacts else None  # fails fast without the ort extra
    public, heldout = _load_public_data(opts)  # before the broker: a bad setting fails fast
    login = _broker_login(opts)
    with contextlib.ExitStack() as stack:
        if opts.broker is None:
            broker = start_managed_broker(
                opts.broker_kind,
                port=opts.broker_port,
                bind=opts.broker_bind,
                workdir=opts.state_dir / "broker",
                security=login.security,
            )
            stack.callback(broker.stop)
            url = broker.url
            log.info("managed %s broker at %s", broker.kind, url)
        else:
            url = opts.broker
        (opts.state_dir / "broker.url").write_text(url + "\n")
        address = parse_broker_url(url)
        presence = f"ffm/v1/{opts.federation}/hub/presence"
        transport = MqttTransport(
            address.host,
            address.port,
            client_id=f"ffm-hub-{opts.federation}-{opts.hub_id}",
            will=(presence, b"offline", True),
            online=(presence, b"online", True),
            username=login.username,
            password=login.password,
            tls=login.tls if login.tls is not None else address.tls,
        )
        transport.connect()
        stack.callback(transport.close)
        store = SqliteStore(opts.state_dir / "store")
        stack.callback(store.close)
        # One trainer per strategy the federation accepts: each gives its tensors' initial values (the
        # same seed, so shared tensors such as the head start equal) and evaluates its view of a version.
        trainers = {name: TorchTrainer(spec, task, name, seed=opts.seed) for name in opts.all_strategies}
        initial: dict[str, np.ndarray] = {}
        for trainer in trainers.values():
            for name, value in trainer.trainable_state().items():
                initial.setdefault(name, value)
        strategy_tensors = {name: trainer.tensor_names for name, trainer in trainers.items()}
        eval_data = _load_eval_data(opts)

        def evaluate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
            if eval_data is None:
                return {}
            metrics: dict[str, float] = {}
            for name, trainer in trainers.items():
                trainer.load_trainable_state({k: state[k] for k in trainer.tensor_names})
                suffix = "" if name == opts.strategy else f"@{name}"
                metrics.update({f"{k}{suffix}": v for k, v in trainer.evaluate(eval_data).items()})
            return metrics

        central_step = None
        validate = None
        primary = trainers[opts.strategy]
        if heldout is not None:

            def validate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
                primary.load_trainable_state({k: state[k] for k in primary.tensor_names})
                return primary.evaluate(heldout)

        if opts.central_epochs > 0 and public is not None:

            def central_step(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                primary.load_trainable_state({k: state[k] for k in primary.tensor_names})
                primary.train(public, epochs=opts.central_epochs)
                return {**state, **primary.trainable_state()}

        from ffm_hub.switching import make_policy

        kwargs: dict[str, object] = {}
        if opts.policy == "adaptive":
            kwargs = {
                "tolerance": opts.policy_tolerance,
                "max_central_steps": opts.max_central_steps,
                "central_min_gain": opts.central_min_gain,
            }
        hub = Hub(
            settings,
            transport,
            store,
            initial_state=lambda: initial,
            evaluate=evaluate,
            strategy_tensors=strategy_tensors if len(trainers) > 1 else None,
            central_step=central_step,
            policy=make_policy(opts.policy, **kwargs) if opts.policy != "fixed" else None,
            validate=validate,
            artifacts=artifacts,
            security=_security(opts),
        )
        hub.start()
        stack.callback(hub.stop)
        if opts.advertise:
            advertiser = HubAdvertiser(opts.federation, url, hub_id=opts.hub_id, port=address.port)
            try:
                advertiser.start()
                stack.callback(advertiser.stop)
            except Exception as exc:  # discovery is a convenience; the hub works without it
                log.warning("zeroconf advertisement failed (%s); edges need --broker %s", exc, url)
        log.info(
            "hub ready: federation %s, model %s, strategy %s, tau %d, version %d, broker %s",
            opts.federation, spec.name, opts.strategy, opts.tau, hub.current_version, url,
        )  # fmt: skip
        yield hub


def serve(
    opts: ServeOptions,
    stop: threading.Event | None = None,
    *,
    metrics_port: int | None = None,
    metrics_bind: str = "127.0.0.1",
    status_interval: float = 5.0,
) -> None:
    """Run the hub until ``stop`` is set (or forever), with Prometheus metrics when a port is given.

    While it runs, ``<state_dir>/status.json`` holds a snapshot refreshed every ``status_interval``
    seconds, which ``ffm-hub status`` reads from another process.
    """
    from ffm_hub.status import StatusWriter

    stop = stop or threading.Event()
    with running_hub(opts) as hub:
        status = StatusWriter(hub, opts.state_dir, status_interval).start()
        metrics = None
        try:
            if metrics_port:
                from ffm_hub.metrics import start_metrics_server

                metrics, port = start_metrics_server(hub, metrics_port, metrics_bind)
                log.info("Prometheus metrics on http://%s:%d/metrics", metrics_bind, port)
            wait_for(stop)
        finally:
            if metrics is not None:
                metrics.stop()
            status.stop()  # a last snapshot, "running": false, while the store is still open
    log.info("hub stopped")


def _security(opts: ServeOptions) -> HubSecurity | None:
    """The hub's signing and checking, or None when neither is configured (today's behaviour)."""
    if not opts.require_signatures and opts.enrolled_keys is None and opts.hub_key is None:
        return None
    from ffm_edge.signing import read_passphrase
    from ffm_hub.signing import HubSecurity

    enrolled = opts.enrolled_keys
    if enrolled is None and (opts.state_dir / "enrolled-keys").is_dir():
        enrolled = opts.state_dir / "enrolled-keys"  # where `ffm-hub enroll` puts keys by default
    return HubSecurity.from_files(
        require_signatures=opts.require_signatures,
        enrolled_keys=enrolled,
        hub_key=opts.hub_key,
        hub_key_passphrase=read_passphrase(opts.hub_key_passphrase_file),
        tolerance=opts.timestamp_tolerance,
    )


def wait_for(stop: threading.Event, poll_s: float = 0.5) -> None:
    """Block until ``stop`` is set, waking every ``poll_s``.

    Python runs signal handlers only in the main thread, between bytecodes. Linux may deliver SIGTERM
    to any thread (paho's network loop, the hub's worker): an untimed ``stop.wait()`` in the main thread
    then never returns and the process ignores SIGTERM. Found by the reliability suite's ``hub_kill``.
    """
    while not stop.wait(poll_s):
        pass
