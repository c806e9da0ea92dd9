"""Evaluation the way the papers do it: Rouge-L on *generated* text (greedy, batched), multiple-choice
accuracy from option log-likelihoods, and answer loss / perplexity; per task and macro-averaged."""

from __future__ import annotations

import functools
import hashlib
import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedrank.data.examples import Example
from fedrank.data.tokenize import IGNORE, Encoded, encode, prompt_text
from fedrank.models.loading import decoder_and_head, kv_cache, select_cache


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 16
    """Generated tokens at least; a task whose longest reference is longer gets that many (up to the cap)."""
    max_new_tokens_cap: int = 64
    """The most tokens generated for any task, however long its references."""
    batch_size: int = 8
    """Multiple-choice prompts per prompt pass, and generative ones when nothing is generated (continuations
    are then scored in lanes after copies of their prompts' caches, :func:`_packed_logliks`)."""
    generate_batch_size: int = 32
    """Prompts decoded together (one prompt pass, then greedy steps): a decoding step reads every weight once
    whatever the rows, so more rows per step cost little more; the text does not depend on it."""
    max_seq_len: int = 256
    """Prompt tokens kept (from the end) for a generative example, or so that the longest option fits for a
    multiple-choice one: each example's one context (:func:`score_and_generate`)."""
    generate: bool = True
    """Rouge-L on generated text for generative tasks (the costly part)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.max_new_tokens_cap < self.max_new_tokens:
            raise ValueError(
                f"eval max_new_tokens must be positive and <= max_new_tokens_cap, got {self.max_new_tokens} "
                f"and {self.max_new_tokens_cap}"
            )
        if self.batch_size <= 0 or self.generate_batch_size <= 0 or self.max_seq_len < 2:
            raise ValueError("eval batch_size and generate_batch_size must be positive and max_seq_len >= 2")

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
        from nltk.stem import porter

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


@functools.cache
def _scorer() -> Any:
    """rouge-score's scorer, built on first use: importing it (nltk, scipy) costs about 1.5 s, which a
    process that only trains (a Flower node's per-message ClientApp) need not pay."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best Rouge-L F1 of ``prediction`` over ``references`` (rouge-score's LCS, :class:`UnicodeTokenizer`)."""
    return max(float(_scorer().score(ref, prediction)["rougeL"].fmeasure) for ref in references)


def _normalize(s: str) -> str:
    """OpenAI evals' ``normalize`` (evals/elsuite/utils.py): lower case, no punctuation, no articles, single
    spaces."""
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def follows_rule(rule: str, generated: str, references: Sequence[str]) -> bool:
    """Whether a generated answer passes its source's own rule (:data:`fedrank.data.examples.RULES`), as
    OpenAI evals' classes define it: Match, ``generated.startswith(ref)``; Includes, ``ref`` occurs in it
    (``includes_ci``: ignoring case); FuzzyMatch, normalised containment either way (two empty strings
    match, one empty string does not)."""
    if rule == "match":
        return any(generated.startswith(r) for r in references)
    if rule == "includes":
        return any(r in generated for r in references)
    if rule == "includes_ci":
        return any(r.lower() in generated.lower() for r in references)
    if rule == "fuzzy":
        g = _normalize(generated)
        return any((g == n) if not g or not n else (g in n or n in g) for n in map(_normalize, references))
    raise ValueError(f"unknown answer rule {rule!r}")


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
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Example],
    cfg: EvalConfig,
    max_new_tokens: int | None = None,
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


def _answer_len(e: Encoded) -> int:
    return sum(v != IGNORE for v in e.labels)


def _answer_batches(enc: Sequence[Encoded], batch_size: int, max_positions: int) -> list[list[Encoded]]:
    """Consecutive batches of at most ``batch_size`` examples and ``max_positions`` projected positions."""
    out: list[list[Encoded]] = []
    for e in enc:
        last = out[-1] if out else None
        width = max([_answer_len(x) for x in last or []] + [_answer_len(e)]) + 1
        if last is None or len(last) >= batch_size or (len(last) + 1) * width > max_positions:
            out.append([e])
        else:
            last.append(e)
    return out


@torch.no_grad()
def answer_nll(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: EvalConfig,
    answers: Sequence[str] | None = None,
    max_positions: int = 512,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each example's answer (or of ``answers``).

    Batches are left-padded (position ids counted from each row's first token, as :func:`generate` does),
    so every answer ends at the last column and the vocabulary projection runs only over the last
    longest-answer + 1 positions instead of every prompt token; a batch of long answers is split so that
    at most ``max_positions`` rows x positions are projected at once (each is a vocabulary-wide vector)."""
    device = next(model.parameters()).device
    enc = [
        encode(tokenizer, ex, cfg.max_seq_len, None if answers is None else answers[i]) for i, ex in enumerate(examples)
    ]
    out: list[tuple[float, int]] = []
    was = model.training
    model.eval()
    for part in _answer_batches(enc, cfg.batch_size, max_positions):
        ids, mask, pos = _left_pad([e.input_ids for e in part], tokenizer.pad_token_id, device)
        labels = _left_pad([e.labels for e in part], IGNORE, device)[0]
        keep = min(max(_answer_len(e) for e in part) + 1, ids.shape[1])
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
        labels = labels[:, ids.shape[1] - keep + 1 :]
        for j in range(len(part)):  # one row's log-probabilities at a time: no second batch-sized copy
            logp = torch.log_softmax(logits[j, :-1].float(), dim=-1)
            valid = labels[j] != IGNORE
            tok = logp.gather(-1, labels[j].clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
            out.append((-float(tok.sum()), int(valid.sum())))
    model.train(was)
    return out


def reference_answer_nll(model: nn.Module, tokenizer: Any, ex: Example, cfg: EvalConfig) -> tuple[float, int]:
    """An example's answer loss as :func:`evaluate_task` defines it, by the separate route: :func:`answer_nll`
    with the prompt cut to the example's one context (its last ``cfg.max_seq_len`` tokens, or, multiple
    choice, what leaves room for the longest option), the answer after it. For tests and benchmarks."""
    eos = tokenizer.eos_token
    answer = len(tokenizer(ex.target + eos, add_special_tokens=False)["input_ids"][: cfg.max_seq_len - 1])
    budget = cfg.max_seq_len
    if ex.is_multiple_choice:
        opts = [tokenizer(c + eos, add_special_tokens=False)["input_ids"] for c in ex.choices or ()]
        budget -= max(min(len(o), cfg.max_seq_len - 1) for o in opts)
    ((nll, count),) = answer_nll(model, tokenizer, [ex], replace(cfg, max_seq_len=budget + answer))
    return nll, count


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
    p_ids = tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]
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
        cache = select_cache(out.cache, torch.zeros(n, dtype=torch.long, device=device))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, cache=cache).logits.float(), -1)
        for j, o in enumerate(part):
            rest = logp[j, torch.arange(len(o) - 1), torch.tensor(o[1:], dtype=torch.long)].sum() if len(o) > 1 else 0.0
            scores.append(float(first[o[0]] + rest))
    model.train(was)
    return scores


