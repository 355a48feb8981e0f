"""Helpers the benchmark scripts share: built sentences, timing, argparse types, package versions.

A script imports this as ``from _common import ...`` after putting its own folder on ``sys.path`` (Python
does that for ``python benchmarks/x.py``; a test that loads a script by path does not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["median_seconds", "package_version", "positive_int", "sentiment_sentences", "write_results"]

_POSITIVE = ("wonderful", "moving", "brilliant", "delightful", "superb", "charming", "gripping", "beautiful")
_NEGATIVE = ("dull", "lifeless", "tedious", "clumsy", "awful", "boring", "silly", "painful")
_SUBJECTS = ("film", "script", "cast", "story", "soundtrack", "ending", "direction", "performance")
_TEMPLATES = ("a {adj} {subj}", "the {subj} was {adj}", "what a {adj} {subj} this is", "i found the {subj} {adj}")


def sentiment_sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` short, balanced movie-review sentences (label 1 = positive) built from word lists."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    texts = [
        str(rng.choice(_TEMPLATES)).format(
            adj=rng.choice(_POSITIVE if label else _NEGATIVE), subj=rng.choice(_SUBJECTS)
        )
        for label in labels
    ]
    return texts, labels


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median wall time of ``repeats`` calls of ``fn``, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_results(out_dir: Path, name: str, result: Any, markdown: str) -> None:
    """``OUT_DIR/NAME.json`` (every figure) and ``NAME.md`` (the readable table), and the table on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / f"{name}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.md')}", file=sys.stderr)
