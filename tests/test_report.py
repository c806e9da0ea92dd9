"""What a person opens: report.html of a run and of a comparison (parsed, numbers checked against summary.json,
nothing fetched from elsewhere, rendered by a headless Chromium), the plots' labels and bands, TensorBoard."""

from __future__ import annotations

import html
import importlib.util
import json
import shutil
import statistics
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedrank.cli import _print_outputs, main
from fedrank.config import ConfigError, load_config
from fedrank.report import close, eval_curves, eval_figure, load_run
from test_simulation import TINY, records

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


class Page(HTMLParser):
    """The parts of a page the tests look at: tables by id (cell texts), section ids, every src/href, tags."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.tags: Counter[str] = Counter()
        self.pre: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_pre = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v is not None]
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if tag == "section":
            self.sections.append(str(a.get("id")))
        elif tag == "table":
            self._table = str(a.get("id") or f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
            self.tables[self._table].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = self._row = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre[-1] += data

    def body(self, table: str) -> list[list[str]]:
        return self.tables[table][1:]


def check_self_contained(text: str, page: Page) -> None:
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["iframe"] == 0
    assert page.urls, "the page links its sections"
    external = [u for u in page.urls if u.startswith(("http", "//")) or "://" in u or "//" in u]
    assert not external, f"external URLs: {external}"
    assert "@import" not in text and "url(http" not in text and "url(//" not in text
    assert len(page.ids) == len(set(page.ids)), "the inline SVGs' ids collide"


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    p.write_text(TINY)
    return p


@pytest.fixture(scope="module")
def run_dir(cfg_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    sets = ["eval.every=1", "federation.rounds=3", "output.plots=true", f"output.tensorboard={HAS_TENSORBOARD}".lower()]
    assert (
        main(["run", str(cfg_file), "--out", str(out), "--no-progress", *(x for s in sets for x in ("--set", s))]) == 0
    )
    return out


@pytest.fixture(scope="module")
def cmp_dir(cfg_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    args = ["compare", str(cfg_file), "--methods", "flexlora,fedit", "--seeds", "0,1", "--out", str(out)]
    assert main([*args, "--no-progress", "--set", "eval.every=1"]) == 0
    return out


def test_run_report_has_the_sections_and_the_numbers_of_summary_json(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text()
    page = Page(text)
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = records(run_dir)
    check_self_contained(text, page)
    assert all(u.startswith("#") for u in page.urls)
    assert page.sections == ["evaluation", "rounds", "ranks", "wall-time", "config"]
    assert summary["report"] == str(run_dir / "report.html")

    # before -> after per split with n: the console table's rows, equal to summary.json
    split, seen = "", set()
    for label, metric, before, after, change, n in page.body("eval-summary"):
        split = label.split()[0] if label else split
        assert float(before) == pytest.approx(summary[f"{split}_before"][metric], abs=5e-5)
        assert float(after) == pytest.approx(summary[f"{split}_after"][metric], abs=5e-5)
        assert float(change) == pytest.approx(summary[f"{split}_change"][metric], abs=5e-5)
        if label:
            assert int(n) == summary[f"{split}_examples"]
        seen.add((split, metric))
    assert seen == {(s, m) for s in ("unseen", "seen") for m in summary[f"{s}_after"] if m != "perplexity"}

    # per task (unseen) and per participant (seen): the first and last evaluations, with n
    evals = [r for r in recs if r["type"] == "eval"]
    tasks = page.body("eval-tasks")
    assert [r[1] for r in tasks if r[0] == "unseen"] == summary["unseen_tasks"]
    assert len([r for r in tasks if r[0] == "seen"]) == len(summary["seen_clients"])
    head = page.tables["eval-tasks"][0]
    for row in tasks:
        key = "unseen" if row[0] == "unseen" else "participants"
        who = row[1] if key == "unseen" else row[1].split(":")[0].removeprefix("client ")
        first, last = evals[0][key][who], evals[-1][key][who]
        assert int(row[2]) == last["n"]
        b, a = row[head.index("loss before → after")].split(" → ")
        assert (float(b), float(a)) == (pytest.approx(first["loss"], abs=5e-5), pytest.approx(last["loss"], abs=5e-5))

    rounds = [r for r in recs if r["type"] == "round"]
    body = page.body("rounds-table")
    assert [int(r[0]) for r in body] == [1, 2, 3]
    assert [float(r[3]) for r in body] == pytest.approx([r["train_loss"] for r in rounds], abs=5e-5)
    assert float(body[-1][3]) == pytest.approx(summary["final_train_loss"], abs=5e-5)
    assert [float(r[4]) for r in body] == pytest.approx([r["up_bytes"] / 2**20 for r in rounds], abs=5e-4)
    assert [float(r[7]) for r in body] == pytest.approx([r["aggregate_seconds"] for r in rounds], abs=5e-4)

    assert {r[0]: int(r[1]) for r in page.body("ranks-table")} == summary["rank_counts"]
    parts = {r[0]: float(r[1]) for r in page.body("wall-time-table")}
    assert parts["model load"] == pytest.approx(summary["load_seconds"], abs=5e-3)
    assert parts["total"] == pytest.approx(summary["load_seconds"] + summary["seconds"], abs=2e-2)
    assert parts["client training"] == pytest.approx(sum(r["train_seconds"] for r in rounds), abs=5e-3)
    assert page.pre == [(run_dir / "config.toml").read_text()]

    # the plots are inline SVG, with the metric and split on their axes and the base model as a reference
    assert page.tags["svg"] == 6 and page.tags["img"] == 0
    plain = html.unescape(text)
    for label in ("unseen loss", "seen loss", "base model (round 0)", "train loss", "MiB per round", "LoRA rank"):
        assert f">{label}" in plain
    assert sorted(Path(p).name for p in summary["plots"]) == sorted(
        f"{n}.png" for n in ("eval", "train_loss", "communication", "time", "ranks", "spectrum")
    )


def test_end_of_run_output_names_the_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    _print_outputs(summary, run_dir)
    out = capsys.readouterr().out
    assert f"report:   {run_dir / 'report.html'}" in out and "group" in out and f"plots:    {run_dir / 'plots'}" in out
    assert f"adapter:  {summary['adapter']}" in out


def test_comparison_report_has_mean_and_std_over_seeds(cmp_dir: Path) -> None:
    text = (cmp_dir / "report.html").read_text()
    page = Page(text)
    check_self_contained(text, page)
    assert page.sections == ["methods", "curves", "wall-time", "runs", "config"]
    for split in ("unseen", "seen"):
        table = page.tables[f"methods-{split}"]
        head = table[0]
        assert [r[0] for r in table[1:]] == ["flexlora", "fedit"]
        for row in table[1:]:
            assert row[1] == "2"
            sums = [json.loads((cmp_dir / row[0] / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
            for metric in sums[0][f"{split}_after"]:
                if metric == "perplexity":
                    continue
                for col, key in ((metric, f"{split}_after"), (f"{metric} change", f"{split}_change")):
                    xs = [s[key][metric] for s in sums]
                    assert row[head.index(col)] == f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"
    cost = page.tables["methods-cost"]
    for row in cost[1:]:
        ups = [json.loads((cmp_dir / row[0] / f"seed{s}" / "summary.json").read_text())["up_bytes"] for s in (0, 1)]
        assert (
            row[cost[0].index("up MiB")] == f"{statistics.mean(ups) / 2**20:.3f} ± {statistics.stdev(ups) / 2**20:.3f}"
        )
    # every run is listed and linked by a relative path to its own report
    links = [u for u in page.urls if not u.startswith("#")]
    assert len(links) == 4 and all((cmp_dir / u).is_file() for u in links)
    assert "seed" in page.tables["config-diff"][0] and "method.name" in page.tables["config-diff"][0]
    plain = html.unescape(text)
    for label in ("flexlora (mean ± std, 2 seeds)", "fedit (mean ± std, 2 seeds)", "base model (round 0)"):
        assert label in plain
    assert page.tags["svg"] == 2


def test_comparison_plot_labels_bands_styles_and_base_line(cmp_dir: Path) -> None:
    runs = {m: [load_run(cmp_dir / m / f"seed{s}") for s in (0, 1)] for m in ("flexlora", "fedit")}
    fig = eval_figure({m: eval_curves([r.records for r in rs]) for m, rs in runs.items()})
    assert fig is not None
    try:
        labels = {ax.get_ylabel() for ax in fig.axes if ax.axison}
        assert {"unseen loss", "seen loss", "unseen accuracy"} <= labels
        for ax in fig.axes:
            if not ax.axison:
                continue
            lines = {ln.get_label(): ln for ln in ax.get_lines()}
            assert set(lines) == {
                "flexlora (mean ± std, 2 seeds)",
                "fedit (mean ± std, 2 seeds)",
                "base model (round 0)",
            }
            a, b = lines["flexlora (mean ± std, 2 seeds)"], lines["fedit (mean ± std, 2 seeds)"]
            assert (a.get_marker(), a.get_linestyle()) != (b.get_marker(), b.get_linestyle())
            assert len(ax.collections) == 2, "one ± std band per method"
            assert ax.get_xlabel() == "round"
    finally:
        close({"f": fig})
    assert (cmp_dir / "comparison.png").is_file()


def test_report_command_writes_html_for_a_run_and_for_several(run_dir: Path, cmp_dir: Path, tmp_path: Path) -> None:
    one = tmp_path / "one.html"
    assert main(["report", str(run_dir), "--html", str(one)]) == 0
    assert Page(one.read_text()).sections == ["evaluation", "rounds", "ranks", "wall-time", "config"]
    many = tmp_path / "many.html"
    dirs = [str(cmp_dir / m / f"seed{s}") for m in ("flexlora", "fedit") for s in (0, 1)]
    assert main(["report", *dirs, "--html", str(many)]) == 0
    page = Page(many.read_text())
    assert page.sections[0] == "methods" and [r[0] for r in page.body("methods-unseen")] == ["flexlora", "fedit"]
    assert all((tmp_path / u).is_file() for u in page.urls if not u.startswith("#"))


def test_a_run_without_plots_still_writes_its_report(cfg_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(cfg_file), "--out", str(out), "--no-progress", "--set", "federation.rounds=1"]) == 0
    page = Page((out / "report.html").read_text())
    assert page.tags["svg"] == 0 and "eval-summary" in page.tables and not (out / "plots").exists()


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_chromium_renders_the_reports(run_dir: Path, cmp_dir: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    browser = _chromium()
    assert browser is not None
    for name, report in (("run", run_dir / "report.html"), ("compare", cmp_dir / "report.html")):
        shot = tmp_path / f"{name}.png"
        proc = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1280,3000",
                f"--screenshot={shot}",
                report.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert shot.is_file(), proc.stderr[-2000:]
        img = imread(shot)
        assert img.shape[:2] == (3000, 1280)
        assert img[..., :3].std() > 0.05, "the screenshot is blank"


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_event_files_have_the_scalars(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    recs = records(run_dir)
    rounds = [r for r in recs if r["type"] == "round"]
    evals = [r for r in recs if r["type"] == "eval"]

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("train/loss") == [(r["round"], pytest.approx(r["train_loss"])) for r in rounds]
    assert series("comm/up_MiB") == [(r["round"], pytest.approx(r["up_bytes"] / 2**20)) for r in rounds]
    assert series("seconds/aggregation") == [(r["round"], pytest.approx(r["aggregate_seconds"])) for r in rounds]
    assert series("seconds/evaluation") == [(e["round"], pytest.approx(e["seconds"])) for e in evals]
    for key, split in (("unseen_avg", "unseen"), ("participants_avg", "seen")):
        assert series(f"eval/{split}/loss") == [(e["round"], pytest.approx(e[key]["loss"])) for e in evals]
    assert [s for s, _ in series("eval/unseen/loss")] == [0, 1, 2, 3]
    assert {"spectrum/effective_rank", "comm/down_MiB", "seconds/client_training"} <= set(tags["scalars"])
    (hist,) = acc.Histograms("clients/rank")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [int(c) for c in hist.histogram_value.bucket] == list(summary["rank_counts"].values())
    assert [lim - 0.5 for lim in hist.histogram_value.bucket_limit] == [int(k) for k in summary["rank_counts"]]
    assert summary["tensorboard"] == str(run_dir / "tensorboard")


def test_tensorboard_without_the_package_is_refused_when_the_config_loads(
    cfg_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"fedrank\[tensorboard\]"):
        load_config(cfg_file, ["output.tensorboard=true"])


def test_summary_and_end_of_run_output_split_the_wall_time_and_give_the_peak_rss(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """summary.json's time_split: data (opening the data and partitioning), load, train (the rounds' training
    wall time, which holds the client records' seconds), aggregate (the round records'),
    evaluate (the eval records'), other and the total (= the run's seconds + data + the model load); the end-of-run
    output prints it with the peak RSS."""
    from fedrank.report import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    split, records = summary["time_split"], read_metrics(run_dir / "metrics.jsonl")
    assert split["load"] == pytest.approx(summary["load_seconds"], abs=1e-3)
    assert split["data"] == pytest.approx(summary["data_seconds"], abs=1e-3) and split["data"] > 0
    assert split["train"] == pytest.approx(sum(r["train_seconds"] for r in records if r["type"] == "round"), abs=1e-2)
    own = sum(r["seconds"] for r in records if r["type"] == "client")
    assert own <= split["train"] and "clients" not in split  # in process the clients' training is the wait
    assert split["aggregate"] == pytest.approx(
        sum(r["aggregate_seconds"] for r in records if r["type"] == "round"), abs=1e-2
    )
    assert split["evaluate"] == pytest.approx(sum(r["seconds"] for r in records if r["type"] == "eval"), abs=1e-2)
    total = summary["seconds"] + summary["load_seconds"] + summary["data_seconds"]
    assert split["total"] == pytest.approx(total, abs=1e-2)
    parts = ("data", "load", "train", "aggregate", "evaluate", "other")
    assert sum(split[k] for k in parts) == pytest.approx(split["total"], abs=1e-2)
    assert 50 * 2**20 < summary["peak_rss_bytes"] < 64 * 2**30
    _print_outputs(summary, run_dir)
    out = capsys.readouterr().out
    assert f"wall time {split['total']:.0f} s: data {split['data']:.0f} s, load {split['load']:.0f} s, train" in out
    assert f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB" in out


def test_time_split_counts_the_wait_for_remote_clients_as_training(capsys: pytest.CaptureFixture[str]) -> None:
    """On Flower the nodes train at once and each message starts a process: the round's training is the wall
    time the server waited (16 s and 14 s here), not the 1 s each node reports; that part is shown beside it.
    Records written before train_seconds existed fall back to the clients' sum."""
    from fedrank.report import CLIENTS_OWN, clean_records, time_split, time_split_summary

    def rnd(t: int, wall: float | None) -> dict[str, object]:
        r = {"type": "round", "round": t, "clients": 2, "train_loss": 1.0, "up_bytes": 8, "down_bytes": 8}
        r |= {"aggregate_seconds": 0.5, "seconds": wall + 1.0 if wall else 2.5, "spectrum": {}}
        return r | ({"train_seconds": wall} if wall else {})

    clients = [{"type": "client", "round": t, "client": c, "rank": 4, "seconds": 1.0} for t in (1, 2) for c in (0, 1)]
    summary = {"seconds": 40.0, "load_seconds": 3.0, "data_seconds": 1.0}
    split = dict(time_split(clean_records([*clients, rnd(1, 16.0), rnd(2, 14.0)]), summary))
    assert split["client training"] == 30.0 and split[CLIENTS_OWN] == 4.0
    assert split["aggregation"] == 1.0 and split["other: validation, spectrum, checkpoints, export"] == 9.0
    assert split["total"] == 44.0  # the clients' own seconds are inside client training, not added to it
    old = dict(time_split(clean_records([*clients, rnd(1, None), rnd(2, None)]), summary))
    assert old["client training"] == 4.0 and CLIENTS_OWN not in old
    s = time_split_summary(clean_records([*clients, rnd(1, 16.0), rnd(2, 14.0)]), summary)
    assert s["train"] == 30.0 and s["clients"] == 4.0 and s["total"] == 44.0
    from fedrank.report import end_of_run_table

    text = end_of_run_table({"method": "fedit", "rounds": 2, "time_split": s})
    assert "train 30 s (the clients' own training 4 s)" in text
