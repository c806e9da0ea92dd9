"""`fedrank flower up|run`: a local Flower deployment (or Ray simulation) for a quick try; thin over `deploy`."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from fedrank.flower.deploy import ConfigValue, LocalDeployment, NodeConfig, run_ray_simulation, write_app_dir

ENROLMENT_GAP = (
    "note: node authentication admits only registered keys, but registering one needs no credential: anyone who "
    "can reach the SuperLink's port (here 127.0.0.1 only) can run `flwr supernode register` and join; flwr 1.42 "
    "offers no open-source way to restrict its Control API (docs/flower.md#security)"
)
SERVERAPP = "fedrank.flower.server_app:app"
CLIENTAPP = "fedrank.flower.client_app:app"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrank flower", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--nodes", type=int, default=None, help="number of SuperNodes (default: run: partition.num_clients; up: 3)"
        )
        q.add_argument("--ranks", default=None, help="LoRA rank per node, comma-separated (one value: all nodes)")
        q.add_argument("--tls", action="store_true", help="serve the SuperLink over TLS (a fresh local CA)")
        q.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
        q.add_argument(
            "--dir", type=Path, default=None, help="run directory: logs, keys, FLWR_HOME (default: a new temp dir)"
        )
        q.add_argument("--serverapp", default=SERVERAPP, help=argparse.SUPPRESS)
        q.add_argument("--clientapp", default=CLIENTAPP, help=argparse.SUPPRESS)
        q.add_argument("--pythonpath", action="append", default=[], help=argparse.SUPPRESS)

    app = sub.add_parser("app", help="write a Flower app directory (a pyproject.toml naming fedrank's apps)")
    app.add_argument("dir", type=Path, help="the folder to write (created; its pyproject.toml is replaced)")
    up = sub.add_parser("up", help="start a SuperLink + SuperNodes on 127.0.0.1 until Ctrl-C")
    common(up)
    run = sub.add_parser("run", help="start, run CONFIG.toml as a Flower app, stop; exit code of the run")
    run.add_argument("config", type=Path, help="fedrank TOML config")
    common(run)
    run.add_argument("--ray", action="store_true", help="Ray simulation instead of a deployment")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="dotted config override, repeatable (e.g. --set federation.rounds=1)",
    )
    run.add_argument("--out", type=Path, default=None, help="output directory (default: the config's output.dir)")
    run.add_argument("--resume", action="store_true", help="resume from --out's newest checkpoint")
    run.add_argument(
        "--overwrite", action="store_true", help="start afresh in a non-empty output directory (fedrank's files only)"
    )
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    return p


def node_configs(nodes: int, ranks: str | None) -> list[NodeConfig]:
    """`{"partition-id": i, "num-partitions": N, "rank": r_i}` per node (no rank key without --ranks)."""
    if nodes < 1:
        raise SystemExit("fedrank flower: --nodes must be >= 1")
    rank_list: list[int] = []
    if ranks is not None:
        try:
            rank_list = [int(r) for r in ranks.split(",") if r.strip()]
        except ValueError:
            raise SystemExit(f"fedrank flower: --ranks {ranks!r}: expected integers like 4,8,16") from None
        if len(rank_list) == 1:
            rank_list *= nodes
        if len(rank_list) != nodes or min(rank_list) < 1:
            raise SystemExit(f"fedrank flower: --ranks {ranks!r}: need {nodes} positive ranks (or one for all)")
    out: list[NodeConfig] = []
    for i in range(nodes):
        cfg: dict[str, ConfigValue] = {"partition-id": i, "num-partitions": nodes}
        if rank_list:
            cfg["rank"] = rank_list[i]
        out.append(cfg)
    return out


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C, so the deployment is stopped rather than orphaned; and SIGINT
    does so even where this process inherited it ignored (started in the background by a non-interactive
    shell, which ignores SIGINT for its background jobs), or the deployment could not be stopped with it."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def main_flower(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "app":
        app_dir = write_app_dir(args.dir, SERVERAPP, CLIENTAPP)
        print(f"{app_dir}: run it with `flwr run {shlex.quote(str(app_dir))} <connection> --run-config ...`")
        return 0
    if args.auth and not args.tls:
        raise SystemExit("fedrank flower: --auth needs --tls (SuperNode authentication runs over TLS)")
    # every argument is checked before anything is written: bad input leaves no directory behind
    run_config = _run_config(args) if args.command == "run" else {}
    configs = node_configs(args.nodes or 3, args.ranks) if args.command == "up" or not args.ray else []
    run_dir = private_dir(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fedrank-flower-")).absolute()
    app_dir = write_app_dir(run_dir / "app", args.serverapp, args.clientapp)
    with _sigterm_as_interrupt():
        if args.command == "up":
            return _up(args, run_dir, app_dir, configs)
        return _run(args, run_dir, app_dir, run_config, configs)


def private_dir(path: Path) -> Path:
    """``path`` created (parents too) and made owner-only (0700): it holds keys, the SuperLink's database and
    the logs."""
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _up(args: argparse.Namespace, run_dir: Path, app_dir: Path, configs: list[NodeConfig]) -> int:
    dep = LocalDeployment(run_dir, configs, tls=args.tls, auth=args.auth, pythonpath=args.pythonpath)
    try:
        with dep:
            mode = "TLS + SuperNode auth" if args.auth else "TLS" if args.tls else "insecure"
            print(f"SuperLink {dep.address} ({mode}), {len(configs)} SuperNodes {dep.node_ids}; logs: {dep.log_dir}")
            print(f"connection: {dep.connection}\nrun an app from another shell:")
            print(
                f"  export FLWR_HOME={shlex.quote(str(dep.flwr_home))} "
                f"PYTHONPATH={shlex.quote(':'.join(dep.python_paths()))}"
            )
            example = shlex.quote('config="/abs/path/CONFIG.toml" overrides="federation.rounds=1"')
            print(f"  flwr run {shlex.quote(str(app_dir))} {dep.connection} --stream --run-config {example}")
            if args.auth:
                print(ENROLMENT_GAP)
            print("Ctrl-C stops everything.", flush=True)
            assert dep.superlink is not None
            while dep.superlink.popen.poll() is None:
                time.sleep(1.0)
            print(f"the SuperLink exited ({dep.superlink.popen.returncode}); see {dep.superlink.log}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0


def _run_config(args: argparse.Namespace) -> dict[str, ConfigValue]:
    """`fedrank flower run`'s arguments checked (the fedrank config loaded with its overrides, the output
    directory prepared as `fedrank run` does), as the app's run config; `args.nodes` defaults to one
    SuperNode per registered client."""
    if not args.config.is_file():
        raise SystemExit(f"fedrank flower run: no config file {args.config}")
    for item in args.overrides:
        if "=" not in item or ";" in item:
            raise SystemExit(f"fedrank flower run: --set {item!r}: expected key=value without ';'")
    if args.ray and args.ranks is not None:
        raise SystemExit(
            "fedrank flower run --ray: simulated nodes get only partition-id/num-partitions; "
            "drop --ranks and set the ranks in the config's [ranks] table"
        )
    if args.resume and args.overwrite:
        raise SystemExit("fedrank flower run: --resume and --overwrite exclude each other")
    from fedrank import run_dir as fedrank_run_dir
    from fedrank.config import load_config

    cfg = load_config(args.config, list(args.overrides))  # errors here, before any process starts
    out = (args.out or Path(cfg.output.dir)).absolute()
    if args.nodes is None:  # one SuperNode per registered client
        args.nodes = cfg.partition.num_clients
    node_configs(args.nodes, args.ranks)  # --ranks checked before the output directory is touched
    if not args.resume:  # the same rules as `fedrank run`: a non-empty directory needs --overwrite
        fedrank_run_dir.prepare_output(out, "run", args.overwrite)
    return {
        "config": str(args.config.absolute()),
        "overrides": ";".join(args.overrides),
        "resume": args.resume,
        "out-dir": str(out),
    }


def _run(
    args: argparse.Namespace,
    run_dir: Path,
    app_dir: Path,
    run_config: dict[str, ConfigValue],
    configs: list[NodeConfig],
) -> int:
    try:
        if args.ray:
            sim = run_ray_simulation(
                app_dir, args.nodes, run_config, args.timeout, run_dir=run_dir, pythonpath=args.pythonpath, echo=True
            )
            result = sim.run
        else:
            with LocalDeployment(run_dir, configs, tls=args.tls, auth=args.auth, pythonpath=args.pythonpath) as dep:
                result = dep.run(app_dir, run_config, args.timeout, echo=True)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    print(f"run {result.run_id}: {result.status} in {result.seconds:.1f} s; logs: {run_dir / 'logs'}", file=sys.stderr)
    out = Path(str(run_config["out-dir"]))
    summary = out / "summary.json"
    if result.exit_code == 0 and summary.is_file():  # the same end-of-run output as `fedrank run`
        from fedrank.cli import _print_outputs

        _print_outputs(json.loads(summary.read_text()), out)
    return result.exit_code


__all__ = ["main_flower", "node_configs", "private_dir"]

if __name__ == "__main__":
    raise SystemExit(main_flower())
