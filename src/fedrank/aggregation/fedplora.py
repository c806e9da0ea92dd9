"""Fed-PLoRA (Zhang, Hu & Xu, "Heterogeneous Federated Fine-Tuning with Parallel One-Rank Adaptation",
ICLR 2026, arXiv 2602.16936), PLoRA + Select-N-Fold.

PLoRA writes the global rank-R adapter as R parallel rank-1 modules, ΔW = s_R Σ_{j=1}^{R} B_(j) A_(j) with
B_(j) = B[:, j], A_(j) = A[j, :] (the same function as LoRA's s_R·B A). In round t client i of rank r_i

* selects K_i ⊂ {1..R}, |K_i| = min(r_i, R), uniformly at random without replacement (the paper's random
  selection, so that every module keeps being trained); the draw comes from the run's seed, the round and
  the client, so a resumed run selects the same modules;
* folds the unselected modules into its frozen base and trains only the selected ones, with the global
  scaling s_R = lora_scaling(α, R):

      W_i = W0 + s_R Σ_{j∉K_i} B_(j) A_(j)   (frozen),      trainable {B_(j), A_(j) : j ∈ K_i},

  so it starts from the global model exactly (the paper's zero initialisation noise);
* uploads the selected modules with their indices. The server averages each module over the clients that
  trained it, Q_j = {i : j ∈ K_i}, and keeps the modules nobody trained:

      B_(j) ← Σ_{i∈Q_j} p_i B_i,(j) / Σ_{i∈Q_j} p_i,     A_(j) likewise,     p_i = n_i / Σ n.

Source: the paper's abstract and a detailed note of its §3 (the fold W_i = W0 + Σ_{j∉K_i} B_(j) A_(j), random
selection, module-wise averages over Q_j); the official code (TNI-playground/Fed-PLoRA) was not available here.
Deviations, stated: the paper's module average is the plain mean over Q_j; here it is weighted by p_i (the
plain mean when clients hold equal data, or with equal ``weights``). The paper writes ΔW without a LoRA
scaling; here the one scaling of the global adapter, s_R, is used everywhere, so a module means the same at
every client and in the global model. B and A of a module are averaged separately (the paper's rule), so
the aggregate is not exactly Σ_i p_i ΔW_i: only the initialisation is exact.

Communication: a client must receive all R modules to fold the unselected ones, R·(m + n) per layer
(the paper's noted downlink overhead over HetLoRA): its r_i trainable modules and the R − r_i frozen ones
(:attr:`ClientAssignment.frozen`), which it folds into its base itself (:mod:`fedrank.aggregation.fold`).
It sends its r_i selected modules, r_i·(m + n). The module indices (r_i integers) are not counted.

Privacy (``[privacy]``, :mod:`fedrank.privacy`): clipped is client i's upload (the change of its selected
modules, B_(j) and A_(j) for j ∈ K_i), over all layers, to norm C; the noise N(0, σ²C²) goes on each module's
sum over Q_j (carried by its first holder), which the rule divides by |Q_j| (uniform weights). Replacing one
client's update moves the aggregate by at most 2C / min_{j ∈ K_i} |Q_j| (:meth:`FedPLoRA.dp_sensitivity`);
the modules a round changed show part of its sample, so ε is accounted without amplification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank.aggregation.base import (
    AggregationError,
    LoraState,
    MethodOptions,
    check_layers,
    combine_by_index,
    derive_generator,
    holder_mean_sensitivity,
    normalized_weights,
)
from fedrank.aggregation.fold import complement, select_indices
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, payload_numel


@dataclass(frozen=True)
class FedPLoRA(MethodOptions):
    """The global adapter has rank R = ``max_rank`` of :meth:`init_state` (the pool's largest rank)."""

    name: ClassVar[str] = "fedplora"

    def secure_mean(self) -> str | None:
        return "holders"

    def select(self, client: ClientSpec, round_index: int, R: int) -> Tensor:
        """K_i: min(r_i, R) module indices drawn uniformly without replacement, seeded by (seed, round, client)."""
        k = min(client.rank, R)
        g = derive_generator(self.seed, round_index, client.client_id)
        return torch.randperm(R, generator=g)[:k].sort().values

    def dispatch(
        self, state: LoraState, client: ClientSpec, round_index: int, local: dict[str, Tensor] | None = None
    ) -> ClientAssignment:
        R = state.rank
        idx = self.select(client, round_index, R)
        s = self.scaling(R)
        factors = select_indices(state.factors, idx)
        frozen = complement(state.factors, idx)  # the unselected modules, folded by the client
        download = payload_numel(factors, frozen)  # R·(m + n) per layer
        return ClientAssignment(client.client_id, idx.numel(), s, factors, download, indices=idx, frozen=frozen)

    def aggregate(
        self, state: LoraState, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
    ) -> LoraState:
        p = normalized_weights(updates, weights)
        check_layers(state.factors, updates)
        R = state.rank
        idx = []
        for u in updates:
            i = u.indices
            valid = i is not None and i.numel() == u.rank and len(set(i.tolist())) == u.rank
            if i is None or not valid or int(i.min()) < 0 or int(i.max()) >= R:
                raise AggregationError(
                    f"fedplora: client {u.client_id}'s update needs its {u.rank} distinct module indices in [0, {R})"
                )
            idx.append(i)
        return LoraState(
            {
                name: combine_by_index(prev, [u.factors[name] for u in updates], idx, p, mean=True)
                for name, prev in state.factors.items()
            }
        )

    def dp_sensitivity(
        self, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
    ) -> float:
        """Replace-one sensitivity of the holder means: 2C over the fewest holders of an index client
        ``which`` holds."""
        return holder_mean_sensitivity(specs, indices, which, clip)

    def global_model(self, state: LoraState, rank: int | None = None) -> ClientAssignment:
        """All R modules at scaling s_R (export other ranks via SVD)."""
        if rank not in (None, state.rank):
            raise AggregationError(f"fedplora's global model has rank {state.rank}; export other ranks via SVD")
        return ClientAssignment(-1, state.rank, self.scaling(state.rank), dict(state.factors), 0)
