"""``report.html``: one self-contained page per run or comparison.

Tables are plain HTML and plots inline SVG from matplotlib: no script, no stylesheet or font from elsewhere,
so the file opens offline in any browser and travels as one attachment. Every number comes from the run
directory (``summary.json``, ``metrics.jsonl``, ``config.toml``), the same as the console table.

A run directory is untrusted input (people share them), so the page is built structurally: the values are
checked on the way in (:func:`fedrank.report.load_run`), and on the way out markup comes only from the builders
below (:func:`el`, :func:`table`, :func:`page`), which escape every text and attribute value, format numbers
only where they are real finite numbers (:func:`num`, else "–") and make links only from in-page anchors and
relative file paths (:class:`Href`). Only :class:`Html` is put into a page as it is.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from fedrank.report import (
    GROUPS,
    MAX_METRICS,
    Run,
    close,
    comparison_figures,
    figures,
    fmt,
    fmt_count,
    load_run,
    load_runs,
    mean_std,
    method_table,
    ordered_metrics,
    protection_lines,
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


# ------------------------------------------------------------------ builders: the only way markup is made
class Html(str):
    """Markup made by the builders of this module (every text and attribute value in it escaped): the only
    string that goes into a page as it is; any other value is escaped as text, also when it is added to an
    ``Html`` (``Html + str`` escapes the str)."""

    def __add__(self, other: str) -> Html:
        return Html(str.__add__(self, esc(other)))

    def __radd__(self, other: str) -> Html:
        return Html(str.__add__(esc(other), self))


class Href(str):
    """A link target made by :func:`anchor` or :func:`file_href`: ``#id`` or a relative, percent-encoded file
    path, never a URL with a scheme (``javascript:``, ``http:`` ...)."""


DASH = Html("–")
TAGS = frozenset(
    {"a", "b", "code", "div", "figcaption", "figure", "h1", "h2", "h3", "i", "li", "nav", "p", "pre", "section"}
    | {"span", "table", "tbody", "td", "th", "thead", "tr", "ul"}
)
"""The elements :func:`el` makes (the page's frame is written out in :func:`page`)."""
_ATTRS = frozenset(("class", "href", "id", "style"))
_IDENT = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_STYLE = re.compile(r"width:[0-9]{1,4}px\Z")


def esc(x: object) -> Html:
    """``x`` as text: ``&``, ``<``, ``>`` and both quotes escaped (safe in text and in attribute values)."""
    return x if isinstance(x, Html) else Html(html.escape(str(x), quote=True))


def num(x: object, spec: str = ".4f") -> Html:
    """``x`` formatted by ``spec`` where it is a real, finite number (not a bool, not a string), else "–"."""
    return esc(fmt(x, spec))


def count(x: object) -> Html:
    """``x`` as a whole number where it is one, else "–"."""
    return esc(fmt_count(x))


def anchor(ident: str) -> Href:
    """An in-page link to the element with id ``ident`` (lower-case letters, digits, "_" and "-")."""
    if not _IDENT.match(ident):
        raise ValueError(f"not an id of this page: {ident!r}")
    return Href("#" + ident)


def file_href(target: Path, base: Path) -> Href | None:
    """A link from a page in directory ``base`` to the file ``target``: the relative path, each part
    percent-encoded (a ":" too, so that no part reads as a scheme: a run directory named ``javascript:x``
    links as ``javascript%3Ax/report.html``); None where there is no relative path (another drive)."""
    try:
        rel = Path(os.path.relpath(target, base))
    except ValueError:
        return None
    if rel.is_absolute() or not rel.parts:
        return None
    return Href("/".join(urllib.parse.quote(part, safe="") for part in rel.parts))


def el(tag: str, *children: object, cls: str = "", **attrs: str | None) -> Html:
    """``<tag ...>children</tag>``: children that are :class:`Html` go in as they are, anything else as
    escaped text; ``cls`` is the class; attribute values are escaped, ``href`` must be an :class:`Href`, ``id``
    an identifier and ``style`` a bar width; a None value leaves the attribute out."""
    if tag not in TAGS:
        raise ValueError(f"no builder for <{tag}>")
    if cls:
        attrs = {"class": cls, **attrs}
    out = [f"<{tag}"]
    for name, value in attrs.items():
        if value is None:
            continue
        if name not in _ATTRS:
            raise ValueError(f"no builder for the attribute {name!r}")
        if name == "href" and not isinstance(value, Href):
            raise TypeError("href: build it with anchor() or file_href()")
        if name == "id" and not _IDENT.match(value):
            raise ValueError(f"not an id: {value!r}")
        if name == "style" and not _STYLE.match(value):
            raise ValueError(f"not a bar width: {value!r}")
        out.append(f' {name}="{esc(value)}"')
    out.append(">")
    out.extend(esc(c) for c in children)
    out.append(f"</{tag}>")
    return Html("".join(out))


def join(parts: Iterable[object], sep: str = "") -> Html:
    """``parts`` one after the other, each escaped unless it is :class:`Html`."""
    return Html(esc(sep).join(esc(p) for p in parts))


def _cell(x: object) -> Html:
    if isinstance(x, Html):
        return x
    if isinstance(x, float):
        return num(x)
    if isinstance(x, int) and not isinstance(x, bool):
        return count(x)
    return esc(x)


def table(header: Sequence[object], rows: Iterable[Sequence[object]], id: str = "", left: int = 1) -> Html:
    """A plain table; the first ``left`` columns are text (left-aligned), the rest numbers. A float cell is
    written with 4 decimals (a non-finite one as "–"), an :class:`Html` cell as it is, anything else as text."""

    def cls(i: int) -> str:
        return "l" if i < left else ""

    head = el("tr", *(el("th", h, cls=cls(i)) for i, h in enumerate(header)))
    body = join(el("tr", *(el("td", _cell(c), cls=cls(i)) for i, c in enumerate(r))) + "\n" for r in rows)
    return el("table", "\n", el("thead", head), "\n", el("tbody", "\n", body), id=id or None) + "\n"


def svg(fig: Figure, name: str, caption: str = "") -> Html:
    """``fig`` as an inline SVG figure. Text stays text (searchable, sharp); ids are prefixed with ``name``
    because every SVG of the page shares one id space. matplotlib escapes the text it writes, and every label
    from a run directory went through :func:`fedrank.report.plot_label`."""
    if not _IDENT.match(name):
        raise ValueError(f"not a figure name: {name!r}")
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        tidy(fig)
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\bid="', f'id="{name}-', text)
    text = text.replace('href="#', f'href="#{name}-').replace("url(#", f"url(#{name}-")
    return el("figure", Html(text), el("figcaption", caption) if caption else "", id=f"fig-{name}") + "\n"


def page(title: str, sections: Sequence[tuple[str, str, Html]], intro: Html) -> Html:
    """The whole document: ``sections`` are (id, heading, HTML body)."""
    nav = join((el("a", h, href=anchor(i)) for i, h, _ in sections), " ")
    body = join(el("section", "\n", el("h2", h), "\n", b, id=i) + "\n" for i, h, b in sections)
    return Html(
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{el('h1', title)}\n{intro}{el('nav', nav)}\n{body}</main>\n</body>\n</html>\n"
    )


def para(*children: object, cls: str = "") -> Html:
    return el("p", *children, cls=cls) + "\n"


def _finite(x: object) -> float | None:
    """``x`` where it is a real, finite number, else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        v = float(x)
    except OverflowError:  # an int beyond float's range
        return None
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------ a run's page
def _change(before: object, after: object, metric: str) -> Html:
    b, a = _finite(before), _finite(after)
    if b is None or a is None:
        return DASH
    d = a - b
    good = d < 0 if metric == "loss" else d > 0
    cls = "better" if good else "worse" if d != 0 else ""
    return el("span", num(d, "+.4f"), cls=cls)


def _eval_summary(s: dict[str, Any]) -> Html:
    """The console's end-of-run table: macro averages before -> after per split, with n."""
    rows: list[list[object]] = []
    for _, split, what in GROUPS:
        before, after = s.get(f"{split}_before", {}), s.get(f"{split}_after", {})
        n_of = len(s.get("unseen_tasks", [])) if split == "unseen" else len(s.get("seen_clients", {}))
        unit = ("task" if split == "unseen" else "client") + "s" * (n_of != 1)
        n = s.get(f"{split}_examples", 0)
        for i, metric in enumerate(ordered_metrics(set(after))):
            b = before.get(metric)
            rows.append(
                [
                    join([el("b", split), f" ({n_of} {unit}: {what})"]) if i == 0 else "",
                    metric,
                    num(b),
                    num(after[metric]),
                    _change(b, after[metric], metric),
                    count(n) if i == 0 else "",
                ]
            )
    return table(["split", "metric", "before", "after", "change", "n"], rows, id="eval-summary", left=2)


def _eval_tasks(records: Sequence[dict[str, Any]]) -> Html:
    """Before -> after per unseen task (one per held-out family) and per evaluated participant."""
    evals = [r for r in records if r["type"] == "eval"]
    if not evals:
        return para("No evaluation was recorded.")
    first, last = evals[0], evals[-1]
    found = {k for g in ("unseen", "participants") for m in last.get(g, {}).values() for k in m}
    metrics = ordered_metrics(found - {"n", "new_tokens"})[:MAX_METRICS]
    rows: list[list[object]] = []
    for key, split in (("unseen", "unseen"), ("participants", "seen")):
        for who, after in last.get(key, {}).items():
            before = first.get(key, {}).get(who, {})
            tasks = last.get("participant_tasks", {}).get(who, [])
            name = who if key == "unseen" else f"client {who}: " + ", ".join(tasks)
            cells: list[object] = [split, name, count(after.get("n"))]
            for m in metrics:
                if m not in after:
                    cells.append(DASH)
                elif m in before:
                    cells.append(join([num(before[m]), " → ", num(after[m])]))
                else:
                    cells.append(num(after[m]))
            rows.append(cells)
    head = ["split", "task / client", "n"] + [f"{m} before → after" for m in metrics]
    note = para(
        f"before = round {fmt_count(first['round'])} (round 0: the zero-shot base model), "
        f"after = round {fmt_count(last['round'])}; n = evaluated examples."
    )
    return note + table(head, rows, id="eval-tasks", left=2)


def _rounds_table(records: Sequence[dict[str, Any]]) -> Html:
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
                    count(t),
                    count(r["clients"]),
                    count(dropped.get(t, 0)),
                    num(r["train_loss"]),
                    num(r["up_bytes"] / 2**20, ".3f"),
                    num(r["down_bytes"] / 2**20, ".3f"),
                    num(client_s.get(t, 0.0), ".2f"),
                    num(r["aggregate_seconds"], ".3f"),
                    num(r["seconds"], ".2f"),
                    num(evals[t], ".2f") if t in evals else "",
                ]
            )
        elif r["type"] == "round_skipped":
            t = r["round"]
            rows.append([count(t), count(r["valid_updates"]), count(dropped.get(t, 0)), el("i", "skipped"), *[""] * 6])
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


