"""One loader for every dataset FFM uses, plus the non-IID partitioning that simulates edge clients.

Why one module: experiments, benchmarks and the edge CLI must all read the *same* bytes the same way
(GLUE files have per-task quirks: a headerless CoLA, a BOM in MRPC, string labels in RTE/QNLI, MNLI dev
only as a 1,024-row subset, QQP only as JSON pools). Getting one of them wrong silently changes results,
so every quirk lives here, once, with a test.

Data are never copied into the repo: they are read from the folder named by ``FFM_DATA_DIR`` (laid out like
the shared data folder: ``glue/``, ``glue-kshot/``, ``glue-pools/``, ``cifar10/``), or, when that is not
available and the machine is online, from the Hugging Face hub (``pip install datasets``). The handwritten
digits come with scikit-learn and always work offline.

Heavy or optional dependencies (scikit-learn, Pillow, ``datasets``) are imported lazily, only by the loader
that needs them.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ffm_edge.errors import ConfigError, DataError

__all__ = [
    "DATA_DIR_ENV",
    "KSHOT_SEEDS",
    "TASKS",
    "LabeledData",
    "TaskInfo",
    "TextPair",
    "check_same_task",
    "concat_data",
    "describe",
    "dirichlet_partition",
    "get_task",
    "kshot_sample",
    "load_kshot",
    "load_split",
    "resolve_data_dir",
    "reveal_stream",
]

#: Environment variable that points at the data folder (same layout as the shared data folder).
DATA_DIR_ENV = "FFM_DATA_DIR"

#: Seeds of the LM-BFF k-shot splits shipped in ``glue-kshot/``.
KSHOT_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)

#: One text example: a sentence, or a sentence pair (second element None for single-sentence tasks).
TextPair = tuple[str, str | None]

_SPLITS = ("train", "dev")
_SOURCES = ("auto", "local", "hf", "sklearn")
_HF_GLUE = "nyu-mll/glue"


# --------------------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """What a task is, so models and metrics can be set up without looking at the data.

    ``num_labels == 1`` means regression (STS-B); ``label_names`` are in label-id order (empty for
    regression); ``metrics`` names the metrics the task is conventionally reported with, first = primary.
    """

    name: str
    modality: str
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    is_pair: bool

    @property
    def is_regression(self) -> bool:
        """True for tasks with a single real-valued target (STS-B)."""
        return self.num_labels == 1


_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Label orders follow the GLUE / Hugging Face ``nyu-mll/glue`` label ids, so local and hub data agree.
TASKS: dict[str, TaskInfo] = {
    "sst2": TaskInfo("sst2", "text", 2, ("negative", "positive"), ("accuracy",), False),
    "mrpc": TaskInfo("mrpc", "text", 2, ("not_equivalent", "equivalent"), ("accuracy", "f1"), True),
    "rte": TaskInfo("rte", "text", 2, ("entailment", "not_entailment"), ("accuracy",), True),
    "cola": TaskInfo("cola", "text", 2, ("unacceptable", "acceptable"), ("matthews", "accuracy"), False),
    "stsb": TaskInfo("stsb", "text", 1, (), ("pearson", "spearman"), True),
    "qnli": TaskInfo("qnli", "text", 2, ("entailment", "not_entailment"), ("accuracy",), True),
    "mnli": TaskInfo("mnli", "text", 3, ("entailment", "neutral", "contradiction"), ("accuracy",), True),
    "qqp": TaskInfo("qqp", "text", 2, ("not_duplicate", "duplicate"), ("accuracy", "f1"), True),
    "digits": TaskInfo("digits", "image", 10, tuple(str(d) for d in range(10)), ("accuracy",), False),
    "cifar10": TaskInfo("cifar10", "image", 10, _CIFAR10_CLASSES, ("accuracy",), False),
}

_GLUE_TASKS = ("sst2", "mrpc", "rte", "cola", "stsb", "qnli", "mnli", "qqp")

# Folder name of each GLUE task under glue/, glue-kshot/ and glue-pools/.
_GLUE_DIRS = {
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "rte": "RTE",
    "cola": "CoLA",
    "stsb": "STS-B",
    "qnli": "QNLI",
    "mnli": "MNLI",
    "qqp": "QQP",
}

_ALIASES = {"mnlim": "mnli", "mnlimatched": "mnli", "cifar": "cifar10", "sts": "stsb", "sst": "sst2"}


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_task(name: str) -> TaskInfo:
    """Look a task up by any common spelling ("SST-2", "sst-2", "sst2", "STS-B", "CIFAR-10", ...)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"task name must be a non-empty string, got {name!r}")
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    try:
        return TASKS[key]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


