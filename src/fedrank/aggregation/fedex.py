"""FedEx-LoRA (Singhal, Ponkshe & Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025, arXiv 2410.09432; official code CERT-Lab/fedex-lora,
``fed_agg.py::aggregate_models_ours``).

The paper (one rank r, scaling s): FedAvg of the factors, plus the residual that FedAvg misses folded into
the frozen base weight, so that the global model is the exact average of the client models:

    B̄ = Σ_k p_k B_k,   Ā = Σ_k p_k A_k,   W_res ← W_res + s·(Σ_k p_k B_k A_k − B̄ Ā),
    W0 + W_res + s·B̄ Ā = W0 + W_res_old + Σ_k p_k s·B_k A_k.

Clients start the next round from (B̄, Ā) on the base W0 + W_res.

Mixed ranks (an extension; the paper has one rank). The global adapter has rank R (the pool's largest)
at s_R = lora_scaling(α, R); client k trains a rank-r_k LoRA (r_k capped at R) at the same global scale
s_R, like every index-sharing method in fedrank (a rank index means the same update everywhere; a client
at its own s_k = α/r_k would move ΔW R/r_k times as far per AdamW step). Dispatch hands it the first r_k
global indices to train and the other indices, which it folds into its frozen base, so it starts from the
global model exactly:

    B_k⁰ = B̄[:, :r_k],   A_k⁰ = Ā[:r_k],   base W0 + W_res + s_R·B̄[:, r_k:] Ā[r_k:].

After training, client k's model as a rank-R adapter at s_R is (B̂_k, Â_k) with B̂_k = [B_k, B̄[:, r_k:]]
and Â_k = [A_k; Ā[r_k:]], i.e. s_R·B̂_k Â_k = s_R·B_k A_k + s_R·B̄[:, r_k:] Ā[r_k:]. The paper's rule on those:

    B̄ ← Σ_k p_k B̂_k,   Ā ← Σ_k p_k Â_k,   W_res ← W_res + s_R·(Σ_k p_k B̂_k Â_k − B̄ Ā),

so W0 + W_res + s_R·B̄ Ā = Σ_k p_k (W0 + ΔW_k): the exact p-weighted average of the client models, each
ΔW_k = W_res_old + s_R·B̄_old[:, r_k:] Ā_old[r_k:] + s_R·B_k A_k. With every r_k = R it is the paper's rule.
The paper and its code average uniformly (1/K); here p_k = n_k / Σ n (uniform with equal data or weights).

Communication, counted as sent: a client receives the R global indices (R·(m + n) per layer: its r_k
trainable ones and the R − r_k it holds frozen, :attr:`ClientAssignment.frozen`, which it folds into its
base itself) and the dense m×n residual W_res as the assignment's ``base_delta``, once it is nonzero (round
0's residual is zero and is not sent): R·(m + n) + m·n per layer. The round's residual also has a factored
form, [p_1 s_R B̂_1 … p_K s_R B̂_K, −s_R B̄]·[Â_1; …; Â_K; Ā],
(K + 1)·R·(m + n) per layer and round, whose running size ``FedExState.stacked_params`` keeps for
comparison; fedrank sends the dense residual, so that is what is counted. A client sends its factors,
r_k·(m + n).

Privacy (``[privacy]``, :mod:`fedrank.privacy`, uniform weights 1/K). With B̂_k = B̄_old + pad(ΔB_k) and
Â_k = Ā_old + pad(ΔA_k), the round's residual is s_R·(mean_k ΔB_k ΔA_k − mean_k ΔB_k · mean_k ΔA_k): the
state needs only the sums of the factor changes and of the products P_k = s_R·ΔB_k ΔA_k. Clipped, jointly to
norm C over all layers, is (ΔB_k, ΔA_k, P_k) (:func:`fedrank.privacy.clip_joint`); the factor sums get
N(0, σ²C²) on every index of the global rank, held or not (``index_noise``: an index nobody held would stay
unchanged and show part of the sample), and Σ_k P_k dense N(0, σ²C²) on every entry (``products``); the new
factors and the residual are computed from those noisy sums alone. Replacing one client's update moves the
released means by at most 2C/K (:meth:`FedExLoRA.dp_sensitivity`). The residual is dense already, so the
dense noise costs little more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    MethodOptions,
    Shapes,
    check_layers,
    init_state_factors,
    normalized_weights,
    product_sensitivity,
    weight_sum_for_noise,
)
from fedrank.aggregation.fold import complement, select_indices
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors, payload_numel


@dataclass(frozen=True)
class FedExState:
    """The global adapter (rank R), the residual folded into the base so far, and its factored size so far
    (``stacked_params``: what sending the residual as stacked factors would have cost, not what is sent)."""

    factors: dict[str, LoraFactors]
    residual: dict[str, Tensor]
    stacked_params: int = 0

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values())).rank

    @property
    def dense_params(self) -> int:
        return sum(d.numel() for d in self.residual.values())

    @property
    def has_residual(self) -> bool:
        """Whether W_res is nonzero in some layer (it is zero until an aggregation misses a cross term)."""
        return any(bool(d.any()) for d in self.residual.values())


@dataclass(frozen=True)
class FedExLoRA(MethodOptions):
    name: ClassVar[str] = "fedex"
    secure_refused: ClassVar[str] = "its residual needs Σ_k p_k B_k A_k, a sum of dense m×n products"

    def init_state(self, shapes: Shapes, max_rank: int) -> FedExState:
        factors = init_state_factors(shapes, max_rank, self.seed)
        return FedExState(factors, {name: torch.zeros(f.shape, dtype=f.A.dtype) for name, f in factors.items()})

    def dispatch(
        self, state: FedExState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        R = state.rank
        r = min(client.rank, R)
        s_R = self.scaling(R)
        keep = torch.arange(r)
        factors = select_indices(state.factors, keep)
        frozen = complement(state.factors, keep)  # indices r_k.. R, folded by the client
        residual = state.residual if state.has_residual else None  # round 0's residual is zero: not sent
        download = payload_numel(factors, frozen, residual)  # R·(m + n) (+ m·n once there is a residual)
        return ClientAssignment(client.client_id, r, s_R, factors, download, base_delta=residual, frozen=frozen)

    def aggregate(
        self,
        state: FedExState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        products: Mapping[str, Tensor] | None = None,
        index_noise: Mapping[str, LoraFactors] | None = None,
    ) -> FedExState:
        """``products`` (privacy): per layer the noisy Σ_k s_R·ΔB_k ΔA_k; the residual is then computed from it
        and the factor means alone (see the module's privacy note). ``index_noise``: noise shaped like (B, A)
        added to Σ_k w_k (B̂_k, Â_k) before the division by Σ_k w_k."""
        p = normalized_weights(updates, weights)
        if index_noise is not None and products is None:
            raise AggregationError("fedex: index_noise comes with the noisy products (privacy's joint release)")
        noised = products is not None or index_noise is not None
        total = weight_sum_for_noise(self.name, weights, len(updates)) if noised else 1.0
        check_layers(state.factors, updates)
        R = state.rank
        s_R = self.scaling(R)
        for u in updates:
            if u.rank > R:
                raise AggregationError(f"fedex: client {u.client_id}'s update has rank {u.rank} > the global rank {R}")
        factors, residual = {}, {}
        stacked = 0
        for name, prev in state.factors.items():
            B_hats, A_hats = [], []
            for u in updates:
                f, r = u.factors[name], u.rank
                B_hats.append(torch.cat([f.B.double(), prev.B[:, r:].double()], dim=1))
                A_hats.append(torch.cat([f.A.double(), prev.A[r:].double()], dim=0))
            w = p.tolist()
            B_bar = sum((wk * B for wk, B in zip(w, B_hats, strict=True)), torch.zeros_like(B_hats[0]))
            A_bar = sum((wk * A for wk, A in zip(w, A_hats, strict=True)), torch.zeros_like(A_hats[0]))
            if index_noise is not None:
                B_bar = B_bar + index_noise[name].B.double() / total
                A_bar = A_bar + index_noise[name].A.double() / total
            res = state.residual[name]
            if products is None:
                # The round's residual in its factored form [p_1 B̂_1 … p_K B̂_K, −B̄]·[Â_1; …; Â_K; Ā].
                left = torch.cat([wk * B for wk, B in zip(w, B_hats, strict=True)] + [-B_bar], dim=1)
                right = torch.cat([*A_hats, A_bar], dim=0)
                residual[name] = res + (s_R * (left @ right)).to(res.dtype)
            else:  # mean P_k − s_R·mean ΔB_k·mean ΔA_k, from the released sums
                dB, dA = B_bar - prev.B.double(), A_bar - prev.A.double()
                residual[name] = res + (products[name].double() / total - s_R * (dB @ dA)).to(res.dtype)
            factors[name] = LoraFactors(B_bar.to(prev.B.dtype), A_bar.to(prev.A.dtype))
            if not noised:  # (under DP the counter would record the round's count of clients: not kept)
                stacked += (len(updates) + 1) * R * sum(prev.shape)
        return FedExState(factors, residual, state.stacked_params + stacked)

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the released means (1/K)(Σ ΔB_k, Σ ΔA_k, Σ P_k), each client's
        concatenation within C: 2C/K."""
        return product_sensitivity(specs, clip)

    def global_model(self, state: FedExState, rank: int | None = None) -> ClientAssignment:
        """The rank-R adapter at s_R on the base W0 + W_res."""
        if rank not in (None, state.rank):
            raise AggregationError(f"fedex's global model has rank {state.rank}; export other ranks via SVD")
        s = self.scaling(state.rank)
        return ClientAssignment(-1, state.rank, s, dict(state.factors), 0, base_delta=state.residual)
