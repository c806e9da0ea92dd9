"""fedrank's Flower apps, in process: the ServerApp's executor and the ClientApp exchange real Flower Messages
through a stand-in Grid that calls the ClientApp directly (no SuperLink, no processes: seconds). The loopback
deployment with real processes is in tests/test_flower_deploy.py."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedrank.checkpoint import load  # noqa: E402
from fedrank.config import load_config  # noqa: E402
from fedrank.flower import client_app, server_app  # noqa: E402
from fedrank.simulation import Simulation, with_method  # noqa: E402
from fedrank.types import ClientSpec  # noqa: E402
from helpers import tiny_toml  # noqa: E402

TINY = tiny_toml(
    partition={"num_clients": 3},
    ranks={"distribution": None, "choices": [4, 8, 16], "per_client": [4, 8, 16]},
    federation={"clients_per_round": 3},
)


class FakeGrid:
    """A Grid whose nodes are ClientApp calls in this process, each with its own node config and state.

    ``drop``: node ids that answer the query but no training message (a node that died); ``fail_round``:
    the 1-based round whose send raises, as a ServerApp crash would end the run there."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], drop: Iterable[int] = (), fail_round: int = 0):
        self.configs = node_configs
        self.state = {n: RecordDict() for n in node_configs}
        self.drop, self.fail_round = set(drop), fail_round
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.configs)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        out = []
        for msg in messages:
            if msg.metadata.group_id == str(self.fail_round):
                raise ConnectionError("the SuperLink went away")
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Grid.push_messages does
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.drop and msg.metadata.message_type == "train":  # it died after the query round
                continue
            ctx = Context(1, node, self.configs[node], self.state[node], {})
            try:
                out.append(client_app.app(message=msg, context=ctx))
            except Exception as e:  # what flwr-clientapp turns an exception into
                out.append(Message(Error(code=3, reason=f"{type(e)}:<'{e}'>"), reply_to=msg))
        return iter(out)


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages need a run
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def nodes(ranks: list[int]) -> dict[int, dict[str, Any]]:
    """Node id 100 + i holds partition i and declares ranks[i]."""
    return {100 + i: {"partition-id": i, "num-partitions": len(ranks), "rank": r} for i, r in enumerate(ranks)}