# --------------------------------------------------------------------------------------------------------
# LabeledData
# --------------------------------------------------------------------------------------------------------


@dataclass
class LabeledData:
    """Inputs and labels of one split, in one shape for every task, so training code is task-agnostic.

    ``inputs`` is a list of (text_a, text_b or None) for text tasks, or a uint8 array (N, H, W, 3) for image
    tasks. ``labels`` is int64 for classification and float32 for regression. ``split`` and ``source`` are
    only there for logs (``describe``): where the rows came from matters when reporting numbers.
    """

    info: TaskInfo
    inputs: list[TextPair] | np.ndarray
    labels: np.ndarray
    split: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise DataError(f"{self.info.name}: labels must be 1-D, got shape {labels.shape}")
        want = np.float32 if self.info.is_regression else np.int64
        self.labels = labels.astype(want, copy=False)
        if self.info.modality == "image":
            images = np.asarray(self.inputs)
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise DataError(
                    f"{self.info.name}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
                )
            self.inputs = images
        elif not isinstance(self.inputs, list):
            raise DataError(f"{self.info.name}: text inputs must be a list of (text_a, text_b) pairs")
        if len(self.inputs) != len(self.labels):
            raise DataError(f"{self.info.name}: {len(self.inputs)} inputs but {len(self.labels)} labels")
        if not self.info.is_regression and len(self.labels):
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= self.info.num_labels:
                raise DataError(
                    f"{self.info.name}: label ids must lie in 0..{self.info.num_labels - 1}, got {lo}..{hi}"
                )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def texts(self) -> list[TextPair]:
        """``inputs`` of a text task, typed as such (DataError for an image task)."""
        if isinstance(self.inputs, np.ndarray):
            raise DataError(f"{self.info.name} is an image task; use .images")
        return self.inputs

    @property
    def images(self) -> np.ndarray:
        """``inputs`` of an image task as uint8 (N, H, W, 3), typed as such (DataError for a text task)."""
        if not isinstance(self.inputs, np.ndarray):
            raise DataError(f"{self.info.name} is a text task; use .texts")
        return self.inputs

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledData:
        """The examples at ``indices`` (in that order): how partitions and k-shot samples become datasets."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"{self.info.name}: subset index out of range for {len(self)} examples")
        inputs: list[TextPair] | np.ndarray
        if isinstance(self.inputs, np.ndarray):
            inputs = self.inputs[idx]
        else:
            inputs = [self.inputs[int(i)] for i in idx]
        return LabeledData(self.info, inputs, self.labels[idx], split=self.split, source=self.source)

    def tail(self, n: int) -> LabeledData:
        """The newest ``n`` examples (the last ``n`` rows; all of them when there are fewer), as a copy.

        How a device keeps a sliding window over data that keeps arriving (``EdgeClient(max_local_examples=)``).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"tail takes a non-negative integer, got {n!r}")
        return self.subset(np.arange(max(0, len(self) - int(n)), len(self)))

    def label_counts(self) -> dict[int, int]:
        """Examples per label id (every class listed, zeros included, so a missing class shows up).

        For regression, counts per score rounded to the nearest integer (STS-B: 0..5).
        """
        if self.info.is_regression:
            rounded = np.floor(self.labels.astype(np.float64) + 0.5).astype(np.int64)
            values, counts = np.unique(rounded, return_counts=True)
            return {int(v): int(c) for v, c in zip(values, counts, strict=True)}
        counts = np.bincount(self.labels, minlength=self.info.num_labels)
        return {i: int(c) for i, c in enumerate(counts)}


