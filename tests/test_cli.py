"""The console scripts: helpful --help, and the demo as a user runs it (hub + 3 edge processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffm_edge.cli import build_parser as edge_parser
from ffm_hub.cli import build_parser as hub_parser


@pytest.mark.parametrize(
    ("parser", "argv", "expected"),
    [
        (hub_parser, ["--help"], ["serve", "status", "demo", "examples:"]),
        (hub_parser, ["serve", "--help"], ["--tau", "--server-lr", "--broker", "Mosquitto", "amqtt", "--config"]),
        (hub_parser, ["serve", "--help"], ["--metrics-port", "--max-staleness", "--keep-versions"]),
        (hub_parser, ["demo", "--help"], ["--clients", "--rounds", "FFM_DATA_DIR", "digits"]),
        (edge_parser, ["--help"], ["run", "profile", "examples:"]),
        (edge_parser, ["profile", "--help"], ["--budget", "--json", "bitsandbytes"]),
        (edge_parser, ["run", "--help"], ["--shard", "--codec", "zeroconf", "--alpha"]),
    ],
)
def test_help_explains(parser, argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, f"{word!r} missing from {' '.join(argv)}"


def test_bad_shard_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        edge_parser().parse_args(["run", "--shard", "3/3"])
    assert "--shard index must be in [0, 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_hub_and_three_edges_offline(tmp_path: Path) -> None:
    """The main job, as a user runs it, on the offline fallback data (digits + EfficientNet-Lite0)."""
    env = {k: v for k, v in os.environ.items() if k != "FFM_DATA_DIR"}
    cmd = [sys.executable, "-m", "ffm_hub.cli", "demo", "--clients", "3", "--rounds", "2", "--samples", "300",
           "--epochs", "1", "--eval-limit", "200", "--workdir", str(tmp_path), "--timeout", "400",
           "--downlink-codec", "int8"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "handwritten digits" in out.stdout  # it says plainly which data it chose
    assert "| version | accuracy |" in out.stdout
    result = json.loads((tmp_path / "demo.json").read_text())
    assert [row["version"] for row in result["rows"]] == [0, 1, 2]
    for row in result["rows"][1:]:
        assert row["devices"] == 3 and row["samples"] == 300 and row["bytes_up"] > 0 and row["bytes_down"] > 0
        # Clients pull the same tensors they send, both int8: down ~ up (an fp32 downlink is ~3.7x up).
        assert row["bytes_down"] < 1.2 * row["bytes_up"], row
    status = subprocess.run(
        [sys.executable, "-m", "ffm_hub.cli", "status", "--state-dir", str(tmp_path / "hub")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "'aggregated': 6" in status.stdout


def test_demo_checks_strategy_options_before_starting_anything() -> None:
    from ffm_edge.errors import ConfigError, FFMError
    from ffm_hub.demo import _check_strategy_options

    _check_strategy_options(("r=4", "alpha=8"), {"lora"})  # valid for every client's strategy: no error
    _check_strategy_options((), {"auto"})  # no options: nothing to check
    with pytest.raises(FFMError, match="--client-strategies"):
        _check_strategy_options(("r=4",), {"auto", "lora"})
    with pytest.raises(ConfigError, match="did you mean 'r'"):
        _check_strategy_options(("rr=4",), {"lora"})
    with pytest.raises(ConfigError, match="'prompt' has no option 'r'"):
        _check_strategy_options(("r=4",), {"lora", "prompt"})
    with pytest.raises(ConfigError, match="r is given twice"):  # refused here as each edge would refuse it
        _check_strategy_options(("r=4", "r=8"), {"lora"})
