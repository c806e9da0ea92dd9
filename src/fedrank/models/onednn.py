"""fp32 ``nn.Linear`` layers through oneDNN on the CPU.

torch's CPU wheel runs a float32 ``F.linear`` through MKL's sgemm. On the 2-core AMD EPYC (Zen 5, AVX-512)
this project is measured on, that reaches 180-210 GFLOP/s on SmolLM2's shapes, and oneDNN's kernel
(``torch.ops.mkldnn._linear_pointwise``, the one torch's own compiler emits for CPU linear layers) 450: 1.9-2.6x
per matmul for the model's layers and its vocabulary projection at 4-512 rows, 1.5-1.7x for the LoRA factors,
forward and backward (``benchmarks/train_step.py --quickstart`` shows the effect on training). The arithmetic
is the same product in float32; only the order of the additions, hence the last bits, differs.

:func:`use_onednn` swaps the class of a model's ``nn.Linear`` modules to :class:`OneDNNLinear` (an
``nn.Linear`` subclass: weights, state dict, peft wrapping and weight tying are untouched). A call on
another device or dtype, or where this torch has no oneDNN, takes ``nn.Linear``'s own route.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_CAPACITY = 16
"""Entries kept by each of oneDNN's two caches of prepared kernels (ideep's ``LRU_CACHE_CAPACITY`` and
oneDNN's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; both default to 1024). Every new input shape adds an entry of
about 0.3 MB to each, and packed training batches have a new shape almost every step: with the defaults a
quickstart run's resident memory grew by 0.09 GB per round (flat with MKL). A LoRA training pass uses about
20 shapes, but in cycles of 9 (a decoder layer's forward, then its backward), so 16 entries still serve
every layer after the first; measured no slower (600 varying shapes: 6.8-7.3 s with 16-64 entries against
9.0 s with 1024; 6 shapes repeated: the same; a pass's 12 LoRA-layer shapes x 30 layers, the rows of a
pass repeating: 126 / 121 / 115 ms per pass with 16 / 64 / 1024 entries, one run each; the quickstart's
training took 61-70 s in five runs with 16 and 64-72 s in five with 64, this machine's run-to-run
variation), and the quickstart's peak was 1.86-1.93 GiB in three runs with 16, 1.93-1.97 in five with 64. Set here,
before oneDNN's first use, unless the environment sets them (a process that used oneDNN before importing
this keeps its own)."""
os.environ.setdefault("LRU_CACHE_CAPACITY", str(CACHE_CAPACITY))
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(CACHE_CAPACITY))


def available() -> bool:
    """Whether this torch has oneDNN and its linear kernel."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` for 2-D float32 CPU tensors, by oneDNN."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return out


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for float32 CPU tensors of any leading shape, by oneDNN."""
    out = _mm(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T``, by oneDNN for float32 CPU tensors where this torch has it, else ``F.linear``."""
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() and available():
        return _linear(x, weight, None)
    return F.linear(x, weight)


class _Linear(torch.autograd.Function):
    """``x @ w.T + b`` with oneDNN forward and backward (the input's gradient by oneDNN too, a view of
    ``w`` serving as the transposed weight; the weight's gradient, needed only for trained factors, by
    ``torch.mm``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]) if weight.requires_grad else None, weight)
        ctx.shape = x.shape
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g2, weight.t()).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            gw = g2.t().mm(x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU calls go through oneDNN (module docstring); any other call is
    ``nn.Linear.forward``."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.numel() == 0:
            return F.linear(x, w, self.bias)
        b = self.bias
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            out: Tensor = _Linear.apply(x, w, b)
            return out
        return _linear(x, w, b)


def use_onednn(model: nn.Module, on: bool = True) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` to :class:`OneDNNLinear` in place (``on=False``: back);
    the number swapped (0 where this torch has no oneDNN)."""
    if on and not available():
        return 0
    old, new = (nn.Linear, OneDNNLinear) if on else (OneDNNLinear, nn.Linear)
    n = 0
    for mod in model.modules():
        if type(mod) is old:
            mod.__class__ = new
            n += 1
    return n


def uses_onednn(model: nn.Module) -> bool:
    """Whether any Linear of ``model`` is a :class:`OneDNNLinear`."""
    return any(isinstance(m, OneDNNLinear) for m in model.modules())
