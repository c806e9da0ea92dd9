"""A run directory is untrusted input (people share them): hostile strings and numbers in any field of
summary.json, metrics.jsonl and config.toml (and in the run directory's name) give a report.html with no
script, no event handler attribute and no link but in-page anchors and relative file paths; names reach the
terminal with their control characters escaped and TensorBoard as safe tags."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import re
import shutil
import tempfile
import tomllib
import urllib.parse
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from random import Random
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fedrank.cli import main
from fedrank.html_report import Href, anchor, el, file_href, num, write_comparison_report, write_run_report
from fedrank.report import (
    clean_records,
    clean_summary,
    close,
    comparison,
    end_of_run_table,
    eval_figure,
    fmt,
    load_run,
    plot_label,
    safe_name,
    tb_tag,
)
from helpers import TINY_TOML

HOSTILE_TEXT = [
    "<script>alert(1)</script>",
    '" onmouseover="alert(1)',
    "' onfocus='alert(1)' autofocus '",
    "javascript:alert(1)",
    " JaVaScRiPt:alert(1)",
    "</style><img src=x onerror=alert(1)>",
    "</title><script>alert(1)</script>",
    "]]><svg onload=alert(1)>",
    "<!--",
    "&lt;script&gt;",
    "\x1b[31mred\x1b]0;pwned\x07\x1b[0m",
    "$\\frac{$",
    "$x$ and $y",
    "a\nb\r\n\tc\x00d",
    "\u202egnp.exe",
    "x" * 900,  # long, kept
    "y" * 20_000,  # too long for a name: left out
]
HOSTILE_NUMBERS: list[Any] = [
    "1",
    "NaN",
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    -1,
    -7.5,
    10**30,
    2**63,
    0.5,
    True,
    None,
    [1, [2]],
    {"a": 1},
    [],
]
DIR_NAMES = ['" onmouseover="alert(1)', "<img src=x onerror=alert(1)>", "\x1b[31mred", "$\\frac{$", "a\nb"]
"""Run directory names (no "/" or NUL)."""

FRAME_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "nav", "a", "section"}
FRAME_TAGS |= {"p", "ul", "li", "b", "i", "code", "pre", "table", "thead", "tbody", "tr", "th", "td", "span", "div"}
FRAME_TAGS |= {"figure", "figcaption", "svg"}
"""Every element a page has outside its inline SVGs."""
FORBIDDEN = {"script", "iframe", "object", "embed", "img", "image", "link", "base", "form", "input", "button"}
FORBIDDEN |= {"foreignobject", "animate", "set", "video", "audio", "source", "frame", "frameset", "applet"}
URL_ATTRS = {"href", "xlink:href", "src", "action", "formaction", "data", "poster", "background", "srcset", "ping"}


class Audit(HTMLParser):
    """What a browser could run or follow: elements, attributes, URLs; the title's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.outside: set[str] = set()
        self.events: list[str] = []
        self.urls: list[str] = []
        self.styles: list[tuple[bool, str]] = []
        self.title = ""
        self._svg = 0
        self._in_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        if tag == "svg":
            self._svg += 1
        if not self._svg:
            self.outside.add(tag)
        self._in_title = tag == "title"
        for k, v in attrs:
            if k.startswith("on"):
                self.events.append(f"<{tag} {k}={v!r}>")
            if k in URL_ATTRS:
                self.urls.append(v or "")
            if k == "style":
                self.styles.append((bool(self._svg), v or ""))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag == "svg":
            self._svg -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg -= 1
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def check_page(text: str, page_dir: Path) -> Audit:
    """No script, no on* attribute, no URL with a scheme (javascript:, data:, http: ...): in-page anchors and
    relative paths of files that exist only; only the builders' elements outside the plots."""
    page = Audit(text)
    assert "<script" not in text.lower()
    assert not page.events, page.events
    assert not FORBIDDEN & set(page.tags), FORBIDDEN & set(page.tags)
    assert page.outside <= FRAME_TAGS, page.outside - FRAME_TAGS
    assert page.tags["meta"] == 2 and page.tags["style"] <= 1 + page.tags["svg"]
    for url in page.urls:
        bare = re.sub(r"[\x00-\x20]", "", url).lower()
        assert urllib.parse.urlsplit(bare).scheme == "" and ":" not in bare.split("/")[0], url
        assert not bare.startswith("//"), url
        if not url.startswith("#"):
            assert (page_dir / urllib.parse.unquote(url)).is_file(), url
    for in_svg, style in page.styles:  # the bars' widths; matplotlib's own styles inside the plots
        assert re.fullmatch(r"width:[0-9]+px", style) or in_svg, style
        assert not re.search(r"url\((?!#)|expression|javascript|@import", style, re.I), style
    return page


