"""FedIT: FedAvg of LoRA's A and B, every client at one rank (Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", ICASSP 2024).

    A ← Σ_k p_k A_k,    B ← Σ_k p_k B_k,    p_k = n_k / Σ_j n_j.

Note Σ p_k B_k · Σ p_k A_k ≠ Σ p_k B_k A_k: the well-known aggregation noise that FLoRA, FlexLoRA and
LoRA-FAIR address. Mixed ranks are rejected: FedIT's "bucket effect" is to run every client at the
smallest rank of the pool.

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client k's (ΔB_k, ΔA_k), its factors minus the
global ones it was sent, over all layers, to norm C; the noise N(0, σ²C²) goes on Σ_k (B_k, A_k) before the
mean over the K clients (uniform weights). Replacing one client's update moves the mean by at most 2C/K
(:meth:`FedIT.dp_sensitivity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    LoraState,
    MethodOptions,
    check_layers,
    normalized_weights,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


def require_rank(method: str, rank: int, clients: Sequence[ClientSpec]) -> None:
    """Homogeneous-rank methods reject clients of any other rank, naming them."""
    wrong = sorted({c.rank for c in clients if c.rank != rank})
    if wrong:
        raise AggregationError(
            f"{method} needs every client at the global rank {rank}, got ranks {wrong}; "
            "use a heterogeneous-rank method (e.g. flexlora, fslora, hetlora, fedplora, fedex, rolora, raflora) "
            f"or give all clients rank {rank}"
        )


@dataclass(frozen=True)
class FedIT(MethodOptions):
    name: ClassVar[str] = "fedit"

    def secure_mean(self) -> str | None:
        return "weights"

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        require_rank(self.name, state.rank, [client])
        factors = {k: LoraFactors(f.B.clone(), f.A.clone()) for k, f in state.factors.items()}
        return self.assign(client, factors)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        p = normalized_weights(updates, weights)
        require_rank(self.name, state.rank, [u.spec for u in updates])
        check_layers(state.factors, updates)
        return LoraState({name: fedavg_factors([u.factors[name] for u in updates], p) for name in state.factors})

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the uniform mean: 2C over the K clients."""
        return 2 * clip / len(specs)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        require_rank(self.name, state.rank, [ClientSpec(-1, rank or state.rank, 0)])
        return ClientAssignment(-1, state.rank, self.scaling(state.rank), dict(state.factors), 0)


def fedavg_factors(parts: Sequence[LoraFactors], p: Tensor) -> LoraFactors:
    """Σ_k p_k B_k and Σ_k p_k A_k (equal ranks), in the first part's dtype."""
    dt = parts[0].A.dtype
    w = p.to(dt)
    B = torch.einsum("k,kmr->mr", w, torch.stack([f.B.to(dt) for f in parts]))
    A = torch.einsum("k,krn->rn", w, torch.stack([f.A.to(dt) for f in parts]))
    return LoraFactors(B, A)
