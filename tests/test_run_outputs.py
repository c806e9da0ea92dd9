"""What a run reports: the same participants before/during/after, aggregation weights, the spectrum
diagnostic, the end-of-run table, and compare's presets and data resampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrank.cli import main
from fedrank.config import load_config
from fedrank.lowrank import energy_spectrum
from fedrank.report import end_of_run_table
from fedrank.simulation import PRESETS, Simulation, with_method
from test_simulation import TINY, records


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def test_the_same_participants_are_evaluated_before_during_and_after(cfg_path: Path, tmp_path: Path) -> None:
    cfg = load_config(cfg_path, ["eval.every=1", "eval.participants=2", "federation.rounds=3"])
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    summary = sim.run().summary
    evals = [r for r in records(tmp_path / "run") if r["type"] == "eval"]
    assert [e["round"] for e in evals] == [0, 1, 2, 3]
    first = evals[0]["participants"]
    assert len(first) == 2 and set(first) == {str(c) for c in sim.eval_clients}
    assert set(sim.eval_clients) <= set(sim.sample(0)), "participants are clients that train in round 1"
    for e in evals:
        assert set(e["participants"]) == set(first) and set(e["unseen"]) == set(evals[0]["unseen"])
        assert [m["n"] for m in e["participants"].values()] == [m["n"] for m in first.values()]
    # the summary's before/after are the round-0 and last evaluations of those same clients
    assert summary["seen_before"] == evals[0]["participants_avg"]
    assert summary["seen_after"] == evals[-1]["participants_avg"]
    assert summary["seen_examples"] == sum(m["n"] for m in first.values())
    table = end_of_run_table(summary)
    assert "unseen (2 tasks)" in table and "seen (2 clients)" in table
    loss = summary["seen_after"]["loss"]
    assert f"{summary['seen_before']['loss']:.4f}" in table and f"{loss:.4f}" in table
    assert f"{summary['unseen_after']['loss'] - summary['unseen_before']['loss']:+.4f}" in table


@pytest.mark.parametrize("weighting", ["examples", "seen", "uniform"])
def test_aggregation_weights_follow_federation_weighting(
    weighting: str, cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(cfg_path, [f"federation.weighting={weighting}", "federation.rounds=1"])
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    seen_weights: list[list[float]] = []
    cls = type(sim.method)
    real = cls.aggregate

    def spy(self, state, updates, weights=None):  # type: ignore[no-untyped-def]
        seen_weights.append(list(weights))
        return real(self, state, updates, weights)

    monkeypatch.setattr(cls, "aggregate", spy)
    sim.run()
    clients = [r for r in records(tmp_path / "run") if r["type"] == "client"]
    want = {
        "examples": [float(r["n"]) for r in clients],
        "seen": [float(r["seen"]) for r in clients],
        "uniform": [1.0] * len(clients),
    }[weighting]
    assert seen_weights == [want]
    for r in clients:  # 2 steps of 2 examples: at most 4 distinct examples seen, never more than n
        assert r["seen"] == min(r["n"], 4) and r["examples"] == 4


def test_spectrum_diagnostic_matches_the_dense_global_update(cfg_path: Path, tmp_path: Path) -> None:
    sim = Simulation(load_config(cfg_path), tmp_path / "run", progress=False)
    sim.run()
    rounds = [r for r in records(tmp_path / "run") if r["type"] == "round"]
    sp = rounds[-1]["spectrum"]
    assert (sp["r_min"], sp["r_max"]) == (min(sim.ranks), max(sim.ranks))
    gm = sim.method.global_model(sim.state)
    tops, effs = [], []
    for f in gm.factors.values():
        dense = gm.scaling * f.B.double() @ f.A.double()
        e = energy_spectrum(torch.linalg.svdvals(dense), (sp["r_min"], sp["r_max"]))
        assert e is not None
        tops.append(e[0])
        effs.append(e[1])
    assert sp["energy_top_rmin"] == pytest.approx(sum(t[0] for t in tops) / len(tops), rel=1e-4)
    assert sp["energy_top_rmax"] == pytest.approx(sum(t[1] for t in tops) / len(tops), rel=1e-4)
    assert sp["effective_rank"] == pytest.approx(sum(effs) / len(effs), rel=1e-4)
    assert 0 < sp["energy_top_rmin"] <= sp["energy_top_rmax"] <= 1 + 1e-9


def test_energy_spectrum_definitions() -> None:
    e = energy_spectrum(torch.tensor([2.0, 1.0, 1.0, 0.0]), (1, 2))
    assert e is not None
    assert e[0] == pytest.approx([4 / 6, 5 / 6])
    p = torch.tensor([0.5, 0.25, 0.25])
    assert e[1] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert energy_spectrum(torch.zeros(3), (1,)) is None


def test_compare_checks_methods_before_training_and_applies_presets(cfg_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg_path), "--methods", "flexlora,bogus", "--out", str(out), "--no-progress"]) == 2
    assert not out.exists(), "nothing may train before every method name is checked"
    cfg = load_config(cfg_path)
    fs = with_method(cfg, "fslora", 3)
    assert fs.train.optimizer == "sgd" and fs.train.momentum == 0.9 and fs.model.rslora
    assert fs.train.lr == PRESETS["fslora"]["train.lr"] and fs.seed == 3
    plain = with_method(cfg, "fslora", 3, presets=False)
    assert plain.train == cfg.train and plain.model == cfg.model
    assert with_method(cfg, "flexlora", 3).train == cfg.train  # no preset: the config as it is
    assert fs.partition.seed == cfg.partition.seed
    assert with_method(cfg, "fslora", 3, resample_data=True).partition.seed == 3


def test_compare_resample_data_redraws_held_out_families(cfg_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", str(cfg_path), "--methods", "fedit", "--seeds", "0,1", "--out", str(out), "--no-progress"]
    assert main([*args, "--resample-data", "--set", "federation.rounds=1", "--set", "eval.before=false"]) == 0
    held = [json.loads((out / "fedit" / f"seed{s}" / "summary.json").read_text())["unseen_tasks"] for s in (0, 1)]
    assert held[0] != held[1]


def test_end_of_run_output_shortens_long_task_lists() -> None:
    from fedrank.cli import _few

    assert _few(["a", "b"]) == "a, b"
    assert _few([f"t{i}" for i in range(40)]) == "t0, t1, t2 and 37 more"


def test_seen_by_task_pools_held_out_examples_of_every_training_task(cfg_path: Path, tmp_path: Path) -> None:
    """eval.seen_by = "task" (FSLoRA's per-task accuracy): the seen group is keyed by training task, each with at
    most partition.max_eval_examples examples from the clients' test splits, none of which any client trains on."""
    sets = [
        "partition.kind=dirichlet",
        "partition.num_eval_tasks=0",
        "partition.max_eval_examples=3",
        "eval.seen_by=task",
        "federation.rounds=1",
    ]
    sim = Simulation(load_config(cfg_path, sets), tmp_path / "run", progress=False)
    summary = sim.run().summary
    seen = summary["seen_clients"]
    assert summary["seen_by"] == "task" and set(seen) == set(sim.fed.train_tasks)
    assert all(v == [t] for t, v in seen.items())
    evals = [r for r in records(tmp_path / "run") if r["type"] == "eval"]
    assert all(m["n"] <= 3 for m in evals[-1]["participants"].values())
    pooled = sim._seen_sets(3)
    trained = {id(e) for c in range(sim.fed.num_clients) for e in sim.fed.client(c).train}  # the store's objects
    assert all(e.task == t for t, ex in pooled.items() for e in ex)
    assert not {id(e) for ex in pooled.values() for e in ex} & trained
    assert f"seen ({len(seen)} tasks)" in end_of_run_table(summary)
