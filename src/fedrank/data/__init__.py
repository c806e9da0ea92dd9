"""Client data: indexed sources (evals, benchmark suites, BIG-bench, Natural Instructions), users' files
(JSON/JSONL/CSV/Parquet), partitions (flwr-datasets), one
node's data, and prompt tokenisation."""

from fedrank.data.bigbench import parse_task
from fedrank.data.examples import Example
from fedrank.data.files import FileStore
from fedrank.data.index import DataError, IndexStore, TaskIndex, TaskInfo
from fedrank.data.node import SOURCES, DataSource, federation, node_data, open_store
from fedrank.data.partition import PARTITIONS, ClientData, Federation, PartitionConfig
from fedrank.data.store import InMemoryStore, TaskStore
from fedrank.data.tokenize import IGNORE, Encoded, collate, encode, prompt_text

__all__ = [
    "IGNORE",
    "PARTITIONS",
    "SOURCES",
    "ClientData",
    "DataError",
    "DataSource",
    "Encoded",
    "Example",
    "Federation",
    "FileStore",
    "InMemoryStore",
    "IndexStore",
    "PartitionConfig",
    "TaskIndex",
    "TaskInfo",
    "TaskStore",
    "collate",
    "encode",
    "federation",
    "node_data",
    "open_store",
    "parse_task",
    "prompt_text",
]
