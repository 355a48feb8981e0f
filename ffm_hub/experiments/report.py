"""Tables and plots from the cached runs: laid out like the paper's, with its numbers alongside.

Each cell is the final dev-set metric over the seeds done so far: median [min–max], and the best of the
n seeds (the paper's Tables 1 and 2 statistic), labelled as such. The paper's figures sit in their own rows,
labelled with the paper's model (DistilBERT, RoBERTa, ResNet-50, ViT): they are references, not ours.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffm_edge.data import get_task
from ffm_hub.experiments import paper
from ffm_hub.experiments.runner import load_result, metrics_for
from ffm_hub.experiments.spec import MAIN, ExperimentSpec, RunSpec

__all__ = [
    "Cell",
    "Grid",
    "Source",
    "broker_check",
    "collect",
    "paired_comparisons",
    "render_markdown",
    "sign_test_p",
    "write_report",
]

TASK_LABELS = {
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "mnli": "MNLI",
    "qqp": "QQP",
    "qnli": "QNLI",
    "cola": "CoLA",
    "rte": "RTE",
    "stsb": "STS-B",
    "cifar10": "CIFAR-10",
    "digits": "digits",
}
METHOD_LABELS = {"centralized": "Centralize", "fl": "FL", "ffm": "FFM"}
METRIC_LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "f1": "F1",
    "matthews": "Matthews",
    "pearson": "Pearson",
    "spearman": "Spearman",
}


@dataclass
class Cell:
    """The runs of one (task, k, method): one result per seed done."""

    task: str
    k: int
    method: str
    seeds: tuple[int, ...]
    results: dict[int, dict[str, Any]] = field(default_factory=dict)

    def values(self, metric: str) -> list[float]:
        return [float(r["final"][metric]) for _, r in sorted(self.results.items()) if metric in r["final"]]

    def stats(self, metric: str) -> dict[str, Any] | None:
        values = self.values(metric)
        if not values:
            return None
        return {
            "n": len(values),
            "of": len(self.seeds),
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "best": max(values),
            "values": values,
        }

    def mean_seconds(self) -> float | None:
        times = [float(r["timing"]["total_s"]) for r in self.results.values()]
        return sum(times) / len(times) if times else None


@dataclass
class Source:
    """One block of "ours" rows: the experiment's own grid or one of its variants."""

    name: str
    label: str
    experiment: ExperimentSpec
    note: str = ""


@dataclass
class Grid:
    experiment: ExperimentSpec
    transport: str
    cells: dict[tuple[str, str, int, str], Cell]
    expected: int
    done: int
    sources: list[Source] = field(default_factory=list)

    def cell(self, task: str, k: int, method: str, variant: str = MAIN) -> Cell | None:
        return self.cells.get((variant, get_task(task).name, k, method))


def collect(experiment: ExperimentSpec, out_dir: str | Path, *, transport: str = "memory") -> Grid:
    """Every run of the grid and of its variants, with its cached result, if any."""
    cells: dict[tuple[str, str, int, str], Cell] = {}
    keys: set[str] = set()
    found: set[str] = set()
    sources = []
    for name, sub in experiment.grids():
        variant = experiment.variant(name)
        label = (variant.label if variant else "") or _model_label(sub)
        sources.append(Source(name, label, sub, variant.note if variant else ""))
        for spec in sub.runs(transport=transport):
            keys.add(spec.key)
            key = (name, spec.task, spec.k_private, spec.method)
            cell = cells.setdefault(key, Cell(spec.task, spec.k_private, spec.method, sub.seeds))
            result = load_result(out_dir, spec)
            if result is not None:
                cell.results[spec.seed] = result
                found.add(spec.key)
    return Grid(experiment, transport, cells, len(keys), len(found), sources)


# -- formatting ---------------------------------------------------------------------------------------------
def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}"


def fmt_range(stats: Mapping[str, Any] | None) -> str:
    """``median [min–max]`` in %, with ``(n=3/5)`` while seeds are missing."""
    if stats is None:
        return "—"
    text = f"{_pct(stats['median'])} [{_pct(stats['min'])}–{_pct(stats['max'])}]"
    if stats["n"] == 1:
        text = f"{_pct(stats['median'])}"
    if stats["n"] < stats["of"]:
        text += f" (n={stats['n']}/{stats['of']})"
    return text


