"""Tests for ffm_edge.data: every file format of the shared data folder, rebuilt in miniature in tmp_path."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ffm_edge import data as D
from ffm_edge.data import (
    TASKS,
    LabeledData,
    describe,
    dirichlet_partition,
    get_task,
    kshot_sample,
    load_kshot,
    load_split,
    resolve_data_dir,
)
from ffm_edge.errors import ConfigError, DataError

BOM = "\ufeff"

# --------------------------------------------------------------------------------------------------------
# Fixture: a miniature data folder in the exact formats of the shared one
# --------------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")


def _tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


def _pool(rows: list[tuple[str, str, str]]) -> str:
    obj = {str(i): {"text_a": a, "text_b": b, "label": lab} for i, (a, b, lab) in enumerate(rows)}
    return json.dumps(obj, indent=4)


MNLI_KSHOT_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]


def _mnli_kshot_row(i: int, s1: str, s2: str, label: str) -> list[str]:
    return [
        str(i),
        str(i),
        f"{i}e",
        "fiction",
        "( x )",
        "( y )",
        "(ROOT x)",
        "(ROOT y)",
        s1,
        s2,
        label,
        label,
    ]


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    g = root / "glue"
    # SST-2: header; a raw double quote must survive (no quoting); trailing space kept verbatim.
    _write(
        g / "SST-2/train.tsv",
        _tsv([["sentence", "label"], ['he said " wow ', "1"], ["dull", "0"], ["fine", "1"]]),
    )
    _write(g / "SST-2/dev.tsv", _tsv([["sentence", "label"], ["great film ", "1"], ["bad", "0"]]))
    # CoLA: NO header; source, label, original label, sentence.
    _write(
        g / "CoLA/train.tsv",
        _tsv([["gj04", "1", "", "The sailors rode."], ["bc01", "0", "*", "Rode sailors the."]]),
    )
    _write(g / "CoLA/dev.tsv", _tsv([["gj04", "0", "*", "Him went."]]))
    # MRPC: UTF-8 BOM before the header; label in "Quality".
    mrpc_header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    _write(
        g / "MRPC/dev.tsv",
        BOM
        + _tsv(
            [
                mrpc_header,
                ["1", "11", "12", "He said the pie business", '" The pie business'],
                ["0", "21", "22", "A b .", "C d ."],
            ]
        ),
    )
    _write(g / "MRPC/train.tsv", BOM + _tsv([mrpc_header, ["0", "1", "2", "x", "y"]]))
    # RTE: string labels.
    rte_header = ["index", "sentence1", "sentence2", "label"]
    _write(
        g / "RTE/train.tsv",
        _tsv([rte_header, ["0", "P one.", "H one.", "not_entailment"], ["1", "P two.", "H two.", "entailment"]]),
    )
    _write(g / "RTE/dev.tsv", _tsv([rte_header, ["0", "P.", "H.", "entailment"]]))
    # STS-B: 10 columns, float score last.
    stsb_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2"]
    stsb_header += ["sentence1", "sentence2", "score"]
    stsb_row = ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none"]
    _write(
        g / "STS-B/train.tsv",
        _tsv([stsb_header, [*stsb_row, "A man.", "A guy.", "4.750"], [*stsb_row, "X.", "Y.", "0.000"]]),
    )
    _write(g / "STS-B/dev.tsv", _tsv([stsb_header, [*stsb_row, "A.", "B.", "5.000"]]))
    # QNLI dev: question/sentence, string labels.
    qnli_header = ["index", "question", "sentence", "label"]
    _write(
        g / "QNLI/dev.tsv",
        _tsv([qnli_header, ["0", "What?", "This.", "entailment"], ["1", "Who?", "That.", "not_entailment"]]),
    )
    # MNLI dev subset: written by Python csv (tab, minimal quoting) -> a field with a tab and quotes.
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["idx", "premise", "hypothesis", "label", "label_text"])
    w.writerow(["2980", 'He said "no"\tthen left.', "He left.", "0", "entailment"])
    w.writerow(["201", "Three days.", "Action.", "2", "contradiction"])
    w.writerow(["7", "A.", "B.", "1", "neutral"])
    _write(g / "MNLI/dev_matched_subset1024.tsv", buf.getvalue())
    # glue-pools JSON.
    p = root / "glue-pools"
    _write(p / "QQP/train.json", _pool([("q1?", "q2?", "0"), ("q3?", "q4?", "1"), ("q5?", "q6?", "1")]))
    _write(p / "QQP/dev.json", _pool([("d1?", "d2?", "1")]))
    _write(p / "MNLI/train.json", _pool([("p", "h", "neutral"), ("p2", "h2", "contradiction")]))
    _write(p / "MNLI/dev.json", _pool([("p", "h", "entailment")]))
    _write(p / "QNLI/train.json", _pool([("q?", "s.", "not_entailment"), ("q2?", "s2.", "entailment")]))
    _write(p / "QNLI/dev.json", _pool([("q?", "s.", "entailment")]))
    # glue-kshot.
    k = root / "glue-kshot"
    _write(k / "SST-2/16-13/train.tsv", _tsv([["sentence", "label"], ["good .", "1"], ["bad .", "0"]]))
    _write(k / "SST-2/16-13/dev.tsv", _tsv([["sentence", "label"], ["ok .", "1"]]))
    _write(k / "SST-2/16-42/train.tsv", _tsv([["sentence", "label"], ["x", "1"]]))
    _write(k / "SST-2/16-42/dev.tsv", _tsv([["sentence", "label"], ["y", "0"]]))
    _write(k / "CoLA/16-13/train.tsv", _tsv([["bc01", "0", "*", "Bill seems."], ["ks08", "1", "", "She ran."]]))
    _write(k / "CoLA/16-13/dev.tsv", _tsv([["bc01", "1", "", "OK."]]))
    _write(
        k / "MNLI/16-13/train.tsv",
        _tsv([MNLI_KSHOT_HEADER, _mnli_kshot_row(1, "P.", "H.", "neutral")]),
    )
    _write(
        k / "MNLI/16-13/dev_matched.tsv",
        _tsv([MNLI_KSHOT_HEADER, _mnli_kshot_row(2, "P2.", "H2.", "contradiction")]),
    )
    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _write(k / "QQP/16-13/train.tsv", _tsv([qqp_header, ["1", "2", "3", "Can I?", "How can I?", "1"]]))
    _write(k / "QQP/16-13/dev.tsv", _tsv([qqp_header, ["4", "5", "6", "A?", "B?", "0"]]))
    _write(k / "MRPC/16-13/train.tsv", BOM + _tsv([mrpc_header, ["1", "1", "2", "a", "b"]]))
    _write(k / "MRPC/16-13/dev.tsv", BOM + _tsv([mrpc_header, ["0", "3", "4", "c", "d"]]))
    return root


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their data folder explicitly; a developer's FFM_DATA_DIR must not leak in."""
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)


