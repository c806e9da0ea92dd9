"""The ``fedrank`` command line: run / compare / report / export / bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("fedrank")


def _bench(args: argparse.Namespace) -> int:
    if args.what == "aggregate":
        from fedrank import bench

        print(bench.run(quick=args.quick))
        return 0
    raise AssertionError(args.what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmarks printing ratios measured side by side in one run")
    b.add_argument("what", choices=["aggregate"], help="aggregate: FlexLoRA dense SVD vs svd_of_sum")
    b.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    b.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"fedrank: error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
