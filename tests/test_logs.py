"""Structured logs: ``--log-format json`` / ``FFM_LOG_FORMAT=json`` give one parseable JSON object per line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ffm_edge.cli import build_parser as edge_parser
from ffm_edge.cli import main as edge_main
from ffm_edge.errors import ConfigError
from ffm_edge.logs import JsonFormatter, resolve_log_format, setup_logging
from ffm_hub.cli import build_parser as hub_parser
from ffm_hub.cli import main as hub_main


@pytest.fixture()
def bare_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Call it to get an unconfigured root logger, as a fresh process has.

    pytest puts its capture handlers on the root logger at the start of each test phase, which makes
    ``basicConfig`` (and so ``setup_logging``) a no-op; the handlers ``setup_logging`` adds instead
    are removed again afterwards.
    """
    monkeypatch.delenv("FFM_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    saved_level = root.level
    ffm = logging.getLogger("ffm")  # a tool run earlier in this process may have left its level set
    saved_ffm_level = ffm.level
    ffm.setLevel(logging.NOTSET)
    quiet = {name: logging.getLogger(name).level for name in ("transformers", "amqtt", "peft")}

    def clear() -> None:
        for handler in list(root.handlers):
            root.removeHandler(handler)  # pytest's: it removes them itself (a no-op) at the end of the phase

    yield clear
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(saved_level)
    ffm.setLevel(saved_ffm_level)
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_json_lines_carry_core_fields_and_extras(
    bare_root: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    bare_root()
    setup_logging(fmt="json")
    log = logging.getLogger("ffm.test.logs")
    log.info("update %s accepted", "u1", extra={"device": "edge-0", "queue": 3, "path": Path("/x/y")})
    log.debug("not shown: INFO level without --verbose")
    log.warning("plain")

    first, second = json_lines(capsys.readouterr().err)
    assert first["level"] == "INFO" and first["logger"] == "ffm.test.logs"
    assert first["message"] == "update u1 accepted"
    assert first["device"] == "edge-0" and first["queue"] == 3
    assert first["path"] == "/x/y"  # not JSON-serializable: its str(), not dropped
    ts = dt.datetime.fromisoformat(str(first["ts"]).replace("Z", "+00:00"))
    assert ts.utcoffset() == dt.timedelta(0) and str(first["ts"]).endswith("Z")
    assert abs((dt.datetime.now(dt.UTC) - ts).total_seconds()) < 60
    # The LogRecord's own attributes stay out: only the core fields and what extra= added.
    assert set(first) == {"ts", "level", "logger", "message", "device", "queue", "path"}
    assert set(second) == {"ts", "level", "logger", "message"} and second["level"] == "WARNING"


def test_an_exception_is_one_string_field_on_one_line(
    bare_root: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    bare_root()
    setup_logging(fmt="json")
    try:
        raise ZeroDivisionError("no samples")
    except ZeroDivisionError:
        logging.getLogger("ffm.test").exception("aggregation failed", extra={"round": 7})
    logging.getLogger("ffm.test").info("with a stack", stack_info=True)

    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2  # a multi-line traceback stays inside one JSON line
    failed, stacked = json_lines(err)
    assert failed["level"] == "ERROR" and failed["message"] == "aggregation failed" and failed["round"] == 7
    assert isinstance(failed["exc"], str)
    assert failed["exc"].startswith("Traceback") and "ZeroDivisionError: no samples" in failed["exc"]
    assert "exc" not in stacked and "test_logs.py" in str(stacked["stack"])


def test_extras_never_mask_the_core_fields() -> None:
    record = logging.LogRecord("ffm.x", logging.INFO, __file__, 1, "hello", None, None)
    record.level = "spoofed"
    record.ts = 0
    record._private = "skipped"
    payload = json.loads(JsonFormatter().format(record))
    assert payload["level"] == "INFO" and payload["extra_level"] == "spoofed"
    assert payload["extra_ts"] == 0 and "_private" not in payload


def test_text_is_the_default(bare_root: Callable[[], None], capsys: pytest.CaptureFixture[str]) -> None:
    bare_root()
    setup_logging()
    logging.getLogger("ffm.test").info("hello")
    line = capsys.readouterr().err.strip()
    assert line.endswith("INFO ffm.test: hello") and not line.startswith("{")


def test_env_var_selects_json_and_the_flag_wins(
    bare_root: Callable[[], None], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FFM_LOG_FORMAT", "JSON")  # case does not matter
    assert resolve_log_format() == "json"
    assert resolve_log_format("text") == "text"  # an explicit flag overrides the environment
    bare_root()
    setup_logging()
    logging.getLogger("ffm.test").info("from env")
    assert json_lines(capsys.readouterr().err)[0]["message"] == "from env"


@pytest.mark.parametrize("value", ["yaml", "jsonl", "1"])
def test_a_bad_env_value_is_a_clear_error(
    value: str, bare_root: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FFM_LOG_FORMAT", value)
    with pytest.raises(ConfigError, match=f"FFM_LOG_FORMAT must be one of text, json, got '{value}'"):
        setup_logging()
    with pytest.raises(ConfigError, match="--log-format must be one of"):
        setup_logging(fmt=value)
    assert resolve_log_format("text") == "text"  # the flag alone is fine whatever the environment says


@pytest.mark.parametrize("main", [hub_main, edge_main], ids=["ffm-hub", "ffm-edge"])
def test_the_clis_reject_a_bad_env_value_before_doing_anything(
    main: Callable[[list[str]], int],
    bare_root: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("FFM_LOG_FORMAT", "xml")
    argv = ["status", "--state-dir", str(tmp_path)] if main is hub_main else ["plan", "--model", "nowhere"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "FFM_LOG_FORMAT must be one of text, json, got 'xml'" in capsys.readouterr().err


@pytest.mark.parametrize("parser", [hub_parser, edge_parser], ids=["ffm-hub", "ffm-edge"])
def test_log_format_flag(parser: Callable[[], argparse.ArgumentParser], capsys: pytest.CaptureFixture[str]) -> None:
    command = "status" if parser is hub_parser else "profile"
    assert parser().parse_args(["--log-format", "json", command]).log_format == "json"
    assert parser().parse_args([command]).log_format is None  # None: $FFM_LOG_FORMAT decides
    with pytest.raises(SystemExit):
        parser().parse_args(["--log-format", "yaml", command])
    assert "invalid choice: 'yaml'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    assert "FFM_LOG_FORMAT" in capsys.readouterr().out


def test_hub_cli_logs_json(bare_root: Callable[[], None], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bare_root()
    assert hub_main(["--log-format", "json", "status", "--state-dir", str(tmp_path / "none")]) == 2
    (line,) = json_lines(capsys.readouterr().err)
    assert line["level"] == "ERROR" and line["logger"] == "ffm.hub.cli"
    assert "no hub store and no status snapshot" in str(line["message"])
