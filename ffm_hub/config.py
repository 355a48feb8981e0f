"""``ffm-hub serve --config hub.toml``: the hub's settings in one TOML file.

The file is grouped in tables; every key maps onto one :class:`~ffm_hub.service.ServeOptions` field
(or onto a setting of the service around it: the metrics port, torch threads). :data:`FIELDS` is the
single table of keys, types, defaults and meanings: validation, :func:`example_config` and the docs
are all generated from it, so they cannot drift apart.

Every problem in a file is reported at once, one per line with its key path: unknown keys (with a
did-you-mean), wrong types, values out of range::

    hub.toml: 3 problems
      aggregation.tau: must be >= 1, got 0
      broker.knd: unknown key (did you mean 'broker.kind'?)
      federation.extra_strategies: must be a list of strings, got str

TOML has no null: leave an optional key out (or comment it out) for "not set".
"""

from __future__ import annotations

import difflib
import math
import textwrap
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ffm_edge.errors import ConfigError, DecodeError
from ffm_hub.service import ServeOptions

__all__ = ["FIELDS", "ConfigField", "HubConfig", "example_config", "load_hub_config", "validate_hub_config"]

# A check returns a problem ("must be ...") or None.
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class ConfigField:
    """One key of the config file."""

    table: str
    key: str
    target: str  # ServeOptions field, or "metrics_port" / "metrics_bind" / "threads" of HubConfig
    kind: str  # str | int | float | bool | path | list[str]
    default: Any  # None: not set (the key is left out)
    help: str
    example: Any = None  # a value shown, commented out, for an optional key with no default
    check: Check | None = None
    zero_is_none: bool = False  # 0 means "not set" (off / no limit)

    @property
    def path(self) -> str:
        return f"{self.table}.{self.key}"


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def _between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be in [{low}, {high}], got {v}"


