"""``ffm-hub serve --config``: the TOML file, its validation (every problem at once) and its example."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ffm_edge.errors import ConfigError
from ffm_hub.config import FIELDS, HubConfig, example_config, load_hub_config, validate_hub_config
from ffm_hub.service import ServeOptions


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return path


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line.strip() for line in str(exc.value).splitlines()[1:]]


def test_a_valid_file_sets_every_group(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[federation]
name = "clinic-a"
hub_id = "hub-1"
task = "mrpc"
strategy = "lora"
extra_strategies = ["head", "prompt"]
seed = 7
advertise = false

[aggregation]
tau = 10
server_lr = 2          # an integer is a fine number
chunk_size = 65536
staleness = "hinge"
staleness_alpha = 1
max_staleness = 0


[broker]
url = "mqtt://broker.local:1884"

[evaluation]
limit = 0              # 0 = all held-out examples
data_dir = "/srv/data"

[storage]
state_dir = "/var/lib/ffm-hub"
keep_versions = 5

[metrics]
port = 9108
bind = "0.0.0.0"

[runtime]
threads = 4
""",
    )
    config = load_hub_config(path)
    assert config.options == ServeOptions(
        federation="clinic-a", hub_id="hub-1", task="mrpc", strategy="lora", extra_strategies=("head", "prompt"),
        seed=7, advertise=False, tau=10, server_lr=2.0, chunk_size=65536, broker="mqtt://broker.local:1884",
        eval_limit=None, data_dir="/srv/data", state_dir=Path("/var/lib/ffm-hub"), staleness="hinge",
        staleness_alpha=1.0, max_staleness=0, keep_versions=5,
    )  # fmt: skip
    assert isinstance(config.options.server_lr, float)
    assert (config.metrics_port, config.metrics_bind, config.threads) == (9108, "0.0.0.0", 4)


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_hub_config(write(tmp_path, "")) == HubConfig(ServeOptions(), metrics_port=None)


def test_the_example_lists_every_field_and_loads_as_the_defaults(tmp_path: Path) -> None:
    text = example_config()
    assert load_hub_config(write(tmp_path, text)) == HubConfig()
    comments = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    for spec in FIELDS:
        assert f"[{spec.table}]" in text and spec.help in comments
        assert f"{spec.key} = " in text  # set, or commented out when it has no default
    # Uncommenting the optional examples still gives a valid file.
    uncommented = text
    for spec in FIELDS:
        if spec.default is None:
            uncommented = uncommented.replace(f"# {spec.key} = ", f"{spec.key} = ")
    options = validate_hub_config(tomllib.loads(uncommented)).options
    assert options.broker == "mqtt://broker.local:1883" and options.data_dir == "/srv/ffm/data"
    assert (options.max_staleness, options.keep_versions) == (10, 20)


def test_every_serve_option_has_a_key() -> None:
    from dataclasses import fields

    targets = {spec.target for spec in FIELDS}
    assert {f.name for f in fields(ServeOptions)} <= targets


def test_several_mistakes_are_reported_at_once_with_suggestions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
tau = 5                   # belongs in [aggregation]

[federation]
name = "has spaces"
stratgy = "lora"          # misspelt key
extra_strategies = ["hed"]

[aggregation]
tau = 0
server_lr = -1.0
chunk_size = 10

[broker]
knd = "mosquitto"
port = 70000

[evalution]               # misspelt table
limit = 3
""",
    )
    with pytest.raises(ConfigError) as exc:
        load_hub_config(path)
    assert str(exc.value).startswith(f"{path}: 10 problems\n")
    lines = problems(exc)
    expected = [
        "tau: unknown key (did you mean 'aggregation.tau'?)",
        "federation.name: invalid federation",
        "federation.stratgy: unknown key (did you mean 'federation.strategy'?)",
        "federation.extra_strategies: unknown strategy 'hed'",
        "aggregation.tau: must be >= 1, got 0",
        "aggregation.server_lr: must be a finite number > 0, got -1.0",
        "aggregation.chunk_size: must be in [1024, ",
        "broker.knd: unknown key (did you mean 'broker.kind'?)",
        "broker.port: must be in [0, 65535], got 70000",
        "evalution: unknown table (did you mean 'evaluation'?)",
    ]
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    assert "(did you mean 'head'?)" in lines[3]


def test_wrong_types_are_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
federation = "not a table"

[aggregation]
tau = "3"
server_lr = true

[broker]
port = 1883.0
kind = "rabbit"

[federation_extra]

[storage]
state_dir = 5

[metrics]
port = false
""",
    )
    with pytest.raises(ConfigError) as exc:
        load_hub_config(path)
    lines = problems(exc)
    assert lines == [
        "federation: must be a table ([federation]), got string",
        "aggregation.tau: must be an integer, got string '3'",
        "aggregation.server_lr: must be a number, got bool True",
        "broker.port: must be an integer, got float 1883.0",
        "broker.kind: must be one of auto, mosquitto, amqtt, got 'rabbit'",
        "federation_extra: unknown table (did you mean 'federation'?)",
        "storage.state_dir: must be a string, got int 5",
        "metrics.port: must be an integer, got bool False",
    ]


def test_cross_field_problems(tmp_path: Path) -> None:
    data = {"federation": {"extra_strategies": ["lora"]}, "metrics": {"port": 1883}}
    with pytest.raises(ConfigError) as exc:
        validate_hub_config(data)
    assert "federation.extra_strategies: lists the primary strategy 'lora' again" in str(exc.value)
    assert "metrics.port: 1883 is also the managed broker's port" in str(exc.value)
    # With an external broker the managed broker's port does not matter.
    data["broker"] = {"url": "mqtt://elsewhere:1883"}
    data["federation"] = {}
    assert validate_hub_config(data).metrics_port == 1883


def test_bad_broker_url_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker.url: unsupported broker URL scheme 'http'"):
        validate_hub_config({"broker": {"url": "http://x:1"}})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_hub_config(write(tmp_path, "[federation\nname = 1"))
    with pytest.raises(ConfigError, match="cannot read hub config"):
        load_hub_config(tmp_path / "missing.toml")
