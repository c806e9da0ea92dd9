"""fedrank's Flower ServerApp: the simulator's round engine (:class:`fedrank.simulation.Simulation`) with
its clients on Flower SuperNodes.

Sampling, dispatch, validation, aggregation, evaluation, checkpoints, metrics and the run directory are the
engine's, unchanged; only how a sampled client trains differs (:class:`FlowerClients`): one TRAIN Message per
node with that node's assignment, replies matched by ``reply_to_message_id``, a node that does not answer
within the round's timeout recorded as failed (the round goes on with the others).

Run config (``flwr run ... --run-config``): ``config`` (absolute path of the fedrank TOML, required),
``overrides`` (``"train.lr=1e-4;federation.rounds=2"``), ``out-dir`` (absolute; default the config's
``output.dir`` resolved against the config file's folder), ``resume`` (continue from the run directory's
last checkpoint after the ServerApp was restarted), ``round-timeout`` (seconds a round waits for replies),
``node-wait`` (seconds to wait for the SuperNodes to connect).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrank.config import ConfigError, RunConfig, dumps_config, load_config
from fedrank.flower.records import decode_outcome, encode_assignment
from fedrank.local import Outcome
from fedrank.ranks import rank_for_budget
from fedrank.simulation import Simulation, model_footprint
from fedrank.types import ClientAssignment, ClientSpec

log = logging.getLogger(__name__)

app = ServerApp()


def run_settings(run_config: dict[str, object]) -> tuple[RunConfig, Path, bool, float, float]:
    """The fedrank config, output directory, resume flag, round timeout and node wait from run config."""
    path = str(run_config.get("config", ""))
    if not path or not Path(path).is_absolute():
        raise ConfigError(f"run config 'config' must be the absolute path of a fedrank TOML file, got {path!r}")
    overrides = [x.strip() for x in str(run_config.get("overrides", "")).split(";") if x.strip()]
    cfg = load_config(path, overrides)
    out = Path(str(run_config.get("out-dir", "")) or Path(path).parent / cfg.output.dir)
    resume = bool(run_config.get("resume", False))
    deadline = cfg.federation.client_deadline_s
    timeout = float(run_config.get("round-timeout", 0) or (deadline + 120 if deadline > 0 else 3600))  # type: ignore[arg-type]
    node_wait = float(run_config.get("node-wait", 120))  # type: ignore[arg-type]
    return cfg, out, resume, timeout, node_wait


def wait_for_nodes(grid: Grid, want: int, wait_s: float) -> list[int]:
    """The connected SuperNodes once ``want`` are there, or whatever is there after ``wait_s`` seconds."""
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() - t0 > wait_s:
            return nodes
        time.sleep(1.0)


@dataclass(frozen=True)
class NodeInfo:
    """What a SuperNode declares in the query round (0: not declared)."""

    node_id: int
    rank: int = 0
    memory_mib: float = 0.0


def query_nodes(grid: Grid, nodes: Sequence[int], timeout: float) -> dict[int, NodeInfo]:
    """partition id -> what its node declares, asked of every node in a QUERY round."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, group_id="query") for n in nodes]
    out: dict[int, NodeInfo] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log.warning("node query failed: %s", reply.error.reason)
            continue
        info = reply.content.config_records["node"]
        pid, node = int(info["partition-id"]), reply.metadata.src_node_id  # type: ignore[arg-type]
        if pid in out:
            raise ConfigError(f"SuperNodes {out[pid].node_id} and {node} both declare partition-id {pid}")
        out[pid] = NodeInfo(node, int(info["rank"]), float(info["memory-mib"]))  # type: ignore[arg-type]
    return out


def apply_declared_ranks(engine: Simulation, found: dict[int, NodeInfo]) -> None:
    """A node's declared rank replaces the run's draw for its partition (capped at the global rank); a
    declared memory budget (MiB) gives the largest of ``ranks.choices`` that fits it
    (:func:`fedrank.ranks.rank_for_budget`, the ``budget`` distribution's rule)."""
    cfg, top = engine.cfg, engine.max_rank
    fp = model_footprint(engine.lm, engine.host.shapes, cfg)
    for pid, node in sorted(found.items()):
        if pid >= len(engine.ranks):
            log.warning(
                "node %d declares partition-id %d; the run has %d clients", node.node_id, pid, len(engine.ranks)
            )
            continue
        rank = node.rank or (rank_for_budget(node.memory_mib * 2**20, cfg.ranks.choices, fp) if node.memory_mib else 0)
        if rank > top:
            log.warning(
                "partition %d (node %d) declares rank %d; it trains the global rank %d", pid, node.node_id, rank, top
            )
            rank = top
        if rank:
            engine.ranks[pid] = rank


class FlowerClients:
    """The engine's clients on SuperNodes: each sampled client's assignment goes to the node holding its
    partition; missing, failed and late nodes come back as failed outcomes with the reason."""

    def __init__(self, grid: Grid, nodes: dict[int, int], config_toml: str, timeout: float):
        self.grid, self.nodes, self.config_toml, self.timeout = grid, nodes, config_toml, timeout

    def run(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[Outcome]:
        sent: list[tuple[Message, ClientAssignment, int]] = []
        for spec in clients:
            a = dispatch(spec)
            node = self.nodes.get(spec.client_id)
            if node is None:
                yield Outcome(spec.client_id, a, None, error=f"no SuperNode holds partition {spec.client_id}")
                continue
            content = encode_assignment(a, round_index, self.config_toml)
            down = content.array_records["assignment"].count_bytes()
            msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(round_index + 1))
            sent.append((msg, a, down))
        t0 = time.perf_counter()
        replies = {
            r.metadata.reply_to_message_id: r
            for r in self.grid.send_and_receive([m for m, _, _ in sent], timeout=self.timeout)
        }
        wall = time.perf_counter() - t0
        for msg, a, down in sent:
            reply = replies.get(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if reply is None:
                yield Outcome(a.client_id, a, None, error=f"node {node}: no reply within {self.timeout:g} s")
            elif reply.has_error():
                yield Outcome(a.client_id, a, None, error=f"node {node}: {reply.error.reason}")
            else:
                out = decode_outcome(reply.content, a)
                if out.update is not None:
                    up = reply.content.array_records["update"].count_bytes()
                    out.stats.update(wire_down_bytes=down, wire_up_bytes=up, round_wall_seconds=wall)
                yield out


def _log_to_stdout() -> None:
    """fedrank's log lines in the ServerApp's output (what ``flwr run --stream`` shows)."""
    root = logging.getLogger("fedrank")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stdout()
    cfg, out, resume, timeout, node_wait = run_settings(dict(context.run_config))
    want = cfg.partition.num_clients
    nodes = wait_for_nodes(grid, want, node_wait)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {node_wait:g} s")
    found = query_nodes(grid, nodes, timeout=min(timeout, 300.0))
    log.info("%d SuperNode(s) answered for %d registered clients: %s", len(found), want, sorted(found))

    def executor(engine: Simulation) -> FlowerClients:
        apply_declared_ranks(engine, found)
        return FlowerClients(grid, {pid: n.node_id for pid, n in found.items()}, dumps_config(cfg), timeout)

    res = Simulation(cfg, out, resume=resume, progress=False, executor=executor).run()
    log.info("run finished: %s", res.out_dir)