# --------------------------------------------------------------------------------------------------------
# Registry and LabeledData
# --------------------------------------------------------------------------------------------------------


def test_get_task_aliases() -> None:
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("sst-2") is TASKS["sst2"]
    assert get_task("STS-B").name == "stsb"
    assert get_task("sts_b").name == "stsb"
    assert get_task("CoLA").name == "cola"
    assert get_task("MNLI").name == "mnli"
    assert get_task("CIFAR-10").name == "cifar10"
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("imagenet")
    with pytest.raises(ConfigError):
        get_task("")


def test_task_registry_facts() -> None:
    assert set(TASKS) == {"sst2", "mrpc", "rte", "cola", "stsb", "qnli", "mnli", "qqp", "digits", "cifar10"}
    assert TASKS["cola"].metrics == ("matthews", "accuracy")
    assert TASKS["stsb"].metrics == ("pearson", "spearman")
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].is_regression
    assert TASKS["mrpc"].metrics == TASKS["qqp"].metrics == ("accuracy", "f1")
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["cifar10"].label_names == tuple(sorted(TASKS["cifar10"].label_names))
    assert TASKS["cifar10"].modality == TASKS["digits"].modality == "image"
    assert TASKS["rte"].is_pair and not TASKS["sst2"].is_pair and not TASKS["cola"].is_pair
    for info in TASKS.values():
        assert info.is_regression or len(info.label_names) == info.num_labels
    with pytest.raises(AttributeError):
        TASKS["sst2"].name = "x"  # type: ignore[misc]


