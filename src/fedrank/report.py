"""Tables and plots rebuilt from ``metrics.jsonl`` files, without rerunning anything."""

from __future__ import annotations

import csv
import logging
import math
import re
import resource
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedrank.untrusted import MAX_SECONDS

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ names and numbers on the way out
def safe_name(text: object, most: int = 80) -> str:
    """``text`` (a name from a run directory or a data set) for a terminal or a log line: control and format
    characters (ANSI/OSC escape sequences, newlines, bidi overrides) escaped as ``repr`` escapes them
    (``\\x1b``, ``\\n``, ``\\u202e``), and at most ``most`` characters, shortened with "…"."""
    raw = str(text)
    pieces = [c if c.isprintable() else repr(c)[1:-1] for c in raw[: most + 1]]
    if len(raw) <= most and sum(map(len, pieces)) <= most:
        return "".join(pieces)
    out: list[str] = []
    size = 0
    for piece in pieces:
        if size + len(piece) > most - 1:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out) + "…"


def plot_label(text: object, most: int = 60) -> str:
    """``text`` as matplotlib text that shows as written: :func:`safe_name`, with every ``$`` escaped so that
    no name is read as mathtext (``$\\frac{$`` would stop the figure from drawing)."""
    return safe_name(text, most).replace("$", r"\$")


