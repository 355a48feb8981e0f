"""Run a paper experiment grid: the same as ``ffm-hub experiment`` (see ``--help``).

    FFM_DATA_DIR=/path/to/data nice -n 10 python benchmarks/paper/run.py benchmarks/paper/table1.toml \
        --tasks sst2,mrpc --budget-min 60

Results: ``benchmarks/results/paper/runs/<key>.json`` (one per finished run, reused by later invocations)
and ``benchmarks/results/paper/<name>.md`` / ``.json`` / ``*.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
    from ffm_hub.experiments.cli import main

    sys.exit(main())
