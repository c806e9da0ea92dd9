"""Secure aggregation's arithmetic: what a client adds to the masked sum, and the update the server reads
back from it. Torch only; the protocol itself is Flower's SecAgg+ (``fedrank.flower``).

Under secure aggregation the server learns only the weighted mean of the round's contributions,

    x̄ = Σ_k w_k x_k / Σ_k w_k        (w_k: n_k, or 1 with ``federation.weighting = "uniform"``),

never one client's x_k, so the method's rule must be a function of that mean. It is for the methods whose
rule is a weighted mean of rank-indexed factors (:meth:`fedrank.aggregation.base.MethodOptions.secure_mean`):
client k's contribution x_k is, for every layer (sorted by name) and every factor it trained, its change
zero-padded to the global rank R (ΔB_k into the columns it held, ΔA_k into the rows), and last its holder
indicator 1[i ∈ I_k] (R entries). Every client sends the same shapes, which SecAgg+'s masks need. From the
mean the server reads, per rank index i, the change

    "weights":  Δ_i = x̄_i                        (Σ_k p_k pad(ΔF_k): FedIT, FSLoRA's unbiased rule),
    "holders":  Δ_i = x̄_i / h̄_i, h̄_i = Σ_{k∋i} w_k / Σ_k w_k   (the mean over the clients that held i:
                 FFA-LoRA, replication, RoLoRA, Fed-PLoRA; indices nobody held do not change),

with h̄_i computed exactly from the server's own dispatch and the (public) weights of the clients in the sum
(:func:`holder_shares`; the summed flags are quantised, and an unheld index's quantisation remainder divided
by the flags' own remainder would move it by 1), and hands the method one rank-R update, the global factors
plus Δ, that held every index, at weight 1:
its own ``aggregate`` on that update gives what it gives on the individual updates (up to float rounding
and SecAgg+'s quantisation; ``tests/test_secure.py`` checks every qualifying method).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedrank.types import ClientAssignment, ClientUpdate, LoraFactors

__all__ = [
    "WIRE_BYTES",
    "add_client_noise",
    "contribution",
    "contribution_numel",
    "fixed_denominators",
    "held_indices",
    "holder_shares",
    "mean_update",
    "min_contributors",
    "secure_mean_of",
    "state_rank",
]

WIRE_BYTES = 8
"""Bytes per contributed value on the wire: SecAgg+ uploads the masked, quantised values as int64."""


def secure_mean_of(method: Any) -> str | None:
    """ "weights" or "holders" (how ``method`` reads the mean), or None when it cannot run under secure
    aggregation (``method.secure_refused`` says why)."""
    fn = getattr(method, "secure_mean", None)
    return fn() if fn is not None else None


def state_rank(state: Any) -> int:
    """R: the rank of the global factors of a qualifying method's state (what contributions are padded to)."""
    return int(next(iter(state.factors.values())).rank)


def held_indices(update: ClientUpdate, sent: ClientAssignment) -> Tensor:
    """The global rank indices the client trained: its sketch or module indices, else its first r_k."""
    return update.indices if update.indices is not None else _dispatched_indices(sent)


def _dispatched_indices(a: ClientAssignment) -> Tensor:
    """The global rank indices an assignment hands its client: its sketch or module indices, else its first r_k."""
    return a.indices if a.indices is not None else torch.arange(a.rank)


def contribution(update: ClientUpdate, sent: ClientAssignment, rank: int) -> list[Tensor]:
    """Client k's x_k (see the module docstring): float32 tensors of fixed shapes for the round."""
    idx = held_indices(update, sent)
    out: list[Tensor] = []
    for name in sorted(sent.factors):
        s, u = sent.factors[name], update.factors[name]
        (m, _), n = s.B.shape, s.A.shape[1]
        if update.train_B:
            dB = torch.zeros(m, rank, dtype=torch.float32)
            dB[:, idx] = (u.B - s.B).float()
            out.append(dB)
        if update.train_A:
            dA = torch.zeros(rank, n, dtype=torch.float32)
            dA[idx] = (u.A - s.A).float()
            out.append(dA)
    held = torch.zeros(rank, dtype=torch.float32)
    held[idx] = 1.0
    out.append(held)
    return out