def run_server(grid: FakeGrid, cfg_path: Path, out: Path, **run_config: Any) -> None:
    rc = {"config": str(cfg_path), "out-dir": str(out), "node-wait": 1, **run_config}
    server_app.main(grid, Context(1, 1, {}, RecordDict(), rc))  # type: ignore[arg-type]


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without what differs between equal runs: times, wire bytes, and whether the base model's
    evaluation was reused from an earlier run (its numbers are the same)."""
    return [{k: v for k, v in r.items() if "seconds" not in k and "wire" not in k and k != "reused"} for r in recs]


def same_state(a: Path, b: Path) -> bool:
    sa, sb = load(a / "global_state.safetensors")["state"], load(b / "global_state.safetensors")["state"]
    flat_a, flat_b = _flat(sa), _flat(sb)
    return flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


def _flat(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}/{key}").items()}
    if hasattr(obj, "__dataclass_fields__"):
        return _flat({f: getattr(obj, f) for f in obj.__dataclass_fields__}, prefix)
    return {}


@pytest.mark.parametrize("method", ["flexlora", "fslora"])
def test_flower_run_equals_the_simulator_bit_for_bit(method: str, cfg_path: Path, tmp_path: Path) -> None:
    """Same config and seed: the ServerApp + ClientApps reach exactly the in-process simulator's global state,
    each node training at its own rank."""
    cfg = with_method(load_config(cfg_path), method, 0, presets=False)
    sim_out = tmp_path / "sim"
    Simulation(cfg, sim_out, progress=False).run()
    grid = FakeGrid(nodes([4, 8, 16]))
    run_server(grid, cfg_path, tmp_path / "flower", overrides=f"method.name={method}")
    assert same_state(sim_out, tmp_path / "flower")
    clients = [r for r in records(tmp_path / "flower") if r["type"] == "client"]
    assert len(clients) == 6 and {(r["client"], r["rank"]) for r in clients} <= {(0, 4), (1, 8), (2, 16)}
    if method == "fslora":  # a node of rank r holds r of the global rank-16 indices
        assert all(r["rank"] == [4, 8, 16][r["client"]] for r in clients)
    assert untimed(records(tmp_path / "flower")) == untimed(records(sim_out))  # every record, in the same order
    assert (tmp_path / "flower" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["rounds"] == 2


@pytest.mark.parametrize("method", ["flexlora", "fslora"])
def test_a_private_flower_run_equals_the_private_simulator(method: str, cfg_path: Path, tmp_path: Path) -> None:
    """Client-level DP is the engine's: on Flower the same clipping, the same seeded noise and the same ε."""
    private = "federation.weighting=uniform;privacy.clip=0.5;privacy.noise_multiplier=0.8;privacy.seeded=true"
    overrides = f"method.name={method};{private}"
    cfg = with_method(load_config(cfg_path, overrides.split(";")), method, 0, presets=False)
    Simulation(cfg, tmp_path / "sim", progress=False).run()
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "flower", overrides=overrides)
    assert same_state(tmp_path / "sim", tmp_path / "flower")
    theirs, ours = (json.loads((tmp_path / d / "summary.json").read_text())["privacy"] for d in ("sim", "flower"))
    assert ours == theirs and ours["epsilon"] > 0 and ours["rounds"] == 2


def test_declared_node_ranks_override_the_config(cfg_path: Path, tmp_path: Path) -> None:
    grid = FakeGrid(nodes([8, 4, 4]))
    run_server(grid, cfg_path, tmp_path / "run")
    ranks = {r["client"]: r["rank"] for r in records(tmp_path / "run") if r["type"] == "client"}
    assert ranks == {0: 8, 1: 4, 2: 4}


def test_a_declared_memory_budget_gives_the_largest_rank_that_fits(cfg_path: Path, tmp_path: Path) -> None:
    from fedrank.ranks import training_bytes
    from fedrank.simulation import model_footprint

    probe = Simulation(load_config(cfg_path), tmp_path / "probe", progress=False)
    fits_8 = (training_bytes(model_footprint(probe.lm, probe.host.shapes, probe.cfg), 8) + 1) / 2**20
    grid = FakeGrid({100 + i: {"partition-id": i, "memory-mib": fits_8} for i in range(3)})
    run_server(grid, cfg_path, tmp_path / "run")
    assert {r["rank"] for r in records(tmp_path / "run") if r["type"] == "client"} == {8}


def test_a_node_trains_on_its_own_file(cfg_path: Path, tmp_path: Path) -> None:
    """node config data-path: the node's own examples (here grouped by the file's task column)."""
    own = Path(__file__).parent / "fixtures" / "files" / "examples.jsonl"
    grid = FakeGrid({**nodes([4, 8, 16]), 102: {"partition-id": 2, "rank": 16, "data-path": str(own)}})
    run_server(grid, cfg_path, tmp_path / "run", overrides="data.group_by=task")
    mine = [r for r in records(tmp_path / "run") if r["type"] == "client" and r["client"] == 2]
    assert len(mine) == 2 and all(r["rank"] == 16 for r in mine)
    file_tasks = {json.loads(x)["task"] for x in own.read_text().splitlines()}
    assert all(set(r["tasks"]) == file_tasks for r in mine)
    assert mine[0]["n"] == 10  # the file's 12 rows less 2 held back as its test split (test_fraction 0.2)


