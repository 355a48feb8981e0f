"""The data of one seed: a public k-shot shard for the hub and C non-IID private k-shot shards.

How k-shot and the Dirichlet α combine (documented in the README and every result file):

1. **Public shard** (the hub's): ``kshot_sample(train labels, k_public, seed)``: exactly ``k_public``
   examples per class, drawn IID from the task's train split, so its label distribution matches the
   balanced test setting ("similar distribution to the benchmark test set", paper section 5.3).
2. **Private pool**: from the train examples *not* in the public shard, ``C · k_private`` examples per
   class (``kshot_sample`` again, seed + 1). On average that is ``k_private`` per class per institution.
3. **Label skew**: the pool is split over the C institutions by ``dirichlet_partition(α, seed + 2)``:
   for each class, the institutions' shares are drawn from Dirichlet(α) (small α: each institution sees
   few classes; α = inf: an even IID split). Each institution keeps at least ``min(2, k_private)``
   examples (redraws, then a top-up from the largest shard). So a "k-shot institution" holds
   ``k_private · num_classes`` examples *on average*, in skewed class proportions.

Regression tasks (STS-B) have no classes: k-shot means ``2k`` examples in all (as LM-BFF's 16-shot STS-B
has 32 pairs), and the Dirichlet split runs over 10 quantile bins of the score.

Everything depends only on (task, seed, C, k_public, k_private, α): the three methods of one seed see
the same shards. Example ids are row indices of the task's full train split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ffm_edge.data import dirichlet_partition, kshot_sample
from ffm_edge.errors import DataError

__all__ = ["Splits", "make_splits", "shots_for"]


def shots_for(k: int, regression: bool) -> int:
    """What ``kshot_sample`` is asked for: k per class, or 2k in all for regression."""
    return 2 * k if regression else k


@dataclass(frozen=True)
class Splits:
    """Example ids (rows of the train split) of the public shard and of each institution's shard."""

    public: np.ndarray
    private: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        everything = np.concatenate([self.public, *self.private]) if self.private else self.public
        if len(np.unique(everything)) != len(everything):
            raise DataError("shards overlap: an example is in two shards")

    @property
    def private_ids(self) -> np.ndarray:
        """Every private example id, sorted."""
        return np.sort(np.concatenate(self.private)) if self.private else np.zeros(0, dtype=np.int64)

    def fingerprint(self) -> str:
        """sha256 of the ids: equal across methods of one seed (stored in each result)."""
        h = hashlib.sha256()
        h.update(np.asarray(self.public, dtype=np.int64).tobytes())
        for part in self.private:
            h.update(b"|")
            h.update(np.asarray(part, dtype=np.int64).tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, object]:
        return {
            "public": [int(i) for i in self.public],
            "private": [[int(i) for i in part] for part in self.private],
            "fingerprint": self.fingerprint(),
        }


def make_splits(
    labels: np.ndarray,
    *,
    seed: int,
    institutions: int,
    k_public: int,
    k_private: int,
    alpha: float,
    regression: bool = False,
) -> Splits:
    """The public shard and the C private shards over ``labels`` (see the module docstring)."""
    labels = np.asarray(labels)
    public = kshot_sample(labels, shots_for(k_public, regression), seed=seed)
    rest = np.setdiff1d(np.arange(len(labels)), public)
    try:
        pool = rest[kshot_sample(labels[rest], shots_for(k_private, regression) * institutions, seed=seed + 1)]
    except DataError as exc:
        raise DataError(
            f"not enough train examples for {institutions} institutions × {k_private}-shot after the public "
            f"shard: {exc}"
        ) from exc
    minimum = min(2, k_private)
    parts = dirichlet_partition(labels[pool], institutions, alpha, seed=seed + 2, min_per_client=minimum)
    return Splits(public=np.sort(public), private=tuple(np.sort(pool[p]) for p in parts))