def evaluate_task(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig) -> dict[str, float]:
    """Loss and perplexity on the answers, accuracy on multiple-choice examples, Rouge-L on generative ones
    and, where examples carry their source's rule, the share that passes it (``match``).

    One prompt pass per example serves everything (:func:`score_and_generate`); the same numbers as
    :func:`answer_nll`, :func:`choice_logliks` and :func:`generate` to float tolerance, and the same text."""
    if not examples:
        raise ValueError("cannot evaluate a task with no examples")
    gen = [e for e in examples if not e.is_multiple_choice]
    new = cfg.new_tokens(longest_reference(tokenizer, gen)) if gen and cfg.generate else 0
    scored = score_and_generate(model, tokenizer, examples, cfg, new)
    total, count = sum(s.nll for s in scored), sum(s.tokens for s in scored)
    loss = total / max(count, 1)
    res: dict[str, float] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": float(len(examples))}
    mc = [(e, s) for e, s in zip(examples, scored, strict=True) if e.is_multiple_choice]
    if mc:  # BIG-bench's multiple_choice_grade: the chosen option's target score (ties, graded credit)
        res["accuracy"] = sum(e.credit(choose(s.option_logliks)) for e, s in mc) / len(mc)
    if new:
        pairs = [(e, s.generated) for e, s in zip(examples, scored, strict=True) if not e.is_multiple_choice]
        res["rougeL"] = sum(rouge_l(p, e.references) for e, p in pairs) / len(pairs)
        ruled = [(e, p) for e, p in pairs if e.rule]
        if ruled:  # the source's own rule (OpenAI evals: Match, Includes, FuzzyMatch)
            res["match"] = sum(follows_rule(e.rule, p, e.references) for e, p in ruled) / len(ruled)
        res["new_tokens"] = float(new)
    return res


