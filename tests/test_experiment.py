"""The paper-experiment runner (``ffm-hub experiment``): specs, shards, the three methods, cache, report.

The end-to-end tests run the real all-MiniLM-L6-v2 on a data folder built here (GLUE SST-2 layout, word-list
sentences): 2 institutions, 4-shot, 1 round.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ffm_edge.errors import ConfigError
from ffm_hub.cli import main as hub_main
from ffm_hub.experiments.report import broker_check, collect, paired_comparisons, render_markdown, sign_test_p
from ffm_hub.experiments.runner import Ledger, load_result, result_path, run_one
from ffm_hub.experiments.spec import MAIN, ExperimentSpec, RunSpec, Variant, load_experiment
from ffm_hub.experiments.splits import make_splits

REPO = Path(__file__).resolve().parent.parent
POSITIVE = [
    "a wonderful , moving film",
    "great acting and a smart script",
    "i loved every minute",
    "superb",
    "a delight from start to finish",
    "warm , funny and wise",
]
NEGATIVE = [
    "a dull , lifeless mess",
    "terrible acting and a silly plot",
    "i hated every minute",
    "awful",
    "a chore to sit through",
    "flat , boring and far too long",
]

TINY_SPEC = """
name = "tiny"
layout = "table1"
title = "tiny"
tasks = ["sst2"]
methods = ["centralized", "fl", "ffm"]
seeds = [7]
shots = [4]

[run]
model = "minilm-l6-v2"
strategy = "head"
institutions = 2
alpha = 0.5
rounds = 1
local_epochs = 1
central_epochs = 1
centralized_epochs = 1
eval_limit = 16
curve_eval_limit = 8

