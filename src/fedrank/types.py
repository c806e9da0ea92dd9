"""The data that crosses between server and clients: tensors in small frozen dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Adapter", "ClientAssignment", "ClientSpec", "ClientUpdate", "LoraFactors", "adapter_numel", "payload_numel"]


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA layer: ΔW = scaling · B @ A with B (m, r) and A (r, n)."""

    B: Tensor
    A: Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            got = f"B{tuple(self.B.shape)} A{tuple(self.A.shape)}"
            raise ValueError(f"LoRA factors need B (m, r) and A (r, n); got {got}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the layer's ΔW."""
        return int(self.B.shape[0]), int(self.A.shape[1])


Adapter = Mapping[str, LoraFactors]
"""LoRA factors of a whole model: layer (module) name -> factors."""


def adapter_numel(adapter: Adapter, *, A: bool = True, B: bool = True) -> int:
    """Number of parameters in an adapter, optionally only its A or B factors."""
    return sum((f.A.numel() if A else 0) + (f.B.numel() if B else 0) for f in adapter.values())


def payload_numel(
    factors: Adapter, frozen: Adapter | None = None, base_delta: Mapping[str, Tensor] | None = None
) -> int:
    """Elements of the tensors an assignment carries: its factors, frozen modules and dense base delta."""
    dense = sum(d.numel() for d in (base_delta or {}).values())
    return adapter_numel(factors) + adapter_numel(frozen or {}) + dense


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows about a client: its id, its LoRA rank and its data size n_k."""

    client_id: int
    rank: int
    num_examples: int

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"client {self.client_id}: rank must be positive, got {self.rank}")
        if self.num_examples < 0:
            raise ValueError(f"client {self.client_id}: num_examples must be >= 0, got {self.num_examples}")


@dataclass(frozen=True)
class ClientAssignment:
    """What a client starts a round from.

    ``factors`` are the LoRA factors at the client's ``rank``; the client's forward pass uses

        W0 + base_delta + scaling · B_frozen @ A_frozen + scaling · B @ A.

    ``train_A`` / ``train_B`` say which factors are trainable. ``frozen`` are LoRA modules the client holds
    frozen at the same ``scaling`` (Fed-PLoRA, RoLoRA, FedEx-LoRA: the global indices it does not train); the
    client folds them into its base weights itself (:func:`fedrank.aggregation.fold.dense_base`), so only
    their factors travel. ``base_delta`` is a true dense m×n delta (FedEx-LoRA's residual, FLoRA's merged
    update). ``indices`` (FSLoRA, Fed-PLoRA) are the global rank indices the factors' columns/rows stand for.
    ``download_params`` counts what the server sends for this assignment: the elements of its factors,
    frozen modules and base delta (:func:`payload_numel`; the few integer ``indices`` are not counted).
    """

    client_id: int
    rank: int
    scaling: float
    factors: dict[str, LoraFactors]
    download_params: int
    train_A: bool = True
    train_B: bool = True
    indices: Tensor | None = None
    base_delta: dict[str, Tensor] | None = field(default=None, repr=False)
    frozen: dict[str, LoraFactors] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's trained factors after a round, with what the aggregation needs to weigh them.

    ``train_A`` / ``train_B`` echo the assignment's: which factors the client trained and so must upload.
    """

    client_id: int
    rank: int
    num_examples: int
    factors: dict[str, LoraFactors]
    indices: Tensor | None = None
    train_A: bool = True
    train_B: bool = True

    @property
    def spec(self) -> ClientSpec:
        return ClientSpec(self.client_id, self.rank, self.num_examples)
