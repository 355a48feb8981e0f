"""Strategy configs from the command line: ``ffm-edge run --strategy-option KEY=VALUE`` and ``ffm-edge strategies``.

The parser (:func:`ffm_edge.strategies.strategy_from_options`) reads each value by its config field's type,
so every type the real configs use is covered here, with the errors a user meets: an unknown key (the
message lists the valid fields), a value of the wrong type, a value the config refuses, ``auto`` and the ORT
runtime. End to end, the real ``ffm-edge run`` path with ``--strategy full_q8 --strategy-option top_k=0.05``
joins a real Hub over amqtt and Mosquitto, and the hub stores one update that travelled sparse.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import struct
from pathlib import Path

import pytest

from ffm_edge.cli import build_parser, main
from ffm_edge.errors import ConfigError
from ffm_edge.strategies import (
    STRATEGIES,
    FullQ8Config,
    FullQ8Strategy,
    HeadConfig,
    LoraConfig,
    PromptConfig,
    format_strategy_options,
    get_strategy,
    strategy_from_options,
    strategy_option_fields,
)
from ffm_hub.brokers import ManagedBroker


# -- parsing, by field type -----------------------------------------------------------------------------
def test_each_field_type_of_the_real_configs_parses() -> None:
    full = strategy_from_options(
        "full_q8",
        {"top_k": "0.05", "weight_dtype": "bf16", "optimizer_fallback": "adamw", "gradient_checkpointing": "no"},
    )
    assert isinstance(full, FullQ8Strategy) and full.sends_sparse
    assert full.config == FullQ8Config(
        weight_dtype="bf16", top_k=0.05, optimizer_fallback="adamw", gradient_checkpointing=False
    )  # float, str, str | None, bool
    lora = strategy_from_options(
        "lora",
        {"r": "16", "alpha": "32", "dropout": "0.1", "target_modules": " query , value", "base_precision": "nf4"},
    )
    assert lora.config == LoraConfig(
        r=16, alpha=32, dropout=0.1, target_modules=("query", "value"), base_precision="nf4"
    )
    assert strategy_from_options("lora", {"r": "None", "dropout": "none"}).config == LoraConfig()  # X | None
    prompt = strategy_from_options("prompt", {"num_virtual_tokens": "8", "init": "TEXT", "init_text": "a review:"})
    assert prompt.config == PromptConfig(num_virtual_tokens=8, init="TEXT", init_text="a review:")  # int, str
    head = strategy_from_options("head", {"modules_to_save": "classifier,pooler", "base_precision": "int8"})
    assert head.config == HeadConfig(modules_to_save=("classifier", "pooler"), base_precision="int8")
    assert strategy_from_options("lora", {}).config == LoraConfig(), "no options: the defaults"


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("False", False), ("1", True), ("0", False), ("YES", True), ("no", False)]
)
def test_bools_read_the_usual_words(text: str, value: bool) -> None:
    assert strategy_from_options("head", {"gradient_checkpointing": text}).config.gradient_checkpointing is value


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_field_round_trips_through_its_listed_default(name: str) -> None:
    """The parser reads every type the registered configs use: each field's default, as listed, parses back."""
    fields = strategy_option_fields(name)
    assert fields and all(f.help for f in fields), "every field has help text"
    options = {f.name: f.default_text for f in fields}
    assert strategy_from_options(name, options).config == get_strategy(name).config


# -- errors ---------------------------------------------------------------------------------------------------
def test_an_unknown_key_lists_the_fields_with_their_help() -> None:
    with pytest.raises(ConfigError) as caught:
        strategy_from_options("full_q8", {"topk": "0.1"})
    message = str(caught.value)
    assert "'topk'" in message and "did you mean 'top_k'" in message
    for field in strategy_option_fields("full_q8"):
        assert field.name in message and field.help in message


@pytest.mark.parametrize(
    ("name", "key", "value", "expected"),
    [
        ("full_q8", "top_k", "abc", "a finite float"),
        ("full_q8", "top_k", "nan", "a finite float"),
        ("lora", "r", "1.5", "an int or none"),
        ("prompt", "num_virtual_tokens", "none", "an int"),  # not optional: none is no value here
        ("head", "gradient_checkpointing", "maybe", "a bool (true/false, 1/0, yes/no)"),
        ("lora", "target_modules", "query,,value", "comma-separated names"),
    ],
)
def test_a_bad_value_names_key_value_and_type(name: str, key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"option {key}={value!r}: expected {expected}")):
        strategy_from_options(name, {key: value})


@pytest.mark.parametrize(
    ("name", "options", "key", "reason"),
    [
        ("full_q8", {"top_k": "0"}, "top_k=0", "fraction in (0, 1]"),
        ("full_q8", {"top_k": "0.5", "base_precision": "int8"}, "base_precision=int8", "base must be fp32"),
        ("lora", {"r": "0"}, "r=0", "r must be >= 1"),
        ("lora", {"target_modules": ""}, "target_modules=", "at least one module"),
        ("prompt", {"init": "TEXT"}, "init=TEXT", "needs a non-empty init_text"),
        ("head", {"base_precision": "fp8"}, "base_precision=fp8", "base_precision must be one of"),
    ],
)
def test_the_configs_own_validation_names_the_key(name: str, options: dict[str, str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"option {key}: ")) as caught:
        strategy_from_options(name, options)
    assert reason in str(caught.value)


def test_auto_and_unknown_strategies_are_refused() -> None:
    with pytest.raises(ConfigError, match="need a named strategy, not 'auto'"):
        strategy_from_options("auto", {"top_k": "0.1"})
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        strategy_from_options("nope", {})