def fmt(x: object, spec: str = ".4f") -> str:
    """``x`` formatted by ``spec`` where it is a real, finite number (not a bool), else "–"; a fixed-point
    ``spec`` gives way to 4 significant digits from 10¹⁵ on (a diverged perplexity is not 300 digits long)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    try:
        if spec[-1:] in ("f", "%") and abs(x) >= 1e15:
            return format(float(x), spec.rstrip("f%").split(".")[0] + ".4g")
        return format(x, spec)
    except (OverflowError, ValueError):
        return "–"


def fmt_count(x: object) -> str:
    """``x`` as a whole number where it is one (an int, or a float without a fraction), else "–"."""
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        return str(int(x))
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else "–"


_TAG_PART = re.compile(r"[^A-Za-z0-9_.-]")


def tb_tag(*parts: object) -> str:
    """A TensorBoard tag of ``parts`` joined by "/": each part (a split, a task or client name, a metric) with
    every character outside [A-Za-z0-9_.-] replaced by "_" (a "/" in a name too, so that names cannot make
    groups of their own), and at most 100 characters."""
    return "/".join(_TAG_PART.sub("_", str(p))[:100] or "_" for p in parts)


# ------------------------------------------------------------------ a run directory is untrusted input
# People share run directories: every value the reports take from summary.json and metrics.jsonl is checked
# here, against the schema the simulator writes (types, ranges), before anything reads it. A value that does not
# fit is left out with a warning (a number is kept as NaN, which the reports show as "–"); a record whose type
# or round does not fit is left out as a whole.

MAX_ROUND = 10**6
MAX_RANK = 2**16
MAX_COUNT = 2**62
MAX_NAME = 1000
"""Longest task, client, metric or method name kept (longer ones are left out)."""
MAX_TEXT = 4096
MAX_METRICS = 16
"""Most metrics kept per evaluated task or average (each is a panel of the plots)."""
_BIG = 1e12
_SECONDS = MAX_SECONDS


class Invalid(ValueError):
    """A value from a run directory that does not fit the schema."""


Check = Callable[[Any, str, list[str]], Any]
"""(value, where it is, problems found inside it) -> the checked value; raises :class:`Invalid`."""


def _where(at: str, key: object) -> str:
    return f"{at}.{safe_name(key, 40)}"


def _num(lo: float = -sys.float_info.max, hi: float = sys.float_info.max) -> Check:
    """A real number in [lo, hi] (by default any finite one) as a float, or NaN (metrics.jsonl's null: a
    diverged loss)."""

    def check(x: Any, at: str, problems: list[str]) -> float:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise Invalid(f"not a number ({type(x).__name__})")
        if isinstance(x, float) and math.isnan(x):
            return x
        if not lo <= x <= hi:
            raise Invalid(f"outside [{lo:g}, {hi:g}]")
        return float(x)

    return check


def _int(lo: int = 0, hi: int = MAX_COUNT) -> Check:
    """A whole number in [lo, hi] (an int, or a float without a fraction)."""

    def check(x: Any, at: str, problems: list[str]) -> int:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise Invalid(f"not an integer ({type(x).__name__})")
        if isinstance(x, float) and not (math.isfinite(x) and x.is_integer()):
            raise Invalid("not an integer")
        if not lo <= x <= hi:
            raise Invalid(f"outside [{lo}, {hi}]")
        return int(x)

    return check


def _text(most: int = MAX_TEXT) -> Check:
    def check(x: Any, at: str, problems: list[str]) -> str:
        if not isinstance(x, str):
            raise Invalid(f"not a string ({type(x).__name__})")
        if len(x) > most:
            raise Invalid(f"longer than {most} characters")
        return x

    return check


_name = _text(MAX_NAME)


def _bool(x: Any, at: str, problems: list[str]) -> bool:
    if not isinstance(x, bool):
        raise Invalid(f"not true/false ({type(x).__name__})")
    return x


def _choice(*options: str) -> Check:
    def check(x: Any, at: str, problems: list[str]) -> str:
        if x not in options or not isinstance(x, str):
            raise Invalid(f"not one of {', '.join(options)}")
        return x

    return check


def _optional(inner: Check) -> Check:
    def check(x: Any, at: str, problems: list[str]) -> Any:
        return None if x is None else inner(x, at, problems)

    return check


def _list(item: Check, most: int = 100_000) -> Check:
    """A list; items that do not fit are left out."""

    def check(x: Any, at: str, problems: list[str]) -> list[Any]:
        if not isinstance(x, list):
            raise Invalid(f"not a list ({type(x).__name__})")
        if len(x) > most:
            raise Invalid(f"more than {most} items")
        out = []
        for i, v in enumerate(x):
            try:
                out.append(item(v, f"{at}[{i}]", problems))
            except Invalid as e:
                problems.append(f"{at}[{i}]: {e}")
        return out

    return check


def _mapping(key: Check, value: Check, most: int = 100_000) -> Check:
    """An object; entries whose name or value do not fit, and those past the first ``most``, are left out."""

    def check(x: Any, at: str, problems: list[str]) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise Invalid(f"not an object ({type(x).__name__})")
        out: dict[str, Any] = {}
        for k, v in x.items():
            where = _where(at, k)
            if len(out) >= most:
                problems.append(f"{at}: more than {most} entries, the rest left out")
                break
            try:
                out[key(k, where, problems)] = value(v, where, problems)
            except Invalid as e:
                problems.append(f"{where}: {e}")
        return out

    return check


_metric_map = _mapping(_name, _num(), MAX_METRICS)


def _metrics(x: Any, at: str, problems: list[str]) -> dict[str, float]:
    """Metric name -> a finite value or NaN; ``n`` and ``new_tokens`` (counts) finite, in [0, 10¹²]."""
    out: dict[str, float] = _metric_map(x, at, problems)
    for k in ("n", "new_tokens"):
        if k in out and not 0 <= out[k] <= _BIG:  # NaN too
            problems.append(f"{at}.{k}: not a count")
            del out[k]
    return out


def _spectrum(x: Any, at: str, problems: list[str]) -> dict[str, Any]:
    """{} (no diagnostic), {r_min, r_max} (ΔW = 0) or all five keys: readers may rely on that shape."""
    keys: dict[str, Check] = {
        "r_min": _int(1, MAX_RANK),
        "r_max": _int(1, MAX_RANK),
        "energy_top_rmin": _num(0.0, 1.0 + 1e-6),
        "energy_top_rmax": _num(0.0, 1.0 + 1e-6),
        "effective_rank": _num(0.0, float(MAX_RANK)),
    }
    if not isinstance(x, dict):
        raise Invalid(f"not an object ({type(x).__name__})")
    out: dict[str, Any] = {}
    for k, check in keys.items():
        if k in x:
            try:
                out[k] = check(x[k], f"{at}.{k}", problems)
            except Invalid as e:
                problems.append(f"{at}.{k}: {e}")
    if len(out) == len(keys):
        return out
    if "r_min" in out and "r_max" in out:
        return {"r_min": out["r_min"], "r_max": out["r_max"]}
    return {}


def _rank_counts(x: Any, at: str, problems: list[str]) -> dict[str, int]:
    """Rank (a whole number as a string) -> clients; at most 1024 ranks and 10⁶ clients in all."""
    out = _mapping(_text(8), _int(0, 10**6), 1024)(x, at, problems)
    bad = [k for k in out if not (k.isascii() and k.isdigit() and 1 <= int(k) <= MAX_RANK)]
    for k in bad:
        problems.append(f"{_where(at, k)}: not a rank")
        del out[k]
    if sum(out.values()) > 10**6:
        raise Invalid("more than 10⁶ clients")
    return {str(int(k)): v for k, v in out.items()}


_REQUIRED: Callable[[], Any] | None = None
Field = tuple[Check, Callable[[], Any] | None]
"""A record's field: its check and a factory of what stands in for it when it is missing or does not fit
(None: the record is left out)."""

_NAN: Callable[[], Any] = lambda: math.nan  # noqa: E731
_TASKS = _mapping(_name, _list(_name))
_SECONDS_FIELD: Field = (_num(0.0, _SECONDS), _NAN)
_BYTES_FIELD: Field = (_num(0.0, float(MAX_COUNT)), _NAN)

RECORDS: dict[str, dict[str, Field]] = {
    "eval": {
        "unseen": (_mapping(_name, _metrics), dict),
        "unseen_avg": (_metrics, dict),
        "participants": (_mapping(_name, _metrics), dict),
        "participants_avg": (_metrics, dict),
        "participant_tasks": (_TASKS, dict),
        "seen_by": (_choice("client", "task"), lambda: "client"),
        "seconds": _SECONDS_FIELD,
        "reused": (_bool, bool),
    },
    "client": {
        "client": (_int(0, MAX_COUNT), _REQUIRED),
        "rank": (_int(1, MAX_RANK), _REQUIRED),
        "n": (_num(0.0, _BIG), _NAN),
        "tasks": (_list(_name), list),
        "loss": (_num(), _NAN),
        "seconds": _SECONDS_FIELD,
        "up_bytes": _BYTES_FIELD,
        "down_bytes": _BYTES_FIELD,
    },
    "round": {
        "clients": (_num(0.0, _BIG), _NAN),
        "train_loss": (_num(), _NAN),
        "up_bytes": _BYTES_FIELD,
        "down_bytes": _BYTES_FIELD,
        "aggregate_seconds": _SECONDS_FIELD,
        "train_seconds": _SECONDS_FIELD,
        "seconds": _SECONDS_FIELD,
        "spectrum": (_spectrum, dict),
    },
    "round_skipped": {
        "valid_updates": (_num(0.0, _BIG), _NAN),
        "min_clients": (_num(0.0, _BIG), _NAN),
    },
}
"""What the reports read of each record type of metrics.jsonl (every record also has its type and round)."""

LEFT_OUT: dict[str, Field] = {"client": (_int(0, MAX_COUNT), _NAN), "reason": (_text(), str)}
"""The fields of a client_failed / client_rejected / client_dropped / client_skipped record."""
_LEFT_OUT_TYPE = re.compile(r"client_[a-z_]{1,40}")
_round = _int(0, MAX_ROUND)


def _fields(r: dict[str, Any], schema: dict[str, Field], at: str, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (check, default) in schema.items():
        try:
            if key not in r:
                raise Invalid("missing")
            out[key] = check(r[key], f"{at}.{key}", problems)
        except Invalid as e:
            if default is None:
                raise Invalid(f"{key}: {e}") from e
            if key in r:
                problems.append(f"{at}.{key}: {e}")
            out[key] = default()
    return out


def clean_records(records: Sequence[Any], source: object = "metrics.jsonl") -> list[dict[str, Any]]:
    """The records of :data:`RECORDS` (and the client_* ones) with exactly the fields the reports read, each
    checked; a warning names what was left out."""
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, r in enumerate(records):
        at = f"record {i + 1}"
        try:
            if not isinstance(r, dict):
                raise Invalid(f"not an object ({type(r).__name__})")
            kind = r.get("type")
            if not isinstance(kind, str):
                raise Invalid("no type")
            schema = RECORDS.get(kind) or (LEFT_OUT if _LEFT_OUT_TYPE.fullmatch(kind) else None)
            if schema is None:
                raise Invalid(f"unknown type {safe_name(kind, 40)!r}")
            if "round" not in r:
                raise Invalid("no round")
            try:
                rnd = _round(r["round"], f"{at}.round", problems)
            except Invalid as e:
                raise Invalid(f"round: {e}") from e
            out.append({"type": kind, "round": rnd, **_fields(r, schema, at, problems)})
        except Invalid as e:
            problems.append(f"{at} left out: {e}")
    _warn(source, problems)
    return out


_PRIVACY_NUMBERS = ("epsilon", "delta", "noise_multiplier", "clip", "rounds")


def _privacy(x: Any, at: str, problems: list[str]) -> dict[str, Any]:
    """summary.json's privacy block: its numbers (None where JSON holds null, e.g. ε = ∞ or C = ∞) and the
    accountant's and sampler's names."""
    if not isinstance(x, dict):
        raise Invalid(f"not an object ({type(x).__name__})")
    out: dict[str, Any] = {k: _optional(_num())(x.get(k), _where(at, k), problems) for k in _PRIVACY_NUMBERS}
    out["accountant"] = _choice("rdp", "pld")(x.get("accountant"), _where(at, "accountant"), problems)
    out["sampling"] = _choice("fixed", "poisson")(x.get("sampling"), _where(at, "sampling"), problems)
    for flag in ("amplified", "seeded"):
        out[flag] = _bool(x.get(flag, False), _where(at, flag), problems)
    by = x.get("noise_added_by", "server")
    out["noise_added_by"] = _choice("server", "clients")(by, _where(at, "noise_added_by"), problems)
    return out


SUMMARY: dict[str, Check] = {
    "method": _name,
    "rounds": _int(0, MAX_ROUND),
    "client_updates": _int(),
    "skipped_rounds": _int(0, MAX_ROUND),
    "clients_left_out": _mapping(
        _choice(*(f"client_{k}" for k in ("failed", "rejected", "dropped", "skipped"))), _int()
    ),
    "eval_before_round": _optional(_round),
    "eval_before_reused": _bool,
    "eval_after_round": _optional(_round),
    **{f"{split}_{when}": _metrics for split in ("unseen", "seen") for when in ("before", "after", "change")},
    "participants_after": _metrics,
    "unseen_tasks": _list(_name),
    "seen_clients": _TASKS,
    "seen_by": _choice("client", "task"),
    "unseen_examples": _int(),
    "seen_examples": _int(),
    "spectrum": _spectrum,
    "final_train_loss": _optional(_num()),
    "up_bytes": _int(),
    "down_bytes": _int(),
    "seconds": _num(0.0, _SECONDS),
    "load_seconds": _num(0.0, _SECONDS),
    "data_seconds": _num(0.0, _SECONDS),
    "adapter": _text(),
    "export_rank": _int(1, MAX_RANK),
    "held_out": _list(_name),
    "training_tasks": _int(),
    "registered_clients": _int(),
    "vocab_size": _int(),
    "rank_counts": _rank_counts,
    "global_state": _text(),
    "report": _text(),
    "tensorboard": _text(),
    "plots": _list(_text()),
    "time_split": _mapping(
        _choice("data", "load", "train", "clients", "aggregate", "evaluate", "other", "total"), _num(0.0, _BIG)
    ),
    "peak_rss_bytes": _int(),
    "privacy": _privacy,
    "secure_aggregation": _bool,
}
"""What the reports read of summary.json; other keys (the data's provenance ...) are not read."""


def clean_summary(summary: Any, source: object = "summary.json") -> dict[str, Any]:
    """The keys of :data:`SUMMARY` in ``summary``, each checked; a warning names what was left out."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    if not isinstance(summary, dict):
        problems.append(f"not an object ({type(summary).__name__})")
        summary = {}
    for key, check in SUMMARY.items():
        if key in summary:
            try:
                out[key] = check(summary[key], key, problems)
            except Invalid as e:
                problems.append(f"{key}: {e}")
    _warn(source, problems)
    return out


def _warn(source: object, problems: list[str]) -> None:
    if problems:
        log.warning(
            "%s: %d value(s) do not fit and are left out of the report, e.g. %s",
            safe_name(source, 200),
            len(problems),
            "; ".join(safe_name(p, 160) for p in problems[:3]),
        )


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def read_config(text: str, source: object = "config.toml") -> dict[str, Any]:
    """``config.toml``'s settings, {} (with a warning) where it is not TOML or nests tables and arrays more
    than 32 deep (a fedrank config nests 3)."""
    from fedrank.untrusted import depth

    try:
        config = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        log.warning("%s is not TOML (%s); the report leaves its settings out", safe_name(source, 200), safe_name(e))
        return {}
    if depth(config) > 32:
        log.warning("%s nests more than 32 deep; the report leaves its settings out", safe_name(source, 200))
        return {}
    return config


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is this a fedrank run directory?)")
    from fedrank.untrusted import DataError, available_memory, gib, load_json

    size, free = path.stat().st_size, available_memory()
    if free is not None and size > free:
        raise ValueError(f"{path} is {gib(size)}, more than the {gib(free)} of memory available; not read")
    records = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        if not line.strip():
            continue
        try:  # bounded: a line nested thousands deep or of gigabytes is refused, naming the file and line
            records.append(load_json(line, f"{path} line {i + 1}", object_hook=_null_as_nan))
        except DataError as e:
            raise ValueError(f"{e}; a line cut by a crash is repaired by --resume") from e
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
        "seen_by": last.get("seen_by", "client"),
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


PLOT_LIMIT = 1e15
"""Values beyond ± this are not drawn (matplotlib cannot lay out an axis from -1e308 to 1e308)."""


def _plottable(v: float) -> float:
    return v if math.isfinite(v) and abs(v) <= PLOT_LIMIT else math.nan


def _line(ax: Any, curve: Curve, label: str, k: int) -> None:
    """Line ``k`` of a plot: the mean over runs with markers, and a ± std band when there are several runs."""
    xs = sorted(curve)
    stats = [mean_std([_plottable(v) for v in curve[x]]) for x in xs]
    mean = [_plottable(m) for m, _ in stats]
    n = max(len(curve[x]) for x in xs)
    marker, linestyle = STYLES[k % len(STYLES)]
    color = f"C{k % 10}"
    name = plot_label(label) if n == 1 else f"{plot_label(label)} (mean ± std, {n} seeds)"
    ax.plot(xs, mean, marker=marker, linestyle=linestyle, color=color, label=name, markersize=5)
    if n > 1:
        lo = [_plottable(m - s) for m, s in stats]
        hi = [_plottable(m + s) for m, s in stats]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


def eval_figure(curves: dict[str, Curves]) -> Figure | None:
    """One row of panels per split (unseen, seen), one panel per metric that split has, one line per label
    (method) with its spread over seeds, and the base model (round 0, the mean over every run) as a dotted
    reference line."""
    panels = {p for c in curves.values() for p in c}
    rows = [
        (key, split, ordered_metrics({m for g, m in panels if g == key})[:MAX_METRICS])
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
            level = _plottable(sum(map(_plottable, base)) / len(base)) if base else math.nan
            if math.isfinite(level):
                ax.axhline(level, **BASE_STYLE, label="base model (round 0)")
            name = plot_label(metric, 40)
            ax.set(title=f"{split}: {name} ({_better(metric)})", xlabel="round", ylabel=f"{split} {name}")
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


CLIENTS_OWN = "of which the clients' own training"
"""The clients' reported training seconds, summed: a part of client training, not beside it."""


def round_seconds(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per round: client training (the wall time the server waited for the round's clients: on Flower
    nodes train at once and their processes start per message; runs written before it was recorded: the sum
    over clients), the clients' own reported seconds (:data:`CLIENTS_OWN`), aggregation, other (validation,
    the spectrum diagnostic, FedSA-style local state), evaluation."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if r["type"] == "client":
            parts = out.setdefault(r["round"], {})
            parts[CLIENTS_OWN] = parts.get(CLIENTS_OWN, 0.0) + r["seconds"]
        elif r["type"] == "round":
            wall = r.get("train_seconds", math.nan)
            parts = out.setdefault(r["round"], {})
            parts.update(aggregation=r["aggregate_seconds"], round=r["seconds"])
            if math.isfinite(wall):
                parts["client training"] = wall
        elif r["type"] == "eval":
            out.setdefault(r["round"], {})["evaluation"] = r["seconds"]
    for parts in out.values():
        parts.setdefault("client training", parts.get(CLIENTS_OWN, 0.0))
        if "round" in parts:
            parts["other"] = max(0.0, parts.pop("round") - parts["client training"] - parts["aggregation"])
    return out


def time_split(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, float]]:
    """The run's wall time by part: (part, seconds), the last row the total. Data (download, index and
    partition: the first run builds the index) and model load are those of the last process; the rounds and the
    total span every sitting of a resumed run (its earlier sittings up to their last checkpoint)."""
    per_round = round_seconds(records).values()
    rows = [("data", float(summary["data_seconds"]))] if "data_seconds" in summary else []
    rows += [("model load", float(summary["load_seconds"]))] if "load_seconds" in summary else []
    for name in ("client training", "aggregation", "evaluation"):
        rows.append((name, sum(p.get(name, 0.0) for p in per_round)))
    if "seconds" in summary:
        counted = sum(s for name, s in rows if name not in ("data", "model load"))
        rows.append(("other: validation, spectrum, checkpoints, export", max(0.0, summary["seconds"] - counted)))
    rows.append(("total", sum(s for _, s in rows)))
    wall, own = (sum(p.get(k, 0.0) for p in per_round) for k in ("client training", CLIENTS_OWN))
    if own < 0.8 * wall:  # the clients' training is a small part of the wait (Flower: a process per message)
        rows.insert(rows.index(("client training", wall)) + 1, (CLIENTS_OWN, own))
    return rows


