"""``fedrank bench aggregate``: FlexLoRA's official dense route vs :func:`fedrank.lowrank.svd_of_sum`.

The official FlexLoRA code forms ΔW = Σ_k p_k (α/r_k) B_k A_k densely and runs a full
``torch.linalg.svd``; fedrank never forms the m×n matrix when the stack is thin. Both are timed side by
side in one run, on the same inputs, and the dispatched rank-r_k reconstructions are compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from fedrank.lowrank import lora_scaling, svd_of_sum, truncate
from fedrank.ranks import assign_ranks

ALPHA = 16.0
SMOLLM2_LAYER_SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


Dispatch = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Timing:
    """Seconds of each route and the worst relative error of the dispatched reconstructions."""

    dense_s: float
    fast_s: float
    topk_s: float
    err_fast_vs_dense: float
    err_topk_vs_dense: float
    err_dense_vs_f64: float
    err_fast_vs_f64: float
    err_topk_vs_f64: float


def _clients(m: int, n: int, ranks: Sequence[int], g: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    # B and A scaled like trained LoRA factors (B small, A ~ U(±1/√n)); the values matter little.
    Bs = [torch.randn(m, r, generator=g) * 0.01 for r in ranks]
    As = [(torch.rand(r, n, generator=g) * 2 - 1) / n**0.5 for r in ranks]
    return Bs, As


def dense_flexlora(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float], ranks: Sequence[int]
) -> Dispatch:
    """The official route: form ΔW, full SVD, truncate per client (singular values into B, ×r/α)."""
    dW = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=Bs[0].dtype)
    for w, B, A in zip(weights, Bs, As, strict=True):
        dW += w * (B @ A)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return [truncate((U, S, Vh), r, ALPHA) for r in ranks]


def fast_flexlora(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float], ranks: Sequence[int], top: int | None = None
) -> Dispatch:
    U, S, Vh = svd_of_sum(Bs, As, weights, rank=top)
    return [truncate((U, S, Vh), r, ALPHA) for r in ranks]


def _timed_interleaved(fns: Sequence[Callable[[], Dispatch]], repeat: int) -> list[tuple[float, Dispatch]]:
    """Best-of-``repeat`` seconds of each route, the routes interleaved so that machine noise and allocator
    state hit them alike."""
    best = [float("inf")] * len(fns)
    outs: list[Dispatch] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return list(zip(best, outs, strict=True))


def _rel_err(a: Dispatch, b: Dispatch) -> float:
    worst = 0.0
    for (Ba, Aa), (Bb, Ab) in zip(a, b, strict=True):
        ra, rb = Ba.double() @ Aa.double(), Bb.double() @ Ab.double()
        den = float(torch.linalg.matrix_norm(rb))
        worst = max(worst, float(torch.linalg.matrix_norm(ra - rb)) / max(den, 1e-30))
    return worst


def compare_layers(shapes: Sequence[tuple[int, int]], ranks: Sequence[int], seed: int = 0, repeat: int = 1) -> Timing:
    """Time the routes over layers of ``shapes`` with one client per entry of ``ranks``.

    Routes: official dense SVD, ``svd_of_sum`` (all components), ``svd_of_sum(rank=max r_k)``. The
    float64 dense SVD is the reference all three are also checked against.
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(len(ranks), generator=g) + 0.5
    weights = [float(pk / p.sum()) * lora_scaling(ALPHA, r) for pk, r in zip(p, ranks, strict=True)]
    unique = sorted(set(ranks))
    sums = [0.0, 0.0, 0.0]
    errs = [0.0] * 5
    for m, n in shapes:
        Bs, As = _clients(m, n, ranks, g)
        runs = _timed_interleaved(
            [
                partial(dense_flexlora, Bs, As, weights, unique),
                partial(fast_flexlora, Bs, As, weights, unique),
                partial(fast_flexlora, Bs, As, weights, unique, max(unique)),
            ],
            repeat,
        )
        ref = dense_flexlora([B.double() for B in Bs], [A.double() for A in As], weights, unique)
        (_, d), (_, f), (_, k) = runs
        for i, (secs, _) in enumerate(runs):
            sums[i] += secs
        new = [_rel_err(f, d), _rel_err(k, d), _rel_err(d, ref), _rel_err(f, ref), _rel_err(k, ref)]
        errs = [max(a, b) for a, b in zip(errs, new, strict=True)]
    return Timing(sums[0], sums[1], sums[2], *errs)


