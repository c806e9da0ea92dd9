"""Local Flower deployments and Ray simulations started and stopped by pid (fedrank.flower.deploy + cli).

Every test that starts processes gives them a private FLWR_HOME under tmp_path and, afterwards, scans /proc
for any process carrying it (independently of the code under test); a leftover fails the test and is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed: pip install -e '.[flower]'")
pytest.importorskip("psutil", reason="psutil is not installed: pip install -e '.[flower]'")
if shutil.which("flower-superlink") is None or shutil.which("flwr") is None:
    pytest.skip("the flower-superlink / flwr executables are not on PATH", allow_module_level=True)

import contextlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrank.flower.cli import main_flower, node_configs
from fedrank.flower.deploy import (
    DeploymentError,
    Listener,
    LocalDeployment,
    RunConfigError,
    format_node_config,
    free_port,
    make_node_key,
    make_tls,
    run_ray_simulation,
    write_app_dir,
)

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
RANKS = (4, 8, 16)
FLOWER_NAMES = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "flwr-simulation",
    "raylet",
    "gcs_server",
    "ray::",
)


# ------------------------------------------------------------------------------------------------ helpers


def scan_proc(flwr_home: Path) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process whose environment holds FLWR_HOME=flwr_home (read from /proc)."""
    needle = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in env:
            found.append((int(entry), cmd))
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[Path]:
    """The run dir; after the test, no process with its FLWR_HOME may be alive (they are killed if so)."""
    run_dir = tmp_path / "run"
    yield run_dir
    left = scan_proc(run_dir / "flwr-home")
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_app_dir(
        tmp_path / "app",
        "flower_dummy_app:app",
        "flower_dummy_app:client",
        {"num-nodes": 3, "wait-s": 60.0, "out-dir": ""},
    )


def replies(out_dir: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((out_dir / "replies.json").read_text())
    return doc


def nodes(ranks: tuple[int, ...] = RANKS) -> list[dict[str, int]]:
    return [{"partition-id": i, "num-partitions": len(ranks), "rank": r} for i, r in enumerate(ranks)]


# ------------------------------------------------------------------------------------------------ fast


def test_app_dir_is_a_valid_flower_app(app_dir: Path) -> None:
    from flwr.common.config import validate_config

    from fedrank.flower.deploy import app_config_defaults

    with (app_dir / "pyproject.toml").open("rb") as f:
        import tomllib

        doc = tomllib.load(f)
    ok, errors, warnings = validate_config(doc, check_module=False)
    assert ok, errors
    assert warnings == []
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "flower_dummy_app:app",
        "clientapp": "flower_dummy_app:client",
    }
    assert app_config_defaults(app_dir) == {"num-nodes": 3, "wait-s": 60.0, "out-dir": ""}
    default = write_app_dir(app_dir.parent / "default")
    assert app_config_defaults(default) == {
        "config": "",
        "overrides": "",
        "out-dir": "",
        "resume": False,
        "round-timeout": 0.0,
        "node-wait": 120.0,
    }