# ---------------------------------------------------------------------------------------------- one real run
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (3 evaluations, a spectrum), with a dropped client and a skipped round added to its
    records so that their fields are attacked too."""
    root = tmp_path_factory.mktemp("base")
    cfg = root / "tiny.toml"
    cfg.write_text(TINY_TOML)
    out = root / "run"
    sets = ["eval.every=1", "output.plots=false", "output.tensorboard=false"]
    assert main(["run", str(cfg), "--out", str(out), "--no-progress", *(x for s in sets for x in ("--set", s))]) == 0
    extra = [
        {"type": "client_dropped", "round": 1, "client": 3, "reason": "dropout"},
        {"type": "round_skipped", "round": 2, "valid_updates": 0, "min_clients": 1},
    ]
    with (out / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    return out


def _records(run: Path) -> list[Any]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def write_run(
    base: Path, target: Path, summary: Any, records: list[Any], config: Any, raw: dict[str, str] | None = None
) -> Path:
    """A copy of ``base`` at ``target`` with these contents (``raw``: file name -> text written as it is)."""
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("adapter", "checkpoints", "*.safetensors"))
    (target / "summary.json").write_text(json.dumps(summary))
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (target / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    for name, text in (raw or {}).items():
        (target / name).write_text(text, encoding="utf-8", errors="surrogateescape")
    return target


def render_both(base: Path, hostile: Path) -> None:
    """The hostile run's report, and a comparison of it with a clean run in a directory named
    ``javascript:alert(1)`` (whose link must stay a relative path): both pass :func:`check_page`."""
    root = hostile.parent
    out = write_run_report(hostile, None, root / "run.html")
    page = check_page(out.read_text(encoding="utf-8"), root)
    method = load_run(hostile).method
    if method.isprintable():
        assert page.title == f"fedrank run: {method}", "names are shown (escaped), not dropped"
    js = root / "javascript:alert(1)"
    if not js.exists():
        shutil.copytree(base, js, ignore=shutil.ignore_patterns("adapter", "checkpoints", "*.safetensors"))
    runs: dict[str, list[Path]] = {}
    for d in (hostile, js):
        runs.setdefault(load_run(d).method, []).append(d)
    cmp = write_comparison_report(runs, root / "compare.html")
    page = check_page(cmp.read_text(encoding="utf-8"), root)
    assert "javascript%3Aalert%281%29/report.html" in page.urls


# ---------------------------------------------------------------------------------------------- hypothesis
def mutate(x: Any, rnd: Random, p: float, values: list[Any], keys: list[str]) -> Any:
    """``x`` with each value (a whole record or object too) replaced with probability ``p`` by one of
    ``values``, and each key renamed with probability ``p / 3`` to one of ``keys``."""
    if rnd.random() < p:
        return copy.deepcopy(rnd.choice(values))
    if isinstance(x, dict):
        return {
            (rnd.choice(keys) if rnd.random() < p / 3 else k): mutate(v, rnd, p, values, keys) for k, v in x.items()
        }
    if isinstance(x, list):
        return [mutate(v, rnd, p, values, keys) for v in x]
    return x


def toml_ok(x: Any) -> bool:
    """A value tomli_w writes as TOML (no None, 64-bit ints, no lone surrogates)."""
    if x is None:
        return False
    if isinstance(x, int) and not isinstance(x, bool):
        return -(2**63) <= x < 2**63
    if isinstance(x, str):
        return not any("\ud800" <= c <= "\udfff" for c in x)
    if isinstance(x, list):
        return all(map(toml_ok, x))
    if isinstance(x, dict):
        return all(toml_ok(k) and toml_ok(v) for k, v in x.items())
    return True


extra_values = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.floats(),
        st.integers(-(2**70), 2**70),
        st.lists(st.integers(), max_size=3),
    ),
    max_size=6,
)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: an example takes a second, shrinking takes minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rnd=st.randoms(use_true_random=False),
    p=st.sampled_from([0.05, 0.2, 0.6]),
    extra=extra_values,
    name=st.sampled_from(DIR_NAMES),
    broken=st.sets(st.sampled_from(["summary.json", "config.toml"]), max_size=2),
)
def test_hostile_run_directories_give_pages_without_script(
    base: Path, rnd: Random, p: float, extra: list[Any], name: str, broken: set[str]
) -> None:
    values = HOSTILE_TEXT + HOSTILE_NUMBERS + extra
    keys = HOSTILE_TEXT + [v for v in extra if isinstance(v, str)]
    summary = mutate(json.loads((base / "summary.json").read_text()), rnd, p, values, keys)
    records = [mutate(r, rnd, p, values, keys) for r in _records(base)]  # a line stays a line
    toml_values = [v for v in values if toml_ok(v)]
    toml_keys = [k for k in keys if toml_ok(k)]
    config = mutate(tomllib.loads((base / "config.toml").read_text()), rnd, p, toml_values, toml_keys)
    if not isinstance(config, dict) or not toml_ok(config):
        config = {"method": {"name": rnd.choice(toml_keys)}}
    raw = {f: rnd.choice(HOSTILE_TEXT) for f in broken}  # not JSON / not TOML at all
    with tempfile.TemporaryDirectory() as tmp:
        hostile = write_run(base, Path(tmp) / name, summary, records, config, raw)
        render_both(base, hostile)


# ---------------------------------------------------------------------------------------------- every field
def every_leaf(x: Any, value: Any) -> Any:
    if isinstance(x, dict):
        return {k: every_leaf(v, value) for k, v in x.items()}
    if isinstance(x, list):
        return [every_leaf(v, value) for v in x] or [value]
    return copy.deepcopy(value)


def every_key(x: Any, key: str) -> Any:
    if isinstance(x, dict):
        return {f"{key}{i}": every_key(v, key) for i, (_, v) in enumerate(x.items())}
    if isinstance(x, list):
        return [every_key(v, key) for v in x]
    return x


@pytest.mark.parametrize(
    "value",
    ["<script>alert(1)</script>\x1b[31m$\\frac{$", "1", math.nan, -1e308, [1, [2]]],
    ids=["text", "number-as-text", "nan", "huge", "nested"],
)
def test_every_field_hostile_at_once(base: Path, tmp_path: Path, value: Any) -> None:
    """Every value of the three files at once (keys, record types and rounds kept, so that there is
    something left to draw; hostile rounds and types are the hypothesis test's)."""
    summary = every_leaf(json.loads((base / "summary.json").read_text()), value)
    records = [every_leaf(r, value) | {"type": r["type"], "round": r["round"]} for r in _records(base)]
    config = every_leaf(tomllib.loads((base / "config.toml").read_text()), value if toml_ok(value) else "x")
    render_both(base, write_run(base, tmp_path / DIR_NAMES[0], summary, records, config))


def test_every_name_hostile_at_once(base: Path, tmp_path: Path) -> None:
    """Every key of the three files renamed to a hostile string (task, client, metric and method names)."""
    key = "<img src=x onerror=alert(1)>\x1b]0;x\x07$"
    summary = every_key(json.loads((base / "summary.json").read_text()), key)
    records = [every_key(r, key) | {"type": r["type"], "round": r["round"]} for r in _records(base)]
    for r in (r for r in records if r["type"] == "eval"):
        for group in ("unseen", "participants"):
            r[group] = {key + "t": {"loss": 1.0, "n": 4, key: 0.3}, "javascript:x": {"accuracy": 0.5}}
            r[group + "_avg"] = {"loss": 1.0, key: 0.3}
        r["participant_tasks"] = {"javascript:x": [key, "javascript:alert(1)"]}
    config = every_key(tomllib.loads((base / "config.toml").read_text()), key) | {"method": {"name": key}}
    render_both(base, write_run(base, tmp_path / "run", summary, records, config))


def test_files_that_are_not_what_they_claim(base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """summary.json nested a million deep, a list, or not UTF-8; config.toml not TOML or nested 100 deep;
    records that are not objects: the report is written from what is left, with a warning."""
    records: list[Any] = [[1], "x", None, *_records(base)]
    for i, (summary_text, config_text) in enumerate(
        (
            ("[" * 1_000_000 + "]" * 1_000_000, "a = " + "[" * 100 + "]" * 100),
            ("[1, 2]", "[method\nname = <script>"),
            ("\udcff{", "a." * 200 + "b = 1"),
        )
    ):
        run = write_run(base, tmp_path / f"run{i}", {}, records, {})
        (run / "summary.json").write_text(summary_text, encoding="utf-8", errors="surrogateescape")
        (run / "config.toml").write_text(config_text)
        with caplog.at_level(logging.WARNING, logger="fedrank"):
            render_both(base, run)
        assert "left out" in caplog.text
        caplog.clear()


# ---------------------------------------------------------------------------------------------- the builders
def test_html_builders_escape_and_refuse() -> None:
    assert el("b", "<i>") == "<b>&lt;i&gt;</b>"
    assert el("b", "x") + "<i>" == "<b>x</b>&lt;i&gt;", "Html + str escapes the str"
    assert "<i>" + el("b", "x") == "&lt;i&gt;<b>x</b>"
    assert el("span", "x", cls='" onclick="y') == '<span class="&quot; onclick=&quot;y">x</span>'
    with pytest.raises(ValueError):
        el("a", "x", onclick="alert(1)")
    with pytest.raises(ValueError):
        el("script", "alert(1)")
    with pytest.raises(TypeError):
        el("a", "x", href="javascript:alert(1)")
    with pytest.raises(ValueError):
        el("div", style="background:url(javascript:alert(1))")
    with pytest.raises(ValueError):
        anchor('x" onclick="y')
    assert el("a", "x", href=anchor("config")) == '<a href="#config">x</a>'
    assert [num(x) for x in ("1", math.nan, math.inf, True, None, [1], 10**400)] == ["–"] * 7
    assert num(0.5) == "0.5000" and num(-1, "+.2f") == "-1.00" and fmt(2**70, "d") == str(2**70)


def test_links_are_relative_file_paths(tmp_path: Path) -> None:
    for name in ("javascript:alert(1)", "JAVASCRIPT:x", "data:text/html,<script>", "http:evil", "a?b#c", "%3A"):
        href = file_href(tmp_path / name / "report.html", tmp_path)
        assert isinstance(href, Href)
        assert urllib.parse.urlsplit(href).scheme == "" and ":" not in href
        assert urllib.parse.unquote(href) == f"{name}/report.html"
    assert file_href(tmp_path / "a" / "report.html", tmp_path / "b") == "../a/report.html"


# ---------------------------------------------------------------------------------------------- terminal, plots
def test_safe_name_escapes_control_characters_and_shortens() -> None:
    assert safe_name("flexlora") == "flexlora"
    assert safe_name("a\x1b[31mb\nc\rd\te\x00") == "a\\x1b[31mb\\nc\\rd\\te\\x00"
    assert safe_name("\x1b]0;title\x07") == "\\x1b]0;title\\x07"
    assert safe_name("\u202eexe.txt") == "\\u202eexe.txt"
    assert safe_name("\ud800") == "\\ud800"
    assert safe_name("x" * 81) == "x" * 79 + "…" and len(safe_name("x" * 10_000, 20)) == 20
    assert safe_name("\n" * 50, 9) == "\\n" * 4 + "…"
    assert safe_name(3) == "3"


@given(st.text(), st.integers(1, 200))
@settings(max_examples=200, deadline=None, database=None)
def test_safe_name_is_printable_and_short(text: str, most: int) -> None:
    out = safe_name(text, most)
    assert out.isprintable() and len(out) <= most
    if text.isprintable() and len(text) <= most:
        assert out == text


@given(st.lists(st.text(), min_size=1, max_size=4))
@settings(max_examples=200, deadline=None, database=None)
def test_tensorboard_tags_are_safe(parts: list[str]) -> None:
    tag = tb_tag(*parts)
    assert re.fullmatch(r"[A-Za-z0-9_./-]+", tag) and tag.count("/") == len(parts) - 1


def test_tensorboard_tags_of_hostile_names(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedrank.report import write_tensorboard

    bad = "<script>\x1b[31m/../x y$\\frac{$"
    assert tb_tag("eval_unseen", bad, "loss") == "eval_unseen/_script___31m_.._x_y__frac__/loss"
    metrics = {"loss": 1.0, bad: 0.5, "n": 4}
    rec = {"type": "eval", "round": 0, "unseen": {bad: metrics}, "participants": {"3": metrics}, "seconds": 1.0}
    write_tensorboard([rec | {"unseen_avg": metrics, "participants_avg": {}}], tmp_path / "tb", [2, 4])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert tags and all(re.fullmatch(r"[A-Za-z0-9_./-]+", t) for t in tags), tags
    assert "eval_unseen/_script___31m_.._x_y__frac__/loss" in tags


def test_mathtext_names_do_not_stop_the_plots() -> None:
    curves = {("unseen_avg", "$\\frac{$"): {0: [1.0], 1: [0.5]}, ("unseen_avg", "loss"): {0: [2.0], 1: [1.0]}}
    fig = eval_figure({"$\\frac{$": curves, "$x$": curves})
    assert fig is not None
    try:
        fig.savefig(io.BytesIO(), format="png")
        labels = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
        assert plot_label("$\\frac{$") in labels and plot_label("$\\frac{$") == "\\$\\frac{\\$"
    finally:
        close({"f": fig})


def test_end_of_run_table_and_comparison_md_print_safely(base: Path, tmp_path: Path) -> None:
    summary = json.loads((base / "summary.json").read_text())
    summary |= {"seen_by": "\x1b[2J", "clients_left_out": {"client_\x1b[31m": 1}, "unseen_after": {"loss": "x"}}
    summary["time_split"] = {"total": "<b>", "load": math.nan}
    table = end_of_run_table(summary)
    assert "\x1b" not in table and "seen (" in table
    assert all(line.isprintable() for line in table.splitlines())
    name = "\x1b[31mevil|method\n"
    run = write_run(base, tmp_path / "run", summary, _records(base), {"method": {"name": name}})
    md, _ = comparison({load_run(run).method: [run]}, tmp_path / "cmp")
    text = md.read_text()
    assert "\x1b" not in text and "\\x1b[31mevil\\|method\\n" in text
    assert all(line.isprintable() for line in text.splitlines())


def test_the_checks_keep_a_real_run_whole(base: Path) -> None:
    """Nothing the simulator writes is left out by the checks."""
    records = _records(base)
    kept = clean_records(records)
    assert len(kept) == len(records)
    for r, k in zip(records, kept):
        for key, v in k.items():
            if key in r:
                assert v == r[key] or (isinstance(v, float) and math.isnan(v) and r[key] is None), key
    summary = json.loads((base / "summary.json").read_text())
    cleaned = clean_summary(summary)
    assert {k: v for k, v in summary.items() if k in cleaned} == cleaned
    assert set(summary) - set(cleaned) <= {"data"}


def test_cli_prints_names_with_control_characters_escaped(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedrank.cli import _print_outputs

    summary = json.loads((base / "summary.json").read_text())
    summary |= {"held_out": ["\x1b[31mred"], "unseen_tasks": ["a\nb"], "seen_clients": {"3": ["\x1b]0;t\x07"]}}
    _print_outputs(summary, base)
    run = write_run(base, tmp_path / "\x1b[31mred", json.loads((base / "summary.json").read_text()), _records(base), {})
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out and "a\\nb" in out and "\\x1b]0;t\\x07" in out


def test_mean_std_of_values_too_large_to_square_is_inf_not_an_error() -> None:
    """Found by the hypothesis test above: two seeds' metrics of ±1e308 raised OverflowError in the comparison."""
    from fedrank.report import mean_std

    assert mean_std([1e308, -1e308]) == (0.0, math.inf)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
