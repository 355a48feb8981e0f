"""The async/switching benchmark (benchmarks/async_switching.py) on a tiny configuration with the real MiniLM.

No FFM_DATA_DIR needed: the test writes SST-2-shaped GLUE files (``glue/SST-2/{train,dev}.tsv``) of short
sentiment sentences built from word lists, and the benchmark reads them through ``--data-dir``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from bench_helpers import load_benchmark

_POSITIVE = ("wonderful", "moving", "brilliant", "delightful", "superb", "charming", "gripping", "beautiful")
_NEGATIVE = ("dull", "lifeless", "tedious", "clumsy", "awful", "boring", "silly", "painful")
_SUBJECTS = ("film", "script", "cast", "story", "soundtrack", "ending", "direction", "performance")
_TEMPLATES = ("a {adj} {subj}", "the {subj} was {adj}", "what a {adj} {subj} this is", "i found the {subj} {adj}")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("async_switching")


def write_sst2(folder: Path, split: str, n: int, seed: int) -> None:
    """A GLUE SST-2 TSV (header ``sentence<TAB>label``) of ``n`` built sentences, labels balanced."""
    rng = np.random.default_rng(seed)
    rows = ["sentence\tlabel"]
    for label in rng.permutation(np.arange(n) % 2):
        adj = rng.choice(_POSITIVE if label else _NEGATIVE)
        rows.append(str(rng.choice(_TEMPLATES)).format(adj=adj, subj=rng.choice(_SUBJECTS)) + f"\t{label}")
    path = folder / "glue" / "SST-2" / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_help_names_every_flag(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--devices", "--per-device", "--slow", "--slowdown", "--tau", "--budget", "--seeds",
                 "--out-dir", "--modes", "--quick", "--max-staleness"):  # fmt: skip
        assert flag in text, flag


def test_settings_reject_a_tau_that_is_not_below_n(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="tau"):
        bench.Settings(devices=3, tau=3)
    assert bench.Settings(devices=3, tau=3, modes=("sync",)).tau == 3  # only asynchronous modes need τ < N


def test_decision_of_a_reverted_version_is_revert(bench: ModuleType) -> None:
    actions = ("publish", "revert", "downweight")
    assert bench._decision("reverted", 0.0, actions) == "revert"  # its metrics carry the previous decision
    assert bench._decision("fedavg+central", 0.0, actions) == "publish"
    assert bench._decision("fedavg", None, actions) is None


def test_tiny_run_writes_complete_results(bench: ModuleType, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_sst2(data, "train", 240, seed=1)
    write_sst2(data, "dev", 24, seed=2)
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--devices", "3", "--slow", "1", "--slowdown", "3", "--per-device", "8",
            "--public", "8", "--validation", "8", "--eval-limit", "16", "--tau", "2", "--budget-rounds", "2",
            "--calibration-repeats", "1", "--out-dir", str(out), "--no-progress", "--threads", "1"]  # fmt: skip
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it for the whole process

    result = json.loads((out / "async_switching.json").read_text(encoding="utf-8"))
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the [bench] extra
        assert (out / "async_switching.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "async_switching.png").exists()
    markdown = (out / "async_switching.md").read_text(encoding="utf-8")
    assert "Wall time is simulated" in markdown and "| `async` |" in markdown and "speedup" in markdown

    settings = result["settings"]
    assert settings["devices"] == 3 and settings["slow"] == 1 and settings["budget_s"] > 0
    costs = result["cost_model"]
    assert costs["train_s_per_example"] > 0 and costs["eval_s_per_example"] > 0 and costs["update_bytes"] > 0
    assert result["environment"]["torch"]
    counts = result["data"]["0"]["device_label_counts"]
    assert len(counts) == 3 and all(sum(c.values()) == 8 for c in counts.values())

    runs = {run["mode"]: run for run in result["runs"]}
    assert set(runs) == {"sync", "async", "ffm", "ffm-sync"}
    for mode, run in runs.items():
        versions = run["versions"]
        assert versions[0]["version"] == 0 and versions[0]["kind"] == "init", mode
        assert len(versions) >= 2, f"{mode} published no version"
        times = [v["sim_s"] for v in versions]
        assert times == sorted(times), f"{mode}: simulated time goes backwards"
        assert [v["version"] for v in versions] == list(range(len(versions)))
        assert all(0.0 <= v["dev_accuracy"] <= 1.0 for v in versions)
        assert all(u["arrive_s"] >= u["pull_s"] >= u["start_s"] for u in run["updates"])
        assert run["real_s"] > 0 and run["summary"]["versions"] >= 1

    assert runs["sync"]["config"]["tau"] == 3 and runs["async"]["config"]["tau"] == 2 < 3
    for mode in ("sync", "ffm-sync"):
        aggregated = [v for v in runs[mode]["versions"][1:] if v["devices"]]
        assert aggregated and all(v["staleness"] == [0, 0, 0] for v in aggregated), mode
        assert all(len(v["devices"]) == 3 for v in aggregated)
    assert all(len(v["devices"]) == 2 for v in runs["async"]["versions"][1:])
    # Switching decides on the hub's validation set: those modes carry a validation metric, the others none.
    assert all(v["validation_accuracy"] is not None for v in runs["ffm"]["versions"])
    assert all(v["validation_accuracy"] is None for v in runs["sync"]["versions"])
    assert runs["ffm"]["hub_busy_s"] > runs["async"]["hub_busy_s"]  # central steps and validation occupy the hub

    # --report-only re-derives the analysis from the records and rewrites the report.
    (out / "async_switching.md").write_text("stale", encoding="utf-8")
    assert bench.main(["--report-only", "--out-dir", str(out)]) == 0
    assert (out / "async_switching.md").read_text(encoding="utf-8") == markdown
    result = json.loads((out / "async_switching.json").read_text(encoding="utf-8"))
    assert result["report_rendered_utc"]

    targets = result["targets"]["0"]
    assert targets[0]["name"] == "best of sync FedAvg"
    assert targets[0]["sim_s"]["sync"] is not None  # sync reaches its own best
    for target in targets:
        for mode, speedup in target["speedup_vs_sync"].items():
            held = target["share_at_or_above_after"][mode]
            assert held is None or 0.0 <= held <= 1.0
            reached, base = target["sim_s"][mode], target["sim_s"]["sync"]
            if reached is None or not base:  # not reached, or already met by version 0 (time 0)
                assert speedup is None, mode
            else:
                assert speedup == pytest.approx(base / reached), mode
