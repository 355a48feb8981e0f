"""The paper's own numbers (Tables 1-3 of "Federated Foundation Models", section 5), for reference columns.

Copied from the paper's text. They were measured on models this project cannot load offline
(DistilBERT, RoBERTa, ResNet-50, ViT), so they are labelled with the paper's model wherever shown and
never mixed with this project's figures. Tables 1 and 2 report the best of five trials; Table 3 the
median of five. All values are percentages.
"""

from __future__ import annotations

__all__ = ["PAPER_STATISTIC", "TABLE1", "TABLE2", "TABLE2_SHOTS", "TABLE3"]

_T1_TASKS = ("sst2", "mrpc", "mnli", "qqp", "qnli", "cola", "rte", "stsb")


def _row(*values: float) -> dict[str, float]:
    return dict(zip(_T1_TASKS, values, strict=True))


#: Table 1, 32-shot, 10 institutions: model -> method -> task -> %.
TABLE1: dict[str, dict[str, dict[str, float]]] = {
    "DistilBERT": {
        "centralized": _row(69.38, 60.53, 41.03, 60.50, 53.07, 54.07, 48.38, 33.20),
        "fl": _row(83.14, 64.00, 46.47, 66.75, 67.05, 72.29, 54.15, 59.64),
        "ffm": _row(80.05, 72.06, 51.61, 67.52, 70.00, 72.96, 56.68, 80.38),
    },
    "RoBERTa": {
        "centralized": _row(71.67, 71.08, 38.15, 62.73, 58.12, 71.05, 49.46, 73.31),
        "fl": _row(86.58, 74.51, 49.01, 71.28, 77.89, 75.84, 58.48, 83.62),
        "ffm": _row(84.63, 78.43, 49.88, 70.27, 75.71, 71.81, 54.15, 82.35),
    },
}

TABLE2_SHOTS = (4, 8, 16, 32, 64)

#: Table 2, DistilBERT: task -> method -> {k: %}.
TABLE2: dict[str, dict[str, dict[int, float]]] = {
    "sst2": {
        "centralized": dict(zip(TABLE2_SHOTS, (65.14, 62.16, 75.80, 70.87, 78.67), strict=True)),
        "fl": dict(zip(TABLE2_SHOTS, (66.00, 79.70, 79.00, 83.14, 84.98), strict=True)),
        "ffm": dict(zip(TABLE2_SHOTS, (74.54, 80.28, 82.80, 80.05, 83.72), strict=True)),
    },
    "mrpc": {
        "centralized": dict(zip(TABLE2_SHOTS, (61.20, 62.00, 63.48, 60.53, 63.24), strict=True)),
        "fl": dict(zip(TABLE2_SHOTS, (64.00, 55.60, 65.00, 64.00, 73.50), strict=True)),
        "ffm": dict(zip(TABLE2_SHOTS, (66.67, 62.01, 70.83, 72.06, 76.96), strict=True)),
    },
}

#: Table 3 (12-shot CIFAR, 8-shot Flower102; 5 institutions): model -> dataset -> method -> (accuracy, F1).
TABLE3: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "ResNet-50": {
        "cifar10": {"centralized": (60.08, 59.08), "fl": (55.14, 54.30), "ffm": (78.66, 78.62)},
        "cifar100": {"centralized": (49.76, 49.13), "fl": (41.94, 39.16), "ffm": (68.96, 68.79)},
        "flowers102": {"centralized": (80.11, 79.35), "fl": (5.48, 5.30), "ffm": (90.39, 90.21)},
    },
    "ViT": {
        "cifar10": {"centralized": (82.03, 82.31), "fl": (67.63, 67.40), "ffm": (93.32, 93.33)},
        "cifar100": {"centralized": (68.42, 68.52), "fl": (64.81, 64.63), "ffm": (85.83, 85.75)},
        "flowers102": {"centralized": (92.03, 92.00), "fl": (81.93, 81.47), "ffm": (96.32, 96.30)},
    },
}

#: Which statistic the paper reports in each table.
PAPER_STATISTIC = {"table1": "best of 5", "table2": "best of 5", "table3": "median of 5"}
