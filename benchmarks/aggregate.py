"""FlexLoRA's official dense SVD vs fedrank's svd_of_sum, side by side in one run.

python benchmarks/aggregate.py [--quick]      (same as: fedrank bench aggregate)
"""

import sys

from fedrank import bench

if __name__ == "__main__":
    print(bench.run(quick="--quick" in sys.argv[1:]))
