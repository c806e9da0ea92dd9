"""Stand-ins for local training shared by the aggregation tests."""

from __future__ import annotations

from typing import Any

import torch

from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors


def perturb(a: ClientAssignment, g: torch.Generator, scale: float = 1.0) -> dict[str, LoraFactors]:
    """The dispatched factors moved by scale·N(0, 1) wherever the client may train."""
    out = {}
    for name, f in a.factors.items():
        B = f.B + (scale * torch.randn(f.B.shape, generator=g, dtype=f.B.dtype) if a.train_B else 0)
        A = f.A + (scale * torch.randn(f.A.shape, generator=g, dtype=f.A.dtype) if a.train_A else 0)
        out[name] = LoraFactors(B, A)
    return out


def trained_update(a: ClientAssignment, spec: ClientSpec, g: torch.Generator, scale: float = 1.0) -> ClientUpdate:
    """What the simulator would send back for ``a`` after training (its flags and sketch indices echoed)."""
    return ClientUpdate(
        spec.client_id, a.rank, spec.num_examples, perturb(a, g, scale), a.indices, a.train_A, a.train_B
    )


def dispatch_and_train(
    method: Any, state: Any, spec: ClientSpec, g: torch.Generator, round_index: int = 0, local: Any = None
) -> ClientUpdate:
    """Dispatch to ``spec``, then perturb what it may train."""
    return trained_update(method.dispatch(state, spec, round_index, local), spec, g)
