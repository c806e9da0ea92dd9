"""Reading files that fedrank did not necessarily write: a run directory (checkpoints, ``metrics.jsonl``,
``summary.json``) and users' data are untrusted input.

Every JSON document read from them goes through :func:`load_json`, which bounds its size and nesting depth
(a deeply nested document would otherwise end in a ``RecursionError`` traceback). A safetensors header's
declared tensors are checked against the file's size before any tensor byte is read
(:func:`safetensors_data_bytes`), so that a huge sparse file is refused instead of read into memory. A
restored checkpoint is checked as a whole against what the run's config implies (:func:`check_checkpoint`,
:func:`validate_state`): its checksum proves that the file is whole, not who wrote it (anyone can recompute
it), so the values are checked too. Every refusal is a :class:`DataError`, one line naming the file and
what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a state is checked: reading JSON does not need it
    import torch

    from fedrank.lowrank import LowRankSVD
    from fedrank.types import LoraFactors


class DataError(ValueError):
    """Data that cannot be had or is refused: a file's content malformed, nested too deep, too large or
    inconsistent, a source that cannot be downloaded or read. One line naming the file or source, the reason
    and what to do (the CLI prints it without a traceback)."""


MAX_DEPTH = 64
"""Nesting depth of a JSON document fedrank reads (a checkpoint's manifest needs about 12)."""
MAX_JSON_BYTES = 64 * 2**20
"""Size of a JSON document (a ``metrics.jsonl`` line, ``summary.json``) fedrank reads."""
MAX_HEADER_BYTES = 100_000_000
"""Size of a safetensors header (the safetensors library's own limit)."""
MAX_ABS = 1e6
"""Largest magnitude of a value in a restored state (a LoRA factor, ΔW, a singular value): far above what
training gives, and far below what a ×1e30 scaling of a state gives."""

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""Bytes per element of each safetensors dtype."""


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: one line, whatever the value holds."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- JSON
def depth(obj: Any) -> int:
    """Nesting depth of a JSON value (a scalar: 0, ``[]``: 1, ``[[1]]``: 2), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            deepest = max(deepest, d + 1)
            stack.extend((v, d + 1) for v in x.values())
        elif isinstance(x, list):
            deepest = max(deepest, d + 1)
            stack.extend((v, d + 1) for v in x)
    return deepest


def load_json(
    data: str | bytes,
    what: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """``data`` parsed as JSON, or a :class:`DataError` naming ``what``: larger than ``max_bytes``, not UTF-8,
    not JSON, or nested deeper than ``max_depth``."""
    size = len(data)
    if size > max_bytes:
        raise DataError(f"{what} is {size} bytes, more than the {max_bytes} fedrank reads")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from e
    else:
        text = data
    try:
        obj = json.loads(text, object_hook=object_hook)
    except RecursionError as e:
        raise DataError(f"{what} is nested deeper than {max_depth} levels") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{what} is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if depth(obj) > max_depth:
        raise DataError(f"{what} is nested deeper than {max_depth} levels")
    return obj


# ---------------------------------------------------------------------------------------------- safetensors
def safetensors_data_bytes(header: Any, what: str) -> int:
    """Bytes of tensor data a safetensors header declares, after checking that every entry has a known dtype,
    a shape of non-negative ints and data offsets that match it, the entries laid end to end from 0."""
    if not isinstance(header, dict):
        raise DataError(f"{what}: the safetensors header is a JSON {type(header).__name__}, not an object")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise DataError(f"{what}: tensor {short(key)} is described by {short(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise DataError(f"{what}: tensor {short(key)} has an unknown dtype {short(dtype)}")
        if not isinstance(shape, list) or not all(_index(n) for n in shape):
            raise DataError(f"{what}: tensor {short(key)} has a malformed shape {short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_index(n) for n in offsets)):
            raise DataError(f"{what}: tensor {short(key)} has malformed data offsets {short(offsets)}")
        begin, end = offsets
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != need:
            raise DataError(
                f"{what}: tensor {short(key)} ({dtype} {shape}) needs {need} bytes, its offsets span {end - begin}"
            )
        spans.append((begin, end, key))
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise DataError(f"{what}: tensor {short(key)} starts at byte {begin}, not {at} (a gap or an overlap)")
        at = end
    return at


def _index(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``; else all of it), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------- restored state
def _state_types() -> tuple[dict[str, type], type[LoraFactors], type[LowRankSVD]]:
    from fedrank.checkpoint import state_classes
    from fedrank.lowrank import LowRankSVD
    from fedrank.types import LoraFactors

    return state_classes(), LoraFactors, LowRankSVD


def _fields(obj: Any) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj) if f.init]
    return sorted(getattr(type(obj), "__slots__", ()))


def layer_shapes(state: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer a state holds, from its first dict of layers (LoRA factors, SVDs, ΔW)."""
    from torch import Tensor

    _, LoraFactors, LowRankSVD = _state_types()
    for name in _fields(state):
        d = getattr(state, name)
        if isinstance(d, dict) and d:
            out = {}
            for k, v in d.items():
                if isinstance(v, LoraFactors | LowRankSVD):
                    out[k] = v.shape
                elif isinstance(v, Tensor) and v.ndim == 2:
                    out[k] = (int(v.shape[0]), int(v.shape[1]))
                else:
                    break
            else:
                return out
    return {}


def state_rank(state: Any) -> int:
    """The largest rank of a state's LoRA factors or SVDs (0: none)."""
    _, LoraFactors, LowRankSVD = _state_types()
    ranks = [0]
    for name in _fields(state):
        d = getattr(state, name)
        if isinstance(d, dict):
            ranks += [v.rank for v in d.values() if isinstance(v, LoraFactors | LowRankSVD)]
    return max(ranks)


def state_bytes_limit(expected: Any, rank_bound: int) -> int:
    """The most bytes of tensors a checkpoint of a run whose initial state is ``expected`` can hold (with room
    for float64, so that a state of the wrong dtype is refused by :func:`validate_state`, naming it): per
    layer two dense ΔW-sized tensors and three sets of factors at ``rank_bound``, plus 1 MiB."""
    total = sum(2 * m * n + 3 * (m + n + 1) * rank_bound for m, n in layer_shapes(expected).values())
    return 8 * total + 2**20


class _Check:
    """One walk over a restored state (see :func:`validate_state`)."""

    def __init__(self, layers: dict[str, tuple[int, int]], dtype: torch.dtype | None, rank_bound: int | None):
        self.classes, self.LoraFactors, self.LowRankSVD = _state_types()
        self.layers, self.dtype, self.rank_bound = layers, dtype, rank_bound

    def tensor(self, t: Any, path: str, ndim: int) -> torch.Tensor:
        import torch

        if not isinstance(t, torch.Tensor):
            raise DataError(f"{path} is a {type(t).__name__}, not a tensor")
        if t.ndim != ndim:
            raise DataError(f"{path} has shape {tuple(t.shape)}, not {ndim}-dimensional")
        if self.dtype is not None and t.dtype != self.dtype:
            raise DataError(f"{path} is {t.dtype}, but this run's state is {self.dtype}")
        if not t.dtype.is_floating_point:
            raise DataError(f"{path} is {t.dtype}, not a floating-point tensor")
        if t.numel():
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"{path} holds non-finite values (NaN or inf)")
            peak = float(t.abs().max())
            if peak > MAX_ABS:
                raise DataError(f"{path} holds a value of magnitude {peak:.3g}, above the {MAX_ABS:.0e} a state holds")
        return t

    def rank(self, r: int, path: str) -> None:
        if r < 1 or (self.rank_bound is not None and r > self.rank_bound):
            allowed = "a positive rank" if self.rank_bound is None else f"ranks 1..{self.rank_bound}"
            raise DataError(f"{path} has rank {r}; this run's ranks and clients per round allow {allowed}")

    def layer(self, v: Any, path: str, shape: tuple[int, int]) -> None:
        m, n = shape
        if isinstance(v, self.LoraFactors):
            B, A = self.tensor(v.B, path + ".B", 2), self.tensor(v.A, path + ".A", 2)
            got = (int(B.shape[0]), int(A.shape[1]))
            self.rank(int(A.shape[0]), path)
        elif isinstance(v, self.LowRankSVD):
            U, _, Vh = (
                self.tensor(v.U, path + ".U", 2),
                self.tensor(v.S, path + ".S", 1),
                self.tensor(v.Vh, path + ".Vh", 2),
            )
            got = (int(U.shape[0]), int(Vh.shape[1]))
            self.rank(int(v.S.shape[0]), path)
        else:
            got = tuple(self.tensor(v, path, 2).shape)  # type: ignore[assignment]
        if got != (m, n):
            raise DataError(f"{path} is of a {got[0]}×{got[1]} layer, but this run's layer is {m}×{n}")

    def walk(self, x: Any, ref: Any, path: str) -> None:
        if isinstance(x, dict):
            if not x or not all(isinstance(k, str) for k in x):
                raise DataError(f"{path} is not a dict of layers")
            if set(x) != set(self.layers):
                extra, missing = sorted(set(x) - set(self.layers)), sorted(set(self.layers) - set(x))
                raise DataError(f"{path} has other layers than this run's (extra: {extra[:3]}, missing: {missing[:3]})")
            for k, v in x.items():
                self.layer(v, f"{path}[{k!r}]", self.layers[k])
        elif x is None:
            if ref is not None:
                raise DataError(f"{path} is missing (None)")
        elif isinstance(x, bool) or not isinstance(x, int):
            raise DataError(f"{path} is a {type(x).__name__}, not a dict of layers or a count")
        elif x < 0:
            raise DataError(f"{path} = {x} is negative")

    def state(self, state: Any, expected: Any, path: str) -> None:
        name = type(state).__name__
        if self.classes.get(name) is not type(state) or name in ("LoraFactors", "LowRankSVD"):
            raise DataError(f"{path} is a {name}, not a method's state")
        if expected is not None and type(expected) is not type(state):
            raise DataError(f"{path} is a {name}, but this run's method keeps a {type(expected).__name__}")
        for f in _fields(state):
            ref = getattr(expected, f) if expected is not None else None
            self.walk(getattr(state, f), ref, f"{path}.{f}")


def validate_state(state: Any, expected: Any = None, *, rank_bound: int | None = None, what: str = "state") -> None:
    """Refuse (:class:`DataError`) a restored state that this run could not have written: another state class
    than ``expected`` (the run's initial state), other layers or layer shapes, another dtype, non-finite
    values or values above :data:`MAX_ABS`, a rank outside ``1..rank_bound``, a negative count. Without
    ``expected`` the state is checked against itself (one layer shape per name, one dtype)."""
    from torch import Tensor

    _, LoraFactors, LowRankSVD = _state_types()
    ref = expected if expected is not None else state
    layers = layer_shapes(ref)
    if not layers:
        raise DataError(f"{what} holds no layers")
    dtypes = set()
    for f in _fields(ref):
        d = getattr(ref, f)
        if isinstance(d, dict):
            for v in d.values():
                for t in (
                    [v]
                    if isinstance(v, Tensor)
                    else [getattr(v, s) for s in _fields(v)]
                    if isinstance(v, LoraFactors | LowRankSVD)
                    else []
                ):
                    if isinstance(t, Tensor):
                        dtypes.add(t.dtype)
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if expected is None and dtype is None:
        raise DataError(f"{what} mixes dtypes {sorted(map(str, dtypes))}")
    _Check(layers, dtype, rank_bound).state(state, expected, what)


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    x: Any = config
    for k in key.split("."):
        if not isinstance(x, Mapping) or k not in x:
            return default
        x = x[k]
    return x


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def run_bounds(config: Mapping[str, Any], expected: Any = None) -> tuple[int, int, int, int]:
    """(rounds, registered clients, largest client rank, largest rank of a state's factors) a run's config
    allows: a FlexLoRA ΔW stacks every sampled client's factors, so its rank reaches clients per round × the
    largest client rank."""
    rounds = _get(config, "federation.rounds", 0)
    clients = _get(config, "partition.num_clients", 1)
    ranks = [r for r in [*_get(config, "ranks.choices", ()), *_get(config, "ranks.per_client", ())] if _count(r)]
    top = max([*ranks, state_rank(expected) if expected is not None else 0, 1])
    per_round = _get(config, "federation.clients_per_round", 0)
    if not _count(per_round) or per_round <= 0:
        frac = _get(config, "federation.fraction", 1.0)
        per_round = max(1, round(float(frac) * clients)) if isinstance(frac, int | float) and _count(clients) else 1
    rounds = rounds if _count(rounds) else 0
    clients = clients if _count(clients) else 1
    return rounds, clients, top, top * max(1, min(per_round, clients))


MAX_SECONDS = 1e9
"""The longest duration a record may state (about 32 years)."""

CHECKPOINT_KEYS = ("round", "state", "rank_overrides", "metrics_lines", "config", "torch_rng")


def check_checkpoint(ck: Any, config: Mapping[str, Any], expected: Any = None) -> None:
    """A restored round checkpoint against the run's ``config`` (its dict) and initial state ``expected``:
    the round within [0, federation.rounds], counts >= 0, rank overrides of registered clients within the
    run's ranks, a torch RNG state torch accepts, and the state (:func:`validate_state`)."""
    import torch

    if not isinstance(ck, dict):
        raise DataError(f"holds a {type(ck).__name__}, not a checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise DataError(f"lacks {', '.join(missing)}")
    if not isinstance(ck["config"], dict):
        raise DataError(f"config is a {type(ck['config']).__name__}, not a table")
    rounds, clients, top, rank_bound = run_bounds(config, expected)
    rnd = ck["round"]
    if not _count(rnd) or not 0 <= rnd <= rounds:
        raise DataError(f"round = {short(rnd)} is outside 0..{rounds} (federation.rounds)")
    lines = ck["metrics_lines"]
    if not _count(lines) or lines < 0:
        raise DataError(f"metrics_lines = {short(lines)} is not a count of records")
    skipped = ck.get("skipped_rounds", 0)
    if not _count(skipped) or not 0 <= skipped <= rnd:
        raise DataError(f"skipped_rounds = {short(skipped)} is outside 0..{rnd} (the rounds done)")
    private = ck.get("private_rounds", 0)  # rounds the DP accountant composed (aggregated rounds)
    if not _count(private) or not 0 <= private <= rnd:
        raise DataError(f"private_rounds = {short(private)} is outside 0..{rnd} (the rounds done)")
    elapsed = ck.get("elapsed_seconds", 0.0)  # the run's time up to this checkpoint, over its sittings
    if isinstance(elapsed, bool) or not isinstance(elapsed, int | float) or not 0.0 <= elapsed <= MAX_SECONDS:
        raise DataError(f"elapsed_seconds = {short(elapsed)} is not a duration within 0..{MAX_SECONDS:g} s")
    overrides = ck["rank_overrides"]
    if not isinstance(overrides, dict):
        raise DataError(f"rank_overrides is a {type(overrides).__name__}, not a table")
    for cid, r in overrides.items():
        if not (_count(cid) and 0 <= cid < clients and _count(r) and 1 <= r <= top):
            raise DataError(
                f"rank_overrides gives client {short(cid)} rank {short(r)}; clients are 0..{clients - 1}, "
                f"ranks 1..{top}"
            )
    rng = ck["torch_rng"]
    want = torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != want.dtype or rng.shape != want.shape:
        got = f"{rng.dtype} {tuple(rng.shape)}" if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise DataError(f"torch_rng is {got}, not a torch RNG state ({want.dtype} {tuple(want.shape)})")
    try:
        torch.Generator().set_state(rng.contiguous())
    except (RuntimeError, ValueError, TypeError) as e:
        raise DataError(f"torch_rng is not a valid torch RNG state ({str(e).splitlines()[0]})") from e
    validate_state(ck["state"], expected, rank_bound=rank_bound)


def check_counted_records(records: list[Any], round_done: int, count: int) -> None:
    """The ``count`` records a checkpoint of round ``round_done`` counts must hold exactly one ``round`` or
    ``round_skipped`` record for each of rounds 1..round_done, and nothing of a later round."""
    done = []
    for i, rec in enumerate(records):
        rnd = rec.get("round")
        if _count(rnd) and rnd > round_done:
            raise DataError(
                f"metrics_lines = {count} counts line {i + 1}, a record of round {rnd}, after the checkpoint's "
                f"round {round_done}"
            )
        if rec.get("type") in ("round", "round_skipped"):
            done.append(rnd)
    if done != list(range(1, round_done + 1)):
        shown = short(done, 40)
        raise DataError(
            f"metrics_lines = {count} counts the records of rounds {shown}, not of rounds 1..{round_done} "
            "(the checkpoint's round)"
        )
