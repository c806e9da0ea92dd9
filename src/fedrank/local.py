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
from fedrank.data.tokenize import LazyEncoded
from fedrank.lowrank import truncate_rank
from fedrank.models import LoadedModel, LoraHost
from fedrank.train import ClientFailure, train_local
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

__all__ = ["ClientExecutor", "InProcessClients", "LocalTrainer", "Outcome", "collapsed"]


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


class ClientExecutor(Protocol):
    """How a round's sampled clients are trained: in this process one after another, or on Flower
    SuperNodes. ``dispatch`` builds a client's assignment (the server's side, called by the executor when it
    needs it so that a round never holds more assignments than it must); outcomes may arrive in any order."""

    def run(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[Outcome]: ...


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
        try:
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
        except ClientFailure:
            raise
        except Exception as e:  # the client's own training failed (e.g. out of memory): drop it, not the run
            raise ClientFailure(f"training raised {type(e).__name__}: {e}") from e
        vocab = int(self.lm.model.config.vocab_size)
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
