"""The run directory: what fedrank writes there, and the rules for starting, overwriting, checkpointing and
resuming a run in it. Nothing here knows how clients are trained.

    config.toml                                the resolved config (tomli-w); rewritten by --resume
    metrics.jsonl                              one strict-JSON record a line; each checkpoint counts the lines
                                               it covers, and --resume cuts the file back to that count
    checkpoints/round-NNNN.safetensors         the last ``output.keep_checkpoints`` round checkpoints
    clients/<id>/after-round-N.safetensors     persistent per-client state (FedSA's B)
    global_state.safetensors, summary.json, adapter/, plots/      written when the run finishes

A checkpoint is written to a temporary file, fsynced, renamed, and the directory fsynced (see
:mod:`fedrank.checkpoint`); only then are older ones pruned. ``--resume`` takes the newest checkpoint that
verifies (checksum) and whose records ``metrics.jsonl`` still holds, logging every one it skips.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedrank import checkpoint
from fedrank.checkpoint import SUFFIX, CheckpointError, atomic_write_bytes, fsync_dir
from fedrank.config import ConfigError, RunConfig, dumps_config

log = logging.getLogger(__name__)

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
CLIENTS = "clients"
GLOBAL_STATE = "global_state" + SUFFIX
ADAPTER = "adapter"
PLOTS = "plots"
REPORT = "report.html"
TENSORBOARD = "tensorboard"
LEGACY = ("checkpoint.pt", "checkpoint.pt.sha256", "global_state.pt", "global_state.pt.sha256")
"""Pickle files of fedrank before 0.2: removed by --overwrite, never loaded."""
COMPARISON = ("comparison.md", "comparison.csv", "comparison.png")
RUN_ENTRIES = frozenset(
    {CONFIG, METRICS, SUMMARY, CHECKPOINTS, CLIENTS, GLOBAL_STATE, ADAPTER, PLOTS, REPORT, TENSORBOARD, *LEGACY}
    | set(COMPARISON)
)
ADAPTER_ENTRIES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})
LOCK = ".fedrank.lock"
"""The lock file of a directory fedrank writes (:func:`exclusive`): held by one process at a time."""
LAYOUTS = {"run": "a fedrank run's", "compare": "a fedrank comparison's", "adapter": "an exported adapter's"}

RESUMABLE = ("output", "eval", "data.cache_dir")
"""Config keys (dotted prefixes) that --resume may change: they do not alter the training trajectory."""

CHECKPOINT_SLACK = 1 << 20
"""Bytes added to a checkpoint's tensors for its manifest, the metrics and the config."""


class RunDirError(RuntimeError):
    """An output directory that cannot be used as asked: not empty, holding other files, not writable, full."""


# ---------------------------------------------------------------------------------------------- layout
def _ours(name: str, entries: frozenset[str]) -> bool:
    if name in entries or name == LOCK or name.startswith(".fedrank-probe-"):
        return True
    return name.startswith(".") and name.endswith(".tmp") and name[1:-4] in entries  # an interrupted write


def foreign_entries(path: Path, layout: str = "run") -> list[str]:
    """Entries of ``path`` (relative names) that fedrank does not write for a directory of ``layout``:
    ``run`` (one run), ``compare`` (comparison files and <method>/seed<k>/ runs) or ``adapter`` (an export)."""
    from fedrank.aggregation import METHODS

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    if not path.is_dir():
        return []
    out: list[str] = []
    for e in sorted(path.iterdir()):
        if layout == "run" and _ours(e.name, RUN_ENTRIES):
            continue
        if layout == "adapter" and _ours(e.name, ADAPTER_ENTRIES):
            continue
        if layout == "compare":
            if _ours(e.name, frozenset((*COMPARISON, REPORT))):
                continue
            if e.is_dir() and not e.is_symlink() and e.name in METHODS:
                for s in sorted(e.iterdir()):
                    if s.is_dir() and not s.is_symlink() and re.fullmatch(r"seed-?\d+", s.name):
                        out += [f"{e.name}/{s.name}/{n}" for n in foreign_entries(s, "run")]
                    else:
                        out.append(f"{e.name}/{s.name}")
                continue
        out.append(e.name)
    return out


