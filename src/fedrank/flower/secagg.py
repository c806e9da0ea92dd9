"""Secure aggregation on Flower: the round's clients train as always, but what they upload goes through
Flower's SecAgg+ (``SecAggPlusWorkflow`` here, ``secaggplus_mod`` in the ClientApp), so the ServerApp
receives only masked vectors and, after the unmask stage, their weighted sum: never one client's update.

flwr 1.42 offers SecAgg+ only in its legacy namespaces: the workflow wants a ``LegacyContext`` with a
``Strategy``, which this module supplies per round (:class:`_Sampled`), and its messages are legacy FitIns /
FitRes records. Four round trips per round: the setup (keys), the key shares, the masked vectors (the
stage in which each node trains: its message carries fedrank's assignment) and the unmask. What each client
contributes, and how a method reads the sum, is :mod:`fedrank.secure`'s.

What stays in the clear (SecAgg+ masks only the vector): who took part, each client's weight (its example
count with ``federation.weighting = "examples"``; 1 with "uniform") and its statistics (loss, tokens, tasks),
which fedrank's records and report show. A client that drops after the key sharing is tolerated as long as
``secure.threshold`` of its neighbours answer; below that the round is lost (every client of it recorded as
failed, the global state unchanged, as a round with too few updates).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from torch import Tensor

from fedrank.config import ConfigError, SecureConfig
from fedrank.flower.records import CLIENT_FAILED, secure_stats
from fedrank.flower.server_app import FlowerClients
from fedrank.local import Outcome
from fedrank.secure import min_contributors
from fedrank.types import ClientAssignment, ClientSpec

log = logging.getLogger(__name__)


class _Sampled(Strategy):
    """The strategy the workflow asks which nodes train (the round's sampled ones, chosen by fedrank's
    engine) and hands the unmasked result."""

    def __init__(self, grid: Grid, nodes: Sequence[int]):
        self.grid, self.nodes = grid, list(nodes)
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(GridClientProxy(n, self.grid, 0), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:  # type: ignore[type-arg]
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose masked-vector stage sends each node fedrank's own assignment record (not a FitIns)."""

    contents: dict[int, RecordDict]

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return bool(super().setup_stage(grid, context, state)) and self._everyone(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return bool(super().share_keys_stage(grid, context, state)) and self._everyone(state)

    @staticmethod
    def _everyone(state: Any) -> bool:
        """Halt before anyone trains when a node was lost in the key stages: flwr's unmask stage cannot
        finish such a round (it fails on the lost node's missing shares), and the caller restarts without it."""
        return len(state.active_node_ids) == len(state.sampled_node_ids)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        for node in state.nid_to_fitins:
            state.nid_to_fitins[node] = self.contents[node]
        return bool(super().collect_masked_vectors_stage(grid, context, state))


class _Watched:
    """The Grid as the workflow uses it, noting each node's error replies and unanswered messages (the
    workflow itself keeps only anonymous failures)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.problems: dict[int, str] = {}
        self.uploaded: dict[int, int] = {}  # node -> bytes of its masked vector as sent

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for r in replies:
            if r.has_error():
                self.problems.setdefault(r.metadata.src_node_id, r.error.reason or "an error")
                continue
            rec = r.content.config_records.get("secaggplus_configs")
            masked = rec.get("masked_params") if rec is not None else None
            if isinstance(masked, list):
                self.uploaded[r.metadata.src_node_id] = sum(len(b) for b in masked if isinstance(b, bytes))
        for m in msgs:
            if m.metadata.dst_node_id not in answered:
                self.problems.setdefault(m.metadata.dst_node_id, f"no reply within {timeout:g} s")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def own_failure(reason: str) -> str:
    """The client's reason from a flwr error reply carrying :data:`CLIENT_FAILED` (flwr wraps it as
    ``<class 'ValueError'>:<'...'>``)."""
    text = reason.split(CLIENT_FAILED, 1)[1]
    return text[:-2] if text.endswith("'>") else text


class SecureFlowerClients(FlowerClients):
    """:class:`FlowerClients` whose sampled nodes upload through SecAgg+: each trained client comes back as a
    ``summed`` outcome with its statistics, and :meth:`secure_mean` gives the unmasked weighted mean."""

    def __init__(
        self,
        *args: Any,
        secure: SecureConfig,
        rank: Callable[[], int],
        weighting: str,
        noise: tuple[float, float, int | None] | None = None,
        **kw: Any,
    ):
        """``noise``: under [privacy], (C, σ, the seed of the clients' noise or None for OS entropy): each
        client clips its change to C and adds N(0, σ²C²/t), t the fewest clients SecAgg+ can unmask
        (:func:`fedrank.secure.min_contributors`)."""
        super().__init__(*args, **kw)
        self.secure, self.rank, self.weighting, self.noise = secure, rank, weighting, noise
        self._mean: list[Tensor] | None = None
        self._uploaded: dict[int, int] = {}

    def secure_mean(self, round_index: int) -> list[Tensor] | None:
        return self._mean

    def run(
        self, round_index: int, clients: Sequence[ClientSpec], dispatch: Callable[[ClientSpec], ClientAssignment]
    ) -> Iterator[Outcome]:
        self._mean = None
        max_weight = max((c.num_examples for c in clients), default=1) if self.weighting == "examples" else 1
        sent: dict[int, tuple[ClientAssignment, int]] = {}
        contents: dict[int, RecordDict] = {}
        for item in self.addressed(round_index, clients, dispatch):
            if isinstance(item, Outcome):
                yield item
                continue
            node, a, content = item
            content.config_records["secure"] = ConfigRecord(
                {
                    "rank": self.rank(),
                    "clip-range": self.secure.clip_range,
                    "max-weight": max_weight,
                    "weighting": self.weighting,
                }
            )
            contents[node] = content
            sent[node] = (a, content.array_records["assignment"].count_bytes())
        if len(contents) * self.secure.quantization_range >= self.secure.modulus_range:
            raise ConfigError(
                f"secure aggregation: {len(contents)} clients x secure.quantization_range "
                f"{self.secure.quantization_range} reach secure.modulus_range {self.secure.modulus_range}: the masked "
                "sum would wrap; raise modulus_range (a power of 2) or lower quantization_range"
            )
        if len(contents) < 2:
            for a, _ in sent.values():
                yield Outcome(a.client_id, a, None, error="secure aggregation needs at least 2 clients in a round")
            return
        lost: dict[int, str] = {}  # nodes that did not answer (dead or cut off), dropped before a restart
        results, problems = self._protocol(round_index, contents, max_weight)
        silent = {n: why for n, why in problems.items() if why.startswith("no reply")}
        if not results and silent and len(contents) - len(silent) >= 2:
            # flwr's SecAgg+ cannot finish a round in which a node was lost in the key stages (:class:`_Workflow`
            # halts such a round before anyone trains): once more, without the nodes that did not answer
            log.warning(
                "round %d: secure aggregation lost (node(s) %s did not answer); once more without them",
                round_index + 1,
                ", ".join(map(str, sorted(silent))),
            )
            lost = silent
            results, problems = self._protocol(
                round_index, {n: c for n, c in contents.items() if n not in lost}, max_weight
            )
        problems = {**problems, **lost}
        contributed = {proxy.node_id: fitres for proxy, fitres in results}
        if results:
            self._mean = [torch.from_numpy(x.copy()).float() for x in parameters_to_ndarrays(results[0][1].parameters)]
        halted = "" if results else "secure aggregation halted (too few nodes answered to unmask the sum)"
        for node, (a, down) in sent.items():
            why = problems.get(node, "")
            if node in contributed:
                stats = secure_stats(contributed[node].metrics)
                stats.update(wire_down_bytes=down, wire_up_bytes=self._uploaded.get(node, 0))
                yield Outcome(a.client_id, a, None, stats, summed=True)
            elif CLIENT_FAILED in why:  # the client's own failure; its node is alive and is sampled again
                yield Outcome(a.client_id, a, None, error=f"node {node}: {own_failure(why)}")
            elif why and (results or why.startswith("no reply")):  # this node failed: not sampled again
                yield Outcome(a.client_id, a, None, error=self._fail(a.client_id, node, why))
            else:  # a lost round's errors are the protocol's, not necessarily this node's
                yield Outcome(a.client_id, a, None, error=f"node {node}: {halted or 'not in the unmasked sum'}: {why}")

    def _protocol(
        self, round_index: int, contents: dict[int, RecordDict], max_weight: int
    ) -> tuple[list[tuple[ClientProxy, FitRes]], dict[int, str]]:
        """One run of SecAgg+ over ``contents``' nodes: the legacy results (empty when it halted) and each
        node's problem (an error reply, or no reply)."""
        s = self.secure
        contents = {n: copy.deepcopy(c) for n, c in contents.items()}  # the workflow adds to them
        c_range = s.clip_range
        if self.noise is not None:  # distributed DP for the t of this attempt's n nodes that must answer
            clip, sigma, seed = self.noise
            std = sigma * clip / min_contributors(len(contents), s.shares, s.threshold) ** 0.5
            c_range = max(c_range, clip + 7 * std)  # a clipped, noised value lies beyond it with p < 1e-11
            for c in contents.values():
                rec = c.config_records["secure"]
                rec.update({"dp-clip": clip, "noise-std": std, "clip-range": c_range})
                if seed is not None:
                    rec["noise-seed"] = seed
        workflow = _Workflow(
            num_shares=s.shares,
            reconstruction_threshold=s.threshold,
            max_weight=float(max_weight),
            clipping_range=c_range,
            quantization_range=s.quantization_range,
            modulus_range=s.modulus_range,
            timeout=self.timeout,
        )
        workflow.contents = contents
        strategy = _Sampled(self.grid, list(contents))
        ctx = LegacyContext(Context(0, 0, {}, RecordDict(), {}), ServerConfig(num_rounds=1), strategy)
        ctx.state.config_records["config"] = ConfigRecord({"current_round": round_index + 1})
        ctx.state.array_records["parameters"] = ArrayRecord()
        watched = _Watched(self.grid)
        workflow(watched, ctx)  # type: ignore[arg-type]
        self._uploaded = watched.uploaded
        return strategy.results or [], watched.problems
