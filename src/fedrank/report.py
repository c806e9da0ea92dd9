"""Tables and plots rebuilt from ``metrics.jsonl`` files, without rerunning anything."""

from __future__ import annotations

import csv
import json
import math
import resource
import sys
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
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
        "eval_before_reused": bool(first.get("reused")),
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


GROUPS = (
    ("unseen_avg", "unseen", "held-out task families no client trains on"),
    ("participants_avg", "seen", "the evaluated participants' own test splits"),
)
"""Evaluation groups in eval records: key, split name, what it is."""

METRICS = ("loss", "accuracy", "rougeL", "match")
"""Metric order in tables and plots; perplexity (exp of the loss) is left out. ``match``: the share of generated
answers that pass their task's own rule (OpenAI evals' Match / Includes / FuzzyMatch)."""

STYLES = (("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":"))
"""(marker, line style) per line, cycled with the colours C0..C9, so that lines stay apart in print too."""

BASE_STYLE: dict[str, Any] = {"color": "0.3", "linestyle": (0, (1, 1.5)), "linewidth": 1.3}

Curve = dict[int, list[float]]
"""round -> one value per run (seed)."""
Curves = dict[tuple[str, str], Curve]
"""(eval group key, metric) -> curve."""


def ordered_metrics(metrics: set[str]) -> list[str]:
    return [m for m in METRICS if m in metrics] + sorted(metrics - set(METRICS) - {"perplexity"})


def _better(metric: str) -> str:
    return "lower is better" if metric == "loss" else "higher is better"


def eval_curves(runs: Sequence[Sequence[dict[str, Any]]]) -> Curves:
    """Macro-averaged eval metrics per (group, metric) and round, one value per run."""
    out: Curves = {}
    for records in runs:
        for e in _evals(records):
            for group, _, _ in GROUPS:
                for metric, v in e.get(group, {}).items():
                    if metric != "perplexity":
                        out.setdefault((group, metric), {}).setdefault(e["round"], []).append(v)
    return out


def round_curve(runs: Sequence[Sequence[dict[str, Any]]], key: str) -> Curve:
    """``key`` of the round records per round, one value per run."""
    out: Curve = {}
    for records in runs:
        for r in records:
            if r["type"] == "round":
                out.setdefault(r["round"], []).append(r[key])
    return out


def _line(ax: Any, curve: Curve, label: str, k: int) -> None:
    """Line ``k`` of a plot: the mean over runs with markers, and a ± std band when there are several runs."""
    xs = sorted(curve)
    stats = [mean_std(curve[x]) for x in xs]
    mean = [m for m, _ in stats]
    n = max(len(curve[x]) for x in xs)
    marker, linestyle = STYLES[k % len(STYLES)]
    color = f"C{k % 10}"
    name = label if n == 1 else f"{label} (mean ± std, {n} seeds)"
    ax.plot(xs, mean, marker=marker, linestyle=linestyle, color=color, label=name, markersize=5)
    if n > 1:
        lo = [m - s for m, s in stats]
        hi = [m + s for m, s in stats]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


def eval_figure(curves: dict[str, Curves]) -> Figure | None:
    """One row of panels per split (unseen, seen), one panel per metric that split has, one line per label
    (method) with its spread over seeds, and the base model (round 0, the mean over every run) as a dotted
    reference line."""
    panels = {p for c in curves.values() for p in c}
    rows = [
        (key, split, ordered_metrics({m for g, m in panels if g == key}))
        for key, split, _ in GROUPS
        if any(g == key for g, _ in panels)
    ]
    rows = [r for r in rows if r[2]]
    if not rows:
        return None
    ncols = max(len(metrics) for _, _, metrics in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4.3 * ncols, 3.4 * len(rows)), squeeze=False)
    for row, (key, split, metrics) in zip(axes, rows, strict=True):
        for ax in row[len(metrics) :]:
            ax.set_axis_off()
        for ax, metric in zip(row, metrics, strict=False):
            base: list[float] = []
            for k, (label, c) in enumerate(curves.items()):
                if (key, metric) in c:
                    _line(ax, c[(key, metric)], label, k)
                    base += c[(key, metric)].get(0, [])
            if base:
                ax.axhline(sum(base) / len(base), **BASE_STYLE, label="base model (round 0)")
            ax.set(title=f"{split}: {metric} ({_better(metric)})", xlabel="round", ylabel=f"{split} {metric}")
            ax.legend(fontsize=7)
    return fig


def train_loss_figure(curves: dict[str, Curve]) -> Figure | None:
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for k, (label, c) in enumerate(curves.items()):
        if c:
            _line(ax, c, label, k)
    ax.set(title="train loss (n-weighted over clients)", xlabel="round", ylabel="train loss")
    ax.legend(fontsize=7)
    return fig


def figures(
    records: Sequence[dict[str, Any]], ranks: Sequence[int] | None = None, label: str = "global model"
) -> dict[str, Figure]:
    """One run's figures by name: eval metrics per split vs round, train loss, the ΔW spectrum, communication
    and seconds per round, clients per rank (``ranks``: every registered client's; default: those that
    trained). The caller saves them and closes them (:func:`close`)."""
    figs: dict[str, Figure | None] = {"eval": eval_figure({label: eval_curves([records])})}
    rounds = [r for r in records if r["type"] == "round"]
    figs["train_loss"] = train_loss_figure({label: round_curve([records], "train_loss")})
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
        figs["spectrum"] = fig
    if rounds:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        xs = [r["round"] for r in rounds]
        ax.bar([x - 0.2 for x in xs], [r["up_bytes"] / 2**20 for r in rounds], width=0.4, label="up (clients → server)")
        ax.bar(
            [x + 0.2 for x in xs],
            [r["down_bytes"] / 2**20 for r in rounds],
            width=0.4,
            hatch="//",
            label="down (server → clients)",
        )
        ax.set(title="communication per round", xlabel="round", ylabel="MiB per round")
        ax.legend(fontsize=8)
        figs["communication"] = fig
    figs["time"] = _time_figure(records)
    counts = rank_counts(ranks) if ranks else rank_counts(list(_trained_ranks(records).values()))
    if counts:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        bars = ax.bar(range(len(counts)), list(counts.values()), tick_label=list(counts))
        ax.bar_label(bars, fontsize=8)
        who = "registered clients" if ranks else "clients that trained"
        ax.set(title=f"{who} per LoRA rank", xlabel="LoRA rank", ylabel="clients")
        figs["ranks"] = fig
    return {k: f for k, f in figs.items() if f is not None}


def _time_figure(records: Sequence[dict[str, Any]]) -> Figure | None:
    parts = round_seconds(records)
    if not parts:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    xs = sorted(parts)
    bottom = [0.0] * len(xs)
    for k, name in enumerate(("client training", "aggregation", "other", "evaluation")):
        ys = [parts[x].get(name, 0.0) for x in xs]
        ax.bar(xs, ys, bottom=bottom, label=name, color=f"C{k}", hatch=("", "//", "..", "xx")[k])
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set(title="seconds per round", xlabel="round", ylabel="seconds")
    ax.legend(fontsize=7)
    return fig


def round_seconds(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per round: client training (sum over clients), aggregation, other (validation, the spectrum
    diagnostic, FedSA-style local state), evaluation."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if r["type"] == "client":
            parts = out.setdefault(r["round"], {})
            parts["client training"] = parts.get("client training", 0.0) + r["seconds"]
        elif r["type"] == "round":
            out.setdefault(r["round"], {}).update(aggregation=r["aggregate_seconds"], round=r["seconds"])
        elif r["type"] == "eval":
            out.setdefault(r["round"], {})["evaluation"] = r["seconds"]
    for parts in out.values():
        if "round" in parts:
            parts["other"] = max(0.0, parts.pop("round") - parts.get("client training", 0.0) - parts["aggregation"])
    return out


def time_split(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, float]]:
    """The run's wall time by part: (part, seconds), the last row the total. Model load and the total are
    those of the last process (a resumed run's earlier processes are not in them)."""
    per_round = round_seconds(records).values()
    rows = [("model load", float(summary["load_seconds"]))] if "load_seconds" in summary else []
    for name in ("client training", "aggregation", "evaluation"):
        rows.append((name, sum(p.get(name, 0.0) for p in per_round)))
    if "seconds" in summary:
        counted = sum(s for name, s in rows if name != "model load")
        rows.append(("other: validation, spectrum, checkpoints, export", max(0.0, summary["seconds"] - counted)))
    rows.append(("total", sum(s for _, s in rows)))
    return rows


def time_split_summary(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    """:func:`time_split` as summary.json's ``time_split``: seconds by part (load, train, aggregate,
    evaluate, other) and the total."""
    keys = {
        "model load": "load",
        "client training": "train",
        "aggregation": "aggregate",
        "evaluation": "evaluate",
        "total": "total",
    }
    return {keys.get(name, "other"): round(sec, 3) for name, sec in time_split(records, summary)}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _trained_ranks(records: Sequence[dict[str, Any]]) -> dict[int, int]:
    return {r["client"]: r["rank"] for r in records if r["type"] == "client"}


def rank_counts(ranks: Sequence[int]) -> dict[str, int]:
    """Clients per rank, ascending (JSON-ready keys)."""
    counts = Counter(ranks)
    return {str(k): counts[k] for k in sorted(counts)}


def save_figures(figs: dict[str, Figure], out: Path) -> list[Path]:
    """Each figure as ``out/NAME.png`` (left open: see :func:`close`)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        tidy(fig)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def close(figs: dict[str, Figure]) -> None:
    for fig in figs.values():
        plt.close(fig)


def write_plots(records: Sequence[dict[str, Any]], out: Path, ranks: Sequence[int] | None = None) -> list[Path]:
    """:func:`figures` as PNG files in ``out``."""
    figs = figures(records, ranks)
    try:
        return save_figures(figs, out)
    finally:
        close(figs)


SHARES = ("accuracy", "match")
"""Metrics that are a share of answers (0..1): the end-of-run table gives their sampling noise."""


def share_noise(before: float, after: float, n: int) -> float:
    """Two standard errors of ``after - before`` for shares of ``n`` answers each, as if drawn independently:
    2·sqrt((b(1-b) + a(1-a)) / n). The evaluation reuses the same examples, so the true noise is smaller."""
    clip = [min(max(v, 0.0), 1.0) for v in (before, after)]
    return 2.0 * math.sqrt(sum(v * (1.0 - v) for v in clip) / max(n, 1))


def end_of_run_table(summary: dict[str, Any]) -> str:
    """An aligned before -> after table of the evaluated groups (macro averages over tasks / clients)."""
    rows = [("group", "metric", "before", "after", "change", "noise", "n")]
    groups = (
        (f"unseen ({len(summary.get('unseen_tasks', []))} tasks)", "unseen", summary.get("unseen_examples", 0)),
        (f"seen ({len(summary.get('seen_clients', {}))} clients)", "seen", summary.get("seen_examples", 0)),
    )
    one_eval = summary.get("eval_before_round") == summary.get("eval_after_round")
    for label, key, n in groups:
        before, after = ({} if one_eval else summary.get(f"{key}_before", {})), summary.get(f"{key}_after", {})
        for i, metric in enumerate(m for m in METRICS if m in after):
            b = before.get(metric)
            rows.append(
                (
                    label if i == 0 else "",
                    metric,
                    "–" if b is None else f"{b:.4f}",
                    f"{after[metric]:.4f}",
                    "–" if b is None else f"{after[metric] - b:+.4f}",
                    "" if b is None or metric not in SHARES else f"±{share_noise(b, after[metric], n):.4f}",
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
    lines.append("(noise: two standard errors of a change in a share between two independent draws of n")
    lines.append(" answers; a change inside it is not evidence of an effect)")
    if any("match" in summary.get(f"{k}_after", {}) for k in ("unseen", "seen")):
        lines.append("(match: the share of generated answers that pass their task's own rule, e.g. evals' Match =")
        lines.append(" starts with a reference, Includes = contains one; over the tasks that have a rule)")
    if summary.get("eval_before_reused"):
        lines.append("(before: an identical earlier run's evaluation of the base model, reused from the cache;")
        lines.append(" eval.reuse_base = false evaluates it again)")
    split = summary.get("time_split")
    if split:
        by_part = ", ".join(
            f"{k} {split[k]:.0f} s" for k in ("load", "train", "aggregate", "evaluate", "other") if k in split
        )
        rss = summary.get("peak_rss_bytes")
        lines.append(
            f"wall time {split['total']:.0f} s: {by_part}" + (f"; peak RSS {rss / 2**30:.2f} GiB" if rss else "")
        )
    left = summary.get("clients_left_out", {})
    if summary.get("skipped_rounds") or left:
        parts = [f"{n} {kind.replace('client_', '')}" for kind, n in left.items()]
        lines.append(
            f"{summary.get('skipped_rounds', 0)} round(s) skipped; client updates left out: "
            + (", ".join(parts) or "none")
            + " (reasons in metrics.jsonl)"
        )
    return "\n".join(lines)


def tidy(fig: Figure) -> None:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


@dataclass
class Run:
    """One run directory as the reports read it."""

    path: Path
    method: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    """``summary.json`` where the run finished, over what :func:`run_summary` rebuilds from the records."""
    config_text: str

    @property
    def ranks(self) -> list[int] | None:
        """Every registered client's rank where the run finished (``summary.json``), else None."""
        counts = self.summary.get("rank_counts", {})
        return [int(k) for k, v in counts.items() for _ in range(int(v))] or None


def load_run(d: Path) -> Run:
    records = read_metrics(d / "metrics.jsonl")
    config_text = (d / "config.toml").read_text() if (d / "config.toml").is_file() else ""
    method = str(tomllib.loads(config_text).get("method", {}).get("name", "?"))
    summary = run_summary(records, method)
    if (d / "summary.json").is_file():
        summary.update(json.loads((d / "summary.json").read_text()))
    return Run(d, method, records, summary, config_text)


def method_table(runs: dict[str, list[Run]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per method: {method, seeds, column: (mean, std) over its runs}. Columns: per
    split and metric the value after training and its change from before; MiB up/down; seconds."""
    values: dict[str, dict[str, list[float]]] = {}
    for method, rs in runs.items():
        v = values.setdefault(method, {})
        for r in rs:
            s = r.summary
            for _, split, _ in GROUPS:
                for metric, x in s.get(f"{split}_after", {}).items():
                    v.setdefault(f"{split} {metric}", []).append(x)
                for metric, x in s.get(f"{split}_change", {}).items():
                    v.setdefault(f"{split} {metric} change", []).append(x)
            v.setdefault("up MiB", []).append(s["up_bytes"] / 2**20)
            v.setdefault("down MiB", []).append(s["down_bytes"] / 2**20)
            if "seconds" in s:
                v.setdefault("seconds", []).append(s["seconds"])
    present = {k for v in values.values() for k in v}
    metrics = ordered_metrics({k.split()[1] for k in present if k.split()[0] in ("unseen", "seen")})
    keys = [
        k for _, split, _ in GROUPS for m in metrics for k in (f"{split} {m}", f"{split} {m} change") if k in present
    ] + [k for k in ("up MiB", "down MiB", "seconds") if k in present]
    rows = [
        {"method": method, "seeds": len(runs[method]), **{k: mean_std(x) for k, x in v.items()}}
        for method, v in values.items()
    ]
    return keys, rows


def comparison_figures(runs: dict[str, list[Run]]) -> dict[str, Figure]:
    """Per-method eval curves (both splits) and train loss, mean ± std over seeds."""
    figs = {
        "comparison": eval_figure({m: eval_curves([r.records for r in rs]) for m, rs in runs.items()}),
        "train_loss": train_loss_figure(
            {m: round_curve([r.records for r in rs], "train_loss") for m, rs in runs.items()}
        ),
    }
    return {k: f for k, f in figs.items() if f is not None}


def load_runs(runs: dict[str, list[Path]]) -> dict[str, list[Run]]:
    return {m: [load_run(d) for d in dirs] for m, dirs in runs.items()}


def comparison(runs: dict[str, list[Path]], out: Path) -> tuple[Path, Path]:
    """``comparison.md`` / ``comparison.csv`` (mean ± std over seeds) and ``comparison.png`` (both splits'
    metrics vs round per method, ± std bands, the base model as a reference), from run directories."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    keys, rows = method_table(loaded)
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
    fig = eval_figure({m: eval_curves([r.records for r in rs]) for m, rs in loaded.items()})
    if fig is not None:
        save_figures({"comparison": fig}, out)
        plt.close(fig)
    return md_path, csv_path


def write_tensorboard(
    records: Sequence[dict[str, Any]], out: Path, ranks: Sequence[int], config_text: str = ""
) -> Path:
    """TensorBoard event files in ``out`` from a run's records, step = round: train loss, eval metrics per
    split (macro averages and per task / client), bytes, seconds, the spectrum diagnostic, clients per round;
    a histogram of the client ranks (one bucket per rank) and the config as text. Earlier event files in
    ``out`` are removed first, so that a rerun does not show twice."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("events.out.tfevents.*"):
        old.unlink()
    dropped: Counter[int] = Counter(r["round"] for r in records if r["type"].startswith("client_"))
    with SummaryWriter(log_dir=str(out)) as w:
        for name, parts in round_seconds(records).items():
            for part, s in parts.items():
                w.add_scalar(f"seconds/{part.replace(' ', '_')}", s, name)
        for r in records:
            step = r["round"]
            if r["type"] == "round":
                w.add_scalar("train/loss", r["train_loss"], step)
                w.add_scalar("comm/up_MiB", r["up_bytes"] / 2**20, step)
                w.add_scalar("comm/down_MiB", r["down_bytes"] / 2**20, step)
                w.add_scalar("seconds/round", r["seconds"], step)
                w.add_scalar("clients/updates", r["clients"], step)
                w.add_scalar("clients/dropped_failed_rejected", dropped[step], step)
                for k, v in r.get("spectrum", {}).items():
                    if k not in ("r_min", "r_max"):
                        w.add_scalar(f"spectrum/{k}", v, step)
            elif r["type"] == "eval":
                for key, split, _ in GROUPS:
                    for metric, v in r.get(key, {}).items():
                        w.add_scalar(f"eval/{split}/{metric}", v, step)
                for key, split in (("unseen", "unseen"), ("participants", "seen")):
                    for who, metrics in r.get(key, {}).items():
                        for metric, v in metrics.items():
                            if metric != "n":
                                w.add_scalar(f"eval_{split}/{who}/{metric}", v, step)
        counts = Counter(ranks)
        if counts:
            ks = sorted(counts)
            w.add_histogram_raw(
                "clients/rank",
                min=ks[0],
                max=ks[-1],
                num=len(ranks),
                sum=float(sum(ranks)),
                sum_squares=float(sum(r * r for r in ranks)),
                bucket_limits=[k + 0.5 for k in ks],
                bucket_counts=[counts[k] for k in ks],
                global_step=0,
            )
        if config_text:
            w.add_text("config", "".join(f"    {line}\n" for line in config_text.splitlines()), 0)
    return out
