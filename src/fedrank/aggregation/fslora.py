"""FSLoRA (Fang et al., "Federated Sketching LoRA: A Flexible Framework for Heterogeneous Collaborative
Fine-Tuning of LLMs", 2025).

The server keeps one global LoRA (B, A) of rank r. In each round client i draws a seeded, uniformly
random subset I_i of k_i = min(r_k, r) rank indices; its sketch is S_i = (r/k_i)·diag(1_{I_i}), so
E[S_i] = I. The client trains only B[:, I_i] and A[I_i, :] under W0 + s·B S_i A, i.e. its forward
uses the submatrices with scaling s·r/k_i (s = α/r, or α/√r with rsLoRA as in the paper), and uploads
their changes ΔB_i, ΔA_i (O(k_i), not O(r)). The server's unbiased update, with step η_s:

    B ← B + η_s Σ_i p_i ΔB_i,    A ← A + η_s Σ_i p_i ΔA_i     (ΔB_i zero outside I_i).

``normalize="holders"`` (a documented variant, not the paper's rule) divides each index's sum by the
weight of the clients that held it. With k_i = r for all clients both reduce to FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    LoraState,
    MethodOptions,
    Shapes,
    check_layers,
    derive_generator,
    holder_mean,
    init_state_factors,
    normalized_weights,
    scatter_rank_indices,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FSLoRA(MethodOptions):
    rank: int = 32
    server_lr: float = 1.0
    normalize: Literal["weights", "holders"] = "weights"
    name: ClassVar[str] = "fslora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank <= 0:
            raise ValueError(f"fslora: global rank must be positive, got {self.rank}")
        if self.normalize not in ("weights", "holders"):
            raise ValueError(f"fslora: normalize must be 'weights' or 'holders', got {self.normalize!r}")
        if self.server_lr <= 0:
            raise ValueError(f"fslora: server_lr must be positive, got {self.server_lr}")

    def init_state(self, shapes: Shapes, max_rank: int) -> LoraState:
        """The global LoRA at the configured rank r (client ranks above r are capped at r)."""
        return LoraState(init_state_factors(shapes, self.rank, self.seed))

    def sketch_indices(self, client: ClientSpec, round_index: int) -> Tensor:
        """I_i: k_i = min(r_k, r) indices drawn uniformly without replacement, seeded by (seed, round, client)."""
        k = min(client.rank, self.rank)
        g = derive_generator(self.seed, round_index, client.client_id)
        return torch.randperm(self.rank, generator=g)[:k].sort().values

    def sketch_scale(self, k: int) -> float:
        """The nonzero entry r/k of S_i = (r/k)·diag(1_I)."""
        return self.rank / k

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        idx = self.sketch_indices(client, round_index)
        k = idx.numel()
        factors = {name: LoraFactors(f.B[:, idx].clone(), f.A[idx].clone()) for name, f in state.factors.items()}
        download = sum(f.B.numel() + f.A.numel() for f in factors.values())
        scaling = self.scaling(self.rank) * self.sketch_scale(k)
        return ClientAssignment(client.client_id, k, scaling, factors, download, indices=idx)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        p = normalized_weights(updates, weights)
        check_layers(state.factors, updates, self.rank)
        idx = []
        for u in updates:
            if u.indices is None or u.indices.numel() != u.rank:
                raise AggregationError(f"fslora: client {u.client_id}'s update lacks its {u.rank} sketch indices")
            i = u.indices
            if i.dtype not in (torch.int32, torch.int64) or i.ndim != 1:
                raise AggregationError(f"fslora: client {u.client_id}'s sketch indices must be a 1-d integer tensor")
            if bool((i < 0).any() or (i >= self.rank).any()) or torch.unique(i).numel() != i.numel():
                raise AggregationError(
                    f"fslora: client {u.client_id}'s sketch indices {i.tolist()} must be distinct and in "
                    f"0..{self.rank - 1}"
                )
            idx.append(u.indices)
        out = {}
        for name, g in state.factors.items():
            dA = [u.factors[name].A - g.A[i] for u, i in zip(updates, idx, strict=True)]
            dB = [u.factors[name].B.T - g.B.T[i] for u, i in zip(updates, idx, strict=True)]
            tA, held = scatter_rank_indices(dA, idx, p, self.rank, g.A.dtype)
            tB, _ = scatter_rank_indices(dB, idx, p, self.rank, g.B.dtype)
            if self.normalize == "holders":
                zero = torch.zeros_like(tA), torch.zeros_like(tB)
                tA, tB = holder_mean(tA, held, zero[0]), holder_mean(tB, held, zero[1])
            out[name] = LoraFactors(g.B + self.server_lr * tB.T, g.A + self.server_lr * tA)
        return LoraState(out)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        """The global LoRA (S = I) at rank r."""
        if rank not in (None, self.rank):
            raise AggregationError(f"fslora's global model has rank {self.rank}; export other ranks via SVD")
        return ClientAssignment(-1, self.rank, self.scaling(self.rank), dict(state.factors), 0)
