"""Start and stop local Flower deployments (SuperLink + SuperNodes on 127.0.0.1) and Ray simulations.

Every process is started in its own session and tracked by pid; `stop()` ends them, their children (the
SuperExecs start themselves in new sessions) and anything else that carries this deployment's private
`FLWR_HOME` in its environment (Ray's `raylet`/`gcs_server` and workers included), and raises if one
survives. Flower's built-in `local` connection is never used: it leaves a detached SuperLink behind and
runs `uv sync` against the network.

Measured on 2 shared cores (flwr 1.42.0): SuperLink ready (GET /health) 1.0-1.2 s after spawn; 3 SuperNodes
connected 2.4 s later; `flwr supernode register` 0.7-0.9 s per key; one trivial deployment round (`flwr run
--stream`) 7-8 s; stop 2-3 s; a whole 3-node Ray simulation run (Ray start included) 13 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import random
import re
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, TypeAlias

import psutil
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ConfigValue: TypeAlias = bool | int | float | str
NodeConfig: TypeAlias = Mapping[str, ConfigValue]

logger = logging.getLogger(__name__)

CONNECTION = "fedrank-local"
SIM_CONNECTION = "fedrank-sim"
LOOPBACK = "127.0.0.1"

# What a SuperNode prints once the SuperLink has activated it (flwr 1.42.0).
_NODE_READY = re.compile(r"SuperNode ID: (\d+)")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_FLOWER_NAMES = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "flwr-simulation",
)


class DeploymentError(RuntimeError):
    """A Flower process did not start, did not become ready in time, or could not be stopped."""


class RunConfigError(ValueError):
    """A run-config key the app does not declare (flwr would reject the run on the SuperLink)."""


# --------------------------------------------------------------------------------------------- app dir


def write_app_dir(
    path: Path | str,
    serverapp: str = "fedrank.flower.server_app:app",
    clientapp: str = "fedrank.flower.client_app:app",
    config_defaults: Mapping[str, ConfigValue] | None = None,
    *,
    name: str = "fedrank-flower",
    publisher: str = "fedrank",
    version: str = "0.1.0",
) -> Path:
    """Write a Flower app directory whose components are installed modules: the FAB is this pyproject only.

    flwr 1.42 requires `[project]` name + version and `[tool.flwr.app]` publisher + components; every
    run-config key that `flwr run --run-config` may set must have a default under `[tool.flwr.app.config]`.
    No `dependencies`: the SuperLink/SuperNodes run with runtime dependency installation disabled and import
    the components from their environment (PYTHONPATH).
    """
    defaults: dict[str, ConfigValue] = {
        "config": "",
        "overrides": "",
        "out-dir": "",
        "resume": False,
        "round-timeout": 0.0,
        "node-wait": 120.0,
    }
    if config_defaults is not None:
        defaults = dict(config_defaults)
    for key, value in defaults.items():
        if not isinstance(value, bool | int | float | str):
            raise TypeError(f"run-config default {key!r} = {value!r}: Flower allows only bool, int, float, str")
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": name,
            "version": version,
            "description": "fedrank as a Flower app",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": defaults,
                }
            }
        },
    }
    app_dir = Path(path).absolute()
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return app_dir


def app_config_defaults(app_dir: Path) -> dict[str, ConfigValue]:
    """The flattened `[tool.flwr.app.config]` table of an app directory (the keys a run may override)."""
    with (app_dir / "pyproject.toml").open("rb") as f:
        doc = tomllib.load(f)
    table = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    out: dict[str, ConfigValue] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value

    walk("", table)
    return out


def format_node_config(config: NodeConfig) -> str:
    """`--node-config` text: space-separated `key=value` with TOML values (strings quoted)."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"node-config key {key!r}: use letters, digits, '-', '_' and '.' only")
        rendered = tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
        if isinstance(value, str) and (" " in value or "'" in value):
            raise ValueError(f"node-config value {value!r}: flwr splits on spaces; no spaces or quotes allowed")
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 / ::1 / localhost, all PEM."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's ECDSA P-384 key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""

    name: str
    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _open_private(path: Path, mode: str = "ab") -> IO[Any]:
    """``path`` opened for appending, created owner-only (0600) when new."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, mode)


def _private_dirs(*paths: Path) -> None:
    """Each of ``paths`` created (with its parents) and made owner-only (0700)."""
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)


def make_tls(directory: Path | str, *, days: int = 30) -> TlsFiles:
    """Self-signed CA (ECDSA P-256) and a server certificate it signs, SAN IP:127.0.0.1, IP:::1, DNS:localhost."""
    out = Path(directory)
    _private_dirs(out)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrank local CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    # certificates are public, but everything in a deployment directory is owner-only
    _write_private(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return files


def make_node_key(directory: Path | str, name: str) -> NodeKey:
    """`<dir>/<name>` + `<dir>/<name>.pub`: ECDSA P-384, OpenSSH format, unencrypted (no ssh-keygen needed)."""
    out = Path(directory)
    _private_dirs(out)
    key = ec.generate_private_key(ec.SECP384R1())
    node = NodeKey(name, out / name, out / f"{name}.pub")
    _write_private(
        node.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(node.public_key, public + f" {name}\n".encode())
    return node


# --------------------------------------------------------------------------------------------- processes


def executable(name: str) -> str:
    """A Flower command from this Python's environment (its bin/ need not be on PATH, e.g. an inactive venv)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` has returned in this process (never returned twice)."""


