"""One training/evaluation example, framework-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RULES = ("", "match", "includes", "includes_ci", "fuzzy")
"""A generated answer's own rule (OpenAI evals' classes): ``match``, it starts with a reference (Match);
``includes`` / ``includes_ci``, a reference occurs in it, case kept / ignored (Includes); ``fuzzy``, after
lower-casing and dropping punctuation, articles and extra spaces, either contains the other (FuzzyMatch)."""


@dataclass(frozen=True)
class Example:
    """A prompt and its answer.

    ``references``: every acceptable answer (Rouge-L takes the best). ``choices``/``correct``: the options
    of a multiple-choice example and the index of the best-scored one. ``scores``: BIG-bench's
    ``target_scores`` per option (the credit for choosing it; several options may score, some partially);
    None means 1 for ``correct`` and 0 otherwise. ``messages``: the chat turns before the answer, (role,
    content) pairs, when the source is chat-formatted and the run keeps that format (``data.prompt_format =
    "chat"``); empty: ``prompt`` is one user turn. ``rule``: the source's own rule for a generated answer
    (:data:`RULES`), scored besides Rouge-L; empty: none.
    """

    prompt: str
    target: str
    references: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    correct: int | None = None
    task: str = ""
    scores: tuple[float, ...] | None = None
    messages: tuple[tuple[str, str], ...] = ()
    rule: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown answer rule {self.rule!r}; known: {', '.join(r for r in RULES if r)}")
        if not self.references:
            object.__setattr__(self, "references", (self.target,))
        if self.choices is not None and not (self.correct is not None and 0 <= self.correct < len(self.choices)):
            raise ValueError(f"multiple-choice example needs 0 <= correct < {len(self.choices)}, got {self.correct}")
        if self.scores is not None and (self.choices is None or len(self.scores) != len(self.choices)):
            raise ValueError("target scores need one score per choice")

    def credit(self, chosen: int) -> float:
        """What choosing option ``chosen`` earns (BIG-bench's multiple_choice_grade: target_scores[chosen])."""
        if self.scores is not None:
            return self.scores[chosen]
        return 1.0 if chosen == self.correct else 0.0

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None and self.correct is not None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "target": self.target, "task": self.task}
        if self.references and self.references != (self.target,):
            d["references"] = list(self.references)
        if self.choices is not None:
            d["choices"], d["correct"] = list(self.choices), self.correct
        if self.scores is not None:
            d["scores"] = list(self.scores)
        if self.messages:
            d["messages"] = [list(m) for m in self.messages]
        if self.rule:
            d["rule"] = self.rule
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Example:
        choices = d.get("choices")
        return Example(
            prompt=d["prompt"],
            target=d["target"],
            references=tuple(d.get("references") or (d["target"],)),
            choices=tuple(choices) if choices is not None else None,
            correct=d.get("correct"),
            task=d.get("task", ""),
            scores=tuple(float(v) for v in d["scores"]) if d.get("scores") is not None else None,
            messages=tuple((str(r), str(c)) for r, c in d.get("messages", ())),
            rule=d.get("rule", ""),
        )
