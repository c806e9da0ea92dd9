"""Metrics as BIG-bench and the papers define them: Rouge-L on any script, multiple_choice_grade with
target scores (ties, graded credit), and generation long enough for the task's references."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from rouge_score import rouge_scorer

from fedrank.data import parse_task
from fedrank.data.examples import Example
from fedrank.evaluate import (
    EvalConfig,
    UnicodeTokenizer,
    choice_logliks,
    choose,
    evaluate_task,
    generate,
    longest_reference,
    rouge_l,
)


def bigbench_grade(samples: list[dict]) -> float:
    """BIG-bench's multiple_choice_grade (bigbench/api/task_metrics.py), as a reference."""

    def argmax(array: np.ndarray) -> int:
        max_indices = np.arange(len(array))[array == np.max(array)]
        idx = int(hashlib.sha256(np.asarray(array).tobytes()).hexdigest(), 16) % len(max_indices)
        return int(max_indices[idx])

    count = 0.0
    for s in samples:
        choice = s["choice"][argmax(np.asarray(s["log_prob"]))]
        count += s["target_scores"][choice]
    return count / len(samples)


def test_rouge_l_scores_cyrillic_and_chinese_references() -> None:
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert default.score("Привет мир", "Привет мир")["rougeL"].fmeasure == 0.0  # what we fixed
    assert rouge_l("Привет мир", ["привет мир"]) == 1.0
    assert rouge_l("Привет", ["привет мир"]) == pytest.approx(2 / 3)
    assert rouge_l("我喜欢猫", ["我喜欢狗"]) == pytest.approx(0.75)  # one token per character
    assert rouge_l("猫", ["我喜欢狗"]) == 0.0
    # combining marks stay inside their word: Devanagari vowel signs do not split "हिन्दी" into consonants
    assert UnicodeTokenizer().tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert rouge_l("हिन्दी", ["हिन्दी भाषा"]) == pytest.approx(2 / 3)
    assert rouge_l("हन", ["हिन्दी"]) == 0.0
    # English unchanged from rouge-score's default (stemmed, punctuation dropped)
    for pred, ref in [("The cats are running!", "the cat runs"), ("42 apples", "forty-two apples")]:
        assert rouge_l(pred, [ref]) == pytest.approx(default.score(ref, pred)["rougeL"].fmeasure)


def test_choose_matches_bigbench_tie_breaking() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        ll = rng.integers(0, 3, size=int(rng.integers(2, 6))).astype(float).tolist()  # many ties
        scores = rng.random(len(ll)).round(2).tolist()
        choices = [f"c{i}" for i in range(len(ll))]
        ref = bigbench_grade([{"choice": choices, "log_prob": ll, "target_scores": dict(zip(choices, scores))}])
        ex = Example("q", "c0", choices=tuple(choices), correct=0, scores=tuple(scores))
        assert ex.credit(choose(ll)) == ref


def test_multiple_choice_credits_target_scores_with_ties_and_graded_targets(tiny) -> None:
    task = {
        "examples": [
            # two identical options tie exactly; BIG-bench breaks the tie by hash, credit follows the pick
            {"input": "Pick one", "target_scores": {"same": 1.0, "same ": 0.0}},
            {"input": "Pick one", "target_scores": {"red": 0.5, "blue": 0.25, "green": 1.0}},
            {"input": "Pick one", "target_scores": {"yes": 1, "no": 1}},
        ]
    }
    examples = parse_task(task, "mc")
    assert examples[1].scores == (0.5, 0.25, 1.0) and examples[1].correct == 2
    cfg = EvalConfig()
    samples = []
    for e in examples:
        ll = choice_logliks(tiny.model, tiny.tokenizer, e, cfg)
        samples.append({"choice": list(e.choices), "log_prob": ll, "target_scores": dict(zip(e.choices, e.scores))})
    tie = choice_logliks(
        tiny.model, tiny.tokenizer, Example("Pick", "a", choices=("a", "a"), correct=0, scores=(1.0, 0.0)), cfg
    )
    assert tie[0] == tie[1]  # an exact tie, broken as BIG-bench breaks it
    assert Example("Pick", "a", choices=("a", "a"), correct=0, scores=(1.0, 0.0)).credit(choose(tie)) == bigbench_grade(
        [{"choice": ["x", "y"], "log_prob": tie, "target_scores": {"x": 1.0, "y": 0.0}}]
    )
    res = evaluate_task(tiny.model, tiny.tokenizer, examples, cfg)
    assert res["accuracy"] == pytest.approx(bigbench_grade(samples))
    # graded credit: whichever option wins the second example earns its score, not 1 or 0
    assert bigbench_grade(samples[1:2]) in (0.5, 0.25, 1.0)