def check_same_task(have: TaskInfo, new: TaskInfo) -> None:
    """ConfigError unless ``new`` is the same task as ``have`` (name, modality and labels), saying what differs.

    Data that arrive later must fit the model a device already trains: same classification head, same
    label ids, same kind of input.
    """
    diffs = [
        f"{what} {b!r} instead of {a!r}"
        for what, a, b in (
            ("task", have.name, new.name),
            ("modality", have.modality, new.modality),
            ("num_labels", have.num_labels, new.num_labels),
            ("label names", have.label_names, new.label_names),
        )
        if a != b
    ]
    if diffs:
        raise ConfigError(f"data for another task: {'; '.join(diffs)} (expected task {have.name!r})")


def _joined(values: Sequence[str]) -> str:
    """Distinct non-empty parts of ``a + b`` style labels, in first-seen order (so repeated joins stay short)."""
    parts = dict.fromkeys(p for v in values for p in v.split(" + ") if p)
    return " + ".join(parts)


def concat_data(parts: Sequence[LabeledData]) -> LabeledData:
    """All examples of ``parts`` in order, as a new LabeledData (inputs and labels copied).

    Every part must be the same task (:func:`check_same_task`); images must share one (H, W, 3) shape.
    ``split`` and ``source`` become the distinct values of the parts joined with `` + ``.
    """
    if not parts:
        raise ConfigError("concat_data needs at least one LabeledData")
    info = parts[0].info
    for part in parts[1:]:
        check_same_task(info, part.info)
    inputs: list[TextPair] | np.ndarray
    if info.modality == "image":
        shapes = sorted({part.images.shape[1:] for part in parts})
        if len(shapes) != 1:
            raise DataError(f"{info.name}: cannot join images of different shapes {shapes}")
        inputs = np.concatenate([part.images for part in parts])
    else:
        inputs = [pair for part in parts for pair in part.texts]
    labels = np.concatenate([part.labels for part in parts])
    return LabeledData(
        info,
        inputs,
        labels,
        split=_joined([part.split for part in parts]),
        source=_joined([part.source for part in parts]),
    )


def reveal_stream(data: LabeledData, initial: int, per_round: int) -> Iterator[LabeledData]:
    """Simulate a device whose data arrive over time: the first ``initial`` examples, then ``per_round`` more.

    Yields *new* examples only (``data``'s rows in order, each exactly once): ``data[:initial]``, then
    ``data[initial:initial + per_round]``, ... until ``data`` is used up, then stops. Made for
    ``EdgeClient``: pass the first item as ``local_data`` and the iterator as ``data_stream``, and the
    client adds one batch before each round::

        stream = reveal_stream(shard, initial=32, per_round=8)
        client = EdgeClient("minilm-l6-v2", next(stream), data_stream=stream, ...)
        # round 1 trains on 40 examples, round 2 on 48, ... until the shard is used up
    """
    for what, value in (("initial", initial), ("per_round", per_round)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"reveal_stream: {what} must be a positive integer, got {value!r}")
    if len(data) == 0:
        raise ConfigError("reveal_stream: data is empty")

    def batches() -> Iterator[LabeledData]:
        start, stop = 0, min(int(initial), len(data))
        while start < len(data):
            yield data.subset(np.arange(start, stop))
            start, stop = stop, min(stop + int(per_round), len(data))

    return batches()


# --------------------------------------------------------------------------------------------------------
# Data folder
# --------------------------------------------------------------------------------------------------------


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The data folder: ``explicit`` if given, else ``$FFM_DATA_DIR``, else None (no local data).

    A path that is set but missing is an error rather than a silent fallback to the hub, so a typo in the
    setting cannot quietly change which data an experiment uses.
    """
    if explicit is not None and str(explicit) != "":
        path, origin = Path(explicit).expanduser(), "data_dir argument"
    else:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if not env:
            return None
        path, origin = Path(env).expanduser(), f"environment variable {DATA_DIR_ENV}"
    if not path.exists():
        raise DataError(
            f"data folder {str(path)!r} (from the {origin}) does not exist; point {DATA_DIR_ENV} at a folder "
            "laid out like the shared data folder (glue/, glue-kshot/, glue-pools/, cifar10/)"
        )
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} (from the {origin}) is not a directory")
    return path


# --------------------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TsvSpec:
    """Where text and label live in one TSV format. Column keys are names (header) or indices (no header)."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    header: bool = True
    ncols: int | None = None  # expected column count of a headerless file
    dict_reader: bool = False  # written with Python csv (minimal quoting) rather than raw GLUE TSV


