"""What crosses the wire between fedrank's ServerApp and ClientApp, as Flower records.

A dispatched :class:`~fedrank.types.ClientAssignment` travels as an ``ArrayRecord`` (each layer's ``B`` and
``A``, its ``frozen_B`` and ``frozen_A`` (the modules the client folds into its base), the dense
``base_delta`` (FedEx-LoRA's residual, FLoRA's merged delta), the sketch or module ``indices``; for the
folding methods and FLoRA exactly the tensors its ``download_params`` counts, plus the indices) and a
``ConfigRecord`` (rank, scaling, which factors train, the round and the run's resolved config as TOML). A
client's answer is an ``ArrayRecord`` of the factors it trained (a frozen factor is not uploaded: the server
takes it from what it sent), a ``MetricRecord`` of its statistics and a ``ConfigRecord`` with its task names,
or a ``ConfigRecord`` with the reason it failed. Tensors keep their dtype and bits (fp32 on the wire).
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from torch import Tensor

from fedrank.aggregation.base import derive_generator
from fedrank.local import Outcome
from fedrank.privacy import clip_update
from fedrank.secure import add_client_noise, contribution
from fedrank.types import ClientAssignment, ClientUpdate, LoraFactors

__all__ = [
    "CLIENT_FAILED",
    "decode_assignment",
    "decode_outcome",
    "encode_assignment",
    "encode_contribution",
    "encode_failure",
    "encode_update",
    "secure_stats",
]

CLIENT_FAILED = "fedrank client failure: "
"""Under secure aggregation a client that fails its own round (diverged, missed its deadline, a value out of
range) can only answer with an error (SecAgg+ has no failure record); this prefix tells the server that the
node itself is alive."""

_STATS_KEYS = ("loss", "first_loss", "last_loss", "examples", "seen", "tokens", "truncated", "seconds")


def _arrays(tensors: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _tensors(rec: ArrayRecord) -> dict[str, Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in rec.items()}


def encode_assignment(a: ClientAssignment, round_index: int, config_toml: str) -> RecordDict:
    arrays: dict[str, Tensor] = {}
    for name, f in a.factors.items():
        arrays[f"{name}::B"], arrays[f"{name}::A"] = f.B, f.A
    for name, f in (a.frozen or {}).items():
        arrays[f"{name}::frozen_B"], arrays[f"{name}::frozen_A"] = f.B, f.A
    for name, d in (a.base_delta or {}).items():
        arrays[f"{name}::base_delta"] = d
    if a.indices is not None:
        arrays["::indices"] = a.indices
    meta = ConfigRecord(
        {
            "client-id": a.client_id,
            "rank": a.rank,
            "scaling": float(a.scaling),
            "download-params": a.download_params,
            "train-A": a.train_A,
            "train-B": a.train_B,
            "round": round_index,
            "config": config_toml,
        }
    )
    return RecordDict({"assignment": _arrays(arrays), "meta": meta})


def decode_assignment(content: RecordDict) -> tuple[ClientAssignment, int, str]:
    """The assignment, the 0-based round and the run's config TOML."""
    meta = content.config_records["meta"]
    arrays = _tensors(content.array_records["assignment"])
    factors: dict[str, LoraFactors] = {}
    base: dict[str, Tensor] = {}
    for key, t in arrays.items():
        name, part = key.rsplit("::", 1)
        if part == "base_delta":
            base[name] = t
    for name in {k.rsplit("::", 1)[0] for k in arrays if k.endswith("::B")}:
        factors[name] = LoraFactors(arrays[f"{name}::B"], arrays[f"{name}::A"])
    frozen = {
        name: LoraFactors(arrays[f"{name}::frozen_B"], arrays[f"{name}::frozen_A"])
        for name in {k.rsplit("::", 1)[0] for k in arrays if k.endswith("::frozen_B")}
    }
    for name, f in frozen.items():
        if name not in factors or f.shape != factors[name].shape:
            want = f"its factors a {factors[name].shape} one" if name in factors else "it has no factors"
            raise ValueError(f"assignment: layer {name}'s frozen modules are for a {f.shape} weight, {want}")
    a = ClientAssignment(
        client_id=int(meta["client-id"]),  # type: ignore[arg-type]
        rank=int(meta["rank"]),  # type: ignore[arg-type]
        scaling=float(meta["scaling"]),  # type: ignore[arg-type]
        factors=factors,
        download_params=int(meta["download-params"]),  # type: ignore[arg-type]
        train_A=bool(meta["train-A"]),
        train_B=bool(meta["train-B"]),
        indices=arrays.get("::indices"),
        base_delta=base or None,
        frozen=frozen or None,
    )
    return a, int(meta["round"]), str(meta["config"])  # type: ignore[arg-type]


