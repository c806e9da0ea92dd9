"""Checkpoints that are data, never code: one safetensors file holding the tensors, a JSON manifest of the
object tree around them, and a checksum of both, written atomically and durably.

Format (``fedrank-state/1``): a safetensors file whose ``__metadata__`` holds

- ``format``: ``fedrank-state/1``; ``kind``: what the file is (``checkpoint``, ``global_state``, ``client_state``);
- ``manifest``: the object as JSON. Plain JSON stands for itself (ints, strings, bools, None, finite floats,
  lists, dicts with string keys); everything else is a marker object: ``{"__tensor__": key}`` (with
  ``"view": {"shape", "stride"}`` for a non-contiguous tensor, stored as the memory span it covers, so that its
  strides survive),
  ``{"__class__": name, "fields": {...}}`` for a state class of :func:`state_classes` (an explicit
  allow-list: nothing else is ever constructed), ``{"__tuple__": [...]}``, ``{"__dict__": [[k, v], ...]}``
  (non-string keys, e.g. ``rank_overrides``) and ``{"__float__": "nan" | "inf" | "-inf"}``;
- ``sha256``: over the format, kind and manifest and, in key order, every tensor's key, dtype, shape and bytes.

Loading parses the header as JSON, lets safetensors validate and read the tensors, verifies the checksum and
rebuilds the tree; a pickle (``torch.save``) or anything else is refused before a byte of it is interpreted.
The header is read first and the tensors it declares are checked against the file's size (and the memory
available) before the rest is read, and the header and manifest are parsed with bounded depth and size
(:mod:`fedrank.untrusted`). The checksum is integrity, not authenticity: anyone can recompute it, so what a
checkpoint holds is checked again where it is used (:func:`fedrank.run_dir.restore`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedrank import faults
from fedrank.untrusted import (
    MAX_HEADER_BYTES,
    DataError,
    available_memory,
    gib,
    load_json,
    safetensors_data_bytes,
)

FORMAT = "fedrank-state/1"
SUFFIX = ".safetensors"
_MARKERS = ("__tensor__", "__class__", "__tuple__", "__dict__", "__float__")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated, of another kind, or not a fedrank file at all."""


def state_classes() -> dict[str, type]:
    """The classes a checkpoint may name (and loading may construct): fedrank's state dataclasses."""
    from fedrank.aggregation.base import LoraState
    from fedrank.aggregation.fedex import FedExState
    from fedrank.aggregation.flexlora import FlexLoRAState
    from fedrank.aggregation.flora import FLoRAState
    from fedrank.aggregation.fslora import FSLoRAServerState
    from fedrank.aggregation.rolora import RoLoRAState
    from fedrank.lowrank import LowRankSVD
    from fedrank.types import LoraFactors

    classes: list[type] = [LoraState, FlexLoRAState, FLoRAState, FedExState, RoLoRAState, FSLoRAServerState]
    classes += [LoraFactors, LowRankSVD]
    return {c.__name__: c for c in classes}


def _fields(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    return sorted(getattr(cls, "__slots__", ()))


# ---------------------------------------------------------------------------------------------- encoding
def _layout(t: Tensor) -> tuple[Tensor, dict[str, list[int]] | None]:
    """``t`` as a fresh contiguous tensor, and the view (shape, strides) that rebuilds it (None: row-major).

    A non-contiguous tensor (a transpose, a slice of one) is saved as the span of memory it covers and
    rebuilt with the same strides: kernels may round differently on another layout, and a resume must be
    bit-identical."""
    t = t.detach().cpu()
    if t.is_contiguous() or t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format), None
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    flat = t.as_strided((span,), (1,)).clone()
    return flat, {"shape": list(t.shape), "stride": list(t.stride())}


