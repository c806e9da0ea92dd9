"""The base model's evaluation, kept and reused across runs.

Before training (round 0) the global model of every method is the base model itself (B = 0, no base delta),
so every run on the same model, evaluation examples and settings computes the same numbers: the quickstart
run twice, or the same federation under nine methods. The first such evaluation is written to
``<cache>/evals/<key>.json`` and later ones read it back (``eval.reuse_base``, on by default).

The key is the SHA-256 of everything the numbers depend on: the base weights' bytes, the tokenizer, every
evaluated example and its set, the evaluation settings, fedrank's source code, the torch / transformers / peft
versions, and how this process computes (device, CPU kernels, threads, oneDNN linear layers), so a change
to any of them misses the cache instead of reusing numbers that another computation would not give. An
unreadable or malformed file is reported, removed and recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from fedrank import checkpoint
from fedrank.data.examples import Example

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped when the file's layout changes."""

Metrics = dict[str, dict[str, float]]


@cache
def source_digest() -> str:
    """SHA-256 of fedrank's own source files (any code change gives another key)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in named:
        data = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}\0".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's memory, not a copy
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary) and chat
    template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [getattr(tokenizer, "chat_template", None), str(tokenizer.special_tokens_map), tokenizer.pad_token_id]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def runtime(device: torch.device, onednn: bool) -> dict[str, Any]:
    """How this process computes: what the last bits of the numbers depend on beyond the inputs."""
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "device": str(device),
        "onednn": onednn,
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["cpu"] = torch.backends.cpu.get_cpu_capability()
        out["threads"] = torch.get_num_threads()
    return out


def key(
    weights: str,
    tokenizer: str,
    sets: Mapping[str, Mapping[str, Sequence[Example]]],
    settings: Any,
    run: Mapping[str, Any],
) -> str:
    """The cache key of one evaluation: ``sets`` is {"unseen": {task: examples}, "participants": {id: ...}}."""
    spec = {
        "version": VERSION,
        "source": source_digest(),
        "weights": weights,
        "tokenizer": tokenizer,
        "sets": {g: {n: [dataclasses.asdict(e) for e in ex] for n, ex in s.items()} for g, s in sets.items()},
        "settings": dataclasses.asdict(settings),
        "runtime": dict(run),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def path_of(root: Path, digest: str) -> Path:
    return root / "evals" / f"{digest}.json"


def load(path: Path, groups: Mapping[str, Iterable[str]]) -> dict[str, Metrics] | None:
    """The stored metrics, or None when there are none; a damaged file (unreadable, not the layout, other
    sets than ``groups``) is removed with a warning."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"layout version {data.get('version')!r}")
        out: dict[str, Metrics] = {}
        for g, names in groups.items():
            metrics = data[g]
            if sorted(metrics) != sorted(names):
                raise ValueError(f"{g}: sets {sorted(metrics)} instead of {sorted(names)}")
            out[g] = {n: {k: float(v) for k, v in m.items()} for n, m in metrics.items()}
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("the stored base-model evaluation %s is unusable (%s); evaluating again", path, e)
        path.unlink(missing_ok=True)
        return None


def store(path: Path, metrics: Mapping[str, Metrics]) -> None:
    """Write the metrics (atomically); a cache that cannot be written only costs the reuse."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": VERSION, **metrics}
        checkpoint.atomic_write_bytes(path, json.dumps(body, indent=1, allow_nan=False).encode())
    except (OSError, ValueError) as e:
        log.warning("could not keep the base-model evaluation in %s (%s)", path, e)
