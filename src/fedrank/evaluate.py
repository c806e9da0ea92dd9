"""Evaluation the way the papers do it: Rouge-L on *generated* text (greedy, batched), multiple-choice
accuracy from option log-likelihoods, and answer loss / perplexity; per task and macro-averaged."""

from __future__ import annotations

import copy
import hashlib
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nltk.stem import porter
from rouge_score import rouge_scorer
from torch import nn

from fedrank.data.examples import Example
from fedrank.data.tokenize import IGNORE, collate, encode, prompt_text


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 16
    """Generated tokens at least; a task whose longest reference is longer gets that many (up to the cap)."""
    max_new_tokens_cap: int = 64
    """The most tokens generated for any task, however long its references."""
    batch_size: int = 8
    max_seq_len: int = 256
    generate: bool = True
    """Rouge-L on generated text for generative tasks (the costly part)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.max_new_tokens_cap < self.max_new_tokens:
            raise ValueError(
                f"eval max_new_tokens must be positive and <= max_new_tokens_cap, got {self.max_new_tokens} "
                f"and {self.max_new_tokens_cap}"
            )
        if self.batch_size <= 0 or self.max_seq_len < 2:
            raise ValueError("eval batch_size must be positive and max_seq_len >= 2")

    def new_tokens(self, longest_reference: int) -> int:
        """Tokens to generate for a task whose longest reference has ``longest_reference`` tokens."""
        return min(self.max_new_tokens_cap, max(self.max_new_tokens, longest_reference))


_NO_SPACES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
)
"""Scripts written without spaces between words: each character is one token."""


def _no_spaces(ch: str) -> bool:
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in _NO_SPACES)


class UnicodeTokenizer:
    """rouge-score's tokenisation (lower case, words, Porter stemming of ASCII words longer than 3) without
    its ``[a-z0-9]`` filter, which turns any Cyrillic, Greek, Devanagari or Chinese answer into no tokens at
    all (Rouge-L 0 whatever was generated). Text is NFC-normalised; a word is a run of letters, digits and
    combining marks (Devanagari's vowel signs stay inside their word); characters of scripts written without
    spaces (Chinese, Japanese, Thai, Lao, Khmer, Myanmar) are one token each."""

    def __init__(self) -> None:
        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words: list[str] = []
        word: list[str] = []
        for ch in unicodedata.normalize("NFC", text.lower()):
            if _no_spaces(ch) and unicodedata.category(ch)[0] in "LM":
                words.extend(["".join(word), ch] if word else [ch])
                word = []
            elif ch.isalnum() or unicodedata.category(ch)[0] == "M":
                word.append(ch)
            elif word:
                words.append("".join(word))
                word = []
        if word:
            words.append("".join(word))
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() and w.isalnum() else w for w in words]


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best Rouge-L F1 of ``prediction`` over ``references`` (rouge-score's LCS, :class:`UnicodeTokenizer`)."""
    return max(float(_SCORER.score(ref, prediction)["rougeL"].fmeasure) for ref in references)


def choose(logliks: Sequence[float]) -> int:
    """BIG-bench's argmax: the most likely option, ties broken deterministically by the scores' bytes."""
    best = max(logliks)
    tied = [i for i, v in enumerate(logliks) if v == best]
    if len(tied) == 1:
        return tied[0]
    digest = hashlib.sha256(np.asarray(logliks, dtype=np.float64).tobytes()).hexdigest()
    return tied[int(digest, 16) % len(tied)]


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvalConfig, max_new_tokens: int | None = None
) -> list[str]:
    """Greedy continuations of chat-formatted prompts, in batches, left-padded (``max_new_tokens``
    defaults to ``cfg.max_new_tokens``)."""
    out: list[str] = []
    device = next(model.parameters()).device
    sides = tokenizer.padding_side, tokenizer.truncation_side
    # left padding for batched generation; a too-long prompt loses its beginning, never the turn header
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        for i in range(0, len(prompts), cfg.batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[i : i + cfg.batch_size]]
            enc = tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=cfg.max_seq_len,
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return out


