"""Clients of a federation: who holds which examples, materialised only when sampled.

Partitions (FlexLoRA §4.1 is (a)):

* ``task``: one task per client; a disjoint set of held-out *unseen* tasks is kept for evaluation
  (chosen by seed, or every task carrying one of ``eval_keywords``). With more clients than training
  tasks, client k holds task k mod T and clients sharing a task hold disjoint shards of it. No library
  offers this one; it is fedrank's own.
* ``dirichlet``: flwr-datasets' ``DirichletPartitioner(partition_by="task")``: for each training task
  (its "class") proportions p ~ Dirichlet(α·1_K) over the K clients, and the task's examples (in a seeded
  order) cut at the cumulative proportions. Small α concentrates each task on few clients (the total
  concentration is α·K, so with many clients α must be small for clients to hold few tasks).
* ``iid``: flwr-datasets' ``IidPartitioner``: every training example, in a seeded order, cut into K equal
  contiguous shards (sizes differ by at most one).
* ``natural``: flwr-datasets' ``NaturalIdPartitioner(partition_by="client")``: each distinct value of the
  data's ``client`` column is one client (client k = the k-th id in sorted order: numeric when the ids are
  integers), so ``num_clients`` must equal the number of distinct ids. Partitions are built over every row of
  the store, then rows of tasks that do not train (held out, skipped, outside ``tasks``) are dropped, so a
  client keeps its number when the held-out draw changes (and may be left with no training data).

How flwr-datasets' Dirichlet differs from the rule fedrank had before it (counts ~ Multinomial(n_t, p_t) per
task, with p_t ~ Dirichlet(α·1_K); empty clients allowed). The proportions are the same distribution, but:
(1) a task's n_t examples are cut at ``floor(cumsum(p_t)·n_t)`` instead of sampled multinomially (no sampling
noise on top of p_t); (2) ``min_partition_size``: when any client ends with fewer examples than that, *all*
proportions are redrawn, at most 10 times, then it fails; fedrank sets it to what a client needs (1 train
example, plus 1 test example when ``test_fraction > 0``), checks first that N ≥ K·that, and turns the
library's "max number of attempts" into an error naming α, K and N; (3) ``self_balancing`` (a client above
the average size N/K gets no share of later tasks) is off: it would make a client's tasks depend on the order
of tasks, which the old rule did not; (4) the draws come from the library's own generator seeded with
``partition.seed``, so the same seed gives different partitions than before this change (and the same ones
every time since).

Unseen means unseen: BIG-bench has ~1,000 tasks but most are subtasks (``parent:sub``) of a few dozen
parent tasks, and siblings are near-copies (``mult_data_wrangling:convert_1_units_2`` vs ``..._4_times_2``).
With ``holdout = "family"`` (the default) a held-out task's whole family (the name before ``:``) is kept
out of training, for every partition kind; ``num_eval_tasks`` families are drawn and one task of each is
evaluated. ``holdout = "task"`` is the old behaviour, named as such: only the exact task names are held
out and their siblings may train.

Every client's examples are split into train/test by a seeded shuffle; n_k (the server's weight) is the
train size, known without loading anything. The library partitions a light Arrow table of (task, row) with
one row per training example, never the examples themselves; the Federation then keeps each client's row
numbers as one int64 array (8 bytes per training example; for ``task`` only per-task boundaries), so
thousands of registered clients cost what the sampled ones cost.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrank.data.examples import Example
from fedrank.data.files import CLIENT_COLUMN, offline_datasets
from fedrank.data.store import ClientColumn, TaskStore

log = logging.getLogger(__name__)

PARTITIONS = ("task", "dirichlet", "iid", "natural")
HOLDOUTS = ("family", "task")


def family(task: str) -> str:
    """A task's family: its parent task (``parent:sub`` -> ``parent``), or the task itself."""
    return task.split(":", 1)[0]


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = "task"
    """"task" (one task per client), "dirichlet" / "iid" (flwr-datasets' partitioners over the training
    examples) or "natural" (one client per distinct id in the data's ``client`` column)."""
    num_clients: int = 40
    """Registered clients ("natural": must equal the number of distinct client ids)."""
    num_eval_tasks: int = 4
    holdout: str = "family"
    """"family": held-out tasks' whole families are kept out of training; "task": only the exact tasks
    (siblings of a held-out subtask may train: the old behaviour, not truly unseen)."""
    eval_keywords: tuple[str, ...] = ()
    """Held-out tasks by keyword instead of by seed: every task carrying one is kept out of training (with its
    family), and ``num_eval_tasks`` of them (a seeded choice; 0 = all) are evaluated."""
    tasks: tuple[str, ...] = ()
    """Restrict the pool to these tasks (empty: every task with enough examples)."""
    dirichlet_alpha: float = 0.5
    """Concentration of each task's Dirichlet(α·1_K) proportions over the clients (smaller: fewer holders)."""
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


