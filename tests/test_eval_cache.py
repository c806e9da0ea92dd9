"""The base model's evaluation kept under the cache directory and reused (fedrank.eval_cache): the same
numbers as evaluating again, a key that changes with what the numbers depend on, damaged files recomputed."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from fedrank import eval_cache
from fedrank.config import load_config, override
from fedrank.data.examples import Example
from fedrank.evaluate import EvalConfig
from fedrank.simulation import Simulation
from helpers import tiny_toml


def evals(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "eval"]


def kept_files() -> list[Path]:
    return sorted((Path(os.environ["FEDRANK_CACHE"]) / "evals").glob("*.json"))


@pytest.fixture()
def cfg(tmp_path: Path):
    p = tmp_path / "tiny.toml"
    p.write_text(tiny_toml(eval={"reuse_base": True}))  # the shared tiny config evaluates every time
    return load_config(p)


def test_a_second_run_reuses_the_base_evaluation_with_the_same_numbers(cfg, tmp_path: Path, caplog) -> None:
    first = Simulation(cfg, tmp_path / "a", progress=False).run()
    e1 = evals(tmp_path / "a")
    assert [e["reused"] for e in e1] == [False, False]
    assert len(kept_files()) == 1  # round 0 only: the trained model's evaluation is never kept
    with caplog.at_level(logging.INFO, logger="fedrank.simulation"):
        second = Simulation(cfg, tmp_path / "b", progress=False).run()
    e2 = evals(tmp_path / "b")
    assert [e["reused"] for e in e2] == [True, False] and "reused from" in caplog.text
    for key in ("unseen", "participants", "unseen_avg", "participants_avg"):
        assert e2[0][key] == e1[0][key]
    assert second.summary["eval_before_reused"] and not first.summary["eval_before_reused"]
    # evaluating again gives exactly the kept numbers
    fresh = Simulation(override(cfg, {"eval.reuse_base": False}), tmp_path / "c", progress=False).run()
    e3 = evals(tmp_path / "c")
    assert not e3[0]["reused"] and e3[0]["unseen"] == e1[0]["unseen"]
    assert e3[0]["participants"] == e1[0]["participants"]
    assert fresh.summary["unseen_after"] == first.summary["unseen_after"] == second.summary["unseen_after"]


def test_other_settings_miss_and_a_damaged_file_is_recomputed(cfg, tmp_path: Path, caplog) -> None:
    sim = Simulation(cfg, tmp_path / "a", progress=False)
    rec = sim.evaluate(0)
    (path,) = kept_files()
    Simulation(override(cfg, {"eval.settings.max_new_tokens": 3}), tmp_path / "b", progress=False).evaluate(0)
    assert len(kept_files()) == 2
    path.write_text('{"version": 1, "unseen": {"x": {}}}')
    with caplog.at_level(logging.WARNING):
        again = sim.evaluate(0)
    assert not again["reused"] and "unusable" in caplog.text
    assert again["unseen"] == rec["unseen"] and json.loads(path.read_text())["unseen"] == rec["unseen"]
    path.write_bytes(b"\x00garbage")
    assert not sim.evaluate(0)["reused"]
    assert sim.evaluate(0)["reused"]


def test_the_key_covers_what_the_numbers_depend_on() -> None:
    ex = [Example("q", "a"), Example("pick", "x", choices=("x", "y"), correct=0)]
    sets = {"unseen": {"t": ex}, "participants": {"3": ex[:1]}}
    run = {"torch": "2.13.0", "device": "cpu", "threads": 2, "onednn": True}
    base = eval_cache.key("w", "tok", sets, EvalConfig(), run)
    assert base == eval_cache.key("w", "tok", sets, EvalConfig(), dict(run))
    others = [
        eval_cache.key("w2", "tok", sets, EvalConfig(), run),
        eval_cache.key("w", "tok2", sets, EvalConfig(), run),
        eval_cache.key("w", "tok", {"unseen": {"t": ex[:1]}, "participants": {"3": ex[:1]}}, EvalConfig(), run),
        eval_cache.key("w", "tok", {"unseen": {"t": ex}, "participants": {"4": ex[:1]}}, EvalConfig(), run),
        eval_cache.key(
            "w",
            "tok",
            {"unseen": {"t": [replace(ex[0], target="b"), ex[1]]}, "participants": {"3": ex[:1]}},
            EvalConfig(),
            run,
        ),
        eval_cache.key("w", "tok", sets, EvalConfig(max_seq_len=100), run),
        eval_cache.key("w", "tok", sets, EvalConfig(), {**run, "threads": 1}),
        eval_cache.key("w", "tok", sets, EvalConfig(), {**run, "onednn": False}),
    ]
    assert len({base, *others}) == len(others) + 1


def test_weights_digest_sees_every_byte_and_name() -> None:
    import torch

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    d = eval_cache.weights_digest([("a", w)])
    w2 = w.clone()
    w2[2, 3] = torch.nextafter(w2[2, 3], torch.tensor(100.0))
    assert d != eval_cache.weights_digest([("a", w2)])
    assert d != eval_cache.weights_digest([("b", w)])
    assert d == eval_cache.weights_digest([("a", w.t().contiguous().t())])  # layout does not matter
