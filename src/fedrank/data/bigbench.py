"""BIG-bench tasks read straight from the ``bigbench==1.0.0`` source distribution on PyPI.

The sdist (358 MB) holds ~1,000 ``task.json`` files. It is fetched once with
``pip download --no-deps --no-binary :all: bigbench==1.0.0`` into the cache directory
(``~/.cache/fedrank``, or ``$FEDRANK_CACHE``, or the ``cache_dir`` argument) and never pip-installed.
One pass over the tarball builds a compact local index (name, keywords, number of examples, generative or
multiple choice) and one gzipped JSONL file of normalised examples per task, so later runs read only the
tasks they use.

Formatting follows BIG-bench's JSON task rules: prompt = task_prefix + example_input_prefix + input
(+ choice_prefix + each option when ``append_choices_to_input``, the default) + example_output_prefix.
``target`` may be a string or a list (all are references); ``target_scores`` makes an example multiple
choice (every option keeps its score: the credit for choosing it; the highest-scored option is the
answer). A task whose examples live in subtasks becomes one task per subtask, named ``parent:subtask``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedrank.data.examples import Example

log = logging.getLogger(__name__)

SDIST = "bigbench-1.0.0.tar.gz"
INDEX_VERSION = 2
"""2: multiple-choice examples keep every option's target score."""
TASKS_ROOT = "bigbench/benchmark_tasks/"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    keywords: tuple[str, ...]
    num_examples: int
    """Examples in the task.json (the cache keeps at most ``max_examples`` of them)."""
    kind: str
    """"multiple_choice" or "generative"."""
    cached_examples: int


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$FEDRANK_CACHE``, else ``~/.cache/fedrank``."""
    if override is not None:
        return Path(override).expanduser()
    return Path(os.environ.get("FEDRANK_CACHE", "~/.cache/fedrank")).expanduser()


def sdist_path(root: Path, download: bool = True) -> Path:
    """The bigbench sdist in ``root/bigbench``, fetched from PyPI with pip on first use."""
    target = root / "bigbench"
    path = target / SDIST
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(f"{path} is missing; run once with downloads allowed or place {SDIST} there")
    target.mkdir(parents=True, exist_ok=True)
    log.info("downloading the bigbench==1.0.0 sdist (358 MB, once) into %s", target)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0"]
    # into a temporary folder first: an interrupted download never leaves a truncated tarball behind
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        subprocess.run([*cmd, "-d", tmp], check=True)
        got = Path(tmp) / SDIST
        if not got.is_file():
            raise FileNotFoundError(f"pip download finished but {got.name} is not there")
        got.replace(path)
    return path


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


def build_index(
    tasks: Iterable[tuple[str, dict[str, Any]]], out_dir: Path, max_examples: int = 2000, seed: int = 0
) -> list[TaskInfo]:
    """Write ``index.json`` and ``tasks/<name>.jsonl.gz`` (at most ``max_examples`` each, seeded subset)."""
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    infos = []
    parents: dict[str, tuple[str, ...]] = {}
    for name, task in tasks:
        keywords = tuple(task.get("keywords", ())) or parents.get(name.split(":")[0], ())
        if ":" not in name:
            parents[name] = keywords
        examples = parse_task(task, name)
        if not examples:
            continue
        total = len(examples)
        if total > max_examples:
            examples = random.Random(f"{seed}:{name}").sample(examples, max_examples)
        mc = sum(e.is_multiple_choice for e in examples)
        kind = "multiple_choice" if mc * 2 >= len(examples) else "generative"
        with gzip.open(out_dir / "tasks" / f"{_file_name(name)}.jsonl.gz", "wt", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps(e.to_json()) + "\n")
        infos.append(TaskInfo(name, keywords, total, kind, len(examples)))
    index = {"version": INDEX_VERSION, "max_examples": max_examples, "tasks": [asdict(i) for i in infos]}
    tmp = out_dir / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(out_dir / "index.json")
    return infos


def _file_name(task: str) -> str:
    return task.replace(":", "__").replace("/", "_")


class BigBench:
    """The local BIG-bench index: task metadata, and examples loaded per task on demand."""

    def __init__(self, root: Path, infos: list[TaskInfo]):
        self.root = root
        self.tasks = {i.name: i for i in infos}

    @classmethod
    def open(cls, cache: str | os.PathLike[str] | None = None, download: bool = True) -> BigBench:
        """The index under the cache directory, built on first use (one pass over the tarball)."""
        root = cache_dir(cache) / "bigbench" / f"index-v{INDEX_VERSION}"
        index = root / "index.json"
        if not index.is_file():
            sdist = sdist_path(cache_dir(cache), download)
            log.info("building the BIG-bench index from %s (once)", sdist)
            build_index(iter_tasks(sdist), root)
        data = json.loads(index.read_text())
        infos = [TaskInfo(**{**t, "keywords": tuple(t["keywords"])}) for t in data["tasks"]]
        return cls(root, infos)

    @classmethod
    def from_dir(cls, root: Path) -> BigBench:
        data = json.loads((root / "index.json").read_text())
        return cls(root, [TaskInfo(**{**t, "keywords": tuple(t["keywords"])}) for t in data["tasks"]])

    def examples(self, task: str) -> list[Example]:
        if task not in self.tasks:
            raise KeyError(f"unknown BIG-bench task {task!r}")
        with gzip.open(self.root / "tasks" / f"{_file_name(task)}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [Example.from_json(json.loads(line)) for line in f]