@dataclass
class Scored:
    """What one prompt pass yields for an example."""

    nll: float = 0.0
    """Summed negative log-likelihood of the answer (``Example.target``)."""
    tokens: int = 0
    """Answer tokens (the end-of-turn token included)."""
    option_logliks: list[float] = field(default_factory=list)
    """Multiple choice: each option's log-likelihood."""
    generated: str = ""
    """Generative: the greedy continuation."""
    generated_tokens: int = 0
    """Tokens generated, up to and including the end of turn."""


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ids, attention mask and position ids (0 at each row's first real token, as ``generate``
    numbers them)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids.to(device), mask.to(device), pos.to(device)


CACHED_POSITIONS = 3072
"""The most prompt-cache positions (lanes x prompt width) copied at once to score continuations: SmolLM2-135M
keeps 46 KB per position (30 layers' keys and values), so 3,072 positions are 141 MB."""
LANE_POSITIONS = 1024
"""The most continuation positions (lanes x widest lane) scored in one pass."""
HEAD_POSITIONS = 256
"""Positions projected onto the vocabulary at once (each a vocabulary-wide vector, 196 KB for SmolLM2)."""


def _lanes(conts: Sequence[Sequence[Sequence[int]]], width: int) -> list[tuple[int, list[int]]]:
    """Each row's continuations ``conts[r]`` packed into lanes of at most ``width`` tokens (a longer one
    alone), first fit in order of decreasing length: (row, indices of the continuations in the lane)."""
    out: list[tuple[int, list[int]]] = []
    for r, row in enumerate(conts):
        fill: list[int] = []
        lanes: list[list[int]] = []
        for k in sorted(range(len(row)), key=lambda k: (-len(row[k]), k)):
            i = next((i for i, f in enumerate(fill) if f + len(row[k]) <= width), len(lanes))
            if i == len(lanes):
                fill.append(0)
                lanes.append([])
            fill[i] += len(row[k])
            lanes[i].append(k)
        out += [(r, lane) for lane in lanes]
    return out


def _chunks(
    items: Sequence[Any], widths: Sequence[int], max_positions: int, context: int = 0, max_cached: int = 0
) -> list[list[Any]]:
    """``items`` in order of ``widths`` (shortest first), grouped so that a group's rows x widest row is at most
    ``max_positions`` and, where ``max_cached`` > 0, its rows x (``context`` + widest row) at most
    ``max_cached`` (a row over either alone): lanes of similar lengths are scored together, so short ones
    are not padded to a long one, and each group's copy of the prompts' KV cache stays bounded."""
    out: list[list[Any]] = []
    for j in sorted(range(len(items)), key=lambda j: (widths[j], j)):
        rows = len(out[-1]) + 1 if out else 0
        if out and rows * widths[j] <= max_positions and (not max_cached or rows * (context + widths[j]) <= max_cached):
            out[-1].append(items[j])
        else:
            out.append([items[j]])
    return out