def test_generation_covers_the_longest_reference(tiny) -> None:
    tok = tiny.tokenizer
    long_ref = " ".join(["word"] * 4)
    examples = [Example("Say many words", long_ref), Example("Say one word", "ok")]
    n = longest_reference(tok, examples)
    assert n == len(tok(long_ref, add_special_tokens=False)["input_ids"]) > 8
    cfg = EvalConfig(max_new_tokens=4, max_new_tokens_cap=64)
    assert (
        cfg.new_tokens(n) == n
        and cfg.new_tokens(2) == 4
        and EvalConfig(max_new_tokens=4, max_new_tokens_cap=6).new_tokens(n) == 6
    )
    res = evaluate_task(tiny.model, tok, examples, cfg)
    assert res["new_tokens"] == n
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens_cap"):
        EvalConfig(max_new_tokens=32, max_new_tokens_cap=16)


def test_a_prefix_shared_by_a_batch_is_computed_once(tiny) -> None:
    """Prompts sharing their beginning (a task's instructions): the shared tokens run once for the batch and
    every number and generated text is what each example gives alone (no sharing), to float rounding."""
    from fedrank.evaluate import SHARED_PREFIX_MIN, score_and_generate

    tok, model = tiny.tokenizer, tiny.model
    head = "Follow the instructions below carefully and answer in one word. " * 2
    examples = [
        Example(head + "Name a fruit.", "apple"),
        Example(head + "Name a river in Europe please.", "danube"),
        Example(head + "Say yes.", "yes"),
        Example(head + "Pick one", "blue", choices=("red", "blue"), correct=1),
        Example(head + "Pick the odd one out", "cat", choices=("cat", "one", "two"), correct=0),
    ]
    cfg = EvalConfig(max_new_tokens=5, batch_size=4, generate_batch_size=4, max_seq_len=512)
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        together = score_and_generate(model, tok, examples, cfg, max_new_tokens=5)
    finally:
        hook.remove()
    shared = [s for s in shapes if s[0] == 1]
    assert len(shared) == 2 and all(s[1] >= SHARED_PREFIX_MIN for s in shared)  # one prefix pass per group
    for ex, got in zip(examples, together):
        (alone,) = score_and_generate(model, tok, [ex], cfg, max_new_tokens=5)
        assert got.nll == pytest.approx(alone.nll, rel=1e-5, abs=1e-5) and got.tokens == alone.tokens
        assert got.option_logliks == pytest.approx(alone.option_logliks, rel=1e-5, abs=1e-5)
        assert got.generated == alone.generated and got.generated_tokens == alone.generated_tokens


