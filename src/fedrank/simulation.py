"""In-process federated simulation: sample, dispatch, train, validate, aggregate, evaluate, checkpoint.

Every random choice is derived from (seed, round, client), so a run resumed from its last checkpoint is
bit-identical to an uninterrupted one. Clients are materialised only when sampled: the server holds the
global state, one model, and the round's updates; persistent per-client state (FedSA's B) lives on disk.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedrank import checkpoint, eval_cache, faults, run_dir, secure
from fedrank.aggregation import HOMOGENEOUS, AggregationMethod, make_method
from fedrank.aggregation.base import derive_generator
from fedrank.aggregation.scale import FOLDABLE, FoldedScale
from fedrank.checkpoint import CheckpointError
from fedrank.config import ConfigError, RunConfig, override, to_dict
from fedrank.data import Federation, open_store
from fedrank.data.examples import Example
from fedrank.data.index import cache_dir
from fedrank.data.node import provenance
from fedrank.evaluate import evaluate_task, macro_average
from fedrank.local import ClientExecutor, InProcessClients, LocalTrainer, Outcome, collapsed
from fedrank.lowrank import energy_spectrum, lora_scaling, svd_of_sum, svdvals_of_sum, truncate
from fedrank.models import (
    LoadedModel,
    LoraHost,
    changes_base,
    export_peft_adapter,
    load_causal_lm,
    release_memory,
    smollm2_shaped_llama,
    tiny_llama,
    tiny_tokenizer,
    use_onednn,
    uses_onednn,
)
from fedrank.privacy import (
    EVERY_INDEX,
    INDEX_REVEALING,
    JOINT,
    PRODUCT_SPACE,
    add_noise_to_sum,
    clip_joint,
    clip_product,
    dense_noise,
    index_noise,
    privatize,
    product_sum,
    rescale,
    scaled_noise,
)
from fedrank.ranks import ModelFootprint, assign_ranks, budget_ranks
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors
from fedrank.validation import RunFailed, validate_update

if TYPE_CHECKING:
    from fedrank.accounting import Accountant

__all__ = ["RunResult", "Simulation", "collapsed", "export_global", "with_method"]

log = logging.getLogger(__name__)

BYTES_PER_PARAM = 4  # fp32 on the wire
FSLORA_SGD_LR = 0.01


def build_model(cfg: RunConfig) -> LoadedModel:
    name = cfg.model.name
    if name == "tiny":
        lm = tiny_llama(seed=cfg.seed)
    elif name == "smollm2-random":  # SmolLM2-135M's shapes, random weights: benchmarks without the model file
        lm = LoadedModel(smollm2_shaped_llama(cfg.seed).eval(), tiny_tokenizer(), name)
    else:  # a GGUF is converted once and kept under the cache directory (models/)
        lm = load_causal_lm(name, cache=cache_dir(cfg.data.cache_dir or None) / "models")
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"model.device {device!r} requested but CUDA is not available")
        lm.model.to(device)
    elif cfg.model.onednn:
        use_onednn(lm.model)
    return lm


def build_method(cfg: RunConfig) -> AggregationMethod[Any]:
    opts: dict[str, Any] = {"alpha": cfg.model.alpha, "rslora": cfg.model.rslora, "seed": cfg.seed}
    if cfg.method.name == "fslora":
        opts["rank"] = max(cfg.ranks.choices)  # the global rank defaults to the largest rank of the pool
    method = make_method(cfg.method.name, **{**opts, **cfg.method.options})
    if cfg.method.scale == "fold":
        folded: AggregationMethod[Any] = FoldedScale(method)  # type: ignore[assignment]
        return folded
    return method


def check_in_process(cfg: RunConfig) -> None:
    """What the in-process simulator cannot run: secure aggregation, whose point is that the server never sees
    an update (it runs on Flower)."""
    if cfg.secure.enabled:
        raise ConfigError(
            "secure aggregation ([secure] enabled) runs on Flower, where the clients mask their updates: "
            "fedrank flower run CONFIG [--ray], or fedrank flower up (the in-process simulator sees every update)"
        )


def check_ranks(cfg: RunConfig) -> None:
    """Homogeneous methods need the ``fixed`` distribution (checked before anything is loaded)."""
    if cfg.method.name in HOMOGENEOUS and cfg.ranks.distribution != "fixed":
        raise ConfigError(
            f"method {cfg.method.name} needs one rank for all clients: set ranks.distribution = 'fixed' "
            f"(clients then use the smallest of ranks.choices, {min(cfg.ranks.choices)})"
        )


def check_ranks_fit(cfg: RunConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """No rank above what the smallest LoRA layer can hold (min(m, n)): checked once the shapes are known,
    before any training."""
    name, (m, n) = min(shapes.items(), key=lambda kv: min(kv[1]))
    asked = {"ranks.choices": max(cfg.ranks.choices)}
    if "rank" in cfg.method.options:
        asked["method.options.rank"] = int(cfg.method.options["rank"])
    for key, r in asked.items():
        if r > min(m, n):
            raise ConfigError(
                f"{key} asks for rank {r}, but the smallest LoRA layer ({name}, {m}x{n}) holds at most rank {min(m, n)}"
            )


def global_rank(cfg: RunConfig) -> int:
    """The global state's rank: the pool's largest rank (its smallest for a ``fixed`` distribution)."""
    return min(cfg.ranks.choices) if cfg.ranks.distribution == "fixed" else max(cfg.ranks.choices)


def client_ranks(cfg: RunConfig, num_clients: int, footprint: ModelFootprint | None = None) -> list[int]:
    """Every registered client's rank (a few bytes each)."""
    check_ranks(cfg)
    if cfg.ranks.per_client:
        per, top = list(cfg.ranks.per_client), global_rank(cfg)
        if len(per) != num_clients:
            raise ConfigError(f"ranks.per_client lists {len(per)} rank(s) for {num_clients} registered clients")
        if max(per) > top:
            raise ConfigError(f"ranks.per_client has rank {max(per)}, above the global rank {top} (ranks.choices)")
        return per
    if cfg.ranks.distribution == "budget":
        if footprint is None:
            raise ConfigError("ranks.distribution 'budget' needs the model's footprint")
        return budget_ranks(cfg.ranks.budgets_mib, cfg.ranks.choices, num_clients, cfg.seed, footprint)
    return assign_ranks(cfg.ranks.distribution, cfg.ranks.choices, num_clients, cfg.seed)


