"""What a client's update must satisfy before the server lets it near the global state.

A federated server aggregates data it does not control. Every update is checked against what that client
was dispatched (:class:`~fedrank.types.ClientAssignment`): the same layers, the dispatched rank (or less,
where the method lets a client prune), factor shapes that fit the layer, the dispatched dtype, finite
values, factors the client was told to keep frozen left unchanged, FSLoRA's sketch indices exactly the
seeded draw it was sent (so no duplicates), and optionally a bound on the size of the change. A rejected
update is reported with the client, the layer and the reason, and never reaches the aggregation.

Used by every driver (the in-process simulator today): pure torch, no model, no file, no framework.
"""

from __future__ import annotations

import math

import torch

from fedrank.types import ClientAssignment, ClientUpdate

__all__ = ["RunFailed", "update_norm", "validate_update"]


class RunFailed(RuntimeError):
    """A run that cannot go on (e.g. too many rounds without enough valid client updates)."""


def update_norm(update: ClientUpdate, sent: ClientAssignment) -> float:
    """‖update − dispatched‖ over every factor of every layer (Frobenius), in float64.

    Defined only for an update of the dispatched rank (a pruned client's factors are compared on its kept
    indices)."""
    total = 0.0
    for name, f in update.factors.items():
        s = sent.factors[name]
        r = f.rank
        total += float((f.B.double() - s.B[:, :r].double()).square().sum())
        total += float((f.A.double() - s.A[:r].double()).square().sum())
    return math.sqrt(total)


def validate_update(
    update: ClientUpdate, sent: ClientAssignment, *, may_prune: bool = False, max_norm: float = 0.0
) -> str | None:
    """None when ``update`` is acceptable as the answer to ``sent``; otherwise the reason, naming the layer.

    ``may_prune``: the client may return fewer rank indices than it was sent (HetLoRA's self-pruning keeps
    the first r' <= r_k). ``max_norm`` > 0 rejects updates whose factors moved further than that from what
    was dispatched (:func:`update_norm`).
    """
    if update.client_id != sent.client_id:
        return f"update from client {update.client_id} answers the assignment of client {sent.client_id}"
    names, want = set(update.factors), set(sent.factors)
    if names != want:
        return f"layers differ from those dispatched (missing {sorted(want - names)}, extra {sorted(names - want)})"
    if update.rank <= 0 or update.rank > sent.rank or (update.rank < sent.rank and not may_prune):
        return f"rank {update.rank} where {sent.rank} was dispatched"
    for name in sorted(want):
        f, s = update.factors[name], sent.factors[name]
        m, n = s.shape
        if tuple(f.B.shape) != (m, update.rank) or tuple(f.A.shape) != (update.rank, n):
            got = f"B{tuple(f.B.shape)} A{tuple(f.A.shape)}"
            return f"layer {name}: factors {got}, expected B{(m, update.rank)} A{(update.rank, n)}"
        if f.B.dtype != s.B.dtype or f.A.dtype != s.A.dtype:
            return f"layer {name}: dtype {f.B.dtype}/{f.A.dtype}, {s.B.dtype} was dispatched"
        if not (bool(torch.isfinite(f.B).all()) and bool(torch.isfinite(f.A).all())):
            return f"layer {name}: non-finite values"
        r = update.rank
        if not sent.train_A and not torch.equal(f.A, s.A[:r].to(f.A.device)):
            return f"layer {name}: changed A, which it was told to keep frozen"
        if not sent.train_B and not torch.equal(f.B, s.B[:, :r].to(f.B.device)):
            return f"layer {name}: changed B, which it was told to keep frozen"
    if sent.indices is not None:
        idx = update.indices
        if idx is None:
            return "no sketch indices (the server sent some)"
        if idx.numel() != torch.unique(idx).numel():
            return f"duplicate sketch indices {idx.tolist()}"
        if idx.numel() != update.rank or not torch.equal(idx.cpu(), sent.indices.cpu()):
            return f"sketch indices {idx.tolist()} differ from the seeded draw {sent.indices.tolist()}"
    elif update.indices is not None:
        return "sketch indices where the server sent none"
    if max_norm > 0:
        norm = update_norm(update, sent)
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds federation.max_update_norm = {max_norm:g}"
    return None
