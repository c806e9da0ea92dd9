"""Utility against ε for FedIT, FFA-LoRA, FlexLoRA and FSLoRA under client-level DP (fedrank.privacy), on the
quickstart's setting (configs/privacy_quickstart.toml), over paired seeds. Resumable: rerun it to continue.

    python scripts/privacy_experiment.py [--seeds 1,2,3] [--epsilons inf,8,2] [--out runs/privacy]
                                         [--results docs/results/privacy]

1. ε = ∞: every method with privacy on but C = ∞ and σ = 0 (the same Poisson sampler and uniform weights as
   the private runs; nothing clipped, no noise), which records each round's median update norm.
2. C per method: the median of those norms over the non-private runs' rounds (the "median norm" rule of
   thumb of Andrew et al., 2021), since the methods clip different things (FedIT, FFA-LoRA, FSLoRA: the
   uploaded factor deltas; FlexLoRA: its whole update ΔW_k) whose scales differ.
3. ε = 8, 2: each method at its C, σ calibrated so that the run's rounds stay within ε at δ = 1/N^1.1.

Every method runs with its presets (fedrank compare's) and the config's learning rate, untuned under DP;
FFA-LoRA at the pool's smallest rank for every client, as FedIT (the setting of FFA-LoRA's claim), which also
lets its ε count the sampling's amplification. C comes from the same data's non-private runs, a choice not
accounted for in ε (as usual in DP-FedAvg studies; adaptive clipping would account it).
Writes results.md/csv (mean and 95% interval per method and ε; FFA-LoRA − FedIT paired per ε) under --results.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from fedrank.config import load_config, override
from fedrank.simulation import with_method
from fedrank.study import mean_interval, paired_interval, run_or_resume

METHODS = ("fedit", "ffa", "flexlora", "fslora")
METRICS = (("unseen", "loss"), ("seen", "loss"), ("unseen", "rougeL"), ("seen", "rougeL"))


def eps_name(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


def median_norm(runs: list[Path]) -> float:
    norms = []
    for run in runs:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "round" and isinstance(rec.get("dp_median_norm"), float):
                norms.append(rec["dp_median_norm"])
    return float(statistics.median(norms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/privacy_quickstart.toml")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epsilons", default="inf,8,2")
    ap.add_argument("--methods", default=",".join(METHODS), help="the methods to run (the results show every run kept)")
    ap.add_argument("--out", type=Path, default=Path("runs/privacy"))
    ap.add_argument("--results", type=Path, default=Path("docs/results/privacy"))
    args = ap.parse_args()
    base = load_config(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    methods = [m for m in METHODS if m in args.methods.split(",")]
    runs: dict[tuple[str, float, int], Path] = {}
    clips: dict[str, float] = {}
    for eps in sorted(epsilons, key=lambda e: -e):  # ∞ first: the clips come from it
        for m in METHODS:
            values: dict[str, Any] = {"privacy.clip": math.inf, "privacy.epsilon": 0.0}
            if not math.isinf(eps):
                if m not in clips:
                    if any((m, math.inf, s) not in runs for s in seeds):
                        continue  # its clip comes from its non-private runs
                    clips[m] = median_norm([runs[(m, math.inf, s)] for s in seeds])
                values = {"privacy.clip": clips[m], "privacy.epsilon": eps}
            for s in seeds:
                out = args.out / f"eps-{eps_name(eps)}" / m / f"seed{s}"
                cfg = with_method(base, m, s, resample_data=True)
                if m == "ffa":  # one rank, as FedIT runs and as FFA-LoRA's paper compares them
                    values = {**values, "ranks.distribution": "fixed"}
                cfg = override(cfg, values)
                if m not in methods and not (out / "summary.json").is_file():
                    continue  # not asked for, and not run before
                status = run_or_resume(cfg, out, progress=False)
                print(f"ε {eps_name(eps):>3} {m:<9} seed {s}: {status} ({out})", flush=True)
                runs[(m, eps, s)] = out
    command = "python scripts/privacy_experiment.py " + " ".join(
        f"--{k} {v}" for k, v in (("seeds", args.seeds), ("epsilons", args.epsilons), ("methods", args.methods))
    )
    write_results(runs, clips, seeds, epsilons, args.results, command)


def write_results(
    runs: dict[tuple[str, float, int], Path],
    clips: dict[str, float],
    seeds: list[int],
    epsilons: list[float],
    to: Path,
    command: str,
) -> None:
    to.mkdir(parents=True, exist_ok=True)
    value: dict[tuple[str, float, str, str], dict[int, float]] = {}
    sigma: dict[tuple[str, float], float] = {}
    for (m, eps, s), run in runs.items():
        doc = summary(run)
        sigma[(m, eps)] = float(doc.get("privacy", {}).get("noise_multiplier") or 0.0)
        for group, metric in METRICS:
            value.setdefault((m, eps, group, metric), {})[s] = float(
                doc.get(f"{group}_after", {}).get(metric, math.nan)
            )
    rows = []
    missing = [f"{m} at ε {eps_name(e)}" for m in METHODS for e in epsilons if (m, e) not in sigma]
    for m in METHODS:
        for eps in epsilons:
            if (m, eps) not in sigma:
                continue
            clip = math.inf if math.isinf(eps) else clips.get(m, math.inf)  # the ε = ∞ runs clip nothing
            row: dict[str, Any] = {"method": m, "epsilon": eps_name(eps), "clip": clip}
            row["noise_multiplier"] = sigma.get((m, eps), 0.0)
            for group, metric in METRICS:
                mean, lo, hi = mean_interval(list(value[(m, eps, group, metric)].values()))
                row[f"{group}_{metric}"], row[f"{group}_{metric}_lo"], row[f"{group}_{metric}_hi"] = mean, lo, hi
            rows.append(row)
    with (to / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Privacy experiment: utility against ε",
        "",
        f"`{command}`; mean [95% interval] over {len(seeds)} paired seeds"
        + (f"; not run: {', '.join(missing)}." if missing else "."),
        "",
        "| method | ε | C | σ | " + " | ".join(f"{g} {m}" for g, m in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for r in rows:
        cells = [f"{r[f'{g}_{m}']:.4f} [{r[f'{g}_{m}_lo']:.4f}, {r[f'{g}_{m}_hi']:.4f}]" for g, m in METRICS]
        lines.append(
            f"| {r['method']} | {r['epsilon']} | {r['clip']:.4g} | {r['noise_multiplier']:.3g} | "
            + " | ".join(cells)
            + " |"
        )
    base = []
    for group, metric in METRICS:  # the zero-shot model: round 0 of the ε = ∞ FedIT runs (each seed's own data)
        xs = [
            float(summary(runs[("fedit", max(epsilons), s)]).get(f"{group}_before", {}).get(metric, math.nan))
            for s in seeds
        ]
        mean, lo, hi = mean_interval(xs)
        base.append(f"{group} {metric} {mean:.4f} [{lo:.4f}, {hi:.4f}]")
    lines += ["", "The zero-shot base model (round 0): " + "; ".join(base) + "."]
    lines += ["", "FFA-LoRA − FedIT, paired by seed (negative loss: FFA-LoRA better):", ""]
    for eps in epsilons:
        for g, metric in METRICS:
            if ("ffa", eps, g, metric) not in value or ("fedit", eps, g, metric) not in value:
                continue
            d, lo, hi, n = paired_interval(value[("ffa", eps, g, metric)], value[("fedit", eps, g, metric)])
            lines.append(f"- ε {eps_name(eps)}, {g} {metric}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}] ({n} seeds)")
    (to / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {to / 'results.md'}")


if __name__ == "__main__":
    main()
