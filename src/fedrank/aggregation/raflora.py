"""raFLoRA (Wu, Hu, Min & Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
Heterogeneity", arXiv 2602.13486, 2026): rank-partitioned aggregation on FlexLoRA's SVD allocation.

FlexLoRA (``flexlora.py``) weighs every client by p_k = n_k / Σ n in ΔW = Σ_k p_k s_k B_k A_k, although
rank index i is only present in the clients with r_k > i. Each round the components beyond the smallest
rank are therefore multiplied by the share of clients that hold them, and the global update collapses onto
the smallest shared rank at a geometric rate (the paper's "rank collapse"). raFLoRA splits every client
update into rank partitions, the intervals between consecutive distinct ranks r_(0) = 0 < r_(1) < … < r_(M),
and averages each partition only over the clients whose rank covers it:

    P_m = [r_(m-1), r_(m)),   C_m = {k : r_k >= r_(m)},   p_k^(m) = p_k / Σ_{j∈C_m} p_j,

    ΔW = Σ_m Σ_{k∈C_m} p_k^(m) · s_k · B_k[:, P_m] A_k[P_m, :]           (s_k = lora_scaling(α, r_k)).

Client k then receives, as in FlexLoRA, the best rank-r_k approximation of ΔW with its scaling undone
(B = U_r diag(S_r) / s_k, A = V_rᵀ). If the round's clients return the components they were sent unchanged,
rank index i carries σ_i u_i v_iᵀ at every holder and the partition average returns it intact, so
ΔW ← the best rank-max_k r_k approximation of ΔW (ΔW itself when its rank is at most the round's largest
rank), where FlexLoRA would return Σ_i (Σ_{k: r_k > i} p_k)·σ_i u_i v_iᵀ.

Source: only the paper's abstract and summaries of its §5 could be read here (no official code was
found); they describe partitions by rank level, each aggregated over the clients covering it and weighted by
their effective contributions. The weights within a partition, p_k renormalised over C_m, are our reading of
that (a third-party re-implementation citing the paper's Eq. (8) uses the same n_k / Σ_{j∈C_m} n_j). The
partitions here come from the round's distinct ranks, which gives the same ΔW as any finer set of rank
levels (C_m is constant between consecutive ranks of the round). The
state and dispatch are FlexLoRA's: every SVD component is kept unless ``components`` is set.
Communication is FlexLoRA's: r_k·(m + n) down and up per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import AggregationError, check_layers, normalized_weights
from fedrank.aggregation.flexlora import FlexLoRA, FlexLoRAState
from fedrank.lowrank import LowRankSVD, svd_of_sum
from fedrank.types import ClientUpdate


def partition_weights(ranks: Sequence[int], p: Tensor) -> list[Tensor]:
    """Per client k, the weight p_k^(m) of each of its rank indices i < r_k (that of the partition holding i)."""
    top = max(ranks)
    r = torch.tensor(list(ranks))
    # the weight of the clients covering index i is the weight of the clients with r_k > i
    covering = torch.stack([p[r > i].sum() for i in range(top)])
    safe = torch.where(covering > 0, covering, torch.ones_like(covering))  # all-zero weights contribute 0
    return [p[k] / safe[: ranks[k]] for k in range(len(ranks))]


@dataclass(frozen=True)
class RaFLoRA(FlexLoRA):
    """FlexLoRA's state and SVD dispatch with raFLoRA's rank-partitioned aggregate."""

    name: ClassVar[str] = "raflora"
    secure_refused: ClassVar[str] = "its SVD needs Σ_k p_k s_k B_k A_k, a sum of dense m×n products (as FlexLoRA's)"

    dp_refused: ClassVar[str] = (
        "each rank partition is divided by its covering clients, and the partition pieces of one ΔW_k are not"
        " bounded by ‖ΔW_k‖: it needs per-partition clipping"
    )

    def aggregate(
        self,
        state: FlexLoRAState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        noise: Mapping[str, Tensor] | None = None,
    ) -> FlexLoRAState:
        if noise is not None:
            raise AggregationError("raflora has no DP mechanism yet (privacy is refused for it at config load)")
        p = normalized_weights(updates, weights)
        check_layers(state.init, updates)
        per_index = partition_weights([u.rank for u in updates], p)
        svd = {}
        for name in state.init:
            Bs = []
            for u, w in zip(updates, per_index, strict=True):
                B = u.factors[name].B
                Bs.append(B * (self.scaling(u.rank) * w).to(B.dtype))  # column i of B_k times s_k·p_k^(m)
            As = [u.factors[name].A for u in updates]
            U, S, Vh = svd_of_sum(Bs, As, [1.0] * len(updates), rank=self.components)
            svd[name] = LowRankSVD(U, S, Vh)
        return FlexLoRAState(state.init, svd)
