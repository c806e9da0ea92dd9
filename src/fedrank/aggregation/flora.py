"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Stacking: the server concatenates the clients' factors, [p_1 s_1 B_1 … p_K s_K B_K] · [A_1; …; A_K]
(s_k = α/r_k), whose product is exactly Σ_k p_k s_k B_k A_k, with no cross terms. That update is merged
into the base weights every round and every client restarts from a fresh LoRA at its own rank:

    W ← W + Σ_k p_k · (α/r_k) · B_k A_k.

The state is the accumulated dense delta per layer (m×n). Communication, counted as sent: a client must
bring its base weights up to date. The paper's protocol broadcasts the stacked factors (r_1 + … + r_K)·(m + n)
per layer and round; fedrank sends the dense merged delta as the assignment's ``base_delta`` (m·n per layer,
once it is nonzero: round 0's is zero and is not sent), so that is what is counted, together with the fresh
rank-r_k LoRA the server draws for the client (r_k·(m + n) per layer; a client could draw it from the seed
itself, but fedrank sends it). ``FLoRAState.stacked_params`` keeps the stacked factors' running size for
comparison.

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client k's whole update ΔW_k = s(r_k)·B_k A_k
(its norm from the factors, ‖BA‖²_F = tr((BᵀB)(AAᵀ))), which for FLoRA is exactly its change, since every
client starts from a fresh LoRA on the merged base; the noise N(0, σ²C²) is dense, on every entry of
Σ_k ΔW_k before the mean over K, and costs little here: the state is dense already. Replacing one client's
update moves the merged delta by at most 2C/K (:meth:`FLoRA.dp_sensitivity`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    product_sensitivity,
    weight_sum_for_noise,
)
from fedrank.lowrank import init_lora_factors, stack_factors
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors, payload_numel


@dataclass(frozen=True)
class FLoRAState:
    """Accumulated merged delta per layer, and the stacked factors' size so far (what the paper's stacked
    broadcast would have sent; fedrank sends the dense delta)."""

    merged: dict[str, Tensor]
    stacked_params: int = 0

    @property
    def dense_params(self) -> int:
        return sum(d.numel() for d in self.merged.values())

    @property
    def has_delta(self) -> bool:
        """Whether some layer's merged delta is nonzero (none is before the first aggregation)."""
        return any(bool(d.any()) for d in self.merged.values())


@dataclass(frozen=True)
class FLoRA(MethodOptions):
    name: ClassVar[str] = "flora"
    secure_refused: ClassVar[str] = "stacking needs every client's factors"

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
        merged = state.merged if state.has_delta else None  # round 0's delta is zero: not sent
        return self.assign(client, factors, payload_numel(factors, base_delta=merged), base_delta=merged)

    def aggregate(
        self,
        state: FLoRAState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        noise: Mapping[str, Tensor] | None = None,
    ) -> FLoRAState:
        """``noise`` (privacy): a dense m×n tensor per layer added to the unnormalised sum Σ_k w_k s(r_k) B_k A_k
        before the division by Σ_k w_k."""
        p = normalized_weights(updates, weights)
        check_layers(state.merged, updates)
        w = [float(pk) * self.scaling(u.rank) for pk, u in zip(p, updates, strict=True)]
        total = weight_sum_for_noise(self.name, weights, len(updates)) if noise is not None else 1.0
        merged = {}
        stacked = 0
        for name, delta in state.merged.items():
            B, A = stack_factors([u.factors[name].B for u in updates], [u.factors[name].A for u in updates], w)
            merged[name] = delta + (B @ A).to(delta.dtype)
            if noise is not None:
                merged[name] += (noise[name] / total).to(delta.dtype)
            stacked += B.numel() + A.numel()
        return FLoRAState(merged, state.stacked_params + stacked)

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the merged delta's round update (1/K) Σ_k ΔW_k, ‖ΔW_k‖_F <= C: 2C/K."""
        return product_sensitivity(specs, clip)

    def global_model(self, state: FLoRAState, rank: int | None = None) -> ClientAssignment:
        """The merged base delta with an empty adapter (FLoRA's global model has no LoRA of its own)."""
        return ClientAssignment(-1, rank or 1, 0.0, {}, 0, base_delta=state.merged)