def model_footprint(lm: LoadedModel, shapes: dict[str, tuple[int, int]], cfg: RunConfig) -> ModelFootprint:
    """What :func:`fedrank.ranks.training_bytes` needs, read off the loaded model and the training config."""
    mc = lm.model.config
    return ModelFootprint(
        base_params=sum(p.numel() for p in lm.model.parameters()),
        lora_shapes=tuple(shapes.values()),
        num_layers=int(mc.num_hidden_layers),
        hidden=int(mc.hidden_size),
        seq_len=cfg.train.max_seq_len,
        batch_size=cfg.train.batch_size,
    )


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any]


@dataclass
class PrivateRounds:
    """The run's DP mechanism (:mod:`fedrank.privacy`) and its accountant (:mod:`fedrank.accounting`)."""

    cfg: RunConfig
    noise_multiplier: float
    delta: float
    accountant: Accountant  # fedrank.accounting's, imported when a run is private (dp-accounting's import)

    top: int = 0
    amplified: bool = True
    """Whether ε counts the subsampling's amplification: only where the released state hides which clients
    took part (:meth:`build`)."""

    @property
    def secret(self) -> bool:
        """Noise and samples from OS entropy (not the run's seed), unless ``privacy.seeded`` or σ = 0."""
        return not self.cfg.privacy.seeded and self.noise_multiplier > 0

    def generator(self, round_index: int) -> torch.Generator:
        if self.secret:
            return torch.Generator().manual_seed(secrets.randbits(63))
        return derive_generator(self.cfg.seed, 0xD9, round_index)

    @classmethod
    def build(cls, cfg: RunConfig, num_clients: int, per_round: int, ranks: list[int], top: int) -> PrivateRounds:
        """The mechanism for a run of ``num_clients`` clients of ``ranks`` (global rank ``top``).

        Amplification by subsampling assumes the round's sample stays hidden. FFA-LoRA's released B leaves
        the columns beyond the sample's largest rank unchanged and noises each column at σC/h_i (its holders),
        and so do the other :data:`~fedrank.privacy.INDEX_REVEALING` methods in their way: unless every client
        holds every index (equal ranks at the global rank), they reveal part of the sample, and ε is then
        accounted without amplification (every round a Gaussian mechanism on the whole population: a bound
        that needs no hidden sample). FSLoRA and FedEx-LoRA (:data:`~fedrank.privacy.EVERY_INDEX`) noise every
        index, held or not, and keep it."""
        from fedrank.accounting import Accountant, RoundEvent, default_delta, noise_for_epsilon

        p = cfg.privacy
        delta = p.delta or default_delta(num_clients)
        if delta > 1e-3:
            log.warning(
                "privacy: δ = %.3g is large (1/N^1.1 for N = %d clients): a mechanism may fail with that probability; "
                "set privacy.delta (e.g. 1e-5)",
                delta,
                num_clients,
            )
        reveals = cfg.method.name in INDEX_REVEALING and any(r < top for r in ranks)
        if reveals and p.sampling == "poisson":
            raise ConfigError(
                f'privacy: sampling = "poisson" with {cfg.method.name} whose clients hold different rank indices has '
                'no fixed-denominator mechanism yet (its per-index counts would show who took part); use "fixed"'
            )
        if reveals:
            log.warning(
                "privacy: %s's update shows which rank indices the round's clients held, so part of the sample: "
                "ε is accounted without subsampling amplification",
                cfg.method.name,
            )
            per_round = num_clients if p.sampling == "fixed" else per_round
        q = (1.0 if reveals else per_round / num_clients) if p.sampling == "poisson" else None
        sigma = p.noise_multiplier
        if sigma == 0 and p.epsilon > 0:
            rounds = cfg.federation.rounds
            sigma = noise_for_epsilon(p.epsilon, delta, rounds, p.accountant, p.sampling, q, num_clients, per_round)
            log.info("privacy: noise multiplier %.4g keeps %d rounds within ε = %g", sigma, rounds, p.epsilon)
        event = RoundEvent(sigma, p.sampling, num_clients, per_round, q)
        return cls(cfg, sigma, delta, Accountant(p.accountant, event, delta), top, amplified=not reveals)

    def check_budget(self, round_index: int) -> None:
        budget = self.cfg.privacy.epsilon
        if budget > 0:
            after = self.accountant.epsilon_after(1)
            if after > budget:
                raise RunFailed(
                    f"privacy budget: round {round_index + 1} would bring ε to {after:.4g} > privacy.epsilon = "
                    f"{budget:g} (δ = {self.delta:.3g}); the run stops here with ε = {self.accountant.epsilon():.4g}"
                )

    def apply(
        self,
        method: AggregationMethod[Any],
        state: Any,
        updates: list[ClientUpdate],
        sent: list[ClientAssignment],
        round_index: int,
    ) -> tuple[list[ClientUpdate], dict[str, Any], dict[str, float]]:
        """The round's updates clipped (and noised, or the noise the method adds to its sum: ``noise``, dense
        on ΔW; ``index_noise``, on every index of ``state``'s factors; ``products``); the accountant steps; what
        the round record gets."""
        p = self.cfg.privacy
        self.check_dispatched(updates, round_index)  # a Flower node may declare a smaller rank than the config's
        gen = self.generator(round_index)
        extra: dict[str, Any] = {}
        # Poisson sampling: the rule divides by the realised K; K/(qN) makes it the expected qN instead
        factor = len(updates) / self.accountant.event.per_round if p.sampling == "poisson" else 1.0
        if self.cfg.method.name in PRODUCT_SPACE:
            ranks = [u.rank for u in updates]
            clipped = [
                clip_product(u, method.scaling(u.rank), p.clip, method.dp_pieces(u.rank, ranks))  # type: ignore[attr-defined]
                for u in updates
            ]
            noisy = [c.update for c in clipped]
            if factor != 1.0:
                noisy = [
                    replace(u, factors={k: LoraFactors(factor * f.B, f.A) for k, f in u.factors.items()}) for u in noisy
                ]
            if math.isfinite(p.clip) and self.noise_multiplier > 0:
                shapes = {k: (f.B.shape[0], f.A.shape[1]) for k, f in updates[0].factors.items()}
                noise = dense_noise(shapes, self.noise_multiplier * p.clip, gen)
                extra["noise"] = {k: factor * v for k, v in noise.items()}
        elif self.cfg.method.name in JOINT:  # the factor sums and the product sum, clipped jointly
            clipped = [clip_joint(u, s, p.clip) for u, s in zip(updates, sent, strict=True)]
            std = self.noise_multiplier * p.clip if math.isfinite(p.clip) else 0.0
            noisy = [c.update for c in clipped]
            if self.cfg.method.name in EVERY_INDEX:
                if std > 0:
                    extra["index_noise"] = scaled_noise(index_noise(state.factors, std, gen), factor)
            else:
                noisy = add_noise_to_sum(noisy, std, gen)
            noisy = rescale(noisy, sent, factor)
            if math.isfinite(p.clip):  # (C = ∞: the method's own exact rule, bit for bit)
                products = product_sum([c.update for c in clipped], sent)
                shapes = {k: (v.shape[0], v.shape[1]) for k, v in products.items()}
                noise = dense_noise(shapes, std, gen)
                extra["products"] = {k: factor * (v + noise[k].double()) for k, v in products.items()}
        elif self.cfg.method.name in EVERY_INDEX:  # clipped; the noise on every index of the global factors
            noisy, clipped = privatize(updates, sent, p.clip, 0.0, gen)
            noisy = rescale(noisy, sent, factor)
            if math.isfinite(p.clip) and self.noise_multiplier > 0:
                extra["index_noise"] = scaled_noise(
                    index_noise(state.factors, self.noise_multiplier * p.clip, gen), factor
                )
        else:
            sent = [method.dp_reference(s) for s in sent]  # type: ignore[attr-defined]
            noisy, clipped = privatize(updates, sent, p.clip, self.noise_multiplier, gen)
            noisy = rescale(noisy, sent, factor)
        self.accountant.step()
        norms = [c.norm for c in clipped]
        return (
            noisy,
            extra,
            {
                "epsilon": self.accountant.epsilon(),
                "dp_clipped": sum(c.factor < 1 for c in clipped) / max(len(clipped), 1),
                "dp_median_norm": float(np.median(norms)) if norms else math.nan,
            },
        )

    def check_dispatched(self, dispatched: Sequence[ClientAssignment | ClientUpdate], round_index: int) -> None:
        """ε accounted with amplification needs every client of an index-revealing method at the global rank
        (the round's updates, or under secure aggregation its dispatch): else the sample would show."""
        if self.amplified and self.cfg.method.name in INDEX_REVEALING and any(a.rank < self.top for a in dispatched):
            raise RunFailed(
                f"privacy: a client of rank below {self.top} took part in round {round_index + 1}, but ε was being "
                f"accounted with amplification, which {self.cfg.method.name} then does not allow"
            )

    def released(self) -> dict[str, float]:
        """A round whose noisy sum the clients made under secure aggregation (distributed DP, each adding
        N(0, σ²C²/t)): the accountant steps; the server saw no norm to report."""
        self.accountant.step()
        return {"epsilon": self.accountant.epsilon()}

    def summary(self) -> dict[str, Any]:
        p = self.cfg.privacy
        return {
            "noise_added_by": "clients" if self.cfg.secure.enabled else "server",  # distributed, under SecAgg+
            "epsilon": self.accountant.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip": p.clip,
            "accountant": p.accountant,
            "sampling": p.sampling,
            "rounds": self.accountant.rounds,
            "amplified": self.amplified,
            "seeded": not self.secret,
        }


