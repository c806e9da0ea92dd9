"""``fedrank bench aggregate``: FlexLoRA's official dense route, done well, vs fedrank's.

The official FlexLoRA code forms ΔW = Σ_k p_k (α/r_k) B_k A_k densely and runs a full
``torch.linalg.svd``. Done well, ΔW is ONE matmul of the weighted, stacked factors. fedrank keeps ΔW exactly
as those stacked factors and computes only the top max(r_k) SVD triplets, the layers of one shape in one
batched factorisation. Both whole rounds (aggregate, then dispatch to every client rank: clients of one rank
receive the same factors, so each route computes them once per rank, as the earlier benchmark did) are timed
side by side in one run, on the same inputs, and every dispatched product is compared with a float64
reference.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from fedrank.aggregation.base import normalized_weights
from fedrank.aggregation.flexlora import FlexLoRA
from fedrank.lowrank import lora_scaling, stack_factors, svd_of_sum, svdvals_of_sum, truncate
from fedrank.ranks import assign_ranks
from fedrank.types import ClientSpec, ClientUpdate, LoraFactors

T = TypeVar("T")

ALPHA = 16.0
SMOLLM2_LAYER_SHAPES = {  # (out m, in n) of the seven target modules of each of SmolLM2-135M's 30 layers
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
SMOLLM2_LAYERS = 30

Dispatch = dict[int, dict[str, LoraFactors]]
"""Per client rank, the factors every layer sends (clients of one rank receive the same)."""


@dataclass(frozen=True)
class Round:
    """A round's inputs: per layer the clients' factors, per client its rank and n_k."""

    shapes: dict[str, tuple[int, int]]
    updates: list[ClientUpdate]

    @property
    def ranks(self) -> list[int]:
        return [u.rank for u in self.updates]

    def distinct(self) -> list[ClientUpdate]:
        """The first client of each rank."""
        return list({u.rank: u for u in reversed(self.updates)}.values())

    def weights(self) -> list[float]:
        """p_k·s(r_k), the weight of B_k A_k in ΔW."""
        p = normalized_weights(self.updates)
        return [float(pk) * lora_scaling(ALPHA, u.rank) for pk, u in zip(p, self.updates, strict=True)]

    def stacked(self, name: str, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        Bs = [u.factors[name].B if dtype is None else u.factors[name].B.to(dtype) for u in self.updates]
        As = [u.factors[name].A if dtype is None else u.factors[name].A.to(dtype) for u in self.updates]
        return stack_factors(Bs, As, self.weights())


def make_round(shapes: dict[str, tuple[int, int]], ranks: Sequence[int], seed: int, device: torch.device) -> Round:
    """Random client factors, scaled like trained LoRA factors (B small, A ~ U(±1/√n)): a flat spectrum, the
    hard case for the accuracy of the top triplets."""
    g = torch.Generator().manual_seed(seed)
    n_k = (torch.randint(16, 256, (len(ranks),), generator=g)).tolist()
    factors: list[dict[str, LoraFactors]] = [{} for _ in ranks]
    for name, (m, n) in shapes.items():
        for k, r in enumerate(ranks):
            B = torch.randn(m, r, generator=g) * 0.01
            A = (torch.rand(r, n, generator=g) * 2 - 1) / n**0.5
            factors[k][name] = LoraFactors(B.to(device), A.to(device))
    ups = [ClientUpdate(k, r, n, f) for k, (r, n, f) in enumerate(zip(ranks, n_k, factors, strict=True))]
    return Round(dict(shapes), ups)


def dense_round(rnd: Round) -> Dispatch:
    """The official route done well: per layer ΔW = B_stacked @ A_stacked (one matmul), the full
    ``torch.linalg.svd``, and each client's rank-r_k truncation (singular values into B, ×r/α)."""
    out: dict[int, dict[str, LoraFactors]] = {u.client_id: {} for u in rnd.updates}
    for name in rnd.shapes:
        B, A = rnd.stacked(name)
        svd = torch.linalg.svd(B @ A, full_matrices=False)
        for u in rnd.distinct():
            out[u.client_id][name] = LoraFactors(*truncate(svd, u.rank, ALPHA))
    return _by_rank(rnd, out)