_GLUE_TSV = {
    "sst2": _TsvSpec("sentence", None, "label"),
    "cola": _TsvSpec(3, None, 1, header=False, ncols=4),
    "mrpc": _TsvSpec("#1 String", "#2 String", "Quality"),
    "rte": _TsvSpec("sentence1", "sentence2", "label"),
    "stsb": _TsvSpec("sentence1", "sentence2", "score"),
    "qnli": _TsvSpec("question", "sentence", "label"),
}
_MNLI_DEV_SUBSET = "dev_matched_subset1024.tsv"
_MNLI_DEV_SPEC = _TsvSpec("premise", "hypothesis", "label", dict_reader=True)
_KSHOT_TSV = {
    **_GLUE_TSV,
    "mnli": _TsvSpec("sentence1", "sentence2", "gold_label"),
    "qqp": _TsvSpec("question1", "question2", "is_duplicate"),
}

# One local file: (path relative to the data folder, spec or None for a glue-pools JSON file).
_LocalFile = tuple[str, _TsvSpec | None]


def _local_file(task: str, split: str) -> _LocalFile:
    folder = _GLUE_DIRS[task]
    if task == "qqp" or (task in ("mnli", "qnli") and split == "train"):
        return f"glue-pools/{folder}/{split}.json", None
    if task == "mnli":
        return f"glue/MNLI/{_MNLI_DEV_SUBSET}", _MNLI_DEV_SPEC
    return f"glue/{folder}/{split}.tsv", _GLUE_TSV[task]


def _parse_label(info: TaskInfo, raw: str | None, where: str) -> int | float:
    text = (raw or "").strip()
    if info.is_regression:
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: score {raw!r} is not finite")
        return value
    if text in info.label_names:
        return info.label_names.index(text)
    try:
        label = int(text)
    except ValueError:
        label = -1
    if 0 <= label < info.num_labels:
        return label
    raise DataError(f"{where}: unknown label {raw!r} for {info.name} (expected one of {info.label_names})")


def _labels_array(info: TaskInfo, values: list[int | float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32 if info.is_regression else np.int64)


def _read_tsv(path: Path, info: TaskInfo, spec: _TsvSpec) -> tuple[list[TextPair], np.ndarray]:
    """Parse one GLUE-style TSV. ``utf-8-sig`` strips MRPC's BOM and is a no-op on the other files."""
    pairs: list[TextPair] = []
    labels: list[int | float] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            if spec.dict_reader:
                reader = csv.DictReader(f, delimiter="\t")
                fields = reader.fieldnames or []
                keys = [spec.text_a, spec.text_b, spec.label]
                missing = [k for k in keys if k is not None and k not in fields]
                if missing:
                    raise DataError(f"{path}: header {fields} lacks columns {missing}")
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in row or any(v is None for v in row.values()):
                        raise DataError(f"{where}: expected {len(fields)} columns")
                    b = row[str(spec.text_b)] if spec.text_b is not None else None
                    pairs.append((row[str(spec.text_a)], b))
                    labels.append(_parse_label(info, row[str(spec.label)], where))
                return pairs, _labels_array(info, labels)

            reader_ = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            ncols = spec.ncols
            index: dict[str | int, int] = {}
            if spec.header:
                header = next(reader_, None)
                if header is None:
                    raise DataError(f"{path}: empty file (expected a header row)")
                index = {name.strip(): i for i, name in enumerate(header)}
                ncols = len(header)
            for key in (spec.text_a, spec.text_b, spec.label):
                if key is None:
                    continue
                if isinstance(key, int):
                    index[key] = key
                elif key not in index:
                    raise DataError(f"{path}: header lacks column {key!r} (has {list(index)})")
            col_a, col_lab = index[spec.text_a], index[spec.label]
            col_b = index[spec.text_b] if spec.text_b is not None else None
            for cells in reader_:
                if not cells:
                    continue
                where = f"{path}:{reader_.line_num}"
                if ncols is not None and len(cells) != ncols:
                    raise DataError(f"{where}: expected {ncols} tab-separated columns, got {len(cells)}")
                pairs.append((cells[col_a], cells[col_b] if col_b is not None else None))
                labels.append(_parse_label(info, cells[col_lab], where))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed TSV ({exc})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return pairs, _labels_array(info, labels)


def _read_pool(path: Path, info: TaskInfo) -> tuple[list[TextPair], np.ndarray]:
    """Parse a glue-pools JSON file: ``{"0": {"text_a", "text_b", "label"}, ...}``, rows in key order."""
    try:
        with path.open(encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object keyed by row number")
    try:
        keys = sorted(obj, key=int)
    except ValueError:
        raise DataError(f"{path}: row keys must be integers") from None
    pairs: list[TextPair] = []
    labels: list[int | float] = []
    for key in keys:
        row = obj[key]
        where = f"{path}[{key}]"
        if not isinstance(row, dict) or not {"text_a", "label"} <= row.keys():
            raise DataError(f"{where}: expected an object with text_a, text_b, label")
        text_b = row.get("text_b")
        pairs.append((str(row["text_a"]), None if text_b is None else str(text_b)))
        labels.append(_parse_label(info, str(row["label"]), where))
    return pairs, _labels_array(info, labels)


def _read_local(path: Path, info: TaskInfo, spec: _TsvSpec | None) -> tuple[list[TextPair], np.ndarray]:
    return _read_pool(path, info) if spec is None else _read_tsv(path, info, spec)


# --------------------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------------------


def _is_classification(labels: np.ndarray) -> bool:
    return bool(np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_)


def _stratified_indices(labels: np.ndarray, limit: int, seed: int) -> npt.NDArray[np.int64]:
    """At most ``limit`` indices, seeded; per class in proportion to its size (largest remainder)."""
    n = len(labels)
    if limit >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if not _is_classification(labels):
        return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (limit / n)
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: limit - int(take.sum())]] += 1
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(take[c]), replace=False)
        for c in range(len(classes))
        if take[c] > 0
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")


