"""Opt-in (-m integration): the real SmolLM2-135M and the real BIG-bench sdist (downloaded once)."""

from __future__ import annotations

import pytest
import torch

from fedrank.aggregation import make_method
from fedrank.data import BigBench, BigBenchStore
from fedrank.data.tokenize import LazyEncoded
from fedrank.evaluate import EvalConfig, evaluate_task
from fedrank.models import LoraHost, load_causal_lm
from fedrank.train import TrainConfig, train_local
from fedrank.types import ClientSpec

pytestmark = pytest.mark.integration


def test_real_model_trains_on_a_bigbench_task_and_evaluates_unseen_tasks() -> None:
    lm = load_causal_lm()
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    bench = BigBench.open()
    store = BigBenchStore(bench)
    assert len(bench.tasks) > 900
    host = LoraHost(lm.model)
    method = make_method("flexlora")
    a = method.dispatch(method.init_state(host.shapes, 8), ClientSpec(0, 8, 100), 0)
    host.load(a)
    train = store.examples("arithmetic:2_digit_addition")[:200]
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
    gen = evaluate_task(host.module, lm.tokenizer, store.examples("word_unscrambling")[:8], cfg)
    mc = evaluate_task(host.module, lm.tokenizer, store.examples("anachronisms")[:8], cfg)
    assert 0.0 <= gen["rougeL"] <= 1.0 and 0.0 <= mc["accuracy"] <= 1.0
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
