"""``report.html``: one self-contained page per run or comparison.

Tables are plain HTML and plots inline SVG from matplotlib: no script, no stylesheet or font from elsewhere,
so the file opens offline in any browser and travels as one attachment. Every number comes from the run
directory (``summary.json``, ``metrics.jsonl``, ``config.toml``), the same as the console table.
"""

from __future__ import annotations

import html
import io
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from fedrank.report import (
    GROUPS,
    Run,
    close,
    comparison_figures,
    figures,
    load_run,
    load_runs,
    mean_std,
    method_table,
    ordered_metrics,
    tidy,
    time_split,
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1b1b}
main{max-width:1200px;margin:0 auto;padding:1em 1.6em 3em}
h1{font-size:1.5em;margin:.3em 0}
h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{padding:.22em .7em;border-bottom:1px solid #e4e4e4;text-align:right;vertical-align:top}
th{background:#f3f4f6;font-weight:600}
.l{text-align:left}
.better{color:#1a7f37}.worse{color:#b42318}
figure{margin:1em 1em 1em 0;display:inline-table;vertical-align:top}
figure svg{max-width:100%;height:auto}
figcaption{display:table-caption;caption-side:bottom;color:#555;font-size:.9em;padding-top:.2em}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:12px}
.bar{background:#4c78a8;height:.8em;min-width:1px}
nav a{margin-right:1em}
.meta{color:#555}
"""


class Raw(str):
    """Table cell text that is already HTML."""


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cell(x: object) -> str:
    if isinstance(x, Raw):
        return x
    if isinstance(x, float):
        return f"{x:.4f}"
    return _esc(x)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], id: str = "", left: int = 1) -> str:
    """A plain table; the first ``left`` columns are text (left-aligned), the rest numbers."""

    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{_esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{_cell(c)}</td>" for i, c in enumerate(r)) + "</tr>\n" for r in rows)
    ident = f' id="{_esc(id)}"' if id else ""
    return f"<table{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n"


def svg(fig: Figure, name: str, caption: str = "") -> str:
    """``fig`` as an inline SVG figure. Text stays text (searchable, sharp); ids are prefixed with ``name``
    because every SVG of the page shares one id space."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        tidy(fig)
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\bid="', f'id="{name}-', text)
    text = text.replace('href="#', f'href="#{name}-').replace("url(#", f"url(#{name}-")
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure id="fig-{_esc(name)}">{text}{cap}</figure>\n'


def page(title: str, sections: Sequence[tuple[str, str, str]], intro: str) -> str:
    """The whole document: ``sections`` are (id, heading, HTML body)."""
    nav = " ".join(f'<a href="#{_esc(i)}">{_esc(h)}</a>' for i, h, _ in sections)
    body = "".join(f'<section id="{_esc(i)}">\n<h2>{_esc(h)}</h2>\n{b}</section>\n' for i, h, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_esc(title)}</h1>\n{intro}<nav>{nav}</nav>\n{body}</main>\n</body>\n</html>\n"
    )


def _change(before: float | None, after: float | None, metric: str) -> Raw:
    if before is None or after is None:
        return Raw("–")
    d = after - before
    good = d < 0 if metric == "loss" else d > 0
    cls = "better" if good else "worse" if d != 0 else ""
    return Raw(f'<span class="{cls}">{d:+.4f}</span>')


def _eval_summary(s: dict[str, Any]) -> str:
    """The console's end-of-run table: macro averages before -> after per split, with n."""
    rows: list[list[object]] = []
    for _, split, what in GROUPS:
        before, after = s.get(f"{split}_before", {}), s.get(f"{split}_after", {})
        count = len(s.get("unseen_tasks", [])) if split == "unseen" else len(s.get("seen_clients", {}))
        unit = ("task" if split == "unseen" else "client") + "s" * (count != 1)
        n = s.get(f"{split}_examples", 0)
        for i, metric in enumerate(ordered_metrics(set(after))):
            b = before.get(metric)
            rows.append(
                [
                    Raw(f"<b>{split}</b> ({count} {unit}: {_esc(what)})") if i == 0 else "",
                    metric,
                    "–" if b is None else float(b),
                    "–" if after[metric] is None else float(after[metric]),
                    _change(b, after[metric], metric),
                    n if i == 0 else "",
                ]
            )
    return table(["split", "metric", "before", "after", "change", "n"], rows, id="eval-summary", left=2)


def _eval_tasks(records: Sequence[dict[str, Any]]) -> str:
    """Before -> after per unseen task (one per held-out family) and per evaluated participant."""
    evals = [r for r in records if r["type"] == "eval"]
    if not evals:
        return "<p>No evaluation was recorded.</p>\n"
    first, last = evals[0], evals[-1]
    found = {k for g in ("unseen", "participants") for m in last.get(g, {}).values() for k in m}
    metrics = ordered_metrics(found - {"n", "new_tokens"})
    rows: list[list[object]] = []
    for key, split in (("unseen", "unseen"), ("participants", "seen")):
        for who, after in last.get(key, {}).items():
            before = first.get(key, {}).get(who, {})
            name = who if key == "unseen" else f"client {who}: " + ", ".join(last["participant_tasks"].get(who, []))
            cells: list[object] = [split, name, int(after.get("n", 0))]
            for m in metrics:
                if m not in after:
                    cells.append("–")
                elif m in before:
                    cells.append(Raw(f"{before[m]:.4f} → {after[m]:.4f}"))
                else:
                    cells.append(f"{after[m]:.4f}")
            rows.append(cells)
    head = ["split", "task / client", "n"] + [f"{m} before → after" for m in metrics]
    note = (
        f"<p>before = round {first['round']} (round 0: the zero-shot base model), after = round {last['round']}; "
        "n = evaluated examples.</p>\n"
    )
    return note + table(head, rows, id="eval-tasks", left=2)


def _rounds_table(records: Sequence[dict[str, Any]]) -> str:
    client_s: dict[int, float] = {}
    dropped: dict[int, int] = {}
    evals = {r["round"]: r["seconds"] for r in records if r["type"] == "eval"}
    for r in records:
        if r["type"] == "client":
            client_s[r["round"]] = client_s.get(r["round"], 0.0) + r["seconds"]
        elif r["type"].startswith("client_"):
            dropped[r["round"]] = dropped.get(r["round"], 0) + 1
    rows: list[list[object]] = []
    for r in records:
        if r["type"] == "round":
            t = r["round"]
            rows.append(
                [
                    t,
                    r["clients"],
                    dropped.get(t, 0),
                    float(r["train_loss"]),
                    f"{r['up_bytes'] / 2**20:.3f}",
                    f"{r['down_bytes'] / 2**20:.3f}",
                    f"{client_s.get(t, 0.0):.2f}",
                    f"{r['aggregate_seconds']:.3f}",
                    f"{r['seconds']:.2f}",
                    f"{evals[t]:.2f}" if t in evals else "",
                ]
            )
        elif r["type"] == "round_skipped":
            t = r["round"]
            rows.append([t, r["valid_updates"], dropped.get(t, 0), Raw("<i>skipped</i>"), "", "", "", "", "", ""])
    head = [
        "round",
        "updates",
        "left out (dropped, failed, rejected)",
        "train loss",
        "up MiB",
        "down MiB",
        "client training s",
        "aggregation s",
        "round s",
        "eval s",
    ]
    return table(head, rows, id="rounds-table", left=0)


def _time_table(parts: Sequence[tuple[str, float]], id: str = "wall-time-table") -> str:
    total = parts[-1][1] if parts else 0.0
    rows: list[list[object]] = []
    for name, s in parts:
        share = s / total if total > 0 else 0.0
        bar = Raw(f'<div class="bar" style="width:{200 * share:.0f}px"></div>') if name != "total" else ""
        rows.append([Raw(f"<b>{name}</b>") if name == "total" else name, f"{s:.2f}", f"{share:.1%}", bar])
    return table(["part", "seconds", "share", ""], rows, id=id)


def _figs(figs: dict[str, Figure], captions: dict[str, str], names: Sequence[str]) -> str:
    return "".join(svg(figs[n], n, captions.get(n, "")) for n in names if n in figs)


CAPTIONS = {
    "eval": "Macro averages per split vs round; dotted: the base model (round 0).",
    "train_loss": "Train loss per round: the n-weighted mean of the clients' answer-token losses.",
    "communication": "Parameters sent per round at 4 bytes each.",
    "time": "Seconds per round by part (round 0: the base model's evaluation; other: validation, the spectrum "
    "diagnostic, per-client state).",
    "ranks": "Clients per LoRA rank.",
    "spectrum": "How the global ΔW's energy spreads over directions (layer means).",
    "comparison": "Macro averages per split vs round: mean over seeds, band ± 1 std; dotted: the base model.",
}


def run_page(run: Run, figs: dict[str, Figure] | None = None) -> str:
    """The report of one run (``figs``: its :func:`fedrank.report.figures`, built here when None; ``{}``: a
    report without plots, as a run with ``output.plots = false`` writes it)."""
    s, records = run.summary, run.records
    counts = {int(k): int(v) for k, v in s.get("rank_counts", {}).items()}
    own = figs is None
    if figs is None:
        figs = figures(records, run.ranks, run.method)
    try:
        eval_html = _eval_summary(s) + _figs(figs, CAPTIONS, ["eval"]) + "<h3>Per task and client</h3>\n"
        eval_html += _eval_tasks(records)
        rounds_html = _rounds_table(records) + _figs(figs, CAPTIONS, ["train_loss", "communication", "time"])
        if not counts:
            counts = {}
            for r in records:
                if r["type"] == "client":
                    counts[r["rank"]] = counts.get(r["rank"], 0) + 1
        ranks_html = table(["LoRA rank", "clients"], sorted(counts.items()), id="ranks-table", left=0)
        sp = s.get("spectrum", {})
        if "effective_rank" in sp:
            ranks_html += (
                f"<p>After the last round the global ΔW has {sp['energy_top_rmin']:.1%} of its energy in its top "
                f"r_min = {sp['r_min']} directions, {sp['energy_top_rmax']:.1%} in its top r_max = {sp['r_max']}; "
                f"effective rank {sp['effective_rank']:.1f}.</p>\n"
            )
        ranks_html += _figs(figs, CAPTIONS, ["ranks", "spectrum"])
    finally:
        if own:
            close(figs)
    time_html = _time_table(time_split(records, s))
    if "load_seconds" not in s:
        time_html += "<p>The run recorded no model load time.</p>\n"
    intro = _run_intro(run)
    if not figs:
        intro += (
            "<p>No plots: the run had <code>output.plots = false</code>; "
            "<code>fedrank report RUN_DIR --html OUT.html</code> draws them from its files.</p>\n"
        )
    sections = [
        ("evaluation", "Evaluation before → after", eval_html),
        ("rounds", "Training per round", rounds_html),
        ("ranks", "Client ranks", ranks_html),
        ("wall-time", "Wall time", time_html),
        ("config", "Resolved config", f"<pre>{_esc(run.config_text)}</pre>\n"),
    ]
    return page(f"fedrank run: {run.method}", sections, intro)


def _run_intro(run: Run) -> str:
    s = run.summary
    facts = [
        ("run directory", str(run.path)),
        ("method", run.method),
        ("rounds", s.get("rounds")),
        ("client updates", s.get("client_updates")),
        ("registered clients", s.get("registered_clients", "–")),
        ("training tasks", s.get("training_tasks", "–")),
        ("held-out task families", ", ".join(s.get("held_out", [])) or "–"),
        ("final train loss", "–" if s.get("final_train_loss") is None else f"{s['final_train_loss']:.4f}"),
        ("adapter", f"{s['adapter']} (PEFT, rank {s['export_rank']})" if "adapter" in s else "–"),
    ]
    items = "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in facts)
    return f'<ul class="meta">{items}</ul>\n'


def write_run_report(run_dir: Path, figs: dict[str, Figure] | None = None, out: Path | None = None) -> Path:
    """``run_dir/report.html`` (or ``out``) from the run directory's files."""
    path = out or run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_page(load_run(run_dir), figs), encoding="utf-8")
    return path


def _pm(x: tuple[float, float], digits: int = 4) -> str:
    return f"{x[0]:.{digits}f} ± {x[1]:.{digits}f}"


def comparison_page(runs: dict[str, list[Run]], out: Path) -> str:
    """The report of several methods (runs over seeds), for a page written to ``out``."""
    keys, rows = method_table(runs)
    methods_html = (
        "<p>Mean ± sample standard deviation over each method's seeds; after = the last evaluation, change = "
        "after − before (round 0: the base model); macro averages over the tasks / clients.</p>\n"
    )
    for _, split, what in GROUPS:
        cols = [k for k in keys if k.split()[0] == split]
        if not cols:
            continue
        methods_html += f"<h3>{split}: {_esc(what)}</h3>\n"
        head = ["method", "seeds"] + [k.removeprefix(split + " ") for k in cols]
        body = [[r["method"], r["seeds"], *(_pm(r[k]) if k in r else "–" for k in cols)] for r in rows]
        methods_html += table(head, body, id=f"methods-{split}")
    cost = [k for k in keys if k.split()[0] not in ("unseen", "seen")]
    methods_html += "<h3>cost</h3>\n" + table(
        ["method", "seeds", *cost],
        [[r["method"], r["seeds"], *(_pm(r[k], 3) if k in r else "–" for k in cost)] for r in rows],
        id="methods-cost",
    )
    figs = comparison_figures(runs)
    try:
        curves_html = _figs(figs, CAPTIONS, ["comparison", "train_loss"])
    finally:
        close(figs)
    parts: dict[str, dict[str, list[float]]] = {}
    for m, rs in runs.items():
        for r in rs:
            for name, sec in time_split(r.records, r.summary):
                parts.setdefault(name, {}).setdefault(m, []).append(sec)
    time_rows = [[name, *(_pm(mean_std(v[m]), 2) if m in v else "–" for m in runs)] for name, v in parts.items()]
    time_html = "<p>Seconds per run, mean ± std over seeds.</p>\n" + table(
        ["part", *runs], time_rows, id="wall-time-table"
    )
    run_rows: list[list[object]] = []
    for m, rs in runs.items():
        for r in rs:
            seed = tomllib.loads(r.config_text).get("seed", "?") if r.config_text else "?"
            rel = os.path.relpath(r.path / "report.html", out.parent)
            link = Raw(f'<a href="{_esc(rel)}">{_esc(r.path)}</a>') if (r.path / "report.html").is_file() else r.path
            after = r.summary.get("unseen_after", {})
            run_rows.append(
                [m, seed, link, r.summary.get("rounds"), after.get("loss", "–"), r.summary.get("seconds", "–")]
            )
    runs_html = table(
        ["method", "seed", "run (its report)", "rounds", "unseen loss after", "seconds"], run_rows, left=3
    )
    first = next(r for rs in runs.values() for r in rs)
    config_html = (
        _config_diff(runs) + f"<h3>{_esc(first.path)}/config.toml</h3>\n<pre>{_esc(first.config_text)}</pre>\n"
    )
    sections = [
        ("methods", "Methods", methods_html),
        ("curves", "Curves per method", curves_html),
        ("wall-time", "Wall time", time_html),
        ("runs", "Runs", runs_html),
        ("config", "Config", config_html),
    ]
    seeds = ", ".join(f"{m} ({len(rs)} seed{'s' * (len(rs) != 1)})" for m, rs in runs.items())
    return page(f"fedrank comparison: {', '.join(runs)}", sections, f'<p class="meta">{_esc(seeds)}</p>\n')


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_diff(runs: dict[str, list[Run]]) -> str:
    """The settings that differ between the runs (method, seed, presets ...), one row per run."""
    flat = [(m, r, _flat(tomllib.loads(r.config_text))) for m, rs in runs.items() for r in rs if r.config_text]
    keys = sorted({k for _, _, f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for _, _, f in flat}) > 1]
    if not differ:
        return "<p>Every run has the same config.</p>\n"
    rows = [[m, r.path.name, *(f.get(k, "–") for k in differ)] for m, r, f in flat]
    return "<h3>Settings that differ between runs</h3>\n" + table(
        ["method", "run", *differ], rows, id="config-diff", left=2 + len(differ)
    )


def write_comparison_report(runs: dict[str, list[Path]], out: Path) -> Path:
    """A comparison page for the run directories of each method, written to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(comparison_page(load_runs(runs), out), encoding="utf-8")
    return out
