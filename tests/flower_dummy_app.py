"""A tiny Flower app for the deployment tests: one QUERY round, each node replies with its node_config.

The ServerApp waits for `num-nodes` connected nodes (bounded by `wait-s`; both optional), sends one Message
per node, and writes `<out-dir>/replies.json`: `{"replies": [{"node_id", "rank", "partition-id"}, ...],
"run_config": {...}}` (rank -1 when the node_config has none, as in a Ray simulation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    want = int(cfg.get("num-nodes", 1))
    wait_s = float(cfg.get("wait-s", 60.0))
    deadline = time.monotonic() + wait_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < want and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < want:
        raise RuntimeError(f"only {len(node_ids)} of {want} nodes connected within {wait_s} s")
    msgs = [
        Message(RecordDict({"q": ConfigRecord({"ask": "rank"})}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in node_ids
    ]
    replies = grid.send_and_receive(msgs, timeout=wait_s)
    out = []
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed: {reply.error}")
        rec = reply.content["r"]
        out.append({"node_id": reply.metadata.src_node_id, "rank": rec["rank"], "partition-id": rec["partition-id"]})
    out_dir = Path(str(cfg["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"replies": sorted(out, key=lambda r: r["partition-id"]), "run_config": dict(cfg)}
    (out_dir / "replies.json").write_text(json.dumps(doc))


@client.query()
def query(message: Message, context: Context) -> Message:
    node = context.node_config
    rec = ConfigRecord({"rank": int(node.get("rank", -1)), "partition-id": int(node.get("partition-id", -1))})
    return Message(RecordDict({"r": rec}), reply_to=message)
