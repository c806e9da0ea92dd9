"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, §3.2).

Client k trains LoRA at its own rank r_k. The server synthesises the full-size update

    ΔW = Σ_k p_k · (α/r_k) · B_k A_k,     p_k = n_k / Σ_j n_j,

and sends client k the best rank-r_k approximation of ΔW (Eckart–Young, via the SVD), with the singular
values folded into B and the client's scaling undone (B ← U_r diag(S_r) · r_k/α, A ← V_rᵀ).

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client k's whole update ΔW_k = s(r_k)·B_k A_k
(FlexLoRA's per-client full-size update), over all layers, to norm C, from the factors without forming m×n
(‖BA‖²_F = tr((BᵀB)(AAᵀ))); the noise N(0, σ²C²) is dense, m×n per layer, on Σ_k ΔW_k before the mean over
the K clients. Replacing one client's update moves ΔW by at most 2C/K (:meth:`FlexLoRA.dp_sensitivity`). The
dense noise makes ΔW full rank: its SVD is then a dense layer's (``benchmarks/dp_aggregate.py`` measures it).

ΔW is kept exactly as the weighted stacked factors, ΔW = [p_1 s_1 B_1 … p_K s_K B_K]·[A_1; …; A_K] (memory
O((m+n)·R) with R = Σ r_k, s_k = α/r_k), for evaluation and export; dispatch needs only the top max(r_k) SVD
triplets, which ``fedrank.lowrank.svd_of_sums_batched`` computes for all layers of one shape at once (eigh of
the smaller Gram matrix, or QR of the stacked factors + the R×R core, whichever is cheaper, and a float64
Rayleigh–Ritz step).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    MethodOptions,
    Shapes,
    check_finite,
    check_layers,
    init_state_factors,
    normalized_weights,
    product_sensitivity,
    weight_sum_for_noise,
)
from fedrank.lowrank import (
    LowRankSVD,
    stack_factors_batched,
    svd_of_product_batched,
    svd_of_sums_batched,
    truncate,
    truncate_rank,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class FlexLoRAState:
    """Before the first aggregation: the shared LoRA init (``init``). After: ΔW of every layer exactly, as
    the weighted stacked factors ΔW = B·A (``delta``, rank Σ r_k), and its top SVD components, as many as a
    client may have (``svd``). Without ``delta`` (``components`` set, or raFLoRA) ``svd`` is all there is.

    ``dispatched`` remembers, weakly, the factors sent at each rank: while a client still holds its rank's
    factors, another client of that rank is sent the same tensors (read-only: every consumer copies them into
    its model) instead of a new truncation; once no client holds them they are gone. So a driver that
    dispatches every client before training any (80 clients on SmolLM2's shapes: 0.40 s of fresh truncations)
    computes each rank once, and one that trains each client after dispatching it keeps no factor the
    clients do not (keeping every rank's for the round cost 37 MB at the quickstart's memory peak). Not part
    of the checkpoint."""

    init: dict[str, LoraFactors]
    svd: dict[str, LowRankSVD] | None = None
    delta: dict[str, LoraFactors] | None = None
    dispatched: weakref.WeakValueDictionary[tuple[int, float, bool, str], LoraFactors] = field(
        default_factory=weakref.WeakValueDictionary, init=False, repr=False, compare=False
    )

    @property
    def init_rank(self) -> int:
        """The largest client rank the state was made for (``init_state``'s ``max_rank``)."""
        return next(iter(self.init.values())).rank

    @functools.cached_property
    def dims(self) -> int:
        """Σ (m + n) over the layers: a rank-r adapter has r times as many parameters."""
        return sum(f.shape[0] + f.shape[1] for f in self.init.values())

    @property
    def max_rank(self) -> int:
        """Rank that holds every component of every layer (smaller layers are zero-padded)."""
        if self.svd is None:
            return self.init_rank
        if self.delta is not None:
            return next(iter(self.delta.values())).rank
        return max(s.rank for s in self.svd.values())

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy`` leave the memo out (weak references do not pickle); a copy starts empty."""
        return {k: v for k, v in self.__dict__.items() if k != "dispatched"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, dispatched=weakref.WeakValueDictionary())


@dataclass(frozen=True)
class FlexLoRA(MethodOptions):
    """``components``: None (default) keeps ΔW exactly, as its stacked factors, so the global model can be
    evaluated and exported at any rank, plus the top SVD components any client may need (the ``max_rank``
    the state was made for); k keeps only the top k components, all that dispatching ranks <= k needs."""

    components: int | None = None
    name: ClassVar[str] = "flexlora"
    secure_refused: ClassVar[str] = (
        "its SVD needs Σ_k p_k s_k B_k A_k, a sum of dense m×n products: each client would upload its dense "
        "ΔW_k (docs/privacy.md states that cost)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.components is not None and self.components <= 0:
            raise ValueError(f"flexlora: components must be positive or None, got {self.components}")

    def init_state(self, shapes: Shapes, max_rank: int) -> FlexLoRAState:
        return FlexLoRAState(init_state_factors(shapes, max_rank, self.seed))

    def _factors(self, state: FlexLoRAState, rank: int) -> dict[str, LoraFactors]:
        """Every layer's factors at ``rank``, in a dict of the caller's own: those some client still holds
        (``state.dispatched``), or a new truncation."""
        keys = [(rank, self.alpha, self.rslora, k) for k in state.init]
        held = [state.dispatched.get(key) for key in keys]
        if all(f is not None for f in held):
            return {key[3]: f for key, f in zip(keys, held, strict=True) if f is not None}
        factors = self._truncated(state, rank)
        state.dispatched.update((key, factors[key[3]]) for key in keys)
        return factors

    def _truncated(self, state: FlexLoRAState, rank: int) -> dict[str, LoraFactors]:
        if state.svd is None:
            if rank > state.max_rank:
                raise AggregationError(
                    f"client rank {rank} exceeds the max_rank {state.max_rank} the state was made for"
                )
            return {k: LoraFactors(*truncate_rank(f.B, f.A, rank)) for k, f in state.init.items()}
        svd = dict(state.svd)
        if state.delta is not None:  # more components than kept: from ΔW itself
            short = [k for k, s in svd.items() if s.rank < min(rank, *state.delta[k].shape, state.delta[k].rank)]
            if short:
                Bs, As = [state.delta[k].B for k in short], [state.delta[k].A for k in short]
                tops = svd_of_sums_batched(Bs, As, rank=rank)
                svd.update({k: LowRankSVD(*t) for k, t in zip(short, tops, strict=True)})
        return {k: LoraFactors(*truncate(s, rank, self.alpha, self.rslora)) for k, s in svd.items()}

    def dispatch(
        self, state: FlexLoRAState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        if self.components is not None and client.rank > self.components:
            raise AggregationError(
                f"flexlora keeps {self.components} components; client {client.client_id} has rank {client.rank}"
            )
        factors = self._factors(state, client.rank)
        download = client.rank * state.dims
        return self.assign(client, factors, download)

    def aggregate(
        self,
        state: FlexLoRAState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        noise: Mapping[str, Tensor] | None = None,
    ) -> FlexLoRAState:
        """ΔW = Σ_k p_k·s(r_k)·B_k A_k per layer, kept as its stacked factors, and its top SVD triplets: the
        layers of one shape (the 30 q_proj of a model, ...) stacked and factorised as one batch.

        ``noise`` (privacy): a dense m×n tensor per layer added to the unnormalised sum Σ_k w_k s(r_k) B_k A_k
        before the division by Σ_k w_k, kept in the stack as one more factor pair (N, I_n), or (I_m, N)
        when m < n: exact, but the SVD then works on rank Σ r_k + min(m, n), a dense layer's cost."""
        p = normalized_weights(updates, weights)
        check_layers(state.init, updates, finite=False)  # finiteness: on the stack, below
        w = [float(pk) * self.scaling(u.rank) for pk, u in zip(p, updates, strict=True)]
        top = self.components or max(state.init_rank, *(u.rank for u in updates))
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, f in state.init.items():
            by_shape.setdefault(f.shape, []).append(name)
        stacks = []
        total = torch.zeros((), dtype=torch.float64, device=next(iter(updates[0].factors.values())).B.device)
        for names in by_shape.values():
            Bs = [[u.factors[k].B for u in updates] for k in names]
            As = [[u.factors[k].A for u in updates] for k in names]
            B, A = stack_factors_batched(Bs, As, w, total=total)
            if noise is not None:
                B, A = _with_noise(
                    B, A, [noise[k] for k in names], weight_sum_for_noise(self.name, weights, len(updates))
                )
            stacks.append((names, B, A))
        if not bool(torch.isfinite(total)):
            check_finite(updates)  # names the client and layer; if all are finite, the sum overflowed
        delta, svd = {}, {}
        for names, B, A in stacks:
            U, S, Vh = svd_of_product_batched(B, A, rank=top)
            for i, k in enumerate(names):
                delta[k] = LoraFactors(B[i], A[i])
                svd[k] = LowRankSVD(U[i], S[i], Vh[i])
        order = list(state.init)
        return FlexLoRAState(
            state.init,
            {k: svd[k] for k in order},
            {k: delta[k] for k in order} if self.components is None else None,
        )

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of ΔW = (1/K) Σ_k ΔW_k with every ‖ΔW_k‖_F <= C: 2C/K."""
        return product_sensitivity(specs, clip)

    def global_model(self, state: FlexLoRAState, rank: int | None = None) -> ClientAssignment:
        """At ``rank`` (default: ΔW exactly, the stacked factors at rank Σ r_k, or every component kept)."""
        if rank is None and state.delta is not None:
            r = state.max_rank
            s = self.scaling(r)
            factors = {k: LoraFactors(f.B / s, f.A) for k, f in state.delta.items()}
            return ClientAssignment(-1, r, s, factors, 0)
        r = rank or state.max_rank
        return ClientAssignment(-1, r, self.scaling(r), self._factors(state, r), 0)


def _with_noise(B: Tensor, A: Tensor, noise: Sequence[Tensor], total: float) -> tuple[Tensor, Tensor]:
    """Stacked factors (batch, m, R), (batch, R, n) with each layer's noise / ``total`` appended as one more
    factor pair (:func:`noise_pair`)."""
    pairs = [noise_pair(x.to(B.dtype) / total) for x in noise]
    nB, nA = torch.stack([b for b, _ in pairs]), torch.stack([a for _, a in pairs])
    return torch.cat([B, nB], dim=-1), torch.cat([A, nA], dim=-2)


def noise_pair(N: Tensor) -> tuple[Tensor, Tensor]:
    """A dense m×n ``N`` as a factor pair whose product is N: (N, I_n), or (I_m, N) when m < n (the smaller
    identity), to append to a stack of factors."""
    m, n = N.shape
    if m < n:
        return torch.eye(m, dtype=N.dtype, device=N.device), N
    return N, torch.eye(n, dtype=N.dtype, device=N.device)
