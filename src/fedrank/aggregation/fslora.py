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

``server_optimizer="adamw"`` is what the official code (wenzhifang/Federated-Sketching-LoRA-Implementation,
``LoRA_Sketching.py``; its default ``--server-opt adam``, ``--server-lr 3e-4``) does instead of the step above:
the server treats g = −Σ_i p_i ΔB_i (there: the plain mean over the round's clients of
(server − client)·mask, i.e. p_i = 1/K with ``federation.weighting = "uniform"``) as a gradient and takes one
``torch.optim.AdamW`` step on (B, A) with it (β = (0.9, 0.999), ε = 1e-8, weight decay 0.01, its moments
kept across rounds in :class:`FSLoRAServerState`). Two more differences from that code, which fedrank does
not copy: its defaults are ``lora_alpha = 1`` and client lr 3e-4, and it never applies its own sketch (it
selects parameters with ``'lora_B' == n``, never true under peft's parameter names, so its clients train
the full rank, unscaled, and the mask is all ones). fedrank applies the paper's sketch.

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client i's upload (ΔB_i, ΔA_i) on its k_i
indices, over all layers, to norm C (zero-padded to r it has the same norm); the noise N(0, σ²C²) goes on
every coordinate of the zero-padded sums Σ_i ΔB_i, ΔA_i, at every one of the r indices whether a client held
it or not (``index_noise``: an index nobody held would otherwise stay unchanged and show part of the sample,
so ε keeps the sampling's amplification), before the weights p_i = 1/K and the server's step (η_s, or
AdamW, whose output is post-processing of the noised sum). Replacing one client's update moves
the noised sum Σ_i p_i ΔB_i by at most 2C/K, and with the SGD server step the state by η_s·2C/K
(:meth:`FSLoRA.dp_sensitivity`). Only ``normalize="weights"`` (the paper's rule) is offered under DP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    weight_sum_for_noise,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FSLoRAServerState(LoraState):
    """The global LoRA and the server's AdamW state (``server_optimizer="adamw"``): first and second moments
    per layer, shaped like the factors, and the number of steps taken."""

    m: dict[str, LoraFactors] = field(default_factory=dict)
    v: dict[str, LoraFactors] = field(default_factory=dict)
    step: int = 0


ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8
"""``torch.optim.AdamW``'s defaults, which the official code's server optimiser uses (and weight decay 0.01)."""


def adamw_step(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr: float, weight_decay: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """One ``torch.optim.AdamW`` step of parameter ``p`` with gradient ``g`` and moments ``m``, ``v`` (``step``:
    1 for the first): the new (p, m, v). Decoupled weight decay first, then the bias-corrected Adam step."""
    (b1, b2), eps = ADAMW_BETAS, ADAMW_EPS
    p = p * (1 - lr * weight_decay)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2**step) ** 0.5 + eps
    return p - (lr / (1 - b1**step)) * m / denom, m, v


@dataclass(frozen=True)
class FSLoRA(MethodOptions):
    """``server_lr``: the server step η_s (default 1.0: the paper's rule; 3e-4 with AdamW, the official
    default); ``server_optimizer``: "sgd" (B ← B + η_s Σ_i p_i ΔB_i) or "adamw" (see the module docstring)."""

    rank: int = 32
    server_lr: float | None = None
    normalize: Literal["weights", "holders"] = "weights"
    server_optimizer: Literal["sgd", "adamw"] = "sgd"
    server_weight_decay: float = 0.01
    name: ClassVar[str] = "fslora"

    def secure_mean(self) -> str | None:
        """The paper's rule adds the weighted sum of the zero-padded changes; "holders" divides per index."""
        return "weights" if self.normalize == "weights" else "holders"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank <= 0:
            raise ValueError(f"fslora: global rank must be positive, got {self.rank}")
        if self.normalize not in ("weights", "holders"):
            raise ValueError(f"fslora: normalize must be 'weights' or 'holders', got {self.normalize!r}")
        if self.server_optimizer not in ("sgd", "adamw"):
            raise ValueError(f"fslora: server_optimizer must be 'sgd' or 'adamw', got {self.server_optimizer!r}")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ValueError(f"fslora: server_lr must be positive, got {self.server_lr}")
        if not self.server_weight_decay >= 0:
            raise ValueError(f"fslora: server_weight_decay must be >= 0, got {self.server_weight_decay}")

    @property
    def step_size(self) -> float:
        """η_s: ``server_lr``, or its default for the server optimiser (1.0 for sgd, 3e-4 for adamw)."""
        if self.server_lr is not None:
            return self.server_lr
        return 3e-4 if self.server_optimizer == "adamw" else 1.0

    def init_state(self, shapes: Shapes, max_rank: int) -> LoraState:
        """The global LoRA at the configured rank r (client ranks above r are capped at r), with zero AdamW
        moments for the "adamw" server."""
        factors = init_state_factors(shapes, self.rank, self.seed)
        if self.server_optimizer == "sgd":
            return LoraState(factors)
        zeros = {k: LoraFactors(torch.zeros_like(f.B), torch.zeros_like(f.A)) for k, f in factors.items()}
        return FSLoRAServerState(factors, zeros, {k: LoraFactors(z.B.clone(), z.A.clone()) for k, z in zeros.items()})

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
        self,
        state: LoraState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        index_noise: Mapping[str, LoraFactors] | None = None,
    ) -> LoraState:
        """``index_noise`` (privacy): per layer noise shaped like (B, A), added to the zero-padded sums
        Σ_i w_i ΔB_i, ΔA_i at every index before the division by Σ_i w_i."""
        p = normalized_weights(updates, weights)
        check_layers(state.factors, updates, self.rank)
        total = weight_sum_for_noise(self.name, weights, len(updates)) if index_noise is not None else 1.0
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
        out, m, v = {}, {}, {}
        for name, g in state.factors.items():
            dA = [u.factors[name].A - g.A[i] for u, i in zip(updates, idx, strict=True)]
            dB = [u.factors[name].B.T - g.B.T[i] for u, i in zip(updates, idx, strict=True)]
            tA, held = scatter_rank_indices(dA, idx, p, self.rank, g.A.dtype)
            tB, _ = scatter_rank_indices(dB, idx, p, self.rank, g.B.dtype)
            if index_noise is not None:
                tA = tA + index_noise[name].A.to(tA.dtype) / total
                tB = tB + index_noise[name].B.T.to(tB.dtype) / total
            if self.normalize == "holders":
                zero = torch.zeros_like(tA), torch.zeros_like(tB)
                tA, tB = holder_mean(tA, held, zero[0]), holder_mean(tB, held, zero[1])
            if not isinstance(state, FSLoRAServerState):
                out[name] = LoraFactors(g.B + self.step_size * tB.T, g.A + self.step_size * tA)
                continue
            # the official server: Σ_i p_i (server − client)·mask_i as the gradient of one AdamW step
            t, wd = state.step + 1, self.server_weight_decay
            B, mB, vB = adamw_step(g.B, -tB.T, state.m[name].B, state.v[name].B, t, self.step_size, wd)
            A, mA, vA = adamw_step(g.A, -tA, state.m[name].A, state.v[name].A, t, self.step_size, wd)
            out[name], m[name], v[name] = LoraFactors(B, A), LoraFactors(mB, mA), LoraFactors(vB, vA)
        if isinstance(state, FSLoRAServerState):
            return FSLoRAServerState(out, m, v, state.step + 1)
        return LoraState(out)

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity: 2C/K on the weighted sum Σ_i p_i ΔB_i, ΔA_i, times η_s for the SGD step's
        state (AdamW's step is post-processing: the bound is the sum's)."""
        scale = self.step_size if self.server_optimizer == "sgd" else 1.0
        return scale * 2 * clip / len(specs)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        """The global LoRA (S = I) at rank r."""
        if rank not in (None, self.rank):
            raise AggregationError(f"fslora's global model has rank {self.rank}; export other ranks via SVD")
        return ClientAssignment(-1, self.rank, self.scaling(self.rank), dict(state.factors), 0)
