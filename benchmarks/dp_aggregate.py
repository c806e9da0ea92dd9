"""What differential privacy costs FlexLoRA's server: one round (aggregate + dispatch to every client rank)
without noise and with the dense N(0, σ²C²) noise on ΔW (fedrank.privacy), on SmolLM2-135M's 210 LoRA layers,
in one run. The noise makes every layer's ΔW full rank, so the factorisation works on rank Σ r_k + min(m, n)
instead of Σ r_k: the never-form-m×n path no longer saves anything.

    python benchmarks/dp_aggregate.py [--clients 8] [--layers 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedrank.aggregation import make_method
from fedrank.aggregation.base import derive_generator
from fedrank.bench import SMOLLM2_LAYER_SHAPES
from fedrank.privacy import clip_product, dense_noise
from fedrank.types import ClientSpec, ClientUpdate, LoraFactors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--layers", type=int, default=30, help="transformer blocks (SmolLM2-135M: 30)")
    args = ap.parse_args()
    shapes = {f"{i}.{k}": s for i in range(args.layers) for k, s in SMOLLM2_LAYER_SHAPES.items()}
    ranks = [(4, 8, 16, 32)[k % 4] for k in range(args.clients)]
    m = make_method("flexlora", alpha=16.0, seed=0)
    state = m.init_state(shapes, max(ranks))
    g = derive_generator(1)
    updates = []
    for k, r in enumerate(ranks):
        a = m.dispatch(state, ClientSpec(k, r, 1), 0)
        factors = {n: LoraFactors(f.B + 0.01 * torch.randn(f.B.shape, generator=g), f.A) for n, f in a.factors.items()}
        updates.append(clip_product(ClientUpdate(k, r, 1, factors), m.scaling(r), 1.0).update)
    ones = [1.0] * len(updates)

    def one_round(noise: dict[str, torch.Tensor] | None) -> float:
        t0 = time.perf_counter()
        new = m.aggregate(state, updates, ones, noise=noise)
        for r in sorted(set(ranks)):
            m.dispatch(new, ClientSpec(-1, r, 1), 1)
        return time.perf_counter() - t0

    one_round(None)  # warm-up
    plain = min(one_round(None) for _ in range(2))
    t0 = time.perf_counter()
    noise = dense_noise(shapes, 1.0, derive_generator(2))
    draw = time.perf_counter() - t0
    noisy = min(one_round(noise) for _ in range(2))
    print(
        f"{torch.get_num_threads()} threads; {len(shapes)} layers of SmolLM2-135M's shapes, {args.clients} clients of "
        f"ranks {sorted(set(ranks))} (Σ r_k = {sum(ranks)})"
    )
    print(f"  round without noise            {plain:7.2f} s")
    print(f"  round with dense noise on ΔW   {noisy:7.2f} s   {noisy / plain:5.1f}x   (+ {draw:.2f} s to draw it)")


if __name__ == "__main__":
    main()
