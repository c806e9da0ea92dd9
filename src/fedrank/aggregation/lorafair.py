"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", 2024/ICCV 2025).

Homogeneous ranks. The server averages Ā = Σ p_k A_k, B̄ = Σ p_k B_k and corrects B̄ with the residual
ΔB that best matches the ideal update ΔW = Σ p_k B_k A_k given Ā:

    ΔB = argmin ‖ΔW − (B̄ + ΔB)Ā‖²_F + λ‖ΔB‖²_F = (ΔW − B̄Ā)Āᵀ (ĀĀᵀ + λI)⁻¹,

computed without forming ΔW: (ΔW − B̄Ā)Āᵀ = Σ p_k B_k (A_k Āᵀ) − B̄ (ĀĀᵀ). Clients start from (B̄ + ΔB, Ā).

Privacy (``[privacy]``, :mod:`fedrank.privacy`, uniform weights 1/K). Every client starts from the global
(B⁰, A⁰), so ΔW − B̄Ā = mean_k ΔB_k ΔA_k − mean_k ΔB_k · mean_k ΔA_k: the correction needs only the sums of
the factor changes and of the products P_k = s·ΔB_k ΔA_k. Clipped, jointly to norm C over all layers, is
(ΔB_k, ΔA_k, P_k) (:func:`fedrank.privacy.clip_joint`); the factor sums get N(0, σ²C²) on every entry and
Σ_k P_k dense N(0, σ²C²) on every entry (``products``), from which the correction is computed
(post-processing). Replacing one client's update moves the released means by at most 2C/K
(:meth:`FedIT.dp_sensitivity`, inherited). The cost: the dense m×n product sum and its noise per layer,
which the method itself never forms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    LoraState,
    check_layers,
    normalized_weights,
    weight_sum_for_noise,
)
from fedrank.aggregation.fedit import FedIT, fedavg_factors, require_rank
from fedrank.types import ClientUpdate, LoraFactors


def residual_correction(parts: Sequence[LoraFactors], p: Tensor, mean: LoraFactors, lam: float) -> Tensor:
    """ΔB = (Σ p_k B_k A_k Āᵀ − B̄ĀĀᵀ)(ĀĀᵀ + λI)⁻¹, in float64."""
    A_bar, B_bar = mean.A.double(), mean.B.double()
    gram = A_bar @ A_bar.T
    rhs = sum(float(w) * (f.B.double() @ (f.A.double() @ A_bar.T)) for w, f in zip(p, parts, strict=True))
    return _solve(rhs - B_bar @ gram, gram, lam)


def _solve(rhs: Tensor, gram: Tensor, lam: float) -> Tensor:
    """ΔB with ΔB (G + λI) = rhs."""
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lorafair: lam must be >= 0, got {self.lam}")

    def secure_mean(self) -> str | None:
        return None

    def aggregate(
        self,
        state: LoraState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        products: Mapping[str, Tensor] | None = None,
    ) -> LoraState:
        """``products`` (privacy): per layer the noisy Σ_k s·ΔB_k ΔA_k, from which (and the factor means) the
        correction is computed: (mean P_k / s − mean ΔB_k·mean ΔA_k)Āᵀ(ĀĀᵀ + λI)⁻¹."""
        p = normalized_weights(updates, weights)
        require_rank(self.name, state.rank, [u.spec for u in updates])
        check_layers(state.factors, updates)
        total = weight_sum_for_noise(self.name, weights, len(updates)) if products is not None else 1.0
        s = self.scaling(state.rank)
        out = {}
        for name, prev in state.factors.items():
            parts = [u.factors[name] for u in updates]
            mean = fedavg_factors(parts, p)
            if products is None:
                dB = residual_correction(parts, p, mean, self.lam)
            else:
                A_bar = mean.A.double()
                gap = products[name].double() / (total * s) - (mean.B.double() - prev.B.double()) @ (
                    A_bar - prev.A.double()
                )
                dB = _solve(gap @ A_bar.T, A_bar @ A_bar.T, self.lam)
            out[name] = LoraFactors(mean.B + dB.to(mean.B.dtype), mean.A)
        return LoraState(out)