class Simulation:
    """One federated run writing to ``out_dir`` (see the README for the files)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: Path,
        resume: bool = False,
        progress: bool = True,
        executor: Callable[[Simulation], ClientExecutor] | None = None,
    ):
        """``executor`` builds how sampled clients are trained from the engine (default: in this process,
        :class:`fedrank.local.InProcessClients`; Flower's ServerApp passes its own)."""
        self.cfg, self.out, self.progress = cfg, out_dir, progress
        if executor is None:
            check_in_process(cfg)
        if resume:
            run_dir.open_existing(self.out)
        else:  # an earlier run's files are removed (the CLI asks for --overwrite first), other files refused
            run_dir.start_fresh(self.out)
        self.metrics_path = self.out / run_dir.METRICS
        check_ranks(cfg)
        t_data = time.perf_counter()
        self.store = open_store(cfg.data, cfg.seed)
        self.fed = Federation(self.store, cfg.partition)
        self.data_seconds = time.perf_counter() - t_data
        self.per_round = cfg.federation.per_round(self.fed.num_clients)
        self.method = build_method(cfg)
        self.may_prune = bool(cfg.method.prune)  # HetLoRA's clients may return a smaller rank
        t_load = time.perf_counter()
        self.lm = build_model(cfg)
        self.load_seconds = time.perf_counter() - t_load
        self.host = LoraHost(self.lm.model, cfg.model.target_modules, cfg.model.alpha)
        check_ranks_fit(cfg, self.host.shapes)
        self.ranks = client_ranks(cfg, self.fed.num_clients, model_footprint(self.lm, self.host.shapes, cfg))
        self.start_round = 0
        self.restored = False  # resumed from a checkpoint (round 0's included: its evaluation is not redone)
        self.metrics_lines = 0  # records written; checkpoints keep it so a resume drops a crashed round's records
        self.rank_overrides: dict[int, int] = {}
        self.skipped_rounds = 0
        self.train_seconds = 0.0
        self.earlier_seconds = 0.0  # run time of the earlier sittings of a resumed run, up to their last checkpoint
        self.sitting_start = time.perf_counter()
        self.sent: list[ClientAssignment] = []
        self.max_rank = global_rank(cfg)
        self.state = self.method.init_state(self.host.shapes, self.max_rank)
        self.dp: PrivateRounds | None = None  # the evaluated participants come from the run's seed, as without DP
        self.eval_clients = self.fixed_eval_clients()
        if cfg.privacy.enabled:
            self.dp = PrivateRounds.build(cfg, self.fed.num_clients, self.per_round, self.ranks, self.max_rank)
        self._weights_digest: str | None = None
        run_dir.check_writable(self.out, run_dir.checkpoint_bytes(self.state))
        if resume:
            self._restore()
        else:
            checkpoint.atomic_write_bytes(self.metrics_path, b"")
        run_dir.write_config(self.out, cfg)
        self.executor: ClientExecutor = (
            executor(self) if executor else InProcessClients(LocalTrainer(self.lm, self.host, cfg), self.fed, progress)
        )

    # ----------------------------------------------------------------- persistence
    def _restore(self) -> None:
        """Continue from the newest usable checkpoint (see :func:`fedrank.run_dir.restore`), or from the start
        when the run stopped before its first."""
        ck = run_dir.restore(self.out, to_dict(self.cfg), expected=self.state)  # checked against the initial state
        if ck is None:
            return
        self.restored = True
        self.start_round = int(ck["round"])
        self.state = ck["state"]
        self.rank_overrides = {int(k): int(v) for k, v in ck["rank_overrides"].items()}
        self.metrics_lines = int(ck["metrics_lines"])
        self.skipped_rounds = int(ck.get("skipped_rounds", 0))
        self.earlier_seconds = float(ck.get("elapsed_seconds", 0.0))
        if self.dp is not None:
            self.dp.accountant.step(int(ck.get("private_rounds", 0)))
        torch.set_rng_state(ck["torch_rng"])

    def _checkpoint(self, round_done: int) -> None:
        run_dir.fsync_file(self.metrics_path)  # the records this checkpoint counts are on disk before it is
        ck = {
            "round": round_done,
            "state": self.state,
            "rank_overrides": self.rank_overrides,
            "metrics_lines": self.metrics_lines,
            "skipped_rounds": self.skipped_rounds,
            "elapsed_seconds": self.elapsed_seconds(),
            **({"private_rounds": self.dp.accountant.rounds} if self.dp is not None else {}),
            "config": to_dict(self.cfg),
            "torch_rng": torch.get_rng_state(),
        }
        run_dir.write_checkpoint(self.out, round_done, ck, self.cfg.output.keep_checkpoints)

    def elapsed_seconds(self) -> float:
        """The run's time so far: this sitting's (from :meth:`run`) and the earlier sittings' up to their last
        checkpoint (what a crash lost after it is redone, and counted, here)."""
        return self.earlier_seconds + time.perf_counter() - self.sitting_start

    def _record(self, rec: dict[str, Any]) -> None:
        run_dir.append_record(self.metrics_path, rec)  # strict JSON: NaN/inf are written as null
        self.metrics_lines += 1
        if rec.get("type") == "client":
            faults.hit("train", int(rec["round"]))

    def _local_path(self, cid: int, round_done: int) -> Path:
        return run_dir.client_state_path(self.out, cid, round_done)

    def _load_local(self, cid: int, round_index: int) -> dict[str, Tensor] | None:
        """The client's persisted state from its latest round before ``round_index`` (0-based)."""
        done = [d for d in run_dir.client_state_rounds(self.out, cid) if d <= round_index]
        if not done:
            return None
        path = self._local_path(cid, done[-1])
        local: dict[str, Tensor] = checkpoint.load(path, max_bytes=checkpoint.tensor_bytes(self.state))
        check_local_state(local, path)
        return local  # its layers' shapes are the method's to check (fedsa: B of (out features, the client's rank))

    # ----------------------------------------------------------------- the round
    def fixed_eval_clients(self) -> list[int]:
        """The participants whose own test splits are evaluated at every evaluation (seen tasks): the first
        ``eval.participants`` clients of round 1's sample that hold test examples, the same clients before,
        during and after training so that their before -> after compares like with like."""
        if self.cfg.eval.participants <= 0:
            return []
        chosen = [c for c in self.sample(0) if self.fed.num_test_examples(c) > 0]
        return chosen[: self.cfg.eval.participants]

    def rank_of(self, cid: int) -> int:
        return self.rank_overrides.get(cid, self.ranks[cid])

    def sample(self, round_index: int, available: frozenset[int] | None = None) -> list[int]:
        """The round's clients: ``per_round`` of the registered clients, or of ``available`` (those an
        executor can reach; seeded per round either way, so the same pool gives the same sample)."""
        rng = np.random.default_rng([self.cfg.seed, 17, round_index])
        if self.dp is not None and self.dp.secret:  # a sample the run's seed does not give away
            rng = np.random.default_rng(secrets.randbits(128))
        if self.cfg.privacy.enabled and self.cfg.privacy.sampling == "poisson":
            q = self.per_round / self.fed.num_clients  # each client independently: what the accountant assumes
            chosen = np.flatnonzero(rng.random(self.fed.num_clients) < q)
            return [int(c) for c in chosen if available is None or int(c) in available]
        if available is None or len(available) >= self.fed.num_clients:
            return [int(c) for c in rng.choice(self.fed.num_clients, self.per_round, replace=False)]
        pool = sorted(available)
        return [pool[int(i)] for i in rng.choice(len(pool), min(self.per_round, len(pool)), replace=False)]

    def specs(self, round_index: int) -> list[ClientSpec]:
        """The round's sampled clients that take part: those without training data, or dropped out by
        ``federation.dropout`` (seeded per round and client), are recorded and left out."""
        fed = self.cfg.federation
        out = []
        available = self.executor.available(round_index)
        if self.dp is not None and available is not None and len(available) < self.fed.num_clients:
            raise RunFailed(
                f"privacy: only {len(available)} of the {self.fed.num_clients} registered clients can be reached in "
                f"round {round_index + 1}; sampling among them is not the sampling ε is accounted for. Resume "
                "(resume=true) once every node is back"
            )
        if available is not None and len(available) < self.fed.num_clients:
            log.info(
                "round %d: sampling among the %d of %d registered clients that can be reached",
                round_index + 1,
                len(available),
                self.fed.num_clients,
            )
        for cid in self.sample(round_index, available):
            if self.fed.num_examples(cid) == 0:  # a partition can leave a client without training data
                self._drop("client_skipped", round_index, cid, "no examples")
            elif fed.dropout > 0 and self._drops_out(round_index, cid):
                self._drop("client_dropped", round_index, cid, f"dropped out (federation.dropout = {fed.dropout:g})")
            else:
                out.append(ClientSpec(cid, self.rank_of(cid), self.fed.num_examples(cid)))
        return out

    def _drops_out(self, round_index: int, cid: int) -> bool:
        return bool(np.random.default_rng([self.cfg.seed, 23, round_index, cid]).random() < self.cfg.federation.dropout)

    def dispatch(self, spec: ClientSpec, round_index: int) -> ClientAssignment:
        """What the server sends client ``spec`` this round (its persisted local state included)."""
        return self.method.dispatch(self.state, spec, round_index, self._load_local(spec.client_id, round_index))

    def _drop(self, kind: str, round_index: int, cid: int, reason: str) -> None:
        log.warning("round %d: client %d %s: %s", round_index + 1, cid, kind.replace("client_", ""), reason)
        self._record({"type": kind, "round": round_index + 1, "client": cid, "reason": reason})

    def accept(self, out: Outcome, round_index: int) -> tuple[ClientUpdate, dict[str, Any]] | None:
        """A client's outcome as the server takes it: its validated update and record, or None when it failed
        or was rejected (recorded in metrics.jsonl with the reason; the state never sees it)."""
        cid, sent, update = out.client_id, out.sent, out.update
        if update is None:
            self._drop("client_failed", round_index, cid, out.error or "no update")
            return None
        fed = self.cfg.federation
        reason = validate_update(update, sent, may_prune=self.may_prune, max_norm=fed.max_update_norm)
        if reason is not None:
            self._drop("client_rejected", round_index, cid, reason)
            return None
        if update.rank < sent.rank:  # HetLoRA self-pruning: the client keeps its smaller rank from now on
            self.rank_overrides[cid] = update.rank
        up = self.method.upload_params(update)
        rec = {
            "type": "client",
            "round": round_index + 1,
            "client": cid,
            "rank": update.rank,
            "n": update.num_examples,
            **out.stats,
            "up_params": up,
            "down_params": sent.download_params,
            "up_bytes": up * BYTES_PER_PARAM,
            "down_bytes": sent.download_params * BYTES_PER_PARAM,
        }
        self._record(rec)
        return update, rec

    def accept_summed(self, out: Outcome, round_index: int) -> dict[str, Any]:
        """The record of a client whose update went into the round's secure sum: its own statistics, and what it
        sent (its contribution, as SecAgg+'s int64 values); no update to validate."""
        a = out.sent
        up = secure.contribution_numel(self.host.shapes, secure.state_rank(self.state), a.train_A, a.train_B)
        rec = {
            "type": "client",
            "round": round_index + 1,
            "client": out.client_id,
            "rank": a.rank,
            "n": int(out.stats.pop("n")),
            **out.stats,
            "secure": True,
            "up_params": up,
            "down_params": a.download_params,
            "up_bytes": up * secure.WIRE_BYTES,
            "down_bytes": a.download_params * BYTES_PER_PARAM,
        }
        self._record(rec)
        return rec

    def train_round(self, round_index: int) -> tuple[list[ClientUpdate], list[dict[str, Any]]]:
        """Sample, dispatch, train (through the executor), validate: the round's accepted updates and records.
        Under secure aggregation the updates are one: what the method reads from the clients' masked sum."""
        updates, recs = [], []
        self.sent = []  # what each accepted update was dispatched (the privacy mechanism clips the difference)
        specs = self.specs(round_index)
        summed: list[ClientAssignment] = []  # what each client in the secure sum was dispatched
        dispatched = []
        for out in self.executor.run(round_index, specs, lambda spec: self.dispatch(spec, round_index)):
            dispatched.append(out.sent)
            if out.summed:
                recs.append(self.accept_summed(out, round_index))
                summed.append(out.sent)
                continue
            result = self.accept(out, round_index)
            if result is not None:
                updates.append(result[0])
                recs.append(result[1])
                if self.dp is not None:  # kept only for the mechanism: it holds each client's factors
                    self.sent.append(out.sent)
            elif self.dp is not None:  # under DP a failed or rejected client counts, with no change
                s = out.sent
                updates.append(ClientUpdate(s.client_id, s.rank, 0, dict(s.factors), s.indices, s.train_A, s.train_B))
                self.sent.append(s)
        mean = self.executor.secure_mean(round_index)
        if summed and mean is not None:
            # holder shares from the server's own dispatch and the weights SecAgg+ used (public), not from the
            # quantised flags, whose remainders would divide an unheld index's remainder by itself
            mean = [*mean[:-1], secure.holder_shares(summed, self.weights(recs), mean[-1].numel())]
            if self.dp is not None:  # the clients added the noise; the rule divides by the round's K, as central DP's
                self.dp.check_dispatched(dispatched, round_index)
                mean = secure.fixed_denominators(mean, len(recs), dispatched)
            a = summed[0]
            one = secure.mean_update(self.method, self.state, mean, a.train_A, a.train_B, len(recs))
            # one update, counted once per client it sums (min_clients, skips); under DP once per dispatched
            # client, as the central mechanism counts a failed one: the unmasked sum is released and accounted
            updates = [one] * (len(dispatched) if self.dp is not None else len(recs))
        elif self.cfg.secure.enabled:  # nothing was unmasked (under DP: no null updates; nothing was released)
            updates = []
        return updates, recs

    def aggregate_round(self, t: int, updates: list[ClientUpdate], recs: list[dict[str, Any]], t0: float) -> str:
        """Aggregate round ``t``'s valid updates into the global state; returns the round's log line."""
        t_agg = time.perf_counter()
        private: dict[str, float] = {}
        noise: dict[str, Any] = {}
        # what a client keeps for its next round, from its own update (DP's clip and noise are for the release)
        locals_ = [(u.client_id, self.method.local_state(u)) for u in updates]
        if self.dp is not None and self.cfg.secure.enabled:  # noise added by the clients, under the masks
            private = self.dp.released()
            self.sent = []
        elif self.dp is not None:
            updates, noise, private = self.dp.apply(self.method, self.state, updates, self.sent, t)
            self.sent = []
        weights = [1.0] * len(updates) if self.dp is not None else self.weights(recs)  # DP: every sampled client
        if self.cfg.secure.enabled:  # the round's one update, read from the clients' weighted sum
            updates, weights = updates[:1], [1.0]
        self.state = self.method.aggregate(self.state, updates, weights, **noise)
        agg_s = time.perf_counter() - t_agg
        faults.hit("aggregate", t + 1)
        for client_id, local in locals_:
            if local is not None:
                checkpoint.save(local, self._local_path(client_id, t + 1))
        n = sum(r["n"] for r in recs)
        rnd = {
            "type": "round",
            "round": t + 1,
            "clients": len(recs),
            "train_loss": sum(r["loss"] * r["n"] for r in recs) / max(n, 1),
            "up_bytes": sum(r["up_bytes"] for r in recs),
            "down_bytes": sum(r["down_bytes"] for r in recs),
            "aggregate_seconds": agg_s,
            "train_seconds": self.train_seconds,  # the round's training as the server waited for it
            "spectrum": self.spectrum(),
            **private,
            "seconds": time.perf_counter() - t0,
        }
        self._record(rnd)
        eps = f"  ε {private['epsilon']:.3g}" if "epsilon" in private else ""
        return (
            f"round {t + 1}/{self.cfg.federation.rounds}: train loss {rnd['train_loss']:.4f}  "
            f"up {_mb(rnd['up_bytes'])}  down {_mb(rnd['down_bytes'])}  {rnd['seconds']:.1f}s{eps}"
        )

    def skip_round(self, round_index: int, valid: int) -> str:
        """Too few valid updates: the global state stays as it is (the round's log line)."""
        need = self.cfg.federation.min_clients
        self.skipped_rounds += 1
        self._record({"type": "round_skipped", "round": round_index + 1, "valid_updates": valid, "min_clients": need})
        return (
            f"round {round_index + 1}/{self.cfg.federation.rounds} skipped: {valid} valid update(s), "
            f"federation.min_clients = {need}; the global state is unchanged"
        )

    def check_skipped(self, round_index: int) -> None:
        """Too many skipped rounds end the run, naming what the last round's clients ran into."""
        limit, need = self.cfg.federation.max_skipped_rounds, self.cfg.federation.min_clients
        rounds = self.cfg.federation.rounds
        if self.skipped_rounds > limit:
            raise RunFailed(
                f"{self.skipped_rounds} rounds skipped with fewer than {need} valid client update(s) (more than "
                f"federation.max_skipped_rounds = {limit}); the last round's clients: " + self._reasons(round_index)
            )
        if self.skipped_rounds >= rounds:  # nothing was ever aggregated: not a result, whatever the limit says
            raise RunFailed(
                f"all {rounds} rounds were skipped with fewer than {need} valid client update(s); no update was "
                "aggregated. The last round's clients: " + self._reasons(round_index)
            )

    def _reasons(self, round_index: int) -> str:
        """Why the clients of round ``round_index`` were left out (of the latest round before it that left
        any out, when it sampled none), from metrics.jsonl."""
        from fedrank.report import read_metrics

        left = [r for r in read_metrics(self.metrics_path) if "reason" in r and r["round"] <= round_index + 1]
        last = max((r["round"] for r in left), default=None)
        reasons = [f"client {r['client']}: {r['reason']}" for r in left if r["round"] == last]
        where = "" if last in (None, round_index + 1) else f"(round {last}, the last that sampled any) "
        return where + ("; ".join(reasons) or "none sampled")

    def weights(self, recs: list[dict[str, Any]]) -> list[float]:
        """p_k before normalisation, as ``federation.weighting`` says."""
        key = self.cfg.federation.weighting
        if key == "uniform":
            return [1.0] * len(recs)
        return [float(r["n"] if key == "examples" else r["seen"]) for r in recs]

    def spectrum(self) -> dict[str, float]:
        """How the global ΔW's energy spreads over directions (the collapse onto the smallest shared rank
        that raFLoRA, 2026, reports): per layer, the share of Σσ² in the top r_min and top r_max singular
        directions (r_min, r_max: the smallest and largest client rank) and the effective rank exp(H(σ/Σσ))
        (Roy & Vetterli, 2007), each averaged over layers with every layer counting once."""
        gm = self.method.global_model(self.state)
        r_min, r_max = min(self.ranks), max(self.ranks)
        top_min, top_max, eff = [], [], []
        for name in gm.factors or (gm.base_delta or {}):
            Bs, As, ws = global_delta_terms(gm, name)
            e = energy_spectrum(svdvals_of_sum(Bs, As, ws), (r_min, r_max))
            if e is not None:
                top_min.append(e[0][0])
                top_max.append(e[0][1])
                eff.append(e[1])
        if not eff:  # ΔW = 0 in every layer
            return {"r_min": r_min, "r_max": r_max}
        return {
            "r_min": r_min,
            "r_max": r_max,
            "energy_top_rmin": sum(top_min) / len(top_min),
            "energy_top_rmax": sum(top_max) / len(top_max),
            "effective_rank": sum(eff) / len(eff),
        }

    def _base_eval_key(self, sets: dict[str, dict[str, list[Example]]]) -> str:
        """:func:`fedrank.eval_cache.key` of the base model's evaluation of ``sets`` in this process (the
        weights' digest computed once)."""
        if self._weights_digest is None:
            self._weights_digest = eval_cache.weights_digest(self.host.base_parameters())
        device = next(self.lm.model.parameters()).device
        return eval_cache.key(
            self._weights_digest,
            eval_cache.tokenizer_digest(self.lm.tokenizer),
            sets,
            self.cfg.eval.settings,
            eval_cache.runtime(device, uses_onednn(self.lm.model)),
        )

    def evaluation_model(self) -> ClientAssignment:
        """The global model (merged into the base weights for evaluation, see :meth:`LoraHost.merged`)."""
        return self.method.global_model(self.state)

    def _seen_sets(self, n_eval: int | None) -> dict[str, list[Example]]:
        """The participants' test examples by client, or (``eval.seen_by = "task"``) by task: each training
        task's held-out examples, pooled over the registered clients' test splits in client order until every
        training task has ``n_eval`` (the same examples at every evaluation; no client trains on its test
        split)."""
        if self.cfg.eval.seen_by == "client":
            return {str(c): list(self.fed.client(c).test[:n_eval]) for c in self.eval_clients}
        by_task: dict[str, list[Example]] = {}
        want = set(self.fed.train_tasks)
        for c in range(self.fed.num_clients):
            if self.fed.num_test_examples(c) == 0:
                continue
            for ex in self.fed.client(c).test:
                by_task.setdefault(ex.task, []).append(ex)
            if n_eval and all(len(by_task.get(t, ())) >= n_eval for t in want):
                break
        return {t: by_task[t][:n_eval] for t in sorted(by_task)}

    def evaluate(self, round_done: int) -> dict[str, Any]:
        """Every evaluated set on the global model, its update merged into the weights: an adapter of any width
        (FlexLoRA's exact ΔW has rank Σr_k) then costs what the base model costs, and no dense ΔW is kept.
        The base model's evaluation is reused from the cache when an identical one was kept
        (``eval.reuse_base``, :mod:`fedrank.eval_cache`)."""
        t0 = time.perf_counter()
        settings = self.cfg.eval.settings
        tok = self.lm.tokenizer
        n_eval = self.cfg.partition.max_eval_examples or None
        sets = {
            "unseen": {t: self.fed.eval_examples(t) for t in self.fed.eval_tasks},
            "participants": self._seen_sets(n_eval),
        }
        gm = self.evaluation_model()
        kept = None
        if self.cfg.eval.reuse_base and not changes_base(gm):
            kept = eval_cache.path_of(cache_dir(self.cfg.data.cache_dir or None), self._base_eval_key(sets))
        got = eval_cache.load(kept, {g: list(s) for g, s in sets.items()}) if kept else None
        reused = got is not None
        if got is None:
            got = {g: {} for g in sets}
            with self.host.merged(gm) as model:
                for g, named in sets.items():
                    for name, examples in named.items():
                        got[g][name] = evaluate_task(model, tok, examples, settings)
            release_memory(collect=False)  # the merged weights and the evaluation's buffers go back to the system
            if kept:
                eval_cache.store(kept, got)
        else:
            log.info("round %d: the base model's evaluation reused from %s", round_done, kept)
        unseen, part = got["unseen"], got["participants"]
        rec = {
            "type": "eval",
            "round": round_done,
            "unseen": unseen,
            "unseen_avg": macro_average(unseen),
            "participants": part,
            "participants_avg": macro_average(part) if part else {},
            "participant_tasks": (
                {t: [t] for t in part}
                if self.cfg.eval.seen_by == "task"
                else {str(c): list(self.fed.client_tasks(c)) for c in self.eval_clients}
            ),
            "seen_by": self.cfg.eval.seen_by,
            "seconds": time.perf_counter() - t0,
            "reused": reused,
        }
        self._record(rec)
        return rec

    def run(self) -> RunResult:
        cfg = self.cfg
        rounds = cfg.federation.rounds
        self.sitting_start = time.perf_counter()
        log.info(
            "%s: %d registered clients (%d training tasks), %d per round, %d rounds; ranks %s; %d unseen eval tasks "
            "from held-out families %s; seen = clients %s' own test splits",
            cfg.method.name,
            self.fed.num_clients,
            len(self.fed.train_tasks),
            self.per_round,
            rounds,
            _rank_hist(self.ranks),
            len(self.fed.eval_tasks),
            ", ".join(self.fed.held_out),
            self.eval_clients,
        )
        if not self.restored and cfg.eval.before:
            ev = self.evaluate(0)
            log.info("round 0 (before training): %s", _fmt(ev["unseen_avg"]))
            self._checkpoint(0)
        bar = tqdm(
            range(self.start_round, rounds),
            desc="rounds",
            disable=not self.progress,
            initial=self.start_round,
            total=rounds,
        )
        for t in bar:
            if self.dp is not None:
                self.dp.check_budget(t)  # before any training: a round that would exceed ε is not run
            t0 = time.perf_counter()
            updates, recs = self.train_round(t)
            self.train_seconds = time.perf_counter() - t0
            skipped = len(updates) < cfg.federation.min_clients
            msg = self.skip_round(t, len(updates)) if skipped else self.aggregate_round(t, updates, recs, t0)
            # once a round, not after each client (the next client would fault the pages in again): the
            # clients' activations and factors and the aggregation's scratch go back to the system before an
            # evaluation or the next round's training builds on top of them
            del updates, recs
            release_memory(collect=False)
            if (cfg.eval.every and (t + 1) % cfg.eval.every == 0) or t + 1 == rounds:
                ev = self.evaluate(t + 1)
                msg += f"  eval {_fmt(ev['unseen_avg'])}"
            log.info(msg)
            self._checkpoint(t + 1)
            if skipped:
                self.check_skipped(t)
        summary = self.finish(self.elapsed_seconds())
        return RunResult(self.out, summary)

    # ----------------------------------------------------------------- outputs
    def finish(self, seconds: float) -> dict[str, Any]:
        from fedrank.html_report import write_run_report
        from fedrank.report import (
            close,
            figures,
            peak_rss_bytes,
            rank_counts,
            read_metrics,
            run_summary,
            save_figures,
            time_split_summary,
            write_tensorboard,
        )

        records = read_metrics(self.metrics_path)
        rank = self.cfg.output.export_rank or self.max_rank
        adapter = export_global(self.method, self.state, self.cfg, rank, self.out / "adapter", self.lm.name_or_path)
        final = {"round": self.cfg.federation.rounds, "state": self.state, "config": to_dict(self.cfg)}
        checkpoint.save(final, self.out / run_dir.GLOBAL_STATE, kind="global_state")
        summary = run_summary(records, self.cfg.method.name)
        summary.update(
            {
                "seconds": seconds,
                "load_seconds": self.load_seconds,
                "data_seconds": self.data_seconds,
                "adapter": str(adapter),
                "export_rank": rank,
                "data": provenance(self.cfg.data, self.store),
                "held_out": self.fed.held_out,
                "training_tasks": len(self.fed.train_tasks),
                "registered_clients": self.fed.num_clients,
                "vocab_size": int(self.lm.model.config.vocab_size),
                "rank_counts": rank_counts(self.ranks),
                "global_state": str(self.out / run_dir.GLOBAL_STATE),
                **({"privacy": self.dp.summary()} if self.dp is not None else {}),
                "secure_aggregation": self.cfg.secure.enabled,
                "report": str(self.out / run_dir.REPORT),
            }
        )
        summary["time_split"] = time_split_summary(records, summary)  # data and load: this process's
        figs = figures(records, self.ranks, self.cfg.method.name) if self.cfg.output.plots else {}
        try:
            if figs:
                summary["plots"] = [str(p) for p in save_figures(figs, self.out / "plots")]
            if self.cfg.output.tensorboard:
                config_text = (self.out / "config.toml").read_text()
                summary["tensorboard"] = str(
                    write_tensorboard(records, self.out / "tensorboard", self.ranks, config_text)
                )
            summary["peak_rss_bytes"] = peak_rss_bytes()  # this process's, the plots included
            run_dir.write_json(self.out / run_dir.SUMMARY, summary)  # strict JSON, written atomically
            write_run_report(self.out, figs)
        finally:
            close(figs)
        return summary


def export_global(
    method: AggregationMethod[Any], state: Any, cfg: RunConfig, rank: int, out_dir: Path, base_name: str
) -> Path:
    """The global model at ``rank`` as a PEFT adapter.

    The global update of each layer (its LoRA product, plus FLoRA's merged base delta) is reduced to its
    best rank-``rank`` approximation through :func:`svd_of_sum`, exact whenever the global update has rank
    <= ``rank`` (e.g. FedIT/HetLoRA/FSLoRA at their own rank). FLoRA's merged delta is exported the same way,
    as a rank-``rank`` adapter from its SVD (not as merged weights).
    """
    if rank <= 0:
        raise ValueError(f"export rank must be positive, got {rank}")
    gm = method.global_model(state)
    if gm.base_delta is not None:
        log.info(
            "%s: exporting a rank-%d adapter from the SVD of the merged base delta (not merged weights)",
            method.name,
            rank,
        )
    out: dict[str, LoraFactors] = {}
    names = list(gm.factors) or list((gm.base_delta or {}).keys())
    for name in names:
        U, S, Vh = svd_of_sum(*global_delta_terms(gm, name), rank=rank)
        out[name] = LoraFactors(*truncate((U, S, Vh), rank, cfg.model.alpha, cfg.model.rslora))
    return export_peft_adapter(
        out_dir, out, lora_scaling(cfg.model.alpha, rank, cfg.model.rslora), base_name, cfg.model.target_modules
    )


def global_delta_terms(gm: ClientAssignment, name: str) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """Layer ``name``'s global update ΔW = s·B A (+ frozen modules s·B_frozen A_frozen, + a dense base delta:
    FedEx-LoRA's residual, FLoRA's merged delta) as the weighted factor products Σ_i w_i·B_i A_i that
    :func:`svd_of_sum` takes: (Bs, As, ws)."""
    Bs: list[Tensor] = []
    As: list[Tensor] = []
    ws: list[float] = []
    for part in (gm.factors, gm.frozen or {}):
        if name in part:
            f = part[name]
            Bs.append(f.B.float())
            As.append(f.A.float())
            ws.append(gm.scaling)
    if gm.base_delta is not None:
        d = gm.base_delta[name].float()
        Bs.append(d)
        As.append(torch.eye(d.shape[1]))
        ws.append(1.0)
    return Bs, As, ws


def _rank_hist(ranks: list[int]) -> str:
    vals, counts = np.unique(ranks, return_counts=True)
    return "{" + ", ".join(f"{v}: {c}" for v, c in zip(vals.tolist(), counts.tolist(), strict=True)) + "}"


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "perplexity")


