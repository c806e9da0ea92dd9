"""fedrank's Flower ClientApp: a SuperNode trains the assignment it is sent with the simulator's own
:class:`fedrank.local.LocalTrainer` (same model host, same ``train_local``, same seeds).

Node config (``flower-supernode --node-config "..."``; in Ray simulation Flower sets the first two):

* ``partition-id`` (required): which of the run's registered clients this node is; its data is that
  client's partition of the run's data (``partition.*``), exactly as in the simulator, unless
* ``task = "<name>"`` (one training task of the run's data) or ``data-path = "/abs/file.jsonl"`` (the node's
  own file: .json/.jsonl/.csv/.parquet) give the node other data (:func:`fedrank.data.node.node_data`).
* ``num-partitions``: must equal the run's ``partition.num_clients`` when given.
* ``rank``: the largest LoRA rank this node can train. The server asks for it in a query round and
  dispatches that rank; a payload of a higher rank is refused with an error reply.
* ``memory-mib``: without ``rank``, the node's memory budget; the server gives it the largest rank of
  ``ranks.choices`` that fits (the ``budget`` distribution's rule). With neither, the run's distribution
  (or ``ranks.per_client``) decides.

The model is built once per process and kept for the next message where the process lives on (Ray
simulation's actors); a deployment's SuperNode starts a fresh ``flwr-clientapp`` process per message
(Flower 1.42), which loads the base model each time (measured in ``benchmarks/flower_overhead.py``).
"""

from __future__ import annotations

import logging
import tomllib
from typing import Any

from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedrank.config import ConfigError, RunConfig, dumps_config, from_dict
from fedrank.data.node import node_config_int, node_data
from fedrank.flower.records import CLIENT_FAILED, decode_assignment, encode_contribution, encode_failure, encode_update
from fedrank.local import LocalTrainer
from fedrank.models import LoraHost
from fedrank.simulation import build_model
from fedrank.train import ClientFailure

log = logging.getLogger(__name__)

SECAGG = "secaggplus_configs"
"""The record SecAgg+'s messages carry (flwr's ``RECORD_KEY_CONFIGS``)."""


def secure_only(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+'s client side (``secaggplus_mod``) for the messages of a secure round only: the mod takes every
    TRAIN message as one of its stages, and a plain run's TRAIN messages are not."""
    if msg.metadata.message_type == MessageType.TRAIN and SECAGG in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_only])

_CACHE: dict[str, Any] = {}


def partition_id(context: Context) -> int:
    pid = node_config_int(context.node_config, "partition-id")
    if pid is None:
        raise ValueError("this SuperNode has no partition-id in its node config (--node-config 'partition-id=N ...')")
    return pid


def _trainer(cfg: RunConfig) -> LocalTrainer:
    """The model host for ``cfg``, kept for the process's next message."""
    key = dumps_config(cfg)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        lm = build_model(cfg)
        _CACHE.update(
            key=key, trainer=LocalTrainer(lm, LoraHost(lm.model, cfg.model.target_modules, cfg.model.alpha), cfg)
        )
    trainer: LocalTrainer = _CACHE["trainer"]
    return trainer


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: its node config as given (the server checks it against the run before any
    training), and what only the node can check: that its own data (``task``, ``data-path``) can be read
    under the run's config, when the query carries it."""
    conf: dict[str, ConfigRecordValues] = {
        k: v for k, v in context.node_config.items() if isinstance(v, bool | int | float | str)
    }
    problems = []
    config_toml = str(msg.content.config_records["run"]["config"]) if "run" in msg.content else ""
    if config_toml and ("task" in conf or "data-path" in conf):
        try:
            cfg: RunConfig = from_dict(RunConfig, tomllib.loads(config_toml))
            node_data(cfg.data, cfg.partition, context.node_config, cfg.seed)
        except (OSError, ValueError) as e:  # ConfigError and TOMLDecodeError are ValueErrors
            key = "data-path" if "data-path" in conf else "task"
            problems.append(f"node-config {key}: {e}")
    checks = ConfigRecord({"problems": "\n".join(problems)})
    return Message(RecordDict({"node": ConfigRecord(conf), "checks": checks}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    a, round_index, config_toml = decode_assignment(msg.content)
    declared = node_config_int(context.node_config, "rank")
    if declared and a.rank > declared:
        raise ValueError(
            f"refused: the server sent a rank-{a.rank} assignment, but this node declared rank {declared} "
            "(node config 'rank'); it cannot train above it"
        )
    pid = partition_id(context)
    if a.client_id != pid:
        raise ValueError(f"refused: the assignment is for client {a.client_id}, this node is partition {pid}")
    try:
        cfg: RunConfig = from_dict(RunConfig, tomllib.loads(config_toml))
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise ValueError(f"the run's config could not be read: {e}") from e
    data = node_data(cfg.data, cfg.partition, context.node_config, cfg.seed)
    secure = msg.content.config_records.get("secure")
    try:
        update, stats = _trainer(cfg).train(a, data, round_index)
    except ClientFailure as e:
        log.warning("round %d: client %d failed: %s", round_index + 1, a.client_id, e)
        if secure is not None:  # SecAgg+ has no failure record: an error reply drops the node from the sum
            raise ValueError(f"{CLIENT_FAILED}{e}") from e
        return Message(encode_failure(a.client_id, str(e)), reply_to=msg)
    if secure is not None:  # SecAgg+'s masked-vector stage: the mod masks what this returns
        return Message(encode_contribution(update, a, stats, secure, round_index), reply_to=msg)
    return Message(encode_update(update, stats), reply_to=msg)