def encode(obj: Any) -> tuple[Any, dict[str, Tensor]]:
    """``obj`` as (JSON-able manifest, tensors by key)."""
    tensors: dict[str, Tensor] = {}
    allowed = state_classes()

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            key = f"{len(tensors)}:{path}"
            tensors[key], view = _layout(x)
            return {"__tensor__": key} if view is None else {"__tensor__": key, "view": view}
        if x is None or isinstance(x, bool | int | str):
            return x
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, float | np.floating):
            v = float(x)
            return v if math.isfinite(v) else {"__float__": repr(v)}
        if isinstance(x, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {"__dict__": [[enc(k, path), enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        name = type(x).__name__
        if allowed.get(name) is type(x):
            return {"__class__": name, "fields": {f: enc(getattr(x, f), f"{path}.{f}") for f in _fields(type(x))}}
        raise CheckpointError(
            f"cannot store a {type(x).__module__}.{name} (at {path or 'top level'}) in a checkpoint: only tensors, "
            f"JSON values, tuples, dicts and fedrank's state classes ({', '.join(sorted(allowed))})"
        )

    return enc(obj, ""), tensors


def decode(manifest: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`encode`; constructs nothing but allow-listed classes."""
    allowed = state_classes()

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        marker = [k for k in x if k in _MARKERS]
        if not marker:
            return {k: dec(v) for k, v in x.items()}
        kind = marker[0]
        if kind == "__tensor__":
            t = tensors[x["__tensor__"]]
            view = x.get("view")
            if view is None:
                return t
            shape, stride = [int(n) for n in view["shape"]], [int(n) for n in view["stride"]]
            span = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
            if t.ndim != 1 or min(shape, default=1) <= 0 or min(stride, default=0) < 0 or span > t.numel():
                raise CheckpointError(f"tensor {x['__tensor__']!r}: view {view} does not fit its {tuple(t.shape)} data")
            return t.as_strided(shape, stride)
        if kind == "__class__":
            name = x["__class__"]
            if name not in allowed:
                raise CheckpointError(f"unknown state class {name!r} (known: {', '.join(sorted(allowed))})")
            cls = allowed[name]
            fields = x["fields"]
            if sorted(fields) != sorted(_fields(cls)):
                raise CheckpointError(f"{name}: fields {sorted(fields)} differ from {sorted(_fields(cls))}")
            return cls(**{k: dec(v) for k, v in fields.items()})
        if kind == "__tuple__":
            return tuple(dec(v) for v in x["__tuple__"])
        if kind == "__dict__":
            return {dec(k): dec(v) for k, v in x["__dict__"]}
        return float(x["__float__"])

    return dec(manifest)


def _digest(kind: str, manifest: str, tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for part in (FORMAT, kind, manifest):
        h.update(part.encode())
        h.update(b"\0")
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_bytes(obj: Any, kind: str = "state") -> bytes:
    """``obj`` as the bytes of a checkpoint file."""
    from safetensors.torch import save

    tree, tensors = encode(obj)
    manifest = json.dumps(tree, allow_nan=False, separators=(",", ":"))
    meta = {"format": FORMAT, "kind": kind, "manifest": manifest, "sha256": _digest(kind, manifest, tensors)}
    data: bytes = save(tensors, metadata=meta)
    return data


def _not_ours(data: bytes, where: str, size: int) -> CheckpointError:
    """The error for a file without a readable safetensors header: a pickle, or something corrupt."""
    if data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05"):
        return CheckpointError(
            f"{where} is a pickle (torch.save) file, not a fedrank checkpoint; it is not loaded, because "
            "unpickling a file can run any code. Start the run afresh (--overwrite) or use another directory"
        )
    return CheckpointError(
        f"{where} is truncated or corrupt, or not a fedrank checkpoint (no readable safetensors header; {size} bytes)"
    )


def _header_length(data: bytes, size: int) -> int:
    """The header length the first 8 bytes declare, or -1 when it cannot be one (past the end or too large)."""
    n: int = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    return n if 0 <= n <= min(size - 8, MAX_HEADER_BYTES) else -1


def _parse_header(raw: bytes, where: str) -> Any:
    try:
        return load_json(raw, f"{where}: its safetensors header", max_bytes=MAX_HEADER_BYTES)
    except DataError as e:
        if "nested deeper" in str(e):
            raise CheckpointError(str(e)) from e
        return None


def _header(data: bytes, where: str) -> dict[str, Any]:
    n = _header_length(data, len(data))
    header = _parse_header(data[8 : 8 + n], where) if n >= 0 else None
    if header is None:
        raise _not_ours(data, where, len(data))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a fedrank checkpoint (no {FORMAT!r} metadata)")
    return meta


def from_bytes(data: bytes, where: str = "checkpoint", kind: str | None = None) -> Any:
    """The object in checkpoint bytes, after checking the format, kind and checksum."""
    from safetensors.torch import load

    meta = _header(data, where)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{where} holds a {meta.get('kind')!r}, not a {kind!r}")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types for truncated/overlapping data
        raise CheckpointError(f"{where} is corrupt or truncated ({e})") from e
    if _digest(str(meta.get("kind")), str(meta.get("manifest")), tensors) != meta.get("sha256"):
        raise CheckpointError(f"{where} does not match its checksum (corrupt or partially written)")
    try:
        manifest = load_json(str(meta.get("manifest")), f"{where}: its manifest", max_bytes=MAX_HEADER_BYTES)
    except DataError as e:
        raise CheckpointError(str(e)) from e
    try:
        return decode(manifest, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------- files
def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in directory ``path`` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. some network file systems; the data itself was fsynced
        pass
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes, *, fault_round: int | None = None) -> None:
    """Write to a temporary file in the same directory, fsync, rename over ``path``, fsync the directory.

    A crash leaves either the old file or the new one, never a mix. ``fault_round``: this write is the round
    checkpoint of that round (the ``pre-rename``/``post-rename`` fault points, see :mod:`fedrank.faults`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        _write_synced(tmp, data)
    except BaseException:  # e.g. ENOSPC: leave no partial temporary behind
        tmp.unlink(missing_ok=True)
        raise
    if fault_round is not None:
        faults.hit("pre-rename", fault_round)
    os.replace(tmp, path)
    if fault_round is not None:
        faults.hit("post-rename", fault_round)
    fsync_dir(path.parent)


def save(obj: Any, path: Path, *, kind: str = "state", fault_round: int | None = None) -> None:
    """Write ``obj`` (a state tree, see the module docstring) atomically as a checkpoint file."""
    atomic_write_bytes(path, to_bytes(obj, kind), fault_round=fault_round)


def read_checked(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of checkpoint file ``path``, read only after its header was checked: the tensors it declares
    must fill the rest of the file exactly and fit in ``max_bytes`` (when given) and in the memory available.
    A huge (sparse) file is refused from its first bytes, never read into memory."""
    where = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; a missing file is a CheckpointError)
    except FileNotFoundError as e:
        raise CheckpointError(f"no checkpoint at {path}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = _header_length(head, size)
        if n < 0:
            raise _not_ours(head + f.read(8), where, size)
        raw = f.read(n)
        header = _parse_header(raw, where)
        if header is None:
            raise _not_ours(head + raw, where, size)
        try:
            declared = safetensors_data_bytes(header, where)
        except DataError as e:
            raise CheckpointError(f"{e} (corrupt or crafted)") from e
        held = size - 8 - n
        if declared != held:
            raise CheckpointError(
                f"{where} is truncated or corrupt: its header declares {declared} bytes of tensor data, the file "
                f"holds {held}"
            )
        if max_bytes is not None and declared > max_bytes:
            raise CheckpointError(
                f"{where} declares {gib(declared)} of tensors, more than a checkpoint of this run holds (at most "
                f"{gib(max_bytes)}); not read"
            )
        free = available_memory()
        if free is not None and declared > free:
            raise CheckpointError(
                f"{where} declares {gib(declared)} of tensors, more than the {gib(free)} of memory available; not read"
            )
        data = head + raw + f.read(declared + 1)
    if len(data) != size:
        raise CheckpointError(f"{where} changed while it was read ({size} bytes, then {len(data)})")
    return data


def load(path: Path, kind: str | None = None, *, max_bytes: int | None = None) -> Any:
    """Load a checkpoint written by :func:`save`, verifying its format, kind, sizes (see :func:`read_checked`,
    ``max_bytes``: the most bytes of tensors expected) and checksum."""
    return from_bytes(read_checked(path, max_bytes), str(path), kind)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a state tree (what a checkpoint of it takes, less its small manifest)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init)
    return sum(tensor_bytes(getattr(obj, s)) for s in getattr(type(obj), "__slots__", ()))