def _report(label: str, t: Timing) -> str:
    return (
        f"{label}\n"
        f"    official dense SVD        {t.dense_s:8.3f}s{'':34}err vs f64 {t.err_dense_vs_f64:.1e}\n"
        f"    svd_of_sum                {t.fast_s:8.3f}s  speedup {t.dense_s / t.fast_s:6.1f}x  "
        f"err vs official {t.err_fast_vs_dense:.1e}  vs f64 {t.err_fast_vs_f64:.1e}\n"
        f"    svd_of_sum(rank=max r_k)  {t.topk_s:8.3f}s  speedup {t.dense_s / t.topk_s:6.1f}x  "
        f"err vs official {t.err_topk_vs_dense:.1e}  vs f64 {t.err_topk_vs_f64:.1e}"
    )


def time_training_step(rank: int = 8, batch: int = 4, seq_len: int = 256, steps: int = 3) -> float:
    """Seconds of one LoRA training step (forward, backward, AdamW) of a SmolLM2-135M-shaped model."""
    from fedrank.aggregation.base import init_state_factors
    from fedrank.models import LoraHost, smollm2_shaped_llama
    from fedrank.types import ClientAssignment

    host = LoraHost(smollm2_shaped_llama())
    host.load(ClientAssignment(0, rank, lora_scaling(ALPHA, rank), init_state_factors(host.shapes, rank, 0), 0))
    opt = torch.optim.AdamW(host.trainable_parameters(), lr=1e-4)
    ids = torch.randint(0, 49152, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    host.module.train()
    for _ in range(steps):
        t = time.perf_counter()
        loss = host.module(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - t)
    return best


def run(quick: bool = False) -> str:
    """Both benchmark cases; returns the report. ``quick`` shrinks them for a smoke run."""
    size = 1024 if quick else 4096
    compare_layers([(256, 256)], [4, 8, 16], seed=0)  # warm-up: first LAPACK calls pay one-off costs
    ranks_a = assign_ranks("uniform", [4, 8, 16, 32, 64], 20, seed=0)
    a = compare_layers([(size, size)], ranks_a, seed=0, repeat=3)
    ranks_b = assign_ranks("heavy_tail_weak", [4, 8, 16, 32], 80, seed=0)
    shapes = list(SMOLLM2_LAYER_SHAPES.values()) * (3 if quick else 30)
    b = compare_layers(shapes, ranks_b, seed=1)
    step = time_training_step()
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; rel err = max over dispatched ranks of "
        "||B_r A_r - ref||_F / ||ref||_F",
        _report(
            f"(a) one {size}x{size} layer, 20 clients, ranks uniform over {{4,8,16,32,64}} (sum r = {sum(ranks_a)})", a
        ),
        _report(
            f"(b) SmolLM2-135M shapes, {len(shapes)} LoRA layers, 80 clients heavy_tail_weak {{4,8,16,32}} "
            f"(sum r = {sum(ranks_b)})",
            b,
        ),
        f"    one local LoRA training step of the same model (rank 8, 4x256 = 1,024 tokens, AdamW): {step:.3f}s",
        f"    whole-round aggregation / one training step: svd_of_sum {b.fast_s / step:.2f}, "
        f"svd_of_sum(rank=max r_k) {b.topk_s / step:.2f}, official {b.dense_s / step:.2f}",
    ]
    return "\n".join(lines)
