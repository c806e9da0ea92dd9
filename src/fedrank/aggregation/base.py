"""What every aggregation method is, and the few mechanisms they share.

A method is a small frozen dataclass with two operations (the torchtune/Flower shape):

* ``dispatch(state, client, round_index, local)``: what a client of rank r_k starts the round from;
* ``aggregate(state, updates, weights)``: the new global state from the round's client updates.

States are per LoRA layer (module name -> tensors) and never see a model, a file or a framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from fedrank.lowrank import init_lora_factors, lora_scaling, truncate_rank
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors, adapter_numel

__all__ = [
    "AggregationError",
    "AggregationMethod",
    "LoraState",
    "MethodOptions",
    "Shapes",
    "check_finite",
    "check_layers",
    "derive_generator",
    "init_state_factors",
    "normalized_weights",
    "scatter_rank_indices",
]

Shapes = Mapping[str, tuple[int, int]]
"""Layer name -> (out_features m, in_features n) of the LoRA-adapted weight."""

StateT = TypeVar("StateT")


class AggregationError(ValueError):
    """A round's updates or a dispatch request that a method cannot accept, with the reason."""


class AggregationMethod(Protocol[StateT]):
    """The contract every method in :data:`fedrank.aggregation.METHODS` fulfils."""

    name: ClassVar[str]

    def init_state(self, shapes: Shapes, max_rank: int) -> StateT:
        """The global state before round 0, for layers of ``shapes`` and clients of ranks <= ``max_rank``."""
        ...

    def dispatch(
        self, state: StateT, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        """What ``client`` starts round ``round_index`` from (``local``: its persisted state, if any)."""
        ...

    def aggregate(
        self, state: StateT, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> StateT:
        """The new global state; ``weights`` p_k default to n_k / Σ n_k."""
        ...

    def upload_params(self, update: ClientUpdate) -> int:
        """Parameters a client sends for ``update``."""
        ...

    def local_state(self, update: ClientUpdate) -> dict[str, Tensor] | None:
        """What the caller must persist for this client until its next round (None: nothing)."""
        ...

    def global_model(self, state: StateT, rank: int | None = None) -> ClientAssignment:
        """The global model as an assignment (client_id -1), at ``rank`` where the method allows a choice."""
        ...


@dataclass(frozen=True)
class MethodOptions:
    """Options every method shares: LoRA α, rsLoRA scaling and the seed of shared random inits."""

    alpha: float = 16.0
    rslora: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")

    def scaling(self, rank: int) -> float:
        return lora_scaling(self.alpha, rank, self.rslora)

    def init_state(self, shapes: Shapes, max_rank: int) -> Any:
        """The shared seeded LoRA init at ``max_rank`` (methods with another state override this)."""
        return LoraState(init_state_factors(shapes, max_rank, self.seed))

    def local_state(self, update: ClientUpdate) -> dict[str, Tensor] | None:
        return None

    def assign(
        self,
        client: ClientSpec,
        factors: dict[str, LoraFactors],
        download: int | None = None,
        *,
        scale_rank: int | None = None,
        **kw: Any,
    ) -> ClientAssignment:
        """An assignment at the client's rank; download defaults to all of ``factors``.

        The scaling is the client's own s(r_k) unless ``scale_rank`` names another rank: the index-sharing
        methods pass the global rank R, so that every client trains with s(R) and a rank index means the
        same update s(R)·b_i·a_iᵀ at every client and in the global model. With each client's own s(r_k) a
        rank-4 client's components would enter a rank-32 global model at 1/8 strength and come back
        amplified 8×. ``method.scale = "fold"`` (:mod:`fedrank.aggregation.scale`) is the other convention:
        each client trains at its own s(r_k) with √(s(R)/s(r_k)) folded into both factors, the same model
        with another gradient scale. (FlexLoRA's official code has that fold, ``handle_alpha``, but its
        HeteroLoRA baseline's upload path does not call it: as shipped, its clients train at s(r_k) and their
        raw factors are zero-padded and averaged.)

        Scale conventions across methods: FlexLoRA, raFLoRA and FLoRA train each client at its own s(r_k);
        the index-sharing methods at s(R); FSLoRA at s(R)·r/k_i (its sketch). One shared learning rate is
        therefore partly a comparison of learning rates: ``fedrank study`` tunes each method's own.
        """
        sent = adapter_numel(factors) if download is None else download
        s = self.scaling(client.rank if scale_rank is None else scale_rank)
        return ClientAssignment(client.client_id, client.rank, s, factors, sent, **kw)

    def upload_params(self, update: ClientUpdate) -> int:
        return sum(f.A.numel() + f.B.numel() for f in update.factors.values())

    def dp_reference(self, sent: ClientAssignment) -> ClientAssignment:
        """What a client's contribution is measured from under ``[privacy]`` (clipped and noised as a change
        from it): what the client was sent. A method that releases a client's whole factor, not its change
        (FedSA-LoRA's B), returns it with that factor at zero."""
        return sent

    def dp_pieces(self, rank: int, ranks: Sequence[int]) -> list[tuple[int, int]] | None:
        """For a method that clips ΔW_k (``fedrank.privacy.PRODUCT_SPACE``): rank ranges whose products the clip
        bounds jointly, for a client of ``rank`` in a round of ``ranks``; None: ΔW_k whole."""
        return None

    secure_refused: ClassVar[str] = "its server rule needs each client's update, not only their weighted sum"

    def secure_mean(self) -> str | None:
        """How the method reads the round's securely summed, zero-padded changes (:mod:`fedrank.secure`):
        "weights" (their weighted mean is the rule's sum) or "holders" (each rank index's mean over the clients
        that held it); None: it cannot run under secure aggregation (:attr:`secure_refused` says why)."""
        return None


@dataclass(frozen=True)
class LoraState:
    """A global LoRA adapter at one rank: the state of most methods."""

    factors: dict[str, LoraFactors]

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values())).rank


