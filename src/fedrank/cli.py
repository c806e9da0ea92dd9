"""The ``fedrank`` command line: run / compare / report / export / data / bench."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrank.checkpoint import CheckpointError
from fedrank.config import ConfigError, RunConfig, dumps_config, load_config, to_dict
from fedrank.run_dir import REPORT, RunDirError
from fedrank.validation import RunFailed

log = logging.getLogger("fedrank")


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.set or [])


def _few(tasks: Sequence[str], most: int = 3) -> str:
    """Up to ``most`` task names, then how many more (a Dirichlet client can hold dozens)."""
    shown = ", ".join(tasks[:most])
    return shown + (f" and {len(tasks) - most} more" if len(tasks) > most else "")


def _print_outputs(summary: dict[str, Any], out: Path) -> None:
    from fedrank.report import end_of_run_table, safe_name

    def names(xs: Any) -> list[str]:  # task and client names come from the data: control characters escaped
        return [safe_name(x) for x in xs]

    print("\n" + end_of_run_table(summary))
    print(f"\nheld-out task families: {', '.join(names(summary.get('held_out', [])))}")
    print(f"unseen tasks evaluated: {', '.join(names(summary.get('unseen_tasks', [])))}")
    seen = summary.get("seen_clients", {})
    if summary.get("seen_by") == "task":
        print("seen (participants' held-out examples by task): " + _few(names(seen), 8))
    else:
        print(
            "seen (participants):    " + ", ".join(f"client {safe_name(c)} ({_few(names(t))})" for c, t in seen.items())
        )
    sp = summary.get("spectrum", {})
    if "effective_rank" in sp:
        print(
            f"global ΔW: {sp['energy_top_rmin']:.1%} of its energy in the top r_min = {sp['r_min']} directions, "
            f"{sp['energy_top_rmax']:.1%} in the top r_max = {sp['r_max']}; effective rank {sp['effective_rank']:.1f}"
        )
    print(f"\nresults:  {out / 'summary.json'}  (metrics: {out / 'metrics.jsonl'})")
    print(f"adapter:  {summary['adapter']}  (PEFT, rank {summary['export_rank']})")
    if summary.get("plots"):
        print(f"plots:    {out / 'plots'}")
    if summary.get("tensorboard"):
        print(f"tensorboard: tensorboard --logdir {summary['tensorboard']}")
    if summary.get("report"):
        print(f"report:   {summary['report']}  (one self-contained HTML file)")


def cmd_run(args: argparse.Namespace) -> int:
    from fedrank import run_dir
    from fedrank.simulation import Simulation, check_in_process, check_ranks

    if args.resume:
        out = Path(args.resume)
        if args.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if not (out / run_dir.CONFIG).is_file():
            raise RunDirError(f"cannot resume {out}: it holds no {run_dir.CONFIG} (is it a fedrank run directory?)")
        if (out / run_dir.CONFIG).is_symlink():
            raise RunDirError(f"cannot resume {out}: its {run_dir.CONFIG} is a symbolic link")
        cfg = load_config(out / run_dir.CONFIG, args.set or [])
        check_in_process(cfg)
    else:
        cfg = _load(args)
        out = Path(args.out or cfg.output.dir)
        check_ranks(cfg)  # settings are checked before --overwrite removes anything
        check_in_process(cfg)
    with run_dir.exclusive(out):  # one writer per run directory, for the run's whole life
        if not args.resume:
            run_dir.prepare_output(out, "run", args.overwrite)
        print("resolved config:\n" + dumps_config(cfg))
        result = Simulation(cfg, out, resume=bool(args.resume), progress=not args.no_progress).run()
    _print_outputs(result.summary, out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedrank.aggregation import METHODS
    from fedrank.html_report import write_comparison_report
    from fedrank.report import comparison
    from fedrank.simulation import check_in_process, with_method

    cfg = _load(args)
    check_in_process(cfg)
    out = Path(args.out or cfg.output.dir + "-compare")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; known methods: {', '.join(sorted(METHODS))}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.seed]
    except ValueError as e:
        raise ConfigError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from e
    configs = {
        (m, seed): with_method(cfg, m, seed, presets=not args.no_presets, resample_data=args.resample_data)
        for m in methods
        for seed in seeds
    }  # every configuration is built (and validated) before anything trains
    from fedrank import run_dir as rd

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    runs: dict[str, list[Path]] = {}
    failed: list[str] = []
    with rd.exclusive(out):
        if args.resume:
            rd.refuse_links(out, "compare")
            bad = rd.foreign_entries(out, "compare")
            if bad:
                raise RunDirError(f"cannot resume the comparison in {out}: it holds other files ({', '.join(bad[:5])})")
        else:
            rd.prepare_output(out, "compare", args.overwrite)
        for method in methods:
            for seed in seeds:
                run_cfg = configs[(method, seed)]
                run_dir = out / method / f"seed{seed}"
                try:
                    _compare_run(run_cfg, run_dir, method, seed, args)  # holds run_dir's lock
                except RunFailed as e:  # one method's failed run does not cost the others theirs
                    log.error("compare: %s seed %d failed and is left out of the table: %s", method, seed, e)
                    failed.append(f"{method} seed {seed}")
                    continue
                runs.setdefault(method, []).append(run_dir)
        if not runs:
            raise RunFailed(f"every run failed: {', '.join(failed)}")
        md, csv_path = comparison(runs, out)
        report = write_comparison_report(runs, out / REPORT)
    print(md.read_text())
    if failed:
        print(f"left out (the run failed, see its metrics.jsonl): {', '.join(failed)}")
    print(f"comparison: {md}  {csv_path}  {out / 'comparison.png'}")
    print(f"report:     {report}  (one self-contained HTML file)")
    return 0


def _compare_run(cfg: RunConfig, out: Path, method: str, seed: int, args: argparse.Namespace) -> None:
    """One run of a comparison: with ``--resume`` a finished run (its summary.json written under this very
    config) is kept, an interrupted one resumed from its checkpoint, the rest started."""
    from fedrank.study import run_or_resume

    try:
        how = run_or_resume(cfg, out, progress=not args.no_progress, resume=args.resume)
    except ConfigError as e:
        raise ConfigError(f"compare --resume: {e}") from e
    log.info("compare: %s seed %d %s (%s)", method, seed, {"kept": "finished earlier, kept"}.get(how, how), out)


def cmd_study(args: argparse.Namespace) -> int:
    from fedrank.study import aggregate, load_study, plan_tuning, run_study

    study, cfg = load_study(args.config, args.set or [])
    out = Path(args.out or study.out)
    results = Path(args.results or study.results)
    if args.plan:
        tune = plan_tuning(study, cfg, out)
        seeds = len(study.seeds) * len(study.distributions or (cfg.ranks.distribution,)) * len(study.variants)
        from fedrank.aggregation.scale import FOLDABLE

        fold = len(study.seeds) * len([v for v in study.variants if v in FOLDABLE]) if study.fold_ablation else 0
        print(
            f"{study.name}: {len(tune)} tuning runs, then up to {seeds} seed runs and {fold} fold-ablation runs "
            "(and the stability rule's reruns of a variant that diverges on most seeds, decided after them)"
        )
        for job in tune[: len(study.lr_grid)]:
            print(f"  e.g. {job.path}: {job.variant} lr {job.lr:g} seed {job.seed}")
        return 0
    if args.aggregate_only:
        md = aggregate(study, cfg, out, results)
    else:
        t0 = time.perf_counter()
        md = run_study(study, cfg, out, results, progress=not args.no_progress, retry_failed=args.retry_failed)
        print(f"study: this sitting took {time.perf_counter() - t0:.0f} s")
    print(md.read_text())
    print(f"results: {md}  ({results / 'results.csv'}, {results / 'results.json'}, figures, report.html)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedrank.html_report import write_comparison_report, write_run_report
    from fedrank.report import close, comparison, figures, load_run, safe_name, save_figures

    runs: dict[str, list[Path]] = {}
    for d in map(Path, args.run_dirs):
        run = load_run(d)
        figs = figures(run.records, run.ranks, run.method)
        try:
            plots = _plots_into_run(d, figs, save_figures)
            if args.html and len(args.run_dirs) == 1:
                print(f"report: {write_run_report(d, figs, Path(args.html))}")
        finally:
            close(figs)
        print(f"{safe_name(d, 300)}: {json.dumps(run.summary['unseen_after'])}  plots: {[str(p) for p in plots]}")
        runs.setdefault(run.method, []).append(d)
    if args.out:
        md, _ = comparison(runs, Path(args.out))
        print(md.read_text())
    if args.html and len(args.run_dirs) > 1:
        print(f"report: {write_comparison_report(runs, Path(args.html))}")
    return 0


def _plots_into_run(d: Path, figs: Any, save: Any) -> list[Path]:
    """The run's plots rewritten in ``d/plots`` where that is safe and possible; otherwise the report only reads
    ``d`` (a read-only or shared run directory, or one holding links where the plots go), with one log line."""
    from fedrank import run_dir as rd

    links = rd.links_in(d)
    if links:
        log.warning("not writing plots into %s: it holds symbolic links (%s)", d, ", ".join(links[:3]))
        return []
    try:
        paths: list[Path] = save(figs, d / "plots")
    except OSError as e:
        log.warning("not writing plots into %s: %s", d, os_error(e))
        return []
    return paths


def cmd_export(args: argparse.Namespace) -> int:
    from fedrank import run_dir
    from fedrank.models.loading import SMOLLM2, SMOLLM2_ID
    from fedrank.simulation import build_method, export_global

    d, out = Path(args.run_dir), Path(args.out)
    cfg = load_config(d / run_dir.CONFIG)
    state, saved, source = run_dir.load_global_state(d)
    now = to_dict(cfg)
    differ = [k for k in run_dir.config_diff(run_dir.with_added_defaults(saved), now) if not run_dir.resumable(k)]
    if differ:
        raise ConfigError(
            f"{source} was written under another config than {d / run_dir.CONFIG} (differs in {', '.join(differ)}); "
            "not exporting a model under the wrong config"
        )
    with run_dir.exclusive(out):
        run_dir.prepare_output(out, "adapter", args.overwrite)
        run_dir.refuse_links(out, "adapter")
        base = SMOLLM2_ID if cfg.model.name == SMOLLM2 else cfg.model.name
        path = export_global(build_method(cfg), state, cfg, args.rank, out, base)
    print(f"exported rank-{args.rank} PEFT adapter to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedrank import bench

    print(bench.run(quick=args.quick))
    return 0


def _data_config(args: argparse.Namespace) -> Any:
    """The ``[data]`` settings ``fedrank data fetch | info`` look at: a config's (``--config``), or the
    defaults for SOURCE with ``--path`` / ``--suite`` / ``--set data.KEY=VALUE``."""
    from fedrank.config import DataConfig

    if args.config:
        if args.source:
            raise ConfigError("give SOURCE or --config, not both")
        cfg = load_config(args.config, args.set or [])
        return cfg.data
    if not args.source:
        raise ConfigError("name a SOURCE (fedrank data list shows them) or --config CONFIG.toml")
    sets = [f"data.source={json.dumps(args.source)}", *(args.set or [])]
    if args.path:
        sets.append(f"data.path={json.dumps(args.path)}")
    if args.suite:
        sets.append(f"data.suite={json.dumps(args.suite)}")
    data: DataConfig = load_config(None, sets).data
    return data


def cmd_data(args: argparse.Namespace) -> int:
    from fedrank.data import catalog
    from fedrank.report import safe_name  # names from the data: control characters escaped, shortened

    cache = args.cache
    if args.action == "list":
        for row in catalog.listing(cache):
            print(f"{row['source']:<21} {row['about']}")
            art = row.get("artifact")
            if art:
                state = "in the cache" if art["cached"] else "not fetched (fedrank data fetch " + row["source"] + ")"
                print(f"{'':<21}   {art['file']}: {state}; sha256 {art['sha256']}")
                print(f"{'':<21}   licenses: {safe_name(art['licenses'], 140)}")
            for ix in row.get("indexes", []):
                print(f"{'':<21}   index {ix['path']}: {ix['tasks']} tasks")
        return 0
    data = _data_config(args)
    if args.cache:
        data = dataclasses.replace(data, cache_dir=args.cache)
    got = catalog.info(data, download=args.action == "fetch")
    prov = got["provenance"]
    print(f"source:   {prov.pop('source')}")
    for key in ("artifact", "version", "sha256", "checkout", "licenses"):
        if key in prov:
            print(f"{key + ':':<9} {prov.pop(key)}")
    print(
        f"offered:  {got['tasks']} of the source's {got['indexed']} tasks, in {got['families']} families, "
        f"{got['examples']:,} examples (with these [data] settings: scripts, prompt length, suite, licenses)"
    )
    if args.tasks:
        print(f"\n{'task':<48} {'family':<32} {'examples':>8}  keywords")
        for t in got["per_task"]:
            name, fam, kw = safe_name(t["task"], 48), safe_name(t["family"], 32), ", ".join(t["keywords"])
            print(f"{name:<48} {fam:<32} {t['examples']:>8}  {kw}")
    elif args.action == "info":
        print("(--tasks lists them)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrank", description="Federated LoRA fine-tuning with heterogeneous ranks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value")
        p.add_argument("--out", help="output directory (default: output.dir)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("run", help="one federated run")
    config_args(r)
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a non-empty --out: fedrank's files there are removed first (other files are refused)",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="the same clients, data, ranks and seeds for several methods")
    config_args(c)
    c.add_argument(
        "--overwrite", action="store_true", help="replace fedrank's files in a non-empty --out (others are refused)"
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted comparison in --out: finished runs are kept, interrupted ones resumed from "
        "their checkpoints, the rest started (the same config, methods and seeds)",
    )
    c.add_argument("--methods", required=True, help="comma-separated, e.g. flexlora,fslora,hetlora,fedit")
    c.add_argument("--seeds", help="comma-separated seeds (default: the config's seed)")
    c.add_argument(
        "--resample-data",
        action="store_true",
        help="each seed also redraws the held-out task families and the client splits (partition.seed = seed)",
    )
    c.add_argument(
        "--no-presets",
        action="store_true",
        help="run every method with the config as it is (default: methods run as their authors do, e.g. "
        "fslora with SGD + momentum and rsLoRA; see fedrank.simulation.PRESETS)",
    )
    c.set_defaults(func=cmd_compare)

    st = sub.add_parser(
        "study",
        help="every method tuned on a learning-rate grid, then at several seeds and rank distributions, with 95%% "
        "intervals and paired differences: resumable (rerun the same command to go on)",
    )
    st.add_argument("config", help="a study TOML: a run config plus a [study] table (configs/study_*.toml)")
    st.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a run config value")
    st.add_argument("--out", help="run directories (default: study.out)")
    st.add_argument("--results", help="results.md, CSV, JSON, figures and report.html (default: study.results)")
    st.add_argument("--plan", action="store_true", help="print how many runs the study has and stop")
    st.add_argument("--aggregate-only", action="store_true", help="only rewrite the results from finished runs")
    st.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as diverged or failed")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.set_defaults(func=cmd_study)

    rp = sub.add_parser("report", help="rebuild tables, plots and HTML reports from run directories")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", help="also write comparison.md/csv/png here")
    rp.add_argument(
        "--html",
        metavar="OUT.html",
        help="one self-contained HTML report: of the run (one RUN_DIR) or a comparison of the runs by method",
    )
    rp.set_defaults(func=cmd_report)

    e = sub.add_parser("export", help="the global model at any rank as a PEFT adapter")
    e.add_argument("run_dir")
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--out", required=True)
    e.add_argument(
        "--overwrite", action="store_true", help="replace an adapter in a non-empty --out (other files are refused)"
    )
    e.set_defaults(func=cmd_export)

    fl = sub.add_parser(
        "flower",
        add_help=False,
        help="Flower: 'fedrank flower run CONFIG.toml' on a local deployment or Ray, 'fedrank flower up' to "
        "start one (needs: pip install -e '.[flower]'; 'fedrank flower --help' for options)",
    )
    fl.add_argument("flower_args", nargs=argparse.REMAINDER)
    fl.set_defaults(func=cmd_flower)

    d = sub.add_parser(
        "data",
        help="data sources: list (what each is and what is cached), fetch (download and index once), info "
        "(version, sha256, licenses, tasks and families)",
    )
    d.add_argument("action", choices=["list", "fetch", "info"])
    d.add_argument("source", nargs="?", help="evals, benchmarks, bigbench, natural-instructions, files, synthetic")
    d.add_argument("--config", help="the [data] settings of this run config instead of SOURCE")
    d.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value (data.*)")
    d.add_argument("--path", help="bigbench, natural-instructions: a checkout of the official repository")
    d.add_argument("--suite", help="benchmarks: commonsense, mmlu, glue, generative, all, or one data set")
    d.add_argument("--cache", help="the cache folder (default: $FEDRANK_CACHE or ~/.cache/fedrank)")
    d.add_argument("--tasks", action="store_true", help="info/fetch: list every task offered")
    d.set_defaults(func=cmd_data)

    b = sub.add_parser("bench", help="benchmarks printing ratios measured side by side in one run")
    b.add_argument("what", choices=["aggregate"], help="aggregate: FlexLoRA dense SVD vs svd_of_sum")
    b.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    b.set_defaults(func=cmd_bench)
    return parser


def cmd_flower(args: argparse.Namespace) -> int:
    try:
        from fedrank.flower.cli import main_flower
    except ImportError as e:
        raise ConfigError(f"fedrank flower needs the Flower extra: pip install -e '.[flower]' ({e})") from e
    return main_flower(args.flower_args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flower"]:  # its own parser, options included (argparse's REMAINDER would take no --help)
        args = argparse.Namespace(func=cmd_flower, flower_args=argv[1:], verbose=False)
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        force=True,  # rouge-score's absl import installs a root handler first
    )
    for noisy in ("httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print(
            "fedrank: interrupted; a run continues from its last checkpoint with 'fedrank run --resume DIR', "
            "a comparison with 'fedrank compare ... --resume', a study by running the same 'fedrank study' again",
            file=sys.stderr,
        )
        return 130
    except (ConfigError, CheckpointError, RunDirError, ValueError, KeyError, RunFailed) as e:
        print(f"fedrank: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only or missing directories, a path under a file, a full disk: one line, no traceback
        print(f"fedrank: error: {os_error(e)}", file=sys.stderr)
        return 2
    return code


def os_error(e: OSError) -> str:
    """An OSError as one line naming the path(s)."""
    what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


if __name__ == "__main__":
    sys.exit(main())