def time_split_summary(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    """:func:`time_split` as summary.json's ``time_split``: seconds by part (load, train, aggregate,
    evaluate, other) and the total."""
    keys = {
        "data": "data",
        "model load": "load",
        "client training": "train",
        "aggregation": "aggregate",
        "evaluation": "evaluate",
        CLIENTS_OWN: "clients",
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


def protection_lines(summary: dict[str, Any]) -> list[str]:
    """What protected the clients' updates: secure aggregation and the DP guarantee (a validated summary)."""
    lines = []
    if summary.get("secure_aggregation"):
        lines.append("secure aggregation: SecAgg+; the server saw each round's sum only, never a client's update")
    dp = summary.get("privacy")
    if dp:
        eps = "∞" if dp["epsilon"] is None else fmt(dp["epsilon"], ".3g")
        clip = "∞" if dp["clip"] is None else fmt(dp["clip"], ".3g")
        lines.append(
            f"privacy: ε = {eps} at δ = {fmt(dp['delta'], '.2g')} after {fmt_count(dp['rounds'])} round(s) "
            f"({dp['accountant'].upper()} accountant, {dp['sampling']} sampling; clip C = {clip}, noise "
            f"multiplier σ = {fmt(dp['noise_multiplier'], '.3g')}"
            + ("; noise added by the clients under SecAgg+" if dp["noise_added_by"] == "clients" else "")
            + ("" if dp["amplified"] else "; no amplification: the update shows who took part")
            + ("; SEEDED noise: not private, for tests" if dp["seeded"] and dp["noise_multiplier"] else "")
            + ")"
        )
    return lines


def end_of_run_table(summary: dict[str, Any]) -> str:
    """An aligned before -> after table of the evaluated groups (macro averages over tasks / clients), for a
    terminal: ``summary`` is checked first (:func:`clean_summary`), names are :func:`safe_name`'s."""
    summary = clean_summary(summary)
    rows = [("group", "metric", "before", "after", "change", "noise", "n")]
    groups = (
        (f"unseen ({len(summary.get('unseen_tasks', []))} tasks)", "unseen", summary.get("unseen_examples", 0)),
        (
            f"seen ({len(summary.get('seen_clients', {}))} {summary.get('seen_by', 'client')}s)",
            "seen",
            summary.get("seen_examples", 0),
        ),
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
                    "–" if b is None else fmt(b),
                    fmt(after[metric]),
                    "–" if b is None else fmt(after[metric] - b, "+.4f"),
                    "" if b is None or metric not in SHARES else f"±{fmt(share_noise(b, after[metric], n))}",
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
    before_after = f"(before = round {fmt_count(b_round)}, the zero-shot base model when 0; after = round "
    lines.append(before_after + f"{fmt_count(a_round)}; loss is the")
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
        keys = ("data", "load", "train", "aggregate", "evaluate", "other")
        by_part = ", ".join(f"{k} {fmt(split[k], '.0f')} s" for k in keys if k in split)
        if "clients" in split and "train" in split:
            by_part = by_part.replace(
                f"train {fmt(split['train'], '.0f')} s",
                f"train {fmt(split['train'], '.0f')} s (the clients' own training {fmt(split['clients'], '.0f')} s)",
            )
        rss = summary.get("peak_rss_bytes")
        lines.append(
            f"wall time {fmt(split.get('total'), '.0f')} s: {by_part}"
            + (f"; peak RSS {fmt(rss / 2**30, '.2f')} GiB" if rss else "")
        )
    lines += protection_lines(summary)
    left = summary.get("clients_left_out", {})
    if summary.get("skipped_rounds") or left:
        parts = [f"{n} {safe_name(kind.replace('client_', ''), 40)}" for kind, n in left.items()]
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
    """Mean and sample standard deviation (0 for one value); values too large to square give inf (shown as
    "–"), not an OverflowError."""
    m = sum(xs) / len(xs)
    try:
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    except OverflowError:
        sd = math.inf
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
    config: dict[str, Any] = field(default_factory=dict)
    """``config_text`` parsed ({} where it is not TOML)."""

    @property
    def ranks(self) -> list[int] | None:
        """Every registered client's rank where the run finished (``summary.json``), else None."""
        counts = self.summary.get("rank_counts", {})
        return [int(k) for k, v in counts.items() for _ in range(int(v))] or None


def load_run(d: Path) -> Run:
    """Run directory ``d`` as the reports read it. It is untrusted input (people share run directories): the
    records and summary.json are checked (:func:`clean_records`, :func:`clean_summary`) before anything uses
    them, and what does not fit is left out with a warning."""
    records = clean_records(read_metrics(d / "metrics.jsonl"), d / "metrics.jsonl")
    config_text = _read_text(d / "config.toml")
    config = read_config(config_text, d / "config.toml")
    section = config.get("method")
    name = section.get("name", "?") if isinstance(section, dict) else "?"
    method = name if isinstance(name, str) and 0 < len(name) <= MAX_NAME else "?"
    summary = run_summary(records, method)
    if (d / "summary.json").is_file():
        from fedrank.untrusted import load_json

        try:
            loaded: Any = load_json(_read_text(d / "summary.json"), str(d / "summary.json"))  # depth, size bounded
        except ValueError as e:
            log.warning("%s: %s; the report leaves it out", safe_name(d / "summary.json", 200), safe_name(e, 300))
            loaded = {}
        summary.update(clean_summary(loaded, d / "summary.json"))
    return Run(d, method, records, summary, config_text, config)


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
    md = ["| method | seeds | " + " | ".join(map(_md_cell, keys)) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{fmt(r[k][0])} ± {fmt(r[k][1])}" if k in r else "–" for k in keys]
        md.append(f"| {_md_cell(r['method'])} | {r['seeds']} | " + " | ".join(_md_cell(c) for c in cells) + " |")
    md_path = out / "comparison.md"
    md_path.write_text("\n".join(md) + "\n")
    fig = eval_figure({m: eval_curves([r.records for r in rs]) for m, rs in loaded.items()})
    if fig is not None:
        save_figures({"comparison": fig}, out)
        plt.close(fig)
    return md_path, csv_path


def _md_cell(text: object) -> str:
    """A Markdown table cell that prints safely (comparison.md is printed): :func:`safe_name`, "|" escaped."""
    return safe_name(text).replace("|", "\\|")


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
                w.add_scalar(tb_tag("seconds", part), s, name)
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
                        w.add_scalar(tb_tag("spectrum", k), v, step)
            elif r["type"] == "eval":
                for key, split, _ in GROUPS:
                    for metric, v in r.get(key, {}).items():
                        w.add_scalar(tb_tag("eval", split, metric), v, step)
                for key, split in (("unseen", "unseen"), ("participants", "seen")):
                    for who, metrics in r.get(key, {}).items():
                        for metric, v in metrics.items():
                            if metric != "n":
                                w.add_scalar(tb_tag(f"eval_{split}", who, metric), v, step)
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