def _time_table(parts: Sequence[tuple[str, float]], id: str = "wall-time-table") -> Html:
    total = _finite(parts[-1][1]) if parts else None
    rows: list[list[object]] = []
    for name, s in parts:
        sec = _finite(s)
        share = None if sec is None or total is None else sec / total if total > 0 else 0.0
        width = round(200 * min(max(share, 0.0), 1.0)) if share is not None else 0
        bar = el("div", cls="bar", style=f"width:{width}px") if name != "total" else ""
        rows.append([el("b", name) if name == "total" else name, num(s, ".2f"), num(share, ".1%"), bar])
    return table(["part", "seconds", "share", ""], rows, id=id)


def _figs(figs: dict[str, Figure], captions: dict[str, str], names: Sequence[str]) -> Html:
    return join(svg(figs[n], n, captions.get(n, "")) for n in names if n in figs)


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
    report without plots, as a run with ``output.plots = false`` writes it). ``run`` is checked already
    (:func:`fedrank.report.load_run`)."""
    s, records = run.summary, run.records
    counts = {int(k): int(v) for k, v in s.get("rank_counts", {}).items()}
    own = figs is None
    if figs is None:
        figs = figures(records, run.ranks, run.method)
    try:
        eval_html = _eval_summary(s) + _figs(figs, CAPTIONS, ["eval"]) + el("h3", "Per task and client") + "\n"
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
            ranks_html += para(
                "After the last round the global ΔW has ",
                num(sp.get("energy_top_rmin"), ".1%"),
                f" of its energy in its top r_min = {fmt_count(sp.get('r_min'))} directions, ",
                num(sp.get("energy_top_rmax"), ".1%"),
                f" in its top r_max = {fmt_count(sp.get('r_max'))}; effective rank ",
                num(sp.get("effective_rank"), ".1f"),
                ".",
            )
        ranks_html += _figs(figs, CAPTIONS, ["ranks", "spectrum"])
    finally:
        if own:
            close(figs)
    time_html = _time_table(time_split(records, s))
    if "load_seconds" not in s:
        time_html += para("The run recorded no model load time.")
    intro = _run_intro(run)
    if not figs:
        intro += para(
            "No plots: the run had ",
            el("code", "output.plots = false"),
            "; ",
            el("code", "fedrank report RUN_DIR --html OUT.html"),
            " draws them from its files.",
        )
    sections = [
        ("evaluation", "Evaluation before → after", eval_html),
        ("rounds", "Training per round", rounds_html),
        ("ranks", "Client ranks", ranks_html),
        ("wall-time", "Wall time", time_html),
        ("config", "Resolved config", el("pre", run.config_text) + "\n"),
    ]
    return page(f"fedrank run: {run.method}", sections, intro)


def _run_intro(run: Run) -> Html:
    s = run.summary
    adapter = f"{s['adapter']} (PEFT, rank {fmt_count(s.get('export_rank'))})" if "adapter" in s else "–"
    facts = [
        ("run directory", str(run.path)),
        ("method", run.method),
        ("rounds", count(s.get("rounds"))),
        ("client updates", count(s.get("client_updates"))),
        ("registered clients", count(s.get("registered_clients"))),
        ("training tasks", count(s.get("training_tasks"))),
        ("held-out task families", ", ".join(s.get("held_out", [])) or "–"),
        ("final train loss", num(s.get("final_train_loss"))),
        ("adapter", adapter),
        *(tuple(line.split(": ", 1)) for line in protection_lines(s)),  # secure aggregation, privacy
    ]
    items = join(el("li", el("b", k), ": ", v) for k, v in facts)
    return el("ul", items, cls="meta") + "\n"


def write_run_report(run_dir: Path, figs: dict[str, Figure] | None = None, out: Path | None = None) -> Path:
    """``run_dir/report.html`` (or ``out``) from the run directory's files."""
    path = out or run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_page(load_run(run_dir), figs), encoding="utf-8", errors="replace")  # a lone surrogate: "?"
    return path