def client_data(client_id: int, tasks: tuple[str, ...], examples: list[Example], cfg: PartitionConfig) -> ClientData:
    """A client's examples shuffled (seeded by ``cfg.seed`` and the client), capped at
    ``max_examples_per_client`` and split into train/test by ``test_fraction``."""
    rng = np.random.default_rng([cfg.seed, 11, client_id])
    parts = [examples[i] for i in rng.permutation(len(examples))]
    if cfg.max_examples_per_client:
        parts = parts[: cfg.max_examples_per_client]
    k = _split(len(parts), cfg.test_fraction)
    return ClientData(client_id, tasks, parts[k:], parts[:k])


class Federation:
    """Registered clients over a :class:`TaskStore`, plus the held-out evaluation tasks."""

    def __init__(self, store: TaskStore, cfg: PartitionConfig):
        self.store, self.cfg = store, cfg
        rng = np.random.default_rng(cfg.seed)
        pool = list(cfg.tasks) if cfg.tasks else store.task_names()
        known = set(store.task_names())
        missing = [t for t in pool if t not in known]
        if missing:
            hints = {t: difflib.get_close_matches(t, sorted(known), n=3) for t in missing[:5]}
            near = "; ".join(f"{t!r}: did you mean {', '.join(h)}?" for t, h in hints.items() if h)
            raise ValueError(
                f"partition.tasks: unknown task(s) {missing[:5]}; the data offers {len(known)} tasks "
                f"(fedrank data info SOURCE --tasks lists them){'; ' + near if near else ''}"
            )
        small = [t for t in pool if store.count(t) < cfg.min_examples]
        if small:
            log.info("skipped %d task(s) with fewer than %d examples", len(small), cfg.min_examples)
        self.skipped = {t: f"fewer than {cfg.min_examples} examples ({store.count(t)})" for t in small}
        pool = [t for t in pool if t not in self.skipped]
        self.eval_tasks = self._choose_eval(pool, rng)
        # with eval_keywords, every task carrying one is held out, also those beyond num_eval_tasks' cap
        held_tasks = self._keyword_tasks(pool) if cfg.eval_keywords else self.eval_tasks
        if cfg.holdout == "family":
            self.held_out = sorted({family(t) for t in held_tasks})
            held = set(self.held_out)
            train = [t for t in pool if family(t) not in held]
        else:
            self.held_out = sorted(held_tasks)
            train = [t for t in pool if t not in set(held_tasks)]
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
        self.natural_ids: list[int] | list[str] | None = None
        """``natural``: client k's id in the data's ``client`` column."""
        self._rows: np.ndarray | None = None
        self._starts: np.ndarray | None = None
        if cfg.kind == "task":
            self.train_tasks = self.train_tasks[: cfg.num_clients]
            self._check_task_shards()
        else:
            self._task_starts = np.cumsum([0] + [store.count(t) for t in self.train_tasks])
            self._partition()

    def _check_task_shards(self) -> None:
        """``task``: client k holds shard k // T of task k mod T (T training tasks), so a task of n examples
        shared by more than n clients leaves some of them nothing to train on: refused before training."""
        K, T = self.cfg.num_clients, len(self.train_tasks)
        counts = [self.store.count(t) for t in self.train_tasks]
        fits = min(i + n * T for i, n in enumerate(counts))  # the most clients whose shards all hold an example
        if fits < K:
            i = next(i for i, n in enumerate(counts) if len(range(i, K, T)) > n)
            raise ValueError(
                f"partition.kind 'task': partition.num_clients = {K} clients share {T} training task(s) "
                f"({sum(counts)} training examples); task {self.train_tasks[i]!r} has {counts[i]} example(s) for "
                f"{len(range(i, K, T))} clients, so some clients would hold none and every round would skip them. "
                f"Lower partition.num_clients to at most {fits}"
            )

    def _choose_eval(self, pool: list[str], rng: np.random.Generator) -> list[str]:
        cfg = self.cfg
        if cfg.eval_keywords:
            chosen = self._keyword_tasks(pool)
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

    def _keyword_tasks(self, pool: list[str]) -> list[str]:
        return [t for t in pool if set(self.store.keywords(t)) & set(self.cfg.eval_keywords)]

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """The (task, row) table to partition, one entry per training example: task = index into
        ``train_tasks``, rows of each task in a seeded order (the library cuts a task's rows in table order)."""
        counts = np.diff(self._task_starts)
        task = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        row = np.concatenate([self._order(t, n) for t, n in zip(self.train_tasks, counts.tolist(), strict=True)])
        return task, row

    def _order(self, task: str, n: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, 7, zlib.crc32(task.encode())]).permutation(n)

    def _partition(self) -> None:
        """Each client's training examples, with flwr-datasets' partitioners (see the module docstring)."""
        offline_datasets()
        from datasets import Dataset
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

        cfg, K = self.cfg, self.cfg.num_clients
        need = 2 if cfg.test_fraction > 0 else 1  # a client needs one training example (and one test example)
        if cfg.kind == "natural":
            table, train_of = self._natural_index()
        else:
            task, row = self._index()
            if len(task) < K * need:
                raise ValueError(
                    f"partition.kind {cfg.kind!r}: {len(task)} training examples cannot give each of the "
                    f"{K} clients {need}; lower partition.num_clients"
                )
            if cfg.kind == "iid":
                order = np.random.default_rng([cfg.seed, 17]).permutation(len(task))
                task, row = task[order], row[order]
            table = {"task": task, "row": row}
            train_of = np.arange(len(self.train_tasks))
        dataset = Dataset.from_dict(table).with_format("arrow")  # arrow: columns read as arrays, not row by row
        partitioner: Partitioner
        if cfg.kind == "dirichlet":
            partitioner = DirichletPartitioner(
                num_partitions=K,
                partition_by="task",
                alpha=float(cfg.dirichlet_alpha),
                min_partition_size=need,
                self_balancing=False,
                shuffle=True,
                seed=cfg.seed,
            )
        elif cfg.kind == "iid":
            partitioner = IidPartitioner(num_partitions=K)
        else:
            partitioner = NaturalIdPartitioner(partition_by=CLIENT_COLUMN)
        partitioner.dataset = dataset
        with warnings.catch_warnings(record=True) as redraws, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")  # the library warns on every redraw; one log line says how many
            try:
                parts = [partitioner.load_partition(k) for k in range(K)]
            except ValueError as e:
                if cfg.kind != "dirichlet":
                    raise
                raise ValueError(
                    f"partition.kind 'dirichlet': every draw from Dirichlet(alpha={cfg.dirichlet_alpha}) over {K} "
                    f"clients left a client with fewer than {need} of the {len(dataset)} training examples "
                    f"({len(self.train_tasks)} tasks), also after 10 redraws (flwr-datasets: {e}); raise "
                    "partition.dirichlet_alpha (more even splits) or lower partition.num_clients"
                ) from e
        if redraws:
            log.info("dirichlet partition: %d redraw(s) until every client held >= %d examples", len(redraws), need)
        if cfg.kind == "natural":
            assert isinstance(partitioner, NaturalIdPartitioner)
            self.natural_ids = [partitioner.partition_id_to_natural_id[k] for k in range(K)]
        rows, starts = [], [0]
        for part in parts:
            t = train_of[part["task"].to_numpy()]
            r = part["row"].to_numpy()
            keep = t >= 0
            rows.append(self._task_starts[t[keep]] + r[keep])
            starts.append(starts[-1] + int(keep.sum()))
        self._rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        empty = int((np.diff(self._starts) == 0).sum())
        if empty:
            log.info("%d of %d clients hold no training examples", empty, K)

    def _natural_index(self) -> tuple[dict[str, Any], np.ndarray]:
        """Every row of the store with its client id; ``train_of[code]``: the task's index in ``train_tasks``
        (-1: the task does not train)."""
        store, cfg = self.store, self.cfg
        if not isinstance(store, ClientColumn):
            raise ValueError(
                f"partition.kind 'natural' needs a {CLIENT_COLUMN!r} column: use data.source = 'files' with a "
                f"{CLIENT_COLUMN!r} column in the files (this data source has none)"
            )
        names = store.task_names()
        clients: list[Any] = []
        for name in names:
            ids = store.client_ids(name)
            if ids is None:
                raise ValueError(
                    f"partition.kind 'natural' needs a {CLIENT_COLUMN!r} column in the data files: each row "
                    "names the client holding it"
                )
            clients.extend(ids)
        distinct = len(set(clients))
        if distinct != cfg.num_clients:
            raise ValueError(
                f"partition.kind 'natural': the data has {distinct} distinct {CLIENT_COLUMN!r} ids, but "
                f"partition.num_clients = {cfg.num_clients}; set partition.num_clients = {distinct}"
            )
        counts = [store.count(t) for t in names]
        position = {t: i for i, t in enumerate(self.train_tasks)}
        table = {
            "task": np.repeat(np.arange(len(names), dtype=np.int32), counts),
            "row": np.concatenate([np.arange(n, dtype=np.int64) for n in counts]),
            CLIENT_COLUMN: clients,
        }
        return table, np.asarray([position.get(t, -1) for t in names], dtype=np.int64)

    @property
    def num_clients(self) -> int:
        return self.cfg.num_clients

    def _shard(self, client_id: int) -> tuple[str, int, int]:
        """``task`` partition: (task, start, stop) of the task's seeded example order held by ``client_id``;
        with more clients than tasks, clients sharing a task hold disjoint shards of it."""
        T = len(self.train_tasks)
        task = self.train_tasks[client_id % T]
        shards = len(range(client_id % T, self.num_clients, T))
        s, n = client_id // T, self.store.count(task)
        return task, n * s // shards, n * (s + 1) // shards

    def _check(self, client_id: int) -> None:
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} is not registered (0..{self.num_clients - 1})")

    def _holdings(self, client_id: int) -> list[tuple[str, np.ndarray]]:
        """(task, example indices into ``store.examples(task)``) held by ``client_id``, in ``train_tasks`` order."""
        self._check(client_id)
        if self._rows is None or self._starts is None:
            task, start, stop = self._shard(client_id)
            return [(task, self._order(task, self.store.count(task))[start:stop])]
        gids = self._rows[self._starts[client_id] : self._starts[client_id + 1]]
        t = np.searchsorted(self._task_starts, gids, side="right") - 1
        return [(self.train_tasks[int(i)], gids[t == i] - self._task_starts[i]) for i in np.unique(t)]

    def _total(self, client_id: int) -> int:
        self._check(client_id)
        if self._starts is None:
            _, start, stop = self._shard(client_id)
            n = stop - start
        else:
            n = int(self._starts[client_id + 1] - self._starts[client_id])
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
        if self._starts is None:
            self._check(client_id)
            return (self._shard(client_id)[0],)
        return tuple(task for task, _ in self._holdings(client_id))

    def client(self, client_id: int) -> ClientData:
        """Materialise one client's train/test examples (seeded, identical on every call)."""
        parts: list[Example] = []
        tasks = []
        for task, rows in self._holdings(client_id):
            ex = self.store.examples(task)
            parts.extend(ex[i] for i in rows.tolist())
            tasks.append(task)
        return client_data(client_id, tuple(tasks), parts, self.cfg)

    def eval_examples(self, task: str) -> list[Example]:
        """Up to ``max_eval_examples`` examples of a held-out task (seeded subset)."""
        ex = self.store.examples(task)
        n = self.cfg.max_eval_examples
        if n and len(ex) > n:
            idx = np.random.default_rng([self.cfg.seed, 13]).permutation(len(ex))[:n]
            return [ex[i] for i in sorted(idx)]
        return list(ex)
