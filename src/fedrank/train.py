"""Local training of one client's LoRA (no FL logic: the caller decides what is trainable).

AdamW (or SGD with momentum) with linear warm-up, a fixed number of optimizer steps (or epochs),
micro-batches with gradient accumulation, gradient clipping, a seeded data order and optional bf16
autocast. FL methods reach it only through what the model exposes as trainable (FFA: A frozen), the
scaling set on the adapter (FSLoRA's r/k), and an optional regulariser (HetLoRA's self-pruning penalty).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fedrank.data.tokenize import IGNORE, Encoded, collate, pack
from fedrank.models.loading import decoder_and_head
from fedrank.models.onednn import OneDNNLinear, linear

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    steps: int = 4
    """Optimizer steps per round; 0 means use ``epochs``."""
    epochs: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_seq_len: int = 256
    precision: str = "fp32"
    optimizer: str = "adamw"
    """"adamw", or "sgd" (FSLoRA's official code: its r/k sketch scale then reaches the update through the
    gradient; AdamW normalises it away, shrinking each index's expected server step by about k_i/r)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    pack: bool = True
    """Pack each micro-batch's examples into as few rows as fit (no attention across examples, see
    :func:`fedrank.data.tokenize.pack`) and project onto the vocabulary only where an answer token is
    predicted, instead of padding every example to the longest and projecting every position. The same
    examples in the same steps, the same loss to float rounding; False: the padded batch through the model's
    own loss."""
    pass_tokens: int = 256
    """Token positions run through the model at a time: a packed micro-batch's rows go in passes of at most
    this many positions (at least one row each; 0: all rows at once). Activations are the memory of training
    (SmolLM2-135M: about 2 MB per position); rows are independent (no attention across rows), and each
    pass's loss is the sum over its answer tokens divided by the whole micro-batch's, so the gradient is the
    whole micro-batch's. 256 halves the activations of the quickstart's 512-position micro-batches; its cost
    was 2% on one fixed batch, but about 10% of the quickstart's training time (two passes per micro-batch);
    one 128-position row at a time costs 20% on the fixed batch."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"train.lr must be positive and finite, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0 or (self.nesterov and self.momentum == 0.0):
            raise ValueError(f"train.momentum must be in [0, 1) (> 0 for nesterov), got {self.momentum}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError("set train.steps > 0 or train.epochs > 0")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("train.batch_size and train.grad_accum must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_seq_len < 2:
            raise ValueError(f"train.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.pass_tokens < 0:
            raise ValueError(f"train.pass_tokens must be >= 0, got {self.pass_tokens}")

    def num_steps(self, num_examples: int) -> int:
        if self.steps:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * num_examples / per_step))


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over all micro-batches."""
    losses: list[float] = field(repr=False)
    """Loss of each optimizer step (mean over its micro-batches)."""
    examples: int
    """Examples drawn (an example drawn twice counts twice)."""
    seen: int
    """Distinct examples trained on."""
    tokens: int
    """Answer tokens that carried loss."""
    steps: int
    seconds: float


LOSS_CHUNK = 128
"""Answer positions projected onto the vocabulary at a time by :class:`_AnswerCrossEntropy`."""


class _AnswerCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, for a frozen output layer ``head`` (a
    bias-free linear layer, the LM head): the gradient with respect to ``hidden``, ``(softmax - onehot) @ W``,
    is computed in the forward pass, :data:`LOSS_CHUNK` positions at a time, and kept instead of the
    positions x vocabulary log-probabilities autograd would keep (SmolLM2: 196 KB per answer token) and the
    gradient of the same size its backward would make. The same matmuls as autograd's, so no extra time."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, targets: Tensor, head: nn.Linear) -> Tensor:
        weight: Tensor = head.weight
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], LOSS_CHUNK):
            t = targets[i : i + LOSS_CHUNK]
            logits = head(hidden[i : i + LOSS_CHUNK]).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            grad[i : i + LOSS_CHUNK] = linear(probs.to(weight.dtype), weight.t()).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * out.to(grad.dtype), None, None


def _fused_loss(head: Any, hidden: Tensor) -> bool:
    """Whether :class:`_AnswerCrossEntropy` computes this loss: a plain linear head (not one peft wrapped
    with its own LoRA factors), bias-free, with no trainable parameter, and no autocast."""
    return (
        type(head) in (nn.Linear, OneDNNLinear)  # not a quantised subclass, not a peft wrapper
        and head.weight.is_floating_point()
        and head.bias is None
        and not any(p.requires_grad for p in head.parameters())
        and hidden.requires_grad
        and not torch.is_autocast_enabled(hidden.device.type)
    )


def batch_loss(model: nn.Module, batch: dict[str, Tensor], tokens: int | None = None) -> Tensor:
    """Mean answer-token cross-entropy of a batch from :func:`collate` (the model's own loss) or from
    :func:`pack` (no attention mask: position ids mark the examples; the vocabulary projection only at the
    positions whose next token is an answer token, by :class:`_AnswerCrossEntropy` where the head is frozen).
    ``tokens`` (packed batches): the summed cross-entropy divided by ``tokens`` instead, for a part of a batch
    of that many answer tokens."""
    if "position_ids" not in batch:
        loss: Tensor = model(**batch).loss
        return loss
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    keep = batch["labels"][:, 1:] != IGNORE
    targets = batch["labels"][:, 1:][keep]
    answer = hidden.last_hidden_state[:, :-1][keep]
    if _fused_loss(head, answer):
        total: Tensor = _AnswerCrossEntropy.apply(answer, targets, head)  # type: ignore[no-untyped-call]
    else:
        total = torch.nn.functional.cross_entropy(head(answer).float(), targets, reduction="sum")
    return total / (tokens if tokens is not None else targets.numel())