@torch.no_grad()
def answer_nll(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, answers: Sequence[str] | None = None
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each example's answer (or of ``answers``)."""
    device = next(model.parameters()).device
    enc = [
        encode(tokenizer, ex, cfg.max_seq_len, None if answers is None else answers[i]) for i, ex in enumerate(examples)
    ]
    out: list[tuple[float, int]] = []
    was = model.training
    model.eval()
    for i in range(0, len(enc), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(enc[i : i + cfg.batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != IGNORE
        tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        out.extend(zip((-tok.sum(1)).tolist(), mask.sum(1).tolist(), strict=True))
    model.train(was)
    return out


@torch.no_grad()
def choice_logliks(model: Any, tokenizer: Any, ex: Example, cfg: EvalConfig, chunk: int = 32) -> list[float]:
    """Log-likelihood of each option of a multiple-choice example (BIG-bench's unnormalised score).

    The prompt runs once and its KV cache is shared by the options (batched, right-padded), so scoring n
    options costs one prompt plus n short continuations instead of n full sequences. Tokenisation matches
    :func:`fedrank.data.tokenize.encode`; a prompt too long for ``max_seq_len`` is cut from the left once,
    to fit the longest option, so that every option is scored in the same context.
    """
    device = next(model.parameters()).device
    opts = [tokenizer(c + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for c in ex.choices or ()]
    opts = [o[: cfg.max_seq_len - 1] for o in opts]
    p_ids = tokenizer(prompt_text(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
    p_ids = p_ids[max(0, len(p_ids) - (cfg.max_seq_len - max(len(o) for o in opts))) :]
    was = model.training
    model.eval()
    out = model(input_ids=torch.tensor([p_ids], device=device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores: list[float] = []
    for i in range(0, len(opts), chunk):
        part = opts[i : i + chunk]
        n, width = len(part), max(len(o) for o in part)
        ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, len(p_ids) + width), dtype=torch.long, device=device)
        mask[:, : len(p_ids)] = 1
        for j, o in enumerate(part):
            ids[j, : len(o)] = torch.tensor(o)
            mask[j, len(p_ids) : len(p_ids) + len(o)] = 1
        cache = copy.deepcopy(out.cache)
        cache.batch_repeat_interleave(n)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, cache=cache).logits.float(), -1)
        for j, o in enumerate(part):
            rest = logp[j, torch.arange(len(o) - 1), torch.tensor(o[1:], dtype=torch.long)].sum() if len(o) > 1 else 0.0
            scores.append(float(first[o[0]] + rest))
    model.train(was)
    return scores


def evaluate_task(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig) -> dict[str, float]:
    """Loss and perplexity on the answers, accuracy on multiple-choice examples, Rouge-L on generative ones."""
    if not examples:
        raise ValueError("cannot evaluate a task with no examples")
    nll = answer_nll(model, tokenizer, examples, cfg)
    total, count = sum(n for n, _ in nll), sum(c for _, c in nll)
    loss = total / max(count, 1)
    res: dict[str, float] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": float(len(examples))}
    mc = [e for e in examples if e.is_multiple_choice]
    if mc:  # BIG-bench's multiple_choice_grade: the chosen option's target score (ties, graded credit)
        res["accuracy"] = sum(e.credit(choose(choice_logliks(model, tokenizer, e, cfg))) for e in mc) / len(mc)
    gen = [e for e in examples if not e.is_multiple_choice]
    if gen and cfg.generate:
        new = cfg.new_tokens(longest_reference(tokenizer, gen))
        preds = generate(model, tokenizer, [e.prompt for e in gen], cfg, new)
        res["rougeL"] = sum(rouge_l(p, e.references) for p, e in zip(preds, gen, strict=True)) / len(gen)
        res["new_tokens"] = float(new)
    return res


def longest_reference(tokenizer: Any, examples: Sequence[Example]) -> int:
    """Tokens in the longest reference answer of ``examples``."""
    refs = [r for e in examples for r in e.references]
    return max(len(ids) for ids in tokenizer(refs, add_special_tokens=False)["input_ids"])


def macro_average(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the tasks that report it."""
    keys = sorted({k for m in per_task.values() for k in m if k not in ("n", "new_tokens")})
    return {k: sum(m[k] for m in per_task.values() if k in m) / sum(k in m for m in per_task.values()) for k in keys}
