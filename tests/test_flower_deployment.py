"""fedrank's own Flower apps on real processes: a SuperLink and SuperNodes on 127.0.0.1 (insecure, and TLS +
SuperNode authentication), a SuperNode killed mid-round, and a Ray simulation. Every run is compared with
the in-process simulator on the same config and seed: the global state must be bit-identical (the processes
use one torch thread, as the test process does: see conftest.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="flwr is not installed: pip install -e '.[flower]'")
pytest.importorskip("psutil", reason="psutil is not installed: pip install -e '.[flower]'")

from fedrank.config import load_config
from fedrank.flower.deploy import LocalDeployment, run_ray_simulation, write_app_dir
from fedrank.simulation import Simulation, with_method
from test_flower import TINY, records, same_state, untimed
from test_flower_deploy import scan_proc

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RANKS = (4, 8, 16)


def node_configs(ranks: tuple[int, ...] = RANKS) -> list[dict[str, int]]:
    return [{"partition-id": i, "num-partitions": len(ranks), "rank": r} for i, r in enumerate(ranks)]


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    return cfg, write_app_dir(tmp_path / "app")


def simulate(cfg_path: Path, out: Path, method: str = "flexlora", overrides: tuple[str, ...] = ()) -> Path:
    Simulation(with_method(load_config(cfg_path, list(overrides)), method, 0, presets=False), out, progress=False).run()
    return out


def run_config(cfg_path: Path, out: Path, method: str = "flexlora", **extra: Any) -> dict[str, Any]:
    return {"config": str(cfg_path), "out-dir": str(out), "overrides": f"method.name={method}", **extra}


def check_run(out: Path, sim: Path) -> None:
    assert same_state(out, sim)
    ours, theirs = untimed(records(out)), untimed(records(sim))
    # The spectrum diagnostic is the server's own SVD: its last digits follow the ServerApp's thread count.
    spectra = [(a.pop("spectrum", None), b.pop("spectrum", None)) for a, b in zip(ours, theirs)]
    assert ours == theirs
    assert all(a == b if a is None or b is None else a == pytest.approx(b, rel=1e-6) for a, b in spectra)
    clients = [r for r in records(out) if r["type"] == "client"]
    assert {(r["client"], r["rank"]) for r in clients} == {(i, r) for i, r in enumerate(RANKS)}
    assert all(r["wire_up_bytes"] > 0 and r["wire_down_bytes"] > 0 for r in clients)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def run_killing_node_2(
    dep: LocalDeployment, app: Path, rc: dict[str, Any], ready: Callable[[], bool], delay: float
) -> None:
    """Run ``rc`` on ``dep`` and SIGKILL SuperNode 2 ``delay`` seconds after ``ready()`` holds; the run must
    still succeed."""
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.update(result=dep.run(app, rc, timeout=400)))
    runner.start()
    deadline = time.monotonic() + 240
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready(), "the moment to kill the node never came"
    time.sleep(delay)
    dep.kill_node(2)
    runner.join(timeout=420)
    assert not runner.is_alive()
    assert done["result"].ok, done["result"].output()[-3000:]


def test_loopback_deployment_equals_the_simulator(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """3 SuperNodes of ranks 4, 8, 16; two rounds of flexlora and of fslora, each node at its own rank."""
    cfg_path, app = setup
    with LocalDeployment(tmp_path / "dep", node_configs(), env=ONE_THREAD) as dep:
        for method in ("flexlora", "fslora"):
            out = tmp_path / f"flower-{method}"
            result = dep.run(app, run_config(cfg_path, out, method), timeout=300)
            assert result.ok, result.output()[-3000:]
            check_run(out, simulate(cfg_path, tmp_path / f"sim-{method}", method))
    assert scan_proc(dep.flwr_home) == []


def test_tls_and_node_authentication(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """The same over TLS with SuperNode authentication; a node whose key is not registered is refused."""
    from fedrank.flower.deploy import make_node_key

    cfg_path, app = setup
    with LocalDeployment(tmp_path / "dep", node_configs(), tls=True, auth=True, env=ONE_THREAD) as dep:
        intruder = dep.start_node(
            {"partition-id": 1, "num-partitions": 3, "rank": 16},
            make_node_key(tmp_path / "other", "intruder"),
            wait=False,
            name="intruder",
        )
        assert dep.wait_exit(intruder, timeout=60) != 0
        assert "[code: 2004] Failed to activate SuperNode" in dep.nodes[intruder].log.read_text()
        out = tmp_path / "flower"
        result = dep.run(app, run_config(cfg_path, out), timeout=300)
        assert result.ok, result.output()[-3000:]
    check_run(out, simulate(cfg_path, tmp_path / "sim"))
    assert scan_proc(dep.flwr_home) == []


def test_a_supernode_killed_mid_round(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL one SuperNode while round 1 trains: both rounds complete with the two survivors; its partition
    is recorded as failed in round 1 and not sampled in round 2; the time split counts the wait as training."""
    cfg_path, app = setup
    out = tmp_path / "flower"
    with LocalDeployment(tmp_path / "dep", node_configs(), env=ONE_THREAD) as dep:
        cfg = run_config(cfg_path, out, **{"round-timeout": 40.0})
        cfg["overrides"] += ";train.steps=20"
        metrics = out / "metrics.jsonl"
        # the evaluation before training is written; round 1's messages go out next
        run_killing_node_2(dep, app, cfg, lambda: metrics.is_file() and bool(metrics.read_text().strip()), 3.0)
    recs = records(out)
    assert [r["clients"] for r in recs if r["type"] == "round"] == [2, 2]
    failed = [r for r in recs if r["type"] == "client_failed"]
    assert [(r["round"], r["client"]) for r in failed] == [(1, 2)]
    assert all(r["reason"].startswith(f"node {dep.node_ids[2]}: ") for r in failed)
    assert sorted(r["client"] for r in recs if r["type"] == "client" and r["round"] == 2) == [0, 1]
    split = json.loads((out / "summary.json").read_text())["time_split"]
    rounds = [r for r in recs if r["type"] == "round"]
    assert split["train"] == pytest.approx(sum(r["train_seconds"] for r in rounds), abs=0.01)
    assert split["clients"] < split["train"]  # the nodes' own seconds are a part of the wait
    assert scan_proc(dep.flwr_home) == []