def _packed_logliks(
    model: Any, cache: Any, first: Tensor, mask: Tensor, lengths: Tensor, conts: Sequence[Sequence[Sequence[int]]]
) -> list[list[Tensor]]:
    """Per-token log-likelihoods of the continuations ``conts[r]`` of every row r of a prompt batch (its KV
    ``cache``, last-position log-probabilities ``first``, attention ``mask`` and real ``lengths``); the cache
    is left as it was.

    A row's continuations are packed one after another into lanes (:func:`_lanes`, as wide as the batch's
    longest continuation), each lane after a copy of its prompt's cache: a continuation attends to the prompt
    and to its own earlier tokens only (a 4D attention mask) and is numbered from the prompt's end, as if it
    were alone. Lanes of similar widths are scored together (:func:`_chunks`), so little is padding, and
    only the positions that predict a continuation token are projected onto the vocabulary
    (:data:`HEAD_POSITIONS` at a time). Identical continuations of a row are scored once, so their scores
    are identical (BIG-bench breaks exact ties)."""
    device = mask.device
    decoder, head = decoder_and_head(model)
    dtype = next(decoder.parameters()).dtype
    distinct = [list(dict.fromkeys(tuple(c) for c in row)) for row in conts]
    scored: list[dict[tuple[int, ...], Tensor]] = [{} for _ in conts]
    longest = max((len(c) for row in distinct for c in row), default=0)
    lanes = _lanes(distinct, longest)
    fills = [sum(len(distinct[r][k]) for k in ks) for r, ks in lanes]
    prompt_width = mask.shape[1]
    for group in _chunks(range(len(lanes)), fills, LANE_POSITIONS, prompt_width, CACHED_POSITIONS):
        wave = [lanes[j] for j in group]
        n, width = len(wave), max(fills[j] for j in group)
        rows = torch.tensor([r for r, _ in wave], dtype=torch.long)
        ids = torch.zeros((n, width), dtype=torch.long)
        seg = torch.full((n, width), -1, dtype=torch.long)
        pos = lengths.cpu()[rows].unsqueeze(1).repeat(1, width)
        spans: list[tuple[int, int, tuple[int, ...], int]] = []  # lane, prompt row, continuation, start
        for i, (r, ks) in enumerate(wave):
            s = 0
            for k in ks:
                c = distinct[r][k]
                ids[i, s : s + len(c)] = torch.tensor(c)
                seg[i, s : s + len(c)] = k
                pos[i, s : s + len(c)] += torch.arange(len(c))
                spans.append((i, r, c, s))
                s += len(c)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        own = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (seg.unsqueeze(1) >= 0) & causal
        prompt = mask.cpu().bool()[rows].unsqueeze(1).expand(n, width, prompt_width)
        allowed = torch.cat([prompt, own], dim=2)
        attn = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = decoder(
            input_ids=ids.to(device),
            attention_mask=attn.unsqueeze(1).to(device),
            position_ids=pos.to(device),
            cache=select_cache(cache, rows.to(device)),
            use_cache=True,
        )
        at_lane = [i for i, _, c, _ in spans for _ in range(len(c) - 1)]
        at_pos = [s + j for _, _, c, s in spans for j in range(len(c) - 1)]
        targets = torch.tensor([t for _, _, c, _ in spans for t in c[1:]], dtype=torch.long, device=device)
        hidden = out.last_hidden_state[torch.tensor(at_lane, dtype=torch.long), torch.tensor(at_pos, dtype=torch.long)]
        del out
        logp = torch.empty(len(at_lane), dtype=torch.float32, device=device)
        for i in range(0, len(at_lane), HEAD_POSITIONS):
            part = torch.log_softmax(head(hidden[i : i + HEAD_POSITIONS]).float(), dim=-1)
            logp[i : i + HEAD_POSITIONS] = part.gather(-1, targets[i : i + HEAD_POSITIONS].unsqueeze(-1)).squeeze(-1)
        at = 0
        for _, r, c, _ in spans:
            scored[r][c] = torch.cat([first[r, c[0]].reshape(1), logp[at : at + len(c) - 1]])
            at += len(c) - 1
    return [[scored[r][tuple(c)] for c in row] for r, row in enumerate(conts)]


