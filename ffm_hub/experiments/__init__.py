"""Paper experiments (issue 5): declarative specs, a resumable runner over the real hub and edge code, and
tables and plots laid out like the paper's Tables 1-3.

    ffm-hub experiment benchmarks/paper/table1.toml --tasks sst2 --budget-min 60

See :mod:`ffm_hub.experiments.spec` (what a run is), :mod:`ffm_hub.experiments.splits` (how k-shot and
the Dirichlet α make the shards), :mod:`ffm_hub.experiments.runner` (the three methods) and
:mod:`ffm_hub.experiments.report` (the tables).
"""

from ffm_hub.experiments.spec import METHODS, RUNNER_VERSION, ExperimentSpec, RunSpec, load_experiment

__all__ = ["METHODS", "RUNNER_VERSION", "ExperimentSpec", "RunSpec", "load_experiment"]
