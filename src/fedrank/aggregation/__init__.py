"""Aggregation methods for heterogeneous-rank federated LoRA, one file per method.

``METHODS`` maps registry names to method classes; :func:`make_method` builds one from options and
rejects unknown names and options with the valid choices, never falling back to another method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedrank.aggregation.base import AggregationError, AggregationMethod, LoraState, MethodOptions
from fedrank.aggregation.fedex import FedExLoRA, FedExState
from fedrank.aggregation.fedit import FedIT
from fedrank.aggregation.fedplora import FedPLoRA
from fedrank.aggregation.fedsa import FedSALoRA
from fedrank.aggregation.ffa import FFALoRA
from fedrank.aggregation.flexlora import FlexLoRA, FlexLoRAState
from fedrank.aggregation.flora import FLoRA, FLoRAState
from fedrank.aggregation.fslora import FSLoRA
from fedrank.aggregation.hetlora import HetLoRA, HetLoRAPruning
from fedrank.aggregation.lorafair import LoRAFAIR
from fedrank.aggregation.raflora import RaFLoRA
from fedrank.aggregation.replication import Replication
from fedrank.aggregation.rolora import RoLoRA, RoLoRAState

METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (
        *(FedIT, FlexLoRA, HetLoRA, Replication, FLoRA, FFALoRA, FedSALoRA, FSLoRA, LoRAFAIR),
        *(FedPLoRA, FedExLoRA, RoLoRA, RaFLoRA),  # the 2025-2026 methods (issue 11)
    )
}

HOMOGENEOUS = frozenset({"fedit", "lorafair"})
"""Methods that need every client at one rank."""


class UnknownMethodError(KeyError):
    """A method name that is not in :data:`METHODS`."""

    def __str__(self) -> str:
        return str(self.args[0])


def make_method(name: str, **options: Any) -> AggregationMethod[Any]:
    """Build the method registered as ``name`` with ``options`` (its dataclass fields)."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown aggregation method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise AggregationError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
    method: AggregationMethod[Any] = cls(**options)
    return method


__all__ = [
    "HOMOGENEOUS",
    "METHODS",
    "AggregationError",
    "AggregationMethod",
    "FFALoRA",
    "FLoRA",
    "FLoRAState",
    "FSLoRA",
    "FedExLoRA",
    "FedExState",
    "FedIT",
    "FedPLoRA",
    "FedSALoRA",
    "FlexLoRA",
    "FlexLoRAState",
    "HetLoRA",
    "HetLoRAPruning",
    "LoRAFAIR",
    "LoraState",
    "MethodOptions",
    "RaFLoRA",
    "Replication",
    "RoLoRA",
    "RoLoRAState",
    "UnknownMethodError",
    "make_method",
]