def _greedy(
    model: Any,
    cache: Any,
    first: Tensor,
    mask: Tensor,
    lengths: Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy decoding from a prompt batch's KV cache, as ``model.generate(do_sample=False)`` decodes (the
    same inputs step by step), stopping when every row has ended its turn; each row's tokens up to and
    including its end-of-turn token. Rows that have ended leave the batch (their cache rows dropped) once a
    quarter of the live rows have ended, so the remaining steps compute only the rows still decoding; a
    row's computation does not depend on the others, so its text is the same either way."""
    device = mask.device
    out: list[list[int]] = [[] for _ in range(first.shape[0])]
    live = torch.arange(first.shape[0], device=device)  # batch row -> example row
    nxt = first.float().argmax(-1)
    done = torch.zeros(len(live), dtype=torch.bool, device=device)
    pos = lengths.unsqueeze(1)
    for step in range(max_new_tokens):
        for r, t, ended in zip(live.tolist(), nxt.tolist(), done.tolist(), strict=True):
            if not ended:
                out[r].append(t)
        done |= nxt == eos_id
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        if int(done.sum()) * 4 >= len(live):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, nxt, mask, pos = live[keep], nxt[keep], mask[keep], pos[keep]
            done = done[keep]
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=1)
        step_ids = nxt.masked_fill(done, pad_id).unsqueeze(1)
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, cache=cache).logits
        nxt = logits[:, -1].float().argmax(-1)
        pos = pos + 1
    return out


@dataclass
class _Context:
    """One example as :func:`score_and_generate` runs it: the prompt tokens every number of the example is
    computed after, and the continuations scored there."""

    index: int
    prompt: list[int]
    conts: list[list[int]]
    """Multiple choice: the options (then the target, where it is no option); generative: the answer."""


def _contexts(
    tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, score: bool
) -> tuple[list[_Context], list[_Context]]:
    """Multiple-choice and generative examples' contexts (see :func:`score_and_generate`)."""
    n_max, eos = cfg.max_seq_len, tokenizer.eos_token
    mc: list[_Context] = []
    gen: list[_Context] = []
    for i, ex in enumerate(examples):
        if ex.is_multiple_choice and not score:
            continue
        p: list[int] = tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]
        a: list[int] = tokenizer(ex.target + eos, add_special_tokens=False)["input_ids"][: n_max - 1]
        if ex.is_multiple_choice:
            choices = ex.choices or ()
            opts = [tokenizer(c + eos, add_special_tokens=False)["input_ids"][: n_max - 1] for c in choices]
            keep = n_max - max(len(o) for o in opts)
            mc.append(_Context(i, p[max(0, len(p) - keep) :], opts if ex.target in choices else [*opts, a]))
        else:
            gen.append(_Context(i, p[max(0, len(p) - n_max) :], [a] if score else []))
    return mc, gen


SHARED_PREFIX_MIN = 16
"""Prompts of a batch sharing at least this many leading tokens compute them once (:func:`_prompt_pass`)."""


def _prompt_pass(
    model: Any, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Any, Tensor, Tensor]:
    """One batch of prompts through the model with a KV cache: (cache, last position's logits, attention mask);
    every row's next token goes at position ``mask.sum(1)``.

    Left-padded, so that every prompt ends at the last column. Where the prompts share their first
    :data:`SHARED_PREFIX_MIN` or more tokens (a task's instructions, the chat template's system turn), the
    shared part is computed once and its cache copied to every row, and only the rest is left-padded after it
    (pad columns between the two, masked out): the same numbers to float rounding, fewer tokens computed."""
    shared = min(len(p) for p in prompts) - 1  # every row keeps a token of its own (its last logits)
    for p in prompts[1:]:
        shared = next((i for i in range(shared) if p[i] != prompts[0][i]), shared)
    cache = kv_cache()
    if len(prompts) < 2 or shared < SHARED_PREFIX_MIN:
        ids, mask, pos = _left_pad(prompts, pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)
        return cache, out.logits[:, -1], mask
    model(input_ids=torch.tensor([list(prompts[0][:shared])], device=device), cache=cache, logits_to_keep=1)
    cache = select_cache(cache, torch.zeros(len(prompts), dtype=torch.long, device=device))
    ids, tail_mask, _ = _left_pad([p[shared:] for p in prompts], pad_id, device)
    pos = (shared + tail_mask.cumsum(-1) - 1).masked_fill(tail_mask == 0, 1)
    mask = torch.cat([torch.ones((len(prompts), shared), dtype=tail_mask.dtype, device=device), tail_mask], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)
    return cache, out.logits[:, -1], mask


