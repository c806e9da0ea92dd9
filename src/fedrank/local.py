"""The client side of a round: what one client does with the assignment the server dispatched.

:class:`LocalTrainer` loads an assignment into the model host, trains it on the client's examples with
:func:`fedrank.train.train_local` and reads the factors back (HetLoRA's self-pruning included). It is the
only local training there is: the in-process simulator calls it through :class:`InProcessClients`, and
Flower's ClientApp (``fedrank.flower.client_app``) calls it on each SuperNode. What differs between the
drivers is only how an assignment reaches a client and how the update comes back (a :class:`ClientExecutor`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedrank.aggregation import HetLoRAPruning
from fedrank.aggregation.base import derive_generator
from fedrank.config import RunConfig
from fedrank.data import ClientData, Federation
from fedrank.data.tokenize import LazyEncoded, collate, encode, pack
from fedrank.lowrank import truncate_rank
from fedrank.models import LoadedModel, LoraHost
from fedrank.train import ClientFailure, answer_entropy, passes, train_local
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

__all__ = [
    "ClientExecutor",
    "InProcessClients",
    "LocalTrainer",
    "Outcome",
    "beyond_uniform",
    "collapsed",
    "collapsed_predictions",
]


def collapsed(losses: list[float], vocab_size: int) -> bool:
    """A client's losses show a collapsed model: stuck at ln(V) (uniform predictions) for its last two steps,
    or risen from below 80% of ln(V) (mean of the first two steps) to above 90% (mean of the last two): single
    mini-batch losses are noisy, so neither rule looks at one step alone."""
    uniform = math.log(vocab_size)
    if len(losses) < 2:
        return False
    stuck = all(abs(x - uniform) < 1e-3 * uniform for x in losses[-2:])
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    return stuck or (last >= 0.9 * uniform and first < 0.8 * uniform)


def beyond_uniform(first: float, last: float, vocab_size: int) -> bool:
    """A client's training blew its model up: its last step's loss is above ln(V), worse than predicting every
    token uniformly, and more than twice its first step's, which was below 90% of ln(V) (a model that knew
    something). One step at each end suffices: S1's FSLoRA at rate 3e-2 went from 1.93 to 48.9 in two steps
    (ln V = 10.8), confidently wrong, which neither :func:`collapsed` (two-step means) nor the entropy rule
    sees. The doubling keeps a random-weight model's noisy losses around ln V (the tiny test Llama: 5.1 to
    7.1, ln V = 5.76) out of it."""
    uniform = math.log(vocab_size)
    if not (math.isfinite(first) and first < 0.9 * uniform):
        return False
    return not math.isfinite(last) or (last > uniform and last > 2 * first)


UNIFORM_MARGIN = 0.02
"""A trained model whose mean next-token entropy H on the held batch has ln(V) - H below this fraction of
ln(V) predicts (nearly) uniformly. Measured on the tiny Llama (V = 316, ln V = 5.756): every collapsed
client sat at ln V to 1e-6 of it; every other one, at any lr from 1e-3 to 50 and 1 to 4 steps, at least
0.078 ln V below it (0.149 ln V up to lr = 1, 0.18 ln V at initialisation)."""

INFORMED_MARGIN = 0.05
"""...while the model as dispatched was at least this fraction of ln(V) below it: a model that was already
near-uniform (a random-weight model, a global model collapsed in an earlier round) is not one that training
collapsed."""


PROBE_EXAMPLES = 2
"""Examples in the held batch of :func:`collapsed_predictions`. A collapse to uniform predictions does not
depend on the input, so a few answer tokens show it; each example costs a forward pass before and after
training (SmolLM2-135M on one CPU thread: about 0.3 s per example and pass, against about 0.75 s per
example and optimizer step), so the batch is kept smaller than a training micro-batch."""


def collapsed_predictions(before: float, after: float, vocab_size: int) -> bool:
    """The client's training collapsed its model to uniform predictions: the mean entropy of its next-token
    distributions on a held batch (:func:`fedrank.train.answer_entropy`) is within :data:`UNIFORM_MARGIN` of
    ln(V) after training, and was at least :data:`INFORMED_MARGIN` below it as dispatched. Unlike
    :func:`collapsed` it needs no loss history, so a collapse in a run's only step, or its last, is seen.
    NaN entropies (a held batch without answer tokens) decide nothing."""
    uniform = math.log(vocab_size)
    if not (math.isfinite(before) and math.isfinite(after)):
        return False
    return uniform - after < UNIFORM_MARGIN * uniform and uniform - before >= INFORMED_MARGIN * uniform


@dataclass(frozen=True)
class Outcome:
    """A sampled client's round as the server receives it: the update and the client's own statistics
    (loss, tokens, seconds, ...), or the reason it failed (``update`` is None). ``sent`` is what the server
    dispatched to it (the validation compares the update against it)."""

    client_id: int
    sent: ClientAssignment
    update: ClientUpdate | None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    summed: bool = False
    """Under secure aggregation: the client's update went into the round's masked sum
    (:meth:`ClientExecutor.secure_mean`); ``update`` is None, the server never sees it."""


class ClientExecutor(Protocol):
    """How a round's sampled clients are trained: in this process one after another, or on Flower
    SuperNodes. ``dispatch`` builds a client's assignment (the server's side, called by the executor when it
    needs it so that a round never holds more assignments than it must); outcomes may arrive in any order."""

    def run(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[Outcome]: ...

    def available(self, round_index: int) -> frozenset[int] | None:
        """The registered clients that can be sampled in round ``round_index`` (those with a live node), or
        None when every one can (the in-process executor: always)."""
        ...

    def secure_mean(self, round_index: int) -> list[Tensor] | None:
        """After :meth:`run`: the unmasked weighted mean of the contributions (:func:`fedrank.secure.contribution`)
        of the round's ``summed`` outcomes, or None when the round has none (no secure aggregation)."""
        ...


