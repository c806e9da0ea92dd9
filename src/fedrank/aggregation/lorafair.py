"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", 2024/ICCV 2025).

Homogeneous ranks. The server averages Ā = Σ p_k A_k, B̄ = Σ p_k B_k and corrects B̄ with the residual
ΔB that best matches the ideal update ΔW = Σ p_k B_k A_k given Ā:

    ΔB = argmin ‖ΔW − (B̄ + ΔB)Ā‖²_F + λ‖ΔB‖²_F = (ΔW − B̄Ā)Āᵀ (ĀĀᵀ + λI)⁻¹,

computed without forming ΔW: (ΔW − B̄Ā)Āᵀ = Σ p_k B_k (A_k Āᵀ) − B̄ (ĀĀᵀ). Clients start from (B̄ + ΔB, Ā).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    LoraState,
    check_layers,
    normalized_weights,
)
from fedrank.aggregation.fedit import FedIT, fedavg_factors, require_rank
from fedrank.types import ClientUpdate, LoraFactors


def residual_correction(parts: Sequence[LoraFactors], p: Tensor, mean: LoraFactors, lam: float) -> Tensor:
    """ΔB = (Σ p_k B_k A_k Āᵀ − B̄ĀĀᵀ)(ĀĀᵀ + λI)⁻¹, in float64."""
    A_bar, B_bar = mean.A.double(), mean.B.double()
    gram = A_bar @ A_bar.T
    rhs = sum(float(w) * (f.B.double() @ (f.A.double() @ A_bar.T)) for w, f in zip(p, parts, strict=True))
    rhs = rhs - B_bar @ gram
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    # ΔB (G + λI) = rhs  <=>  (G + λI) ΔBᵀ = rhsᵀ (G symmetric).
    dB: Tensor = torch.linalg.solve(gram + lam * eye, rhs.T).T
    return dB


@dataclass(frozen=True)
class LoRAFAIR(FedIT):
    """FedIT's dispatch (one rank, the global factors) with the residual-corrected aggregate."""

    lam: float = 1e-3
    name: ClassVar[str] = "lorafair"
    secure_refused: ClassVar[str] = "its correction needs Σ_k p_k B_k (A_k Āᵀ), products of each client's factors"

    dp_refused: ClassVar[str] = (
        "its correction mixes products of each client's factors with the factor means; no per-client bound is"
        " stated for it"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lorafair: lam must be >= 0, got {self.lam}")

    def secure_mean(self) -> str | None:
        return None

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        p = normalized_weights(updates, weights)
        require_rank(self.name, state.rank, [u.spec for u in updates])
        check_layers(state.factors, updates)
        out = {}
        for name in state.factors:
            parts = [u.factors[name] for u in updates]
            mean = fedavg_factors(parts, p)
            dB = residual_correction(parts, p, mean, self.lam)
            out[name] = LoraFactors(mean.B + dB.to(mean.B.dtype), mean.A)
        return LoraState(out)