def fmt_best(stats: Mapping[str, Any] | None) -> str:
    if stats is None:
        return "—"
    return f"{_pct(stats['best'], 2)}" + (f" (of {stats['n']})" if stats["n"] < stats["of"] else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "|".join(["---"] * len(header))
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _model_label(experiment: ExperimentSpec) -> str:
    model = experiment.run.get("model", "minilm-l6-v2")
    strategy = experiment.run.get("strategy", "lora")
    names = {
        "minilm-l6-v2": "all-MiniLM-L6-v2",
        "efficientnet-lite0": "EfficientNet-Lite0",
        "smollm2-135m": "SmolLM2-135M",
    }
    return f"{names.get(model, model)} {strategy}"


def _variant_notes(grid: Grid) -> list[str]:
    """One line per variant: its label, seeds, tasks and the settings it changes."""
    lines = []
    for src in grid.sources[1:]:
        variant = grid.experiment.variant(src.name)
        changed = ", ".join(f"{k}={v}" for k, v in sorted(variant.run.items())) if variant else ""
        tasks = ", ".join(TASK_LABELS.get(t, t) for t in src.experiment.tasks)
        text = f"- **{src.label}** (`{src.name}`): tasks {tasks}; seeds {list(src.experiment.seeds)}"
        if changed:
            text += f"; changes {changed}"
        if src.note:
            text += f". {src.note}"
        lines.append(text)
    return ["Rows with other settings:", "", *lines, ""] if lines else []


def _settings_line(experiment: ExperimentSpec) -> str:
    first = next(experiment.runs())
    d = first.to_dict()
    shown = {
        k: d[k]
        for k in (
            "model",
            "strategy",
            "institutions",
            "alpha",
            "rounds",
            "local_epochs",
            "central_epochs",
            "centralized_epochs",
            "ffm_order",
            "eval_limit",
            "curve_eval_limit",
            "learning_rate",
            "batch_size",
            "codec",
        )
    }
    shots = ", ".join(str(k) for k in experiment.shots)
    public = f"k_public={d['k_public']}" if "k_public" in experiment.run else "k_public = k"
    return f"k ∈ {{{shots}}} per class ({public}), seeds {list(experiment.seeds)}; " + ", ".join(
        f"{k}={v}" for k, v in shown.items()
    )


def _header(grid: Grid) -> list[str]:
    exp = grid.experiment
    lines = [f"# {exp.title or exp.name}", ""]
    if exp.description:
        lines += [exp.description.strip(), ""]
    lines += [
        f"Ours: **{_model_label(exp)}**, run through the project's hub and edge code "
        f"(`ffm-hub experiment`, transport `{grid.transport}`). Settings: {_settings_line(exp)}.",
        "",
        f"Runs done: **{grid.done} of {grid.expected}**. Cells: the final dev metric in %, "
        '**median [min–max] over the seeds done**; "best of n" is the maximum over those seeds, the '
        "statistic the paper reports for Tables 1 and 2. Paper rows are the paper's own numbers on its "
        "own models, for reference only.",
        "",
    ]
    return lines


def _table1(grid: Grid) -> list[str]:
    exp = grid.experiment
    tasks = list(exp.tasks)
    k = exp.shots[0]
    header = ["Model", "Method", *(TASK_LABELS.get(get_task(t).name, t) for t in tasks)]
    rows = []
    for src in grid.sources:
        for stat, fmt in (("median [min–max]", fmt_range), ("best of n", fmt_best)):
            for method in src.experiment.methods:
                row = [f"{src.label} (ours, {stat})", METHOD_LABELS[method]]
                for t in tasks:
                    cell = grid.cell(t, k, method, src.name)
                    row.append(fmt(cell.stats(metrics_for(t)[0]) if cell else None))
                rows.append(row)
    for model, by_method in paper.TABLE1.items():
        for method in exp.methods:
            values = by_method.get(method, {})
            row = [f"{model} (paper, best of 5)", METHOD_LABELS[method]]
            row += [f"{values[get_task(t).name]:.2f}" if get_task(t).name in values else "—" for t in tasks]
            rows.append(row)
    lines = [f"## Paper layout ({k}-shot)", "", *_table(header, rows), "", *_variant_notes(grid)]
    lines += [
        "Primary metric per task: "
        + ", ".join(f"{TASK_LABELS.get(get_task(t).name, t)} {metrics_for(t)[0]}" for t in tasks)
        + ".",
        "",
        "## Every metric, per task",
        "",
    ]
    detail = []
    combos = [
        (src, task, metric, method)
        for src in grid.sources
        for task in tasks
        for metric in metrics_for(task)
        for method in src.experiment.methods
    ]
    for src, t, metric, method in combos:
        cell = grid.cell(t, k, method, src.name)
        if cell is None:
            continue
        stats = cell.stats(metric)
        ref = [
            f"{paper.TABLE1[m][method].get(get_task(t).name, float('nan')):.2f}" if metric == metrics_for(t)[0] else ""
            for m in paper.TABLE1
        ]
        seconds = cell.mean_seconds()
        detail.append(
            [
                src.label,
                TASK_LABELS.get(get_task(t).name, t),
                METRIC_LABELS.get(metric, metric),
                METHOD_LABELS[method],
                str(stats["n"] if stats else 0),
                fmt_range(stats),
                fmt_best(stats),
                *ref,
                "—" if seconds is None else f"{seconds:.0f}",
            ]
        )
    lines += _table(
        [
            "rows",
            "task",
            "metric",
            "method",
            "seeds",
            "ours median [min–max]",
            "ours best of n",
            *(f"paper {m} (best of 5)" for m in paper.TABLE1),
            "mean s/run",
        ],
        detail,
    )
    return lines


def _table2(grid: Grid) -> list[str]:
    exp = grid.experiment
    lines = ["## Paper layout (k-shot sweep)", ""]
    header = ["Dataset", "Method", "Source", *(f"{k}-shot" for k in exp.shots)]
    rows = []
    for t in exp.tasks:
        name = get_task(t).name
        metric = metrics_for(t)[0]
        for method in exp.methods:
            base = [TASK_LABELS.get(name, t), METHOD_LABELS[method]]
            for src in grid.sources:
                cells = [grid.cell(t, k, method, src.name) for k in exp.shots]
                if not any(cells):
                    continue
                stats = [c.stats(metric) if c else None for c in cells]
                rows.append([*base, f"{src.label} (ours, median [min–max])", *(fmt_range(s) for s in stats)])
                rows.append([*base, f"{src.label} (ours, best of n)", *(fmt_best(s) for s in stats)])
            ref = paper.TABLE2.get(name, {}).get(method, {})
            rows.append(
                [*base, "DistilBERT (paper, best of 5)", *(f"{ref[k]:.2f}" if k in ref else "—" for k in exp.shots)]
            )
    lines += _table(header, rows)
    lines += ["", *_variant_notes(grid)]
    lines += [
        "Primary metric: "
        + ", ".join(f"{TASK_LABELS.get(get_task(t).name, t)} {metrics_for(t)[0]}" for t in exp.tasks)
        + ".",
    ]
    return lines


def _table3(grid: Grid) -> list[str]:
    exp = grid.experiment
    k = exp.shots[0]
    lines = [f"## Paper layout ({k}-shot)", ""]
    header = ["Model", "Method"]
    for t in exp.tasks:
        header += [f"{TASK_LABELS.get(get_task(t).name, t)} accuracy", f"{TASK_LABELS.get(get_task(t).name, t)} F1"]
    rows = []
    for src in grid.sources:
        for stat, fmt in (("median [min–max]", fmt_range), ("best of n", fmt_best)):
            for method in src.experiment.methods:
                row = [f"{src.label} (ours, {stat})", METHOD_LABELS[method]]
                for t in exp.tasks:
                    cell = grid.cell(t, k, method, src.name)
                    for metric in ("accuracy", "macro_f1"):
                        row.append(fmt(cell.stats(metric) if cell else None))
                rows.append(row)
    for model, by_task in paper.TABLE3.items():
        for method in exp.methods:
            row = [f"{model} (paper, median of 5)", METHOD_LABELS[method]]
            for t in exp.tasks:
                ref = by_task.get(get_task(t).name, {}).get(method)
                row += [f"{ref[0]:.2f}", f"{ref[1]:.2f}"] if ref else ["—", "—"]
            rows.append(row)
    lines += _table(header, rows)
    lines += ["", *_variant_notes(grid)]
    lines += [
        "Ours: F1 is macro-F1 over the classes. The paper's Table 3 statistic is the median of five "
        "runs, the same as our median column.",
    ]
    return lines


def _curve_note(grid: Grid) -> list[str]:
    lines = ["", "## Wall time per run (s, mean over the seeds done)", ""]
    labels = {src.name: src.label for src in grid.sources}
    rows = []
    total = 0.0
    for (variant, task, k, method), cell in sorted(grid.cells.items()):
        seconds = cell.mean_seconds()
        if seconds is not None:
            total += seconds * len(cell.results)
            rows.append(
                [
                    labels[variant],
                    TASK_LABELS.get(task, task),
                    str(k),
                    METHOD_LABELS[method],
                    str(len(cell.results)),
                    f"{seconds:.0f}",
                ]
            )
    if not rows:
        return []
    return [
        *lines,
        *_table(["rows", "task", "k", "method", "runs", "s/run"], rows),
        "",
        f"Sum of the runs' wall times: **{total / 3600:.2f} h** (one process; runs may have shared the 2 cores).",
    ]


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): how often a fair coin splits at least this unevenly."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparisons(grid: Grid) -> list[dict[str, Any]]:
    """FFM against FL and against centralized, seed by seed (a seed fixes the data splits of all three).

    A difference is called "within noise" unless FFM is ahead (or behind) on every one of at least three
    common seeds; the sign-test p-value is given too (with 5 seeds its smallest value is 0.0625).
    """
    out = []
    for src in grid.sources:
        exp = src.experiment
        if "ffm" not in exp.methods:
            continue
        for t in exp.tasks:
            metric = metrics_for(t)[0]
            for k in exp.shots:
                ffm = grid.cell(t, k, "ffm", src.name)
                for other in ("fl", "centralized"):
                    cell = grid.cell(t, k, other, src.name)
                    if ffm is None or cell is None:
                        continue
                    common = sorted(set(ffm.results) & set(cell.results))
                    if not common:
                        continue
                    deltas = [
                        float(ffm.results[s]["final"][metric]) - float(cell.results[s]["final"][metric]) for s in common
                    ]
                    wins = sum(d > 0 for d in deltas)
                    losses = sum(d < 0 for d in deltas)
                    if len(deltas) < 3:
                        verdict = f"{len(deltas)} seed(s): no verdict"
                    elif wins == len(deltas):
                        verdict = "FFM higher on every seed"
                    elif losses == len(deltas):
                        verdict = "FFM lower on every seed"
                    else:
                        verdict = "within noise"
                    out.append(
                        {
                            "variant": src.name,
                            "task": get_task(t).name,
                            "k": k,
                            "metric": metric,
                            "versus": other,
                            "seeds": common,
                            "ffm_wins": wins,
                            "ffm_losses": losses,
                            "median_delta": statistics.median(deltas),
                            "sign_test_p": sign_test_p(wins, losses),
                            "verdict": verdict,
                        }
                    )
    return out


