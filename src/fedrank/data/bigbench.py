"""BIG-bench tasks from the ``bigbench==1.0.0`` source distribution where a user has it, or from a checkout of
the official BIG-bench repository (``data.path``, holding ``bigbench/benchmark_tasks/*/task.json``).

The registry no longer serves ``bigbench==1.0.0`` (only 0.0.1, a placeholder without task data), so nothing
is downloaded: the sdist is read where it lies in the cache (``<cache>/bigbench/bigbench-1.0.0.tar.gz``), a
checkout where ``data.path`` points. One pass builds the local index (:mod:`fedrank.data.index`), so later runs
read only the tasks they use.

Formatting follows BIG-bench's JSON task rules: prompt = task_prefix + example_input_prefix + input
(+ choice_prefix + each option when ``append_choices_to_input``, the default) + example_output_prefix.
``target`` may be a string or a list (all are references); ``target_scores`` makes an example multiple
choice (every option keeps its score: the credit for choosing it; the highest-scored option is the
answer). A task whose examples live in subtasks becomes one task per subtask, named ``parent:subtask``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedrank.data.examples import Example
from fedrank.data.index import DataError, IndexStore, TaskIndex, build_index, cache_dir, index_root

log = logging.getLogger(__name__)

SDIST = "bigbench-1.0.0.tar.gz"
TASKS_ROOT = "bigbench/benchmark_tasks/"
UNAVAILABLE = "bigbench==1.0.0 is no longer served by the package registry (only 0.0.1, a placeholder without tasks)"


def _references(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, list):
        return tuple(str(t) for t in target)
    return (str(target),)


def parse_task(task: dict[str, Any], name: str) -> list[Example]:
    """Normalise one task.json's examples; examples with neither target nor target_scores are dropped."""
    prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    out = []
    for ex in task.get("examples", []):
        if "input" not in ex:
            continue
        refs = _references(ex.get("target"))
        scores = ex.get("target_scores")
        choices: tuple[str, ...] | None = None
        correct: int | None = None
        values: list[float] = []
        if isinstance(scores, dict) and scores:
            choices = tuple(str(c) for c in scores)
            values = [float(v) for v in scores.values()]
            correct = values.index(max(values))
            if not refs:
                refs = tuple(c for c, v in zip(choices, values, strict=True) if v == max(values))
        if not refs:
            continue
        text = prefix + in_prefix + str(ex["input"])
        if choices is not None and append_choices:
            text += "".join(choice_prefix + c for c in choices)
        text += out_prefix
        graded = tuple(values) if choices is not None else None
        out.append(Example(text.strip(), refs[0], refs, choices, correct, name, graded))
    return out


def _task_name(member: str) -> str | None:
    """``.../benchmark_tasks/a/task.json`` -> ``a``; ``.../a/b/task.json`` -> ``a:b``."""
    i = member.find(TASKS_ROOT)
    if i < 0 or not member.endswith("/task.json"):
        return None
    parts = member[i + len(TASKS_ROOT) :].split("/")[:-1]
    return ":".join(parts) if 1 <= len(parts) <= 2 else None


def iter_tasks(sdist: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(task name, parsed task.json) for every JSON task in the tarball, in archive order."""
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            name = _task_name(member.name)
            if name is None or not member.isfile():
                continue
            f = tf.extractfile(member)
            if f is None:
                continue
            try:
                yield name, json.load(f)
            except json.JSONDecodeError as e:
                log.warning("skipping %s: invalid JSON (%s)", name, e)


def with_examples(tasks: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, tuple[str, ...], list[Example]]]:
    """(name, keywords, examples) per task.json; a subtask without keywords takes its parent's."""
    parents: dict[str, tuple[str, ...]] = {}
    for name, task in tasks:
        keywords = tuple(task.get("keywords", ())) or parents.get(name.split(":")[0], ())
        if ":" not in name:
            parents[name] = keywords
        yield name, keywords, parse_task(task, name)


def iter_checkout(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(task name, parsed task.json) for every JSON task of a checkout, parents before their subtasks."""
    root = checkout_tasks(path)
    for f in sorted(root.rglob("task.json"), key=lambda p: (len(p.relative_to(root).parts), str(p))):
        name = _task_name(TASKS_ROOT + f.relative_to(root).as_posix())
        if name is None:
            continue
        try:
            yield name, json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("skipping %s: invalid JSON (%s)", f, e)


def checkout_tasks(path: Path) -> Path:
    """``path``'s ``bigbench/benchmark_tasks`` folder (``path`` may also be that folder itself)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"bigbench: data.path {path} is not a directory (give a checkout of the BIG-bench repository)")
    for root in (path / TASKS_ROOT, path / "benchmark_tasks", path):
        if root.is_dir() and next(root.glob("*/task.json"), None) is not None:
            return root
    raise DataError(
        f"bigbench: {path} holds no {TASKS_ROOT}<task>/task.json (a checkout of the official BIG-bench repository "
        "has them)"
    )


def _checkout_key(path: Path) -> str:
    """Another checkout, or the same one changed (files added, removed, edited), gets another index."""
    root = checkout_tasks(path)
    h = hashlib.sha256(os.fspath(root.resolve()).encode())
    for f in sorted(root.rglob("task.json")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def open_index(cache: str | os.PathLike[str] | None = None, path: str | os.PathLike[str] | None = None) -> TaskIndex:
    """The index of a checkout (``path``) or of the sdist in the cache, built on first use; no download."""
    base = index_root(cache, "bigbench")
    if path:
        key = _checkout_key(Path(path))
        root = base / f"checkout-{key}"
        provenance = {"source": "bigbench", "checkout": os.fspath(Path(path).expanduser().resolve())}
        return TaskIndex.open_or_build(
            root,
            lambda out: build_index(with_examples(iter_checkout(Path(path))), out, provenance=provenance),
            f"the BIG-bench checkout {path}",
        )
    sdist = cache_dir(cache) / "bigbench" / SDIST  # where earlier fedrank versions downloaded it
    root = base / "sdist-index"
    if not (root / "index.json").is_file() and not sdist.is_file():
        raise DataError(
            f"bigbench: {UNAVAILABLE}; give data.path = a checkout of github.com/google/BIG-bench, or place "
            f"{SDIST} at {sdist}, or use data.source = 'evals' (the default)"
        )
    provenance = {"source": "bigbench", "artifact": SDIST, "version": "1.0.0", "licenses": "Apache-2.0"}

    def build(out: Path) -> None:
        try:
            build_index(with_examples(iter_tasks(sdist)), out, provenance={**provenance, "sha256": _sha256(sdist)})
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"bigbench: {sdist} is not a readable {SDIST} ({e}); remove it or place a good copy") from e

    return TaskIndex.open_or_build(root, build, f"the BIG-bench sdist {sdist}")


def _sha256(path: Path) -> str:
    from fedrank.data.artifacts import sha256_of

    return sha256_of(path)


def bigbench_store(
    cache: str | os.PathLike[str] | None = None, path: str | os.PathLike[str] | None = None
) -> IndexStore:
    return IndexStore(open_index(cache, path))