def test_labeled_data_subset_and_counts() -> None:
    info = TASKS["sst2"]
    d = LabeledData(info, [("a", None), ("b", None), ("c", None)], np.array([0, 1, 1]), split="train")
    assert len(d) == 3
    assert d.labels.dtype == np.int64
    assert d.label_counts() == {0: 1, 1: 2}
    s = d.subset([2, 0])
    assert s.inputs == [("c", None), ("a", None)]
    assert s.labels.tolist() == [1, 0]
    assert s.split == "train"
    assert d.subset(np.array([], dtype=np.int64)).label_counts() == {0: 0, 1: 0}
    img = LabeledData(TASKS["digits"], np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 3]))
    assert isinstance(img.inputs, np.ndarray) and img.images is img.inputs
    with pytest.raises(DataError):
        _ = img.texts
    assert d.texts is d.inputs
    with pytest.raises(DataError):
        _ = d.images
    assert img.subset([1, 3]).images.shape == (2, 8, 8, 3)
    reg = LabeledData(TASKS["stsb"], [("a", "b"), ("c", "d")], np.array([0.2, 4.6]))
    assert reg.labels.dtype == np.float32
    assert reg.label_counts() == {0: 1, 5: 1}
    with pytest.raises(DataError):
        LabeledData(info, [("a", None)], np.array([0, 1]))
    with pytest.raises(DataError):
        LabeledData(info, [("a", None)], np.array([2]))
    with pytest.raises(DataError):
        LabeledData(TASKS["digits"], np.zeros((1, 8, 8), np.uint8), np.array([0]))
    with pytest.raises(DataError):
        d.subset([3])


def test_describe_line() -> None:
    info = TASKS["sst2"]
    d = LabeledData(info, [("a", None)] * 4, np.array([0, 0, 1, 1]), split="train", source="local:x.tsv")
    line = describe(d)
    assert line == "sst2/train: 4 examples, labels {0: 2, 1: 2}, source local:x.tsv"
    reg = LabeledData(TASKS["stsb"], [("a", "b")], np.array([2.5]), split="dev")
    assert "scores mean 2.50" in describe(reg)
    img = LabeledData(TASKS["digits"], np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), split="dev")
    assert "8x8x3 images" in describe(img)