def encode_update(update: ClientUpdate, stats: dict[str, Any]) -> RecordDict:
    arrays: dict[str, Tensor] = {}
    for name, f in update.factors.items():
        if update.train_B:
            arrays[f"{name}::B"] = f.B
        if update.train_A:
            arrays[f"{name}::A"] = f.A
    if update.indices is not None:
        arrays["::indices"] = update.indices
    metrics = MetricRecord({k: stats[k] for k in _STATS_KEYS if k in stats})
    meta = ConfigRecord(
        {
            "client-id": update.client_id,
            "rank": update.rank,
            "num-examples": update.num_examples,
            "tasks": stats["tasks"],
        }
    )
    return RecordDict({"update": _arrays(arrays), "stats": metrics, "meta": meta})


def encode_failure(client_id: int, reason: str) -> RecordDict:
    """A client's own failure (diverged, missed its deadline): recorded by the server, not a crash."""
    return RecordDict({"failure": ConfigRecord({"client-id": client_id, "reason": reason})})


def decode_outcome(content: RecordDict, sent: ClientAssignment) -> Outcome:
    """The client's answer to ``sent`` as the round engine takes it; the factor a client kept frozen is the
    one it was sent (at the returned rank). Malformed answers become failures with the reason."""
    if "failure" in content.config_records:
        return Outcome(sent.client_id, sent, None, error=str(content.config_records["failure"]["reason"]))
    try:
        meta = content.config_records["meta"]
        arrays = _tensors(content.array_records["update"])
        rank = int(meta["rank"])  # type: ignore[arg-type]
        factors = {}
        for name, s in sent.factors.items():
            B = arrays[f"{name}::B"] if sent.train_B else s.B[:, :rank].clone()
            A = arrays[f"{name}::A"] if sent.train_A else s.A[:rank].clone()
            factors[name] = LoraFactors(B, A)
        update = ClientUpdate(
            int(meta["client-id"]),  # type: ignore[arg-type]
            rank,
            int(meta["num-examples"]),  # type: ignore[arg-type]
            factors,
            arrays.get("::indices"),
            sent.train_A,
            sent.train_B,
        )
    except (KeyError, ValueError, TypeError) as e:
        return Outcome(sent.client_id, sent, None, error=f"malformed reply: {type(e).__name__}: {e}")
    stats: dict[str, Any] = dict(content.metric_records["stats"])
    stats["tasks"] = list(meta["tasks"])  # type: ignore[arg-type]
    return Outcome(sent.client_id, sent, update, stats)


def encode_contribution(
    update: ClientUpdate, sent: ClientAssignment, stats: dict[str, Any], secure: ConfigRecord, round_index: int
) -> RecordDict:
    """Under secure aggregation: the client's contribution (:func:`fedrank.secure.contribution`) as the legacy
    FitRes that ``secaggplus_mod`` masks, its weight as the FitRes's example count, its statistics as metrics
    (in the clear, as SecAgg+ leaves them); under [privacy] clipped to C and noised first (``dp-clip``,
    ``noise-std``; the noise from OS entropy unless the run is seeded). Raises ValueError when a value lies
    outside the protocol's range (SecAgg+ would clip it without a word) or the weight above the server's
    ``max_weight``."""
    clip = float(secure.get("dp-clip", 0.0))  # type: ignore[arg-type]
    if clip > 0:  # distributed DP: clipped and noised by the client, before the masks
        update = clip_update(update, sent, clip).update
    parts = contribution(update, sent, int(secure["rank"]))  # type: ignore[arg-type]
    std = float(secure.get("noise-std", 0.0))  # type: ignore[arg-type]
    if std > 0:
        seed = secure.get("noise-seed")
        keys = (int(seed), round_index, update.client_id, 0xD15) if seed is not None else (secrets.randbits(63),)  # type: ignore[arg-type]
        parts = add_client_noise(parts, std, derive_generator(*keys))
    c = float(secure["clip-range"])  # type: ignore[arg-type]
    peak = max(float(t.abs().max()) for t in parts)
    if not peak <= c:  # the value itself stays on the client: this reason reaches the server in the clear
        raise ValueError(
            f"{CLIENT_FAILED}client {update.client_id}: a value of its update's change lies outside "
            f"secure.clip_range = ±{c:g}, which SecAgg+ would clip; raise secure.clip_range or lower train.lr"
        )
    weight = 1 if secure["weighting"] == "uniform" else update.num_examples
    max_weight = float(secure["max-weight"])  # type: ignore[arg-type]
    if weight > max_weight:
        raise ValueError(
            f"{CLIENT_FAILED}client {update.client_id}: its weight {weight} (examples) exceeds the server's max_weight "
            f"{max_weight:g} (the node's data is larger than the run's partition says)"
        )
    metrics: dict[str, Scalar] = {k: stats[k] for k in _STATS_KEYS if k in stats}
    metrics.update(n=update.num_examples, tasks="\n".join(stats["tasks"]))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([t.numpy() for t in parts]), weight, metrics)
    return fitres_to_recorddict(fitres, keep_input=False)


def secure_stats(metrics: dict[str, Scalar]) -> dict[str, Any]:
    """A summed client's statistics from its FitRes metrics (``n`` and ``tasks`` included)."""
    stats: dict[str, Any] = {k: metrics[k] for k in (*_STATS_KEYS, "n") if k in metrics}
    stats["tasks"] = [t for t in str(metrics.get("tasks", "")).split("\n") if t]
    return stats
