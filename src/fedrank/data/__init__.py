"""Client data: BIG-bench tasks and users' JSONL, partitions, and prompt tokenisation."""

from fedrank.data.bigbench import BigBench, TaskInfo, parse_task
from fedrank.data.examples import Example
from fedrank.data.partition import PARTITIONS, ClientData, Federation, PartitionConfig
from fedrank.data.store import BigBenchStore, InMemoryStore, TaskStore, read_jsonl
from fedrank.data.tokenize import IGNORE, Encoded, collate, encode, prompt_text

__all__ = [
    "IGNORE",
    "PARTITIONS",
    "BigBench",
    "BigBenchStore",
    "ClientData",
    "Encoded",
    "Example",
    "Federation",
    "InMemoryStore",
    "PartitionConfig",
    "TaskInfo",
    "TaskStore",
    "collate",
    "encode",
    "parse_task",
    "prompt_text",
    "read_jsonl",
]
