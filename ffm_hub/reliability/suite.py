"""Run the reliability scenarios and render the figures table (``ffm-hub reliability``).

Every scenario runs on every broker it supports; a scenario that raises becomes a failed row that says
why, and the suite goes on, so one broken case never hides the others' figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ffm_edge.errors import ConfigError
from ffm_hub.brokers import find_mosquitto
from ffm_hub.reliability.outcome import BROKERS, Context, Outcome, Scenario

__all__ = [
    "DESCRIPTION",
    "EPILOG",
    "add_arguments",
    "all_scenarios",
    "render_markdown",
    "render_summary",
    "run_from_args",
    "run_suite",
]

#: Modules that define ``SCENARIOS``, in the order their rows appear.
SCENARIO_MODULES = (
    "ffm_hub.reliability.fault_scenarios",
    "ffm_hub.reliability.bad_inputs",
    "ffm_hub.reliability.attacks",
)

DESCRIPTION = """\
Attack and break a real hub on real brokers, and count what happened: updates tried, accepted by the hub
(its durable store, not a PUBACK), lost (accepted but never aggregated) and aggregated twice.

Scenarios: connection resets during chunked uploads (20 clients x 10 rounds), a broker restart in the
middle of a large upload, kill -9 of the edge and of the hub at four points, every kind of bad input
(NaN, Inf, wrong shape/dtype/keys, norm over the bound, stale, replayed, bad signature, unknown device,
oversized), broker access control (anonymous, wrong password, another device's topics), and poisoning
by 2 of 10 devices against FedAvg, median and trimmed mean on a real model.

Each runs on Mosquitto (when installed) and on the in-process amqtt broker. The table is printed and
written to OUT.md and OUT.json; the exit status is 1 when any row failed."""

EPILOG = """\
examples:
  ffm-hub reliability                                   # everything, both brokers (several minutes)
  ffm-hub reliability --only bad_inputs,access_control  # the validation and ACL rows
  ffm-hub reliability --brokers amqtt --out /tmp/rel    # the zero-install broker only
  ffm-hub reliability --list"""


def all_scenarios() -> list[Scenario]:
    """Every registered scenario, in table order."""
    found: list[Scenario] = []
    for name in SCENARIO_MODULES:
        found.extend(importlib.import_module(name).SCENARIOS)
    return found


def _failed_row(scenario: Scenario, broker: str, exc: BaseException, seconds: float) -> Outcome:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return Outcome(scenario.name, "(scenario failed to run)", broker, 0, 0, 0, seconds=seconds, detail=last[:300],
                   passed=False)  # fmt: skip


def run_suite(
    scenarios: Sequence[Scenario],
    brokers: Sequence[str],
    workdir: Path,
    *,
    seed: int = 0,
    say: Callable[[str], None] = lambda _line: None,
) -> list[Outcome]:
    """Run each scenario on each of ``brokers`` it supports; Mosquitto rows are skipped (and said so) when
    the binary is missing."""
    rows: list[Outcome] = []
    for scenario in scenarios:
        for broker in (b for b in brokers if b in scenario.brokers):
            if broker == "mosquitto" and find_mosquitto() is None:
                say(f"skip {scenario.name} on mosquitto: not installed (apt-get install mosquitto)")
                continue
            say(f"{scenario.name} on {broker}: {scenario.title}")
            folder = workdir / f"{scenario.name}-{broker}"
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            try:
                got = scenario.run(Context(broker, folder, seed=seed, say=lambda line: say(f"  {line}")))
            except Exception as exc:  # a broken scenario is a failed row, not a crashed suite
                got = [_failed_row(scenario, broker, exc, time.perf_counter() - started)]
            for row in got:
                say(f"  {'ok  ' if row.passed else 'FAIL'} {row.case}: tried {row.tried}, accepted {row.accepted}, "
                    f"lost {row.lost}, duplicates {row.duplicates}")  # fmt: skip
            rows.extend(got)
    return rows


def _cell(row: Outcome) -> list[str]:
    return [
        row.scenario,
        row.case,
        row.broker,
        str(row.tried),
        str(row.accepted),
        str(row.expected_accepted),
        str(row.lost),
        str(row.duplicates),
        "pass" if row.passed else "**FAIL**",
        f"{row.seconds:.1f}",
        row.detail.replace("|", "\\|"),
    ]


def render_summary(rows: Sequence[Outcome]) -> str:
    """One line per scenario and broker: the figures the README quotes."""
    header = ["scenario", "broker", "cases", "tried", "accepted", "expected", "lost", "dup.", "result"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * 6 + "---|"]
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for row in rows:
        groups.setdefault((row.scenario, row.broker), []).append(row)
    for (scenario, broker), group in groups.items():
        failed = sum(not r.passed for r in group)
        figures = [len(group), *(sum(getattr(r, f) for r in group) for f in _COUNTS)]
        result = "pass" if not failed else f"**{failed} FAILED**"
        lines.append("| " + " | ".join([scenario, broker, *map(str, figures), result]) + " |")
    return "\n".join(lines) + "\n"


_COUNTS = ("tried", "accepted", "expected_accepted", "lost", "duplicates")


def render_markdown(rows: Sequence[Outcome]) -> str:
    """The summary per scenario and broker, then every case, then the totals.

    "tried" counts what a scenario attempted (updates, logins, forbidden publishes and subscriptions);
    "accepted" what the hub took or the broker let through, counted where it arrived."""
    header = ["scenario", "case", "broker", "tried", "accepted", "expected", "lost", "dup.", "result", "s", "detail"]
    lines = [render_summary(rows), "Every case:", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * 5 + "---|---:|---|"]
    lines += ["| " + " | ".join(_cell(row)) + " |" for row in rows]
    failed = [r for r in rows if not r.passed]
    lines += [
        "",
        f"{len(rows)} rows, {len(rows) - len(failed)} passed, {len(failed)} failed; tried "
        f"{sum(r.tried for r in rows)}, accepted {sum(r.accepted for r in rows)} (expected "
        f"{sum(r.expected_accepted for r in rows)}), lost {sum(r.lost for r in rows)}, "
        f"aggregated twice {sum(r.duplicates for r in rows)}.",
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=None, help="only these scenarios (comma-separated names; see --list)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="brokers to run on: mosquitto,amqtt")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability"),
                        help="write OUT.md (the table) and OUT.json (every row)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random faults and data")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")


def run_from_args(args: argparse.Namespace) -> int:
    scenarios = all_scenarios()
    if args.list:
        for scenario in scenarios:
            print(f"{scenario.name:16} {'/'.join(scenario.brokers):18} {scenario.title}")
        return 0
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {s.name for s in scenarios})
        if unknown:
            raise ConfigError(f"unknown scenario(s) {unknown}; known: {[s.name for s in scenarios]}")
        scenarios = [s for s in scenarios if s.name in wanted]
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    bad = sorted(set(brokers) - set(BROKERS))
    if bad or not brokers:
        raise ConfigError(f"--brokers takes {', '.join(BROKERS)}; got {args.brokers!r}")
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".log")
    with tempfile.TemporaryDirectory(prefix="ffm-reliability-") as scratch, _logging_to(log_path, args.verbose):
        if not args.verbose:
            print(f"logs (every rejection and reconnect the scenarios provoke): {log_path}", flush=True)
        workdir = args.workdir or Path(scratch)
        rows = run_suite(scenarios, brokers, workdir, seed=args.seed, say=lambda line: print(line, flush=True))
    table = render_markdown(rows)
    print()
    print(table)
    document: dict[str, Any] = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "brokers": brokers,
        "scenarios": [s.name for s in scenarios],
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count() or 0},
        "rows": [row.to_dict() for row in rows],
    }
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')} ({document['wall_s']} s)")
    return 0 if all(row.passed for row in rows) else 1


@contextlib.contextmanager
def _logging_to(path: Path, verbose: bool) -> Iterator[None]:
    """The scenarios provoke hundreds of warnings on purpose (rejections, refused logins, reconnects):
    send the log to ``path`` so the console shows progress and the table (``-v``: both, on the console)."""
    if verbose:
        yield
        return
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()