def _ephemeral_ports() -> tuple[int, int]:
    """The range the OS takes outgoing connections' local ports from (Linux's default where unreadable)."""
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return lo, hi


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago, outside the OS's ephemeral range and not returned
    before by this process. A port the OS picks (bind to 0) lies in the ephemeral range, where every outgoing
    connection (a SuperNode's to the SuperLink, a ClientApp's to its SuperNode) also takes its local port, so
    between our check and the server's bind one of them could take it ("address already in use")."""
    lo, hi = _ephemeral_ports()
    pool = [*range(20000, lo), *range(hi + 1, 65536)]  # either side of the ephemeral range (may be empty)
    rng = random.Random()
    for _ in range(256 if pool else 0):
        port: int = rng.choice(pool)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    for _ in range(64):  # nothing free there: let the OS pick (from the ephemeral range)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.add(port)
    return port


def processes_with_env(key: str, value: str) -> list[psutil.Process]:
    """Every live (non-zombie) process whose environment has `key=value`: what inherited our FLWR_HOME."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(key) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return str(proc.pid)


@dataclass(frozen=True)
class Listener:
    """One listening TCP (or bound UDP) socket of a process."""

    pid: int
    name: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        """127.0.0.0/8, ::1, or IPv4-mapped ::ffff:127.x.y.z (how Ray's IPv6 sockets show 127.0.0.1)."""
        addr = ipaddress.ip_address(self.ip.split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped.is_loopback
        return addr.is_loopback


def listening_sockets(procs: Sequence[psutil.Process]) -> list[Listener]:
    """The listening TCP and bound UDP sockets of `procs` (as `ss -ltnup` would show them)."""
    out = []
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr)
            if listening and c.laddr:
                out.append(Listener(proc.pid, name, c.laddr.ip, c.laddr.port))
    return out


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes]
    pump: threading.Thread | None = None  # copies stdout to the log and the terminal (echo)


