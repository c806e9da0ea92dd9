"""Folding what a client does not train into its frozen base weight (Fed-PLoRA, FedEx-LoRA, RoLoRA).

A client that trains only some rank indices S of the global adapter (B, A) at scaling s starts from

    W0 + D + s·Σ_{i∉S} B[:, i] A[i, :]  (frozen)   +   s·B[:, S] A[S, :]  (trainable),

which is the global model W0 + D + s·B A exactly: no index is truncated or re-initialised. D is a dense
delta already folded into the base (FedEx-LoRA's residual), if any. The folded part is a dense m×n matrix
per layer, built at dispatch and handed to the client as :attr:`ClientAssignment.base_delta`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedrank.types import LoraFactors

__all__ = ["fold_complement", "select_indices"]


def select_indices(factors: Mapping[str, LoraFactors], idx: Tensor) -> dict[str, LoraFactors]:
    """Every layer's rank indices ``idx`` (columns of B, rows of A), copied."""
    return {k: LoraFactors(f.B[:, idx].clone(), f.A[idx].clone()) for k, f in factors.items()}


def fold_complement(
    factors: Mapping[str, LoraFactors],
    keep: Tensor,
    scaling: float,
    base: dict[str, Tensor] | None = None,
) -> dict[str, Tensor] | None:
    """D + s·B[:, rest] A[rest] per layer, rest = the indices not in ``keep``.

    With nothing left to fold, returns ``base`` itself (the same object, so the model host sees the delta it
    already applied and does not rewrite the weights), or None when there is no base either, so that a
    client holding every index trains on the untouched base weights.
    """
    rank = next(iter(factors.values())).rank
    mask = torch.ones(rank, dtype=torch.bool)
    mask[keep] = False
    rest = mask.nonzero().flatten()
    if rest.numel() == 0:
        return base
    out = {}
    for name, f in factors.items():
        folded = scaling * (f.B[:, rest] @ f.A[rest])
        out[name] = folded if base is None else base[name] + folded.to(base[name].dtype)
    return out
