"""Task stores: named tasks whose examples load on demand (indexed sources: index.py; users' files: files.py;
here, the protocol and examples in memory)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from fedrank.data.examples import Example

log = logging.getLogger(__name__)


class TaskStore(Protocol):
    """Named tasks, each with a known example count and examples loaded on demand."""

    def task_names(self) -> list[str]: ...

    def count(self, task: str) -> int: ...

    def keywords(self, task: str) -> tuple[str, ...]: ...

    def examples(self, task: str) -> list[Example]: ...


@runtime_checkable
class ClientColumn(Protocol):
    """A store whose examples may name the client holding them (``partition.kind = "natural"``)."""

    def client_ids(self, task: str) -> Sequence[int] | Sequence[str] | None:
        """Each of the task's examples' client id, in :meth:`TaskStore.examples` order; None: the data has none."""
        ...


class InMemoryStore:
    """:class:`TaskStore` over examples already in memory (synthetic tasks, tests); ``clients``: per task, each
    example's client id (for ``partition.kind = "natural"``)."""

    def __init__(
        self,
        tasks: dict[str, list[Example]],
        keywords: dict[str, tuple[str, ...]] | None = None,
        clients: dict[str, list[int]] | dict[str, list[str]] | None = None,
    ):
        self.tasks = tasks
        self._keywords = keywords or {}
        self._clients = clients
        if clients is not None and any(len(clients.get(t, ())) != len(ex) for t, ex in tasks.items()):
            raise ValueError("clients must give one client id per example of every task")

    def task_names(self) -> list[str]:
        return sorted(self.tasks)

    def count(self, task: str) -> int:
        return len(self.tasks[task])

    def keywords(self, task: str) -> tuple[str, ...]:
        return self._keywords.get(task, ())

    def examples(self, task: str) -> list[Example]:
        return self.tasks[task]

    def client_ids(self, task: str) -> list[int] | list[str] | None:
        return None if self._clients is None else self._clients[task]