def check_local_state(local: Any, path: Path) -> None:
    """A client's persisted state as fedrank writes it: layer name -> a finite floating tensor no larger in
    magnitude than a state holds (:data:`fedrank.untrusted.MAX_ABS`); anything else blames the file."""
    from fedrank.untrusted import MAX_ABS

    if not isinstance(local, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in local.items()):
        raise CheckpointError(f"{path} is not a client state (layer name -> tensor); a crafted or damaged file")
    for name, t in local.items():
        big = t.numel() > 0 and float(t.abs().max()) > MAX_ABS
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or big:
            raise CheckpointError(
                f"{path}: layer {name} is {t.dtype} {tuple(t.shape)} with values that are not finite or above "
                f"{MAX_ABS:g}; a crafted or damaged client state"
            )


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


UNIFORM = {"federation.weighting": "uniform"}

PRESETS: dict[str, dict[str, Any]] = {
    "fslora": {
        "train.optimizer": "sgd",
        "train.momentum": 0.9,
        "train.max_grad_norm": 0.0,
        "train.lr": FSLORA_SGD_LR,
        "model.rslora": True,
        **UNIFORM,
    },
    "fedex": UNIFORM,
    "rolora": UNIFORM,
    "fedplora": UNIFORM,
}
"""What ``compare`` and ``study`` change for a method so that it runs closer to how its authors run it
(``--no-presets``: off).

fslora: the paper's algorithm (sketch S_i, server step B ← B + η_s Σ_i p_i ΔB_i with η_s = 1) with what the
official code (wenzhifang/Federated-Sketching-LoRA-Implementation) shares with it: the client's SGD with
momentum 0.9 of its older commits (up to 1bc7362; its HEAD trains with AdamW), rsLoRA (``use_rslora=True``),
no gradient clipping (clipping would cut the r/k boost of a small-k client's gradient), and the plain mean
over the round's clients (p_i = 1/K). Not copied: the official ``lora_alpha = 1`` and client lr 3e-4 (fedrank
keeps the run's α and tunes the lr), its server AdamW (``method.per_method.fslora.server_optimizer =
"adamw"`` offers it), and its sketch, which it never applies (see ``fedrank.aggregation.fslora``).
fedex, rolora, fedplora: the papers average the round's clients with 1/K, not n_k (``weighting = "uniform"``).
"""


def with_method(
    cfg: RunConfig, name: str, seed: int, *, presets: bool = True, resample_data: bool = False
) -> RunConfig:
    """``cfg`` for another method and seed; homogeneous methods run every client at the pool's minimum rank.

    ``presets``: apply :data:`PRESETS` for ``name``. ``resample_data``: the partition seed follows the run
    seed too, so that held-out families and client splits are redrawn per seed (the spread over seeds
    then covers the data, not only initialisation and sampling)."""
    ranks = cfg.ranks
    if name in HOMOGENEOUS:
        ranks = replace(ranks, distribution="fixed")
    options = cfg.method.options if name == cfg.method.name else dict(cfg.method.per_method.get(name, {}))
    prune = cfg.method.prune if name == "hetlora" else {}
    scale = cfg.method.scale if name in FOLDABLE else "global"  # the others have a convention of their own
    method = replace(cfg.method, name=name, options=options, prune=prune, scale=scale)
    out = replace(cfg, seed=seed, ranks=ranks, method=method)
    if resample_data:
        out = replace(out, partition=replace(out.partition, seed=seed))
    if presets and name in PRESETS:
        out = override(out, PRESETS[name])
    return out