def every_component_round(rnd: Round) -> Dispatch:
    """:func:`svd_of_sum` with every component (the state that can be exported at any rank), then dispatch."""
    w = rnd.weights()
    out: dict[int, dict[str, LoraFactors]] = {u.client_id: {} for u in rnd.updates}
    for name in rnd.shapes:
        svd = svd_of_sum([u.factors[name].B for u in rnd.updates], [u.factors[name].A for u in rnd.updates], w)
        for u in rnd.distinct():
            out[u.client_id][name] = LoraFactors(*truncate(svd, u.rank, ALPHA))
    return _by_rank(rnd, out)


def flexlora_round(rnd: Round, method: FlexLoRA | None = None) -> Dispatch:
    """fedrank's FlexLoRA, default options: ``aggregate`` then ``dispatch`` to a client of every rank."""
    fx = method or FlexLoRA(alpha=ALPHA)
    state = fx.init_state(rnd.shapes, max(rnd.ranks))
    new = fx.aggregate(state, rnd.updates)
    out = {
        u.client_id: fx.dispatch(new, ClientSpec(u.client_id, u.rank, u.num_examples), 1).factors for u in rnd.updates
    }
    return _by_rank(rnd, out)


def _by_rank(rnd: Round, per_client: dict[int, dict[str, LoraFactors]]) -> Dispatch:
    return {u.rank: per_client[u.client_id] for u in rnd.distinct()}


def reference_f64(rnd: Round, via_qr: bool = False) -> dict[str, dict[int, Tensor]]:
    """Per layer and rank, the best rank-r approximation of ΔW in float64 (from the same factors): the dense
    float64 SVD, or (``via_qr``, for large layers) :func:`svd_of_sum` in float64, exact in exact arithmetic."""
    out: dict[str, dict[int, Tensor]] = {}
    for name in rnd.shapes:
        B, A = rnd.stacked(name, torch.float64)
        U, S, Vh = svd_of_sum([B], [A], [1.0]) if via_qr else torch.linalg.svd(B @ A, full_matrices=False)
        out[name] = {r: (U[:, :r] * S[:r]) @ Vh[:r] for r in set(rnd.ranks)}
    return out


def max_rel_err(got: Dispatch, ref: dict[str, dict[int, Tensor]]) -> float:
    """max over layers and dispatched ranks of ||s_r B_r A_r - ref_r||_F / ||ref_r||_F."""
    worst = 0.0
    for r, layers in got.items():
        s = lora_scaling(ALPHA, r)
        for name, f in layers.items():
            want = ref[name][r]
            diff = s * (f.B.double() @ f.A.double()) - want
            worst = max(
                worst, float(torch.linalg.matrix_norm(diff)) / max(float(torch.linalg.matrix_norm(want)), 1e-30)
            )
    return worst


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: Sequence[Callable[[], T]], repeat: int, device: torch.device) -> list[tuple[float, T]]:
    """Best-of-``repeat`` (>= 1) seconds of each route and its last result, the routes interleaved so that
    machine noise and allocator state hit them alike."""
    best = [float("inf")] * len(fns)
    outs: list[T] = []
    for rep in range(repeat):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            out = fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
            if rep == 0:
                outs.append(out)
            else:
                outs[i] = out
    return list(zip(best, outs, strict=True))


