"""End-to-end runs on the tiny random Llama and synthetic tasks: every method, resume, config errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrank import checkpoint
from fedrank.aggregation import HOMOGENEOUS, METHODS
from fedrank.cli import main
from fedrank.config import ConfigError, load_config
from fedrank.simulation import Simulation, with_method
from helpers import TINY_TOML as TINY


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def strip_times(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(method: str, cfg_path: Path, tmp_path: Path) -> None:
    cfg = with_method(load_config(cfg_path), method, 0, presets=False)  # the tiny model diverges at fslora's SGD lr
    run = tmp_path / method
    res = Simulation(cfg, run, progress=False).run()
    recs = records(run)
    clients = [r for r in recs if r["type"] == "client"]
    assert len(clients) == 4 and [r["round"] for r in clients] == [1, 1, 2, 2]
    ranks = {r["rank"] for r in clients}
    assert ranks == {2} if method in HOMOGENEOUS else ranks <= {2, 4}
    assert all(r["up_bytes"] > 0 and r["loss"] > 0 for r in clients)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [e["round"] for e in evals] == [0, 2] and set(evals[-1]["unseen"]) == set(evals[0]["unseen"])
    assert res.summary["unseen_after"]["loss"] != res.summary["unseen_before"]["loss"], "training changed nothing"
    cfg_json = json.loads((Path(res.summary["adapter"]) / "adapter_config.json").read_text())
    assert cfg_json["r"] == (2 if method in HOMOGENEOUS else 4)
    assert (run / "config.toml").is_file() and (run / "summary.json").is_file()


def test_run_outputs_plots_and_summary(cfg_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(out), "--set", "output.plots=true", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert sorted(Path(p).name for p in s["plots"]) == [
        "communication.png",
        "eval.png",
        "ranks.png",
        "spectrum.png",
        "time.png",
        "train_loss.png",
    ]
    assert s["rounds"] == 2 and s["client_updates"] == 4
    assert s["up_bytes"] == sum(r["up_bytes"] for r in records(out) if r["type"] == "client")
    # a second run into the same directory must be explicit
    assert main(["run", str(cfg_path), "--out", str(out), "--no-progress"]) == 2


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, rounds: int) -> None:
    real = Simulation._checkpoint

    def crash(self: Simulation, round_done: int) -> None:
        real(self, round_done)
        if round_done == rounds:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(Simulation, "_checkpoint", crash)


@pytest.mark.parametrize("method", ["flexlora", "fedsa", "hetlora", "fedplora", "fedex", "rolora", "raflora"])
def test_resume_is_bit_identical(method: str, cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ["federation.rounds=3", f"method.name={method}"]
    if method == "hetlora":
        overrides.append("method.prune={reg = 0.01, gamma = 0.5, threshold = 0.9}")
    cfg = load_config(cfg_path, overrides)
    full = tmp_path / "full"
    Simulation(cfg, full, progress=False).run()
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1 if method == "rolora" else 2)  # rolora: stop on an odd step so a lost phase shows
        with pytest.raises(KeyboardInterrupt):
            Simulation(cfg, part, progress=False).run()
    # a partial round's junk after the checkpoint is discarded on resume
    with (part / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"type": "client", "round": 3, "junk": True}) + "\n")
    assert main(["run", "--resume", str(part), "--no-progress"]) == 0
    assert strip_times(records(part)) == strip_times(records(full))
    a = flatten(checkpoint.load(full / "global_state.safetensors"))
    b = flatten(checkpoint.load(part / "global_state.safetensors"))
    assert len(a) == len(b) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    if method in ("fedplora", "fedex", "rolora", "raflora"):  # issue 11's methods, with mixed ranks
        assert {r["rank"] for r in records(part) if r["type"] == "client"} == {2, 4}
    if method == "hetlora":  # self-pruning happened (γ = 0.5: rank 2 -> 1) and survived the resume
        assert any(r["rank"] == 1 for r in records(part) if r["type"] == "client")


def flatten(obj: object) -> list[torch.Tensor]:
    """Every tensor in a state object, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in flatten(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in flatten(v)]
    if hasattr(obj, "__slots__"):
        return [t for s in obj.__slots__ for t in flatten(getattr(obj, s))]
    if hasattr(obj, "__dict__"):
        return [t for k in sorted(vars(obj)) for t in flatten(vars(obj)[k])]
    return []


