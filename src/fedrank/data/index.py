"""A source's tasks indexed once on disk: ``index.json`` (each task's name, keywords, size and kind, plus the
source's provenance) and one gzipped JSONL file of normalised examples per task, so later runs read only the
tasks they use.

Every source that reads an archive or a checkout (BIG-bench, evals, the benchmark suites, Natural
Instructions) writes through :func:`build_index` and reads through :class:`TaskIndex` / :class:`IndexStore`.
An index is built in a temporary sibling folder and renamed into place in one step, so a build that is killed
(kill -9, a full disk) leaves no half-written index behind: the next run builds it again.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedrank.data.examples import Example
from fedrank.untrusted import DataError as DataError  # re-exported: the data sources raise it

log = logging.getLogger(__name__)

INDEX_VERSION = 3
"""3: examples keep their chat messages and their source's scoring rule; the index records its provenance."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    keywords: tuple[str, ...]
    num_examples: int
    """Examples in the source (the index keeps at most ``max_examples`` of them)."""
    kind: str
    """"multiple_choice" or "generative"."""
    cached_examples: int
    prompt_chars: int = 0
    """The median prompt length in characters (of the examples kept)."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$FEDRANK_CACHE``, else ``~/.cache/fedrank``."""
    if override is not None:
        return Path(override).expanduser()
    return Path(os.environ.get("FEDRANK_CACHE", "~/.cache/fedrank")).expanduser()


def index_root(cache: str | os.PathLike[str] | None, source: str) -> Path:
    """The folder holding a source's indexes: ``<cache>/data/<source>``."""
    return cache_dir(cache) / "data" / source


def file_name(task: str) -> str:
    """A task's file name in the index (``:`` and ``/`` are not safe in every file system)."""
    return task.replace(":", "__").replace("/", "_")


def build_index(
    tasks: Iterable[tuple[str, tuple[str, ...], list[Example]]],
    out_dir: Path,
    max_examples: int = 2000,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> list[TaskInfo]:
    """Write ``out_dir/index.json`` and ``out_dir/tasks/<name>.jsonl.gz`` from (name, keywords, examples).

    At most ``max_examples`` per task are kept (a seeded subset); tasks without examples are left out. The
    folder is built beside ``out_dir`` and renamed into place, so ``out_dir`` is either absent or whole."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-{os.getpid()}-", dir=out_dir.parent))
    try:
        (tmp / "tasks").mkdir()
        infos = []
        files: set[str] = set()
        for name, keywords, examples in tasks:
            if not examples:
                continue
            if file_name(name) in files:
                raise DataError(f"task {name!r} appears twice in the source (or under another spelling)")
            files.add(file_name(name))
            total = len(examples)
            if total > max_examples:
                examples = random.Random(f"{seed}:{name}").sample(examples, max_examples)
            mc = sum(e.is_multiple_choice for e in examples)
            kind = "multiple_choice" if mc * 2 >= len(examples) else "generative"
            path = tmp / "tasks" / f"{file_name(name)}.jsonl.gz"
            with gzip.open(path, "wt", compresslevel=1, encoding="utf-8") as f:  # level 9: 43 s, not 26 s, for evals
                for e in examples:
                    f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
            chars = int(statistics.median(len(e.prompt) for e in examples))
            infos.append(TaskInfo(name, tuple(keywords), total, kind, len(examples), chars))
        index = {
            "version": INDEX_VERSION,
            "max_examples": max_examples,
            "provenance": provenance or {},
            "tasks": [asdict(i) for i in infos],
        }
        (tmp / "index.json").write_text(json.dumps(index, ensure_ascii=False))
        if out_dir.exists():  # a stale or damaged index (no index.json): replaced whole
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return infos


def clean_partial_builds(parent: Path, pattern: str = ".*.building-*") -> None:
    """Remove what killed builds (or downloads) left in ``parent``: temporary folders named with a process id
    (``...-<pid>-...``) that no longer runs; another process's build under way is left alone."""
    if not parent.is_dir():
        return
    for p in parent.glob(pattern):
        pid = next((int(part) for part in p.name.split("-")[1:] if part.isdigit()), None)
        if pid is None or not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process builds one index at a time: a folder of its own is an abandoned one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TaskIndex:
    """An index on disk: task metadata and provenance, and examples loaded per task on demand."""

    def __init__(self, root: Path, infos: list[TaskInfo], provenance: dict[str, Any] | None = None):
        self.root = root
        self.tasks = {i.name: i for i in infos}
        self.provenance = provenance or {}

    @classmethod
    def from_dir(cls, root: Path) -> TaskIndex:
        data = json.loads((root / "index.json").read_text(encoding="utf-8"))
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"index layout {data.get('version')!r}, this fedrank writes {INDEX_VERSION}")
        infos = [TaskInfo(**{**t, "keywords": tuple(t["keywords"])}) for t in data["tasks"]]
        return cls(root, infos, data.get("provenance", {}))

    @classmethod
    def open_or_build(
        cls, root: Path, build: Callable[[Path], object], what: str, max_examples: int = 2000
    ) -> TaskIndex:
        """The index at ``root``; built first by ``build(root)`` when absent or unreadable."""
        index = root / "index.json"
        if index.is_file():
            try:
                return cls.from_dir(root)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("the %s index at %s is unusable (%s); building it again", what, root, e)
        clean_partial_builds(root.parent)
        log.info("indexing %s into %s (once)", what, root)
        build(root)
        return cls.from_dir(root)

    def examples(self, task: str) -> list[Example]:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}")
        with gzip.open(self.root / "tasks" / f"{file_name(task)}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [Example.from_json(json.loads(line)) for line in f]


class IndexStore:
    """:class:`fedrank.data.store.TaskStore` over a :class:`TaskIndex`, with a small LRU cache of loaded tasks.

    ``cache_tasks``: tasks kept loaded. Reading a task back from the index takes 1 ms (median; 28 ms at most,
    40 quickstart clients, warm page cache), while 32 kept tasks held 49 MB and 4 held 7 MB (the quickstart's
    tasks, after garbage collection): a run touches a client's task about once a round, so keeping many
    buys nothing. ``tasks``: the tasks to offer (None: all of the index's); ``transform``: applied to every
    loaded example (e.g. the prompt format)."""

    def __init__(
        self,
        index: TaskIndex,
        cache_tasks: int = 4,
        tasks: Iterable[str] | None = None,
        transform: Callable[[Example], Example] | None = None,
    ):
        self.index = index
        self._names = sorted(index.tasks if tasks is None else tasks)
        self._cache: OrderedDict[str, list[Example]] = OrderedDict()
        self._cache_tasks = cache_tasks
        self._transform = transform

    @property
    def provenance(self) -> dict[str, Any]:
        return self.index.provenance

    def task_names(self) -> list[str]:
        return list(self._names)

    def count(self, task: str) -> int:
        return self.index.tasks[task].cached_examples

    def keywords(self, task: str) -> tuple[str, ...]:
        return self.index.tasks[task].keywords

    def examples(self, task: str) -> list[Example]:
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        ex = self.index.examples(task)
        if self._transform is not None:
            ex = [self._transform(e) for e in ex]
        self._cache[task] = ex
        if len(self._cache) > self._cache_tasks:
            self._cache.popitem(last=False)
        return ex
