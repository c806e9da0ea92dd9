"""Client data: BIG-bench tasks, users' files (JSON/JSONL/CSV/Parquet), partitions (flwr-datasets), one
node's data, and prompt tokenisation."""

from fedrank.data.bigbench import BigBench, TaskInfo, parse_task
from fedrank.data.examples import Example
from fedrank.data.files import FileStore
from fedrank.data.node import SOURCES, DataSource, federation, node_data, open_store
from fedrank.data.partition import PARTITIONS, ClientData, Federation, PartitionConfig
from fedrank.data.store import BigBenchStore, InMemoryStore, TaskStore
from fedrank.data.tokenize import IGNORE, Encoded, collate, encode, prompt_text

__all__ = [
    "IGNORE",
    "PARTITIONS",
    "SOURCES",
    "BigBench",
    "BigBenchStore",
    "ClientData",
    "DataSource",
    "Encoded",
    "Example",
    "Federation",
    "FileStore",
    "InMemoryStore",
    "PartitionConfig",
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
