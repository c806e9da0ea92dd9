"""Tables and plots rebuilt from ``metrics.jsonl`` files, without rerunning anything."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is this a fedrank run directory?)")
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line, object_hook=_null_as_nan))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {i + 1} is not JSON ({e}); a line cut by a crash is repaired by --resume"
            ) from e
    return records


def _null_as_nan(d: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl is strict JSON: a non-finite metric (a diverged loss) is written as null and read back as NaN."""
    return {k: math.nan if v is None else v for k, v in d.items()}


def _evals(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == "eval"]


def run_summary(records: Sequence[dict[str, Any]], method: str) -> dict[str, Any]:
    """Before/after eval metrics, their change, communication and time, from one run's records."""
    evals = _evals(records)
    rounds = [r for r in records if r["type"] == "round"]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    before, after = first.get("unseen_avg", {}), last.get("unseen_avg", {})
    seen_before, seen_after = first.get("participants_avg", {}), last.get("participants_avg", {})
    return {
        "method": method,
        "rounds": len(rounds),
        "client_updates": sum(r["type"] == "client" for r in records),
        "skipped_rounds": sum(r["type"] == "round_skipped" for r in records),
        "clients_left_out": {
            kind: n
            for kind in ("client_failed", "client_rejected", "client_dropped", "client_skipped")
            if (n := sum(r["type"] == kind for r in records))
        },
        "eval_before_round": first.get("round"),
        "eval_after_round": last.get("round"),
        "unseen_before": before,
        "unseen_after": after,
        "unseen_change": {k: after[k] - before[k] for k in after if k in before},
        "participants_after": seen_after,
        "seen_before": seen_before,
        "seen_after": seen_after,
        "seen_change": {k: seen_after[k] - seen_before[k] for k in seen_after if k in seen_before},
        "unseen_tasks": sorted(last.get("unseen", {})),
        "seen_clients": {c: last.get("participant_tasks", {}).get(c, []) for c in last.get("participants", {})},
        "unseen_examples": int(sum(m.get("n", 0) for m in last.get("unseen", {}).values())),
        "seen_examples": int(sum(m.get("n", 0) for m in last.get("participants", {}).values())),
        "spectrum": rounds[-1].get("spectrum", {}) if rounds else {},
        "final_train_loss": rounds[-1]["train_loss"] if rounds else None,
        "up_bytes": sum(r["up_bytes"] for r in rounds),
        "down_bytes": sum(r["down_bytes"] for r in rounds),
    }


