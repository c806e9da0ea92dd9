"""Stand-ins for local training shared by the aggregation tests, and the tiny run the simulator and Flower
tests share."""

from __future__ import annotations

import tomllib
from typing import Any

import tomli_w
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


TINY_TOML = """
seed = 0
[model]
name = "tiny"
[data]
source = "synthetic"
synthetic_tasks = 8
synthetic_examples = 16
[partition]
kind = "task"
num_clients = 4
num_eval_tasks = 2
min_examples = 8
[ranks]
distribution = "uniform"
choices = [2, 4]
[method]
name = "flexlora"
[federation]
rounds = 2
clients_per_round = 2
[train]
steps = 2
batch_size = 2
lr = 0.01
max_seq_len = 48
[eval]
participants = 1
reuse_base = false
[eval.settings]
max_new_tokens = 2
max_new_tokens_cap = 4
max_seq_len = 48
[output]
plots = false
"""
"""A two-round FlexLoRA run of the tiny Llama on synthetic tasks."""


def tiny_toml(**sections: dict[str, Any]) -> str:
    """:data:`TINY_TOML` with keys of its top-level sections set (a value of None removes the key)."""
    cfg = tomllib.loads(TINY_TOML)
    for section, values in sections.items():
        for key, value in values.items():
            if value is None:
                cfg[section].pop(key, None)
            else:
                cfg[section][key] = value
    return tomli_w.dumps(cfg)
