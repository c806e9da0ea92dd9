"""Atomic checkpoints with checksums: a crash never leaves a half-written file that looks valid."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, or whose checksum does not match its contents."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(obj: Any, path: Path) -> str:
    """torch.save ``obj`` atomically next to a ``.sha256`` sidecar; returns the checksum."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), digest.encode())
    return digest


def load(path: Path) -> Any:
    """Load a checkpoint written by :func:`save`, verifying its checksum."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file() or not side.is_file():
        raise CheckpointError(f"no complete checkpoint at {path}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != side.read_text().strip():
        raise CheckpointError(f"checkpoint {path} does not match its checksum (corrupt or partially written)")
    return torch.load(io.BytesIO(data), weights_only=False)