def write_plots(records: Sequence[dict[str, Any]], out: Path, ranks: Sequence[int] | None = None) -> list[Path]:
    """Eval metrics and train loss vs round, rank histogram, communication per round."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    evals = _evals(records)
    rounds = [r for r in records if r["type"] == "round"]
    keys = sorted({k for e in evals for g, _, _ in GROUPS for k in e.get(g, {}) if k != "perplexity"})
    if evals and keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
        for ax, k in zip(axes[0], keys, strict=True):
            for (group, label, style), color in zip(GROUPS, ("C0", "C1"), strict=True):
                pts = [(e["round"], e[group][k]) for e in evals if k in e.get(group, {})]
                if not pts:
                    continue
                ax.plot(*zip(*pts, strict=True), style, color=color, label=label)
                if pts[0][0] == 0:  # the zero-shot base model as a reference line
                    ax.axhline(pts[0][1], color=color, linestyle=":", linewidth=1)
            ax.set(title=f"{k} (dotted: base model)", xlabel="round", ylabel=k)
            ax.legend(fontsize=8)
        paths.append(_save(fig, out / "eval.png"))
    spectra = [(r["round"], r["spectrum"]) for r in rounds if r.get("spectrum", {}).get("effective_rank") is not None]
    if spectra:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = [x for x, _ in spectra]
        r_min, r_max = spectra[-1][1]["r_min"], spectra[-1][1]["r_max"]
        ax.plot(xs, [sp["energy_top_rmin"] for _, sp in spectra], "o-", label=f"top r_min = {r_min}")
        ax.plot(xs, [sp["energy_top_rmax"] for _, sp in spectra], "s--", label=f"top r_max = {r_max}")
        ax.set(title="global ΔW energy in its top directions", xlabel="round", ylabel="share of Σσ²", ylim=(0, 1.02))
        ax.legend(fontsize=8)
        ax2.plot(xs, [sp["effective_rank"] for _, sp in spectra], "o-")
        ax2.set(title="global ΔW effective rank (layer mean)", xlabel="round", ylabel="exp(entropy of σ/Σσ)")
        paths.append(_save(fig, out / "spectrum.png"))
    if rounds:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["round"] for r in rounds], [r["train_loss"] for r in rounds], marker="o")
        ax.set(title="train loss (n-weighted mean over clients)", xlabel="round")
        paths.append(_save(fig, out / "train_loss.png"))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [r["round"] for r in rounds]
        ax.bar([x - 0.2 for x in xs], [r["up_bytes"] / 2**20 for r in rounds], width=0.4, label="up")
        ax.bar([x + 0.2 for x in xs], [r["down_bytes"] / 2**20 for r in rounds], width=0.4, label="down")
        ax.set(title="communication per round", xlabel="round", ylabel="MiB")
        ax.legend()
        paths.append(_save(fig, out / "communication.png"))
    client_ranks = ranks or [r["rank"] for r in records if r["type"] == "client"]
    if client_ranks:
        counts = Counter(client_ranks)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        keys = sorted(counts)
        ax.bar(range(len(keys)), [counts[k] for k in keys], tick_label=[str(k) for k in keys])
        ax.set(title="clients per LoRA rank", xlabel="rank", ylabel="clients")
        paths.append(_save(fig, out / "ranks.png"))
    return paths


GROUPS = (
    ("unseen_avg", "unseen (held-out families)", "o-"),
    ("participants_avg", "seen (participants' own test splits)", "s--"),
)
"""Evaluation groups in eval records: key, label, line style."""


def end_of_run_table(summary: dict[str, Any]) -> str:
    """An aligned before -> after table of the evaluated groups (macro averages over tasks / clients)."""
    rows = [("group", "metric", "before", "after", "change", "n")]
    groups = (
        (f"unseen ({len(summary.get('unseen_tasks', []))} tasks)", "unseen", summary.get("unseen_examples", 0)),
        (f"seen ({len(summary.get('seen_clients', {}))} clients)", "seen", summary.get("seen_examples", 0)),
    )
    one_eval = summary.get("eval_before_round") == summary.get("eval_after_round")
    for label, key, n in groups:
        before, after = ({} if one_eval else summary.get(f"{key}_before", {})), summary.get(f"{key}_after", {})
        for i, metric in enumerate(m for m in ("loss", "accuracy", "rougeL") if m in after):
            b = before.get(metric)
            rows.append(
                (
                    label if i == 0 else "",
                    metric,
                    "–" if b is None else f"{b:.4f}",
                    f"{after[metric]:.4f}",
                    "–" if b is None else f"{after[metric] - b:+.4f}",
                    str(n) if i == 0 else "",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    b_round, a_round = summary.get("eval_before_round"), summary.get("eval_after_round")
    lines.append(f"(before = round {b_round}, the zero-shot base model when 0; after = round {a_round}; loss is the")
    lines.append(" answer loss, lower is better; macro averages over the tasks / clients)")
    left = summary.get("clients_left_out", {})
    if summary.get("skipped_rounds") or left:
        parts = [f"{n} {kind.replace('client_', '')}" for kind, n in left.items()]
        lines.append(
            f"{summary.get('skipped_rounds', 0)} round(s) skipped; client updates left out: "
            + (", ".join(parts) or "none")
            + " (reasons in metrics.jsonl)"
        )
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def comparison(runs: dict[str, list[Path]], out: Path) -> tuple[Path, Path]:
    """``comparison.md`` / ``comparison.csv`` (mean ± std over seeds) and a plot, from run directories."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[int, list[float]]] = {}
    metric_keys: set[str] = set()
    for method, dirs in runs.items():
        summaries = [run_summary(read_metrics(d / "metrics.jsonl"), method) for d in dirs]
        values: dict[str, list[float]] = {}
        for s in summaries:
            for k, v in s["unseen_after"].items():
                values.setdefault(f"after/{k}", []).append(v)
            for k, v in s["unseen_change"].items():
                values.setdefault(f"change/{k}", []).append(v)
            values.setdefault("up_MiB", []).append(s["up_bytes"] / 2**20)
            values.setdefault("down_MiB", []).append(s["down_bytes"] / 2**20)
        metric_keys |= set(values)
        rows.append({"method": method, "seeds": len(dirs), **{k: _mean_std(v) for k, v in values.items()}})
        for d in dirs:
            for e in _evals(read_metrics(d / "metrics.jsonl")):
                main = _main_metric(e["unseen_avg"])
                if main is not None:
                    curves.setdefault(method, {}).setdefault(e["round"], []).append(e["unseen_avg"][main])
    keys = sorted(metric_keys)
    csv_path = out / "comparison.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds"] + [c for k in keys for c in (f"{k} mean", f"{k} std")])
        for r in rows:
            w.writerow([r["method"], r["seeds"]] + [x for k in keys for x in r.get(k, (float("nan"),) * 2)])
    md = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k][0]:.4f} ± {r[k][1]:.4f}" if k in r else "–" for k in keys]
        md.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(cells) + " |")
    md_path = out / "comparison.md"
    md_path.write_text("\n".join(md) + "\n")
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, pts in curves.items():
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=method)
        ax.set(title="unseen tasks (mean over seeds)", xlabel="round")
        ax.legend()
        _save(fig, out / "comparison.png")
    return md_path, csv_path


def _main_metric(avg: dict[str, float]) -> str | None:
    for k in ("rougeL", "accuracy", "loss"):
        if k in avg:
            return k
    return None
