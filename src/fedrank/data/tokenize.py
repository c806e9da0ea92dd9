"""Prompts through the tokenizer's chat template; the loss covers only the answer tokens.

The tokenizer is duck-typed (``apply_chat_template``, ``__call__``, ``pad_token_id``, ``eos_token``): no
framework import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

from fedrank.data.examples import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """IGNORE on prompt tokens, the token id on answer tokens (the end-of-turn token included)."""
    truncated: bool


def prompt_text(tokenizer: Any, prompt: str | Example) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts: the example's own chat turns
    (``Example.messages``) where it keeps them, else its prompt as one user turn."""
    if isinstance(prompt, Example) and prompt.messages:
        turns = [{"role": r, "content": c} for r, c in prompt.messages]
    else:
        turns = [{"role": "user", "content": prompt.prompt if isinstance(prompt, Example) else prompt}]
    text: str = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return text


def encode(tokenizer: Any, ex: Example, max_len: int, answer: str | None = None) -> Encoded:
    """Token ids of prompt + answer (+ end of turn) with labels on the answer only.

    Over ``max_len`` tokens, the prompt loses tokens from its left (the answer is kept); an answer longer
    than ``max_len`` alone is cut on the right. Either way ``truncated`` is set so callers can count it.
    """
    if max_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_len}")
    p_ids: list[int] = tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]
    a_text = (ex.target if answer is None else answer) + tokenizer.eos_token
    a_ids: list[int] = tokenizer(a_text, add_special_tokens=False)["input_ids"]
    truncated = len(p_ids) + len(a_ids) > max_len
    if truncated:
        a_ids = a_ids[: max_len - 1]
        p_ids = p_ids[len(p_ids) - (max_len - len(a_ids)) :]
    return Encoded(p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids, truncated)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids / attention_mask / labels tensors."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(batch: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """The same examples as :func:`collate`, packed: first-fit decreasing into rows as wide as the longest
    example, so that short examples share a row instead of each being padded to the longest.

    ``position_ids`` restart at 0 for every example (and for a row's trailing padding), which is how
    transformers recognises packed sequences when no attention mask is given: attention is causal within each
    example and never crosses into another. Labels are the examples' own (IGNORE on prompts), and each
    example's first token is IGNORE as well, so no loss term predicts one example from the one before it.
    The loss over the packed batch is the collated batch's loss (the same answer tokens, each in its own
    context), up to float rounding."""
    width = max(len(e.input_ids) for e in batch)
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(batch)), key=lambda i: -len(batch[i].input_ids)):  # stable: ties keep batch order
        n = len(batch[i].input_ids)
        r = next((r for r, load in enumerate(loads) if load + n <= width), len(rows))
        if r == len(rows):
            rows.append([])
            loads.append(0)
        rows[r].append(i)
        loads[r] += n
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            e, n = batch[i], len(batch[i].input_ids)
            ids[r, off : off + n] = torch.tensor(e.input_ids)
            labels[r, off + 1 : off + n] = torch.tensor(e.labels[1:])
            pos[r, off : off + n] = torch.arange(n)
            off += n
        pos[r, off:] = torch.arange(width - off)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


class LazyEncoded(Sequence[Encoded]):
    """Examples encoded on first access: a client trains a few steps on a task of thousands of examples."""

    def __init__(self, tokenizer: Any, examples: Sequence[Example], max_len: int):
        self.tokenizer, self.examples, self.max_len = tokenizer, examples, max_len
        self._cache: dict[int, Encoded] = {}

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, i: int) -> Encoded: ...

    @overload
    def __getitem__(self, i: slice) -> list[Encoded]: ...

    def __getitem__(self, i: int | slice) -> Encoded | list[Encoded]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i not in self._cache:
            self._cache[i] = encode(self.tokenizer, self.examples[i], self.max_len)
        return self._cache[i]

    @property
    def truncated(self) -> int:
        """How many of the examples encoded so far were truncated."""
        return sum(e.truncated for e in self._cache.values())
