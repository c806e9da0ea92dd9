"""``fedrank study``: the driver plans, skips, resumes and aggregates correctly (tiny model), and its intervals
are right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedrank.cli import main
from fedrank.study import (
    Ledger,
    load_study,
    mean_interval,
    paired_interval,
    plan_fallbacks,
    plan_seeds,
    plan_tuning,
    recheck,
)
from helpers import TINY_TOML


def test_mean_interval_matches_a_textbook_case() -> None:
    """x = 1..5: mean 3, s = √2.5, t_{0.975, 4} = 2.776445 → 3 ± 1.963243 (e.g. NIST/SEMATECH §1.3.5.2)."""
    m, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0
    assert hi - m == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert m - lo == pytest.approx(1.963243, rel=1e-6)
    assert mean_interval([2.0]) == (2.0, -math.inf, math.inf)  # one seed: no interval
    assert all(math.isnan(x) for x in mean_interval([]))
    # paired: the interval of the per-seed differences, over the seeds both have
    d, dlo, dhi, n = paired_interval({1: 1.0, 2: 2.0, 3: 4.0, 4: 9.0}, {1: 0.5, 2: 1.0, 3: 3.0})
    assert n == 3 and d == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert (dlo, dhi) == pytest.approx(mean_interval([0.5, 1.0, 1.0])[1:])


def _study(tmp_path: Path, **extra: str) -> Path:
    table = {
        "name": '"tiny"',
        "methods": '["flexlora", "hetlora"]',
        "lr_grid": "[0.01, 1e6]",  # 1e6: every client's model collapses (diverged, never a result)
        "seeds": "[1, 2]",
        "out": f'"{tmp_path / "runs"}"',
        "results": f'"{tmp_path / "results"}"',
        **extra,
    }
    lines = ["[study]", *[f"{k} = {v}" for k, v in table.items()]]
    path = tmp_path / "study.toml"
    path.write_text(TINY_TOML + "\n" + "\n".join(lines) + "\n")
    return path


def test_study_config_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", str(_study(tmp_path, methods='["flexlora", "flexlora@max"]'))]) == 2
    assert "homogeneous method at the largest rank" in capsys.readouterr().err
    assert main(["study", str(_study(tmp_path, tune_seed="1"))]) == 2
    assert "tune_seed" in capsys.readouterr().err
    study, cfg = load_study(_study(tmp_path, methods='["fedit", "fedit@max", "fslora"]'))
    tune = plan_tuning(study, cfg, tmp_path)
    assert {j.lr for j in tune if j.variant == "fslora"} == {3e-3, 1e-2, 3e-2}  # SGD's own grid (its preset)
    assert {j.lr for j in tune if j.variant == "fedit"} == {0.01, 1e6}
    jobs = {j.variant: j.cfg for j in tune if j.lr == 0.01}
    assert jobs["fedit"].ranks.choices == (2, 4) and jobs["fedit"].ranks.distribution == "fixed"  # at r_min
    assert jobs["fedit@max"].ranks.choices == (4,)
    assert jobs["fslora"].train.optimizer == "sgd" and jobs["fslora"].train.lr == 0.01  # preset, then the grid
    seeds = plan_seeds(study, cfg, tmp_path, {"fedit": 0.01, "fslora": 0.01})
    assert {(j.variant, j.seed) for j in seeds} == {(v, s) for v in ("fedit", "fslora") for s in (1, 2)}
    assert {j.cfg.partition.seed for j in seeds} == {1, 2}  # each seed redraws the data
    # under two rank distributions a homogeneous variant's run is the same run: planned once, shown under both
    study, cfg = load_study(_study(tmp_path, methods='["fedit", "fslora"]', distributions='["uniform", "normal"]'))
    seeds = plan_seeds(study, cfg, tmp_path, {"fedit": 0.01, "fslora": 0.01})
    paths = {(j.variant, j.distribution, j.seed): j.path for j in seeds}
    assert paths[("fedit", "normal", 1)] == paths[("fedit", "uniform", 1)] == tmp_path / "uniform" / "fedit" / "seed1"
    assert paths[("fslora", "normal", 1)] == tmp_path / "normal" / "fslora" / "seed1"  # its ranks differ
    assert len({j.key for j in seeds}) == 6 and len(seeds) == 8


@pytest.mark.slow
def test_study_tunes_skips_resumes_and_aggregates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _study(tmp_path, keep_checkpoints="true")  # (the second sitting cuts a finished run back to round 1)
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["study", str(path), "--no-progress"]) == 0
    ledger = json.loads((runs / "study.json").read_text())["runs"]
    # 2 variants x 2 rates, then 2 x 2 seeds, then hetlora's fold ablation x 2 seeds
    assert len(ledger) == 10
    assert {ledger[str(runs / "tune" / v / "lr1e+06")]["status"] for v in ("flexlora", "hetlora")} == {"diverged"}
    chosen = {e["variant"]: e["lr"] for e in ledger.values() if e["phase"] == "seed"}
    assert chosen == {"flexlora": 0.01, "hetlora": 0.01}  # the diverged rate is never chosen
    assert "study: chosen rates (lowest seen answer loss): flexlora 0.01, hetlora 0.01" in capsys.readouterr().err
    md = (results / "results.md").read_text()
    assert "| flexlora | 0.0100 | 2 |" in md and "| hetlora+fold | 0.0100 | 2 |" in md
    assert "| zero-shot |  | 2 |" in md
    assert "tune/flexlora/lr1e+06`: diverged" in md
    rows = json.loads((results / "results.json").read_text())["rows"]
    flex = next(r for r in rows if r["variant"] == "flexlora")
    het = next(r for r in rows if r["variant"] == "hetlora")
    summaries = {
        s: json.loads((runs / "uniform" / "flexlora" / f"seed{s}" / "summary.json").read_text()) for s in (1, 2)
    }
    want = [summaries[s]["unseen_after"]["loss"] for s in (1, 2)]
    assert flex["unseen.loss"] == pytest.approx(list(mean_interval(want)))
    hs = [json.loads((runs / "uniform" / "hetlora" / f"seed{s}" / "summary.json").read_text()) for s in (1, 2)]
    diffs = [h["unseen_after"]["loss"] - f for h, f in zip(hs, want)]
    assert het["Δflexlora.unseen.loss"][:3] == pytest.approx(list(mean_interval(diffs)))
    for name in ("results.csv", "runs.csv", "rounds.png", "collapse.png", "report.html"):
        assert (results / name).is_file(), name
    # the report names every seed run but links none: the committed results folder travels without runs/
    page = (results / "report.html").read_text()
    assert (runs / "uniform" / "flexlora" / "seed1" / "report.html").is_file()
    assert "uniform/flexlora/seed1" in page and "seed1/report.html" not in page

    # a second sitting: finished runs are kept, an interrupted one resumes from its checkpoint, diverged runs
    # are not retried, and the results are the same
    finished = runs / "uniform" / "flexlora" / "seed1"
    interrupted = runs / "uniform" / "hetlora" / "seed2"
    mtime = (finished / "summary.json").stat().st_mtime_ns
    before = json.loads((interrupted / "summary.json").read_text())["unseen_after"]
    (interrupted / "summary.json").unlink()
    for ck in sorted((interrupted / "checkpoints").glob("round-*.safetensors"))[1:]:
        ck.unlink()
    entries = json.loads((runs / "study.json").read_text())
    del entries["runs"][str(interrupted)]
    (runs / "study.json").write_text(json.dumps(entries))
    capsys.readouterr()
    assert main(["study", str(path), "--no-progress"]) == 0
    assert (finished / "summary.json").stat().st_mtime_ns == mtime
    assert json.loads((interrupted / "summary.json").read_text())["unseen_after"] == pytest.approx(before)
    ledger2 = Ledger(runs / "study.json").runs
    assert ledger2[str(interrupted)]["how"] == "resumed"
    assert ledger2[str(runs / "tune" / "flexlora" / "lr1e+06")]["status"] == "diverged"

    def tables(text: str) -> list[str]:  # all but the compute line (the resumed run's seconds are new)
        return [line for line in text.splitlines() if not line.startswith("- compute:")]

    assert tables((results / "results.md").read_text()) == tables(md)


def test_a_finished_run_with_a_client_beyond_uniform_becomes_diverged(tmp_path: Path) -> None:
    """Runs an earlier fedrank finished, with a client whose loss went beyond ln V kept in: the study marks them
    diverged when it starts or aggregates (never a result); V from the summary, else from the model, once."""
    runs = {}
    for name, vocab in (("recorded", {"vocab_size": 49152}), ("old", {})):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(vocab))
        client = {"type": "client", "round": 2, "client": 24, "first_loss": 1.93, "last_loss": 48.92}
        healthy = {**client, "client": 7, "last_loss": 1.2}
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (healthy, client)))
        runs[str(run)] = {"status": "done", "variant": "fslora"}
    (tmp_path / "study.json").write_text(json.dumps({"runs": runs}))
    ledger = Ledger(tmp_path / "study.json")
    asked: list[int] = []
    recheck(ledger, lambda: asked.append(1) or 49152)
    saved = Ledger(tmp_path / "study.json").runs
    assert {k: v["status"] for k, v in saved.items()} == dict.fromkeys(runs, "diverged")
    assert all(
        "client 24 (round 2): diverged: loss 1.930 -> 48.920, above ln(vocab) = 10.803" in v["reason"]
        for v in saved.values()
    )
    assert asked == [1]  # only the run without a recorded V asked, once


def test_a_finished_run_whose_global_model_is_worse_than_uniform_becomes_diverged(tmp_path: Path) -> None:
    """No client went beyond ln V, but the aggregate did (S1's hetlora+fold seed 2: seen loss 5.38 -> 22.1 over
    the run): the run is diverged, never a result (:func:`fedrank.local.beyond_uniform`, from the round-0
    evaluation to the last). A loss just below ln V, a model that never knew more than uniform (a random-weight
    model's loss sits around ln V), or a run without evaluations stays done."""
    ln_v = math.log(49152)  # 10.803
    finals = {
        "seen_above": {"seen_before": {"loss": 5.38}, "seen_after": {"loss": 22.148}},
        "unseen_above": {"unseen_before": {"loss": 4.29}, "unseen_after": {"loss": ln_v + 0.01}},
        "nan": {"seen_before": {"loss": 4.0}, "seen_after": {"loss": float("nan")}},
        "below": {"seen_before": {"loss": 4.0}, "seen_after": {"loss": ln_v - 0.01}},
        "uninformed": {"seen_before": {"loss": ln_v + 0.2}, "seen_after": {"loss": ln_v + 0.5}},
        "no_eval": {},
    }
    runs = {}
    for name, summary in finals.items():
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"vocab_size": 49152, **summary}))
        client = {"type": "client", "round": 2, "client": 7, "first_loss": 4.2, "last_loss": 3.9}
        (run / "metrics.jsonl").write_text(json.dumps(client) + "\n")
        runs[str(run)] = {"status": "done", "variant": "hetlora"}
    (tmp_path / "study.json").write_text(json.dumps({"runs": runs}))
    ledger = Ledger(tmp_path / "study.json")
    recheck(ledger, lambda: pytest.fail("V is recorded"))
    status = {Path(k).name: v["status"] for k, v in Ledger(tmp_path / "study.json").runs.items()}
    want = dict.fromkeys(["seen_above", "unseen_above", "nan"], "diverged")
    assert status == {**want, "below": "done", "uninformed": "done", "no_eval": "done"}
    reason = ledger.runs[str(tmp_path / "seen_above")]["reason"]
    assert reason == (
        "global model: seen answer loss 5.380 -> 22.148 over the run, above ln(vocab) = 10.803: worse than "
        "uniform predictions"
    )


