"""``fedrank study CONFIG``: a fair, resumable comparison of every method, with intervals.

A study config is a run config (the setting every run shares) plus a ``[study]`` table. The study runs in
three phases, each run in its own directory under ``study.out``:

1. **tune** (``tune/<variant>/lr<lr>``): every variant at every learning rate of ``lr_grid``, at
   ``tune_seed`` (its own data split, held-out families and ranks) and the first rank distribution. Each
   variant's rate is the one with the lowest answer loss on the *seen* split (held-out examples of the
   training tasks; never the unseen task families), among the runs that did not diverge.
2. **seeds** (``<distribution>/<variant>/seed<k>``): every variant at its chosen rate, for every seed and rank
   distribution; each seed redraws the data split, the held-out families, the ranks and the client sampling
   (``with_method(resample_data=True)``), and all variants share the seeds, so differences are paired.
3. **fold** (``<distribution>/<variant>+fold/seed<k>``, first distribution only): the index-sharing variants
   again with ``method.scale = "fold"`` at the same rate: the scale-convention ablation.

A finished run (its ``summary.json`` written under the same config) is kept, an interrupted one resumes from
its checkpoint, and a run that diverged or failed is recorded in ``study.json`` and not retried
(``--retry-failed`` retries it). A run with a client whose model collapsed counts as diverged: never a result.
:func:`aggregate` then writes ``results.md``, ``results.csv``, ``results.json``, figures and ``report.html``.

Variants: a method name from :data:`fedrank.aggregation.METHODS` (homogeneous methods at the pool's smallest
rank, the FlexLoRA paper's "bucket" baseline) or ``<homogeneous method>@max`` (every client at the largest
rank: an upper reference).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import stats as scipy_stats  # type: ignore[import-untyped]

from fedrank import run_dir
from fedrank.aggregation import HOMOGENEOUS, METHODS
from fedrank.aggregation.scale import FOLDABLE
from fedrank.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    from_dict,
    load_config,
    override,
    read_toml,
    to_dict,
)

log = logging.getLogger("fedrank.study")

__all__ = [
    "Job",
    "Ledger",
    "StudyConfig",
    "aggregate",
    "choose_rates",
    "execute",
    "grid_of",
    "load_study",
    "mean_interval",
    "paired_interval",
    "plan_seeds",
    "plan_tuning",
    "run_or_resume",
    "run_study",
    "variant_config",
]

LEDGER = "study.json"
RECORDS = "records.tar.gz"
"""In ``study.results``: the ledger and every recorded run's config, summary and metrics (no weights), so the
results can be re-aggregated, and the study resumed, on a machine that never ran those runs."""
RECORD_FILES = (run_dir.CONFIG, run_dir.SUMMARY, run_dir.METRICS)
MAX_RECORD_BYTES = 64 * 2**20
MAX_RECORD_MEMBERS = 100_000
"""The most an archive's files may hold unpacked, and how many (an archive from a commit is untrusted input)."""
SELECT = ("seen_after", "loss")
"""The tuning criterion: answer loss on the seen split (held-out examples of the training tasks), lower is better."""
METRIC_ORDER = ("loss", "accuracy", "rougeL", "match")
GROUPS = (("unseen", "unseen_after", "unseen_before"), ("seen", "seen_after", "seen_before"))


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    """Title of the results."""
    methods: tuple[str, ...] = ()
    """Variants (empty: all 13 methods and ``fedit@max``)."""
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    sgd_lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    """The grid of variants that train with SGD (FSLoRA's preset): SGD's rates are not AdamW's."""
    tune_seed: int = 1000
    seeds: tuple[int, ...] = (1, 2, 3)
    distributions: tuple[str, ...] = ()
    """Rank distributions of the seed runs (empty: the config's ``ranks.distribution``); tuning uses the first."""
    fold_ablation: bool = True
    keep_checkpoints: bool = False
    """Keep a finished run's round checkpoints (False: removed once its summary is written; a finished run is
    kept by its summary, and its final state and adapter stay). A dense-state run's checkpoints are about
    1 GiB on SmolLM2 (FLoRA, FedEx-LoRA): a study of hundreds of runs would otherwise fill a disk."""
    presets: bool = True
    """Apply :data:`fedrank.simulation.PRESETS` (each method as its authors run it) before the grid's rate."""
    out: str = "runs/study"
    results: str = "docs/results"

    def __post_init__(self) -> None:
        for v in self.variants:
            name, _, at = v.partition("@")
            if name not in METHODS or at not in ("", "max") or (at and name not in HOMOGENEOUS):
                raise ConfigError(
                    f"study.methods: {v!r} is not a method ({', '.join(sorted(METHODS))}) or a homogeneous method "
                    f"at the largest rank ({', '.join(f'{m}@max' for m in sorted(HOMOGENEOUS))})"
                )
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError("study.methods names a variant twice")
        for grid in (self.lr_grid, self.sgd_lr_grid):
            if not grid or any(not (math.isfinite(x) and x > 0) for x in grid) or len(set(grid)) != len(grid):
                raise ConfigError(f"study.lr_grid and sgd_lr_grid must be distinct positive rates, got {list(grid)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or self.tune_seed in self.seeds:
            raise ConfigError("study.seeds must be distinct and must not include study.tune_seed")

    @property
    def variants(self) -> tuple[str, ...]:
        return self.methods or (*sorted(METHODS), "fedit@max")


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> tuple[StudyConfig, RunConfig]:
    """The ``[study]`` table and the run config of a study TOML (``--set`` overrides apply to the run config)."""
    data = read_toml(path, "study config")
    table = data.get("study")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [study] table: a study config is a run config plus [study]")
    study: StudyConfig = from_dict(StudyConfig, table, "study.")
    cfg = config_from_dict({k: v for k, v in data.items() if k != "study"}, list(overrides))
    for d in study.distributions:
        replace(cfg.ranks, distribution=d)  # validated by RanksConfig
    from fedrank.simulation import check_in_process

    check_in_process(cfg)
    return study, cfg


@dataclass(frozen=True)
class Job:
    phase: str
    """"tune", "seed" or "fold"."""
    variant: str
    distribution: str
    seed: int
    lr: float
    path: Path
    cfg: RunConfig = field(repr=False, compare=False)
    tag: str = ""
    """``@lr<rate>`` on a run of the stability rule (:func:`plan_fallbacks`), else empty."""

    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        """The variant as the results name it: ``fslora``, ``fslora@lr0.01``, ``hetlora+fold``."""
        return self.variant + self.tag + ("+fold" if self.phase == "fold" else "")


def variant_config(
    cfg: RunConfig,
    variant: str,
    seed: int,
    distribution: str,
    lr: float,
    *,
    scale: str = "global",
    presets: bool = True,
) -> RunConfig:
    """The run config of ``variant`` at ``seed``, rank ``distribution`` and learning rate ``lr``."""
    from fedrank.simulation import with_method

    name, _, at = variant.partition("@")
    base = replace(cfg, ranks=replace(cfg.ranks, distribution=distribution))
    out = with_method(base, name, seed, presets=presets, resample_data=True)
    if at == "max":
        out = replace(out, ranks=replace(out.ranks, choices=(max(cfg.ranks.choices),)))
    return override(out, {"train.lr": lr, "method.scale": scale})


def _lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def grid_of(study: StudyConfig, cfg: RunConfig, variant: str) -> tuple[float, ...]:
    """The rates ``variant`` is tuned over: ``sgd_lr_grid`` where it trains with SGD, else ``lr_grid``."""
    dist = (study.distributions or (cfg.ranks.distribution,))[0]
    probe = variant_config(cfg, variant, study.tune_seed, dist, study.lr_grid[0], presets=study.presets)
    return study.sgd_lr_grid if probe.train.optimizer == "sgd" else study.lr_grid


def plan_tuning(study: StudyConfig, cfg: RunConfig, out: Path) -> list[Job]:
    dist = (study.distributions or (cfg.ranks.distribution,))[0]
    return [
        Job("tune", v, dist, study.tune_seed, lr, out / "tune" / v / _lr_name(lr),
            variant_config(cfg, v, study.tune_seed, dist, lr, presets=study.presets))
        for v in study.variants
        for lr in grid_of(study, cfg, v)
    ]  # fmt: skip


def plan_seeds(
    study: StudyConfig,
    cfg: RunConfig,
    out: Path,
    rates: dict[str, float],
    tags: Mapping[str, str] = MappingProxyType({}),
) -> list[Job]:
    """The seed runs (and the fold ablation) of the variants that have a chosen rate, in the folder of each
    variant's label (``tags``: a suffix per variant, as the stability rule names its runs). A run whose config
    is the same under another rank distribution (a homogeneous variant: every client at one rank) is planned
    once, in the first distribution's folder, and counted under each."""
    dists = study.distributions or (cfg.ranks.distribution,)
    jobs = []
    first: dict[tuple[str, int], Job] = {}
    for d in dists:
        for v in study.variants:
            if v in rates:
                tag = tags.get(v, "")
                for s in study.seeds:
                    c = variant_config(cfg, v, s, d, rates[v], presets=study.presets)
                    here = out / d / f"{v}{tag}" / f"seed{s}"
                    prior = first.setdefault((v, s), Job("seed", v, d, s, rates[v], here, c, tag))
                    jobs.append(Job("seed", v, d, s, rates[v], prior.path if prior.cfg == c else here, c, tag))
    if study.fold_ablation:
        for v in study.variants:
            if v in rates and v in FOLDABLE:
                tag = tags.get(v, "")
                for s in study.seeds:
                    c = variant_config(cfg, v, s, dists[0], rates[v], scale="fold", presets=study.presets)
                    here = out / dists[0] / f"{v}{tag}+fold" / f"seed{s}"
                    jobs.append(Job("fold", v, dists[0], s, rates[v], here, c, tag))
    return jobs


def plan_fallbacks(
    study: StudyConfig,
    cfg: RunConfig,
    out: Path,
    rates: dict[str, float],
    grid: dict[str, dict[float, float]],
    ledger: Ledger,
) -> tuple[dict[str, float], list[Job]]:
    """The stability rule. A variant whose seed runs at its chosen rate diverged in more than half of those
    planned (the tuning seed was stable at a rate the others are not) is run again, seeds and fold ablation, at
    the best rate of its grid *below* the chosen one that finished at the tuning seed (the lowest seen loss
    among them), as ``variant@lr<rate>``. It reads the seed runs' outcomes, so it is decided after them and
    reported beside the tuned result (which stays, diverged), never in its place. Returns the rate per such
    variant and its jobs."""
    seeds = plan_seeds(study, cfg, out, rates)
    fallback: dict[str, float] = {}
    for v, chosen in rates.items():
        mine = {j.key for j in seeds if j.variant == v and j.phase == "seed"}
        diverged = sum((ledger.runs.get(k) or {}).get("status") == "diverged" for k in mine)
        below = [(loss, lr) for lr, loss in grid.get(v, {}).items() if lr < chosen and math.isfinite(loss)]
        if 2 * diverged > len(mine) and below:
            fallback[v] = min(below)[1]
    tags = {v: "@" + _lr_name(lr) for v, lr in fallback.items()}
    return fallback, plan_seeds(study, cfg, out, fallback, tags)


# ------------------------------------------------------------------------------------------------ running
def run_or_resume(cfg: RunConfig, out: Path, *, progress: bool = True, resume: bool = True) -> str:
    """One run in ``out``: "kept" (finished earlier under this very config), "resumed" (from its checkpoint)
    or "ran". A finished or interrupted run of another config is refused. Raises
    :class:`fedrank.validation.RunFailed` when the run fails."""
    from fedrank import run_dir as rd
    from fedrank.simulation import Simulation

    with rd.exclusive(out):
        if resume and (out / rd.CONFIG).is_file():
            saved = load_config(out / rd.CONFIG)
            differ = rd.config_diff(to_dict(saved), to_dict(cfg))
            if [k for k in differ if not rd.resumable(k)]:
                raise ConfigError(
                    f"{out} was run under another config (differs in {', '.join(differ[:5])}); give the original "
                    "settings, or remove that run directory to redo it"
                )
            if (out / rd.SUMMARY).is_file() and not (out / rd.SUMMARY).is_symlink():
                return "kept"
            if rd.checkpoints(out):
                Simulation(cfg, out, resume=True, progress=progress).run()
                return "resumed"
        Simulation(cfg, out, progress=progress).run()
        return "ran"


def _read_json(path: Path) -> Any:
    from fedrank.untrusted import load_json

    return load_json(path.read_bytes(), str(path))


def _write_json(path: Path, obj: Any) -> None:
    from fedrank.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _divergence_reasons(run: Path, vocab: Callable[[], int]) -> list[str]:
    """Why the run diverged, by today's rules; empty when it did not. Its clients that diverged or collapsed
    (metrics.jsonl): those the run dropped, and those whose recorded losses went beyond uniform predictions
    (:func:`fedrank.local.beyond_uniform`; a run of an earlier fedrank kept them). And its global model, by the
    same rule from its round-0 evaluation to its final one (seen or unseen answer loss): a model that knew
    something and ends worse than uniform predictions, though no single client did (in S1 the average of
    clients that each stayed below ln V reached a loss of 22 at rank 32). ``vocab``: V, when the run's summary
    does not record it."""
    from fedrank.local import beyond_uniform
    from fedrank.report import read_metrics

    summary = _read_json(run / run_dir.SUMMARY) if (run / run_dir.SUMMARY).is_file() else None
    recorded = summary.get("vocab_size") if isinstance(summary, dict) else None
    size: int | None = recorded if isinstance(recorded, int) else None
    out = []
    for split in ("seen", "unseen"):
        ends = [summary.get(f"{split}_{when}") if isinstance(summary, dict) else None for when in ("before", "after")]
        before, after = (e.get("loss") if isinstance(e, dict) else None for e in ends)
        if isinstance(before, int | float) and isinstance(after, int | float):
            size = size or vocab()
            if beyond_uniform(float(before), float(after), size):
                out.append(
                    f"global model: {split} answer loss {before:.3f} -> {after:.3f} over the run, above ln(vocab) = "
                    f"{math.log(size):.3f}: worse than uniform predictions"
                )
    path = run / run_dir.METRICS
    if not path.is_file():
        return out
    for r in read_metrics(path):
        reason = str(r.get("reason", ""))
        if r.get("type") == "client_failed" and ("diverged" in reason or "collapsed" in reason):
            out.append(f"client {r.get('client')}: {reason}")
        first, last = r.get("first_loss"), r.get("last_loss")
        if r.get("type") == "client" and isinstance(first, float) and isinstance(last, float):
            size = size or vocab()
            if beyond_uniform(first, last, size):
                out.append(
                    f"client {r.get('client')} (round {r.get('round')}): diverged: loss {first:.3f} -> {last:.3f}, "
                    f"above ln(vocab) = {math.log(size):.3f}"
                )
    return out


def recheck(ledger: Ledger, vocab: Callable[[], int], *, write: bool = True) -> None:
    """Every run the ledger has as done, checked again by today's divergence rules (a run that finished under
    an earlier fedrank may hold a client that diverged without being dropped): such runs become "diverged",
    never results. ``write=False``: in memory only (``--aggregate-only`` runs without the study's lock, beside
    a running study, which owns ``study.json``)."""
    for key, entry in list(ledger.runs.items()):
        if entry.get("status") != "done":
            continue
        bad = _divergence_reasons(Path(key), vocab)
        if bad:
            log.warning("study: %s is diverged by today's rules: %s", key, "; ".join(bad[:2]))
            ledger.runs[key] = {**entry, "status": "diverged", "reason": "; ".join(bad[:3])}
            if write:
                _write_json(ledger.path, {"runs": ledger.runs})


def vocab_of(cfg: RunConfig) -> Callable[[], int]:
    """V of ``cfg``'s model, built once on first use (runs of an earlier fedrank do not record it)."""
    memo: list[int] = []

    def get() -> int:
        if not memo:
            from fedrank.simulation import build_model

            memo.append(int(build_model(cfg).model.config.vocab_size))
        return memo[0]

    return get


class Ledger:
    """``study.json``: each run's status ("done", "diverged", "failed") and seconds, written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        if path.is_file():
            data = _read_json(path)
            if isinstance(data, dict) and isinstance(data.get("runs"), dict):
                self.runs = data["runs"]

    def get(self, job: Job) -> dict[str, Any] | None:
        return self.runs.get(job.key)

    def put(self, job: Job, **entry: Any) -> None:
        tag = {"tag": job.tag} if job.tag else {}
        self.runs[job.key] = {
            "phase": job.phase,
            "variant": job.variant,
            **tag,
            "seed": job.seed,
            "lr": job.lr,
            **entry,
        }
        _write_json(self.path, {"runs": self.runs})


def execute(
    jobs: Sequence[Job], ledger: Ledger, *, progress: bool, retry_failed: bool, keep_checkpoints: bool = True
) -> None:
    """Each job in turn (a run planned under several distributions: once): kept, resumed or run; its status
    recorded."""
    from fedrank.validation import RunFailed

    seen: set[str] = set()
    jobs = [job for job in jobs if not (job.key in seen or seen.add(job.key))]  # type: ignore[func-returns-value]
    for i, job in enumerate(jobs, 1):
        prior = ledger.get(job)
        if prior is not None and prior.get("status") in ("diverged", "failed") and not retry_failed:
            log.info("study %d/%d: %s %s, not retried (--retry-failed)", i, len(jobs), job.key, prior["status"])
            continue
        t0 = time.perf_counter()
        try:
            how = run_or_resume(job.cfg, job.path, progress=progress)
        except RunFailed as e:
            kind = "diverged" if ("diverged" in str(e) or "collapsed" in str(e)) else "failed"
            log.warning("study %d/%d: %s %s: %s", i, len(jobs), job.key, kind, e)
            ledger.put(job, status=kind, reason=str(e), seconds=time.perf_counter() - t0)
            continue
        bad = _divergence_reasons(job.path, vocab_of(job.cfg))
        summary = _read_json(job.path / run_dir.SUMMARY)
        seconds = float(summary.get("seconds", time.perf_counter() - t0)) if isinstance(summary, dict) else 0.0
        status = "diverged" if bad else "done"
        ledger.put(job, status=status, reason="; ".join(bad[:3]), seconds=seconds, how=how)
        if not keep_checkpoints:
            from fedrank import run_dir as rd

            shutil.rmtree(job.path / rd.CHECKPOINTS, ignore_errors=True)  # finished: kept by its summary
        log.info("study %d/%d: %s %s (%s, %.0f s)", i, len(jobs), job.key, status, how, seconds)


# ------------------------------------------------------------------------------------------------ records
def _relative(path: Path, out: Path) -> str | None:
    """``path`` relative to ``out`` in POSIX form, or None when it is not inside ``out``."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(out))
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(parts) and not name.startswith("/") and all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def pack_records(out: Path, results: Path, ledger: Ledger) -> Path:
    """``results/records.tar.gz``: the ledger (keys relative to ``out``) and each recorded run's config,
    summary and metrics, byte-identical for identical records (sorted, no times), so a commit can carry a study
    from one machine to the next."""
    import gzip
    import io

    runs: dict[str, dict[str, Any]] = {}
    files: list[tuple[str, bytes]] = []
    for key, entry in sorted(ledger.runs.items()):
        rel = _relative(Path(key), out)
        if rel is None:
            continue
        runs[rel] = entry
        for name in RECORD_FILES:
            p = Path(key) / name
            if p.is_file() and not p.is_symlink():
                files.append((f"{rel}/{name}", p.read_bytes()))
    files.insert(0, (LEDGER, (json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n").encode()))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    from fedrank.checkpoint import atomic_write_bytes

    atomic_write_bytes(results / RECORDS, buf.getvalue())
    return results / RECORDS


def _valid_entry(entry: Any) -> bool:
    """A ledger entry as :meth:`Ledger.put` writes it (the fields the study reads, of their types)."""
    if not isinstance(entry, dict) or entry.get("status") not in ("done", "diverged", "failed"):
        return False
    number = (int, float)
    return (
        isinstance(entry.get("phase"), str)
        and isinstance(entry.get("variant"), str)
        and isinstance(entry.get("seed"), int)
        and isinstance(entry.get("lr"), number)
        and isinstance(entry.get("seconds", 0.0), number)
        and isinstance(entry.get("reason", ""), str)
        and isinstance(entry.get("tag", ""), str)
    )


def restore_records(out: Path, results: Path) -> int:
    """The runs recorded in ``results/records.tar.gz`` that ``out`` lacks (neither in its ledger nor on disk),
    written back into ``out`` with their ledger entries; returns how many. The archive is untrusted: only
    regular files named like a run's records, inside ``out``, within :data:`MAX_RECORD_BYTES`; anything else
    is refused with a :class:`fedrank.untrusted.DataError` naming the archive."""
    from fedrank.untrusted import DataError, load_json

    path = results / RECORDS
    if not path.is_file():
        return 0
    what = str(path)
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for m in tar:
                name = m.name
                base = name.rsplit("/", 1)[-1]
                if not m.isfile() or not _safe_relative(name) or (base not in RECORD_FILES and name != LEDGER):
                    raise DataError(f"{what}: {name[:80]!r} is not a run's record")
                if m.size < 0 or len(files) >= MAX_RECORD_MEMBERS:
                    raise DataError(f"{what}: {name[:80]!r}: a negative size, or more than {MAX_RECORD_MEMBERS} files")
                total += m.size
                if total > MAX_RECORD_BYTES:
                    raise DataError(f"{what} holds more than {MAX_RECORD_BYTES >> 20} MiB")
                f = tar.extractfile(m)
                files[name] = f.read(m.size + 1) if f else b""
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{what} is not a readable archive: {e}") from e
    data = load_json(files.get(LEDGER, b"{}"), f"{what}: {LEDGER}")
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict):
        raise DataError(f"{what}: {LEDGER} has no runs")
    for rel, entry in runs.items():  # every entry checked before anything is written
        if not (isinstance(rel, str) and _safe_relative(rel) and len(rel.split("/")) == 3 and _valid_entry(entry)):
            raise DataError(f"{what}: {LEDGER}: {str(rel)[:80]!r} is not a run of the study with a valid entry")
        if entry["status"] == "done" and f"{rel}/{run_dir.SUMMARY}" not in files:
            raise DataError(f"{what}: {rel} is recorded as done without its summary.json")
    ledger = Ledger(out / LEDGER)
    restored = 0
    for rel, entry in sorted(runs.items()):
        run = out / rel
        if str(run) in ledger.runs or run.exists():
            continue
        run.mkdir(parents=True)
        for name in RECORD_FILES:
            if f"{rel}/{name}" in files:
                (run / name).write_bytes(files[f"{rel}/{name}"])
        ledger.runs[str(run)] = entry
        restored += 1
    if restored:
        _write_json(ledger.path, {"runs": ledger.runs})
    return restored


def _summary(job: Job, ledger: Ledger) -> dict[str, Any] | None:
    entry = ledger.get(job)
    if entry is None or entry.get("status") != "done":
        return None
    s = _read_json(job.path / run_dir.SUMMARY)
    return s if isinstance(s, dict) else None


def _metric(summary: dict[str, Any], group: str, metric: str) -> float:
    v = summary.get(group, {}).get(metric) if isinstance(summary.get(group), dict) else None
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan


def choose_rates(jobs: Sequence[Job], ledger: Ledger) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Per variant, the tuning run's rate with the lowest seen answer loss (ties: the smaller rate), among the
    runs that finished without diverging; and every rate's loss (NaN: diverged, failed or not run)."""
    table: dict[str, dict[float, float]] = {}
    for job in jobs:
        s = _summary(job, ledger)
        table.setdefault(job.variant, {})[job.lr] = _metric(s, *SELECT) if s else math.nan
    chosen = {}
    for v, by_lr in table.items():
        ok = [(loss, lr) for lr, loss in by_lr.items() if math.isfinite(loss)]
        if ok:
            chosen[v] = min(ok)[1]
    return chosen, table


def run_study(
    study: StudyConfig, cfg: RunConfig, out: Path, results: Path, *, progress: bool = True, retry_failed: bool = False
) -> Path:
    """Every phase (skipping what is done), then :func:`aggregate`; returns ``results.md``. One study process
    per ``out`` (its lock)."""
    from fedrank import run_dir as rd

    with rd.exclusive(out):
        return _run_study(study, cfg, out, results, progress=progress, retry_failed=retry_failed)


def _run_study(
    study: StudyConfig, cfg: RunConfig, out: Path, results: Path, *, progress: bool, retry_failed: bool
) -> Path:
    restored = restore_records(out, results)
    if restored:
        log.info("study: %d recorded runs restored from %s (kept, not rerun)", restored, results / RECORDS)
    ledger = Ledger(out / LEDGER)
    recheck(ledger, vocab_of(cfg))
    tune = plan_tuning(study, cfg, out)
    log.info("study: %d tuning runs (%d variants, each over its grid of rates)", len(tune), len(study.variants))
    execute(tune, ledger, progress=progress, retry_failed=retry_failed, keep_checkpoints=study.keep_checkpoints)
    rates, grid = choose_rates(tune, ledger)
    if rates:
        log.info("study: chosen rates (lowest seen answer loss): %s", ", ".join(f"{v} {r:g}" for v, r in rates.items()))
    for v in study.variants:
        if v not in rates:
            log.warning("study: %s diverged or failed at every rate of the grid: no seed runs", v)
    seeds = plan_seeds(study, cfg, out, rates)
    log.info("study: %d seed runs", len(seeds))
    execute(seeds, ledger, progress=progress, retry_failed=retry_failed, keep_checkpoints=study.keep_checkpoints)
    fallback, again = plan_fallbacks(study, cfg, out, rates, grid, ledger)
    if again:
        log.warning(
            "study: stability rule: %s diverged on most seeds at the chosen rate; %d runs at the best stable rate "
            "below it: %s",
            ", ".join(fallback),
            len(again),
            ", ".join(f"{v} {lr:g}" for v, lr in fallback.items()),
        )
        execute(again, ledger, progress=progress, retry_failed=retry_failed, keep_checkpoints=study.keep_checkpoints)
    return aggregate(study, cfg, out, results)


# ------------------------------------------------------------------------------------------------ statistics
def mean_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval (lo, hi) of ``xs`` (NaN values left out; one value: an unbounded interval)."""
    a = np.asarray([x for x in xs if math.isfinite(x)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if a.size == 1:
        return m, -math.inf, math.inf
    half = float(scipy_stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - half, m + half


def paired_interval(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean difference a − b over the seeds both have, its interval, and how many seeds were paired."""
    common = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    m, lo, hi = mean_interval([a[s] - b[s] for s in common], level)
    return m, lo, hi, len(common)


# ------------------------------------------------------------------------------------------------ results
def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "–" if math.isnan(x) else ("∞" if x > 0 else "−∞")
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.4g}"


def _cell(m: float, lo: float, hi: float) -> str:
    return f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(m) else "–"


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent  # the checkout fedrank runs from, wherever the study is run
        cmd = ["git", "-C", str(here), "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _metrics_of(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(group label, metric) pairs present in the summaries, in a fixed order."""
    out = []
    for label, after, _ in GROUPS:
        present = {k for s in summaries for k in (s.get(after) or {}) if k != "perplexity"}
        out += [(label, m) for m in METRIC_ORDER if m in present]
    return out


def _client_records(run: Path) -> Iterator[dict[str, Any]]:
    from fedrank.report import read_metrics

    if (run / run_dir.METRICS).is_file():
        yield from read_metrics(run / run_dir.METRICS)


def aggregate(study: StudyConfig, cfg: RunConfig, out: Path, results: Path) -> Path:
    """``results.md`` / ``.csv`` / ``.json``, figures and ``report.html`` in ``results`` from the finished runs."""
    results.mkdir(parents=True, exist_ok=True)
    restore_records(out, results)  # the committed records of runs this machine lacks (it only adds)
    ledger = Ledger(out / LEDGER)
    recheck(ledger, vocab_of(cfg), write=False)  # the study (under its lock) writes its verdicts
    tune = plan_tuning(study, cfg, out)
    rates, grid = choose_rates(tune, ledger)
    fallback, again = plan_fallbacks(study, cfg, out, rates, grid, ledger)
    jobs = plan_seeds(study, cfg, out, rates) + again
    lr_of = {job.label: job.lr for job in jobs}
    planned = {(job.distribution, job.label) for job in jobs}
    dists = list(study.distributions or (cfg.ranks.distribution,))
    # summaries per (distribution, variant label) and seed
    done: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    finished: list[Job] = []  # the jobs whose summary is read here, once
    status: dict[tuple[str, str], dict[str, int]] = {}
    for job in jobs:
        label = job.label
        entry = ledger.get(job)
        st = entry.get("status", "pending") if entry else "pending"
        status.setdefault((job.distribution, label), {}).setdefault(st, 0)
        status[(job.distribution, label)][st] += 1
        s = _summary(job, ledger)
        if s is not None:
            done.setdefault((job.distribution, label), {})[job.seed] = s
            finished.append(job)
    all_summaries = [s for by in done.values() for s in by.values()]
    metrics = _metrics_of(all_summaries)
    rows: list[dict[str, Any]] = []
    tag_of = {j.variant: j.tag for j in again}  # the stability rule's label suffix, as it planned them
    tags = {v: [""] + ([tag_of[v]] if v in tag_of else []) for v in study.variants}
    labels = [v + t for v in study.variants for t in tags[v]]
    labels += [f"{v}{t}+fold" for v in study.variants if v in FOLDABLE and study.fold_ablation for t in tags[v]]
    for d in dists:
        # the zero-shot base model: each seed's "before" evaluation (the same data split for every variant)
        base: dict[int, dict[str, Any]] = {}
        for (dd, _), by in done.items():
            if dd == d:
                for seed, s in by.items():
                    base.setdefault(seed, s)
        entries: list[tuple[str, dict[int, dict[str, Any]], str]] = [("zero-shot", base, "before")]
        # a label's row where it was planned (the fold ablation: under one distribution only, no empty rows)
        entries += [(lab, done.get((d, lab), {}), "after") for lab in labels if (d, lab) in planned]
        for lab, by, when in entries:
            row: dict[str, Any] = {"distribution": d, "variant": lab, "seeds": len(by)}
            row["lr"] = lr_of.get(lab, math.nan)
            row["status"] = status.get((d, lab), {})
            for label, metric in metrics:
                key = next(g for g in GROUPS if g[0] == label)[1 if when == "after" else 2]
                vals = {seed: _metric(s, key, metric) for seed, s in by.items()}
                row[f"{label}.{metric}"] = mean_interval(list(vals.values()))
                row[f"_{label}.{metric}"] = vals
            if by and lab != "zero-shot":
                up = [float(s.get("up_bytes", math.nan)) for s in by.values()]
                down = [float(s.get("down_bytes", math.nan)) for s in by.values()]
                secs = [float(s.get("seconds", math.nan)) for s in by.values()]
                updates = [float(s.get("client_updates", math.nan)) for s in by.values()]
                rounds = [float(s.get("rounds", math.nan)) for s in by.values()]
                row["MiB/round"] = (
                    float(np.nanmean([(u + w) / r for u, w, r in zip(up, down, rounds, strict=True)])) / 2**20
                )
                row["seconds"] = float(np.nansum(secs))
                row["updates"] = float(np.nansum(updates))
                sp = [s.get("spectrum", {}).get("energy_top_rmin") for s in by.values()]
                row["energy_top_rmin"] = mean_interval([float(x) for x in sp if isinstance(x, int | float)])
            rows.append(row)
    # paired differences to flexlora and to fedit (every client at the smallest rank)
    refs: list[str] = [r for r in ("flexlora", "fedit") if r in study.variants]
    for row in rows:
        for ref in refs:
            other = next((r for r in rows if r["distribution"] == row["distribution"] and r["variant"] == ref), None)
            if other is None or row["variant"] in (ref, "zero-shot"):
                continue
            for label, metric in metrics:
                k = f"{label}.{metric}"
                row[f"Δ{ref}.{k}"] = paired_interval(row[f"_{k}"], other[f"_{k}"])
    _write_runs(results, ledger)
    pack_records(out, results, ledger)
    comm = _communication(finished, dists[0])
    _write_tables(results, study, rows, metrics, refs)
    figures = _figures(study, finished, results, rows, metrics, dists)
    report = _report(finished, results, dists[0])
    return _markdown(
        study, cfg, out, results, rows, metrics, refs, grid, rates, fallback, again, comm, figures, report, ledger
    )


def _write_runs(results: Path, ledger: Ledger) -> None:
    """``runs.csv``: every recorded run with its phase, variant, seed, rate, status and wall time."""
    with (results / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "phase", "variant", "seed", "lr", "status", "seconds"])
        for key, e in sorted(ledger.runs.items()):
            label = f"{e.get('variant')}{e.get('tag', '')}"  # fslora@lr0.01: a run of the stability rule
            w.writerow([key, e.get("phase"), label, e.get("seed"), e.get("lr"), e.get("status"),
                        f"{float(e.get('seconds', math.nan)):.1f}"])  # fmt: skip


def _communication(finished: Sequence[Job], dist: str) -> dict[str, dict[int, float]]:
    """Per variant, the mean MiB a client exchanges (up + down) per round, by client rank."""
    sums: dict[str, dict[int, list[float]]] = {}
    for job in finished:
        if job.distribution != dist:
            continue
        label = job.label
        for r in _client_records(job.path):
            if r.get("type") == "client" and isinstance(r.get("rank"), int):
                mib = (float(r.get("up_bytes", 0)) + float(r.get("down_bytes", 0))) / 2**20
                sums.setdefault(label, {}).setdefault(int(r["rank"]), []).append(mib)
    return {v: {k: float(np.mean(x)) for k, x in sorted(by.items())} for v, by in sums.items()}


def _write_tables(
    results: Path, study: StudyConfig, rows: list[dict[str, Any]], metrics: list[tuple[str, str]], refs: list[str]
) -> None:
    keys = [f"{g}.{m}" for g, m in metrics]
    with (results / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        head = ["distribution", "variant", "lr", "seeds"]
        head += [f"{k} {p}" for k in keys for p in ("mean", "lo95", "hi95")]
        head += [f"Δ{r}.{k} {p}" for r in refs for k in keys for p in ("mean", "lo95", "hi95")]
        w.writerow(head)
        for row in rows:
            line = [row["distribution"], row["variant"], row["lr"], row["seeds"]]
            line += [x for k in keys for x in row.get(k, (math.nan,) * 3)]
            line += [x for r in refs for k in keys for x in row.get(f"Δ{r}.{k}", (math.nan,) * 4)[:3]]
            w.writerow(line)
    clean = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    _write_json(results / "results.json", {"study": study.name, "rows": clean})


def _figures(
    study: StudyConfig,
    finished: Sequence[Job],
    results: Path,
    rows: list[dict[str, Any]],
    metrics: list[tuple[str, str]],
    dists: list[str],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedrank.report import read_metrics

    paths: list[Path] = []
    tab20 = plt.get_cmap("tab20")

    def colors(i: int) -> Any:  # the strong shades first, then the light ones
        return tab20((2 * i) % 20 + (i // 10) % 2)

    # 1. metric vs round per variant (first distribution), mean and 95% band over seeds
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    energy: dict[str, dict[int, list[float]]] = {}
    for job in finished:
        if job.phase != "seed" or job.distribution != dists[0]:
            continue
        for r in read_metrics(job.path / run_dir.METRICS):
            if r.get("type") == "eval":
                for label, key in (("unseen", "unseen_avg"), ("seen", "participants_avg")):
                    for metric, v in (r.get(key) or {}).items():
                        if metric != "perplexity" and isinstance(v, int | float):
                            c = curves.setdefault(f"{label}.{metric}", {}).setdefault(job.label, {})
                            c.setdefault(int(r["round"]), []).append(float(v))
            if r.get("type") == "round" and isinstance((r.get("spectrum") or {}).get("energy_top_rmin"), int | float):
                energy.setdefault(job.label, {}).setdefault(int(r["round"]), []).append(
                    float(r["spectrum"]["energy_top_rmin"])
                )
    keys = [f"{g}.{m}" for g, m in metrics if f"{g}.{m}" in curves]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            for i, (v, by) in enumerate(sorted(curves[key].items())):
                xs = sorted(by)
                ci = [mean_interval(by[x]) for x in xs]
                ys = [c[0] for c in ci]
                ax.plot(xs, ys, marker="o", ms=3, color=colors(i), label=v)
                lo = [c[1] if math.isfinite(c[1]) else c[0] for c in ci]
                hi = [c[2] if math.isfinite(c[2]) else c[0] for c in ci]
                ax.fill_between(xs, lo, hi, color=colors(i), alpha=0.12)
            ax.set_title(key)
            ax.set_xlabel("round")
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
        fig.suptitle(f"{study.name}: metric vs round ({dists[0]}; mean and 95% interval over seeds)")
        fig.tight_layout()
        paths.append(_save(fig, results / "rounds.png"))
    # 2. final metrics per rank distribution: one panel per metric, the axis fitted to the means (a 2-seed
    # interval spans ±13 standard errors and would flatten every other point: its whiskers are cut there)
    if keys and len(dists) > 1:
        variants = [r["variant"] for r in rows if r["distribution"] == dists[0]]
        fig, axes = plt.subplots(len(keys), 1, figsize=(10, 2.6 * len(keys) + 1), squeeze=False, sharex=True)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            means: list[float] = []
            for j, d in enumerate(dists):
                pts = [next((r for r in rows if r["distribution"] == d and r["variant"] == v), {}) for v in variants]
                ms = [p.get(key, (math.nan,) * 3) for p in pts]
                x = np.arange(len(variants)) + (j - len(dists) / 2) * 0.15
                m = np.array([c[0] for c in ms])
                err = np.array(
                    [
                        [c[0] - c[1] if math.isfinite(c[1]) else 0 for c in ms],
                        [c[2] - c[0] if math.isfinite(c[2]) else 0 for c in ms],
                    ]
                )
                ax.errorbar(x, m, yerr=err, fmt="o", ms=3, capsize=2, color=colors(j), label=d)
                means += [float(c[0]) for c in ms if math.isfinite(c[0])]
            if means:
                span = max(max(means) - min(means), 0.05)
                top = 1.0 if key.split(".")[-1] in ("rougeL", "match", "accuracy") else math.inf
                ax.set_ylim(max(0.0, min(means) - 0.4 * span), min(top, max(means) + 0.4 * span))
            ax.set_ylabel(key)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7, ncol=len(dists))
        axes[-1][0].set_xticks(np.arange(len(variants)), variants, rotation=60, fontsize=7)
        axes[0][0].set_title(
            f"{study.name}: final metrics per rank distribution (mean, 95% interval; whiskers cut at the axis)"
        )
        fig.tight_layout()
        paths.append(_save(fig, results / "distributions.png"))
    # 3. energy of the global update in the top r_min directions, per variant and round
    if energy:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (v, by) in enumerate(sorted(energy.items())):
            xs = sorted(by)
            ax.plot(xs, [float(np.mean(by[x])) for x in xs], marker="o", ms=3, color=colors(i), label=v)
        ax.set_xlabel("round")
        ax.set_ylabel("energy in the top r_min directions")
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
        ax.set_title("rank-collapse diagnostic (mean over seeds)")
        fig.tight_layout()
        paths.append(_save(fig, results / "collapse.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _report(finished: Sequence[Job], results: Path, dist: str) -> Path | None:
    from fedrank.html_report import write_comparison_report

    runs: dict[str, list[Path]] = {}
    for job in finished:
        if job.phase == "seed" and job.distribution == dist:
            runs.setdefault(job.label, []).append(job.path)
    # the results folder is committed and the run directories are not: a link to a run's report would be dead
    # in the repository, and the page would differ between the machine that ran the study and a fresh clone
    return write_comparison_report(runs, results / "report.html", link_runs=False) if runs else None


def _markdown(
    study: StudyConfig,
    cfg: RunConfig,
    out: Path,
    results: Path,
    rows: list[dict[str, Any]],
    metrics: list[tuple[str, str]],
    refs: list[str],
    grid: dict[str, dict[float, float]],
    rates: dict[str, float],
    fallback: dict[str, float],
    again: list[Job],
    comm: dict[str, dict[int, float]],
    figures: list[Path],
    report: Path | None,
    ledger: Ledger,
) -> Path:
    keys = [f"{g}.{m}" for g, m in metrics]
    total = sum(float(e.get("seconds", 0.0)) for e in ledger.runs.values())
    updates = sum(float(r.get("updates", 0.0)) for r in rows if isinstance(r.get("updates"), float))
    seeds = plan_seeds(study, cfg, out, {v: 1.0 for v in study.variants})
    planned = {j.key for j in plan_tuning(study, cfg, out)} | {j.key for j in seeds} | {j.key for j in again}
    counts: dict[str, int] = {}
    for k, e in ledger.runs.items():
        if k in planned:
            counts[str(e.get("status"))] = counts.get(str(e.get("status")), 0) + 1
    shared = [
        v for v in study.variants if any(j.variant == v and j.path.parent.parent.name != j.distribution for j in seeds)
    ]
    lines = [
        f"# {study.name}",
        "",
        "Written by `fedrank study` (do not edit: rerun it). Every cell is the mean over seeds with its 95% "
        "Student-t interval in brackets; `–` where no run finished.",
        "",
        f"- commit `{_git_commit()}`; runs in `{out}`; {sum(counts.values())} of {len(planned)} planned runs recorded "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}).",
        f"- compute: {total / 3600:.2f} h of run time recorded; {updates:.0f} client updates in the seed runs"
        + (f", {updates / (total / 3600):.0f} client updates per hour overall" if total > 0 else "")
        + f" (this machine: {os.cpu_count()} CPUs; each run's wall time in `runs.csv`).",
        f"- model `{cfg.model.name}`, data `{cfg.data.source}`"
        + (f" suite `{cfg.data.suite}`" if cfg.data.source == "benchmarks" else "")
        + f", {cfg.partition.num_clients} registered clients ({cfg.partition.kind}), "
        f"{cfg.federation.rounds} rounds of {cfg.federation.clients_per_round} clients, {cfg.train.steps} local steps "
        f"of batch {cfg.train.batch_size}; ranks {list(cfg.ranks.choices)}; seeds {list(study.seeds)} "
        f"(tuning seed {study.tune_seed}); presets {'on' if study.presets else 'off'}.",
        *(
            [
                f"- {', '.join(shared)}: every client at one rank, so the rank distribution does not change the run: "
                "each seed is run once (under the first distribution) and shown under every distribution."
            ]
            if shared
            else []
        ),
        "",
        "## Learning rate chosen per variant (seen answer loss at the tuning seed; never the unseen tasks)",
        "",
        "| variant | seen loss at each rate of its grid | chosen |",
        "|---|---|---|",
    ]
    for v in study.variants:
        by = grid.get(v, {})
        cells = [f"{x:g}: {_fmt(by[x]) if math.isfinite(by.get(x, math.nan)) else 'diverged/–'}" for x in sorted(by)]
        chosen = f"{rates[v]:g}" if v in rates else "none"
        if v in rates and len(by) > 1 and rates[v] in (min(by), max(by)):
            chosen += " (grid edge)"  # the best rate may lie beyond the grid
        lines.append(f"| {v} | " + ", ".join(cells) + f" | {chosen} |")
    if fallback:
        lines += [
            "",
            "**Stability rule** (decided after the seed runs, so not a tuned result): a variant whose seed runs at "
            "the chosen rate diverged in more than half of them is run again at the best rate of its grid below "
            "it that finished at the tuning seed, shown as `variant@lr<rate>` beside the tuned row (which stays, "
            "diverged): " + ", ".join(f"{v} at {lr:g} (chosen {rates[v]:g})" for v, lr in fallback.items()) + ".",
        ]
    for d in dict.fromkeys(r["distribution"] for r in rows):
        lines += ["", f"## Final metrics, rank distribution `{d}`", ""]
        lines.append("| variant | lr | seeds | " + " | ".join(keys) + " |")
        lines.append("|---|---|---|" + "---|" * len(keys))
        for r in rows:
            if r["distribution"] == d:
                cells = [_cell(*r.get(k, (math.nan,) * 3)) for k in keys]
                lr = _fmt(r["lr"]) if math.isfinite(r["lr"]) else ""
                lines.append(f"| {r['variant']} | {lr} | {r['seeds']} | " + " | ".join(cells) + " |")
        for ref in refs:
            lines += ["", f"Paired difference to **{ref}** (same seeds; a change in loss < 0 is better):", ""]
            lines.append("| variant | pairs | " + " | ".join(keys) + " |")
            lines.append("|---|---|" + "---|" * len(keys))
            for r in rows:
                if r["distribution"] == d and f"Δ{ref}.{keys[0]}" in r if keys else False:
                    cells = [_cell(*r.get(f"Δ{ref}.{k}", (math.nan,) * 4)[:3]) for k in keys]
                    n = r.get(f"Δ{ref}.{keys[0]}", (0, 0, 0, 0))[3]
                    lines.append(f"| {r['variant']} | {n} | " + " | ".join(cells) + " |")
    d0 = rows[0]["distribution"] if rows else ""
    lines += ["", f"## Communication and the rank-collapse diagnostic (`{d0}`)", ""]
    ranks = sorted({k for by in comm.values() for k in by})
    lines.append(
        "| variant | MiB per round | "
        + " | ".join(f"MiB per client-round, r={k}" for k in ranks)
        + " | energy in top r_min |"
    )
    lines.append("|---|---|" + "---|" * len(ranks) + "---|")
    for r in rows:
        if r["distribution"] == d0 and r["variant"] != "zero-shot":
            per_rank = comm.get(r["variant"], {})
            cells = [f"{per_rank[k]:.2f}" if k in per_rank else "" for k in ranks]
            e = r.get("energy_top_rmin", (math.nan,) * 3)
            mib = r.get("MiB/round", math.nan)
            lines.append(f"| {r['variant']} | {_fmt(mib)} | " + " | ".join(cells) + f" | {_cell(*e)} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    if report is not None:
        lines += ["", f"One self-contained HTML report of the `{d0}` seed runs: [{report.name}]({report.name})."]
    diverged = [(k, e) for k, e in ledger.runs.items() if e.get("status") in ("diverged", "failed")]
    if diverged:
        lines += ["", "## Diverged or failed runs (never counted as results)", ""]
        lines += [f"- `{k}`: {e.get('status')}: {str(e.get('reason', ''))[:200]}" for k, e in sorted(diverged)]
    md = results / "results.md"
    md.write_text("\n".join(lines) + "\n")
    return md