# --------------------------------------------------------------------------------------------------------
# Data folder resolution
# --------------------------------------------------------------------------------------------------------


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir() is None
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("FFM_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # explicit wins over the environment
    monkeypatch.setenv("FFM_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="FFM_DATA_DIR"):
        resolve_data_dir()
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_dir(f)


def test_env_var_is_used_by_load_split(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FFM_DATA_DIR", str(data_root))
    d = load_split("SST-2", "dev")
    assert len(d) == 2 and d.source == "local:glue/SST-2/dev.tsv"


def test_auto_without_data_or_datasets_explains_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "_datasets_available", lambda: False)
    with pytest.raises(DataError, match="FFM_DATA_DIR"):
        load_split("sst2", "train")
    with pytest.raises(DataError, match="FFM_DATA_DIR"):
        load_split("sst2", "train", source="local")
    with pytest.raises(DataError, match="FFM_DATA_DIR"):
        load_kshot("sst2", 13)
    with pytest.raises(DataError, match="FFM_DATA_DIR"):
        load_split("cifar10", "train")


def test_local_missing_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "_datasets_available", lambda: False)
    with pytest.raises(DataError, match=r"SST-2[/\\]train\.tsv"):
        load_split("sst2", "train", data_dir=tmp_path, source="local")
    with pytest.raises(DataError, match=r"SST-2[/\\]train\.tsv"):
        load_split("sst2", "train", data_dir=tmp_path)


def test_argument_validation(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="split"):
        load_split("sst2", "test", data_dir=data_root)
    with pytest.raises(ConfigError, match="source"):
        load_split("sst2", "train", data_dir=data_root, source="web")
    with pytest.raises(ConfigError, match="limit"):
        load_split("sst2", "train", data_dir=data_root, limit=0)
    with pytest.raises(ConfigError):
        load_split("sst2", "train", data_dir=data_root, source="sklearn")
    with pytest.raises(ConfigError):
        load_split("digits", "train", source="local")


# --------------------------------------------------------------------------------------------------------
# Local GLUE formats
# --------------------------------------------------------------------------------------------------------


def test_sst2_no_quoting_and_verbatim_text(data_root: Path) -> None:
    d = load_split("sst2", "train", data_dir=data_root, source="local")
    assert d.inputs == [('he said " wow ', None), ("dull", None), ("fine", None)]
    assert d.labels.tolist() == [1, 0, 1]
    assert d.labels.dtype == np.int64


def test_cola_headerless(data_root: Path) -> None:
    d = load_split("cola", "train", data_dir=data_root)
    assert len(d) == 2  # the first row is data, not a header
    assert d.inputs[0] == ("The sailors rode.", None)
    assert d.labels.tolist() == [1, 0]
    assert load_split("cola", "dev", data_dir=data_root).labels.tolist() == [0]


def test_mrpc_bom_header(data_root: Path) -> None:
    d = load_split("mrpc", "dev", data_dir=data_root)
    assert len(d) == 2
    assert d.inputs[0] == ("He said the pie business", '" The pie business')
    assert d.labels.tolist() == [1, 0]
    assert len(load_split("mrpc", "train", data_dir=data_root)) == 1


def test_rte_string_labels(data_root: Path) -> None:
    d = load_split("rte", "train", data_dir=data_root)
    assert d.labels.tolist() == [1, 0]  # not_entailment=1, entailment=0 (GLUE order)
    assert d.inputs[1] == ("P two.", "H two.")


def test_stsb_float_scores(data_root: Path) -> None:
    d = load_split("stsb", "train", data_dir=data_root)
    assert d.labels.dtype == np.float32
    np.testing.assert_allclose(d.labels, [4.75, 0.0])
    assert d.inputs[0] == ("A man.", "A guy.")


def test_qnli_dev_tsv_and_train_pool(data_root: Path) -> None:
    dev = load_split("qnli", "dev", data_dir=data_root)
    assert dev.texts == [("What?", "This."), ("Who?", "That.")]
    assert dev.labels.tolist() == [0, 1]
    train = load_split("qnli", "train", data_dir=data_root)
    assert train.source == "local:glue-pools/QNLI/train.json"
    assert train.labels.tolist() == [1, 0]


def test_mnli_dev_dictreader_and_train_pool(data_root: Path) -> None:
    dev = load_split("mnli", "dev", data_dir=data_root)
    assert dev.texts[0] == ('He said "no"\tthen left.', "He left.")
    assert dev.labels.tolist() == [0, 2, 1]
    assert dev.source.endswith("dev_matched_subset1024.tsv")
    train = load_split("mnli", "train", data_dir=data_root)
    assert train.labels.tolist() == [1, 2]
    assert train.texts[0] == ("p", "h")


def test_qqp_pools(data_root: Path) -> None:
    train = load_split("qqp", "train", data_dir=data_root)
    assert train.texts[0] == ("q1?", "q2?")
    assert train.labels.tolist() == [0, 1, 1]
    dev = load_split("qqp", "dev", data_dir=data_root)
    assert len(dev) == 1 and "not the official QQP dev set" in dev.source


def test_pool_rows_follow_numeric_key_order(tmp_path: Path) -> None:
    rows = {str(i): {"text_a": f"a{i}", "text_b": "b", "label": "0"} for i in (10, 2, 1)}
    _write(tmp_path / "glue-pools/QQP/train.json", json.dumps(rows))
    d = load_split("qqp", "train", data_dir=tmp_path)
    assert [a for a, _ in d.inputs] == ["a1", "a2", "a10"]


@pytest.mark.parametrize(
    ("rel", "text", "match"),
    [
        ("glue/SST-2/train.tsv", "sentence\tlabel\nonly one column\n", "expected 2"),
        ("glue/SST-2/train.tsv", "sentence\tlabel\ngood\t7\n", "unknown label"),
        ("glue/RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "unknown label"),
        ("glue/SST-2/train.tsv", "text\tlabel\ngood\t1\n", "lacks column"),
        ("glue/STS-B/train.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n", "not a number"),
        ("glue-pools/QQP/train.json", "{not json", "invalid JSON"),
        ("glue-pools/QQP/train.json", '{"0": {"text_b": "x"}}', "text_a"),
    ],
)
def test_malformed_files_raise_data_error(tmp_path: Path, rel: str, text: str, match: str) -> None:
    _write(tmp_path / rel, text)
    task = rel.split("/")[1]
    with pytest.raises(DataError, match=match):
        load_split(task, "train", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------------
# k-shot files
# --------------------------------------------------------------------------------------------------------


def test_load_kshot_formats(data_root: Path) -> None:
    tr, dv = load_kshot("SST-2", 13, data_dir=data_root)
    assert tr.labels.tolist() == [1, 0] and dv.inputs == [("ok .", None)]
    assert tr.split == "16shot-13/train"
    tr, dv = load_kshot("mnli", 13, data_dir=data_root)
    assert tr.inputs == [("P.", "H.")] and tr.labels.tolist() == [1]
    assert dv.labels.tolist() == [2] and dv.source.endswith("dev_matched.tsv")
    tr, dv = load_kshot("qqp", 13, data_dir=data_root)
    assert tr.inputs == [("Can I?", "How can I?")] and tr.labels.tolist() == [1]
    tr, _ = load_kshot("cola", 13, data_dir=data_root)
    assert tr.inputs[0] == ("Bill seems.", None) and tr.labels.tolist() == [0, 1]
    tr, _ = load_kshot("mrpc", 13, data_dir=data_root)
    assert tr.inputs == [("a", "b")]


def test_load_kshot_missing_seed_lists_available(data_root: Path) -> None:
    with pytest.raises(DataError, match="16-13, 16-42"):
        load_kshot("sst2", 99, data_dir=data_root)
    with pytest.raises(ConfigError):
        load_kshot("digits", 13, data_dir=data_root)


# --------------------------------------------------------------------------------------------------------
# Hugging Face source (a stand-in `datasets` module; the real one is optional and not needed)
# --------------------------------------------------------------------------------------------------------


class _FakeDataset(dict[str, list[Any]]):
    pass


def test_hf_source_with_stand_in_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str, split: str) -> _FakeDataset:
        calls.append((path, name, split))
        return _FakeDataset(premise=["p1", "p2"], hypothesis=["h1", "h2"], label=[2, 0])

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    d = load_split("mnli", "dev", source="hf")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert d.inputs == [("p1", "h1"), ("p2", "h2")] and d.labels.tolist() == [2, 0]
    assert d.source.startswith("hf:")
    # auto falls back to the hub when there is no local copy and `datasets` is importable
    monkeypatch.setattr(D, "_datasets_available", lambda: True)
    assert len(load_split("mnli", "train")) == 2
    assert calls[-1] == ("nyu-mll/glue", "mnli", "train")


def test_hf_failures_become_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="offline"):
        load_split("sst2", "train", source="hf")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install"):
        load_split("sst2", "train", source="hf")


def test_optional_packages_are_imported_lazily() -> None:
    code = "import sys, ffm_edge.data; print(sorted(m for m in ('datasets', 'PIL', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------
# digits (scikit-learn, offline) and limit
# --------------------------------------------------------------------------------------------------------


def test_digits_offline_split() -> None:
    train = load_split("digits", "train")
    dev = load_split("digits", "dev", source="sklearn")
    assert len(train) + len(dev) == 1797
    assert 340 <= len(dev) <= 380
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 3)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert all(c > 0 for c in dev.label_counts().values())
    again = load_split("digits", "dev")
    assert np.array_equal(again.images, dev.images) and np.array_equal(again.labels, dev.labels)
    # no image is in both splits
    train_keys = {img.tobytes() + bytes([lab]) for img, lab in zip(train.images, train.labels, strict=True)}
    overlap = sum(img.tobytes() + bytes([lab]) in train_keys for img, lab in zip(dev.images, dev.labels, strict=True))
    assert overlap <= 5  # the digits set itself has a few exact duplicates


