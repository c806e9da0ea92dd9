"""Seeded distributions of LoRA ranks over clients (FlexLoRA §4.1's heterogeneous resources).

The four named distributions follow the official FlexLoRA code (alibaba/FederatedScope, branch
``FlexLoRA``, ``main.py`` ``get_peft``, L121-172), which draws one of four client "types": Type_0 rank 8,
Type_1 rank 200, Type_2 rank 30 on attention / 200 on the MLP, Type_3 rank 30. Ordered by size, the
types are rank positions 0 (8), 1 (30), 2 (30/200) and 3 (200) of a 4-rank list, so for 4 ranks:

* ``uniform``: ``randint(0, 4)``: 25% each.
* ``heavy_tail_weak`` (the code's ``heavy_tail``): 80% Type_0, 10% Type_1, 5% Type_2, 5% Type_3, i.e.
  [0.80, 0.05, 0.05, 0.10] over ranks by size: most clients weak, the next-largest share on the *largest*
  rank. The official README says instead "85% ... and the rest uniformly"; we follow the code.
* ``heavy_tail_strong``: 80% Type_1, 10% Type_2, 5% Type_3, 5% Type_0: [0.05, 0.05, 0.10, 0.80].
* ``normal``: ``norm.pdf(type index; μ=1.5, σ=0.7)`` normalised, which by the type order gives
  [0.0575, 0.0575, 0.4425, 0.4425] by size (the two largest configurations get 88.5%). We follow the code.

For a list of other length k: weak = 80% on the smallest, 10% on the largest, 10% spread evenly over the
rest (strong mirrored: 80% largest, 10% second largest, 10% spread over the rest); normal = a normal
over rank positions centred on the middle with σ = 0.7·(k−1)/3 (the official σ rescaled). Two more:

* ``fixed``: every client at one rank (the first of the list).
* ``budget``: each client's memory budget decides: the largest rank whose training fits
  (:func:`training_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DISTRIBUTIONS", "ModelFootprint", "assign_ranks", "budget_ranks", "rank_for_budget", "training_bytes"]


def _spread(k: int, head: int, second: int) -> np.ndarray:
    """80% at position ``head``, 10% at ``second``, 10% spread evenly over the other positions."""
    p = np.zeros(k)
    p[head] = 0.8
    rest = [i for i in range(k) if i not in (head, second)]
    if not rest:
        p[second] = 0.2
        return p
    p[second] = 0.1
    p[rest] = 0.1 / len(rest)
    return p


def _probs_uniform(k: int) -> np.ndarray:
    return np.full(k, 1.0 / k)


def _probs_weak(k: int) -> np.ndarray:
    return np.ones(1) if k == 1 else _spread(k, 0, k - 1)


def _probs_strong(k: int) -> np.ndarray:
    return np.ones(1) if k == 1 else _spread(k, k - 1, k - 2)


def _probs_normal(k: int) -> np.ndarray:
    if k == 4:  # the official code: pdf at the type index, types ordered [8, 200, 30/200, 30]
        by_type = np.exp(-0.5 * ((np.arange(4) - 1.5) / 0.7) ** 2)
        p = by_type[[0, 3, 2, 1]]
        return np.asarray(p / p.sum())
    x = np.arange(k) - (k - 1) / 2.0
    sigma = max(0.7 * (k - 1) / 3.0, 0.5)
    p = np.exp(-0.5 * (x / sigma) ** 2)
    return np.asarray(p / p.sum())


def _probs_fixed(k: int) -> np.ndarray:
    p = np.zeros(k)
    p[0] = 1.0
    return p


DISTRIBUTIONS: Mapping[str, Callable[[int], np.ndarray]] = {
    "uniform": _probs_uniform,
    "heavy_tail_weak": _probs_weak,
    "heavy_tail_strong": _probs_strong,
    "normal": _probs_normal,
    "fixed": _probs_fixed,
}
"""Name -> probabilities over the (sorted) rank list; ``budget`` is handled by :func:`rank_for_budget`."""


def assign_ranks(distribution: str, ranks: Sequence[int], num_clients: int, seed: int) -> list[int]:
    """Each client's rank, drawn i.i.d. from ``distribution`` over ``ranks`` with a seeded generator."""
    if distribution not in DISTRIBUTIONS:
        choices = ", ".join([*DISTRIBUTIONS, "budget"])
        raise ValueError(f"unknown rank distribution {distribution!r}; choices: {choices}")
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive integers, got {list(ranks)}")
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    pool = sorted(set(int(r) for r in ranks))
    p = DISTRIBUTIONS[distribution](len(pool))
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=num_clients, p=p)]


@dataclass(frozen=True)
class ModelFootprint:
    """What training memory depends on: model size, the LoRA layers' shapes and the activations."""

    base_params: int
    lora_shapes: tuple[tuple[int, int], ...]
    num_layers: int
    hidden: int
    seq_len: int = 256
    batch_size: int = 1
    base_bytes_per_param: int = 4
    activation_factor: float = 16.0
    """Activation bytes per token per layer per hidden unit kept for backward (fp32, empirical ~16)."""


def training_bytes(fp: ModelFootprint, rank: int) -> int:
    """Estimated peak bytes of LoRA training at ``rank``.

    bytes = base_params·b_base                                  (frozen weights)
          + 16·P_lora,  P_lora = r·Σ_layers (m + n)              (fp32 param + grad + AdamW m, v)
          + activation_factor·4·batch·seq·hidden·num_layers      (activations kept for backward)
          + 4·batch·seq·r·len(lora_shapes)                       (LoRA's own A·x activations)
    """
    lora = rank * sum(m + n for m, n in fp.lora_shapes)
    tokens = fp.batch_size * fp.seq_len
    act = fp.activation_factor * 4 * tokens * fp.hidden * fp.num_layers
    lora_act = 4 * tokens * rank * len(fp.lora_shapes)
    return int(fp.base_params * fp.base_bytes_per_param + 16 * lora + act + lora_act)


def rank_for_budget(budget_bytes: float, ranks: Sequence[int], fp: ModelFootprint) -> int:
    """The largest rank of ``ranks`` whose :func:`training_bytes` fits ``budget_bytes``."""
    fitting = [r for r in sorted(ranks) if training_bytes(fp, r) <= budget_bytes]
    if not fitting:
        need = training_bytes(fp, min(ranks))
        raise ValueError(
            f"a budget of {budget_bytes / 2**20:.1f} MiB fits no rank; rank {min(ranks)} needs {need / 2**20:.1f} MiB"
        )
    return fitting[-1]


def budget_ranks(
    budgets_mib: Sequence[float], ranks: Sequence[int], num_clients: int, seed: int, fp: ModelFootprint
) -> list[int]:
    """``budget``: each client draws a memory budget (MiB) uniformly from ``budgets_mib`` (seeded) and
    trains at the largest rank of ``ranks`` that fits it (:func:`rank_for_budget`)."""
    if not budgets_mib or any(b <= 0 for b in budgets_mib):
        raise ValueError(f"the budget distribution needs positive budgets in MiB, got {list(budgets_mib)}")
    fits = {b: rank_for_budget(b * 2**20, ranks, fp) for b in set(budgets_mib)}
    rng = np.random.default_rng(seed)
    return [fits[budgets_mib[i]] for i in rng.integers(0, len(budgets_mib), size=num_clients)]