def clear(path: Path, layout: str = "run") -> None:
    """Remove what fedrank wrote in ``path``; refuse (and remove nothing) if it holds anything else."""
    if not path.is_dir():
        return
    bad = foreign_entries(path, layout)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise RunDirError(
            f"refusing to empty {path}: it holds files that are not {LAYOUTS[layout]} ({', '.join(bad[:5])}{more}); "
            "remove them or choose another output directory"
        )
    for e in path.iterdir():
        if e.name == LOCK:
            continue  # held by this process (exclusive)
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    fsync_dir(path)


def prepare_output(path: Path, layout: str, overwrite: bool) -> None:
    """The command-line rule for an output directory: absent or empty, or ``--overwrite`` and holding nothing but
    fedrank's files of that ``layout``, which are then removed before anything is written."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output directory {path} exists and is not a directory")
    if not path.is_dir() or not any(e.name != LOCK for e in path.iterdir()):
        return
    if not overwrite:
        run = layout == "run" and (path / CONFIG).exists()
        holds = f" (it holds a run; use --resume {path} to continue it)" if run else ""
        raise RunDirError(
            f"{path} is not empty{holds}; pass --overwrite to replace fedrank's files in it, or choose another --out"
        )
    clear(path, layout)
    log.info("--overwrite: emptied %s", path)


def check_writable(path: Path, need_bytes: int = 0) -> None:
    """Fail before training, not after it: ``path`` is created if needed and must take a file, with
    ``need_bytes`` free (about one checkpoint: :func:`checkpoint_bytes`)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output directory {path}: {e.strerror or e}") from e
    probe = path / f".fedrank-probe-{os.getpid()}"
    if probe.is_symlink():
        probe.unlink()  # a planted link: removed, never written through
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"fedrank")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise RunDirError(f"output directory {path} is not writable: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes:
        raise RunDirError(
            f"output directory {path} has {_size(free)} free; a checkpoint of this run needs about {_size(need_bytes)}"
        )


def checkpoint_bytes(state: Any) -> int:
    """About what one checkpoint of ``state`` takes on disk."""
    return checkpoint.tensor_bytes(state) + CHECKPOINT_SLACK


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def open_existing(out: Path) -> None:
    """A run to resume: ``out`` must exist, be writable and hold no links where fedrank writes."""
    if not out.is_dir():
        raise RunDirError(f"cannot resume {out}: no such directory")
    refuse_links(out)
    check_writable(out)


def start_fresh(out: Path) -> None:
    """A new run owns ``out``: an earlier run's files there are removed (the CLI asks for --overwrite first),
    other files are refused, and the directory must be writable."""
    refuse_links(out)
    clear(out, "run")
    check_writable(out)


WRITTEN_FOLDERS = (CHECKPOINTS, CLIENTS, ADAPTER, PLOTS, TENSORBOARD)
"""Folders of a run directory that fedrank writes into (every entry below them is checked for links)."""


def links_in(out: Path, layout: str = "run") -> list[str]:
    """Symbolic links (relative names) where fedrank writes in ``out``: any entry of a run's layout, anything
    below the folders it writes into, and for a comparison the same in each of its runs. A link there would
    let a shared or downloaded run directory make fedrank write or delete files outside it."""
    from fedrank.aggregation import METHODS

    if not out.is_dir():
        return []
    found: list[str] = []
    for e in sorted(out.iterdir()):
        if e.is_symlink():
            found.append(e.name)
        elif layout == "run" and e.is_dir() and e.name in WRITTEN_FOLDERS:
            found += [f"{e.name}/{p.relative_to(e).as_posix()}" for p in sorted(e.rglob("*")) if p.is_symlink()]
        elif layout == "compare" and e.is_dir() and e.name in METHODS:
            for s in sorted(e.iterdir()):
                if s.is_symlink():
                    found.append(f"{e.name}/{s.name}")
                elif s.is_dir():
                    found += [f"{e.name}/{s.name}/{n}" for n in links_in(s, "run")]
    return found


def refuse_links(out: Path, layout: str = "run") -> None:
    """One line naming the links where fedrank would write in ``out`` (:func:`links_in`), if any."""
    bad = links_in(out, layout)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise RunDirError(
            f"{out} holds symbolic links where fedrank writes ({', '.join(bad[:5])}{more}); fedrank does not write "
            "through links in a run directory: remove them, or copy the run without links"
        )


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One writer per directory: an exclusive ``flock`` on ``path/.fedrank.lock`` held for the block (the
    kernel releases it when the process ends, SIGKILL included). A second writer gets one line naming the
    holder's pid. ``path`` is created if needed."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output directory {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output directory {path}: {e.strerror or e}") from e
    lock = path / LOCK
    if lock.is_symlink():
        lock.unlink()  # a planted link: removed, never opened
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunDirError(f"output directory {path} is not writable: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"{path} is in use by another fedrank process (pid {holder}); wait for it to finish, or choose "
            "another output directory"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting process)


# ---------------------------------------------------------------------------------------------- records
def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON data: non-finite floats become None (null), numpy scalars Python numbers."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (never ``NaN``/``Infinity``, which other JSON readers reject)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def append_record(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(dumps_json(rec) + "\n")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj, indent=2).encode())


def write_config(out: Path, cfg: RunConfig) -> None:
    atomic_write_bytes(out / CONFIG, dumps_config(cfg).encode())


def fsync_file(path: Path) -> None:
    """Make appended records durable (before a checkpoint that counts them)."""
    if path.exists():
        with path.open("ab") as f:
            os.fsync(f.fileno())


def _metrics_lines(path: Path) -> tuple[list[bytes], int]:
    """metrics.jsonl's complete lines (without their newline) and the length of a partial last line."""
    from fedrank.untrusted import available_memory, gib

    size = path.stat().st_size if path.is_file() else 0
    free = available_memory()
    if free is not None and size > free:
        raise CheckpointError(f"{path} is {gib(size)}, more than the {gib(free)} of memory available; not read")
    data = path.read_bytes() if size else b""
    *lines, partial = data.split(b"\n")
    return lines, len(partial)


def _check_records(path: Path, lines: list[bytes], count: Any, where: str) -> list[dict[str, Any]]:
    """The first ``count`` records (those ``where`` counts), each a JSON object with a ``type``."""
    from fedrank.untrusted import DataError, load_json, short

    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise CheckpointError(f"{where} counts {short(count)} records of {path.name}, not a number of records")
    if len(lines) < count:
        raise CheckpointError(f"{path} holds {len(lines)} complete records, fewer than the {count} that {where} counts")
    records = []
    for i, line in enumerate(lines[:count]):
        try:
            rec = load_json(line, f"{path} line {i + 1} (counted by {where})")
        except DataError as e:
            raise CheckpointError(str(e)) from e
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            raise CheckpointError(f"{path} line {i + 1} (counted by {where}) is {short(rec)}, not a record with a type")
        records.append(rec)
    return records


def repair_metrics(path: Path, count: int, where: str) -> None:
    """Cut ``path`` back to its first ``count`` records (those ``where`` counts), logging what is dropped:
    records of a round that did not reach its checkpoint, and a line cut mid-way by a crash."""
    lines, partial = _metrics_lines(path)
    _check_records(path, lines, count, where)
    extra = len(lines) - count
    if not extra and not partial:
        return
    dropped = []
    if extra:
        dropped.append(f"{extra} record(s) written after {where}")
    if partial:
        dropped.append(f"a partial last line of {partial} bytes (cut mid-line)")
    log.warning("%s: dropped %s", path, " and ".join(dropped))
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines[:count]))


