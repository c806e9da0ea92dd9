"""FlexLoRA's official dense route (done well: one matmul + svd) vs fedrank's FlexLoRA round, side by side.

python benchmarks/aggregate.py [--quick] [--device cuda] [--no-training-step]   (also: fedrank bench aggregate)
"""

import argparse

from fedrank import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--device", default="cpu", help="where the factors live and every route runs (cpu, cuda)")
    parser.add_argument("--no-training-step", action="store_true", help="skip timing one local training step")
    args = parser.parse_args()
    print(bench.run(quick=args.quick, device=args.device, training_step=not args.no_training_step), flush=True)
