"""``ffm-hub experiment``: run a paper experiment grid (resumable) and write its tables and plots."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ffm_edge.errors import ConfigError

if TYPE_CHECKING:
    from ffm_hub.experiments.spec import ExperimentSpec

__all__ = ["DEFAULT_OUT", "add_arguments", "main", "run_from_args"]

#: Where results go unless --out-dir says otherwise (relative to the working directory).
DEFAULT_OUT = Path("benchmarks/results/paper")

DESCRIPTION = """\
Reproduce the paper's comparisons (centralized on the hub's public shard / FL over private shards / FFM =
both) through this project's own Hub and EdgeClient code. SPEC is a TOML grid (benchmarks/paper/table1.toml,
table2.toml, table3.toml): tasks × shots × seeds × methods over shared settings (model, strategy,
institutions, Dirichlet α, rounds, epochs, evaluation sizes).

Resumable: every finished run is written to OUT/runs/<sha256 of its full spec>.json and skipped on the next
invocation, so a table accumulates across invocations; stop with Ctrl-C at any time (the run in progress is
lost, finished ones are kept). After running, OUT/<name>.md (+ .json and PNG plots) is rewritten from all
cached runs: median [min–max] over seeds, best of n (the paper's statistic, labelled), and the paper's own
DistilBERT/RoBERTa/ResNet/ViT numbers in reference rows.

Data: the task's train split from --data-dir / $FFM_DATA_DIR; per seed, a public k-shot shard (k per class,
IID) and C·k per class more examples split over the C institutions with label-skew Dirichlet(α). The same
seed gives the same shards to all three methods.
"""

EPILOG = """\
examples:
  FFM_DATA_DIR=/data ffm-hub experiment benchmarks/paper/table1.toml --tasks sst2 --seeds 13 --dry-run
  FFM_DATA_DIR=/data nice -n 10 ffm-hub experiment benchmarks/paper/table1.toml --tasks sst2,mrpc --budget-min 60
  ffm-hub experiment benchmarks/paper/table1.toml --report-only        # tables from the cached runs
  ffm-hub experiment benchmarks/paper/broker_check.toml --transport mqtt   # the same runs over Mosquitto
"""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment flags (shared by ``ffm-hub experiment`` and ``benchmarks/paper/run.py``)."""
    parser.add_argument("spec", type=Path, help="experiment TOML (benchmarks/paper/*.toml)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="results folder (runs/ + tables)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $FFM_DATA_DIR)")
    parser.add_argument("--tasks", type=_csv, default=None, help="only these tasks (comma-separated)")
    parser.add_argument("--methods", type=_csv, default=None, help="only these methods: centralized,fl,ffm")
    parser.add_argument("--seeds", type=_ints, default=None, help="only these seeds (comma-separated)")
    parser.add_argument("--shots", type=_ints, default=None, help="only these k (comma-separated)")
    parser.add_argument(
        "--variants",
        type=_csv,
        default=None,
        help="only these row groups: 'main' (the spec's own grid) and/or [[variants]] names, e.g. smollm2",
    )
    parser.add_argument(
        "--transport",
        choices=("memory", "mqtt"),
        default="memory",
        help="in-process broker, or a managed Mosquitto (the real-broker check)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a shared run setting, e.g. --set rounds=2 (changes the cache keys)",
    )
    parser.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="start no new run after this many minutes (finished runs are kept)",
    )
    parser.add_argument("--max-runs", type=int, default=None, help="run at most this many uncached runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is cached")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables and plots")
    parser.add_argument("--keep-going", action="store_true", help="log a failed run and go on with the next")


def _parse_override(text: str) -> tuple[str, object]:
    import tomllib

    if "=" not in text:
        raise ConfigError(f"--set takes FIELD=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return name.strip(), value


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or list, or report) the grid the arguments select."""
    ffm_logger = logging.getLogger("ffm")
    level = ffm_logger.level
    if not getattr(args, "verbose", False):
        ffm_logger.setLevel(logging.WARNING)  # the hub logs every update at INFO
    try:
        return _run(args)
    finally:
        ffm_logger.setLevel(level)  # a caller in the same process (a test, a notebook) keeps its logging


def _run(args: argparse.Namespace) -> int:
    from ffm_hub.experiments.runner import load_result, run_many
    from ffm_hub.experiments.spec import load_experiment

    experiment = load_experiment(args.spec)
    if args.overrides:
        experiment = experiment.with_run(**dict(_parse_override(o) for o in args.overrides))
    specs = list(
        experiment.runs(
            tasks=args.tasks,
            methods=args.methods,
            seeds=args.seeds,
            shots=args.shots,
            transport=args.transport,
            variants=args.variants,
        )
    )
    if not specs:
        raise ConfigError("the filters select no run")
    if args.dry_run:
        for spec in specs:
            state = "cached" if load_result(args.out_dir, spec) is not None else "to run"
            print(f"{spec.key[:12]}  {state:7s}  {spec.label()}")
        return 0
    if not args.report_only:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        budget = None if args.budget_min is None else args.budget_min * 60
        try:
            run_many(
                specs,
                args.out_dir,
                data_dir=args.data_dir,
                budget_s=budget,
                max_runs=args.max_runs,
                say=_say,
                keep_going=args.keep_going,
            )
        finally:
            _report(experiment, args.out_dir, args.transport, args.spec)
    else:
        _report(experiment, args.out_dir, args.transport, args.spec)
    return 0


def _sibling_experiments(spec_path: Path, experiment: ExperimentSpec) -> list[ExperimentSpec]:
    """The experiment and the other valid specs in its folder: the tables a real-broker run may belong to."""
    from ffm_hub.experiments.spec import load_experiment

    found = [experiment]
    for path in sorted(spec_path.parent.glob("*.toml")):
        try:
            other = load_experiment(path)
        except ConfigError:
            continue
        if other.name != experiment.name:
            found.append(other)
    return found


def _report(experiment: ExperimentSpec, out_dir: Path, transport: str, spec_path: Path) -> None:
    from ffm_hub.experiments.report import broker_check, write_report

    markdown = write_report(experiment, out_dir, transport=transport)
    print(markdown)
    if transport == "mqtt":
        print(broker_check(out_dir, _sibling_experiments(spec_path, experiment)))
    stem = experiment.name if transport == "memory" else f"{experiment.name}-{transport}"
    _say(f"wrote {Path(out_dir) / stem}.md")


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m ffm_hub.experiments`` / ``benchmarks/paper/run.py``)."""
    from ffm_edge.errors import FFMError
    from ffm_edge.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="ffm-experiment",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (every hub message)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run_from_args(args)
    except FFMError as exc:
        logging.getLogger("ffm.experiment").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
