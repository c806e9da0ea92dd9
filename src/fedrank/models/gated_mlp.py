"""The gated MLP of Llama-like models, SiLU(gate) * up, keeping one tensor fewer for the backward.

Autograd keeps three intermediate-sized tensors per layer for ``down(silu(gate(x)) * up(x))``: ``gate(x)``
(for SiLU's gradient), ``silu(gate(x))`` and ``up(x)`` (for the product's). :class:`_SiLUMul` keeps
``gate(x)`` and ``up(x)`` and makes ``silu(gate(x))`` again in the backward, an elementwise op: for
SmolLM2-135M that is 6 KB less per trained position and layer, 46 MB for a pass of 256 positions, about
a seventh of what a pass keeps. Without autograd (evaluation, generation) SiLU and the product are taken in
place in ``gate``: no intermediate-sized tensor is allocated at all (a prompt pass of 16 rows of ~180
tokens: 2.16 against 2.33 s). Values and gradients are those of the plain module, bit for bit (the same
ops on the same operands).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SiLUMul(torch.autograd.Function):
    """``silu(gate) * up``, saving only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return g_gate, g_up


def _forward(self: Any, x: Tensor) -> Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        hidden: Tensor = _SiLUMul.apply(gate, up)
    else:  # nothing will read gate or up again: no new tensor (on this VM a fresh one costs its page faults)
        hidden = F.silu(gate, inplace=True).mul_(up)
    out: Tensor = self.down_proj(hidden)
    return out


def _is_gated_silu(mod: nn.Module) -> bool:
    act = getattr(mod, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(isinstance(getattr(mod, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))


def lean_gated_mlps(model: nn.Module) -> int:
    """Give every gated SiLU MLP of ``model`` (``gate_proj``, ``up_proj``, ``down_proj``, a SiLU ``act_fn``:
    Llama's, Mistral's, Qwen2's) the forward above, in place; the number changed. The projections are looked
    up at each call, so peft's LoRA layers, added later, are used."""
    n = 0
    for mod in model.modules():
        if _is_gated_silu(mod):
            mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n