def hardware(device: torch.device) -> str:
    """What the timings ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"torch {torch.__version__}, CPU {cpu}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        text += f"; device {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return text


def _case(
    label: str, rnd: Round, routes: dict[str, Callable[[], Dispatch]], repeat: int, device: torch.device, via_qr: bool
) -> list[str]:
    runs = timed_interleaved(list(routes.values()), repeat, device)
    ref = reference_f64(rnd, via_qr)
    base = runs[0][0]
    lines = [label]
    for (name, _), (secs, out) in zip(routes.items(), runs, strict=True):
        ratio = "" if name == next(iter(routes)) else f"  speedup {base / secs:6.1f}x"
        lines.append(f"    {name:<40}{secs:8.3f}s{ratio:17}  max rel err vs f64 {max_rel_err(out, ref):.1e}")
    return lines


def spectrum_line(rnd: Round, device: torch.device) -> str:
    """The spectrum diagnostic's singular values of every layer's ΔW: from :func:`svd_of_sum` (vectors made
    and dropped) against :func:`svdvals_of_sum`, interleaved, best of 2, and their largest difference."""
    terms = [([u.factors[n].B for u in rnd.updates], [u.factors[n].A for u in rnd.updates]) for n in rnd.shapes]
    w = rnd.weights()

    def with_vectors() -> list[Tensor]:
        return [svd_of_sum(Bs, As, w)[1] for Bs, As in terms]

    def values_only() -> list[Tensor]:
        return [svdvals_of_sum(Bs, As, w) for Bs, As in terms]

    (t_vec, got_vec), (t_val, got_val) = timed_interleaved([with_vectors, values_only], 2, device)
    diff = max(float((a - b).abs().max() / b[0].clamp_min(1e-30)) for a, b in zip(got_vec, got_val, strict=True))
    return (
        f"    spectrum diagnostic, singular values of every layer: svd_of_sum {t_vec:.3f}s, svdvals_of_sum "
        f"{t_val:.3f}s  speedup {t_vec / t_val:.1f}x  max diff / sigma_1 {diff:.1e}"
    )


def time_training_step(rank: int = 8, batch: int = 4, seq_len: int = 256, steps: int = 3) -> float:
    """Seconds of one LoRA training step (forward, backward, AdamW) of a SmolLM2-135M-shaped model on the CPU."""
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


def run(quick: bool = False, device: str = "cpu", training_step: bool = True) -> str:
    """Both benchmark cases; returns the report. ``quick`` shrinks them for a smoke run; ``device`` (e.g.
    "cuda") is where the factors live and every route runs; ``training_step`` adds one local training step's
    seconds for scale."""
    dev = torch.device(device)
    size = 1024 if quick else 4096
    layers = 3 if quick else SMOLLM2_LAYERS
    warm = make_round({"w": (256, 192), "x": (192, 256)}, [4, 8, 16], 0, dev)  # first LAPACK/cuSOLVER calls
    for fn in (dense_round, every_component_round, flexlora_round):
        fn(warm)

    ranks_a = assign_ranks("uniform", [4, 8, 16, 32, 64], 20, seed=0)
    a = make_round({"w": (size, size)}, ranks_a, 0, dev)
    ranks_b = assign_ranks("heavy_tail_weak", [4, 8, 16, 32], 80, seed=2)
    shapes = {f"layers.{i}.{k}": s for i in range(layers) for k, s in SMOLLM2_LAYER_SHAPES.items()}
    b = make_round(shapes, ranks_b, 1, dev)
    lines = [
        hardware(dev),
        "whole round = aggregate + dispatch to every client rank; rel err = max over layers and dispatched ranks of "
        "||s_r B_r A_r - ref_r||_F / ||ref_r||_F, ref_r the best rank-r approximation in float64",
    ]
    lines += _case(
        f"(a) one {size}x{size} layer, 20 clients, ranks uniform over {{4,8,16,32,64}} (sum r = {sum(ranks_a)})",
        a,
        {
            "official dense, one matmul + svd": lambda: dense_round(a),
            "svd_of_sum, every component": lambda: every_component_round(a),
            "FlexLoRA round (default options)": lambda: flexlora_round(a),
        },
        1 if quick else 3,
        dev,
        via_qr=True,
    )
    lines += _case(
        f"(b) SmolLM2-135M shapes, {len(shapes)} LoRA matrices, 80 clients heavy_tail_weak {{4,8,16,32}} "
        f"(sum r = {sum(ranks_b)})",
        b,
        {
            "official dense, one matmul + svd": lambda: dense_round(b),
            "FlexLoRA round (default options)": lambda: flexlora_round(b),
        },
        1 if quick else 2,
        dev,
        via_qr=False,
    )
    lines.append(spectrum_line(b, dev))
    if training_step:
        step = time_training_step()
        lines.append(
            f"    one local LoRA training step of the same model on the CPU (rank 8, 4x256 tokens, AdamW): {step:.3f}s"
        )
    return "\n".join(lines)