def contribution_numel(shapes: dict[str, tuple[int, int]], rank: int, train_A: bool, train_B: bool) -> int:
    """Elements of x_k: what each client uploads (SecAgg+ sends them as int64, 8 bytes each)."""
    per_layer = sum(m * rank * train_B + rank * n * train_A for m, n in shapes.values())
    return per_layer + rank


def mean_update(
    method: Any, state: Any, mean: Sequence[Tensor], train_A: bool, train_B: bool, clients: int
) -> ClientUpdate:
    """The one rank-R update the method aggregates in place of the round's ``clients`` updates, from the
    unmasked mean x̄ (a list in :func:`contribution`'s order)."""
    how = secure_mean_of(method)
    if how is None:
        raise ValueError(f"{method.name}: no secure aggregation ({method.secure_refused})")
    factors: dict[str, LoraFactors] = state.factors
    rank = state_rank(state)
    expect = sum(train_A + train_B for _ in factors) + 1
    if len(mean) != expect or tuple(mean[-1].shape) != (rank,):
        raise ValueError(f"secure aggregation: the sum has {len(mean)} arrays, expected {expect} for rank {rank}")
    held = mean[-1].double()
    scale = torch.zeros(rank, dtype=torch.float64)
    if how == "weights":
        scale[:] = 1.0
    else:
        scale[held > 0] = 1.0 / held[held > 0]
    parts = iter(mean[:-1])
    out = {}
    for name in sorted(factors):
        g = factors[name]
        B, A = g.B, g.A
        if train_B:
            B = g.B + (_shaped(next(parts), g.B.shape, name).double() * scale).to(g.B.dtype)
        if train_A:
            A = g.A + (_shaped(next(parts), g.A.shape, name).double() * scale.unsqueeze(1)).to(g.A.dtype)
        out[name] = LoraFactors(B, A)
    return ClientUpdate(-1, rank, clients, out, torch.arange(rank), train_A, train_B)


def _shaped(t: Tensor, shape: torch.Size, name: str) -> Tensor:
    if t.shape != shape:
        raise ValueError(
            f"secure aggregation: layer {name}'s summed change has shape {tuple(t.shape)}, not {tuple(shape)}"
        )
    return t


# ------------------------------------------------------------------ distributed DP (with [privacy])
def min_contributors(n: int, shares: float, threshold: float) -> int:
    """t: the fewest clients whose sum SecAgg+ unmasks when ``n`` start (flwr 1.42's arithmetic: every node
    needs ``reconstruction_threshold`` answering neighbours, itself included, so at least t contribute)."""
    num_shares = round(shares * n)
    if num_shares < n and num_shares % 2 == 0:
        num_shares += 1
    if num_shares <= 2:
        num_shares = n
    return min(n, max(round(threshold * num_shares), 2))


def add_client_noise(parts: Sequence[Tensor], std: float, generator: torch.Generator) -> list[Tensor]:
    """Distributed DP: the client adds N(0, std²) to every value it contributes but the holder flags (which
    the server knows: it dispatched the indices). With std = σC/√t and at least t clients in the sum, the sum
    carries at least the central mechanism's N(0, σ²C²) on every coordinate."""
    noisy = [p + std * torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in parts[:-1]]
    return [*noisy, parts[-1]]


def fixed_denominators(mean: Sequence[Tensor], present: int, dispatched: Sequence[ClientAssignment]) -> list[Tensor]:
    """The mean of ``present`` contributions re-read over all K clients the round dispatched (the central
    mechanism's rule: a client that failed counts, with no change): changes scaled by present/K, holder
    shares from the dispatched indices (public), so neither count depends on who failed."""
    K, rank = len(dispatched), mean[-1].numel()
    held = torch.zeros(rank, dtype=mean[-1].dtype)
    for a in dispatched:
        held[_dispatched_indices(a)] += 1.0
    return [m * (present / K) for m in mean[:-1]] + [held / K]


def holder_shares(contributors: Sequence[ClientAssignment], weights: Sequence[float], rank: int) -> Tensor:
    """h̄_i = Σ_{k ∋ i} w_k / Σ_k w_k over the clients in the sum, from what the server dispatched them and the
    weights SecAgg+ applied (both public): what the summed holder flags estimate, exactly."""
    held = torch.zeros(rank, dtype=torch.float64)
    for a, w in zip(contributors, weights, strict=True):
        held[_dispatched_indices(a)] += float(w)
    return (held / max(sum(weights), 1e-300)).float()