def test_a_finished_run_keeps_no_checkpoints_unless_asked(tmp_path: Path) -> None:
    """A study of hundreds of runs would fill a disk with round checkpoints (a dense-state run's are ~1 GiB on
    SmolLM2): once a run's summary is written its checkpoints go (it is kept by its summary), and a second
    sitting still keeps it; ``keep_checkpoints = true`` keeps them."""
    from fedrank import run_dir as rd

    for keep in ("false", "true"):
        base = tmp_path / keep
        base.mkdir()
        path = _study(base, methods='["fedit"]', lr_grid="[0.01]", seeds="[1]", keep_checkpoints=keep)
        assert main(["study", str(path), "--no-progress"]) == 0
        runs = [base / "runs" / "tune" / "fedit" / "lr0.01", base / "runs" / "uniform" / "fedit" / "seed1"]
        assert all((r / rd.SUMMARY).is_file() for r in runs)
        assert all(bool(rd.checkpoints(r)) == (keep == "true") for r in runs)
    assert main(["study", str(path), "--no-progress"]) == 0  # kept, not rerun
    ledger = Ledger(tmp_path / "true" / "runs" / "study.json").runs
    assert {e["how"] for e in ledger.values()} == {"kept"}


def test_the_stability_rule_reruns_a_variant_that_diverged_on_most_seeds_at_its_best_stable_lower_rate(
    tmp_path: Path,
) -> None:
    """S1's FSLoRA: its tuned rate (the top of its grid) finished at the tuning seed and diverged at the seeds.
    More than half of a variant's seed runs diverged -> it is run again at the best grid rate below the chosen
    one that finished at tuning; half, or nothing stable below, -> not."""
    variants, distributions = '["fedit", "fslora", "hetlora"]', '["uniform", "normal"]'
    study, cfg = load_study(_study(tmp_path, methods=variants, distributions=distributions, seeds="[1, 2, 3]"))
    rates = {"fedit": 0.01, "fslora": 3e-2, "hetlora": 1e6}
    grid = {
        "fedit": {0.01: 2.0, 1e6: math.nan},
        "fslora": {3e-3: 2.7, 1e-2: 2.4, 3e-2: 2.3},
        "hetlora": {0.01: 2.5, 1e6: 2.0},
    }
    seeds = [j for j in plan_seeds(study, cfg, tmp_path, rates) if j.phase == "seed"]
    ledger = Ledger(tmp_path / "study.json")
    fslora = sorted({j.key for j in seeds if j.variant == "fslora"})
    assert len(fslora) == 6
    for key in fslora[:3]:  # half of them: not more than half
        ledger.runs[key] = {"status": "diverged"}
    for key in {j.key for j in seeds if j.variant == "fedit"}:  # all, but nothing stable below its rate
        ledger.runs[key] = {"status": "diverged"}
    assert plan_fallbacks(study, cfg, tmp_path, rates, grid, ledger) == ({}, [])
    ledger.runs[fslora[3]] = {"status": "diverged"}
    for key in {j.key for j in seeds if j.variant == "hetlora"}:
        ledger.runs[key] = {"status": "diverged"}
    fallback, jobs = plan_fallbacks(study, cfg, tmp_path, rates, grid, ledger)
    assert fallback == {"fslora": 1e-2, "hetlora": 0.01}  # fslora: below 3e-2, the lower loss of 3e-3 and 1e-2
    dists, three = ("uniform", "normal"), (1, 2, 3)
    want = {
        ("seed", d, s, f"{v}@lr0.01", f"{d}/{v}@lr0.01/seed{s}")
        for v in ("fslora", "hetlora")
        for d in dists
        for s in three
    }
    want |= {("fold", "uniform", s, "hetlora@lr0.01+fold", f"uniform/hetlora@lr0.01+fold/seed{s}") for s in three}
    # (FSLoRA has no fold ablation: its scale carries its sketch's r/k)
    assert {(j.phase, j.distribution, j.seed, j.label, j.path.relative_to(tmp_path).as_posix()) for j in jobs} == want
    assert {(j.variant, j.lr, j.cfg.train.lr, j.cfg.train.optimizer) for j in jobs} == {
        ("fslora", 1e-2, 1e-2, "sgd"), ("hetlora", 0.01, 0.01, "adamw")
    }  # fmt: skip