def test_a_node_refuses_a_rank_above_its_declared_rank(cfg_path: Path, tmp_path: Path) -> None:
    sim = Simulation(load_config(cfg_path), tmp_path / "run", progress=False)
    grid = FakeGrid(nodes([4, 8, 16]))
    ex = server_app.FlowerClients(grid, {0: server_app.NodeInfo(100, 4)}, "", 5, 3)  # type: ignore[arg-type]
    (out,) = ex.run(0, [ClientSpec(0, 16, 13)], lambda s: sim.dispatch(s, 0))
    assert out.update is None and out.error is not None
    assert "refused: the server sent a rank-16 assignment, but this node declared rank 4" in out.error


def test_a_silent_node_is_recorded_and_not_sampled_again(cfg_path: Path, tmp_path: Path) -> None:
    """Node 101 died after the query round: round 1 records it and goes on; later rounds sample only the
    nodes that answer (before: it was sampled, and failed, in every round)."""
    grid = FakeGrid(nodes([4, 8, 16]), drop=[101])
    run_server(grid, cfg_path, tmp_path / "run", **{"round-timeout": 5}, overrides="federation.rounds=3")
    recs = records(tmp_path / "run")
    failed = [r for r in recs if r["type"] == "client_failed"]
    assert [(r["round"], r["client"]) for r in failed] == [(1, 1)]
    assert failed[0]["reason"] == "node 101: no reply within 5 s"
    assert [r["clients"] for r in recs if r["type"] == "round"] == [2, 2, 2]
    trained = [(r["round"], r["client"]) for r in recs if r["type"] == "client"]
    assert trained == [(1, 0), (1, 2), (2, 0), (2, 2), (3, 0), (3, 2)] or sorted(trained) == sorted(
        [(1, 0), (1, 2), (2, 0), (2, 2), (3, 0), (3, 2)]
    )
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert [m.metadata.dst_node_id for m in train_msgs].count(101) == 1


class ComingBackGrid(FakeGrid):
    """Node 101 dies after the query round; before round 3 a new node (104) connects for its partition."""

    def __init__(self, node_configs: dict[int, dict[str, Any]]):
        super().__init__(node_configs, drop=[101])
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        trains = {m.metadata.group_id for m in self.sent if m.metadata.message_type == "train"}
        if "2" in trains and 104 not in self.configs:  # after round 2 was sent
            self.configs[104], self.state[104] = dict(self.configs[101]), RecordDict()
            del self.configs[101]
        return list(self.configs)


def test_a_node_that_connects_for_a_dead_partition_brings_it_back(cfg_path: Path, tmp_path: Path) -> None:
    grid = ComingBackGrid(nodes([4, 8, 16]))
    run_server(grid, cfg_path, tmp_path / "run", **{"round-timeout": 5}, overrides="federation.rounds=3")
    recs = records(tmp_path / "run")
    by_round = {t: sorted(r["client"] for r in recs if r["type"] == "client" and r["round"] == t) for t in (1, 2, 3)}
    assert by_round == {1: [0, 2], 2: [0, 2], 3: [0, 1, 2]}
    queries = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert queries == [100, 101, 102, 104]
    back = [r for r in recs if r["type"] == "client" and r["client"] == 1]
    assert back[0]["rank"] == 8  # the new node's declared rank


def test_partitions_without_a_node_are_not_sampled(cfg_path: Path, tmp_path: Path) -> None:
    grid = FakeGrid({100: {"partition-id": 0, "rank": 4}, 102: {"partition-id": 2, "rank": 16}})
    run_server(grid, cfg_path, tmp_path / "run")
    recs = records(tmp_path / "run")
    assert not [r for r in recs if r["type"].startswith("client_")]
    assert {r["client"] for r in recs if r["type"] == "client"} == {0, 2}