def test_limit_is_stratified_and_seeded() -> None:
    full = load_split("digits", "train")
    d = load_split("digits", "train", limit=100, seed=1)
    assert len(d) == 100
    full_counts, counts = full.label_counts(), d.label_counts()
    for c in range(10):
        assert abs(counts[c] - 100 * full_counts[c] / len(full)) <= 1
    same = load_split("digits", "train", limit=100, seed=1)
    other = load_split("digits", "train", limit=100, seed=2)
    assert np.array_equal(same.images, d.images)
    assert not np.array_equal(other.images, d.images)
    assert len(load_split("digits", "train", limit=10**6)) == len(full)


def test_limit_on_imbalanced_text(tmp_path: Path) -> None:
    rows = [["sentence", "label"]] + [[f"s{i}", "1" if i < 30 else "0"] for i in range(40)]
    _write(tmp_path / "glue/SST-2/train.tsv", _tsv(rows))
    d = load_split("sst2", "train", data_dir=tmp_path, limit=8, seed=0)
    assert d.label_counts() == {0: 2, 1: 6}


# --------------------------------------------------------------------------------------------------------
# cifar10 zips
# --------------------------------------------------------------------------------------------------------


def _fake_image_bytes(label: int, i: int) -> bytes:
    return bytes([label * 10 + i % 10]) * (32 * 32 * 3)


