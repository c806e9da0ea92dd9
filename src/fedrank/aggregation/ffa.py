"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

A is frozen at a shared, seeded random init (of the largest rank; a client of rank r_k uses its first
r_k rows) and never communicated: clients regenerate it from the seed. Only B is trained and sent.
With A fixed and shared, averaging B is exact: Σ p_k B_k A = (Σ p_k B_k) A. Across ranks each column
of B is averaged over the clients that held it:

    B[:, i] ← Σ_{k: i < r_k} p_k B_k[:, i] / Σ_{k: i < r_k} p_k.

One LoRA scale across ranks: every client trains at the global rank's scale s(R), not its own s(r_k), so a
rank index means the same update at every client and in the global model (:meth:`MethodOptions.assign`).

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client k's ΔB_k alone (A is frozen and never
sent), over all layers, to norm C; the noise N(0, σ²C²) goes on each column's sum Σ_{k holds i} B_k[:, i],
which is then divided by its holders h_i: frozen A is why FFA-LoRA's authors propose it for DP (the noise
enters B only, not the product of two noised factors). Replacing one client's update moves the aggregate by
at most 2C / min h_i over the columns it holds (:meth:`FFALoRA.dp_sensitivity`).
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
    combine_by_index,
    first_indices,
    holder_mean_sensitivity,
    normalized_weights,
    truncated_factors,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FFALoRA(MethodOptions):
    name: ClassVar[str] = "ffa"

    def secure_mean(self) -> str | None:
        return "holders"

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        factors = truncated_factors(state.factors, client.rank)
        download = sum(f.B.numel() for f in factors.values())
        return self.assign(client, factors, download, scale_rank=state.rank, train_A=False)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        p = normalized_weights(updates, weights)
        check_layers(state.factors, updates, state.rank)
        out = {}
        for name, prev in state.factors.items():
            for u in updates:
                if not torch.equal(u.factors[name].A, prev.A[: u.rank]):
                    raise AggregationError(f"ffa: client {u.client_id} changed the frozen A of layer {name}")
            idx = [first_indices(u.rank) for u in updates]
            merged = combine_by_index(prev, [u.factors[name] for u in updates], idx, p, mean=True)
            out[name] = LoraFactors(merged.B, prev.A)
        return LoraState(out)

    def upload_params(self, update: ClientUpdate) -> int:
        return sum(f.B.numel() for f in update.factors.values())

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the holder means: 2C over the fewest holders of a column client
        ``which`` holds (its first r_k)."""
        return holder_mean_sensitivity(specs, indices, which, clip)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        return self.dispatch(state, ClientSpec(-1, rank or state.rank, 0), 0)