class LocalTrainer:
    """One client's local training on the process's model host."""

    def __init__(self, lm: LoadedModel, host: LoraHost, cfg: RunConfig):
        self.lm, self.host, self.cfg = lm, host, cfg
        self.pruning = HetLoRAPruning(**cfg.method.prune) if cfg.method.prune else None

    def train(self, a: ClientAssignment, data: ClientData, round_index: int) -> tuple[ClientUpdate, dict[str, Any]]:
        """Train assignment ``a`` on ``data``; the update and the client's statistics. Raises
        :class:`ClientFailure` when the client diverges, misses its deadline or its training raises."""
        t0 = time.perf_counter()
        cfg = self.cfg
        self.host.load(a)
        enc = LazyEncoded(self.lm.tokenizer, data.train, cfg.train.max_seq_len)
        reg: Callable[[], Tensor] | None = None
        if self.pruning is not None:
            pr = self.pruning

            def reg() -> Tensor:
                return torch.stack([pr.penalty(B, A) for B, A in self.host.lora_pairs()]).sum()

        g = derive_generator(cfg.seed, round_index, a.client_id, 0x7A1)
        deadline = cfg.federation.client_deadline_s
        probe = self._probe(data)
        bf16 = cfg.train.precision == "bf16"
        try:
            before = answer_entropy(self.host.module, probe, bf16) if probe is not None else math.nan
            res = train_local(
                self.host.module,
                self.host.trainable_parameters(),
                enc,
                cfg.train,
                g,
                self.lm.tokenizer.pad_token_id,
                reg,
                deadline=t0 + deadline if deadline > 0 else None,
            )
            after = answer_entropy(self.host.module, probe, bf16) if probe is not None else math.nan
        except ClientFailure:
            raise
        except Exception as e:  # the client's own training failed (e.g. out of memory): drop it, not the run
            raise ClientFailure(f"training raised {type(e).__name__}: {e}") from e
        vocab = int(self.lm.model.config.vocab_size)
        if collapsed_predictions(before, after, vocab):
            raise ClientFailure(
                f"diverged: the model collapsed to uniform predictions: mean next-token entropy {after:.4f} on a "
                f"held batch after training, {before:.4f} as dispatched, against ln(vocab) = {math.log(vocab):.4f} "
                f"(loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} over {len(res.losses)} step(s); is "
                f"train.lr = {cfg.train.lr:g} too high?)"
            )
        if beyond_uniform(res.losses[0], res.losses[-1], vocab):
            raise ClientFailure(
                f"diverged: loss went from {res.losses[0]:.3f} to {res.losses[-1]:.3f}, above ln(vocab) = "
                f"{math.log(vocab):.3f}: worse than uniform predictions (is train.lr = {cfg.train.lr:g} too high?)"
            )
        if collapsed(res.losses, vocab):
            raise ClientFailure(
                f"diverged: loss went from {res.losses[0]:.3f} to {res.losses[-1]:.3f}, against ln(vocab) = "
                f"{math.log(vocab):.3f} for uniform predictions (a collapsed model: is train.lr = {cfg.train.lr:g} "
                "too high?)"
            )
        factors = {k: LoraFactors(f.B.cpu(), f.A.cpu()) for k, f in self.host.read().items()}
        rank = a.rank
        if self.pruning is not None:
            new = self.pruning.pruned_rank(list(factors.values()))
            if new < rank:
                factors = {k: LoraFactors(*truncate_rank(f.B, f.A, new)) for k, f in factors.items()}
                rank = new
        update = ClientUpdate(a.client_id, rank, len(data.train), factors, a.indices, a.train_A, a.train_B)
        stats = {
            "tasks": list(data.tasks),
            "loss": res.loss,
            "first_loss": res.losses[0],
            "last_loss": res.losses[-1],
            "examples": res.examples,
            "seen": res.seen,
            "tokens": res.tokens,
            "truncated": enc.truncated,
            "seconds": time.perf_counter() - t0,
        }
        return update, stats

    def _probe(self, data: ClientData) -> dict[str, Tensor] | None:
        """The held batch whose predictions tell a collapsed model: the client's first :data:`PROBE_EXAMPLES`
        training examples (at most ``batch_size``), batched as training batches them (packed: its first pass
        of at most ``pass_tokens`` positions). Encoded apart from the training's :class:`LazyEncoded`, whose
        count of truncated examples is the training's own."""
        t = self.cfg.train
        n = min(PROBE_EXAMPLES, t.batch_size, len(data.train))
        chosen = [encode(self.lm.tokenizer, data.train[i], t.max_seq_len) for i in range(n)]
        if not chosen:
            return None
        pad = self.lm.tokenizer.pad_token_id
        if not t.pack:
            return collate(chosen, pad)
        parts = passes(pack(chosen, pad), t.pass_tokens)
        return parts[0] if parts else None


class InProcessClients:
    """The simulator's executor: every sampled client in turn on this process's one model."""

    def __init__(self, trainer: LocalTrainer, fed: Federation, progress: bool = True):
        self.trainer, self.fed, self.progress = trainer, fed, progress

    def run(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[Outcome]:
        bar = tqdm(clients, desc=f"round {round_index + 1} clients", leave=False, disable=not self.progress)
        for spec in bar:
            t0 = time.perf_counter()
            sent = dispatch(spec)  # a server-side error here ends the run
            try:
                update, stats = self.trainer.train(sent, self.fed.client(spec.client_id), round_index)
            except ClientFailure as e:
                yield Outcome(spec.client_id, sent, None, error=str(e))
                continue
            stats["seconds"] = time.perf_counter() - t0  # dispatch included, as the server sees it
            yield Outcome(spec.client_id, sent, update, stats)

    def available(self, round_index: int) -> frozenset[int] | None:
        return None  # every registered client is in this process

    def secure_mean(self, round_index: int) -> list[Tensor] | None:
        return None  # the simulator sees every update: secure aggregation is Flower's (fedrank.flower)