# -- the command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "auto", "--strategy-option", "top_k=0.1"], "not 'auto'"),
        (["--strategy", "lora", "--runtime", "ort", "--strategy-option", "r=4"], "pass --runtime torch"),
        (["--strategy", "lora", "--ort-artifacts", "x", "--strategy-option", "r=4"], "pass --runtime torch"),
        (["--strategy", "full_q8", "--strategy-option", "top_k"], "takes KEY=VALUE"),
        (["--strategy", "full_q8", "--strategy-option", "top_k=0.1", "--strategy-option", "top_k=0.2"], "twice"),
        (["--strategy", "full_q8", "--strategy-option", "topk=0.1"], "did you mean 'top_k'"),
        (["--strategy", "full_q8", "--strategy-option", "top_k=2"], "option top_k=2: top_k must be a fraction"),
    ],
)
def test_run_reports_bad_options_as_one_error_line(
    argv: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused before any data, weight or broker is touched (the broker here does not exist)."""
    with caplog.at_level(logging.ERROR, logger="ffm.edge.cli"):
        assert main(["run", "--broker", "mqtt://127.0.0.1:1", "--task", "digits", *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors


def test_run_help_names_an_example_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for example in ("--strategy-option KEY=VALUE", "top_k=0.01", "r=16", "num_virtual_tokens=8", "base_precision=int8"):
        assert example in text
    assert "ffm-edge strategies" in text
    assert build_parser().parse_args(["run"]).strategy_option is None


def test_the_listing_shows_every_strategy_and_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_strategy_options().strip()
    for name in STRATEGIES:
        assert re.search(rf"^{name} \(capability \d\): ", out, re.MULTILINE), name
        for field in strategy_option_fields(name):
            assert field.name in out and field.help in out
    top_k = next(line for line in out.splitlines() if line.strip().startswith("top_k"))
    assert "float" in top_k and "default 1.0" in top_k
    assert "tuple[str, ...] | None" in out and "default none" in out


# -- end to end: the real CLI against a real hub -------------------------------------------------------------
TOP_K = 0.05
SENTENCES = ["a wonderful, moving film", "a dull, lifeless mess", "superb acting", "awful pacing"] * 2


@pytest.mark.slow
def test_cli_run_with_top_k_sends_one_sparse_update(
    tmp_path: Path, mqtt_broker: ManagedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    from ffm_edge.data import get_task
    from ffm_edge.spec import load_model_spec
    from ffm_edge.trainer import TorchTrainer
    from ffm_edge.transport import MqttTransport
    from ffm_edge.wire import decode_update, unpack_envelope
    from ffm_hub.hub import Hub, HubSettings
    from ffm_hub.store import SqliteStore

    # a short-sequence copy of the bundled spec (same model, same tensor names) and a tiny SST-2 shard
    bundled = Path(load_model_spec("minilm-l6-v2").source)
    spec_path = tmp_path / "minilm-short.toml"
    spec_path.write_text(re.sub(r"(?m)^max_length = \d+", "max_length = 16", bundled.read_text(encoding="utf-8")))
    rows = ["sentence\tlabel", *(f"{s}\t{1 - i % 2}" for i, s in enumerate(SENTENCES))]  # positive, negative, ...
    glue = tmp_path / "data" / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    spec = load_model_spec(spec_path)
    initial = TorchTrainer(spec, get_task("sst2"), get_strategy("full_q8")).trainable_state()
    federation = "options-" + tmp_path.name[-8:]
    hub_transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"hub-{tmp_path.name}")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "hub")
    hub = Hub(
        HubSettings(federation=federation, model=spec.name, strategy="full_q8", tau=1),
        hub_transport,
        store,
        initial_state=lambda: initial,
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # `run` installs its own
    hub.start()
    try:
        argv = ["--no-progress", "--broker", mqtt_broker.url, "--federation", federation, "--device-id", "phone",
                "--model", str(spec_path), "--task", "sst2", "--data-dir", str(tmp_path / "data"), "--samples", "8",
                "--batch-size", "8", "--rounds", "1", "--state-dir", str(tmp_path / "phone"), "--codec", "int8",
                "--strategy", "full_q8", "--strategy-option", f"top_k={TOP_K}", "--strategy-option",
                "gradient_checkpointing=no", "--strategy-option", "optimizer_fallback=adamw"]  # fmt: skip
        with caplog.at_level(logging.INFO, logger="ffm.edge.cli"):
            assert main(["run", *argv]) == 0
        configs = [r.getMessage() for r in caplog.records if "strategy config" in r.getMessage()]
        assert len(configs) == 1 and f"'top_k': {TOP_K}" in configs[0] and "'optimizer_fallback': 'adamw'" in configs[0]
        assert hub.wait_for_version(1, timeout=60)
        assert hub.wait_idle(30)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        hub.stop()
        hub_transport.close()
    try:
        assert store.counts() == {"aggregated": 1}, "the hub accepted exactly one update"
        (update_file,) = (tmp_path / "hub" / "updates").glob("*.ffmu")
        frame = store.load_update(update_file.stem)
        payload = unpack_envelope(frame).payload
        (header_len,) = struct.unpack("<Q", payload[:8])
        metadata = json.loads(payload[8 : 8 + header_len])["__metadata__"]
        assert metadata["ffm_format"] == "2", "top_k < 1 travels as values + indices"
        meta, delta = decode_update(frame)
        assert meta.strategy == "full_q8" and meta.codec == "int8" and set(delta) == set(initial)
        dense_bytes = sum(value.size for value in delta.values())  # int8: one byte per weight
        assert dense_bytes > 22_000_000 and len(frame) < 0.25 * dense_bytes, (len(frame), dense_bytes)
        record = store.get_version(1)
        assert record is not None and record.parent == 0 and record.num_updates == 1
    finally:
        store.close()
