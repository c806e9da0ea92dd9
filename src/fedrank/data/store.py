"""Task stores: named tasks whose examples load on demand (BIG-bench, users' JSONL)."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from fedrank.data.bigbench import BigBench
from fedrank.data.examples import Example

log = logging.getLogger(__name__)


class TaskStore(Protocol):
    """Named tasks, each with a known example count and examples loaded on demand."""

    def task_names(self) -> list[str]: ...

    def count(self, task: str) -> int: ...

    def keywords(self, task: str) -> tuple[str, ...]: ...

    def examples(self, task: str) -> list[Example]: ...


class BigBenchStore:
    """:class:`TaskStore` over the local BIG-bench index, with a small LRU cache of loaded tasks."""

    def __init__(self, bench: BigBench, cache_tasks: int = 32):
        self.bench = bench
        self._cache: OrderedDict[str, list[Example]] = OrderedDict()
        self._cache_tasks = cache_tasks

    def task_names(self) -> list[str]:
        return sorted(self.bench.tasks)

    def count(self, task: str) -> int:
        return self.bench.tasks[task].cached_examples

    def keywords(self, task: str) -> tuple[str, ...]:
        return self.bench.tasks[task].keywords

    def examples(self, task: str) -> list[Example]:
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        ex = self.bench.examples(task)
        self._cache[task] = ex
        if len(self._cache) > self._cache_tasks:
            self._cache.popitem(last=False)
        return ex


class InMemoryStore:
    """:class:`TaskStore` over examples already in memory (users' JSONL, tests)."""

    def __init__(self, tasks: dict[str, list[Example]], keywords: dict[str, tuple[str, ...]] | None = None):
        self.tasks = tasks
        self._keywords = keywords or {}

    def task_names(self) -> list[str]:
        return sorted(self.tasks)

    def count(self, task: str) -> int:
        return len(self.tasks[task])

    def keywords(self, task: str) -> tuple[str, ...]:
        return self._keywords.get(task, ())

    def examples(self, task: str) -> list[Example]:
        return self.tasks[task]


def read_jsonl(paths: Sequence[str | Path], group_by: str = "client") -> InMemoryStore:
    """Users' data: JSONL records {"instruction", "input", "output"} grouped into tasks by ``group_by``.

    One file per client works too: records without the field take the file's stem as their group.
    The prompt is the instruction, then the input after a blank line when there is one.
    """
    tasks: dict[str, list[Example]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    instruction, output = str(rec["instruction"]), str(rec["output"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{lineno}: expected a JSON object with 'instruction' and 'output' "
                        f"(and optional 'input', '{group_by}'): {e}"
                    ) from e
                extra = str(rec.get("input") or "")
                prompt = instruction + ("\n\n" + extra if extra else "")
                group = str(rec.get(group_by, path.stem))
                tasks.setdefault(group, []).append(Example(prompt, output, (output,), task=group))
    if not tasks:
        raise ValueError(f"no records in {[str(p) for p in paths]}")
    return InMemoryStore(tasks)