def test_a_run_whose_rounds_all_failed_is_not_a_success(cfg_path: Path, tmp_path: Path) -> None:
    from fedrank.validation import RunFailed

    grid = FakeGrid(nodes([4, 8, 16]), drop=[100, 101, 102])
    with pytest.raises(RunFailed, match=r"all 2 rounds were skipped .* client 0: node 100: no reply within 5 s"):
        run_server(grid, cfg_path, tmp_path / "run", **{"round-timeout": 5})
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(
    ("node_config", "line"),
    [
        ({}, "node 100: node-config partition-id is missing"),  # flwr reads "partition-id 2 rank 16" as {}
        ({"partition-id": 0, "rank": 16.5}, "node 100: node-config rank = 16.5: must be an integer >= 1"),
        ({"partition-id": 0, "rank": 0}, "node 100: node-config rank = 0: must be an integer >= 1"),
        ({"partition-id": 3}, "node 100: node-config partition-id = 3: must be an integer in [0, 2]"),
        ({"partition-id": "x"}, "node 100: node-config partition-id = 'x': must be an integer in [0, 2]"),
        (
            {"partition-id": 0, "num-partitions": 5},
            "node 100: node-config num-partitions = 5, but the run registers partition.num_clients = 3",
        ),
        ({"partition-id": 0, "ranks": 4}, "node 100: unknown node-config key 'ranks'"),
        ({"partition-id": 0, "memory-mib": -1}, "node 100: node-config memory-mib = -1: must be a positive number"),
        ({"partition-id": 0, "task": "nope"}, "node 100: node-config task: node config task 'nope'"),
        ({"partition-id": 0, "data-path": "/no/such.jsonl"}, "node 100: node-config data-path: "),
    ],
)
def test_a_bad_node_config_is_refused_at_the_query_round(
    node_config: dict[str, Any], line: str, cfg_path: Path, tmp_path: Path
) -> None:
    """Each bad node config is one line naming the node and the key, raised before any training message."""
    grid = FakeGrid({100: node_config, 101: {"partition-id": 1}, 102: {"partition-id": 2}})
    with pytest.raises(server_app.NodeConfigError) as err:
        run_server(grid, cfg_path, tmp_path / "run")
    assert line in str(err.value)
    assert str(err.value).count("\n  node") == 1  # one problem, one line
    assert all(m.metadata.message_type == "query" for m in grid.sent)
    assert not (tmp_path / "run").exists()


def test_two_nodes_with_one_partition_id_are_refused(cfg_path: Path, tmp_path: Path) -> None:
    grid = FakeGrid({100: {"partition-id": 0}, 101: {"partition-id": 2}, 102: {"partition-id": 2}})
    with pytest.raises(server_app.NodeConfigError, match="nodes 101 and 102 both declare node-config partition-id 2"):
        run_server(grid, cfg_path, tmp_path / "run")


def test_fedrank_errors_reach_the_flower_log_as_one_line() -> None:
    """flwr logs a ServerApp's exception with exc_info; the filter makes fedrank's own errors one line."""
    import logging
    import sys

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord("flwr", logging.ERROR, __file__, 1, "%s raised an exception", ("ServerApp",), info)

    one = record(server_app.NodeConfigError("node 5: node-config rank = 16.5: must be an integer >= 1"))
    assert server_app._OneLine().filter(one) and one.exc_info is None
    assert one.getMessage() == "fedrank: error: node 5: node-config rank = 16.5: must be an integer >= 1"
    other = record(ZeroDivisionError("a bug"))
    assert server_app._OneLine().filter(other) and other.exc_info is not None  # a bug keeps its traceback


def test_the_serverapp_resumes_after_a_restart(cfg_path: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, whole)
    cut = tmp_path / "cut"
    with pytest.raises(ConnectionError):
        run_server(FakeGrid(nodes([4, 8, 16]), fail_round=2), cfg_path, cut)
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, cut, resume=True)
    assert same_state(whole, cut)
    rounds = [r["round"] for r in records(cut) if r["type"] == "round"]
    assert rounds == [1, 2]


