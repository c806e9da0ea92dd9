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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedrank.checkpoint import CheckpointError
from fedrank.config import ConfigError, RunConfig, dumps_config, load_config
from fedrank.flower.records import decode_outcome, encode_assignment
from fedrank.local import Outcome
from fedrank.ranks import rank_for_budget
from fedrank.run_dir import RunDirError
from fedrank.simulation import Simulation, model_footprint
from fedrank.types import ClientAssignment, ClientSpec
from fedrank.validation import RunFailed

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


NODE_KEYS = ("partition-id", "num-partitions", "rank", "memory-mib", "task", "data-path")
"""The node-config keys fedrank reads (`flower-supernode --node-config "key=value key=value"`)."""


class NodeConfigError(ConfigError):
    """The deployment's SuperNodes are configured so that the run cannot be what the config says."""


@dataclass(frozen=True)
class NodeInfo:
    """What a SuperNode declares in the query round (0: not declared)."""

    node_id: int
    rank: int = 0
    memory_mib: float = 0.0


def _whole(value: object) -> int | None:
    """``value`` as an integer when it is one (an int, an integral float, or such a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(str(value))
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def check_node_config(
    node: int, conf: Mapping[str, object], num_clients: int
) -> tuple[int | None, NodeInfo, list[str]]:
    """One SuperNode's node config checked against the run: its partition id (None when unusable), what it
    declares, and one line per problem, each naming the node and the key."""
    problems = [
        f"node {node}: unknown node-config key {key!r} (fedrank reads {', '.join(NODE_KEYS)}; write "
        '--node-config "key=value key=value")'
        for key in sorted(set(conf) - set(NODE_KEYS))
    ]

    def integer(key: str, low: int, high: int | None = None) -> int:
        if key not in conf:
            return 0
        value = _whole(conf[key])
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        if value is None or value < low or (high is not None and value > high):
            problems.append(f"node {node}: node-config {key} = {conf[key]!r}: must be an integer {bound}")
            return 0
        return value

    pid: int | None = None
    if "partition-id" not in conf:
        problems.append(f"node {node}: node-config partition-id is missing (which registered client it is)")
    else:
        value = integer("partition-id", 0, num_clients - 1)
        pid = value if not any(p.startswith(f"node {node}: node-config partition-id") for p in problems) else None
    if "num-partitions" in conf and integer("num-partitions", 1) not in (0, num_clients):
        problems.append(
            f"node {node}: node-config num-partitions = {conf['num-partitions']!r}, but the run registers "
            f"partition.num_clients = {num_clients}"
        )
    rank = integer("rank", 1)
    memory = 0.0
    if "memory-mib" in conf:
        try:
            memory = float(str(conf["memory-mib"]))
        except ValueError:
            memory = -1.0
        if not memory > 0 or memory == float("inf"):
            problems.append(f"node {node}: node-config memory-mib = {conf['memory-mib']!r}: must be a positive number")
            memory = 0.0
    if conf.get("task") and conf.get("data-path"):
        problems.append(f"node {node}: node config has both task and data-path; give one")
    return pid, NodeInfo(node, rank, memory), problems


def query_nodes(
    grid: Grid, nodes: Sequence[int], timeout: float, num_clients: int, config_toml: str = ""
) -> dict[int, NodeInfo]:
    """partition id -> what its node declares, asked of every node in a QUERY round (which carries the
    run's config, so a node can check its own data); every problem with the deployment's node configs
    raises :class:`NodeConfigError`, one line each, before any training."""
    found, problems = _query(grid, nodes, timeout, num_clients, config_toml)
    if problems:
        raise NodeConfigError(
            f"the deployment's node configs are refused ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return found


def _query(
    grid: Grid, nodes: Sequence[int], timeout: float, num_clients: int, config_toml: str
) -> tuple[dict[int, NodeInfo], list[str]]:
    def content() -> RecordDict:
        return RecordDict({"run": ConfigRecord({"config": config_toml})})

    msgs = [Message(content(), dst_node_id=n, message_type=MessageType.QUERY, group_id="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}  # ids are given when a message is sent
    out: dict[int, NodeInfo] = {}
    problems: list[str] = []
    for reply in replies:
        node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            problems.append(f"node {node}: the query failed: {reply.error.reason}")
            continue
        conf = dict(reply.content.config_records["node"])
        local = str(reply.content.config_records["checks"]["problems"]) if "checks" in reply.content else ""
        pid, info, mine = check_node_config(node, conf, num_clients)
        problems += mine + [f"node {node}: {line}" for line in local.splitlines() if line]
        if pid is None:
            continue
        if pid in out:
            problems.append(f"nodes {out[pid].node_id} and {node} both declare node-config partition-id {pid}")
            continue
        out[pid] = info
    return out, problems


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
    partition; missing, failed and late nodes come back as failed outcomes with the reason.

    A node that did not answer in time, or answered with an error, is marked unavailable and not sampled
    again (:meth:`available`); it comes back when a node that was not connected at the last check (a new
    one, or the same one restarted) answers the query for its partition. Partitions that no node holds are
    never sampled."""

    def __init__(
        self,
        grid: Grid,
        found: dict[int, NodeInfo],
        config_toml: str,
        timeout: float,
        num_clients: int,
        on_new: Callable[[dict[int, NodeInfo]], None] = lambda found: None,
    ):
        self.grid, self.config_toml, self.timeout, self.num_clients = grid, config_toml, timeout, num_clients
        self.nodes = {pid: n.node_id for pid, n in found.items()}
        self.unavailable: dict[int, str] = {}  # partition -> why its node is not sampled
        self.connected = set(grid.get_node_ids())
        self.on_new = on_new

    def secure_mean(self, round_index: int) -> list[Tensor] | None:
        return None  # plain rounds: every update in the clear (secure ones: fedrank.flower.secagg)

    def available(self, round_index: int) -> frozenset[int] | None:
        self._query_new_nodes(round_index)
        reachable = frozenset(pid for pid in self.nodes if pid not in self.unavailable)
        return None if len(reachable) == self.num_clients else reachable

    def _query_new_nodes(self, round_index: int) -> None:
        now = set(self.grid.get_node_ids())
        new = sorted(now - self.connected)
        self.connected = now
        if not new:
            return
        found, problems = _query(self.grid, new, min(self.timeout, 300.0), self.num_clients, self.config_toml)
        for line in problems:
            log.warning("round %d: a new SuperNode is not used: %s", round_index + 1, line)
        for pid, info in found.items():
            log.info("round %d: node %d holds partition %d and can be sampled", round_index + 1, info.node_id, pid)
            self.nodes[pid] = info.node_id
            self.unavailable.pop(pid, None)
        self.on_new(found)

    def _fail(self, pid: int, node: int, reason: str) -> str:
        self.unavailable[pid] = reason
        log.warning("node %d (partition %d) is not sampled again until a node answers for it: %s", node, pid, reason)
        return f"node {node}: {reason}"

    def addressed(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[tuple[int, ClientAssignment, RecordDict] | Outcome]:
        """Each sampled client's assignment as its node's message content (node, assignment, content), or the
        failed outcome of a client whose partition no node holds."""
        for spec in clients:
            a = dispatch(spec)
            node = self.nodes.get(spec.client_id)
            if node is None:
                yield Outcome(spec.client_id, a, None, error=f"no SuperNode holds partition {spec.client_id}")
                continue
            yield node, a, encode_assignment(a, round_index, self.config_toml)

    def run(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[Outcome]:
        sent: list[tuple[Message, ClientAssignment, int]] = []
        for item in self.addressed(round_index, clients, dispatch):
            if isinstance(item, Outcome):
                yield item
                continue
            node, a, content = item
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
                yield Outcome(
                    a.client_id, a, None, error=self._fail(a.client_id, node, f"no reply within {self.timeout:g} s")
                )
            elif reply.has_error():
                yield Outcome(
                    a.client_id, a, None, error=self._fail(a.client_id, node, reply.error.reason or "an error")
                )
            else:
                out = decode_outcome(reply.content, a)
                if out.update is not None:
                    up = reply.content.array_records["update"].count_bytes()
                    out.stats.update(wire_down_bytes=down, wire_up_bytes=up, round_wall_seconds=wall)
                yield out


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a line is logged (not the one at setup, which a test
    harness, say, may have closed since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _log_to_stdout() -> None:
    """fedrank's log lines in the ServerApp's output (what ``flwr run --stream`` shows)."""
    root = logging.getLogger("fedrank")
    if not root.handlers:
        handler = _Stdout(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


class _OneLine(logging.Filter):
    """flwr logs a ServerApp's exception with its traceback; fedrank's own errors (a refused deployment,
    config or run directory) are one line, as ``fedrank run`` prints them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, USER_ERRORS):
            record.msg, record.args, record.exc_info = "fedrank: error: %s", (exc,), None
        return True


USER_ERRORS = (ConfigError, RunDirError, CheckpointError, RunFailed)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stdout()
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, _OneLine) for f in flwr_log.filters):
        flwr_log.addFilter(_OneLine())
    cfg, out, resume, timeout, node_wait = run_settings(dict(context.run_config))
    want = cfg.partition.num_clients
    nodes = wait_for_nodes(grid, want, node_wait)
    if not nodes:
        raise RunFailed(f"no SuperNode connected within {node_wait:g} s")
    found = query_nodes(grid, nodes, min(timeout, 300.0), want, dumps_config(cfg))
    log.info("%d SuperNode(s) answered for %d registered clients: %s", len(found), want, sorted(found))

    def executor(engine: Simulation) -> FlowerClients:
        apply_declared_ranks(engine, found)
        args = (grid, found, dumps_config(cfg), timeout, want)
        on_new = lambda new: apply_declared_ranks(engine, new)  # noqa: E731
        if not cfg.secure.enabled:
            return FlowerClients(*args, on_new=on_new)
        from fedrank.flower.secagg import SecureFlowerClients  # it builds on this module's FlowerClients
        from fedrank.secure import state_rank

        rank = lambda: state_rank(engine.state)  # noqa: E731
        dp = engine.dp
        noise = None if dp is None else (cfg.privacy.clip, dp.noise_multiplier, None if dp.secret else cfg.seed)
        return SecureFlowerClients(
            *args, on_new=on_new, secure=cfg.secure, rank=rank, weighting=cfg.federation.weighting, noise=noise
        )

    res = Simulation(cfg, out, resume=resume, progress=False, executor=executor).run()
    log.info("run finished: %s", res.out_dir)
