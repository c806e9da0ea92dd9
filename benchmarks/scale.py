"""Server memory vs registered clients: peak RSS of the same run with 16, 160 and 1,613 registered clients.

    python benchmarks/scale.py [--rounds 3] [--per-round 16]

Each size runs in its own process (tiny random Llama, synthetic tasks, Dirichlet partition, FlexLoRA,
the same clients per round), so ru_maxrss is that run's peak. Prints RSS and client updates per hour.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = """
seed = 0
[model]
name = "tiny"
[data]
source = "synthetic"
synthetic_tasks = 24
synthetic_examples = 2000
[partition]
kind = "dirichlet"
num_clients = {clients}
num_eval_tasks = 2
dirichlet_alpha = 0.5
max_eval_examples = 16
[ranks]
distribution = "heavy_tail_weak"
choices = [4, 8, 16, 32]
[method]
name = "flexlora"
[federation]
rounds = {rounds}
clients_per_round = {per_round}
[train]
steps = 2
batch_size = 4
max_seq_len = 64
[eval]
before = false
participants = 0
[eval.settings]
generate = false
[output]
plots = false
"""

CHILD = """
import resource, sys, time, json
from pathlib import Path
from fedrank.config import load_config
from fedrank.simulation import Simulation
cfg = load_config(sys.argv[1])
t = time.perf_counter()
res = Simulation(cfg, Path(sys.argv[2]), progress=False).run()
secs = time.perf_counter() - t
print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "updates": res.summary["client_updates"], "seconds": secs}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=16)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (16, 160, 1613):
            cfg = Path(tmp) / f"c{clients}.toml"
            cfg.write_text(CONFIG.format(clients=clients, rounds=args.rounds, per_round=args.per_round))
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(cfg), str(Path(tmp) / f"run{clients}")],
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append((clients, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["rss_mib"]
    print(f"{args.per_round} clients per round, {args.rounds} rounds, tiny Llama, FlexLoRA")
    for clients, r in rows:
        print(
            f"registered {clients:5d}: peak RSS {r['rss_mib']:7.1f} MiB (x{r['rss_mib'] / base:.3f} of 16)  "
            f"{r['updates'] / r['seconds'] * 3600:9.0f} client updates/hour"
        )


if __name__ == "__main__":
    main()
