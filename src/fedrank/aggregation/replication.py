"""Replication padding (Byun & Lee, "Towards Federated Low-Rank Adaptation of Language Models with Rank
Heterogeneity", 2024).

Like HetLoRA, the server keeps LoRA at the largest rank and client k receives the first r_k indices.
Instead of zero-padding, a client's missing indices are filled by replicating what the clients that
trained them hold, so zeros from low-rank clients never dilute the high-rank components:

    B[:, i] ← Σ_{k: i < r_k} p_k B_k[:, i] / Σ_{k: i < r_k} p_k     (A[i, :] likewise).

An index no client of the round held keeps its previous global value.

One LoRA scale across ranks: every client trains at the global rank's scale s(R), not its own s(r_k), so a
rank index means the same update at every client and in the global model (:meth:`MethodOptions.assign`).

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client k's (ΔB_k, ΔA_k) on its first r_k indices,
over all layers, to norm C; the noise N(0, σ²C²) goes on each index's sum over its holders (carried by the
first holder), which the rule then divides by the holders h_i. Replacing one client's update moves the
aggregate by at most 2C / min h_i over the indices it holds (:meth:`Replication.dp_sensitivity`). With mixed
ranks the indices a round changed show part of its sample: ε is then accounted without amplification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedrank.aggregation.base import (
    LoraState,
    MethodOptions,
    combine_layers,
    holder_mean_sensitivity,
    normalized_weights,
    truncated_factors,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate


@dataclass(frozen=True)
class Replication(MethodOptions):
    name: ClassVar[str] = "replication"

    def secure_mean(self) -> str | None:
        return "holders"

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        factors = truncated_factors(state.factors, client.rank)
        return self.assign(client, factors, scale_rank=state.rank)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        return combine_layers(state, updates, normalized_weights(updates, weights), mean=True)

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the holder means: 2C over the fewest holders of an index client
        ``which`` holds."""
        return holder_mean_sensitivity(specs, indices, which, clip)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        return self.dispatch(state, ClientSpec(-1, rank or state.rank, 0), 0)