# ------------------------------------------------------------------ a comparison's page
def _pm(x: tuple[float, float], digits: int = 4) -> Html:
    return join([num(x[0], f".{digits}f"), " ± ", num(x[1], f".{digits}f")])


def _seed(run: Run) -> object:
    seed = run.config.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else "?"


def comparison_page(runs: dict[str, list[Run]], out: Path, *, link_runs: bool = True) -> str:
    """The report of several methods (runs over seeds), for a page written to ``out``; ``link_runs``: link each
    run's own report where it has one."""
    keys, rows = method_table(runs)
    methods_html = para(
        "Mean ± sample standard deviation over each method's seeds; after = the last evaluation, change = "
        "after − before (round 0: the base model); macro averages over the tasks / clients."
    )
    for _, split, what in GROUPS:
        cols = [k for k in keys if k.split()[0] == split]
        if not cols:
            continue
        methods_html += el("h3", f"{split}: {what}") + "\n"
        head = ["method", "seeds"] + [k.removeprefix(split + " ") for k in cols]
        body = [[r["method"], r["seeds"], *(_pm(r[k]) if k in r else DASH for k in cols)] for r in rows]
        methods_html += table(head, body, id=f"methods-{split}")
    cost = [k for k in keys if k.split()[0] not in ("unseen", "seen")]
    methods_html += el("h3", "cost") + "\n"
    methods_html += table(
        ["method", "seeds", *cost],
        [[r["method"], r["seeds"], *(_pm(r[k], 3) if k in r else DASH for k in cost)] for r in rows],
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
    time_rows = [[name, *(_pm(mean_std(v[m]), 2) if m in v else DASH for m in runs)] for name, v in parts.items()]
    time_html = para("Seconds per run, mean ± std over seeds.") + table(
        ["part", *runs], time_rows, id="wall-time-table"
    )
    run_rows: list[list[object]] = []
    for m, rs in runs.items():
        for r in rs:
            linked = link_runs and (r.path / "report.html").is_file()
            href = file_href(r.path / "report.html", out.parent) if linked else None
            link = el("a", str(r.path), href=href) if href is not None else str(r.path)
            after = r.summary.get("unseen_after", {})
            run_rows.append(
                [
                    m,
                    _seed(r),
                    link,
                    count(r.summary.get("rounds")),
                    num(after.get("loss")),
                    num(r.summary.get("seconds")),
                ]
            )
    runs_html = table(
        ["method", "seed", "run (its report)", "rounds", "unseen loss after", "seconds"], run_rows, left=3
    )
    first = next(r for rs in runs.values() for r in rs)
    config_html = _config_diff(runs) + el("h3", f"{first.path}/config.toml") + "\n" + el("pre", first.config_text)
    sections = [
        ("methods", "Methods", methods_html),
        ("curves", "Curves per method", curves_html),
        ("wall-time", "Wall time", time_html),
        ("runs", "Runs", runs_html),
        ("config", "Config", config_html + "\n"),
    ]
    seeds = ", ".join(f"{m} ({len(rs)} seed{'s' * (len(rs) != 1)})" for m, rs in runs.items())
    return page(f"fedrank comparison: {', '.join(runs)}", sections, para(seeds, cls="meta"))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_diff(runs: dict[str, list[Run]]) -> Html:
    """The settings that differ between the runs (method, seed, presets ...), one row per run."""
    flat = [(m, r, _flat(r.config)) for m, rs in runs.items() for r in rs if r.config_text]
    keys = sorted({k for _, _, f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for _, _, f in flat}) > 1]
    if not differ:
        return para("Every run has the same config.")
    rows = [[m, r.path.name, *(f.get(k, DASH) for k in differ)] for m, r, f in flat]
    head = el("h3", "Settings that differ between runs") + "\n"
    return head + table(["method", "run", *differ], rows, id="config-diff", left=2 + len(differ))


def write_comparison_report(runs: dict[str, list[Path]], out: Path, *, link_runs: bool = True) -> Path:
    """A comparison page for the run directories of each method, written to ``out``. ``link_runs=False``: the
    run directories are named, not linked (a page that is committed without them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(comparison_page(load_runs(runs), out, link_runs=link_runs), encoding="utf-8", errors="replace")
    return out