def _apply_limit(data: LabeledData, limit: int | None, seed: int) -> LabeledData:
    if limit is None or limit >= len(data):
        return data
    return data.subset(_stratified_indices(data.labels, limit, seed))


# --------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------


def _datasets_available() -> bool:
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _no_data_message(info: TaskInfo, split: str, wanted: str | None) -> str:
    where = f" (looked for {wanted})" if wanted else ""
    return (
        f"no data for {info.name}/{split}{where}: set {DATA_DIR_ENV} (or pass data_dir) to a folder laid "
        "out like the shared data folder (glue/, glue-kshot/, glue-pools/, cifar10/)"
    )


def load_split(
    task: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    source: str = "auto",
    limit: int | None = None,
    seed: int = 0,
) -> LabeledData:
    """Load one labelled split (``"train"`` or ``"dev"``) of a task, the same way everywhere.

    Sources: ``"local"`` reads the data folder (``data_dir``, else ``$FFM_DATA_DIR``); ``"hf"`` downloads
    ``nyu-mll/glue`` with the optional ``datasets`` package; ``"sklearn"`` is the bundled digits set;
    ``"auto"`` picks local when the file is there, else the hub when ``datasets`` is installed.

    Local GLUE files and what they are (they differ from the hub's splits for three tasks):

    * SST-2, CoLA, MRPC, RTE, STS-B: the official GLUE train and dev TSVs.
    * QNLI: dev = official GLUE dev; train = ``glue-pools/QNLI/train.json`` (8,999 GLUE-train rows; the full
      GLUE QNLI train is not in the folder).
    * MNLI: dev = ``glue/MNLI/dev_matched_subset1024.tsv``, a 1,024-row random subset of validation_matched;
      train = ``glue-pools/MNLI/train.json`` (8,999 GLUE-train rows).
    * QQP: train = ``glue-pools/QQP/train.json``; dev = ``glue-pools/QQP/dev.json``, 1,000 held-out rows of
      QQP *train* -- **not the official QQP dev set**; say so when reporting QQP numbers.
    * cifar10: train = the 500-per-class JPEG subset, dev = the full 10,000-image test set (needs Pillow).
    * digits: scikit-learn's 1,797 8x8 digits, fixed stratified 80/20 train/dev split.

    ``limit`` keeps at most that many examples, drawn with ``seed``, stratified by label for classification
    (for cifar10 only the kept images are decoded, so a small limit is cheap).
    """
    info = get_task(task)
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}")
    if source not in _SOURCES:
        raise ConfigError(f"source must be one of {_SOURCES}, got {source!r}")
    _check_limit(limit)

    if info.name == "digits":
        if source not in ("auto", "sklearn"):
            raise ConfigError(f"digits come from scikit-learn only (source 'auto' or 'sklearn'), not {source!r}")
        return _apply_limit(_load_digits(split), limit, seed)
    if source == "sklearn":
        raise ConfigError(f"source 'sklearn' only provides the digits task, not {info.name}")
    if info.name == "cifar10":
        if source == "hf":
            raise ConfigError("cifar10 is read from the data folder only (source 'auto' or 'local')")
        root = resolve_data_dir(data_dir)
        return _load_cifar10(root, split, limit, seed)

    if source == "hf":
        return _apply_limit(_load_hf(info, split), limit, seed)

    root = resolve_data_dir(data_dir)
    rel, spec = _local_file(info.name, split)
    path = root / rel if root is not None else None
    if path is not None and path.is_file():
        pairs, labels = _read_local(path, info, spec)
        origin = f"local:{rel}"
        if info.name == "qqp" and split == "dev":
            origin += " (held-out QQP train rows, not the official QQP dev set)"
        data = LabeledData(info, pairs, labels, split=split, source=origin)
        return _apply_limit(data, limit, seed)
    if source == "local":
        if path is None:
            raise DataError(_no_data_message(info, split, rel))
        raise DataError(f"{info.name}/{split}: file {path} not found")
    if _datasets_available():
        return _apply_limit(_load_hf(info, split), limit, seed)
    raise DataError(
        _no_data_message(info, split, str(path) if path is not None else rel)
        + "; or, on a machine that is online, `pip install datasets` to fetch GLUE from the Hugging Face hub"
    )