def derive_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from integer keys (e.g. seed, round, client) independently of call order."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def init_state_factors(shapes: Shapes, rank: int, seed: int) -> dict[str, LoraFactors]:
    """The shared seeded LoRA init (B = 0, A uniform) of every layer, at ``rank``."""
    if not shapes:
        raise AggregationError("no LoRA layers given (empty shapes)")
    g = derive_generator(seed, 0x5EED)
    out = {}
    for name in sorted(shapes):
        m, n = shapes[name]
        B, A = init_lora_factors(m, n, rank, g)
        out[name] = LoraFactors(B, A)
    return out


def normalized_weights(updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None) -> Tensor:
    """p_k as a float64 tensor summing to 1: given weights, or n_k / Σ n_k (FedAvg's default)."""
    if not updates:
        raise AggregationError("cannot aggregate an empty round (no client updates)")
    raw = [float(u.num_examples) for u in updates] if weights is None else [float(w) for w in weights]
    if len(raw) != len(updates):
        raise AggregationError(f"{len(raw)} weights for {len(updates)} updates")
    p = torch.tensor(raw, dtype=torch.float64)
    if bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise AggregationError(f"aggregation weights must be finite and >= 0, got {raw}")
    total = float(p.sum())
    if total <= 0:
        what = "num_examples" if weights is None else "weights"
        raise AggregationError(f"aggregation {what} sum to 0; at least one client must count")
    return p / total


def check_layers(
    state_layers: Mapping[str, Any],
    updates: Sequence[ClientUpdate],
    max_rank: int | None = None,
    *,
    finite: bool = True,
) -> None:
    """Every update must cover exactly the state's layers, each with the layer's (m, n) shape (the state's
    values: LoraFactors or dense deltas), floating point, at a rank between 1 and ``max_rank`` (when given),
    finite (``finite=False``: the caller checks that more cheaply, e.g. on its stacked copy of the factors, and
    calls :func:`check_finite` to name the client where that fails)."""
    names = set(state_layers)
    shapes = {name: tuple(int(x) for x in layer.shape) for name, layer in state_layers.items()}
    for u in updates:
        if u.factors.keys() != names:
            missing, extra = sorted(names - set(u.factors)), sorted(set(u.factors) - names)
            raise AggregationError(
                f"client {u.client_id}: layers differ from the global state (missing {missing}, extra {extra})"
            )
        if u.rank <= 0 or (max_rank is not None and u.rank > max_rank):
            raise AggregationError(f"client {u.client_id}: rank {u.rank} outside 1..{max_rank} of the global state")
        for name, f in u.factors.items():
            want = shapes[name]
            if (f.B.shape[0], f.A.shape[1]) != want:
                raise AggregationError(
                    f"client {u.client_id}: layer {name} has ΔW shape {f.shape}, the global layer is {want}"
                )
            if not (f.B.is_floating_point() and f.A.is_floating_point()):
                raise AggregationError(f"client {u.client_id}: layer {name} has non-floating factors ({f.B.dtype})")
            if f.rank != u.rank:
                raise AggregationError(
                    f"client {u.client_id}: layer {name} has rank {f.rank}, the update says {u.rank}"
                )
        if finite:
            _check_finite(u)


def check_finite(updates: Sequence[ClientUpdate]) -> None:
    """Every update's factors finite: an :class:`AggregationError` naming the first client and layer that
    is not (what :func:`check_layers` checks by default)."""
    for u in updates:
        _check_finite(u)


def _check_finite(u: ClientUpdate) -> None:
    """All of an update's factors finite. A NaN or inf anywhere makes the sum of every element non-finite, so a
    finite sum proves them all finite at a third of the cost of per-tensor ``isfinite`` (5 ms per client at
    SmolLM2's 210 layers); a non-finite sum (a NaN, or a finite overflow) is settled layer by layer, which
    names the layer."""
    if bool(torch.isfinite(sum((f.A.sum() + f.B.sum() for f in u.factors.values()), torch.zeros(()))).all()):
        return
    for name, f in u.factors.items():
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            raise AggregationError(f"client {u.client_id}: layer {name} has non-finite factors")