def test_bad_node_configs_are_refused_before_training(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """A deployment whose nodes are misconfigured fails at the query round, one line per problem, no
    traceback, no training message sent."""
    cfg_path, app = setup
    bad = [{"partition-id": 0, "rank": 16.5}, {"partition-id": 1}, {"partition-id": 1, "num-partitions": 5}]
    with LocalDeployment(tmp_path / "dep", bad, env=ONE_THREAD) as dep:
        result = dep.run(app, run_config(cfg_path, tmp_path / "flower"), timeout=300)
    text = result.output()
    assert result.status == "finished:failed" and result.exit_code == 1, text[-3000:]
    assert "fedrank: error: the deployment's node configs are refused (3 problem(s)):" in text
    ids = dep.node_ids
    assert f"node {ids[0]}: node-config rank = 16.5: must be an integer >= 1" in text
    assert f"node {ids[2]}: node-config num-partitions = 5, but the run registers partition.num_clients = 3" in text
    assert f"nodes {ids[1]} and {ids[2]} both declare node-config partition-id 1" in text or (
        f"nodes {ids[2]} and {ids[1]} both declare node-config partition-id 1" in text
    )
    assert "Traceback" not in text
    assert not (tmp_path / "flower" / "metrics.jsonl").exists()
    assert scan_proc(dep.flwr_home) == []


def test_ray_simulation_equals_the_simulator(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray simulation (ranks from the config's ranks.per_client, by partition id), Ray on loopback only."""
    cfg_path, app = setup
    for key, value in ONE_THREAD.items():  # the ServerApp (it aggregates) and the actors, as this process
        monkeypatch.setenv(key, value)
    out = tmp_path / "flower"
    sim = run_ray_simulation(app, 3, run_config(cfg_path, out), timeout=300, run_dir=tmp_path / "ray")
    assert sim.run.ok, sim.run.output()[-3000:]
    assert sim.exposed == [], f"Ray listens beyond loopback: {sim.exposed}"
    check_run(out, simulate(cfg_path, tmp_path / "sim"))
    assert scan_proc(tmp_path / "ray" / "flwr-home") == []


def test_secure_aggregation_on_a_loopback_deployment(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """SecAgg+ between real processes: one round matches the simulator within the quantisation bound; with
    [privacy] the clients add the noise (ε as the central mechanism's, the state moved by it); then a
    SuperNode killed while it trains (SecAgg+'s masked-vector stage, after the key sharing) does not stop the
    round: its neighbours' shares rebuild its masks and the other two are aggregated. (About a minute per
    round on the tiny model: four round trips, each a fresh flwr-clientapp process per node.)"""
    cfg_path, app = setup
    secure = "method.name=ffa;federation.weighting=uniform;secure.enabled=true"
    with LocalDeployment(tmp_path / "dep", node_configs(), env=ONE_THREAD) as dep:
        one = tmp_path / "one"
        rc = {"config": str(cfg_path), "out-dir": str(one), "overrides": f"{secure};federation.rounds=1"}
        result = dep.run(app, rc, timeout=300)
        assert result.ok, result.output()[-3000:]
        assert "Secure aggregation completed." in result.output()
        sim = simulate(cfg_path, tmp_path / "sim", "ffa", ("federation.weighting=uniform", "federation.rounds=1"))
        from test_flower import state_diff

        assert 0 < state_diff(one, sim) <= 3 * 2 / 2**22 * 1.01
        assert all(r["secure"] for r in records(one) if r["type"] == "client")

        private = "privacy.clip=0.5;privacy.noise_multiplier=1.0;privacy.delta=1e-5"  # distributed DP
        dp = tmp_path / "dp"
        rc = {"config": str(cfg_path), "out-dir": str(dp), "overrides": f"{secure};federation.rounds=1;{private}"}
        result = dep.run(app, rc, timeout=300)
        assert result.ok, result.output()[-3000:]
        central = simulate(
            cfg_path,
            tmp_path / "central",
            "ffa",
            ("federation.weighting=uniform", "federation.rounds=1", *private.split(";")),
        )
        ours, theirs = (json.loads((d / "summary.json").read_text())["privacy"] for d in (dp, central))
        assert ours["noise_added_by"] == "clients" and ours["epsilon"] == theirs["epsilon"] > 0
        assert state_diff(dp, one) > 0.05  # the clients' noise (std √(3/2)·σC/3 ≈ 0.2 on a column all hold)

        out = tmp_path / "killed"
        rc = {
            "config": str(cfg_path),
            "out-dir": str(out),
            "overrides": f"{secure};train.steps=30;federation.rounds=1",
            "round-timeout": 60.0,
        }
        log = dep.nodes[2].log
        start = log.read_text().count("Receiving: train message")
        # stages 0 and 1 (keys), then the masked-vector stage, in which the node trains
        run_killing_node_2(dep, app, rc, lambda: log.read_text().count("Receiving: train message") >= start + 3, 2.0)
    recs = records(out)
    assert [r["clients"] for r in recs if r["type"] == "round"] == [2]
    failed = [r for r in recs if r["type"] == "client_failed"]
    assert [(r["round"], r["client"]) for r in failed] == [(1, 2)]
    assert sorted(r["client"] for r in recs if r["type"] == "client") == [0, 1]
    assert scan_proc(dep.flwr_home) == []
