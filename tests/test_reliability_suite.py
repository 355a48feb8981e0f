"""The reliability suite's runner and table (ffm_hub.reliability.suite): scenarios run per broker, a
scenario that raises becomes a failed row, the command writes the table and JSON and fails on any
failed row. The scenarios themselves are tested in tests/test_reliability_*.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffm_hub.cli import main
from ffm_hub.reliability import Context, Outcome, Scenario, suite
from ffm_hub.reliability.suite import all_scenarios, render_markdown, run_suite


def counting(ctx: Context) -> list[Outcome]:
    assert ctx.workdir.is_dir()
    return [
        Outcome("counting", "valid control", ctx.broker, tried=5, accepted=5, expected_accepted=5),
        Outcome("counting", "NaN update", ctx.broker, tried=5, accepted=1, expected_accepted=0, detail="a|b"),
    ]


def broken(_ctx: Context) -> list[Outcome]:
    raise RuntimeError("the broker would not start")


def test_outcome_passes_only_when_accepted_as_expected_and_nothing_lost_or_doubled() -> None:
    assert Outcome("s", "c", "amqtt", 3, 3, 3).passed
    assert not Outcome("s", "c", "amqtt", 3, 2, 3).passed
    assert not Outcome("s", "c", "amqtt", 3, 3, 3, lost=1).passed
    assert not Outcome("s", "c", "amqtt", 3, 3, 3, duplicates=1).passed
    assert Outcome("s", "c", "amqtt", 3, 0, 0, passed=True).passed  # a metric criterion sets it itself


def test_run_suite_runs_each_scenario_on_its_brokers_and_turns_errors_into_failed_rows(tmp_path: Path) -> None:
    lines: list[str] = []
    scenarios = [Scenario("counting", "counts", counting, brokers=("amqtt",)), Scenario("broken", "raises", broken)]
    rows = run_suite(scenarios, ["amqtt"], tmp_path, say=lines.append)
    assert [(r.scenario, r.case, r.passed) for r in rows] == [
        ("counting", "valid control", True),
        ("counting", "NaN update", False),
        ("broken", "(scenario failed to run)", False),
    ]
    assert "RuntimeError: the broker would not start" in rows[2].detail
    assert any(line.startswith("broken on amqtt") for line in lines)
    table = render_markdown(rows)
    assert "| counting | NaN update | amqtt | 5 | 1 | 0 | 0 | 0 | **FAIL** |" in table
    assert "a\\|b" in table  # a pipe in a detail cannot break the table
    assert "3 rows, 1 passed, 2 failed; tried 10, accepted 6 (expected 5), lost 0" in table
    assert "| counting | amqtt | 2 | 10 | 6 | 5 | 0 | 0 | **1 FAILED** |" in table  # the summary line
    assert "| broken | amqtt | 1 | 0 | 0 | 0 | 0 | 0 | **1 FAILED** |" in table


def test_every_registered_scenario_has_a_unique_name_and_known_brokers() -> None:
    scenarios = all_scenarios()
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names)) and names
    assert all(s.brokers and set(s.brokers) <= {"mosquitto", "amqtt"} for s in scenarios)


def test_command_lists_and_refuses_unknown_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["reliability", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(s.name in listed for s in all_scenarios())
    assert main(["reliability", "--only", "no_such_thing", "--out", str(tmp_path / "r")]) == 2
    assert main(["reliability", "--brokers", "rabbitmq", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_command_writes_the_table_and_json_and_fails_on_a_failed_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(suite, "all_scenarios", lambda: [Scenario("counting", "counts", counting)])
    out = tmp_path / "results" / "reliability"
    assert main(["reliability", "--brokers", "amqtt", "--out", str(out)]) == 1  # the NaN row failed
    printed = capsys.readouterr().out
    assert "| counting | valid control | amqtt | 5 | 5 | 5 | 0 | 0 | pass |" in printed
    assert out.with_suffix(".md").read_text() in printed
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["brokers"] == ["amqtt"] and document["scenarios"] == ["counting"]
    assert [row["case"] for row in document["rows"]] == ["valid control", "NaN update"]
    assert document["rows"][1]["passed"] is False
