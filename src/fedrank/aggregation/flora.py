"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Stacking: the server concatenates the clients' factors, [p_1 s_1 B_1 … p_K s_K B_K] · [A_1; …; A_K]
(s_k = α/r_k), whose product is exactly Σ_k p_k s_k B_k A_k, with no cross terms. That update is merged
into the base weights every round and every client restarts from a fresh LoRA at its own rank:

    W ← W + Σ_k p_k · (α/r_k) · B_k A_k.

The state is the accumulated dense delta per layer (m×n). Download, accounted honestly: a client must
bring its base weights up to date; it receives whichever is smaller, the stacked factors of every round
so far or the dense m×n delta of every layer. The fresh LoRA itself is generated locally from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    MethodOptions,
    Shapes,
    check_layers,
    derive_generator,
    normalized_weights,
)
from fedrank.lowrank import init_lora_factors, stack_factors
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FLoRAState:
    """Accumulated merged delta per layer and the stacked parameters broadcast so far."""

    merged: dict[str, Tensor]
    stacked_params: int = 0

    @property
    def dense_params(self) -> int:
        return sum(d.numel() for d in self.merged.values())


@dataclass(frozen=True)
class FLoRA(MethodOptions):
    name: ClassVar[str] = "flora"

    def init_state(self, shapes: Shapes, max_rank: int) -> FLoRAState:
        return FLoRAState({name: torch.zeros(m, n) for name, (m, n) in sorted(shapes.items())})

    def dispatch(
        self, state: FLoRAState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        g = derive_generator(self.seed, round_index, client.client_id)
        factors = {}
        for name, delta in state.merged.items():
            m, n = delta.shape
            factors[name] = LoraFactors(*init_lora_factors(m, n, client.rank, g))
        download = min(state.stacked_params, state.dense_params)
        return self.assign(client, factors, download, base_delta=state.merged)

    def aggregate(
        self, state: FLoRAState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> FLoRAState:
        p = normalized_weights(updates, weights)
        check_layers(state.merged, updates)
        w = [float(pk) * self.scaling(u.rank) for pk, u in zip(p, updates, strict=True)]
        merged = {}
        stacked = 0
        for name, delta in state.merged.items():
            B, A = stack_factors([u.factors[name].B for u in updates], [u.factors[name].A for u in updates], w)
            merged[name] = delta + (B @ A).to(delta.dtype)
            stacked += B.numel() + A.numel()
        return FLoRAState(merged, state.stacked_params + stacked)

    def global_model(self, state: FLoRAState, rank: int | None = None) -> ClientAssignment:
        """The merged base delta with an empty adapter (FLoRA's global model has no LoRA of its own)."""
        return ClientAssignment(-1, rank or 1, 0.0, {}, 0, base_delta=state.merged)