def test_run_config_errors_are_clear(tmp_path: Path) -> None:
    from fedrank.config import ConfigError

    with pytest.raises(ConfigError, match="must be the absolute path"):
        server_app.run_settings({"config": "relative.toml"})


def test_a_resume_with_other_overrides_is_refused_in_one_line(cfg_path: Path, tmp_path: Path) -> None:
    """A resume is a new `flwr run` with the same config, overrides and out-dir plus resume=true; other
    overrides are refused with an error the ServerApp's log prints as one line (no traceback)."""
    run = tmp_path / "run"
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, run, overrides="federation.rounds=1")
    with pytest.raises(server_app.USER_ERRORS) as err:
        run_server(
            FakeGrid(nodes([4, 8, 16])), cfg_path, run, overrides="federation.rounds=1;train.lr=0.5", resume=True
        )
    assert "train.lr" in str(err.value)


def test_a_private_run_stops_when_a_node_is_lost(cfg_path: Path, tmp_path: Path) -> None:
    """Under DP the sample must be the accounted one (K of all N): once a node failed and fewer clients can be
    reached the run stops with one line, to be resumed when the node is back."""
    from fedrank.validation import RunFailed

    private = "method.name=flexlora;federation.weighting=uniform;privacy.clip=0.5;privacy.noise_multiplier=1.0"
    grid = FakeGrid(nodes([4, 8, 16]), drop=[101])
    with pytest.raises(RunFailed, match=r"privacy: only 2 of the 3 registered clients can be reached in round 2"):
        run_server(grid, cfg_path, tmp_path / "run", overrides=private, **{"round-timeout": 5})
    rounds = [r["round"] for r in records(tmp_path / "run") if r["type"] == "round"]
    assert rounds == [1]  # round 1 aggregated, node 101 counted as no change


# ------------------------------------------------------------------ secure aggregation (SecAgg+)
SECURE = "secure.enabled=true"


def secagg_stage(m: Message) -> Any:
    """The SecAgg+ stage a message is for (None: not a SecAgg+ message)."""
    rec = m.content.config_records.get(client_app.SECAGG)
    return rec.get("stage") if rec is not None else None