@torch.no_grad()
def score_and_generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: EvalConfig,
    max_new_tokens: int = 0,
    *,
    score: bool = True,
) -> list[Scored]:
    """Answer loss, option log-likelihoods (multiple choice) and greedy generations (generative examples,
    when ``max_new_tokens`` > 0) from one prompt pass per example (``score=False``: generations only).

    Each example has one context, the prompt as every one of its numbers sees it:
    - multiple choice: the prompt cut from the left so that the longest option fits in ``cfg.max_seq_len``
      (:func:`choice_logliks`' context); the options are scored after it, and the answer loss is the target
      option's score (a target that is no option is scored there as one more continuation);
    - generative: the prompt's last ``cfg.max_seq_len`` tokens (what the model generates from, as
      :func:`generate` cuts it); the answer is scored after it, then the greedy continuation decodes from it.
    Where nothing is cut these are :func:`answer_nll`'s and :func:`choice_logliks`' numbers, to float
    tolerance. A cut prompt's answer is scored in the context the model generates from (``answer_nll`` cuts
    the prompt further, to fit the answer too, which would need a second prompt pass).

    Prompts are grouped by length (fewer pad tokens), left-padded and run once with a KV cache (a prefix the
    batch shares computed once, :func:`_prompt_pass`),
    ``cfg.generate_batch_size`` generative prompts (``cfg.batch_size`` when only scoring) or
    ``cfg.batch_size`` multiple-choice prompts at a time; the continuations of a batch are scored together,
    packed into lanes after copies of their prompts' caches (:func:`_packed_logliks`), then generative
    batches decode greedily with early stop at the end of turn (the text of ``model.generate``).
    """
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    scored = [Scored() for _ in examples]
    mc, gen = _contexts(tokenizer, examples, cfg, score)
    gen_step = cfg.generate_batch_size if max_new_tokens else cfg.batch_size
    was = model.training
    model.eval()
    try:
        for group, step, decode in ((mc, cfg.batch_size, False), (gen, gen_step, bool(max_new_tokens))):
            group = sorted(group, key=lambda c: (len(c.prompt), c.index))
            for b in range(0, len(group), step):
                batch = group[b : b + step]
                cache, last, mask = _prompt_pass(model, [c.prompt for c in batch], pad_id, device)
                first = torch.log_softmax(last.float(), dim=-1)
                lengths = mask.sum(1)
                lls = _packed_logliks(model, cache, first, mask, lengths, [c.conts for c in batch])
                for r, c in enumerate(batch):
                    ex, s = examples[c.index], scored[c.index]
                    ll = lls[r]
                    if ex.is_multiple_choice:
                        choices = ex.choices or ()
                        s.option_logliks = [float(x.sum()) for x in ll[: len(choices)]]
                        target = choices.index(ex.target) if ex.target in choices else len(choices)
                        s.nll, s.tokens = -float(ll[target].sum()), len(c.conts[target])
                    elif ll:
                        s.nll, s.tokens = -float(ll[0].sum()), len(c.conts[0])
                if decode:
                    toks = _greedy(model, cache, last, mask, lengths, max_new_tokens, eos_id, pad_id)
                    for c, new in zip(batch, toks, strict=True):
                        scored[c.index].generated = tokenizer.decode(new, skip_special_tokens=True).strip()
                        scored[c.index].generated_tokens = len(new)
                del cache, last
    finally:
        model.train(was)
    return scored


def longest_reference(tokenizer: Any, examples: Sequence[Example]) -> int:
    """Tokens in the longest reference answer of ``examples``."""
    refs = [r for e in examples for r in e.references]
    return max(len(ids) for ids in tokenizer(refs, add_special_tokens=False)["input_ids"])


def macro_average(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the tasks that report it."""
    keys = sorted({k for m in per_task.values() for k in m if k not in ("n", "new_tokens")})
    return {k: sum(m[k] for m in per_task.values() if k in m) / sum(k in m for m in per_task.values()) for k in keys}
