"""Which LoRA scale a client of rank r_k trains at, for the methods whose rank indices are shared.

The index-sharing methods (HetLoRA, replication, FFA-LoRA, FedSA-LoRA, Fed-PLoRA, RoLoRA, FedEx-LoRA) keep one
global adapter of rank R, and a client holds some of its indices. By default (``method.scale = "global"``)
every client trains at the global scale s(R) (:meth:`MethodOptions.assign`): a rank index means the same
update s(R)·b_i·a_iᵀ at every client and in the global model. ``"fold"`` is the other convention, that of
FlexLoRA's official code (``handle_alpha``, which folds √(α/r) into both factors, so that the server holds
scale-free factors whose product is the update itself): the client trains at its own s(r_k) on

    B_k = c_k·B,   A_k = c_k·A,   c_k = √(s(R) / s(r_k)),

so s(r_k)·B_k A_k = s(R)·B A (the same model), and its trained factors return divided by c_k. The model a
client starts from is the same under both; what differs is the gradient's scale in each factor (by 1/c_k on
the client's parameters, c_k² in the step they take), the learning-rate interaction the study's ablation
measures. (FlexLoRA's official HeteroLoRA baseline, as shipped, does not call ``handle_alpha`` on its upload
path: its clients train at s(r_k) and their raw factors are zero-padded and averaged.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fedrank.aggregation.base import first_indices
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

__all__ = ["FOLDABLE", "SCALES", "FoldedScale"]

SCALES = ("global", "fold")
FOLDABLE = frozenset({"hetlora", "replication", "ffa", "fedsa", "fedplora", "rolora", "fedex"})
"""Methods that dispatch at the global scale s(R) (FlexLoRA, raFLoRA and FLoRA train at s(r_k) already; FedIT
and LoRA-FAIR have one rank; FSLoRA's scale carries its sketch's r/k)."""


def _scaled(factors: dict[str, LoraFactors], c: float) -> dict[str, LoraFactors]:
    return {k: LoraFactors(f.B * c, f.A * c) for k, f in factors.items()}


@dataclass(frozen=True)
class FoldedScale:
    """``inner`` (a method of :data:`FOLDABLE`) with its clients training at their own scale s(r_k)."""

    inner: Any

    @property
    def name(self) -> str:
        return str(self.inner.name)

    def _c(self, global_scaling: float, rank: int) -> float:
        return math.sqrt(global_scaling / self.inner.scaling(rank))

    def init_state(self, shapes: Any, max_rank: int) -> Any:
        return self.inner.init_state(shapes, max_rank)

    def dispatch(
        self, state: Any, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        """The inner dispatch, its factors times c_k; a persisted client state (FedSA's B, kept as the client
        trained it) is brought to the global convention first."""
        c = self._c(self.inner.scaling(state.rank), min(client.rank, state.rank))
        if local is not None:
            local = {k: v / c for k, v in local.items()}
        a: ClientAssignment = self.inner.dispatch(state, client, round_index, local)
        frozen = _scaled(a.frozen, c) if a.frozen else a.frozen  # folded modules: at the client's scale too
        return replace(a, scaling=self.inner.scaling(a.rank), factors=_scaled(a.factors, c), frozen=frozen)

    def aggregate(self, state: Any, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None) -> Any:
        """The inner aggregate of the updates divided by their c_k (back to the global convention)."""
        s_R = self.inner.scaling(state.rank)
        return self.inner.aggregate(state, [self._unfolded(state, u, s_R) for u in updates], weights)

    def _unfolded(self, state: Any, u: ClientUpdate, s_R: float) -> ClientUpdate:
        """``u``'s factors divided by its c_k. A factor the client did not train (FFA-LoRA's A, RoLoRA's
        frozen half) that it returned exactly as sent, c_k times the state's (the first r_k indices, or
        ``u.indices``), becomes the state's own factor: (c·x)/c rounds, and the inner method checks that a
        frozen factor came back unchanged bit for bit. A changed one is divided like the rest, so the inner
        check still refuses it."""
        c = self._c(s_R, u.rank)
        idx = u.indices if u.indices is not None else first_indices(u.rank)
        out = {}
        for name, f in u.factors.items():
            B, A = f.B / c, f.A / c
            sent = state.factors.get(name)
            if sent is not None and not u.train_A and torch.equal(f.A, sent.A[idx] * c):
                A = sent.A[idx].clone()
            if sent is not None and not u.train_B and torch.equal(f.B, sent.B[:, idx] * c):
                B = sent.B[:, idx].clone()
            out[name] = LoraFactors(B, A)
        return replace(u, factors=out)

    def upload_params(self, update: ClientUpdate) -> int:
        return int(self.inner.upload_params(update))

    def local_state(self, update: ClientUpdate) -> dict[str, Tensor] | None:
        return self.inner.local_state(update)  # type: ignore[no-any-return]

    def global_model(self, state: Any, rank: int | None = None) -> ClientAssignment:
        return self.inner.global_model(state, rank)  # type: ignore[no-any-return]