[[variants]]
name = "lora-fl"
label = "MiniLM lora (FL only)"
methods = ["fl"]
run = { strategy = "lora" }
note = "One method only: a test of variant rows."
"""


def write_sst2(root: Path, n_train: int = 60, n_dev: int = 24) -> Path:
    """A data folder laid out like the shared one, holding only glue/SST-2 (header ``sentence label``)."""
    rng = np.random.default_rng(0)
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = POSITIVE if label else NEGATIVE
            lines.append(f"{words[int(rng.integers(len(words)))]} {i}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


# -- specs ----------------------------------------------------------------------------------------------------
def test_run_spec_validates_and_keys_are_stable() -> None:
    spec = RunSpec(task="SST-2", method="fl", seed=1)
    assert spec.task == "sst2"  # one spelling, one key
    assert spec.key == RunSpec(task="sst2", method="fl", seed=1).key
    assert len(spec.key) == 64
    for change in (
        {"seed": 2},
        {"method": "ffm"},
        {"alpha": 1.0},
        {"rounds": 4},
        {"transport": "mqtt"},
        {"k_public": 16},
        {"eval_limit": 10},
    ):
        assert RunSpec.from_dict({**spec.to_dict(), **change}).key != spec.key, change
    iid = RunSpec(task="sst2", method="fl", seed=1, alpha=math.inf)
    assert iid.to_dict()["alpha"] == "inf"
    assert RunSpec.from_dict(iid.to_dict()) == iid
    for bad in (
        {"method": "fedprox"},
        {"alpha": 0},
        {"alpha": float("nan")},
        {"institutions": 0},
        {"task": "nope"},
        {"transport": "carrier-pigeon"},
        {"ffm_order": "random"},
    ):
        with pytest.raises(ConfigError):
            RunSpec.from_dict({**spec.to_dict(), **bad})
    with pytest.raises(ConfigError, match="unknown run settings"):
        RunSpec.from_dict({**spec.to_dict(), "epochs": 3})


def test_experiment_grid_order_filters_and_shipped_specs() -> None:
    grid = ExperimentSpec(name="g", tasks=("sst2", "mrpc"), seeds=(1, 2), shots=(4, 8), run={"rounds": 2})
    runs = list(grid.runs())
    assert len(runs) == 2 * 2 * 2 * 3
    assert [r.method for r in runs[:3]] == ["centralized", "fl", "ffm"]  # one seed's methods together
    assert {(r.k_public, r.k_private) for r in runs} == {(4, 4), (8, 8)}
    picked = list(grid.runs(tasks=["MRPC"], seeds=[2], methods=["ffm"], transport="mqtt"))
    assert [(r.task, r.seed, r.method, r.transport) for r in picked] == [("mrpc", 2, "ffm", "mqtt")] * 2
    with pytest.raises(ConfigError, match="cannot set"):
        ExperimentSpec(name="g", tasks=("sst2",), run={"seed": 3})
    with pytest.raises(ConfigError, match="rounds"):
        ExperimentSpec(name="g", tasks=("sst2",), run={"rounds": 0})
    for path in sorted((REPO / "benchmarks" / "paper").glob("*.toml")):
        experiment = load_experiment(path)  # every shipped spec is valid
        assert list(experiment.runs()), path


def _from_toml(**fields: Any) -> ExperimentSpec:
    """An experiment whose variants are plain tables, as ``load_experiment`` hands them over."""
    return ExperimentSpec(**fields)


def test_variants_add_rows_with_other_settings() -> None:
    grid = _from_toml(
        name="g",
        tasks=("sst2", "mrpc"),
        seeds=(1, 2, 3),
        variants=(
            {"name": "smollm2", "tasks": ["sst2"], "seeds": [1], "run": {"model": "smollm2-135m"}},
            {"name": "same", "methods": ["fl"]},  # the main grid's FL runs again: shared, not repeated
        ),
    )
    assert all(isinstance(v, Variant) for v in grid.variants)
    assert [name for name, _ in grid.grids()] == [MAIN, "smollm2", "same"]
    runs = list(grid.runs())
    assert len(runs) == 2 * 3 * 3 + 3  # the "same" variant adds nothing new
    assert len({r.key for r in runs}) == len(runs)
    smol = list(grid.runs(variants=["smollm2"]))
    assert [(r.task, r.seed, r.model) for r in smol] == [("sst2", 1, "smollm2-135m")] * 3
    assert {r.model for r in grid.runs(variants=[MAIN])} == {"minilm-l6-v2"}
    with pytest.raises(ConfigError, match="unknown variants"):
        list(grid.runs(variants=["nope"]))
    for bad, match in (
        ({"name": "x", "run": {"seed": 1}}, "cannot set"),
        ({"name": "x", "epochs": 3}, "unknown keys"),
        ({"name": MAIN}, "other than"),
        ({"name": "x", "run": {"rounds": 0}}, "rounds"),
        ({"name": "x", "tasks": []}, "non-empty"),
    ):
        with pytest.raises(ConfigError, match=match):
            _from_toml(name="g", tasks=("sst2",), variants=(bad,))
    with pytest.raises(ConfigError, match="repeat"):
        _from_toml(name="g", tasks=("sst2",), variants=({"name": "a"}, {"name": "a"}))


def test_sign_test_and_paired_verdicts(tmp_path: Path) -> None:
    assert sign_test_p(5, 0) == sign_test_p(0, 5) == 0.0625  # 2 * (1/2)^5
    assert sign_test_p(4, 1) == pytest.approx(2 * 6 / 32)
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(2, 2) == 1.0
    experiment = ExperimentSpec(name="p", tasks=("sst2",), seeds=(1, 2, 3, 4), shots=(4,))
    accuracy = {"centralized": [0.5, 0.5, 0.5, 0.5], "fl": [0.6, 0.7, 0.5, 0.6], "ffm": [0.7, 0.6, 0.6, 0.7]}
    for spec in experiment.runs():
        value = accuracy[spec.method][experiment.seeds.index(spec.seed)]
        path = result_path(tmp_path, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {"key": spec.key, "status": "done", "final": {"accuracy": value}, "timing": {"total_s": 1.0}}
        path.write_text(json.dumps(document))
    grid = collect(experiment, tmp_path)
    assert grid.done == grid.expected == 12
    pairs = {p["versus"]: p for p in paired_comparisons(grid)}
    assert pairs["centralized"]["verdict"] == "FFM higher on every seed"
    assert pairs["centralized"]["ffm_wins"] == 4 and pairs["centralized"]["median_delta"] == pytest.approx(0.15)
    assert pairs["fl"]["verdict"] == "within noise"  # +0.1, -0.1, +0.1, +0.1
    assert (pairs["fl"]["ffm_wins"], pairs["fl"]["ffm_losses"]) == (3, 1)
    assert "Is the difference more than noise?" in render_markdown(grid)


def test_cli_help_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        hub_main(["experiment", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("Resumable", "--transport", "--budget-min", "--set", "Dirichlet", "best of n", "examples:"):
        assert word in text, word
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY_SPEC)
    argv = ["experiment", str(spec_path), "--out-dir", str(tmp_path / "out"), "--dry-run", "--set", "rounds=2"]
    assert hub_main([*argv, "--methods", "fl,ffm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("to run" in line for line in lines)  # FL and FFM, and the variant's FL
    assert "sst2 k=4 fl seed=7" in lines[0]
    assert hub_main([*argv, "--variants", "lora-fl"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert hub_main(["experiment", str(spec_path), "--dry-run", "--set", "rounds=0"]) == 2  # a clear error


# -- shards ---------------------------------------------------------------------------------------------------
def _proportions(labels: np.ndarray, ids: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels[ids], minlength=classes) / len(ids)


def test_partitions_are_deterministic_disjoint_kshot_and_non_iid() -> None:
    classes, k, institutions = 4, 25, 5
    labels = np.repeat(np.arange(classes), 400)
    np.random.default_rng(3).shuffle(labels)
    make: dict[str, Any] = {"institutions": institutions, "k_public": k, "k_private": k}
    a = make_splits(labels, seed=11, alpha=0.1, **make)
    b = make_splits(labels, seed=11, alpha=0.1, **make)
    assert a.fingerprint() == b.fingerprint()  # same seed, same shards
    assert all(np.array_equal(x, y) for x, y in zip(a.private, b.private, strict=True))
    assert make_splits(labels, seed=12, alpha=0.1, **make).fingerprint() != a.fingerprint()
    # The public shard: exactly k per class; the private pool: C·k per class; no example in two shards.
    assert np.bincount(labels[a.public], minlength=classes).tolist() == [k] * classes
    assert np.bincount(labels[a.private_ids], minlength=classes).tolist() == [institutions * k] * classes
    everything = np.concatenate([a.public, *a.private])
    assert len(np.unique(everything)) == len(everything)
    assert len(a.private) == institutions and min(len(p) for p in a.private) >= 2
    # Label skew: with α = 0.1 institutions are far from the global (uniform) mix; α = inf is close to it.
    uniform = np.full(classes, 1 / classes)

    def skew(splits: object) -> float:
        return float(np.mean([0.5 * np.abs(_proportions(labels, p, classes) - uniform).sum() for p in splits.private]))  # type: ignore[attr-defined]

    iid = make_splits(labels, seed=11, alpha=math.inf, **make)
    assert skew(a) > 0.4
    assert skew(iid) < 0.15
    # The public shard does not depend on α, C or k_private: only on the seed and k_public.
    assert np.array_equal(iid.public, a.public)
    other = make_splits(labels, seed=11, alpha=1.0, institutions=3, k_public=k, k_private=10)
    assert np.array_equal(other.public, a.public)


def test_regression_shards_draw_2k_examples() -> None:
    scores = np.random.default_rng(0).uniform(0, 5, size=500).astype(np.float32)
    splits = make_splits(scores, seed=1, institutions=3, k_public=8, k_private=8, alpha=0.5, regression=True)
    assert len(splits.public) == 16
    assert len(splits.private_ids) == 3 * 16


def test_ledger_records_and_refuses_unknown_data() -> None:
    from ffm_edge.data import LabeledData, get_task

    class FakeTrainer:
        def train(self, data: LabeledData, **kwargs: object) -> int:
            return len(data)

    task = get_task("sst2")
    data = LabeledData(task, [("a", None), ("b", None)], np.array([0, 1]))
    ledger = Ledger()
    ledger.register(data, np.array([10, 42]), "public")
    trainer = FakeTrainer()
    ledger.watch(trainer, "hub")
    assert trainer.train(data, epochs=1) == 2
    assert ledger.to_dict() == {"ids": {"hub": [10, 42]}, "shards": {"hub": ["public"]}}
    with pytest.raises(ConfigError, match="did not hand out"):
        trainer.train(LabeledData(task, [("c", None)], np.array([1])))


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_configuration_runs_caches_and_reports(tmp_path: Path) -> None:
    data_dir = write_sst2(tmp_path / "data")
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY_SPEC)
    out = tmp_path / "out"
    argv = ["experiment", str(spec_path), "--out-dir", str(out), "--data-dir", str(data_dir)]
    assert hub_main(argv) == 0

    experiment = load_experiment(spec_path)
    specs = list(experiment.runs(variants=[MAIN]))
    results = {s.method: load_result(out, s) for s in specs}
    assert all(r is not None for r in results.values()), "every run left a complete result file"
    assert len(list((out / "runs").glob("*.json"))) == 4  # three methods, and the variant's one run
    for method, result in results.items():
        assert result is not None
        assert result["spec"]["method"] == method and result["status"] == "done"
        assert set(result["final"]) == {"accuracy"} and 0.0 <= result["final"]["accuracy"] <= 1.0
        assert result["data"]["final_eval"]["examples"] == 16
        assert result["timing"]["total_s"] > 0 and result["environment"]["packages"]["torch"]
        assert [p["round"] for p in result["curve"]] == [0, 1]  # the initial version, then round 1
        assert all("accuracy" in p["metrics"] for p in result["curve"])
    assert [p["kind"] for p in results["fl"]["curve"]] == ["init", "fedavg"]  # type: ignore[index]
    assert [p["kind"] for p in results["ffm"]["curve"]] == ["init", "fedavg+central"]  # type: ignore[index]
    # Same seed: same shards and the same initial weights for every method.
    assert len({r["data"]["splits"]["fingerprint"] for r in results.values()}) == 1  # type: ignore[index]
    assert len({r["curve"][0]["metrics"]["accuracy"] for r in results.values()}) == 1  # type: ignore[index]

    # Each method saw exactly the data it should.
    splits = results["fl"]["data"]["splits"]  # type: ignore[index]
    public, private = set(splits["public"]), [set(p) for p in splits["private"]]
    assert len(public) == 8 and all(private) and not public & set().union(*private)
    central = results["centralized"]["touched"]  # type: ignore[index]
    assert central["ids"] == {"hub": sorted(public)} and central["shards"] == {"hub": ["public"]}
    fl = results["fl"]["touched"]  # type: ignore[index]
    assert "hub" not in fl["ids"], "FL never touches the public shard"
    assert fl["ids"] == {f"inst-{i}": sorted(p) for i, p in enumerate(private)}
    ffm = results["ffm"]["touched"]  # type: ignore[index]
    assert ffm["ids"] == {"hub": sorted(public), **{f"inst-{i}": sorted(p) for i, p in enumerate(private)}}
    assert results["fl"]["hub"]["counters"]["accepted"] == 2  # type: ignore[index]

    # The report: paper layout with the paper's numbers, and a plot.
    report = (out / "tiny.md").read_text()
    assert "Runs done: **4 of 4**" in report
    assert "DistilBERT (paper, best of 5)" in report and "69.38" in report
    assert "(ours, best of n)" in report
    assert "| MiniLM lora (FL only) (ours, median [min–max]) | FL |" in report
    assert "One method only: a test of variant rows." in report
    if importlib.util.find_spec("matplotlib") is not None:  # plots need the [bench] extra
        assert (out / "tiny_rounds.png").stat().st_size > 1000
    summary = json.loads((out / "tiny.json").read_text())
    assert summary["runs_done"] == 4
    assert {c["variant"] for c in summary["cells"]} == {MAIN, "lora-fl"}

    # A rerun skips what is done: no result file is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert hub_main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before


@pytest.mark.slow
@pytest.mark.mosquitto
def test_real_broker_gives_the_in_memory_numbers(tmp_path: Path, mosquitto_binary: str) -> None:
    """The same run over a managed Mosquitto and over the in-process broker: identical numbers."""
    data_dir = write_sst2(tmp_path / "data")
    experiment = ExperimentSpec(
        name="tiny-check",
        tasks=("sst2",),
        methods=("ffm",),
        seeds=(5,),
        shots=(4,),
        run={"institutions": 2, "rounds": 2, "centralized_epochs": 1, "eval_limit": 16, "curve_eval_limit": 8},
    )
    (base,) = experiment.runs()
    mqtt_spec = RunSpec.from_dict({**base.to_dict(), "transport": "mqtt"})
    memory = run_one(base, data_dir=data_dir)
    mqtt = run_one(mqtt_spec, data_dir=data_dir)
    assert mqtt["final"] == memory["final"]
    assert [p["metrics"] for p in mqtt["curve"]] == [p["metrics"] for p in memory["curve"]]
    assert mqtt["touched"] == memory["touched"]
    # The report puts the pair side by side, names the table it belongs to and compares the weights.
    out = tmp_path / "out"
    for spec, result in ((base, memory), (mqtt_spec, mqtt)):
        result_path(out, spec).parent.mkdir(parents=True, exist_ok=True)
        result_path(out, spec).write_text(json.dumps(result))
    text = broker_check(out, [experiment])
    (row,) = [line for line in text.splitlines() if "sst2 k=4 ffm seed=5" in line]
    assert row.startswith("| tiny-check |") and "yes (sha256 equal)" in row