def load_kshot(
    task: str, seed: int, *, data_dir: str | Path | None = None, k: int = 16
) -> tuple[LabeledData, LabeledData]:
    """The LM-BFF few-shot (train, dev) pair ``glue-kshot/<TASK>/<k>-<seed>/`` used by few-shot papers.

    Both halves are drawn from the GLUE *training* data (16 per class; STS-B 32 pairs); evaluate on the
    GLUE dev sets (``load_split(task, "dev")``). Seeds shipped: 13, 21, 42, 87, 100.
    """
    info = get_task(task)
    if info.name not in _GLUE_TASKS:
        raise ConfigError(f"k-shot splits exist for the GLUE tasks only, not {info.name}")
    root = resolve_data_dir(data_dir)
    rel_dir = f"glue-kshot/{_GLUE_DIRS[info.name]}/{k}-{seed}"
    if root is None:
        raise DataError(_no_data_message(info, f"{k}-shot seed {seed}", rel_dir))
    folder = root / rel_dir
    if not folder.is_dir():
        parent = folder.parent
        have = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise DataError(f"{folder} not found (available: {', '.join(have) or 'none'})")
    spec = _KSHOT_TSV[info.name]
    dev_name = "dev_matched.tsv" if info.name == "mnli" else "dev.tsv"
    out = []
    for split, name in (("train", "train.tsv"), ("dev", dev_name)):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{info.name} k-shot: file {path} not found")
        pairs, labels = _read_tsv(path, info, spec)
        out.append(LabeledData(info, pairs, labels, split=f"{k}shot-{seed}/{split}", source=f"local:{rel_dir}/{name}"))
    return out[0], out[1]


_HF_COLUMNS: dict[str, tuple[str, str | None]] = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
    "qqp": ("question1", "question2"),
}