def test_free_ports_avoid_the_ephemeral_range_and_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports for our servers come from outside the range outgoing connections take theirs from (else one
    can be taken between the check and the server's bind), are bindable, and are never handed out twice;
    where that range leaves nothing outside it, the OS picks."""
    from fedrank.flower import deploy

    lo, hi = deploy._ephemeral_ports()
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(not lo <= p <= hi for p in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))
    monkeypatch.setattr(deploy, "_ephemeral_ports", lambda: (1024, 65535))  # a common server setting
    more = [free_port() for _ in range(5)]
    assert len(set(more) | set(ports)) == len(more) + len(ports) and all(0 < p < 65536 for p in more)


def test_node_config_text_round_trips_through_flwr_parser() -> None:
    from flwr.common.config import parse_config_args

    cfg = {"partition-id": 2, "num-partitions": 3, "rank": 16, "name": "alpha", "lr": 0.5, "fast": True}
    text = format_node_config(cfg)
    assert 'name="alpha"' in text and "rank=16" in text
    assert parse_config_args([text]) == cfg
    with pytest.raises(ValueError, match="spaces"):
        format_node_config({"name": "a b"})


def test_tls_certificate_verifies_for_loopback(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert tls.server_key.stat().st_mode & 0o077 == 0
    # A real handshake: a server with the cert, a client trusting only the CA, host name 127.0.0.1.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            assert s.recv(2) == b"ok"
        t.join(timeout=10)


def test_node_key_is_openssh_ecdsa_p384(tmp_path: Path) -> None:
    key = make_node_key(tmp_path / "keys", "node0")
    public = key.public_key.read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.rstrip().endswith(" node0")
    assert key.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(key.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    loaded = serialization.load_ssh_public_key(public.encode())
    assert loaded.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
    assert key.private_key.stat().st_mode & 0o077 == 0


def test_arguments_are_checked_before_anything_starts(tmp_path: Path, app_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        LocalDeployment(tmp_path / "x", nodes(), auth=True)
    dep = LocalDeployment(tmp_path / "y", nodes())
    with pytest.raises(RunConfigError, match=r"\['bogus'\].*known: \['num-nodes', 'out-dir', 'wait-s'\]"):
        dep.run(app_dir, {"bogus": 1})
    assert node_configs(3, "4,8,16") == nodes()
    assert node_configs(2, "8") == [
        {"partition-id": 0, "num-partitions": 2, "rank": 8},
        {"partition-id": 1, "num-partitions": 2, "rank": 8},
    ]
    assert node_configs(2, None) == [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}]
    with pytest.raises(SystemExit, match="need 3 positive ranks"):
        node_configs(3, "4,8")
    with pytest.raises(SystemExit, match="needs --tls"):
        main_flower(["up", "--auth", "--dir", str(tmp_path / "z")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_cli_input_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bad invocation of `fedrank flower run` is refused before a directory is made (each left a
    /tmp/fedrank-flower-XXXX/app behind before)."""
    from fedrank.config import ConfigError

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    config = tmp_path / "c.toml"
    config.write_text("[federation]\nrounds = 1\n")
    out = tmp_path / "out"
    bad = [
        (["run", str(config), "--nodes", "3", "--ranks", "4,x"], "expected integers"),
        (["run", str(config), "--nodes", "3", "--ranks", "4,8"], "need 3 positive ranks"),
        (["run", str(config), "--set", "train.lr"], "expected key=value"),
        (["run", str(config), "--set", "train.lr=abc"], "train.lr"),
        (["run", str(config), "--set", "nope.key=1"], "nope"),
        (["run", str(tmp_path / "missing.toml")], "no config file"),
        (["run", str(config), "--ray", "--ranks", "4"], "drop --ranks"),
        (["run", str(config), "--resume", "--overwrite"], "exclude each other"),
        (["run", str(config), "--auth"], "needs --tls"),
    ]
    for argv, message in bad:
        with pytest.raises((SystemExit, ConfigError), match=message):
            main_flower([*argv, "--out", str(out)])
    assert list(temp.iterdir()) == [] and not out.exists()


def test_flower_app_command_writes_the_app_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_flower(["app", str(tmp_path / "app")]) == 0
    doc = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    components = doc["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedrank.flower.server_app:app", "clientapp": "fedrank.flower.client_app:app"}
    assert "flwr run" in capsys.readouterr().out


def test_listener_loopback_includes_ipv4_mapped() -> None:
    assert Listener(1, "raylet", "::ffff:127.0.0.1", 1).loopback
    assert Listener(1, "raylet", "127.0.0.1", 1).loopback and Listener(1, "x", "::1", 1).loopback
    assert not Listener(1, "raylet", "::", 1).loopback
    assert not Listener(1, "raylet", "0.0.0.0", 1).loopback
    assert not Listener(1, "raylet", "192.0.2.2", 1).loopback


# ------------------------------------------------------------------------------------------------ processes


@pytest.mark.slow
def test_insecure_deployment_three_ranks(no_leftovers: Path, app_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dep = LocalDeployment(no_leftovers, nodes(), pythonpath=[TESTS])
    with dep:
        assert all(i is not None for i in dep.node_ids) and len(set(dep.node_ids)) == 3
        pids = dep.pids()
        assert len(pids) >= 5  # SuperLink, its SuperExec, 3 SuperNodes (+ their SuperExecs)
        assert {pid for pid, _ in scan_proc(dep.flwr_home)} == set(pids)
        result = dep.run(app_dir, {"out-dir": str(out)}, timeout=120)
        assert result.ok and result.exit_code == 0, result.output()[-3000:]
        assert result.status == "finished:completed" and result.run_id is not None
        doc = replies(out)
        assert [(r["partition-id"], r["rank"]) for r in doc["replies"]] == [(0, 4), (1, 8), (2, 16)]  # type: ignore[index, union-attr]
        assert {r["node_id"] for r in doc["replies"]} == set(dep.node_ids)  # type: ignore[index, union-attr]
        # A crash: SIGKILL node 2 and its children; the others stay up.
        node_pid = dep.nodes[2].popen.pid
        dep.kill_node(2)
        assert not pid_alive(node_pid)
        assert all(pid_alive(p.popen.pid) for p in dep.nodes[:2])
        pids = dep.pids()
    assert not [p for p in pids if pid_alive(p)]
    assert scan_proc(dep.flwr_home) == []
    assert (dep.log_dir / "superlink.log").is_file() and (dep.log_dir / "supernode-0.log").is_file()
    owner_only(no_leftovers)


@pytest.mark.slow
def test_failed_server_app_gives_nonzero_exit_code(no_leftovers: Path, app_dir: Path, tmp_path: Path) -> None:
    with LocalDeployment(no_leftovers, nodes((4,)), pythonpath=[TESTS]) as dep:
        # The dummy ServerApp raises when fewer than num-nodes nodes connect: flwr itself still exits 0.
        result = dep.run(app_dir, {"out-dir": str(tmp_path / "out"), "num-nodes": 2, "wait-s": 1.0}, timeout=120)
    assert result.returncode == 0 and result.status == "finished:failed" and result.exit_code == 1
    assert "only 1 of 2 nodes connected" in result.output()


@pytest.mark.slow
def test_tls_auth_registered_nodes_work_unregistered_refused(no_leftovers: Path, app_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with LocalDeployment(no_leftovers, nodes(), tls=True, auth=True, pythonpath=[TESTS]) as dep:
        assert dep.tls_files is not None and len(dep.node_keys) == 3
        # The SuperLink speaks only TLS, with a certificate our CA signed for 127.0.0.1.
        ctx = ssl.create_default_context(cafile=str(dep.tls_files.ca_cert))
        with urllib.request.urlopen(f"https://{dep.address}/health", timeout=10, context=ctx) as res:
            assert res.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{dep.address}/health", timeout=10)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://{dep.address}/health", timeout=10, context=ssl.create_default_context())
        # A node with a key the SuperLink does not know is refused (Flower exit code 305, API error 2004).
        intruder = dep.start_node(
            {"partition-id": 3, "num-partitions": 4, "rank": 2},
            make_node_key(tmp_path / "other-keys", "intruder"),
            wait=False,
            name="intruder",
        )
        assert dep.wait_exit(intruder, timeout=60) != 0
        log = dep.nodes[intruder].log.read_text()
        assert "[code: 2004] Failed to activate SuperNode" in log and "Exit Code: 305" in log
        # A node without any key is refused too (API error 2001).
        keyless = dep.start_node({"partition-id": 3, "num-partitions": 4, "rank": 2}, wait=False, name="keyless")
        assert dep.wait_exit(keyless, timeout=60) != 0
        assert "[code: 2001]" in dep.nodes[keyless].log.read_text()
        # The registered nodes run the app; only they answer.
        result = dep.run(app_dir, {"out-dir": str(out)}, timeout=120)
        assert result.ok, result.output()[-3000:]
        doc = replies(out)
        assert sorted(r["rank"] for r in doc["replies"]) == list(RANKS)  # type: ignore[union-attr, index]
    assert scan_proc(dep.flwr_home) == []
    written = owner_only(no_leftovers)
    assert {"superlink.db", "superlink.log", "node0", "config.toml"} <= written  # the database, logs, keys


def owner_only(root: Path) -> set[str]:
    """The names of everything under ``root`` (itself included), each checked to be owner-only: the
    deployment directory holds keys, the SuperLink's database and logs."""
    names = set()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        names.add(path.name)
    return names


@pytest.mark.slow
def test_ray_simulation_stays_on_loopback_and_stops(no_leftovers: Path, app_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sim = run_ray_simulation(app_dir, 3, {"out-dir": str(out)}, timeout=240, run_dir=no_leftovers, pythonpath=[TESTS])
    assert sim.run.ok, sim.run.output()[-3000:]
    doc = replies(out)
    # In a simulation node_config holds only partition-id / num-partitions: no rank.
    assert [(r["partition-id"], r["rank"]) for r in doc["replies"]] == [(0, -1), (1, -1), (2, -1)]  # type: ignore[index, union-attr]
    names = {x.name for x in sim.listeners}
    assert {"gcs_server", "raylet"} <= names, sim.listeners
    assert sim.exposed == [], f"Ray listens beyond loopback: {sim.exposed}"
    assert sim.ray_pids and not [p for p in sim.ray_pids if pid_alive(p)]
    assert scan_proc(no_leftovers / "flwr-home") == []


@pytest.mark.slow
def test_cli_run_passes_config_and_overrides(no_leftovers: Path, tmp_path: Path) -> None:
    config = tmp_path / "quick.toml"
    config.write_text("[federation]\nrounds = 1\n")
    out = tmp_path / "out"
    rc = main_flower(
        [
            "run",
            str(config),
            "--nodes",
            "2",
            "--ranks",
            "4,8",
            "--set",
            "federation.rounds=2",
            "--set",
            "train.lr=0.1",
            "--out",
            str(out),
            "--dir",
            str(no_leftovers),
            "--serverapp",
            "flower_dummy_app:app",
            "--clientapp",
            "flower_dummy_app:client",
            "--pythonpath",
            str(TESTS),
            "--timeout",
            "120",
        ]
    )
    assert rc == 0
    doc = replies(out)
    assert doc["run_config"] == {
        "config": str(config),
        "overrides": "federation.rounds=2;train.lr=0.1",
        "out-dir": str(out),
        "resume": False,
        "round-timeout": 0.0,
        "node-wait": 120.0,
    }
    assert sorted(r["rank"] for r in doc["replies"]) == [4, 8]  # type: ignore[union-attr, index]


@pytest.mark.slow
def test_cli_up_stays_until_interrupted_then_stops_everything(no_leftovers: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedrank.flower.cli",
            "up",
            "--nodes",
            "2",
            "--ranks",
            "4,8",
            "--dir",
            str(no_leftovers),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything." in line:
                break
        text = "".join(lines)
        assert "Ctrl-C stops everything." in text, text
        assert "flwr run " in text and "fedrank-local" in text and "FLWR_HOME=" in text
        assert len(scan_proc(no_leftovers / "flwr-home")) >= 3
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not cut the clean-up short
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, text + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert scan_proc(no_leftovers / "flwr-home") == []


def test_failed_start_stops_what_it_started(no_leftovers: Path) -> None:
    """A SuperLink not ready in time: start() raises and leaves nothing running (no context manager needed)."""
    dep = LocalDeployment(no_leftovers, nodes(), start_timeout=0.01)
    with pytest.raises(DeploymentError, match="not ready within"):
        dep.start()
    assert dep.superlink is not None and dep.superlink.popen.poll() is not None
    assert dep.nodes == [] and scan_proc(dep.flwr_home) == []


def test_stop_raises_when_a_process_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() verifies: a process that ignores SIGTERM and SIGKILL is reported (simulated by a failing kill)."""
    import psutil

    dep = LocalDeployment(tmp_path / "run", [])
    dep.flwr_home.mkdir(parents=True)
    env = dict(os.environ, FLWR_HOME=str(dep.flwr_home))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    try:
        dep._started = True
        monkeypatch.setattr(psutil.Process, "terminate", lambda self: None)
        monkeypatch.setattr(psutil.Process, "kill", lambda self: None)
        monkeypatch.setattr(dep, "stop_timeout", 0.5)
        with pytest.raises(DeploymentError, match=rf"left after stop\(\): {sleeper.pid} "):
            dep.stop()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


def test_stop_holds_back_ctrl_c_until_clean_up_is_done() -> None:
    """A Ctrl-C during stop() does not interrupt it; it is raised once the clean-up has finished."""
    from fedrank.flower.deploy import _signals_held

    finished = False
    # (pytest may run with SIGINT ignored, e.g. as a background job of a non-interactive shell)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the signal arrives here and must not interrupt the block
            finished = True
        assert finished
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
