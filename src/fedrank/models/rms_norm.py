"""Llama-style RMSNorm without a copy it does not need, when nothing records gradients.

transformers' ``LlamaRMSNorm`` (and Mistral's and Qwen2's, the same code) computes
``weight * (h * rsqrt(mean(h²) + ε))``: two new tensors of the hidden state's size, the second only to hold
the product with the weight. Without autograd (evaluation, generation) :func:`lean_rms_norms`' forward
multiplies the first in place instead. On this project's 2-core VM a fresh tensor costs its page faults: a
prompt pass of 16 rows of ~180 tokens through SmolLM2-135M took 2.10 against 2.18 s (interleaved, best of 4).
The values are the same bit for bit (the same ops on the same operands; a product of two floats does not
depend on their order), which :func:`lean_rms_norms` checks on each module before changing it. Training
(autograd on) and other dtypes take the module's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn


def _forward(self: Any, h: Tensor) -> Tensor:
    if torch.is_grad_enabled() or h.dtype != torch.float32 or self.weight.dtype != torch.float32:
        out: Tensor = type(self).forward(self, h)
        return out
    variance = h.pow(2).mean(-1, keepdim=True)
    return (h * torch.rsqrt(variance + self.variance_epsilon)).mul_(self.weight)


def lean_rms_norms(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm of ``model`` (a ``weight`` and a ``variance_epsilon``, a class named
    ``...RMSNorm``) the forward above, in place, where it gives its own forward's output bit for bit on a
    random input (a norm of another formula, e.g. Gemma's ``1 + weight``, keeps its own); the number changed."""
    n = 0
    gen = torch.Generator().manual_seed(0)
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if not type(mod).__name__.endswith("RMSNorm") or not hasattr(mod, "variance_epsilon"):
            continue
        if not isinstance(weight, Tensor) or weight.dtype != torch.float32 or weight.ndim != 1:
            continue
        h = torch.randn(3, weight.shape[0], generator=gen).to(weight.device)
        with torch.no_grad():
            if not torch.equal(_forward(mod, h), type(mod).forward(mod, h)):
                continue
        mod.forward = types.MethodType(_forward, mod)
        n += 1
    return n
