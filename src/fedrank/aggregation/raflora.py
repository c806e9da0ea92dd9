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

Privacy (``[privacy]``, :mod:`fedrank.privacy`, uniform weights, so p_k^(m) = 1/c_m with c_m = |C_m|). The
release is the Gaussian mechanism on the M partition sums S_m = Σ_{k∈C_m} s_k B_k[:, P_m] A_k[P_m, :]:
client k's contribution is the concatenation of its pieces (one per partition it covers), clipped jointly
to norm C over every layer (:meth:`RaFLoRA.dp_pieces`: the norm from the factors, never m×n), and each S_m
gets dense noise N_m ~ N(0, σ²C²). ΔW = Σ_m (S_m + N_m)/c_m, so the noise on ΔW is one dense Gaussian of
standard deviation σC·√(Σ_m 1/c_m²) per entry, which is what the aggregate adds. Replacing one client's
update moves ΔW by at most 2C·√(Σ_{m: k∈C_m} 1/c_m²) (Cauchy–Schwarz over its pieces;
:meth:`RaFLoRA.dp_sensitivity`). The counts c_m come from the round's ranks: with mixed ranks the noise's
scale and the divisors show how many of the round's clients cover each partition, so part of the sample, and
ε is accounted without amplification (``fedrank.privacy.INDEX_REVEALING``); Poisson sampling is refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import AggregationError, check_layers, normalized_weights
from fedrank.aggregation.flexlora import FlexLoRA, FlexLoRAState, noise_pair
from fedrank.lowrank import LowRankSVD, svd_of_sum
from fedrank.types import ClientSpec, ClientUpdate


def partitions(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The round's rank partitions [r_(m-1), r_(m)) between consecutive distinct ranks, from r_(0) = 0."""
    edges = [0, *sorted(set(ranks))]
    return list(itertools.pairwise(edges))


def noise_scale(ranks: Sequence[int], weights: Sequence[float]) -> float:
    """√(Σ_m 1/c_m²), c_m the weight of the clients covering partition m: the standard deviation, per unit of
    each partition sum's noise, of Σ_m N_m / c_m."""
    return math.sqrt(
        sum(1 / sum(w for r, w in zip(ranks, weights, strict=True) if r >= b) ** 2 for _, b in partitions(ranks))
    )


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

    def aggregate(
        self,
        state: FlexLoRAState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        noise: Mapping[str, Tensor] | None = None,
    ) -> FlexLoRAState:
        """ΔW = Σ_m Σ_{k∈C_m} p_k^(m) s_k B_k[:, P_m] A_k[P_m, :] and its SVD. ``noise`` (privacy): a dense
        N(0, σ²C²) per layer, added times √(Σ_m 1/c_m²) (:func:`noise_scale`), as one more factor pair."""
        p = normalized_weights(updates, weights)
        check_layers(state.init, updates)
        ranks = [u.rank for u in updates]
        per_index = partition_weights(ranks, p)
        if noise is not None and weights is None:
            raise AggregationError("raflora: noise needs the round's weights (uniform under privacy)")
        scale = noise_scale(ranks, weights) if noise is not None and weights is not None else 0.0
        svd = {}
        for name in state.init:
            Bs = []
            for u, w in zip(updates, per_index, strict=True):
                B = u.factors[name].B
                Bs.append(B * (self.scaling(u.rank) * w).to(B.dtype))  # column i of B_k times s_k·p_k^(m)
            As = [u.factors[name].A for u in updates]
            if noise is not None:
                nB, nA = noise_pair(noise[name] * scale)
                Bs.append(nB.to(Bs[0].dtype))
                As.append(nA.to(As[0].dtype))
            U, S, Vh = svd_of_sum(Bs, As, [1.0] * len(Bs), rank=self.components)
            svd[name] = LowRankSVD(U, S, Vh)
        return FlexLoRAState(state.init, svd)

    def dp_pieces(self, rank: int, ranks: Sequence[int]) -> list[tuple[int, int]] | None:
        """The partitions of the round that a client of ``rank`` covers: clipped jointly."""
        return [(a, b) for a, b in partitions(ranks) if b <= rank]

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of ΔW: client ``which``'s pieces (jointly within C) each divided by their
        partition's clients c_m, so at most 2C·√(Σ_{m it covers} 1/c_m²)."""
        ranks = [s.rank for s in specs]
        mine = specs[which].rank
        return 2 * clip * math.sqrt(sum(1 / sum(r >= b for r in ranks) ** 2 for _, b in partitions(ranks) if b <= mine))
