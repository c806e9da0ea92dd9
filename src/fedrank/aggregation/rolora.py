"""RoLoRA (Chen, Guo, Ju, Dalal, Zhu & Khisti, "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA", NeurIPS 2025, arXiv 2502.01755); the same alternating freeze is LoRA-A²'s (Koo, Jang
& Ok, "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous Clients", ACL 2025,
arXiv 2410.22815, §"Alternating Freeze").

Clients train one factor per round and the server averages only that one. With the other factor frozen
and shared, the average of the factors is the average of the products, so aggregation is exact:

    even rounds (A frozen):  B ← Σ_k p_k B_k,   s·B A = Σ_k p_k s·B_k A   = Σ_k p_k ΔW_k,
    odd rounds  (B frozen):  A ← Σ_k p_k A_k,   s·B A = Σ_k p_k s·B A_k   = Σ_k p_k ΔW_k.

B is trained first, because LoRA initialises B = 0 (training A against B = 0 has zero gradient); LoRA-A²
says so explicitly. "Round" counts aggregations of the state (``RoLoRAState.step``), not the round index
passed to :meth:`dispatch`, so a dispatch and the aggregate that follows always agree on the frozen factor.

Mixed ranks (an extension; RoLoRA has one rank, LoRA-A² selects ranks by a local importance score, which is
not implemented here). The global adapter has rank R (the pool's largest) at the global scaling
s_R = lora_scaling(α, R). Client k trains the first r_k indices (r_k capped at R) at s_R and folds the others
into its frozen base, so it starts from the global model exactly:

    W0 + s_R·B[:, r_k:] A[r_k:]  (frozen)   +   s_R·B[:, :r_k] A[:r_k]  (one factor trainable).

Each index of the trained factor is averaged over the clients that held it, K_i = {k : i < r_k}; indices
nobody held keep their value:

    B[:, i] ← Σ_{k∈K_i} p_k B_k[:, i] / Σ_{k∈K_i} p_k      (A[i, :] likewise in odd rounds),

so with A frozen s_R·B[:, i] A[i] is the exact p-weighted average of the holders' rank-1 terms, index by
index; with one rank for all clients it is the rule above, Σ_k p_k ΔW_k.

Communication: a client receives the R global indices (R·(m + n) per layer: the r_k it trains and the R − r_k
it holds frozen and folds into its base itself, :attr:`ClientAssignment.frozen`; a client sampled now may have
missed the last round, so both factors are sent) and uploads only the factor it trained: r_k·m in even rounds,
r_k·n in odd rounds (RoLoRA's halved uplink).

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is the change of the factor client k trained this
round (B in even aggregations, A in odd ones) on its first r_k indices, over all layers, to norm C; the noise
N(0, σ²C²) goes on each index's sum over its holders (carried by the first holder), divided by the holders
h_i as the rule does. Replacing one client's update moves the aggregate by at most 2C / min h_i
(:meth:`RoLoRA.dp_sensitivity`); with mixed ranks ε is accounted without amplification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    MethodOptions,
    Shapes,
    check_layers,
    combine_by_index,
    first_indices,
    holder_mean_sensitivity,
    init_state_factors,
    normalized_weights,
)
from fedrank.aggregation.fold import complement, select_indices
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors, payload_numel


@dataclass(frozen=True)
class RoLoRAState:
    """The global adapter (rank R) and how many aggregations it has had (even: B trains next)."""

    factors: dict[str, LoraFactors]
    step: int = 0

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values())).rank

    @property
    def trains_B(self) -> bool:
        return self.step % 2 == 0


@dataclass(frozen=True)
class RoLoRA(MethodOptions):
    name: ClassVar[str] = "rolora"

    def secure_mean(self) -> str | None:
        return "holders"

    def init_state(self, shapes: Shapes, max_rank: int) -> RoLoRAState:
        return RoLoRAState(init_state_factors(shapes, max_rank, self.seed))

    def dispatch(
        self, state: RoLoRAState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        R = state.rank
        idx = first_indices(min(client.rank, R))
        s = self.scaling(R)
        factors = select_indices(state.factors, idx)
        frozen = complement(state.factors, idx)  # indices r_k.. R, folded by the client
        return ClientAssignment(
            client.client_id,
            idx.numel(),
            s,
            factors,
            payload_numel(factors, frozen),  # R·(m + n) per layer
            train_A=not state.trains_B,
            train_B=state.trains_B,
            frozen=frozen,
        )

    def aggregate(
        self, state: RoLoRAState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> RoLoRAState:
        p = normalized_weights(updates, weights)
        check_layers(state.factors, updates)
        R = state.rank
        frozen = "A" if state.trains_B else "B"
        for u in updates:
            if u.rank > R:
                raise AggregationError(f"rolora: client {u.client_id}'s update has rank {u.rank} > the global rank {R}")
        out = {}
        for name, prev in state.factors.items():
            for u in updates:
                f = u.factors[name]
                same = torch.equal(f.A, prev.A[: u.rank]) if state.trains_B else torch.equal(f.B, prev.B[:, : u.rank])
                if not same:
                    raise AggregationError(
                        f"rolora: client {u.client_id} changed {frozen} of layer {name}, which is frozen in "
                        f"aggregation {state.step} (B trains in even ones, A in odd ones)"
                    )
            idx = [first_indices(u.rank) for u in updates]
            merged = combine_by_index(prev, [u.factors[name] for u in updates], idx, p, mean=True)
            out[name] = LoraFactors(merged.B, prev.A) if state.trains_B else LoraFactors(prev.B, merged.A)
        return RoLoRAState(out, state.step + 1)

    def upload_params(self, update: ClientUpdate) -> int:
        """Only the factor the client trained (``ClientUpdate.train_A`` / ``train_B``)."""
        return sum(
            (f.A.numel() if update.train_A else 0) + (f.B.numel() if update.train_B else 0)
            for f in update.factors.values()
        )

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the holder means: 2C over the fewest holders of an index client
        ``which`` holds."""
        return holder_mean_sensitivity(specs, indices, which, clip)

    def global_model(self, state: RoLoRAState, rank: int | None = None) -> ClientAssignment:
        """The rank-R adapter at s_R (export other ranks via SVD)."""
        if rank not in (None, state.rank):
            raise AggregationError(f"rolora's global model has rank {state.rank}; export other ranks via SVD")
        return ClientAssignment(-1, state.rank, self.scaling(state.rank), dict(state.factors), 0)