def test_a_study_applies_the_stability_rule_and_reports_both_rows(tmp_path: Path) -> None:
    """End to end: fedit's seed runs at its chosen rate (0.01) are recorded as diverged (as S1's FSLoRA's were);
    the next sitting runs both seeds again at 0.001 and reports them as ``fedit@lr0.001`` beside the tuned row."""
    path = _study(tmp_path, methods='["fedit"]', lr_grid="[0.001, 0.01]", seeds="[1, 2]", fold_ablation="false")
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["study", str(path), "--no-progress"]) == 0
    for lr, loss in (("0.001", 2.0), ("0.01", 1.0)):  # make 0.01 the tuned choice whatever the tiny model chose
        summary = runs / "tune" / "fedit" / f"lr{lr}" / "summary.json"
        s = json.loads(summary.read_text())
        s["seen_after"]["loss"] = loss
        summary.write_text(json.dumps(s))
    data = json.loads((runs / "study.json").read_text())
    for seed in (1, 2):
        entry = data["runs"][str(runs / "uniform" / "fedit" / f"seed{seed}")]
        entry.update(status="diverged", reason="crafted", lr=0.01)
    (runs / "study.json").write_text(json.dumps(data))
    assert main(["study", str(path), "--no-progress"]) == 0
    ledger = Ledger(runs / "study.json").runs
    again = [runs / "uniform" / "fedit@lr0.001" / f"seed{s}" for s in (1, 2)]
    assert [ledger[str(p)]["status"] for p in again] == ["done", "done"]
    assert [ledger[str(p)]["tag"] for p in again] == ["@lr0.001"] * 2
    assert all("lr = 0.001" in (p / "config.toml").read_text() for p in again)
    assert f"{again[0]},seed,fedit@lr0.001,1,0.001,done," in (results / "runs.csv").read_text()
    md = (results / "results.md").read_text()
    assert "**Stability rule**" in md and "fedit at 0.001 (chosen 0.01)" in md
    assert "| fedit | 0.0100 | 0 |" in md and "| fedit@lr0.001 | 0.0010 | 2 |" in md
    assert "6 of 6 planned runs recorded (diverged 2, done 4)" in md
    rows = {r["variant"]: r for r in json.loads((results / "results.json").read_text())["rows"]}
    want = [json.loads((p / "summary.json").read_text())["unseen_after"]["loss"] for p in again]
    assert rows["fedit@lr0.001"]["unseen.loss"] == pytest.approx(list(mean_interval(want)))