def test_config_errors_say_what_is_wrong(cfg_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['train.lrr'\]; valid keys in \[train\]"):
        load_config(cfg_path, ["train.lrr=1"])
    old = cfg_path.parent / "old.toml"
    old.write_text(cfg_path.read_text().replace("[train]", "[train]\nrows_per_pass = 2", 1))
    with pytest.raises(ConfigError, match=r"train.rows_per_pass is now train.pass_tokens"):  # an earlier version's key
        load_config(old)
    with pytest.raises(ConfigError, match="method.name 'fedavg' is unknown; choices: fedex, fedit, fedplora, fedsa"):
        load_config(cfg_path, ["method.name=fedavg"])
    with pytest.raises(ConfigError, match="ranks.distribution 'zipf' is unknown; choices: uniform"):
        load_config(cfg_path, ["ranks.distribution=zipf"])
    with pytest.raises(ConfigError, match="train.lr must be positive and finite"):
        load_config(cfg_path, ["train.lr=0"])
    with pytest.raises(ConfigError, match="federation.rounds must be int"):
        load_config(cfg_path, ["federation.rounds='x'"])
    with pytest.raises(ConfigError, match="unknown partition 'shards'; choices: task, dirichlet, iid"):
        load_config(cfg_path, ["partition.kind=shards"])
    cfg = load_config(cfg_path, ["method.name=fedit"])
    with pytest.raises(ConfigError, match="fedit needs one rank for all clients"):
        Simulation(cfg, cfg_path.parent / "x", progress=False)
    assert main(["run", str(cfg_path), "--set", "method.name=nope"]) == 2


def test_cli_compare_report_and_export(cfg_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code = main(
        ["compare", str(cfg_path), "--methods", "flexlora,fedit", "--seeds", "0,1", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    md = (out / "comparison.md").read_text()
    assert "| flexlora | 2 |" in md and "| fedit | 2 |" in md and " ± " in md
    fedit_ranks = {r["rank"] for r in records(out / "fedit" / "seed1") if r["type"] == "client"}
    assert fedit_ranks == {2}  # the bucket effect: fedit at the pool's minimum rank
    csv = (out / "comparison.csv").read_text().splitlines()
    assert csv[0].startswith("method,seeds,") and len(csv) == 3
    assert (
        main(["report", str(out / "flexlora" / "seed0"), str(out / "fedit" / "seed0"), "--out", str(tmp_path / "r")])
        == 0
    )
    assert (tmp_path / "r" / "comparison.md").is_file()
    assert main(["export", str(out / "flexlora" / "seed0"), "--rank", "3", "--out", str(tmp_path / "ad")]) == 0
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 3


def test_jsonl_clients_run_end_to_end(cfg_path: Path, tmp_path: Path) -> None:
    rows = [
        {"instruction": f"Say {w} {i}", "output": w, "client": f"c{i % 5}"}
        for i, w in enumerate(["apple", "river", "stone", "cloud", "green", "light", "table", "music"] * 5)
    ]
    data = tmp_path / "clients.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(
        cfg_path,
        ["data.source=jsonl", f"data.paths=['{data}']", "partition.num_eval_tasks=1", "partition.min_examples=1"],
    )
    res = Simulation(cfg, tmp_path / "run", progress=False).run()
    clients = [r for r in records(tmp_path / "run") if r["type"] == "client"]
    assert len(clients) == 4 and all(r["tasks"][0].startswith("c") for r in clients)
    assert res.summary["unseen_after"]["loss"] < res.summary["unseen_before"]["loss"]


@pytest.mark.parametrize("method", ["flexlora", "flora", "fslora", "fedplora", "fedex", "rolora", "raflora"])
def test_exported_adapter_reproduces_the_global_model(method: str, cfg_path: Path, tmp_path: Path) -> None:
    """export at a rank >= the global update's rank is exact: PEFT's logits equal fedrank's global model."""
    from peft import PeftModel

    from fedrank.models import tiny_llama
    from fedrank.simulation import export_global

    cfg = with_method(load_config(cfg_path), method, 0, presets=False)  # the tiny model diverges at fslora's SGD lr
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    sim.run()
    out = export_global(sim.method, sim.state, cfg, 64, tmp_path / "ad", "tiny-llama")  # 64 >= min(m, n)
    sim.host.load(sim.method.global_model(sim.state))
    ids = torch.tensor([[7, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        ours = sim.host.module(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(tiny_llama(seed=0).model, str(out))(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ours, tiny_llama(seed=0).model(input_ids=ids).logits, atol=1e-3)  # it did train


def test_budget_distribution_gives_the_largest_rank_that_fits(cfg_path: Path, tmp_path: Path) -> None:
    from fedrank.ranks import training_bytes
    from fedrank.simulation import model_footprint

    with pytest.raises(ConfigError, match="needs ranks.budgets_mib"):
        load_config(cfg_path, ["ranks.distribution=budget", "ranks.choices=[2, 4, 8]"])
    probe = Simulation(load_config(cfg_path), tmp_path / "probe", progress=False)
    fp = model_footprint(probe.lm, probe.host.shapes, probe.cfg)
    just_4 = (training_bytes(fp, 4) + 1) / 2**20  # fits rank 4, not 8
    cfg = load_config(
        cfg_path, ["ranks.distribution=budget", "ranks.choices=[2, 4, 8]", f"ranks.budgets_mib=[{just_4}]"]
    )
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    assert sim.ranks == [4] * sim.fed.num_clients


def test_per_client_ranks_are_used_in_client_order_and_checked(cfg_path: Path, tmp_path: Path) -> None:
    from fedrank.simulation import client_ranks

    cfg = load_config(cfg_path, ["ranks.choices=[4, 8, 16]"])
    per = [16, 4, 8, 4, 16, 8][: cfg.partition.num_clients]
    per += [4] * (cfg.partition.num_clients - len(per))
    assert client_ranks(load_config(cfg_path, ["ranks.choices=[4, 8, 16]", f"ranks.per_client={per}"]), len(per)) == per
    with pytest.raises(ConfigError, match=r"lists 2 rank\(s\) for 5 registered clients"):
        client_ranks(load_config(cfg_path, ["ranks.choices=[4, 8, 16]", "ranks.per_client=[4, 8]"]), 5)
    with pytest.raises(ConfigError, match="rank 32, above the global rank 16"):
        client_ranks(load_config(cfg_path, ["ranks.choices=[4, 8, 16]", "ranks.per_client=[32, 4]"]), 2)
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(cfg_path, ["ranks.per_client=[0, 4]"])


def test_wide_global_adapter_is_evaluated_merged_with_the_same_logits(cfg_path: Path, tmp_path: Path) -> None:
    """FlexLoRA's exact ΔW (rank Σr_k > every client's rank) is evaluated merged into copies of the base
    weights (no adapter computed, no dense ΔW kept); the originals come back bit for bit."""
    cfg = load_config(cfg_path, ["federation.clients_per_round=3", "ranks.choices=[4]", "ranks.distribution=fixed"])
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    sim.run()
    gm = sim.method.global_model(sim.state)
    assert gm.rank == 12 > sim.max_rank  # three rank-4 clients
    assert sim.evaluation_model() is not None
    ids = torch.tensor([[5, 9, 14, 20, 27]])
    sim.host.load(gm)
    with torch.no_grad():
        as_adapter = sim.host.module(input_ids=ids).logits.clone()
        with sim.host.merged(sim.evaluation_model()) as model:
            torch.testing.assert_close(model(input_ids=ids).logits, as_adapter, atol=1e-5, rtol=1e-5)
            assert not torch.equal(model(input_ids=ids).logits, as_adapter)  # the merged route, not the adapter
    # the next client trains on the untouched base weights again
    from fedrank.models import tiny_llama
    from fedrank.types import ClientSpec

    sim.host.load(sim.method.dispatch(sim.state, ClientSpec(0, 4, 1), 2))
    fresh = dict(tiny_llama(seed=0).model.named_modules())
    for name, mod in sim.host.lora_layers():
        assert torch.equal(mod.base_layer.weight, fresh[name].weight), name