@dataclass(frozen=True)
class RunResult:
    """What `flwr run --stream` did: its exit code, the run id and the run's final status on the SuperLink."""

    returncode: int
    run_id: int | None
    status: str | None
    log: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "finished:completed"

    @property
    def exit_code(self) -> int:
        """flwr's exit code, or 1 when flwr exited 0 but the run did not complete (flwr run reports 0 then)."""
        return self.returncode if self.returncode != 0 else (0 if self.ok else 1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class LocalDeployment:
    """A SuperLink and N SuperNodes on 127.0.0.1 (or a simulation SuperLink), started and stopped by pid.

    `node_configs[i]` becomes SuperNode i's `--node-config` (e.g. `{"partition-id": 0, "num-partitions": 3,
    "rank": 4}`). `tls` serves the SuperLink over TLS with a fresh CA (`make_tls`); `auth` (needs `tls`)
    turns on SuperNode authentication: one ECDSA key per node, registered with `flwr supernode register`
    before the node starts. `simulation` starts a `--simulation` SuperLink instead (Ray; no SuperNodes).
    `pythonpath` is prepended to the processes' PYTHONPATH (fedrank's own source dir always is).
    """

    run_dir: Path
    node_configs: Sequence[NodeConfig] = ()
    tls: bool = False
    auth: bool = False
    simulation: bool = False
    pythonpath: Sequence[Path | str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    start_timeout: float = 60.0
    stop_timeout: float = 20.0

    flwr_home: Path = field(init=False)
    log_dir: Path = field(init=False)
    port: int = field(init=False, default=0)
    tls_files: TlsFiles | None = field(init=False, default=None)
    node_keys: list[NodeKey] = field(init=False, default_factory=list)
    node_ids: list[int | None] = field(init=False, default_factory=list)
    superlink: _Proc | None = field(init=False, default=None)
    nodes: list[_Proc] = field(init=False, default_factory=list)
    _seen: dict[int, psutil.Process] = field(init=False, default_factory=dict)
    _started: bool = field(init=False, default=False)
    _runs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS: pass tls=True with auth=True")
        if self.simulation and (self.node_configs or self.tls or self.auth):
            raise ValueError("a simulation SuperLink runs no SuperNodes and no TLS/auth here")
        self.run_dir = Path(self.run_dir).absolute()
        self.flwr_home = self.run_dir / "flwr-home"
        self.log_dir = self.run_dir / "logs"

    # -- public API ----------------------------------------------------------------------------------

    @property
    def connection(self) -> str:
        """The connection name in `$FLWR_HOME/config.toml` that `flwr run <app> <connection>` uses."""
        return SIM_CONNECTION if self.simulation else CONNECTION

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def python_paths(self) -> list[str]:
        """`pythonpath` + the directory holding this `fedrank` package (so a worktree's source is used)."""
        src = str(Path(__file__).resolve().parents[2])
        return [str(Path(p).absolute()) for p in self.pythonpath] + [src]

    def environ(self) -> dict[str, str]:
        """The environment every process of this deployment gets (also what `flwr` commands need)."""
        env = dict(os.environ)
        env.update(self.env)
        paths = self.python_paths()
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(paths),
                # Flower starts its own commands (flwr-serverapp, flower-superexec, flwr-clientapp) by name.
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                # Ray (simulation): local-only mode binds every listener to 127.0.0.1; no usage-stats upload.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        return env

    def start(self) -> LocalDeployment:
        if self._started:
            raise DeploymentError("this deployment was already started; make a new LocalDeployment")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(check=exc is None)

    def run(
        self,
        app_dir: Path | str,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 300.0,
        *,
        federation_config: Mapping[str, ConfigValue] | None = None,
        echo: bool = False,
    ) -> RunResult:
        """`flwr run <app_dir> <connection> --run-config <file.toml> --stream`, bounded by `timeout` seconds.

        The run config goes through a TOML file, so strings need no shell/TOML quoting; every key must be
        declared in the app's `[tool.flwr.app.config]` (checked here: flwr would fail the run on the
        SuperLink). After flwr returns, the run's status is read with `flwr ls` (flwr exits 0 even when the
        ServerApp raised). On timeout the run is stopped (`flwr stop`) and `DeploymentError` raised.
        """
        app = Path(app_dir).absolute()
        overrides = dict(run_config or {})
        known = app_config_defaults(app)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise RunConfigError(
                f"run-config keys {unknown} are not declared in {app / 'pyproject.toml'} "
                f"[tool.flwr.app.config]; known: {sorted(known)}"
            )
        self._runs += 1
        n = self._runs
        cmd = [executable("flwr"), "run", str(app), self.connection, "--stream"]
        if overrides:
            cfg = self.run_dir / f"run-config-{n}.toml"
            _write_private(cfg, tomli_w.dumps(overrides).encode())
            cmd += ["--run-config", str(cfg)]
        if federation_config:
            cmd += ["--federation-config", format_node_config(federation_config)]
        log = self.log_dir / f"flwr-run-{n}.log"
        t0 = time.monotonic()
        if self.superlink is None:
            raise DeploymentError("start the deployment first (`with LocalDeployment(...) as dep:`)")
        proc = self._spawn(f"flwr-run-{n}", cmd, log, echo=echo)
        try:
            rc = proc.popen.wait(timeout=timeout)
        except BaseException as err:  # timeout, Ctrl-C: no flwr CLI may outlive this call
            _kill_group(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)
            self._close(proc)
            run_id = _parse_run_id(log)
            if isinstance(err, subprocess.TimeoutExpired):
                if run_id is not None:
                    self.flwr(["stop", str(run_id), self.connection], timeout=60, check=False)
                raise DeploymentError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s; see {log}") from None
            raise
        self._close(proc)
        seconds = time.monotonic() - t0
        run_id = _parse_run_id(log)
        status = self.run_status(run_id) if run_id is not None else None
        return RunResult(rc, run_id, status, log, seconds)

    def run_status(self, run_id: int) -> str | None:
        """The run's status text on the SuperLink, e.g. `finished:completed` or `finished:failed`."""
        res = self.flwr(["ls", self.connection, "--run-id", str(run_id), "--format", "json"], timeout=60, check=False)
        try:
            doc = json.loads(res.stdout)
            runs = doc.get("runs", [])
            return str(runs[0]["status"]) if runs else None
        except (json.JSONDecodeError, KeyError, IndexError, AttributeError):
            return None

    def flwr(self, args: Sequence[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one `flwr` CLI command against this deployment's FLWR_HOME (bounded, in its own session)."""
        cmd = [executable("flwr"), *args]
        p = subprocess.Popen(
            cmd,
            env=self.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            umask=0o077,  # the SuperLink's database, its logs, the apps it unpacks: owner-only
            cwd=self.run_dir,
        )
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            _kill_group(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        res = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        with _open_private(self.log_dir / "flwr-cli.log", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n[rc={p.returncode}]\n{out}{err}\n")
        if check and p.returncode != 0:
            raise DeploymentError(f"`{' '.join(cmd)}` exited {p.returncode}: {(err or out).strip()[-2000:]}")
        return res

    def start_node(
        self, config: NodeConfig, key: NodeKey | None = None, *, wait: bool = True, name: str | None = None
    ) -> int:
        """Start one more SuperNode (index returned); with auth, `key` must be given (registered or not)."""
        i = len(self.nodes)
        port = free_port()
        cmd = [
            executable("flower-supernode"),
            "--superlink",
            self.address,
            "--port",
            str(port),
            "--node-config",
            format_node_config(config),
        ]
        if self.tls:
            assert self.tls_files is not None
            cmd += ["--root-certificates", str(self.tls_files.ca_cert)]
        else:
            cmd += ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key.private_key)]
        proc = self._spawn(
            name or f"supernode-{i}",
            cmd,
            self.log_dir / f"{name or f'supernode-{i}'}.log",
            extra_env=self.node_threads(),
        )
        self.nodes.append(proc)
        self.node_ids.append(None)
        if wait:
            self.node_ids[i] = self._wait_node(proc)
        return i

    def wait_exit(self, i: int, timeout: float = 60.0) -> int:
        """Wait for SuperNode i to exit on its own (e.g. refused by the SuperLink); its exit code."""
        try:
            return self.nodes[i].popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"SuperNode {i} still running after {timeout:.0f} s; see {self.nodes[i].log}"
            ) from None

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode i and its process group (its SuperExec and ClientApp children too): a crash."""
        proc = self.nodes[i]
        self._remember(proc.popen.pid)
        for child in self._children(proc.popen.pid):
            with contextlib.suppress(psutil.Error):
                child.kill()
        _kill_group(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def register(self, key: NodeKey) -> None:
        """`flwr supernode register <key.pub> <connection> --name <name>` (SuperNode authentication)."""
        self.flwr(
            ["supernode", "register", str(key.public_key), self.connection, "--name", key.name],
            timeout=self.start_timeout,
        )

    def pids(self) -> list[int]:
        """Every live process of this deployment (tracked pids, their descendants, our FLWR_HOME in env)."""
        return sorted(p.pid for p in self._all_processes() if _alive(p))

    def stop(self, check: bool = True) -> None:
        """SIGTERM every process of this deployment, wait (bounded), SIGKILL stragglers; raise if any is left.

        A second Ctrl-C (or SIGTERM) while this runs is held back until it is done (at most `stop_timeout`
        + 10 s), so an impatient user cannot cut the clean-up short and orphan the SuperExecs.
        """
        if not self._started:
            return
        with _signals_held():
            self._stop(check)

    def _stop(self, check: bool) -> None:
        procs = self._all_processes()
        for proc in self._tracked():
            if proc.popen.poll() is None:
                _kill_group(proc.popen.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=self.stop_timeout)
        if alive:
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=min(10.0, self.stop_timeout))
        for proc in self._tracked():
            _kill_group(proc.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
            self._close(proc)
        left = [p for p in self._all_processes() if _alive(p)]
        if left:
            message = "processes left after stop(): " + "; ".join(_describe(p) for p in left)
            if check:
                raise DeploymentError(message)
            logger.error(message)  # an exception is already propagating: do not mask it

    # -- internals -----------------------------------------------------------------------------------

    def _tracked(self) -> list[_Proc]:
        return [*self.nodes, *([self.superlink] if self.superlink is not None else [])]

    def _start(self) -> None:
        _private_dirs(self.run_dir, self.log_dir, self.flwr_home)
        self.port = free_port()
        if self.tls:
            self.tls_files = make_tls(self.run_dir / "tls")
        self._write_connections()
        cmd = [
            executable("flower-superlink"),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            cmd += ["--simulation"]
        if self.tls:
            assert self.tls_files is not None
            cmd += [
                "--ssl-ca-certfile",
                str(self.tls_files.ca_cert),
                "--ssl-certfile",
                str(self.tls_files.server_cert),
                "--ssl-keyfile",
                str(self.tls_files.server_key),
            ]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth", "--database", str(self.run_dir / "superlink.db")]
        self.superlink = self._spawn("superlink", cmd, self.log_dir / "superlink.log")
        self._wait_superlink()
        if self.auth:
            keys_dir = self.run_dir / "keys"
            for i in range(len(self.node_configs)):
                key = make_node_key(keys_dir, f"node{i}")
                self.register(key)
                self.node_keys.append(key)
        for i, config in enumerate(self.node_configs):
            self.start_node(config, self.node_keys[i] if self.auth else None, wait=False)
        for i, proc in enumerate(self.nodes):
            self.node_ids[i] = self._wait_node(proc)

    def _write_connections(self) -> None:
        conn: dict[str, ConfigValue] = {"address": self.address}
        if self.tls:
            assert self.tls_files is not None
            conn["root-certificates"] = str(self.tls_files.ca_cert)
        else:
            conn["insecure"] = True
        doc = {"superlink": {"default": self.connection, self.connection: conn}}
        _write_private(self.flwr_home / "config.toml", tomli_w.dumps(doc).encode())

    def node_threads(self) -> dict[str, str]:
        """A SuperNode's torch threads: the machine's cores shared among the nodes (``env`` can say otherwise).
        Every node trains at once on this one machine; with each using every core, OpenMP's threads spin
        against each other (measured: 8x slower rounds on 2 cores with 3 nodes of 2 threads)."""
        if "OMP_NUM_THREADS" in self.env or "OMP_NUM_THREADS" in os.environ:
            return {}
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, len(self.node_configs))))}

    def _spawn(
        self, name: str, cmd: Sequence[str], log: Path, *, echo: bool = False, extra_env: Mapping[str, str] = {}
    ) -> _Proc:
        pump: threading.Thread | None = None
        log_file = _open_private(log)
        log_file.write(f"$ {' '.join(cmd)}\n".encode())
        log_file.flush()
        if echo:
            popen = subprocess.Popen(
                cmd,
                env={**self.environ(), **extra_env},
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,  # the SuperLink's database, its logs, the apps it unpacks: owner-only
            )
            pump = threading.Thread(target=_tee, args=(popen, log_file), daemon=True)
            pump.start()
        else:
            popen = subprocess.Popen(
                cmd,
                env={**self.environ(), **extra_env},
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,  # the SuperLink's database, its logs, the apps it unpacks: owner-only
            )
        proc = _Proc(name, popen, log, log_file, pump)
        self._remember(popen.pid)
        return proc

    def _remember(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            self._seen.setdefault(pid, p)
            for child in p.children(recursive=True):
                self._seen.setdefault(child.pid, child)

    def _children(self, pid: int) -> list[psutil.Process]:
        try:
            return list(psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            return []

    def _all_processes(self) -> list[psutil.Process]:
        for pid in list(self._seen):
            self._remember(pid)
        procs = {p.pid: p for p in self._seen.values() if _alive(p)}
        for p in processes_with_env("FLWR_HOME", str(self.flwr_home)):
            procs.setdefault(p.pid, p)
        return list(procs.values())

    def _close(self, proc: _Proc) -> None:
        if proc.pump is not None:
            proc.pump.join(timeout=10)
        with contextlib.suppress(OSError):
            proc.log_file.close()

    def _wait_superlink(self) -> None:
        """Poll GET /health (HTTPS with our CA under TLS) until 200, bounded by `start_timeout`."""
        assert self.superlink is not None
        scheme = "https" if self.tls else "http"
        context = None
        if self.tls:
            assert self.tls_files is not None
            context = ssl.create_default_context(cafile=str(self.tls_files.ca_cert))
        url = f"{scheme}://{self.address}/health"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.superlink.popen.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited {self.superlink.popen.returncode} during start; "
                    f"see {self.superlink.log}:\n{_tail(self.superlink.log)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as res:
                    if res.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise DeploymentError(f"flower-superlink not ready within {self.start_timeout:.0f} s; see {self.superlink.log}")

    def _wait_node(self, proc: _Proc) -> int:
        """Wait until the SuperNode logs its node id (the SuperLink activated it); bounded by `start_timeout`."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            m = _NODE_READY.search(proc.log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if proc.popen.poll() is not None:
                raise DeploymentError(
                    f"{proc.name} exited {proc.popen.returncode} before connecting; see {proc.log}:\n{_tail(proc.log)}"
                )
            time.sleep(0.2)
        raise DeploymentError(f"{proc.name} not connected within {self.start_timeout:.0f} s; see {proc.log}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM in the main thread; re-deliver them (as KeyboardInterrupt) when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        logger.warning("still stopping the Flower processes; signal %d held until that is done", signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got and sys.exc_info()[0] is None:
        raise KeyboardInterrupt


def _tee(popen: subprocess.Popen[bytes], log_file: IO[bytes]) -> None:
    assert popen.stdout is not None
    for line in popen.stdout:
        log_file.write(line)
        log_file.flush()
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _parse_run_id(log: Path) -> int | None:
    m = _RUN_STARTED.search(log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------- Ray


@dataclass(frozen=True)
class SimulationResult:
    """A Ray simulation run and every listening socket its processes held while it ran."""

    run: RunResult
    listeners: list[Listener]
    ray_pids: list[int]

    @property
    def exposed(self) -> list[Listener]:
        """Listeners not on loopback (must be empty: traffic stays on 127.0.0.1)."""
        return [x for x in self.listeners if not x.loopback]


def run_ray_simulation(
    app_dir: Path | str,
    num_supernodes: int,
    run_config: Mapping[str, ConfigValue] | None = None,
    timeout: float = 300.0,
    *,
    run_dir: Path | str | None = None,
    pythonpath: Sequence[Path | str] = (),
    cpus_per_client: int = 1,
    echo: bool = False,
) -> SimulationResult:
    """One Ray simulation: `flower-superlink --simulation` + `flwr run ... --federation-config`, then stop.

    Ray is kept on loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray's local-only mode) and its
    listeners are sampled every 0.5 s while the run lasts; after it, every Ray process (found by our
    FLWR_HOME in its environment) is gone or `DeploymentError` is raised. Without `run_dir` a new
    temporary directory holds the logs and is left for inspection.
    """
    directory = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="fedrank-sim-"))
    dep = LocalDeployment(directory, simulation=True, pythonpath=pythonpath)
    listeners: dict[tuple[int, str, int], Listener] = {}
    ray_pids: set[int] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            procs = processes_with_env("FLWR_HOME", str(dep.flwr_home))
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    if _is_ray(p):
                        ray_pids.add(p.pid)
            for x in listening_sockets(procs):
                listeners.setdefault((x.pid, x.ip, x.port), x)

    with dep:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = dep.run(
                app_dir,
                run_config,
                timeout,
                federation_config={"num-supernodes": num_supernodes, "client-resources-num-cpus": cpus_per_client},
                echo=echo,
            )
        finally:
            done.set()
            sampler.join(timeout=10)
    return SimulationResult(result, sorted(listeners.values(), key=lambda x: (x.pid, x.port)), sorted(ray_pids))


def _is_ray(proc: psutil.Process) -> bool:
    name = proc.name()
    if name in ("raylet", "gcs_server") or name.startswith("ray::"):
        return True
    return any("ray" in part.split("/")[-1] for part in proc.cmdline()[:3]) and not any(
        n in " ".join(proc.cmdline()[:3]) for n in _FLOWER_NAMES
    )


__all__ = [
    "CONNECTION",
    "SIM_CONNECTION",
    "DeploymentError",
    "Listener",
    "LocalDeployment",
    "NodeKey",
    "RunConfigError",
    "RunResult",
    "SimulationResult",
    "TlsFiles",
    "app_config_defaults",
    "format_node_config",
    "free_port",
    "listening_sockets",
    "make_node_key",
    "make_tls",
    "processes_with_env",
    "run_ray_simulation",
    "write_app_dir",
]