def test_a_study_moves_to_another_machine_by_its_committed_records(tmp_path: Path) -> None:
    """``results/records.tar.gz`` (ledger, configs, summaries, metrics; no weights) is all a fresh machine needs:
    ``--aggregate-only`` gives the same tables, byte-identical records, and the next sitting keeps every run."""
    import shutil

    path = _study(tmp_path, methods='["fedit"]', lr_grid="[0.01, 1e6]", seeds="[1]")
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["study", str(path), "--no-progress"]) == 0
    archive = (results / "records.tar.gz").read_bytes()
    md = (results / "results.md").read_text()
    shutil.rmtree(runs)  # the new machine has the commit, not the run directories
    assert main(["study", str(path), "--aggregate-only"]) == 0
    assert (results / "records.tar.gz").read_bytes() == archive
    assert (results / "results.md").read_text() == md
    assert sorted(p.name for p in (runs / "uniform" / "fedit" / "seed1").iterdir()) == [
        "config.toml", "metrics.jsonl", "summary.json"
    ]  # fmt: skip
    assert main(["study", str(path), "--no-progress"]) == 0
    ledger = Ledger(runs / "study.json").runs
    assert ledger[str(runs / "tune" / "fedit" / "lr1e+06")]["status"] == "diverged"  # not retried
    assert {e.get("how") for e in ledger.values() if e["status"] == "done"} == {"kept"}