class MaskedGrid(FakeGrid):
    """A FakeGrid that keeps the masked vectors the server receives and can drop one node's message of one
    SecAgg+ stage (``drop``: node id, stage), as if it died there."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], *drop: tuple[int, str]):
        super().__init__(node_configs)
        self.drop_at = set(drop)
        self.masked: list[list[Any]] = []
        self.reply_arrays = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        msgs = list(messages)
        for m in msgs:  # a real Grid serialises each message: SecAgg+ sends one content object to every node
            m.content = copy.deepcopy(m.content)
        kept = [m for m in msgs if (m.metadata.dst_node_id, secagg_stage(m)) not in self.drop_at]
        replies = list(super().send_and_receive(kept, timeout=timeout))
        for r in replies:
            if not r.has_error() and client_app.SECAGG in r.content.config_records:
                rec = r.content.config_records[client_app.SECAGG]
                if "masked_params" in rec:
                    from flwr.common import bytes_to_ndarray

                    self.masked.append([bytes_to_ndarray(b) for b in rec["masked_params"]])
                self.reply_arrays += sum(len(a) for a in r.content.array_records.values())
        return iter(replies)


def state_diff(a: Path, b: Path) -> float:
    sa, sb = (_flat(load(d / "global_state.safetensors")["state"]) for d in (a, b))
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.mark.parametrize("method", ["ffa", "fslora", "fedplora"])
def test_a_secure_run_equals_the_plain_run_within_the_quantisation_error(
    method: str, cfg_path: Path, tmp_path: Path
) -> None:
    """The server unmasks only the weighted sum, and the method reads from it what it reads from the
    updates: the global state matches the plain run's within SecAgg+'s quantisation (stochastic rounding in
    steps of 2c/Q per client: at most K steps on a holder mean, K = 3 clients). One round: the next round's
    training would amplify that difference."""
    overrides = f"method.name={method};federation.weighting=uniform;federation.rounds=1"
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "plain", overrides=overrides)
    grid = MaskedGrid(nodes([4, 8, 16]))
    run_server(grid, cfg_path, tmp_path / "secure", overrides=f"{overrides};{SECURE}")
    step = 2 * 1.0 / 2**22
    diff = state_diff(tmp_path / "plain", tmp_path / "secure")
    assert 0 < diff <= 3 * step * 1.01  # quantised (not the plain sum), and within the bound
    plain, secure = records(tmp_path / "plain"), records(tmp_path / "secure")
    clients = [r for r in secure if r["type"] == "client"]
    assert len(clients) == 3 and all(r["secure"] for r in clients)
    assert all(
        r["up_bytes"] <= r["wire_up_bytes"] <= r["up_bytes"] * 1.05 for r in clients
    )  # as sent: int64 + npy headers
    theirs = [r for r in plain if r["type"] == "client"]
    assert [(r["client"], r["rank"], r["n"], r["loss"]) for r in clients] == [
        (r["client"], r["rank"], r["n"], r["loss"]) for r in theirs
    ]  # the clients train from the same state
    # what reached the server: no client's arrays in the clear, masked vectors spread over the modulus
    assert grid.reply_arrays == 0 and len(grid.masked) == 3
    values = torch.cat([torch.from_numpy(a.astype("float64")).flatten() for v in grid.masked for a in v])
    assert float((values > 2**22 * 3).double().mean()) > 0.99  # unmasked quantised values would all be below


def test_example_count_weights_go_through_secagg(cfg_path: Path, tmp_path: Path) -> None:
    """federation.weighting = "examples": each client's weight is its example count (SecAgg+'s FitRes count, in
    the clear), scaled by the round's largest before quantising; the state matches the plain run's within the
    quantisation error divided by the weights' share (Σ n_k / max n_k)."""
    overrides = "method.name=ffa;federation.weighting=examples;federation.rounds=1;partition.kind=dirichlet"
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "plain", overrides=overrides)
    run_server(MaskedGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "secure", overrides=f"{overrides};{SECURE}")
    n = {r["client"]: r["n"] for r in records(tmp_path / "secure") if r["type"] == "client"}
    assert len(set(n.values())) > 1  # the clients' weights differ
    # K steps times max n over the holders' weight; indices 8-15 are held by client 2 (rank 16) alone
    bound = 3 * (2 / 2**22) * max(n.values()) / n[2]
    assert 0 < state_diff(tmp_path / "plain", tmp_path / "secure") <= bound


def test_a_node_that_drops_after_the_key_sharing_does_not_stop_the_round(cfg_path: Path, tmp_path: Path) -> None:
    """SecAgg+'s threshold: with 3 clients and secure.threshold = 0.5 two neighbours rebuild a lost node's
    masks; the round aggregates the other two, and the lost node is recorded as failed."""
    overrides = f"method.name=ffa;federation.weighting=uniform;federation.rounds=1;{SECURE}"
    run_server(
        MaskedGrid(nodes([4, 8, 16]), (101, "collect_masked_vectors")),
        cfg_path,
        tmp_path / "run",
        overrides=overrides,
    )
    recs = records(tmp_path / "run")
    (rnd,) = [r for r in recs if r["type"] == "round"]
    assert rnd["clients"] == 2
    (failed,) = [r for r in recs if r["type"] == "client_failed"]
    assert failed["client"] == 1 and "no reply" in failed["reason"]