def _fake_decode(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(32, 32, 3).copy()


def _cifar_zip(path: Path, prefix: str, per_class: int, encode: Any = _fake_image_bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for label, cls in enumerate(TASKS["cifar10"].label_names):
            zf.writestr(f"{prefix}/{cls}/", b"")
            for i in range(per_class):
                zf.writestr(f"{prefix}/{cls}/{i:04d}.jpg", encode(label, i))


def test_cifar10_zip_layout_and_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cifar_zip(tmp_path / "cifar10/cifar10_train_500perclass_jpg.zip", "train", 6)
    _cifar_zip(tmp_path / "cifar10/cifar10_test_jpg.zip", "test", 3)
    decoded: list[int] = []

    def decode(data: bytes) -> np.ndarray:
        decoded.append(1)
        return _fake_decode(data)

    monkeypatch.setattr(D, "_decode_jpeg", decode)
    train = load_split("cifar10", "train", data_dir=tmp_path)
    assert train.images.shape == (60, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.label_counts() == dict.fromkeys(range(10), 6)
    # pixel value encodes the class folder: labels follow the alphabetical class names
    assert np.array_equal(train.images[:, 0, 0, 0] // 10, train.labels)
    dev = load_split("cifar10", "dev", data_dir=tmp_path)
    assert len(dev) == 30 and dev.source.endswith("cifar10_test_jpg.zip")
    decoded.clear()
    small = load_split("cifar10", "train", data_dir=tmp_path, limit=20, seed=5)
    assert small.label_counts() == dict.fromkeys(range(10), 2)
    assert len(decoded) == 20  # only the kept images are decoded
    assert np.array_equal(small.images[:, 0, 0, 0] // 10, small.labels)


def test_cifar10_without_pillow_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cifar_zip(tmp_path / "cifar10/cifar10_test_jpg.zip", "test", 1)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="Pillow"):
        load_split("cifar10", "dev", data_dir=tmp_path)


def test_cifar10_real_jpeg_decoding(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")

    def encode(label: int, i: int) -> bytes:
        buf = io.BytesIO()
        image_mod.new("RGB", (32, 32), (label * 20, 100, 200)).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    _cifar_zip(tmp_path / "cifar10/cifar10_test_jpg.zip", "test", 2, encode)
    d = load_split("cifar10", "dev", data_dir=tmp_path)
    assert d.images.shape == (20, 32, 32, 3)
    assert np.allclose(d.images[:, 16, 16, 0].astype(int), d.labels * 20, atol=4)


# --------------------------------------------------------------------------------------------------------
# Partitioning and k-shot sampling
# --------------------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 100)


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ents = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10).astype(float)
        q = counts[counts > 0] / counts.sum()
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


def test_dirichlet_partition_covers_every_index_once_and_is_deterministic() -> None:
    parts = dirichlet_partition(LABELS, 8, 0.5, seed=3)
    assert len(parts) == 8
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(LABELS)))
    again = dirichlet_partition(LABELS, 8, 0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(LABELS, 8, 0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert all(p.dtype == np.int64 for p in parts)


def test_dirichlet_partition_min_per_client() -> None:
    for seed in range(3):
        parts = dirichlet_partition(LABELS, 20, 0.01, seed=seed, min_per_client=10)
        assert min(len(p) for p in parts) >= 10
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
    # impossible request is a config error
    with pytest.raises(ConfigError):
        dirichlet_partition(LABELS, 20, 0.5, seed=0, min_per_client=51)


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    skewed = np.mean([_mean_entropy(LABELS, dirichlet_partition(LABELS, 10, 0.1, seed=s)) for s in range(3)])
    mild = np.mean([_mean_entropy(LABELS, dirichlet_partition(LABELS, 10, 100.0, seed=s)) for s in range(3)])
    assert skewed < mild - 0.5
    assert mild > 0.9 * np.log(10)


def test_inf_alpha_is_iid() -> None:
    parts = dirichlet_partition(LABELS, 7, float("inf"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
    assert _mean_entropy(LABELS, parts) > 0.95 * np.log(10)


def test_dirichlet_partition_regression_labels_are_binned() -> None:
    scores = np.random.default_rng(0).uniform(0, 5, size=400).astype(np.float32)
    parts = dirichlet_partition(scores, 5, 0.1, seed=0, min_per_client=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(400))
    means = [float(scores[p].mean()) for p in parts]
    assert max(means) - min(means) > 0.5  # label skew shows up as different score ranges


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clients": 0, "alpha": 1.0},
        {"num_clients": 2, "alpha": 0.0},
        {"num_clients": 2, "alpha": -1.0},
        {"num_clients": 2, "alpha": float("nan")},
        {"num_clients": 2, "alpha": 1.0, "min_per_client": -1},
        {"num_clients": 2.5, "alpha": 1.0},
    ],
)
def test_dirichlet_partition_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition(LABELS, seed=0, **kwargs)


def test_dirichlet_partition_rejects_2d_labels() -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition(LABELS.reshape(10, 100), 2, 1.0, seed=0)


def test_kshot_sample() -> None:
    labels = np.array([0] * 20 + [1] * 5 + [2] * 9)
    idx = kshot_sample(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
    assert len(set(idx.tolist())) == 12
    assert np.array_equal(idx, kshot_sample(labels, 4, seed=0))
    assert not np.array_equal(idx, kshot_sample(labels, 4, seed=1))
    reg = np.linspace(0, 5, 50).astype(np.float32)
    assert len(kshot_sample(reg, 7, seed=0)) == 7
    with pytest.raises(DataError, match="fewer than k"):
        kshot_sample(labels, 6, seed=0)
    with pytest.raises(ConfigError):
        kshot_sample(labels, 0, seed=0)


# --------------------------------------------------------------------------------------------------------
# The real shared data (skipped where it is absent)
# --------------------------------------------------------------------------------------------------------


def _real_data_dir() -> Path | None:
    env = os.environ.get("FFM_DATA_DIR")
    for cand in (env, "/work/shared/data"):
        if cand and (Path(cand) / "glue").is_dir():
            return Path(cand)
    return None


REAL = _real_data_dir()

# (task, split) -> (rows, label counts or None) as stated in the data README.
REAL_COUNTS: dict[tuple[str, str], tuple[int, dict[int, int] | None]] = {
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "dev"): (872, {0: 428, 1: 444}),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "dev"): (408, {0: 129, 1: 279}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "dev"): (1043, {0: 322, 1: 721}),
    ("stsb", "train"): (5749, None),
    ("stsb", "dev"): (1500, None),
    ("qnli", "train"): (8999, {0: 4523, 1: 4476}),
    ("qnli", "dev"): (5463, {0: 2702, 1: 2761}),
    ("mnli", "train"): (8999, {0: 3061, 1: 2980, 2: 2958}),
    ("mnli", "dev"): (1024, {0: 360, 1: 328, 2: 336}),
    ("qqp", "train"): (8999, {0: 5747, 1: 3252}),
    ("qqp", "dev"): (1000, {0: 623, 1: 377}),
}


@pytest.mark.skipif(REAL is None, reason="shared data folder not available (set FFM_DATA_DIR)")
def test_real_shared_data_row_counts() -> None:
    assert REAL is not None
    for (task, split), (rows, counts) in REAL_COUNTS.items():
        d = load_split(task, split, data_dir=REAL, source="local")
        assert len(d) == rows, (task, split)
        if counts is not None:
            assert d.label_counts() == counts, (task, split)
        else:
            assert 0.0 <= float(d.labels.min()) and float(d.labels.max()) <= 5.0
        assert all(a for a, _ in d.texts) and all((b is not None) == d.info.is_pair for _, b in d.texts)
    for task in ("sst2", "mrpc", "rte", "cola", "stsb", "qnli", "mnli", "qqp"):
        tr, dv = load_kshot(task, 13, data_dir=REAL)
        expected = 48 if task == "mnli" else 32
        assert len(tr) == len(dv) == expected, task
        if task != "stsb":
            assert set(tr.label_counts().values()) == {16}, task
    if importlib.util.find_spec("PIL") is not None:
        for split in ("train", "dev"):
            img = load_split("cifar10", split, data_dir=REAL, limit=20, seed=0)
            assert img.images.shape == (20, 32, 32, 3) and img.label_counts() == dict.fromkeys(range(10), 2)