# ---------------------------------------------------------------------------------------------- config
_MISSING = object()


def with_added_defaults(saved: Any) -> Any:
    """``saved`` (a config dict an earlier fedrank wrote) with the settings it lacks at their defaults: a
    setting added since (``[privacy]``, say) was not there to change how that run trained, and its default is
    what that version did. A saved value is never replaced."""
    if not isinstance(saved, dict):
        return saved
    from fedrank.config import RunConfig, to_dict

    def fill(have: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
        out = dict(have)
        for k, v in default.items():
            if k not in out:
                out[k] = v
            elif isinstance(v, dict) and isinstance(out[k], dict):
                out[k] = fill(out[k], v)
        return out

    return fill(saved, to_dict(RunConfig()))


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in dict.fromkeys([*a, *b]):
            out += config_diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}.{k}" if prefix else k)
        return out
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [prefix]


def resumable(key: str) -> bool:
    """Whether dotted config ``key`` may differ between a run's checkpoints and its config (see RESUMABLE)."""
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE)


def _at(data: Any, key: str) -> str:
    for k in key.split("."):
        if not isinstance(data, dict) or k not in data:
            return "unset"
        data = data[k]
    return repr(data)


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """--resume may change only :data:`RESUMABLE` settings; any other difference is an error naming its keys."""
    saved = with_added_defaults(saved)
    keys = [k for k in config_diff(saved, now) if not resumable(k)]
    if keys:
        diffs = ", ".join(f"{k} ({_at(saved, k)} -> {_at(now, k)})" for k in keys)
        raise ConfigError(
            f"--resume: {diffs} differ(s) from the config of {where}; only {', '.join(p + '.*' for p in RESUMABLE)} "
            "may change on resume (they do not alter training). Start a new run (--out) to change the others"
        )


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_path(out: Path, round_done: int) -> Path:
    return out / CHECKPOINTS / f"round-{round_done:04d}{SUFFIX}"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The round checkpoints in ``out``, oldest first (complete files only; temporaries are not listed)."""
    found = []
    for p in (out / CHECKPOINTS).glob(f"round-*{SUFFIX}"):
        m = re.fullmatch(rf"round-(\d+){re.escape(SUFFIX)}", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_checkpoint(out: Path, round_done: int, obj: dict[str, Any], keep: int) -> Path:
    """Write round ``round_done``'s checkpoint durably, then prune all but the newest ``keep``."""
    path = checkpoint_path(out, round_done)
    checkpoint.save(obj, path, kind="checkpoint", fault_round=round_done)
    older = [(r, p) for r, p in checkpoints(out) if r <= round_done]
    kept = {r for r, _ in older[-max(keep, 1) :]}
    for r, p in checkpoints(out):
        if r not in kept:  # older ones, and newer ones left from before a fallback
            p.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def remove_temporaries(out: Path) -> None:
    """Temporary files of writes a crash interrupted (never valid data: the rename did not happen)."""
    for folder in [out, out / CHECKPOINTS, *sorted((out / CLIENTS).glob("*"))]:
        for p in folder.glob(".*.tmp"):
            log.info("removing %s (a write interrupted by a crash)", p)
            p.unlink(missing_ok=True)
        for p in folder.glob(".fedrank-probe-*"):
            p.unlink(missing_ok=True)