def test_secure_aggregation_is_refused_where_it_cannot_hold(cfg_path: Path, tmp_path: Path) -> None:
    from fedrank.config import ConfigError

    with pytest.raises(ConfigError, match="flexlora is refused: its SVD needs"):
        load_config(cfg_path, [SECURE])
    private = [
        SECURE,
        "method.name=ffa",
        "federation.weighting=uniform",
        "privacy.clip=1",
        "privacy.noise_multiplier=1",
    ]
    with pytest.raises(ConfigError, match='needs privacy.sampling = "fixed"'):
        load_config(cfg_path, [*private, "privacy.sampling=poisson", "privacy.accountant=pld"])
    with pytest.raises(ConfigError, match="at least 2 clients per round"):
        load_config(cfg_path, [SECURE, "method.name=ffa", "federation.clients_per_round=1"])
    with pytest.raises(ConfigError, match="secure aggregation: drop federation.max_update_norm"):
        load_config(cfg_path, [SECURE, "method.name=ffa", "federation.max_update_norm=1"])
    with pytest.raises(ConfigError, match="clip_range must be a number >= 1"):
        load_config(cfg_path, [SECURE, "method.name=ffa", "secure.clip_range=0.5"])
    with pytest.raises(ConfigError, match="runs on Flower"):
        Simulation(load_config(cfg_path, [SECURE, "method.name=ffa"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["setup", "share_keys"])
def test_a_node_lost_before_the_key_sharing_costs_one_restart(stage: str, cfg_path: Path, tmp_path: Path) -> None:
    """flwr's SecAgg+ loses the whole round when a node is lost before the key sharing (the others fail on its
    missing key); fedrank runs the protocol once more without the node, and the round aggregates the others."""
    overrides = f"method.name=ffa;federation.weighting=uniform;federation.rounds=1;{SECURE}"
    grid = MaskedGrid(nodes([4, 8, 16]), (101, stage))
    run_server(grid, cfg_path, tmp_path / "run", overrides=overrides, **{"round-timeout": 5})
    recs = records(tmp_path / "run")
    assert [r["clients"] for r in recs if r["type"] == "round"] == [2]
    (failed,) = [r for r in recs if r["type"] == "client_failed"]
    assert failed["client"] == 1 and "no reply within 5 s" in failed["reason"]
    assert len(grid.masked) == 2  # the clients trained once: in the restart's masked-vector stage


def test_distributed_dp_under_secure_aggregation(cfg_path: Path, tmp_path: Path) -> None:
    """[privacy] with [secure]: each client clips its change to C and adds N(0, σ²C²/t) under the masks (t = 2
    of the 3 clients must answer). With σ large the noise dominates: the global B moves from the noiseless
    secure run's by the stated std (column 0, held by all K = 3: √(K/t)·σC/K); ε is the central mechanism's."""
    base = "method.name=ffa;federation.weighting=uniform;federation.rounds=1;privacy.seeded=true"
    private = "privacy.clip=0.5;privacy.noise_multiplier=50;privacy.delta=1e-5"
    run_server(MaskedGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "secure", overrides=f"{base};{SECURE}")
    run_server(MaskedGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "dp", overrides=f"{base};{SECURE};{private}")
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "central", overrides=f"{base};{private}")
    a, b = (load(tmp_path / d / "global_state.safetensors")["state"] for d in ("secure", "dp"))
    moved = torch.cat([(b.factors[k].B[:, 0] - a.factors[k].B[:, 0]).flatten() for k in a.factors])
    want = (3 / 2) ** 0.5 * 50 * 0.5 / 3
    assert float(moved.std()) == pytest.approx(want, rel=0.1)
    ours, central = (json.loads((tmp_path / d / "summary.json").read_text())["privacy"] for d in ("dp", "central"))
    assert ours["epsilon"] == central["epsilon"] > 0
    assert ours["noise_added_by"] == "clients" and central["noise_added_by"] == "server"
    from fedrank.report import end_of_run_table

    table = end_of_run_table(json.loads((tmp_path / "dp" / "summary.json").read_text()))
    assert "noise added by the clients under SecAgg+" in table and "the server saw each round's sum only" in table
    page = (tmp_path / "dp" / "report.html").read_text()
    assert "noise added by the clients under SecAgg+" in page and "the server saw each round" in page


def test_a_round_below_the_threshold_is_lost_and_not_accounted(cfg_path: Path, tmp_path: Path) -> None:
    """Two of three nodes lost after the key sharing: SecAgg+ cannot unmask (threshold 2); the round is
    skipped, nothing was released, so a private run composes no round for it."""
    from fedrank.validation import RunFailed

    overrides = f"method.name=ffa;federation.weighting=uniform;federation.rounds=1;{SECURE}"
    private = "privacy.clip=0.5;privacy.noise_multiplier=1;privacy.delta=1e-5"
    grid = MaskedGrid(nodes([4, 8, 16]), (101, "collect_masked_vectors"), (102, "collect_masked_vectors"))
    with pytest.raises(RunFailed, match="all 1 rounds were skipped"):
        run_server(grid, cfg_path, tmp_path / "run", overrides=f"{overrides};{private}", **{"round-timeout": 5})
    recs = records(tmp_path / "run")
    assert [r["type"] for r in recs if r["type"].startswith("round")] == ["round_skipped"]
    assert "halted" in next(r["reason"] for r in recs if r["type"] == "client_failed" and r["client"] == 0)


def test_a_non_dyadic_clip_range_leaves_unheld_indices_alone(cfg_path: Path, tmp_path: Path) -> None:
    """c = 1.3: the summed holder flags carry a quantisation remainder, and so do an unheld index's changes;
    the server's shares come from its dispatch, so an index nobody held does not move (it moved by 1.0 when
    the flags were divided)."""
    overrides = "method.name=ffa;federation.weighting=uniform;federation.rounds=1;federation.clients_per_round=2"
    run_server(FakeGrid(nodes([4, 8, 16])), cfg_path, tmp_path / "plain", overrides=overrides)
    grid = MaskedGrid(nodes([4, 8, 16]))
    run_server(grid, cfg_path, tmp_path / "secure", overrides=f"{overrides};{SECURE};secure.clip_range=1.3")
    assert state_diff(tmp_path / "plain", tmp_path / "secure") <= 2 * (2 * 1.3 / 2**22) * 2


def test_a_client_that_fails_under_secure_aggregation_keeps_its_node(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's own failure (here: diverged in round 1) can only be an error reply under SecAgg+; it is
    recorded with the client's reason, and its node stays in the sampling, as in a plain run. Under DP the
    run goes on (the failed client counts, with no change)."""
    from fedrank import local
    from fedrank.train import ClientFailure

    real = local.LocalTrainer.train

    def train(self: Any, a: Any, data: Any, round_index: int) -> Any:
        if a.client_id == 1 and round_index == 0:
            raise ClientFailure("diverged: loss went from 1.9 to 48.9 (simulated)")
        return real(self, a, data, round_index)

    monkeypatch.setattr(local.LocalTrainer, "train", train)
    base = f"method.name=ffa;federation.weighting=uniform;federation.rounds=2;{SECURE}"
    private = "privacy.clip=0.5;privacy.noise_multiplier=1;privacy.delta=1e-5;privacy.seeded=true"
    for name, overrides in (("secure", base), ("private", f"{base};{private}")):
        run_server(MaskedGrid(nodes([4, 8, 16])), cfg_path, tmp_path / name, overrides=overrides)
        recs = records(tmp_path / name)
        (failed,) = [r for r in recs if r["type"] == "client_failed"]
        assert failed["round"] == 1 and failed["client"] == 1
        assert failed["reason"].endswith("diverged: loss went from 1.9 to 48.9 (simulated)")
        assert sorted(r["client"] for r in recs if r["type"] == "client" and r["round"] == 2) == [0, 1, 2]
    summary = json.loads((tmp_path / "private" / "summary.json").read_text())
    assert summary["privacy"]["rounds"] == 2