def _paired_note(grid: Grid) -> list[str]:
    pairs = paired_comparisons(grid)
    if not pairs:
        return []
    labels = {src.name: src.label for src in grid.sources}
    rows = [
        [
            labels[p["variant"]],
            TASK_LABELS.get(p["task"], p["task"]),
            str(p["k"]),
            f"FFM − {METHOD_LABELS[p['versus']]}",
            f"{p['ffm_wins']}/{len(p['seeds'])}",
            f"{100 * p['median_delta']:+.1f}",
            f"{p['sign_test_p']:.2f}",
            p["verdict"],
        ]
        for p in pairs
    ]
    return [
        "",
        "## Is the difference more than noise? (paired by seed)",
        "",
        "A seed fixes the data splits, so the methods are compared seed by seed: how many seeds FFM wins, the "
        "median paired difference in points, and the two-sided sign test. Anything short of FFM ahead (or "
        "behind) on every seed is called within noise; even 5 of 5 has p = 0.06.",
        "",
        *_table(["rows", "task", "k", "comparison", "FFM wins", "median Δ (pts)", "sign test p", "verdict"], rows),
    ]


def render_markdown(grid: Grid, plots: Sequence[str] = ()) -> str:
    """The report of one experiment grid."""
    layout = {"table1": _table1, "table2": _table2, "table3": _table3}[grid.experiment.layout]
    lines = _header(grid) + layout(grid) + _paired_note(grid) + _curve_note(grid)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def summary(grid: Grid) -> dict[str, Any]:
    """The report's numbers as JSON."""
    cells = []
    for (variant, task, k, method), cell in sorted(grid.cells.items()):
        cells.append(
            {
                "variant": variant,
                "task": task,
                "k": k,
                "method": method,
                "seeds_done": sorted(cell.results),
                "keys": {str(seed): r["key"] for seed, r in sorted(cell.results.items())},
                "metrics": {m: cell.stats(m) for m in metrics_for(task)},
            }
        )
    return {
        "experiment": grid.experiment.name,
        "transport": grid.transport,
        "runs_expected": grid.expected,
        "runs_done": grid.done,
        "cells": cells,
        "paired": paired_comparisons(grid),
    }