@torch.no_grad()
def answer_entropy(model: nn.Module, batch: dict[str, Tensor], bf16: bool = False) -> float:
    """Mean entropy (nats) of ``model``'s next-token distributions at the positions whose next token is an
    answer token, for a batch from :func:`pack` or :func:`collate`; NaN when the batch has no answer token.

    A model that collapsed to uniform predictions has entropy ln(V) everywhere, whatever its training losses
    say (a single step can do it, and a loss is only as good as its batch): the local trainer compares this
    on one held batch before and after training. One forward pass, no gradient, the vocabulary
    projection :data:`LOSS_CHUNK` positions at a time as in :class:`_AnswerCrossEntropy`."""
    device = next(model.parameters()).device
    decoder, head = decoder_and_head(model)
    b = {k: v.to(device) for k, v in batch.items()}
    keep = b["labels"][:, 1:] != IGNORE
    n = int(keep.sum())
    if n == 0:
        return math.nan
    context = {"position_ids": b["position_ids"]} if "position_ids" in b else {"attention_mask": b["attention_mask"]}
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = decoder(input_ids=b["input_ids"], use_cache=False, **context).last_hidden_state
        answer = hidden[:, :-1][keep]
        for i in range(0, n, LOSS_CHUNK):
            probs = torch.softmax(head(answer[i : i + LOSS_CHUNK]).float(), dim=-1)
            total += torch.special.entr(probs).sum(dtype=torch.float64)  # -p ln p, 0 where p = 0
    return float(total) / n


def passes(batch: dict[str, Tensor], tokens: int) -> list[dict[str, Tensor]]:
    """A packed batch in parts of at most ``tokens`` positions (at least one row; 0: the whole batch), each
    with at least one answer token."""
    n, width = batch["input_ids"].shape
    rows = max(1, tokens // max(width, 1))
    if tokens <= 0 or n <= rows:
        return [batch]
    parts = [{k: v[i : i + rows] for k, v in batch.items()} for i in range(0, n, rows)]
    return [p for p in parts if bool((p["labels"][:, 1:] != IGNORE).any())]


class ClientFailure(RuntimeError):
    """A client's local training that must not reach the server: divergence, a missed deadline."""


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimizer ``cfg`` names."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    data: Sequence[Encoded],
    cfg: TrainConfig,
    generator: torch.Generator,
    pad_id: int,
    regularizer: Callable[[], Tensor] | None = None,
    *,
    deadline: float | None = None,
) -> TrainResult:
    """Train ``params`` of ``model`` on ``data``; returns losses and counts.

    Raises :class:`ClientFailure` on a non-finite loss (naming the step and the learning rate) and when
    ``time.perf_counter()`` passes ``deadline`` between two steps."""
    if not data:
        raise ValueError("a client with no training examples cannot train")
    if not params:
        raise ValueError("no trainable parameters")
    start = time.perf_counter()
    device = next(iter(params)).device
    opt = make_optimizer(params, cfg)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    steps = cfg.num_steps(len(data))
    order: list[int] = []
    used: set[int] = set()
    losses: list[float] = []
    examples = tokens = 0
    use_bf16 = cfg.precision == "bf16"
    was_training = model.training
    opt.zero_grad(set_to_none=True)  # nothing left over from another client (the host reuses parameters)
    if not all(m.training for m in model.modules()):  # train() sets every module: 2 walks cost 10 ms (SmolLM2)
        model.train()
    try:
        for _ in range(steps):
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch_idx: list[int] = []
                while len(batch_idx) < cfg.batch_size:
                    if not order:
                        order = torch.randperm(len(data), generator=generator).tolist()
                    batch_idx.append(order.pop())
                chosen = [data[i] for i in batch_idx]
                # counts come from the batch on the CPU, and the loss is read after its backward pass has been
                # queued: on a GPU, a read before it makes the CPU wait for the forward pass before it launches
                # the backward's kernels
                batch = (pack if cfg.pack else collate)(chosen, pad_id)
                parts = passes(batch, cfg.pass_tokens) if cfg.pack else [batch]
                answer = int((batch["labels"][:, 1:] != IGNORE).sum()) if len(parts) > 1 else None
                loss_value = 0.0
                for j, part in enumerate(parts):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss: Any = batch_loss(model, {k: v.to(device) for k, v in part.items()}, answer)
                        if regularizer is not None and j == 0:
                            loss = loss + regularizer()
                    (loss / cfg.grad_accum).backward()
                    value = float(loss.detach())
                    if not math.isfinite(value):  # before the optimizer step; the finally clears the gradients
                        raise ClientFailure(f"non-finite loss at step {len(losses) + 1}, lr {cfg.lr:g}")
                    loss_value += value
                step_loss += loss_value / cfg.grad_accum
                examples += len(batch_idx)
                used.update(batch_idx)
                tokens += int((batch["labels"] != IGNORE).sum())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if deadline is not None and time.perf_counter() > deadline and len(losses) < steps:
                raise ClientFailure(
                    f"missed its deadline after {len(losses)} of {steps} steps ({time.perf_counter() - start:.1f} s)"
                )
    finally:
        opt.zero_grad(set_to_none=True)  # a failed client leaves no gradient behind for the next one
        if not was_training:
            model.train(False)
    return TrainResult(
        sum(losses) / len(losses), losses, examples, len(used), tokens, steps, time.perf_counter() - start
    )