@pytest.mark.parametrize("bad", ["../outside/summary.json", "a/weights.safetensors", "link", "garbage"])
def test_records_from_a_commit_are_untrusted(tmp_path: Path, bad: str) -> None:
    import io
    import tarfile

    from fedrank.study import restore_records
    from fedrank.untrusted import DataError

    results = tmp_path / "results"
    results.mkdir()
    if bad == "garbage":
        (results / "records.tar.gz").write_bytes(b"\x1f\x8b not a tar")
    else:
        with tarfile.open(results / "records.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo(bad)
            if bad == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(DataError, match="records.tar.gz"):
        restore_records(tmp_path / "runs", results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing written


@pytest.mark.parametrize(
    "runs",
    [
        {"study.json": {"status": "done"}},  # a control file of the study, not a run
        {"u/fedit/seed1": {"status": "done", "phase": "seed", "variant": "fedit", "seed": 1, "lr": 0.01}},  # no summary
        {  # one valid run, one bad entry: nothing is written
            "u/fedit/seed1": {"status": "failed", "phase": "seed", "variant": "fedit", "seed": 1, "lr": 0.01},
            "u/fedit/seed2": {"status": "failed", "phase": "seed", "variant": "fedit", "seed": 2, "seconds": None},
        },
    ],
)
def test_a_committed_ledger_is_checked_whole_before_anything_is_written(
    tmp_path: Path, runs: dict[str, object]
) -> None:
    import io
    import tarfile

    from fedrank.study import restore_records
    from fedrank.untrusted import DataError

    results = tmp_path / "results"
    results.mkdir()
    data = json.dumps({"runs": runs}).encode()
    with tarfile.open(results / "records.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("study.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="records.tar.gz"):
        restore_records(tmp_path / "runs", results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
