"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, §3.2).

Client k trains LoRA at its own rank r_k. The server synthesises the full-size update

    ΔW = Σ_k p_k · (α/r_k) · B_k A_k,     p_k = n_k / Σ_j n_j,

and sends client k the best rank-r_k approximation of ΔW (Eckart–Young, via the SVD), with the singular
values folded into B and the client's scaling undone (B ← U_r diag(S_r) · r_k/α, A ← V_rᵀ).

ΔW is kept as its thin SVD (``fedrank.lowrank.svd_of_sum``: QR of the stacked factors + an R×R SVD),
memory O((m+n)·R) with R = Σ r_k: the m×n matrix is never formed for the large layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    MethodOptions,
    Shapes,
    check_layers,
    init_state_factors,
    normalized_weights,
)
from fedrank.lowrank import LowRankSVD, svd_of_sum, truncate, truncate_rank
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FlexLoRAState:
    """Before the first aggregation: the shared LoRA init (``init``); after: ΔW as thin SVDs (``svd``)."""

    init: dict[str, LoraFactors]
    svd: dict[str, LowRankSVD] | None = None

    @property
    def max_rank(self) -> int:
        """Rank that holds every component of every layer (smaller layers are zero-padded)."""
        if self.svd is None:
            return next(iter(self.init.values())).rank
        return max(s.rank for s in self.svd.values())


@dataclass(frozen=True)
class FlexLoRA(MethodOptions):
    """``components``: SVD components of ΔW kept in the state. None keeps all of them (ΔW exactly, so the
    global model can be exported at any rank); k keeps the top k, all that dispatching ranks <= k needs,
    and is faster where Σ r_k approaches the layer size."""

    components: int | None = None
    name: ClassVar[str] = "flexlora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.components is not None and self.components <= 0:
            raise ValueError(f"flexlora: components must be positive or None, got {self.components}")

    def init_state(self, shapes: Shapes, max_rank: int) -> FlexLoRAState:
        return FlexLoRAState(init_state_factors(shapes, max_rank, self.seed))

    def _factors(self, state: FlexLoRAState, rank: int) -> dict[str, LoraFactors]:
        if state.svd is None:
            if rank > state.max_rank:
                raise AggregationError(
                    f"client rank {rank} exceeds the max_rank {state.max_rank} the state was made for"
                )
            return {k: LoraFactors(*truncate_rank(f.B, f.A, rank)) for k, f in state.init.items()}
        return {k: LoraFactors(*truncate(s, rank, self.alpha, self.rslora)) for k, s in state.svd.items()}

    def dispatch(
        self, state: FlexLoRAState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        if self.components is not None and client.rank > self.components:
            raise AggregationError(
                f"flexlora keeps {self.components} components; client {client.client_id} has rank {client.rank}"
            )
        factors = self._factors(state, client.rank)
        download = sum(client.rank * (f.shape[0] + f.shape[1]) for f in factors.values())
        return self.assign(client, factors, download)

    def aggregate(
        self, state: FlexLoRAState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> FlexLoRAState:
        p = normalized_weights(updates, weights)
        check_layers(state.init, updates)
        w = [float(pk) * self.scaling(u.rank) for pk, u in zip(p, updates, strict=True)]
        svd = {}
        for name in state.init:
            Bs, As = [u.factors[name].B for u in updates], [u.factors[name].A for u in updates]
            U, S, Vh = svd_of_sum(Bs, As, w, rank=self.components)
            svd[name] = LowRankSVD(U, S, Vh)
        return FlexLoRAState(state.init, svd)

    def global_model(self, state: FlexLoRAState, rank: int | None = None) -> ClientAssignment:
        """At ``rank`` (default: every component kept, i.e. ΔW exactly)."""
        r = rank or state.max_rank
        return ClientAssignment(-1, r, self.scaling(r), self._factors(state, r), 0)