# -- plots --------------------------------------------------------------------------------------------------
_COLORS = {"centralized": "tab:gray", "fl": "tab:blue", "ffm": "tab:red"}


def _curve_xy(result: Mapping[str, Any], metric: str) -> tuple[list[float], list[float]]:
    curve = [p for p in result.get("curve", []) if metric in (p.get("metrics") or {})]
    xs, ys = [], []
    for i, point in enumerate(curve):
        x = float(point["round"])
        if (
            point["kind"] == "init"
            and i + 1 < len(curve)
            and curve[i + 1]["kind"] == "central"
            and curve[i + 1]["round"] == 0
        ):
            x -= 0.3  # central-then-federated: the central version before round 1
        xs.append(x)
        ys.append(float(point["metrics"][metric]))
    return xs, ys


def plot_rounds(grid: Grid, path: Path, k: int | None = None) -> bool:
    """Per task: the curve metric of every global version by round, median over seeds, min–max band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    exp = grid.experiment
    k = exp.shots[0] if k is None else k
    tasks = [t for t in exp.tasks if any(grid.cell(t, k, m) and grid.cell(t, k, m).results for m in exp.methods)]  # type: ignore[union-attr]
    if not tasks:
        return False
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.2 * cols), 3.6 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks, strict=False):
        metric = metrics_for(t)[0]
        for method in exp.methods:
            cell = grid.cell(t, k, method)
            if cell is None or not cell.results:
                continue
            curves = [_curve_xy(r, metric) for r in cell.results.values()]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            length = min(len(c[0]) for c in curves)
            xs = curves[0][0][:length]
            ys = [[c[1][i] for c in curves] for i in range(length)]
            med = [statistics.median(v) * 100 for v in ys]
            ax.plot(xs, med, marker="o", color=_COLORS[method], label=f"{METHOD_LABELS[method]} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(
                    xs, [min(v) * 100 for v in ys], [max(v) * 100 for v in ys], color=_COLORS[method], alpha=0.15
                )
        ax.set_title(f"{TASK_LABELS.get(get_task(t).name, t)} ({k}-shot)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (centralized: chunk of its epochs)")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} % (curve subset)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle(f"{exp.name}: metric of every global version, median and min–max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_kshot(grid: Grid, path: Path) -> bool:
    """Per task: final metric against k, median with min–max bars; the paper's DistilBERT dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    exp = grid.experiment
    fig, axes = plt.subplots(1, len(exp.tasks), figsize=(5 * len(exp.tasks), 3.8), squeeze=False)
    drawn = False
    for ax, t in zip(axes.flat, exp.tasks, strict=False):
        name = get_task(t).name
        metric = metrics_for(t)[0]
        for method in exp.methods:
            pts = []
            for k in exp.shots:
                cell = grid.cell(t, k, method)
                s = cell.stats(metric) if cell else None
                if s is not None:
                    pts.append((k, s))
            if pts:
                drawn = True
                shift = {"centralized": 0.95, "fl": 1.0, "ffm": 1.05}.get(method, 1.0)  # keep bars apart
                ks = [p[0] * shift for p in pts]
                med = [p[1]["median"] * 100 for p in pts]
                lo = [m - p[1]["min"] * 100 for m, p in zip(med, pts, strict=True)]
                hi = [p[1]["max"] * 100 - m for m, p in zip(med, pts, strict=True)]
                ax.errorbar(
                    ks,
                    med,
                    yerr=[lo, hi],
                    marker="o",
                    capsize=3,
                    color=_COLORS[method],
                    label=f"{METHOD_LABELS[method]} (ours)",
                )
            ref = paper.TABLE2.get(name, {}).get(method)
            if ref:
                ax.plot(
                    list(ref),
                    list(ref.values()),
                    linestyle="--",
                    color=_COLORS[method],
                    alpha=0.6,
                    label=f"{METHOD_LABELS[method]} (paper DistilBERT, best of 5)",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(exp.shots), [str(k) for k in exp.shots])
        ax.set_title(TASK_LABELS.get(name, t))
        ax.set_xlabel("k (examples per class per shard)")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(experiment: ExperimentSpec, out_dir: str | Path, *, transport: str = "memory") -> str:
    """Write ``<name>.md``, ``<name>.json`` and the PNG plots into ``out_dir``; return the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = collect(experiment, out, transport=transport)
    suffix = "" if transport == "memory" else f"-{transport}"
    stem = f"{experiment.name}{suffix}"
    plots = []
    if grid.done:
        done_per_k = {
            k: sum(len(c.results) for (v, _, ck, _), c in grid.cells.items() if ck == k and v == MAIN)
            for k in experiment.shots
        }
        if plot_rounds(grid, out / f"{stem}_rounds.png", k=max(done_per_k, key=lambda k: done_per_k[k])):
            plots.append(f"{stem}_rounds.png")
        if experiment.layout == "table2" and plot_kshot(grid, out / f"{stem}_kshot.png"):
            plots.append(f"{stem}_kshot.png")
    markdown = render_markdown(grid, plots)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(summary(grid), indent=1, sort_keys=True) + "\n")
    return markdown


# -- the real-broker check ----------------------------------------------------------------------------------
def _same_weights(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> str:
    """Whether two runs ended with bit-identical trainable weights (by their sha256)."""
    if a is None or "final_state_sha256" not in a or "final_state_sha256" not in b:
        return "—"
    return "yes (sha256 equal)" if a["final_state_sha256"] == b["final_state_sha256"] else "no"


def broker_check(out_dir: str | Path, experiments: Sequence[ExperimentSpec] = ()) -> str:
    """Every run made over MQTT next to the same spec over the in-memory transport (``broker_check.md``).

    ``experiments`` name the tables a run belongs to (the "table" column).
    """
    out = Path(out_dir)
    owners: dict[str, list[str]] = {}
    for experiment in experiments:
        for spec in experiment.runs():
            owners.setdefault(spec.key, []).append(experiment.name)
    rows = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("spec", {}).get("transport") != "mqtt":
            continue
        spec = RunSpec.from_dict(result["spec"])
        twin_spec = RunSpec.from_dict({**result["spec"], "transport": "memory"})
        twin = load_result(out, twin_spec)
        metric = result["primary_metric"]
        curve_diff = "—"
        if twin is not None:
            a = [p.get("metrics", {}).get(metric) for p in twin.get("curve", [])]
            b = [p.get("metrics", {}).get(metric) for p in result.get("curve", [])]
            if len(a) == len(b) and all(x is not None for x in a + b):
                curve_diff = f"{max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0):.2g}"
        rows.append(
            [
                ", ".join(owners.get(twin_spec.key, [])) or "—",
                spec.label().replace(" [mqtt]", ""),
                metric,
                "—" if twin is None else f"{twin['final'][metric]:.4f}",
                f"{result['final'][metric]:.4f}",
                "—" if twin is None else f"{abs(twin['final'][metric] - result['final'][metric]):.2g}",
                curve_diff,
                _same_weights(twin, result),
                "—" if twin is None else f"{twin['timing']['total_s']:.0f}",
                f"{result['timing']['total_s']:.0f}",
                str(result.get("hub", {}).get("counters", {}).get("accepted", "—")),
            ]
        )
    lines = [
        "# Real broker check: the same runs over Mosquitto and over the in-process transport",
        "",
        "Each row is one run spec executed twice, differing only in `transport`: `memory` (the in-process "
        "broker) and `mqtt` (a managed Mosquitto, every message over TCP). Same data, seeds and order of "
        'institutions, so the numbers should agree exactly; "same final weights" compares the sha256 of '
        "the final trainable tensors.",
        "",
        *_table(
            [
                "table",
                "run",
                "metric",
                "memory",
                "mqtt",
                "|Δ| final",
                "max |Δ| per version",
                "same final weights",
                "memory s",
                "mqtt s",
                "updates accepted (mqtt)",
            ],
            rows,
        ),
    ]
    if not rows:
        lines += ["", "No MQTT runs yet: `ffm-hub experiment SPEC --transport mqtt ...`."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "broker_check.md").write_text(text)
    return text
