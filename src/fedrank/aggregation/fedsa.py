"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025).

A learns knowledge shared across clients, B client-specific knowledge: only A is uploaded and
averaged; each client keeps its own B across rounds (the caller persists what :meth:`local_state`
returns and passes it back to :meth:`dispatch`). Across ranks each row of A is averaged over the
clients that held it:

    A[i, :] ← Σ_{k: i < r_k} p_k A_k[i, :] / Σ_{k: i < r_k} p_k.

The state's B is the same per-index mean of the round's B_k. It is never dispatched; it exists so that a
single global model can be evaluated and exported (FedSA itself is personalised).

One LoRA scale across ranks: every client trains at the global rank's scale s(R), not its own s(r_k), so a
rank index means the same update at every client and in the global model (:meth:`MethodOptions.assign`).

Privacy (``[privacy]``, :mod:`fedrank.privacy`). The state releases two per-index holder means: A's, of the
clients' changes ΔA_k (what the paper shares), and B's, of the clients' *whole* B_k (fedrank's evaluation and
export model; a client's B_k is its own, built over every round it took part in, so its change alone would
not bound it). Clipped, to norm C over all layers, is the pair (ΔA_k, B_k) (:meth:`FedSALoRA.dp_reference`
measures B from zero); the noise N(0, σ²C²) goes on each row's sum of A and each column's sum of B, which
are then divided by their holders h_i. The client keeps its own, unclipped B_k for its next round (the noise
and the clip only touch what the server releases). Replacing one client's update moves the state by at most
2C / min h_i over the indices it holds (:meth:`FedSALoRA.dp_sensitivity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    LoraState,
    MethodOptions,
    combine_layers,
    holder_mean_sensitivity,
    normalized_weights,
    truncated_factors,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FedSALoRA(MethodOptions):
    name: ClassVar[str] = "fedsa"
    secure_refused: ClassVar[str] = (
        "each client keeps its own B between rounds, which fedrank's server stores for it: the server "
        "would still see every B_k"
    )

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        factors = {}
        for name, f in state.factors.items():
            A = f.A[: client.rank].clone()
            if local is None:
                B = f.B.new_zeros(f.B.shape[0], client.rank)
            else:
                if name not in local or tuple(local[name].shape) != (f.B.shape[0], client.rank):
                    raise AggregationError(
                        f"fedsa: client {client.client_id}'s persisted B for layer {name} is missing or not "
                        f"of shape {(f.B.shape[0], client.rank)}"
                    )
                B = local[name].clone()
            factors[name] = LoraFactors(B, A)
        download = sum(f.A.numel() for f in factors.values())
        return self.assign(client, factors, download, scale_rank=state.rank)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        return combine_layers(state, updates, normalized_weights(updates, weights), mean=True)

    def upload_params(self, update: ClientUpdate) -> int:
        return sum(f.A.numel() for f in update.factors.values())

    def local_state(self, update: ClientUpdate) -> dict[str, Tensor] | None:
        return {name: f.B.clone() for name, f in update.factors.items()}

    def dp_reference(self, sent: ClientAssignment) -> ClientAssignment:
        """The state's B is the holders' mean of the whole B_k: under DP, B_k is clipped from zero (A from what
        was sent)."""
        zero = {name: LoraFactors(torch.zeros_like(f.B), f.A) for name, f in sent.factors.items()}
        return replace(sent, factors=zero)

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the holder means of A and B: 2C over the fewest holders of an index client
        ``which`` holds (its first r_k)."""
        return holder_mean_sensitivity(specs, indices, which, clip)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        r = rank or state.rank
        factors = truncated_factors(state.factors, r)
        return ClientAssignment(-1, r, self.scaling(state.rank), factors, 0)
