"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024).

The server keeps LoRA at the largest rank r_max. Client k receives the first r_k rank indices
(B[:, :r_k], A[:r_k]). Aggregation zero-pads every update to r_max and weighs it by its
"sparsity" norm times its data share:

    w_k ∝ p_k · ‖B_k A_k‖_F,   B ← Σ_k w_k pad(B_k),   A ← Σ_k w_k pad(A_k)   (Σ w_k = 1, per layer).

Rank self-pruning (client side, §3.3): the client adds λ·‖B[:, r':]‖_F‖A[r':]‖_F, r' = ⌊γ·r_k⌋, to its
loss and drops the trailing r_k − r' indices when ‖B[:, r':]A[r':]‖_F / ‖BA‖_F falls below a threshold.
:class:`HetLoRAPruning` carries those options; the local trainer applies them.

One LoRA scale across ranks: every client trains at the global rank's scale s(R), not its own s(r_k), so a
rank index means the same update at every client and in the global model (:meth:`MethodOptions.assign`).

Privacy (``[privacy]``, :mod:`fedrank.privacy`) needs ``sparsity_weights = false``: the weights ‖B_k A_k‖_F
follow each client's data, so one client could move every other client's weight, and no clip bounds that.
Without them the rule is the zero-padded uniform mean B ← (1/K) Σ_k pad(B_k), A ← (1/K) Σ_k pad(A_k) (a
stated deviation from the paper, and what DP-FedAvg needs). Clipped is client k's (ΔB_k, ΔA_k), its factors
minus the first r_k indices it was sent, over all layers, to norm C; the noise N(0, σ²C²) goes on each
index's padded sum before the division by K. Replacing one client's update moves the mean by at most 2C/K
(:meth:`HetLoRA.dp_sensitivity`). Rank self-pruning is refused under DP (a client's pruned rank would show).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    LoraState,
    MethodOptions,
    check_layers,
    combine_by_index,
    first_indices,
    normalized_weights,
    truncated_factors,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


def product_norm(B: Tensor, A: Tensor) -> float:
    """‖B A‖_F without forming B A: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ)."""
    B64, A64 = B.double(), A.double()
    return float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0.0).sqrt())


@dataclass(frozen=True)
class HetLoRAPruning:
    """Client-side rank self-pruning: regulariser weight λ, decay γ and the norm-ratio threshold."""

    reg: float = 1e-3
    gamma: float = 0.9
    threshold: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"pruning gamma must be in (0, 1), got {self.gamma}")
        if self.reg < 0 or self.threshold < 0:
            raise ValueError("pruning reg and threshold must be >= 0")

    def keep(self, rank: int) -> int:
        """r' = ⌊γ·r⌋, at least 1."""
        return max(1, int(self.gamma * rank))

    def penalty(self, B: Tensor, A: Tensor) -> Tensor:
        """λ·‖B[:, r':]‖_F·‖A[r':]‖_F, differentiable; added to the client's loss."""
        k = self.keep(B.shape[1])
        penalty: Tensor = self.reg * torch.linalg.matrix_norm(B[:, k:]) * torch.linalg.matrix_norm(A[k:])
        return penalty

    def pruned_rank(self, layers: Sequence[LoraFactors]) -> int:
        """The client's new rank: r' if the trailing components are negligible in every layer, else r."""
        r = layers[0].rank
        k = self.keep(r)
        if k >= r:
            return r
        for f in layers:
            total = product_norm(f.B, f.A)
            if total > 0 and product_norm(f.B[:, k:], f.A[k:]) / total >= self.threshold:
                return r
        return k


@dataclass(frozen=True)
class HetLoRA(MethodOptions):
    name: ClassVar[str] = "hetlora"
    secure_refused: ClassVar[str] = "its Frobenius weights need each client's ‖B_k A_k‖_F"

    sparsity_weights: bool = True
    """Weigh each update by ‖B_k A_k‖_F (the paper); False: by the data share p_k alone (needed under DP)."""

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        factors = truncated_factors(state.factors, client.rank)
        return self.assign(client, factors, scale_rank=state.rank)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        p = normalized_weights(updates, weights)
        check_layers(state.factors, updates, state.rank)
        out = {}
        for name, prev in state.factors.items():
            parts = [u.factors[name] for u in updates]
            w = p
            if self.sparsity_weights:
                norms = torch.tensor([product_norm(f.B, f.A) for f in parts], dtype=torch.float64)
                w = p * norms
                # All-zero products (e.g. every B still 0) carry no sparsity signal: weigh by p alone.
                w = w / w.sum() if float(w.sum()) > 0 else p
            out[name] = combine_by_index(prev, parts, [first_indices(f.rank) for f in parts], w, mean=False)
        return LoraState(out)

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the zero-padded uniform mean: 2C over the K clients."""
        return 2 * clip / len(specs)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        r = rank or state.rank
        return self.dispatch(state, ClientSpec(-1, r, 0), 0)