def client_state_path(out: Path, cid: int, round_done: int) -> Path:
    return out / CLIENTS / str(cid) / f"after-round-{round_done}{SUFFIX}"


def client_state_rounds(out: Path, cid: int) -> list[int]:
    """Rounds after which client ``cid``'s state was saved, oldest first."""
    rounds = []
    for p in (out / CLIENTS / str(cid)).glob(f"after-round-*{SUFFIX}"):
        m = re.fullmatch(rf"after-round-(\d+){re.escape(SUFFIX)}", p.name)
        if m:
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def remove_client_states_after(out: Path, round_done: int) -> None:
    """Client states of rounds after the checkpoint a run resumes from: those rounds are trained again."""
    for p in (out / CLIENTS).glob(f"*/after-round-*{SUFFIX}"):
        m = re.fullmatch(rf"after-round-(\d+){re.escape(SUFFIX)}", p.name)
        if m and int(m.group(1)) > round_done:
            log.info("removing %s (a round after the checkpoint, trained again)", p)
            p.unlink()


def _refuse_legacy(out: Path) -> None:
    old = out / "checkpoint.pt"
    if old.exists() and not checkpoints(out):
        raise CheckpointError(
            f"{old} is a checkpoint of fedrank before 0.2 (a pickle): it is not loaded, because unpickling a file "
            "can run any code. Start the run afresh with --overwrite"
        )