def _load_hf(info: TaskInfo, split: str) -> LabeledData:
    """GLUE from the Hugging Face hub (official splits; MNLI dev = validation_matched)."""
    hf_split = "train" if split == "train" else ("validation_matched" if info.name == "mnli" else "validation")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{info.name}/{split}: source 'hf' needs the `datasets` package (pip install 'ffm[hf]' or "
            f"pip install datasets) and network access; offline, set {DATA_DIR_ENV} instead"
        ) from exc
    try:
        ds: Any = datasets.load_dataset(_HF_GLUE, info.name, split=hf_split)
        col_a, col_b = _HF_COLUMNS[info.name]
        texts_a = list(ds[col_a])
        texts_b = list(ds[col_b]) if col_b is not None else [None] * len(texts_a)
        raw_labels = list(ds["label"])
    except Exception as exc:
        raise DataError(
            f"{info.name}/{split}: loading {_HF_GLUE}/{info.name} ({hf_split}) from the Hugging Face hub "
            f"failed ({type(exc).__name__}: {exc}); check network access, or set {DATA_DIR_ENV} to local data"
        ) from exc
    pairs: list[TextPair] = [(str(a), None if b is None else str(b)) for a, b in zip(texts_a, texts_b, strict=True)]
    labels = _labels_array(info, raw_labels)
    return LabeledData(info, pairs, labels, split=split, source=f"hf:{_HF_GLUE}/{info.name}/{hf_split}")


_DIGITS_SPLIT_SEED = 1797
_DIGITS_DEV_FRACTION = 0.2


def _load_digits(split: str) -> LabeledData:
    """scikit-learn's digits as RGB uint8 images.

    The 80/20 split uses a fixed seed (never the caller's), so the dev set is the same in every run.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the digits task needs scikit-learn (pip install scikit-learn)") from exc
    bunch: Any = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    gray = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    dev_parts = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        dev_parts.append(idx[: round(len(idx) * _DIGITS_DEV_FRACTION)])
    dev_mask = np.zeros(len(labels), dtype=bool)
    dev_mask[np.concatenate(dev_parts)] = True
    keep = dev_mask if split == "dev" else ~dev_mask
    return LabeledData(TASKS["digits"], rgb[keep], labels[keep], split=split, source="sklearn:load_digits")


_CIFAR10_ZIPS = {"train": "cifar10_train_500perclass_jpg.zip", "dev": "cifar10_test_jpg.zip"}


def _decode_jpeg(data: bytes) -> np.ndarray:
    """One JPEG -> uint8 (H, W, 3). Pillow is imported here so the rest of the module works without it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("reading the CIFAR-10 JPEGs needs Pillow (pip install Pillow)") from exc
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _load_cifar10(root: Path | None, split: str, limit: int | None, seed: int) -> LabeledData:
    info = TASKS["cifar10"]
    rel = f"cifar10/{_CIFAR10_ZIPS[split]}"
    if root is None:
        raise DataError(_no_data_message(info, split, rel))
    path = root / rel
    if not path.is_file():
        raise DataError(f"cifar10/{split}: file {path} not found")
    try:
        with zipfile.ZipFile(path) as zf:
            names: list[str] = []
            label_list: list[int] = []
            for name in sorted(zf.namelist()):
                if name.endswith("/") or not name.lower().endswith((".jpg", ".jpeg")):
                    continue
                parts = name.split("/")
                if len(parts) < 2 or parts[-2] not in info.label_names:
                    raise DataError(f"{path}: member {name!r} is not under a CIFAR-10 class folder")
                names.append(name)
                label_list.append(info.label_names.index(parts[-2]))
            if not names:
                raise DataError(f"{path}: no JPEG members")
            labels = np.asarray(label_list, dtype=np.int64)
            keep = _stratified_indices(labels, limit, seed) if limit is not None else np.arange(len(names))
            images = [_decode_jpeg(zf.read(names[int(i)])) for i in keep]
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a valid zip file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    shapes = {img.shape for img in images}
    if len(shapes) != 1:
        raise DataError(f"{path}: images have different shapes {sorted(shapes)}")
    return LabeledData(info, np.stack(images), labels[keep], split=split, source=f"local:{rel}")


# --------------------------------------------------------------------------------------------------------
# Federated partitioning and few-shot sampling
# --------------------------------------------------------------------------------------------------------


