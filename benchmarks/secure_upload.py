"""What secure aggregation costs each client's upload, per method and client rank, on SmolLM2-135M's 210 LoRA
layers (shapes only, nothing trained): the plain upload (fp32 factors as each method sends them) against
SecAgg+'s (every client sends the same shapes: its changes zero-padded to the global rank R, plus R holder
flags, as int64, 8 bytes a value; fedrank.secure). FlexLoRA and raFLoRA would need each client's dense
ΔW_k = s·B_k A_k (m·n values a layer), shown for comparison; fedrank refuses them under secure aggregation.

    python benchmarks/secure_upload.py [--rank 32]
"""

from __future__ import annotations

import argparse

from fedrank.aggregation import METHODS, make_method
from fedrank.bench import SMOLLM2_LAYER_SHAPES
from fedrank.secure import WIRE_BYTES, contribution_numel, secure_mean_of
from fedrank.types import ClientSpec, ClientUpdate

FP32 = 4


def mib(b: float) -> str:
    return f"{b / 2**20:8.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32, help="the global rank R (the largest client rank)")
    ap.add_argument("--layers", type=int, default=30, help="transformer blocks (SmolLM2-135M: 30)")
    args = ap.parse_args()
    R = args.rank
    shapes = {f"{i}.{k}": s for i in range(args.layers) for k, s in SMOLLM2_LAYER_SHAPES.items()}
    ranks = [r for r in (4, 8, 16, 32) if r <= R]
    print(f"{len(shapes)} layers of SmolLM2-135M's shapes, global rank R = {R}; upload per client per round")
    print(f"{'method':12} {'rank':>4} {'plain (fp32)':>14} {'SecAgg+ (int64)':>16} {'ratio':>6}")
    for name in sorted(METHODS):
        kw = {"rank": R} if name == "fslora" else {}
        method = make_method(name, **kw)
        if secure_mean_of(method) is None:
            continue
        state = method.init_state(shapes, R)
        for r in [R] if name == "fedit" else ranks:
            a = method.dispatch(state, ClientSpec(0, r, 1), 0)
            u = ClientUpdate(0, a.rank, 1, a.factors, a.indices, a.train_A, a.train_B)
            plain = method.upload_params(u) * FP32
            secure = contribution_numel(shapes, R, a.train_A, a.train_B) * WIRE_BYTES
            print(f"{name:12} {r:>4} {mib(plain):>14} {mib(secure):>16} {secure / plain:5.1f}x")
    dense = sum(m * n for m, n in shapes.values())
    for r in ranks:
        factors = sum(r * (m + n) for m, n in shapes.values()) * FP32
        up = dense * WIRE_BYTES
        print(f"{'flexlora':12} {r:>4} {mib(factors):>14} {mib(up):>16} {up / factors:5.1f}x  (dense ΔW_k: refused)")


if __name__ == "__main__":
    main()
