"""Clients of a federation: who holds which examples, materialised only when sampled.

Partitions (FlexLoRA §4.1 is (a)):

* ``task``: one task per client; a disjoint set of held-out *unseen* tasks is kept for evaluation
  (chosen by seed, or every task carrying one of ``eval_keywords``). With more clients than training
  tasks, client k holds task k mod T and clients sharing a task hold disjoint shards of it.

Unseen means unseen: BIG-bench has ~1,000 tasks but most are subtasks (``parent:sub``) of a few dozen
parent tasks, and siblings are near-copies (``mult_data_wrangling:convert_1_units_2`` vs ``..._4_times_2``).
With ``holdout = "family"`` (the default) a held-out task's whole family (the name before ``:``) is kept
out of training, for every partition kind; ``num_eval_tasks`` families are drawn and one task of each is
evaluated. ``holdout = "task"`` is the old behaviour, named as such: only the exact task names are held
out and their siblings may train.
* ``dirichlet``: each training task's examples are split over the clients by proportions drawn from
  Dirichlet(α·1_K): small α concentrates each task on few clients (the total concentration is α·K, so
  with many clients α must be small for clients to hold few tasks).
* ``iid``: each training task's examples are split uniformly at random over the clients.

Every client's examples are split into train/test by a seeded shuffle; n_k (the server's weight) is the
train size, known without loading anything. Memory holds per-task boundaries only, never the clients'
examples, so thousands of registered clients cost what the sampled ones cost.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from fedrank.data.examples import Example
from fedrank.data.store import TaskStore

log = logging.getLogger(__name__)

PARTITIONS = ("task", "dirichlet", "iid")
HOLDOUTS = ("family", "task")


def family(task: str) -> str:
    """A task's family: its parent task (``parent:sub`` -> ``parent``), or the task itself."""
    return task.split(":", 1)[0]


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = "task"
    num_clients: int = 40
    """Registered clients."""
    num_eval_tasks: int = 4
    holdout: str = "family"
    """"family": held-out tasks' whole families are kept out of training; "task": only the exact tasks
    (siblings of a held-out subtask may train: the old behaviour, not truly unseen)."""
    eval_keywords: tuple[str, ...] = ()
    """Held-out tasks by keyword instead of by seed (``num_eval_tasks`` then caps their number; 0 = all)."""
    tasks: tuple[str, ...] = ()
    """Restrict the pool to these tasks (empty: every task with enough examples)."""
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    min_examples: int = 20
    max_examples_per_client: int = 0
    """Cap on a client's examples before the train/test split (0 = no cap)."""
    max_eval_examples: int = 50
    """Examples per held-out task used for evaluation."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PARTITIONS:
            raise ValueError(f"unknown partition {self.kind!r}; choices: {', '.join(PARTITIONS)}")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"unknown partition holdout {self.holdout!r}; choices: {', '.join(HOLDOUTS)}")
        if self.num_eval_tasks < 0 or self.min_examples < 0 or self.max_eval_examples < 0:
            raise ValueError("num_eval_tasks, min_examples and max_eval_examples must be >= 0")
        if self.num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {self.num_clients}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be positive, got {self.dirichlet_alpha}")


@dataclass(frozen=True)
class ClientData:
    client_id: int
    tasks: tuple[str, ...]
    train: list[Example]
    test: list[Example]


def _split(n: int, test_fraction: float) -> int:
    """Test examples of a client with n examples: round(n·f), at least 1 when f > 0 and n > 1."""
    if test_fraction <= 0 or n <= 1:
        return 0
    return min(n - 1, max(1, round(n * test_fraction)))


class Federation:
    """Registered clients over a :class:`TaskStore`, plus the held-out evaluation tasks."""

    def __init__(self, store: TaskStore, cfg: PartitionConfig):
        self.store, self.cfg = store, cfg
        rng = np.random.default_rng(cfg.seed)
        pool = list(cfg.tasks) if cfg.tasks else store.task_names()
        missing = [t for t in pool if t not in set(store.task_names())]
        if missing:
            raise ValueError(f"unknown task(s) {missing[:5]}; the store has {len(store.task_names())} tasks")
        small = [t for t in pool if store.count(t) < cfg.min_examples]
        if small:
            log.info("skipped %d task(s) with fewer than %d examples", len(small), cfg.min_examples)
        self.skipped = {t: f"fewer than {cfg.min_examples} examples ({store.count(t)})" for t in small}
        pool = [t for t in pool if t not in self.skipped]
        self.eval_tasks = self._choose_eval(pool, rng)
        if cfg.holdout == "family":
            self.held_out = sorted({family(t) for t in self.eval_tasks})
            held = set(self.held_out)
            train = [t for t in pool if family(t) not in held]
        else:
            self.held_out = sorted(self.eval_tasks)
            train = [t for t in pool if t not in set(self.eval_tasks)]
        order = rng.permutation(len(train))
        self.train_tasks = [train[i] for i in order]
        if not self.train_tasks:
            raise ValueError("no training tasks left after skipping small tasks and holding out eval tasks")
        log.info(
            "held out %d task %s (%s): %d task(s) excluded from training, %d evaluated; %d training tasks",
            len(self.held_out),
            "families" if cfg.holdout == "family" else "names",
            ", ".join(self.held_out),
            len(pool) - len(train),
            len(self.eval_tasks),
            len(train),
        )
        if cfg.kind == "task":
            self.train_tasks = self.train_tasks[: cfg.num_clients]
            self._bounds = None
        else:
            self._bounds = self._split_tasks(rng)

    def _choose_eval(self, pool: list[str], rng: np.random.Generator) -> list[str]:
        cfg = self.cfg
        if cfg.eval_keywords:
            chosen = [t for t in pool if set(self.store.keywords(t)) & set(cfg.eval_keywords)]
            if not chosen:
                raise ValueError(f"no task carries any of the eval keywords {list(cfg.eval_keywords)}")
            if cfg.num_eval_tasks:
                chosen = [chosen[i] for i in sorted(rng.permutation(len(chosen))[: cfg.num_eval_tasks])]
            return chosen
        units = sorted({family(t) for t in pool}) if cfg.holdout == "family" else pool
        if cfg.num_eval_tasks >= len(units):
            what = "task families" if cfg.holdout == "family" else "tasks"
            raise ValueError(
                f"{cfg.num_eval_tasks} held-out {what} leave no training task out of {len(units)} usable {what} "
                f"({len(self.skipped)} tasks skipped with fewer than partition.min_examples = {cfg.min_examples} "
                "examples)"
            )
        chosen = [units[i] for i in sorted(rng.permutation(len(units))[: cfg.num_eval_tasks])]
        if cfg.holdout == "task":
            return chosen
        members = {f: [t for t in pool if family(t) == f] for f in chosen}  # one evaluated task per family
        return [members[f][int(rng.integers(len(members[f])))] for f in chosen]

    def _split_tasks(self, rng: np.random.Generator) -> np.ndarray:
        """Per training task, the cumulative example boundaries over clients: shape (T, K + 1)."""
        K = self.cfg.num_clients
        bounds = np.zeros((len(self.train_tasks), K + 1), dtype=np.int64)
        for t, task in enumerate(self.train_tasks):
            n = self.store.count(task)
            if self.cfg.kind == "dirichlet":
                p = rng.dirichlet(np.full(K, self.cfg.dirichlet_alpha))
                counts = rng.multinomial(n, p)
            else:
                counts = rng.multinomial(n, np.full(K, 1.0 / K))
            bounds[t, 1:] = np.cumsum(counts)
        return bounds

    @property
    def num_clients(self) -> int:
        return self.cfg.num_clients

    def _sizes(self, client_id: int) -> list[tuple[str, int, int]]:
        """(task, start, stop) slices of the task's seeded example order held by ``client_id``."""
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} is not registered (0..{self.num_clients - 1})")
        if self._bounds is None:  # one task per client; with more clients than tasks, disjoint shards
            T = len(self.train_tasks)
            task = self.train_tasks[client_id % T]
            shards = len(range(client_id % T, self.num_clients, T))
            s, n = client_id // T, self.store.count(task)
            return [(task, n * s // shards, n * (s + 1) // shards)]
        b = self._bounds
        return [
            (task, int(b[t, client_id]), int(b[t, client_id + 1]))
            for t, task in enumerate(self.train_tasks)
            if b[t, client_id + 1] > b[t, client_id]
        ]

    def _total(self, client_id: int) -> int:
        n = sum(stop - start for _, start, stop in self._sizes(client_id))
        cap = self.cfg.max_examples_per_client
        return min(n, cap) if cap else n

    def num_examples(self, client_id: int) -> int:
        """n_k: the client's training examples (no data is loaded)."""
        n = self._total(client_id)
        return n - _split(n, self.cfg.test_fraction)

    def num_test_examples(self, client_id: int) -> int:
        """The client's test examples (no data is loaded)."""
        return _split(self._total(client_id), self.cfg.test_fraction)

    def client_tasks(self, client_id: int) -> tuple[str, ...]:
        """The tasks the client holds examples of (no data is loaded)."""
        return tuple(task for task, _, _ in self._sizes(client_id))

    def client(self, client_id: int) -> ClientData:
        """Materialise one client's train/test examples (seeded, identical on every call)."""
        parts: list[Example] = []
        tasks = []
        for task, start, stop in self._sizes(client_id):
            ex = self.store.examples(task)
            order = np.random.default_rng([self.cfg.seed, 7, zlib.crc32(task.encode())]).permutation(len(ex))
            parts.extend(ex[i] for i in order[start:stop])
            tasks.append(task)
        rng = np.random.default_rng([self.cfg.seed, 11, client_id])
        parts = [parts[i] for i in rng.permutation(len(parts))]
        if self.cfg.max_examples_per_client:
            parts = parts[: self.cfg.max_examples_per_client]
        k = _split(len(parts), self.cfg.test_fraction)
        return ClientData(client_id, tuple(tasks), parts[k:], parts[:k])

    def eval_examples(self, task: str) -> list[Example]:
        """Up to ``max_eval_examples`` examples of a held-out task (seeded subset)."""
        ex = self.store.examples(task)
        n = self.cfg.max_eval_examples
        if n and len(ex) > n:
            idx = np.random.default_rng([self.cfg.seed, 13]).permutation(len(ex))[:n]
            return [ex[i] for i in sorted(idx)]
        return list(ex)