def scatter_rank_indices(
    rows: Sequence[Tensor], indices: Sequence[Tensor], weights: Tensor, size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Σ_k w_k·rows_k placed at their global rank indices, and the weight each index received.

    ``rows[k]`` has one row per rank index ``indices[k]`` (A's rows; pass Bᵀ for B's columns).
    Returns (sum (size, n), holder_weight (size,)): zero padding is the sum itself, "average over
    the holders" divides by ``holder_weight``.
    """
    n = rows[0].shape[1]
    total = torch.zeros(size, n, dtype=dtype)
    held = torch.zeros(size, dtype=torch.float64)
    for row, idx, w in zip(rows, indices, weights, strict=True):
        total.index_add_(0, idx, row.to(dtype) * w.to(dtype))
        held.index_add_(0, idx, torch.full((idx.numel(),), float(w), dtype=torch.float64))
    return total, held


def weight_sum_for_noise(method: str, weights: Sequence[float] | None, count: int) -> float:
    """Σ_k w_k, what :func:`normalized_weights` divides by, for a method that adds DP noise to its unnormalised
    sum (the example counts, when ``weights`` is None, are not offered: privacy needs uniform weights, which
    the caller passes)."""
    if weights is None:
        raise AggregationError(f"{method}: noise needs the round's weights (uniform under privacy)")
    return float(sum(weights)) if count else 1.0


def product_sensitivity(specs: Sequence[ClientSpec], clip: float) -> float:
    """Replace-one sensitivity of (1/K) Σ_k ΔW_k with every ‖ΔW_k‖_F <= C (FlexLoRA, FLoRA under
    ``[privacy]``): 2C/K."""
    return 2 * clip / len(specs)


def holder_mean_sensitivity(
    specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
) -> float:
    """Replace-one sensitivity of per-index holder means (FFA-LoRA, replication, RoLoRA, Fed-PLoRA under
    ``[privacy]``): client ``which``'s clipped change (norm <= C) enters each index i it holds divided by that
    index's holders h_i, so replacing it moves the state by at most 2C / min h_i over its indices (all of it
    on the index with the fewest holders). Clients hold their ``indices``, or their first r_k."""

    def held(k: int) -> set[int]:
        idx = indices[k]
        return set(idx.tolist()) if idx is not None else set(range(specs[k].rank))

    sets = [held(k) for k in range(len(specs))]
    fewest = min(sum(i in h for h in sets) for i in sets[which])
    return 2 * clip / fewest


def holder_mean(total: Tensor, held: Tensor, previous: Tensor) -> Tensor:
    """Per rank index: the sum divided by its holders' weight; indices nobody held keep ``previous``."""
    out = previous.clone()
    mask = held > 0
    out[mask] = total[mask] / held[mask].to(total.dtype).unsqueeze(1)
    return out


def truncated_factors(factors: Mapping[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    """Every layer's first ``rank`` rank indices (the dispatch of the padding-based methods)."""
    return {k: LoraFactors(*truncate_rank(f.B, f.A, rank)) for k, f in factors.items()}


def first_indices(rank: int) -> Tensor:
    """The rank indices 0..r-1 a client of rank r holds under truncation/padding schemes."""
    return torch.arange(rank)


def combine_by_index(
    previous: LoraFactors, parts: Sequence[LoraFactors], indices: Sequence[Tensor], p: Tensor, *, mean: bool
) -> LoraFactors:
    """Combine clients' factors rank index by rank index at the global rank of ``previous``.

    ``mean=False``: zero padding, Σ_k p_k·pad(F_k) (indices nobody held become 0).
    ``mean=True``: each index is the p-weighted mean over the clients that held it; indices
    nobody held keep ``previous``.
    """
    size = previous.rank
    tA, hA = scatter_rank_indices([f.A for f in parts], indices, p, size, previous.A.dtype)
    tB, _ = scatter_rank_indices([f.B.T for f in parts], indices, p, size, previous.B.dtype)
    if not mean:
        return LoraFactors(tB.T.contiguous(), tA)
    return LoraFactors(holder_mean(tB, hA, previous.B.T).T.contiguous(), holder_mean(tA, hA, previous.A))


def combine_layers(state: LoraState, updates: Sequence[ClientUpdate], p: Tensor, *, mean: bool) -> LoraState:
    """:func:`combine_by_index` for every layer, clients holding their first r_k indices."""
    check_layers(state.factors, updates, state.rank)
    idx = [first_indices(u.rank) for u in updates]
    return LoraState(
        {
            name: combine_by_index(prev, [u.factors[name] for u in updates], idx, p, mean=mean)
            for name, prev in state.factors.items()
        }
    )