def _partition_groups(labels: np.ndarray, num_bins: int) -> np.ndarray:
    """Class ids for partitioning: labels as-is, or quantile bins of real-valued (regression) labels."""
    if _is_classification(labels):
        return np.unique(labels, return_inverse=True)[1].reshape(-1)
    values = labels.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ConfigError("labels contain NaN or infinite values")
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, num_bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny alpha: all mass on one client
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_per_client: int = 1,
    num_bins: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Split example indices over ``num_clients`` with label skew, the standard non-IID FL benchmark.

    For each class, client shares are drawn from Dirichlet(``alpha``): small alpha (0.1) gives clients few
    classes, large alpha (100) approaches IID; ``alpha=float("inf")`` is exactly IID (a shuffled, even
    split). Real-valued (regression) labels are first binned into ``num_bins`` quantile bins, which then act
    as classes. Draws are retried (up to ``max_tries``) until every client has ``min_per_client`` examples;
    if that still fails, examples are moved from the largest clients to the short ones. Every index lands
    on exactly one client; the result (sorted index arrays, one per client) depends only on ``seed``.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {arr.shape}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}")
    try:
        alpha_f = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be a positive number or inf, got {alpha!r}") from None
    if math.isnan(alpha_f) or alpha_f <= 0:
        raise ConfigError(f"alpha must be a positive number or inf, got {alpha!r}")
    if isinstance(min_per_client, bool) or not isinstance(min_per_client, int) or min_per_client < 0:
        raise ConfigError(f"min_per_client must be a non-negative integer, got {min_per_client!r}")
    if num_bins < 1 or max_tries < 1:
        raise ConfigError("num_bins and max_tries must be positive")
    n, k = len(arr), int(num_clients)
    if n < k * min_per_client:
        raise ConfigError(f"cannot give {k} clients at least {min_per_client} examples each from {n} examples")
    rng = np.random.default_rng(seed)

    if math.isinf(alpha_f):
        return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), k)]

    groups = _partition_groups(arr, num_bins)
    by_class = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    clients: list[list[int]] = [[] for _ in range(k)]
    for _ in range(max_tries):
        clients = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(_dirichlet(rng, alpha_f, k))[:-1] * len(idx)).astype(np.int64)
            for c, part in enumerate(np.split(idx, cuts)):
                clients[c].extend(part.tolist())
        if min(len(c) for c in clients) >= min_per_client:
            break
    else:
        _redistribute(clients, min_per_client, rng)
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in clients]


def _redistribute(clients: list[list[int]], minimum: int, rng: np.random.Generator) -> None:
    """Top up short clients with random examples taken from the currently largest client."""
    for c in range(len(clients)):
        while len(clients[c]) < minimum:
            donor = max(range(len(clients)), key=lambda j: len(clients[j]))
            pool = clients[donor]
            moved = pool.pop(int(rng.integers(len(pool))))
            clients[c].append(moved)


def kshot_sample(labels: np.ndarray, k: int, *, seed: int) -> npt.NDArray[np.int64]:
    """Indices of ``k`` examples per class (``k`` in total for real-valued labels), seeded and sorted.

    For building few-shot client datasets beyond the fixed LM-BFF splits. A class with fewer than ``k``
    examples is an error rather than a silently smaller shot count.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {arr.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    rng = np.random.default_rng(seed)
    if not _is_classification(arr):
        if len(arr) < k:
            raise DataError(f"cannot draw {k} examples from {len(arr)}")
        return np.sort(rng.choice(len(arr), size=int(k), replace=False)).astype(np.int64)
    chosen = []
    for c in np.unique(arr):
        idx = np.flatnonzero(arr == c)
        if len(idx) < k:
            raise DataError(f"class {c!r} has only {len(idx)} examples, fewer than k={k}")
        chosen.append(rng.choice(idx, size=int(k), replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def describe(data: LabeledData) -> str:
    """One log line saying what was loaded and from where (counts catch wrong files and bad limits)."""
    name = f"{data.info.name}/{data.split}" if data.split else data.info.name
    parts = [f"{name}: {len(data)} examples"]
    if isinstance(data.inputs, np.ndarray) and data.inputs.ndim == 4:
        _, h, w, ch = data.inputs.shape
        parts[0] += f" ({h}x{w}x{ch} images)"
    if data.info.is_regression:
        if len(data):
            lab = data.labels
            parts.append(f"scores mean {float(lab.mean()):.2f} in [{float(lab.min()):.2f}, {float(lab.max()):.2f}]")
        else:
            parts.append("no scores")
    else:
        parts.append(f"labels {data.label_counts()}")
    parts.append(f"source {data.source or 'unknown'}")
    return ", ".join(parts)
