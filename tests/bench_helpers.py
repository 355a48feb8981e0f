"""Loading a benchmark script (``benchmarks/<name>.py``) as a module, for the tests of its pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``ffm_benchmark_<name>``; it is registered in ``sys.modules``
    before it runs, because dataclasses look their module up while a class is built."""
    spec = importlib.util.spec_from_file_location(f"ffm_benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