def test_one_pass_evaluation_equals_the_separate_routes(tiny) -> None:
    """score_and_generate (one prompt pass, length-grouped batches, KV-cache continuations, own greedy loop)
    gives the numbers of answer_nll / choice_logliks and the text of model.generate, example by example:
    prompts of different lengths in one batch, an exact tie between options, a multiple-choice target that is
    not an option, and prompts too long for max_seq_len (the answer then scored in the context the model
    generates from, or the options' context)."""
    import torch

    from fedrank.data.tokenize import prompt_text
    from fedrank.evaluate import answer_nll, reference_answer_nll, score_and_generate

    tok, model = tiny.tokenizer, tiny.model
    long = "the quick brown fox " * 12
    examples = [
        Example("say a word", "apple"),
        Example("pick", "same", choices=("same", "same"), correct=0, scores=(1.0, 0.0)),  # exact tie
        Example(long + "say two words please", "river stone"),
        Example("Pick one of these options now", "blue", choices=("red", "blue", "green yes"), correct=1),
        Example("yes or no", "yes indeed", choices=("yes", "no"), correct=0),  # target is no option
        Example("repeat the word " * 3, "cloud cloud"),
        Example(long * 2 + "answer", "x"),  # too long for max_seq_len = 96: truncated
        Example(long * 2 + "pick", "no", choices=("yes", "no"), correct=1),
        Example(long * 2 + "pick", "green yes", choices=("no", "green yes"), correct=1),  # cut as encode cuts
    ]
    cfg = EvalConfig(max_new_tokens=6, batch_size=3, generate_batch_size=2, max_seq_len=96)
    got = score_and_generate(model, tok, examples, cfg, max_new_tokens=6)
    expected = []
    cut = 0
    for ex, s in zip(examples, got):
        # the answer is scored in the example's one context: the prompt's last max_seq_len tokens
        # (generative) or the prompt cut to fit the longest option (multiple choice)
        nll, count = reference_answer_nll(model, tok, ex, cfg)
        expected.append((nll, count))
        assert s.tokens == count and s.nll == pytest.approx(nll, rel=1e-5, abs=1e-4)
        answer = len(tok(ex.target + tok.eos_token, add_special_tokens=False)["input_ids"])
        prompt = len(tok(prompt_text(tok, ex.prompt), add_special_tokens=False)["input_ids"])
        options = [tok(c + tok.eos_token, add_special_tokens=False)["input_ids"] for c in ex.choices or ()]
        longest = max((len(o) for o in options), default=0)
        if prompt + max(answer, longest) <= cfg.max_seq_len:  # nothing cut: answer_nll's own numbers
            assert answer_nll(model, tok, [ex], cfg)[0] == pytest.approx((nll, count), rel=1e-6)
        else:  # answer_nll cuts the prompt to fit the answer: the same where the target is the longest option
            cut += answer_nll(model, tok, [ex], cfg)[0][0] != pytest.approx(nll, rel=1e-6)
        if ex.is_multiple_choice:
            assert s.option_logliks == pytest.approx(choice_logliks(model, tok, ex, cfg), abs=1e-4)
            assert s.generated == "" and s.generated_tokens == 0
        else:
            ids = tok(prompt_text(tok, ex.prompt), add_special_tokens=False)["input_ids"][-cfg.max_seq_len :]
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor([ids]),
                    max_new_tokens=6,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            new = out[0, len(ids) :].tolist()
            assert s.generated == tok.decode(new, skip_special_tokens=True).strip()
            stop = new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else len(new)
            assert s.generated_tokens == stop
    assert cut == 2  # the long generative prompt, and the long one whose target is the shorter option
    assert got[1].option_logliks[0] == got[1].option_logliks[1]  # the tie stays exact
    # long answers are projected a few positions at a time: the same numbers
    whole = answer_nll(model, tok, examples, cfg)
    split = answer_nll(model, tok, examples, cfg, max_positions=4)
    assert [c for _, c in split] == [c for _, c in whole]
    assert [n for n, _ in split] == pytest.approx([n for n, _ in whole], rel=1e-5)
    # the whole task: the same metrics as the separate routes (the pre-change evaluate_task)
    res = evaluate_task(model, tok, examples, cfg)
    assert res["loss"] == pytest.approx(sum(n for n, _ in expected) / sum(c for _, c in expected), rel=1e-6)
    mc = [(e, s) for e, s in zip(examples, got) if e.is_multiple_choice]
    assert res["accuracy"] == sum(e.credit(choose(s.option_logliks)) for e, s in mc) / len(mc)
    # the pick equals the separate route's wherever the options are not tied (an exact tie is broken by a hash of
    # the scores' bytes, which float rounding between the two routes changes on some processors)
    for e, s in mc:
        other = choice_logliks(model, tok, e, cfg)
        if (
            len(set(s.option_logliks)) == len(s.option_logliks)
            and min(abs(a - b) for i, a in enumerate(other) for b in other[i + 1 :]) > 1e-3
        ):
            assert choose(s.option_logliks) == choose(other)
    gen = [e for e in examples if not e.is_multiple_choice]
    preds = generate(model, tok, [e.prompt for e in gen], cfg, int(res["new_tokens"]))
    assert res["rougeL"] == pytest.approx(sum(rouge_l(p, e.references) for p, e in zip(preds, gen)) / len(gen))


def test_lanes_pack_each_rows_continuations_first_fit_decreasing() -> None:
    """_lanes: every continuation in exactly one lane of its own row, no lane wider than the width unless it
    holds one longer continuation alone; first fit in order of decreasing length."""
    from fedrank.evaluate import _lanes

    conts = [[[1] * 5, [1] * 1, [1] * 9], [[1] * 3], [[1] * 40, [1] * 2, [1] * 2], []]
    lanes = _lanes(conts, width=10)
    for r, row in enumerate(conts):
        assert sorted(k for lr, ks in lanes if lr == r for k in ks) == list(range(len(row)))
    for r, ks in lanes:
        assert sum(len(conts[r][k]) for k in ks) <= 10 or len(ks) == 1
    assert lanes == [(0, [2, 1]), (0, [0]), (1, [0]), (2, [0]), (2, [1, 2])]


def test_continuation_groups_bound_positions_and_the_copied_cache() -> None:
    """_chunks: shortest first; each group's rows x widest <= max_positions and rows x (context + widest) <=
    max_cached (a row over a bound alone); every item exactly once."""
    from fedrank.evaluate import _chunks

    widths = [5, 1, 9, 3, 3, 7, 2, 40]
    groups = _chunks(list(range(8)), widths, max_positions=12, context=20, max_cached=50)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [widths[g[0]] for g in groups] == sorted(widths[g[0]] for g in groups)
    for g in groups:
        widest = max(widths[i] for i in g)
        assert len(g) == 1 or (len(g) * widest <= 12 and len(g) * (20 + widest) <= 50)
    assert max(len(g) for g in groups) == 2  # the cache bound, not the positions bound, decides here
    assert len(_chunks(list(range(8)), widths, max_positions=12)) < len(groups)  # no cache bound: fewer groups
