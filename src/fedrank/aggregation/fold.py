"""Folding what a client does not train into its frozen base weight (Fed-PLoRA, FedEx-LoRA, RoLoRA).

A client that trains only some rank indices S of the global adapter (B, A) at scaling s starts from

    W0 + D + s·Σ_{i∉S} B[:, i] A[i, :]  (frozen)   +   s·B[:, S] A[S, :]  (trainable),

which is the global model W0 + D + s·B A exactly: no index is truncated or re-initialised. D is a dense
delta already folded into the base (FedEx-LoRA's residual), if any.

The server sends the unselected modules themselves, (B[:, rest], A[rest]) per layer, as
:attr:`ClientAssignment.frozen` (R − |S| rank-1 modules, (R − |S|)·(m + n) numbers, not a dense m×n
matrix), and the client folds them into its base: :func:`dense_base` is the one place the dense delta is
built.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedrank.types import ClientAssignment, LoraFactors

__all__ = ["complement", "dense_base", "dense_base_layer", "select_indices"]


def select_indices(factors: Mapping[str, LoraFactors], idx: Tensor) -> dict[str, LoraFactors]:
    """Every layer's rank indices ``idx`` (columns of B, rows of A), copied."""
    return {k: LoraFactors(f.B[:, idx].clone(), f.A[idx].clone()) for k, f in factors.items()}


def complement(factors: Mapping[str, LoraFactors], keep: Tensor) -> dict[str, LoraFactors] | None:
    """Every layer's modules not in ``keep`` (B[:, rest], A[rest]), copied: what the client holds frozen.

    None when ``keep`` holds every index, so that a client holding every index has nothing to fold.
    """
    rank = next(iter(factors.values())).rank
    mask = torch.ones(rank, dtype=torch.bool)
    mask[keep] = False
    rest = mask.nonzero().flatten()
    if rest.numel() == 0:
        return None
    return select_indices(factors, rest)


def dense_base_layer(a: ClientAssignment, name: str) -> Tensor | None:
    """Layer ``name``'s dense delta on W0 for assignment ``a``: base_delta + scaling·B_frozen A_frozen.

    None when the assignment has neither part; a part it has must cover the layer (KeyError otherwise).
    """
    base = None if a.base_delta is None else a.base_delta[name]
    f = None if not a.frozen else a.frozen[name]
    if f is None:
        return base
    folded = a.scaling * (f.B @ f.A)
    return folded if base is None else base + folded.to(base.dtype)


def dense_base(a: ClientAssignment) -> dict[str, Tensor] | None:
    """The dense delta the client of ``a`` adds to its base weights, per layer.

    Without frozen modules this is ``a.base_delta`` itself (the same object, so that the model host sees the
    delta it already applied and does not rewrite the weights), None when there is no base delta either.
    """
    if not a.frozen:
        return a.base_delta
    names = dict.fromkeys([*a.frozen, *(a.base_delta or {})])
    return {name: d for name in names if (d := dense_base_layer(a, name)) is not None}