def _positive_finite(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"must be a finite number > 0, got {v}"


def _non_negative_finite(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else f"must be a finite number >= 0, got {v}"


def _staleness_kind(v: str) -> str | None:
    from ffm_hub.aggregate import STALENESS_KINDS

    return _one_of(*STALENESS_KINDS)(v)


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        if v in choices:
            return None
        return f"must be one of {', '.join(choices)}, got {v!r}" + _suggest(v, choices)

    return check


def _identifier(what: str) -> Check:
    def check(v: str) -> str | None:
        from ffm_edge.wire import validate_id

        try:
            validate_id(v, what)
        except DecodeError as exc:
            return str(exc)
        return None

    return check


def _fraction(v: float) -> str | None:
    return None if math.isfinite(v) and 0 <= v < 1 else f"must be in [0, 1), got {v}"


def _open_fraction(v: float) -> str | None:
    return None if math.isfinite(v) and 0 < v < 1 else f"must be in (0, 1), got {v}"


def _half_fraction(v: float) -> str | None:
    return None if math.isfinite(v) and 0 <= v < 0.5 else f"must be in [0, 0.5), got {v}"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _strategy(v: str) -> str | None:
    from ffm_edge.strategies import STRATEGIES  # imports torch: only when a file is validated

    if v in STRATEGIES:
        return None
    return f"unknown strategy {v!r}, expected one of {', '.join(sorted(STRATEGIES))}" + _suggest(v, STRATEGIES)


def _strategies(v: list[str]) -> str | None:
    problems = [p for p in (_strategy(s) for s in v) if p]
    return "; ".join(problems) or None


def _broker_url(v: str) -> str | None:
    from ffm_edge.transport.mqtt import parse_broker_url

    try:
        parse_broker_url(v)
    except ConfigError as exc:
        return str(exc)
    return None


def _chunk_size(v: int) -> str | None:
    from ffm_edge.wire import DEFAULT_LIMITS

    return _between(1024, DEFAULT_LIMITS.max_chunk_bytes)(v)


_D = ServeOptions()

#: Every key of the config file, in the order of the example. The single source of truth.
FIELDS: tuple[ConfigField, ...] = (
    ConfigField("federation", "name", "federation", "str", _D.federation,
                "federation name (letters, digits, '.', '-', '_'); devices join it by this name",
                check=_identifier("federation")),
    ConfigField("federation", "hub_id", "hub_id", "str", _D.hub_id,
                "this hub's id within the federation (MQTT client id and zeroconf name)",
                check=_identifier("hub_id")),
    ConfigField("federation", "model", "model", "str", _D.model,
                "model spec name (models/*.toml) or path to a spec file", check=_non_empty),
    ConfigField("federation", "task", "task", "str", _D.task,
                "task of the head, and of the held-out evaluation data (sst2, mrpc, digits, ...)",
                check=_non_empty),
    ConfigField("federation", "strategy", "strategy", "str", _D.strategy,
                "strategy whose tensors the federation trains (lora, prompt, head, full_q8)", check=_strategy),
    ConfigField("federation", "extra_strategies", "extra_strategies", "list[str]", list(_D.extra_strategies),
                "further strategies devices may train (a mixed federation), e.g. [\"head\", \"prompt\"]",
                check=_strategies),
    ConfigField("federation", "seed", "seed", "int", _D.seed,
                "seed of the initial global version and of the evaluation sample", check=_at_least(0)),
    ConfigField("federation", "advertise", "advertise", "bool", _D.advertise,
                "advertise the hub on the local network with zeroconf (edges then need no broker URL)"),
    ConfigField("aggregation", "tau", "tau", "int", _D.tau,
                "aggregate (FedAvg) as soon as this many accepted updates are queued", check=_at_least(1)),
    ConfigField("aggregation", "server_lr", "server_lr", "float", _D.server_lr,
                "server learning rate η of FedAvg: new = old + η · mean(delta)", check=_positive_finite),
    ConfigField("aggregation", "server_optimizer", "server_optimizer", "str", _D.server_optimizer,
                "server optimizer applied to the weighted mean delta: fedavg, fedavgm (server momentum) or "
                "fedadam (Reddi et al. 2021; wants a small server_lr such as 0.01); its buffers are stored "
                "with each version and resumed after a restart",
                check=_one_of("fedavg", "fedavgm", "fedadam")),
    ConfigField("aggregation", "server_momentum", "server_momentum", "float", _D.server_momentum,
                "fedavgm: momentum in [0, 1)", check=_fraction),
    ConfigField("aggregation", "server_beta1", "server_beta1", "float", _D.server_beta1,
                "fedadam: decay of the first moment, in [0, 1)", check=_fraction),
    ConfigField("aggregation", "server_beta2", "server_beta2", "float", _D.server_beta2,
                "fedadam: decay of the second moment, in [0, 1)", check=_fraction),
    ConfigField("aggregation", "server_epsilon", "server_epsilon", "float", _D.server_epsilon,
                "fedadam: adaptivity τ added to sqrt(v), > 0", check=_positive_finite),
    ConfigField("aggregation", "aggregator", "aggregator", "str", _D.aggregator,
                "how the queued updates become one pseudo-gradient before the server step: fedavg (sample- and "
                "staleness-weighted mean), median or trimmed_mean (coordinate-wise; resist a minority of "
                "poisoned or scaled updates), krum or multi_krum (keep the update(s) closest to their "
                "neighbours; every update must carry every tensor) or dp_fedavg (central DP: clip, average, "
                "add Gaussian noise); all but fedavg ignore sample counts and staleness weights",
                check=_one_of("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "dp_fedavg")),
    ConfigField("aggregation", "trim_fraction", "trim_fraction", "float", _D.trim_fraction,
                "trimmed_mean: share of values cut from each end of every coordinate, in [0, 0.5)",
                check=_half_fraction),
    ConfigField("aggregation", "krum_f", "krum_f", "int", _D.krum_f,
                "krum, multi_krum: attackers tolerated among tau updates (needs tau > 2 krum_f + 2)",
                check=_at_least(0)),
    ConfigField("aggregation", "krum_m", "krum_m", "int", _D.krum_m,
                "multi_krum: how many lowest-scoring updates are averaged (<= tau - krum_f)", check=_at_least(1)),
    ConfigField("aggregation", "dp_clip", "dp_clip", "float", _D.dp_clip,
                "dp_fedavg: L2 norm C each whole update is clipped to", check=_positive_finite),
    ConfigField("aggregation", "dp_noise_multiplier", "dp_noise_multiplier", "float", _D.dp_noise_multiplier,
                "dp_fedavg: noise multiplier z; noise std sigma = z * C / tau, recorded with each version",
                check=_non_negative_finite),
    ConfigField("aggregation", "dp_seed", "dp_seed", "int", _D.dp_seed,
                "dp_fedavg: seed of the noise, for reproducible experiments only; leave out for OS entropy "
                "(anyone who knows the seed can remove the noise)", example=0, check=_at_least(0)),
    ConfigField("aggregation", "dp_delta", "dp_delta", "float", _D.dp_delta,
                "dp_fedavg: the δ at which the privacy spent is reported as ε (each version records dp_epsilon and "
                "dp_mu); pick it well below 1 / number of devices", check=_open_fraction),
    ConfigField("aggregation", "dp_max_epsilon", "dp_max_epsilon", "float", _D.dp_max_epsilon,
                "dp_fedavg: privacy budget; the hub runs no round that would take ε above it, refuses new updates "
                "(reason budget_exhausted) and keeps the queued ones; leave out for no budget",
                example=8.0, check=_positive_finite),
    ConfigField("aggregation", "staleness", "staleness", "str", _D.staleness,
                "how an update built on an older global version is weighted down: constant, polynomial "
                "((1 + s)^-alpha) or hinge (1 while s <= 4, then 1 / (alpha (s - 4) + 1))",
                check=_staleness_kind),
    ConfigField("aggregation", "staleness_alpha", "staleness_alpha", "float", _D.staleness_alpha,
                "exponent (polynomial) or slope (hinge) of the staleness weight, >= 0", check=_non_negative_finite),
    ConfigField("aggregation", "max_staleness", "max_staleness", "int", _D.max_staleness,
                "reject updates more than this many versions behind; leave out to never reject for staleness",
                example=10, check=_at_least(0)),
    ConfigField("aggregation", "max_update_norm", "max_update_norm", "float", _D.max_update_norm,
                "reject an update whose L2 norm over all its tensors exceeds this (reason norm_exceeded); "
                "leave out for no bound", example=10.0, check=_positive_finite),
    ConfigField("aggregation", "chunk_size", "chunk_size", "int", _D.chunk_size,
                "bytes per MQTT message when a global version is sent in chunks", check=_chunk_size),
    ConfigField("aggregation", "downlink_codec", "downlink_codec", "str", _D.downlink_codec,
                "codec of the global versions devices pull: fp32, fp16 (half the bytes) or int8 (per-channel "
                "scales, about a quarter); versions are stored, aggregated and evaluated in fp32 either way, and "
                "one that fp16 or int8 cannot hold is sent fp32", check=_one_of("fp32", "fp16", "int8")),
    ConfigField("switching", "central_epochs", "central_epochs", "int", _D.central_epochs,
                "epochs of training on the hub's public data after each aggregation (0 = federated only)",
                check=_at_least(0)),
    ConfigField("switching", "public_limit", "public_limit", "int", _D.public_limit,
                "public training examples the hub holds for that central step", check=_at_least(1)),
    ConfigField("switching", "policy", "policy", "str", _D.policy,
                "fixed (federated then central, always publish), central-then-federated (one central step "
                "before the first round, then federated only), federated-only (never the central step) or "
                "adaptive (central steps while they help; revert an aggregate that makes the held-out metric "
                "worse)",
                check=_one_of("fixed", "central-then-federated", "federated-only", "adaptive")),
    ConfigField("switching", "tolerance", "policy_tolerance", "float", _D.policy_tolerance,
                "adaptive: a drop of the held-out metric this small still counts as not worse",
                check=_non_negative_finite),
    ConfigField("switching", "max_central_steps", "max_central_steps", "int", _D.max_central_steps,
                "adaptive: at most this many central steps after one aggregation", check=_at_least(1)),
    ConfigField("switching", "central_min_gain", "central_min_gain", "float", _D.central_min_gain,
                "adaptive: run another central step only after one that raised the held-out metric by more",
                check=_non_negative_finite),
    ConfigField("switching", "validation_limit", "validation_limit", "int", _D.validation_limit,
                "public examples held out (after the public_limit training ones) for the policy's decisions; "
                "0 = decide on the evaluation data", check=_at_least(0)),
    ConfigField("ort", "serve_artifacts", "ort_artifacts", "bool", _D.ort_artifacts,
                "serve ONNX Runtime training artifacts to devices that ask (devices without torch): built on "
                "the first request per strategy, in the background, from the current global version, and "
                "cached under state_dir/ort-artifacts; needs the ort extra"),
    ConfigField("broker", "url", "broker", "str", _D.broker,
                "mqtt://HOST:PORT of an existing broker; leave out to run a managed broker (below)",
                example="mqtt://broker.local:1883", check=_broker_url),
    ConfigField("broker", "kind", "broker_kind", "str", _D.broker_kind,
                "managed broker to run when no url is given: auto (Mosquitto if installed, else amqtt), "
                "mosquitto or amqtt", check=_one_of("auto", "mosquitto", "amqtt")),
    ConfigField("broker", "port", "broker_port", "int", _D.broker_port,
                "port the managed broker listens on (0 = any free port)", check=_between(0, 65535)),
    ConfigField("broker", "bind", "broker_bind", "str", _D.broker_bind,
                "address the managed broker listens on (0.0.0.0 = every interface)", check=_non_empty),
    ConfigField("broker", "username", "broker_username", "str", _D.broker_username,
                "username on the existing broker (url)", example="hub", check=_non_empty),
    ConfigField("broker", "password_file", "broker_password_file", "path", None,
                "file holding the password on the existing broker", example="/srv/ffm/broker/passwords/hub",
                check=_non_empty),
    ConfigField("broker", "tls_ca", "broker_tls_ca", "path", None,
                "CA of the existing broker's TLS certificate (mqtts:// urls use the system's CAs without it)",
                example="/srv/ffm/broker/ca.crt", check=_non_empty),
    ConfigField("broker", "tls_cert", "broker_tls_cert", "path", None,
                "TLS client certificate for the existing broker", example="/srv/ffm/broker/clients/hub.crt",
                check=_non_empty),
    ConfigField("broker", "tls_key", "broker_tls_key", "path", None,
                "key of tls_cert", example="/srv/ffm/broker/clients/hub.key", check=_non_empty),
    ConfigField("security", "dir", "secure", "path", None,
                "folder written by `ffm-hub broker-config`: the managed broker enforces its passwords, "
                "per-device ACLs and TLS, and the hub logs in as its hub user; leave out for an open broker",
                example="/srv/ffm/broker", check=_non_empty),
    ConfigField("evaluation", "limit", "eval_limit", "int", _D.eval_limit,
                "held-out examples evaluated per global version (0 = all of them)",
                check=_at_least(0), zero_is_none=True),
    ConfigField("evaluation", "data_dir", "data_dir", "str", _D.data_dir,
                "GLUE-format data folder; leave out to use $FFM_DATA_DIR",
                example="/srv/ffm/data", check=_non_empty),
    ConfigField("storage", "state_dir", "state_dir", "path", str(_D.state_dir),
                "folder of the durable update queue, the global versions and the managed broker's files",
                check=_non_empty),
    ConfigField("storage", "keep_versions", "keep_versions", "int", _D.keep_versions,
                "keep only the newest N global versions on disk; leave out to keep every version",
                example=20, check=_at_least(1)),
    ConfigField("signing", "require_signatures", "require_signatures", "bool", _D.require_signatures,
                "accept only updates signed by an enrolled device key; others are refused as unknown_device, "
                "bad_signature, replayed or stale_timestamp"),
    ConfigField("signing", "enrolled_keys", "enrolled_keys", "path", None,
                "folder of <device_id>.pub files (ffm-hub enroll); leave out to use state_dir/enrolled-keys",
                example="/srv/ffm/enrolled-keys", check=_non_empty),
    ConfigField("signing", "hub_key", "hub_key", "path", None,
                "the hub's Ed25519 private key (ffm-hub keygen): signs manifests and served global versions",
                example="/srv/ffm/hub.key", check=_non_empty),
    ConfigField("signing", "hub_key_passphrase_file", "hub_key_passphrase_file", "path", None,
                "file whose first line is the passphrase of an encrypted hub_key (ffm-hub keygen "
                "--passphrase-file); leave out for an unencrypted key or $FFM_KEY_PASSPHRASE",
                example="/srv/ffm/hub.passphrase", check=_non_empty),
    ConfigField("signing", "timestamp_tolerance", "timestamp_tolerance", "float", _D.timestamp_tolerance,
                "seconds a signed update's timestamp may differ from the hub's clock", check=_positive_finite),
    ConfigField("metrics", "port", "metrics_port", "int", 0,
                "port of the Prometheus /metrics endpoint (0 = no metrics endpoint)",
                check=_between(0, 65535), zero_is_none=True),
    ConfigField("metrics", "bind", "metrics_bind", "str", "127.0.0.1",
                "address the metrics endpoint listens on (0.0.0.0 = every interface)", check=_non_empty),
    ConfigField("runtime", "threads", "threads", "int", 0,
                "torch CPU threads (0 = torch's default)", check=_at_least(0), zero_is_none=True),
)  # fmt: skip

_TABLE_HELP = {
    "federation": "Which federation this hub serves, and what it trains.",
    "aggregation": "When and how updates become a new global version.",
    "switching": "Central optimization on the hub's public data between federated rounds (the paper's FFM).",
    "ort": "Training artifacts for devices on the ONNX Runtime (no torch).",
    "broker": "The MQTT broker: an existing one (url), or one the hub runs itself.",
    "security": "Broker authentication, per-device topic ACLs and TLS for the managed broker (off by default).",
    "evaluation": "Held-out evaluation of each global version (its accuracy etc.).",
    "storage": "Durable state.",
    "signing": "Signed updates and replay protection (Ed25519 device keys; off by default).",
    "metrics": "Prometheus metrics over HTTP (GET /metrics).",
    "runtime": "Process settings.",
}


@dataclass(frozen=True)
class HubConfig:
    """A validated config: the service options, plus the settings of the process around the hub."""

    options: ServeOptions = field(default_factory=ServeOptions)
    metrics_port: int | None = None  # None: no metrics endpoint
    metrics_bind: str = "127.0.0.1"
    threads: int | None = None  # None: torch's default


def _closest(word: str, candidates: Any) -> str | None:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _suggest(word: str, candidates: Any) -> str:
    match = _closest(word, candidates)
    return f" (did you mean {match!r}?)" if match else ""


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _coerce(spec: ConfigField, value: Any) -> tuple[Any, str | None]:
    """The value converted to the field's kind, or a problem."""
    kind = spec.kind
    if kind in ("str", "path"):
        if not isinstance(value, str):
            return None, f"must be a string, got {_type_name(value)} {value!r}"
        return value, None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"must be an integer, got {_type_name(value)} {value!r}"
        return value, None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, f"must be a number, got {_type_name(value)} {value!r}"
        return float(value), None
    if kind == "bool":
        if not isinstance(value, bool):
            return None, f"must be true or false, got {_type_name(value)} {value!r}"
        return value, None
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, f"must be an array of strings, got {_type_name(value)} {value!r}"
        return list(value), None
    raise AssertionError(f"unknown kind {kind}")  # pragma: no cover


def validate_hub_config(data: Mapping[str, Any], *, source: str = "config") -> HubConfig:
    """Validate a parsed TOML document; raise one :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    by_table: dict[str, dict[str, ConfigField]] = {}
    for item in FIELDS:
        by_table.setdefault(item.table, {})[item.key] = item
    all_paths = [spec.path for spec in FIELDS]
    values: dict[str, Any] = {}

    for table, content in data.items():
        if table not in by_table:
            # A key put at the top level (``tau = 5``) or a misspelt table: suggest the full path.
            leaf = [s.path for s in FIELDS if s.key == table]
            hint = f" (did you mean {leaf[0]!r}?)" if leaf else _suggest(table, by_table)
            problems.append(f"{table}: unknown {'table' if isinstance(content, dict) else 'key'}{hint}")
            continue
        if not isinstance(content, dict):
            problems.append(f"{table}: must be a table ([{table}]), got {_type_name(content)}")
            continue
        for key, value in content.items():
            path = f"{table}.{key}"
            found = by_table[table].get(key)
            if found is None:
                # The right key in the wrong table, a misspelt key, or a misspelt path.
                elsewhere = [s.path for s in FIELDS if s.key == key]
                near = _closest(key, by_table[table])
                guess = elsewhere[0] if elsewhere else f"{table}.{near}" if near else _closest(path, all_paths)
                problems.append(f"{path}: unknown key" + (f" (did you mean {guess!r}?)" if guess else ""))
                continue
            spec = found
            coerced, problem = _coerce(spec, value)
            if problem is None and spec.check is not None:
                problem = spec.check(coerced)
            if problem is not None:
                problems.append(f"{path}: {problem}")
                continue
            if spec.zero_is_none and coerced == 0:
                coerced = None
            values[spec.target] = coerced

    # Cross-field checks (only when both values are themselves valid).
    strategy = values.get("strategy", _D.strategy)
    if strategy in values.get("extra_strategies", ()):
        problems.append(f"federation.extra_strategies: lists the primary strategy {strategy!r} again")
    metrics_port = values.get("metrics_port")
    broker_port = values.get("broker_port", _D.broker_port)
    if metrics_port is not None and values.get("broker") is None and metrics_port == broker_port:
        problems.append(f"metrics.port: {metrics_port} is also the managed broker's port (broker.port)")

    aggregator = values.get("aggregator", _D.aggregator)
    if aggregator in ("krum", "multi_krum") and not any(p.startswith("aggregation.") for p in problems):
        from ffm_hub.robust import check_aggregator

        problems += [
            f"aggregation.{aggregator}: {p}"
            for p in check_aggregator(
                aggregator,
                tau=values.get("tau", _D.tau),
                trim_fraction=values.get("trim_fraction", _D.trim_fraction),
                krum_f=values.get("krum_f", _D.krum_f),
                krum_m=values.get("krum_m", _D.krum_m),
                dp_clip=values.get("dp_clip", _D.dp_clip),
                dp_noise_multiplier=values.get("dp_noise_multiplier", _D.dp_noise_multiplier),
            )
        ]
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{source}: {len(problems)} {noun}\n" + "\n".join(f"  {p}" for p in problems))

    extra = {name: values.pop(name) for name in ("metrics_port", "metrics_bind", "threads") if name in values}
    if "extra_strategies" in values:
        values["extra_strategies"] = tuple(values["extra_strategies"])
    if "state_dir" in values:
        values["state_dir"] = Path(values["state_dir"])
    for name in ("enrolled_keys", "hub_key", "hub_key_passphrase_file"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    known = {f.name for f in fields(ServeOptions)}
    assert set(values) <= known, set(values) - known
    return HubConfig(options=ServeOptions(**values), **extra)


def load_hub_config(path: str | Path) -> HubConfig:
    """Read and validate a hub config file (TOML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read hub config {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return validate_hub_config(data, source=str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover


def example_config() -> str:
    """A commented config with every key at its default (loading it gives the defaults)."""
    lines = [
        "# ffm-hub configuration: `ffm-hub serve --config hub.toml`.",
        "# Every key is shown with its default; leave a key out to keep the default.",
        "# Optional keys shown commented out are not set by default (TOML has no null).",
    ]
    table = None
    for spec in FIELDS:
        if spec.table != table:
            table = spec.table
            lines += ["", f"# {_TABLE_HELP[table]}", f"[{table}]"]
        lines += [f"# {line}" for line in textwrap.wrap(spec.help, 100)]
        if spec.default is None:
            lines.append(f"# {spec.key} = {_toml_value(spec.example)}")
        else:
            lines.append(f"{spec.key} = {_toml_value(spec.default)}")
    return "\n".join(lines) + "\n"