def restore(out: Path, config: dict[str, Any], expected: Any = None) -> dict[str, Any] | None:
    """The newest usable checkpoint of the run in ``out`` (its dict), with ``metrics.jsonl`` cut back to the
    records it counts and later client states removed; ``None`` when the run has no checkpoint yet (it then
    restarts from round 0, with ``metrics.jsonl`` and ``clients/`` emptied).

    Usable: the file verifies (sizes, checksum, format), its contents are what this run could have written
    (:func:`fedrank.untrusted.check_checkpoint`: the round, counts, rank overrides, RNG state, and the state
    against ``expected``, the run's initial state: class, layers, shapes, dtype, finite and bounded values)
    and ``metrics.jsonl`` still holds the records it counts, one round record for each round it has done.
    The checksum is integrity, not authenticity: a crafted file with a recomputed checksum is refused by
    these checks. Every checkpoint skipped is logged with why, and the one used is named; none usable is an
    error. A config differing in a setting that alters training (see :data:`RESUMABLE`) is an error, not a
    fallback."""
    from fedrank import untrusted

    _refuse_legacy(out)
    remove_temporaries(out)
    metrics = out / METRICS
    rank_bound = untrusted.run_bounds(config, expected)[3]
    limit = untrusted.state_bytes_limit(expected, rank_bound) if expected is not None else None
    skipped: list[tuple[Path, str]] = []
    for rnd, path in reversed(checkpoints(out)):
        try:
            ck: dict[str, Any] = checkpoint.load(path, kind="checkpoint", max_bytes=limit)
            if not isinstance(ck, dict) or not isinstance(ck.get("config"), dict):
                raise CheckpointError(f"holds {untrusted.short(ck)}, not a checkpoint with its config")
            check_resume_config(ck["config"], config, path)
            try:
                untrusted.check_checkpoint(ck, config, expected)
            except untrusted.DataError as e:
                raise CheckpointError(
                    f"{e} (a crafted or damaged checkpoint; its checksum only proves it is whole)"
                ) from e
            if ck["round"] != rnd:
                raise CheckpointError(f"holds round {ck['round']}, not the round {rnd} its name says")
            lines, _ = _metrics_lines(metrics)
            counted = _check_records(metrics, lines, ck["metrics_lines"], path.name)
            try:
                untrusted.check_counted_records(counted, rnd, ck["metrics_lines"])
            except untrusted.DataError as e:
                raise CheckpointError(f"{e}; {metrics.name} does not match it") from e
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            skipped.append((path, str(e)))
            continue
        if skipped:
            log.warning(
                "falling back from %s to %s, the newest checkpoint that verifies (the skipped files are kept as *.bad)",
                ", ".join(str(p) for p, _ in skipped),
                path,
            )
            for p, _ in skipped:
                p.replace(p.with_name(p.name + ".bad"))
        repair_metrics(metrics, int(ck["metrics_lines"]), path.name)
        remove_client_states_after(out, rnd)
        log.info("resuming %s from %s (after round %d)", out, path, rnd)
        return ck
    if skipped:
        raise CheckpointError(
            f"no usable checkpoint in {out / CHECKPOINTS}: " + "; ".join(f"{p.name}: {why}" for p, why in skipped)
        )
    log.warning("%s has no complete checkpoint (the run stopped before its first): restarting from round 0", out)
    if metrics.exists():
        repair_metrics(metrics, 0, "the start of the run")
    remove_client_states_after(out, 0)
    return None


def load_global_state(out: Path) -> tuple[Any, dict[str, Any], Path]:
    """(state, config dict, file) of a run: its final global state, else its newest checkpoint that verifies."""
    from fedrank import untrusted

    def checked(path: Path, kind: str) -> dict[str, Any]:
        got = checkpoint.load(path, kind=kind)
        try:
            if not isinstance(got, dict) or not isinstance(got.get("config"), dict) or "state" not in got:
                raise untrusted.DataError(f"holds {untrusted.short(got)}, not a state and its config")
            untrusted.validate_state(got["state"])
        except untrusted.DataError as e:
            raise CheckpointError(
                f"{path}: {e} (a crafted or damaged file; its checksum only proves it is whole)"
            ) from e
        return got

    final = out / GLOBAL_STATE
    if final.exists():
        g = checked(final, "global_state")
        return g["state"], g["config"], final
    _refuse_legacy(out)
    errors = []
    for _, path in reversed(checkpoints(out)):
        try:
            ck = checked(path, "checkpoint")
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            errors.append(str(e))
            continue
        return ck["state"], ck["config"], path
    why = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"{out} holds no global state and no usable checkpoint{why}")
