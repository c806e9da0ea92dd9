"""Users' data files (JSON, JSONL, CSV, Parquet) read with Hugging Face ``datasets``, offline.

Each row is one example. Its prompt is ``prompt``, or ``instruction`` followed by ``input`` after a blank line
when there is one (the Alpaca layout Flower's LLM examples use); its answer is ``target`` or ``output``.
Optional columns: ``references`` (every acceptable answer), ``choices`` + ``correct`` (multiple choice: the
options and the index of the right one), ``scores`` (credit per option), ``client`` (the client holding the
row, for ``partition.kind = "natural"``). The ``group_by`` column names a row's task (default ``client``: each
client's rows are one task, as fedrank read JSONL before); a row without it belongs to its file's stem, so one
file per client works too. In CSV, list columns hold JSON lists (``["yes", "no"]``).

Files are converted to Arrow once under the fedrank cache (``<cache>/datasets``, never next to the data;
``datasets`` re-converts a file whose modification time changed) and memory-mapped: a task's rows become
:class:`Example` objects only when asked for. ``datasets`` is imported with ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` unless the environment says otherwise, and is only ever given local files.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrank.data.examples import Example
from fedrank.data.index import cache_dir as fedrank_cache

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> the ``datasets`` builder that reads it."""
PROMPT_COLUMNS, ANSWER_COLUMNS = ("prompt", "instruction"), ("target", "output")
LIST_COLUMNS = ("references", "choices", "scores")
CLIENT_COLUMN = "client"


def offline_datasets() -> Any:
    """``import datasets`` with the offline switches on unless the environment set them (it reads them at import)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def check_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The files as paths: each must exist and have a known suffix."""
    if not paths:
        raise ValueError("no data files given (data.paths = ['file.jsonl', ...])")
    out = []
    for path in map(Path, paths):
        if path.suffix.lower() not in BUILDERS:
            raise ValueError(f"data file {path}: unknown extension {path.suffix!r}; known: {', '.join(BUILDERS)}")
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        out.append(path)
    return out


def _load(path: Path, cache: Path) -> datasets.Dataset:
    ds_lib = offline_datasets()
    builder = BUILDERS[path.suffix.lower()]
    kwargs: dict[str, Any] = {}
    if builder == "csv":  # every column as text: pandas would turn "3" into 3 and an empty cell into a float NaN
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if not any(row for row in reader):  # datasets would say 'Instruction "train" corresponds to no data'
                raise ValueError(
                    f"data file {path} holds a header ({', '.join(header)}) but no data rows; fill it or remove it "
                    "from data.paths"
                )
        kwargs["features"] = ds_lib.Features({c: ds_lib.Value("string") for c in header})
    bars_were_on = ds_lib.utils.is_progress_bar_enabled()
    ds_lib.disable_progress_bars()
    try:
        ds = ds_lib.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(cache), **kwargs)
    except Exception as e:  # datasets wraps the parser's error (which says where) in its own
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if "corresponds to no data" in str(cause):  # datasets' words for a file without rows (JSON [] or {})
            raise ValueError(f"data file {path} holds no rows; fill it or remove it from data.paths") from e
        raise ValueError(f"data file {path} could not be read as {builder}: {cause}") from e
    finally:
        if bars_were_on:
            ds_lib.enable_progress_bars()
    assert isinstance(ds, ds_lib.Dataset)
    return ds


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _list(value: Any, column: str) -> list[Any] | None:
    """A list column's value; CSV cells hold it as a JSON list."""
    if value is None:
        return None
    if isinstance(value, str):
        from fedrank.untrusted import DataError, load_json, short

        try:  # bounded: a cell nested thousands deep is refused, not a RecursionError
            value = load_json(value, f"column {column!r}")
        except DataError as e:
            if "nested deeper" in str(e) or "bytes, more than" in str(e):
                raise ValueError(str(e)) from e
            raise ValueError(f"column {column!r} must hold a (JSON) list, got {short(value, 200)}") from e
    if not isinstance(value, list):
        raise ValueError(f"column {column!r} must hold a list, got {value!r}")
    return value


def row_example(rec: dict[str, Any], task: str) -> Example:
    """One row as an :class:`Example` (the columns are described in the module docstring)."""
    if "prompt" in rec and rec["prompt"] is not None:
        prompt = _text(rec["prompt"])
    else:
        extra = _text(rec.get("input"))
        prompt = _text(rec.get("instruction")) + ("\n\n" + extra if extra else "")
    target = _text(rec["target"] if rec.get("target") is not None else rec.get("output"))
    refs, choices, scores = (_list(rec.get(c), c) for c in LIST_COLUMNS)
    correct = rec.get("correct")
    return Example(
        prompt=prompt,
        target=target,
        references=tuple(map(str, refs)) if refs else (target,),
        choices=tuple(map(str, choices)) if choices is not None else None,
        correct=int(correct) if correct is not None else None,
        task=task,
        scores=tuple(float(s) for s in scores) if scores is not None else None,
    )


def _client_keys(values: list[Any]) -> list[int] | list[str]:
    """Client ids as ints when every one is an integer (a JSON or Parquet number, or CSV text like "12"), else as
    text: the same ids read from JSON, CSV or Parquet then order the same way (numerically when numbers)."""
    ints = [v if isinstance(v, int) and not isinstance(v, bool) else int(v) if _decimal(v) else None for v in values]
    if None not in ints:
        return ints  # type: ignore[return-value]
    return [str(v) for v in values]


def _decimal(v: Any) -> bool:
    return isinstance(v, str) and v.isdecimal() and str(int(v)) == v


class FileStore:
    """:class:`~fedrank.data.store.TaskStore` over users' files; only per-task row numbers are held in memory."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        group_by: str = "client",
        cache_dir: str | os.PathLike[str] | None = None,
        cache_tasks: int = 32,
    ):
        self.paths = check_paths(paths)
        self.group_by = group_by
        cache = fedrank_cache(cache_dir) / "datasets"
        for path in self.paths:
            check_text(path)  # encodings are checked here, naming the row, not when a round first reads it
        self._data = [_load(p, cache) for p in self.paths]
        for path, ds in zip(self.paths, self._data, strict=True):
            _check_rows(path, ds)
            _check_columns(path, ds)
            _check_strings(path, ds)
        self._starts = np.cumsum([0] + [len(d) for d in self._data])
        rows: dict[str, list[int]] = {}
        for i, (path, ds) in enumerate(zip(self.paths, self._data, strict=True)):
            for row, v in enumerate(_column(ds, group_by)):
                rows.setdefault(path.stem if v is None else str(v), []).append(int(self._starts[i]) + row)
        if not rows:
            raise ValueError(f"no rows in {[str(p) for p in self.paths]}")
        self._rows = {t: np.asarray(r, dtype=np.int64) for t, r in rows.items()}
        self._clients: list[int] | list[str] | None = None
        if any(CLIENT_COLUMN in d.column_names for d in self._data):
            clients = [v for d in self._data for v in _column(d, CLIENT_COLUMN)]
            if None in clients:
                path, row = self._where(clients.index(None))
                raise ValueError(
                    f"{path}: row {row} has no {CLIENT_COLUMN!r} value ({clients.count(None)} rows without one); "
                    f"with a {CLIENT_COLUMN!r} column every row must name its client"
                )
            self._clients = _client_keys(clients)
        self._cache: OrderedDict[str, list[Example]] = OrderedDict()
        self._cache_tasks = cache_tasks
        log.info("read %d rows, %d tasks from %d file(s)", int(self._starts[-1]), len(self._rows), len(self.paths))

    def _where(self, gid: int) -> tuple[Path, int]:
        f = int(np.searchsorted(self._starts, gid, side="right")) - 1
        return self.paths[f], gid - int(self._starts[f])

    def task_names(self) -> list[str]:
        return sorted(self._rows)

    def count(self, task: str) -> int:
        return len(self._rows[task])

    def keywords(self, task: str) -> tuple[str, ...]:
        return ()

    def client_ids(self, task: str) -> list[int] | list[str] | None:
        """The ``client`` value of each of the task's examples, in :meth:`examples` order (None: no such column)."""
        if self._clients is None:
            return None
        clients = self._clients
        return [clients[g] for g in self._rows[task].tolist()]

    def examples(self, task: str) -> list[Example]:
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        gids = self._rows[task]
        out: list[Example] = []
        for f, (path, ds) in enumerate(zip(self.paths, self._data, strict=True)):  # a task's rows are in file order
            local = (gids[(gids >= self._starts[f]) & (gids < self._starts[f + 1])] - self._starts[f]).tolist()
            if not local:
                continue
            batch = ds[local]
            for j, row in enumerate(local):
                try:
                    out.append(row_example({c: batch[c][j] for c in batch}, task))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}: row {row}: {e}") from e
        self._cache[task] = out
        if len(self._cache) > self._cache_tasks:
            self._cache.popitem(last=False)
        return out


TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
_BLOCK = 1 << 24


def check_text(path: Path) -> None:
    """A JSON, JSONL or CSV data file must be UTF-8 text holding something: the error names the file, the
    line and the row (JSONL: one row a line, counted from 0 as elsewhere; CSV: after the header line) of the
    first byte that is not UTF-8, or says that the file is empty. Read in blocks; nothing is kept."""
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return
    offset, lines, line_start, carry, blank = 0, 0, 0, b"", True  # line_start: the current line's first byte
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        while True:
            block = f.read(_BLOCK)
            data = carry + block
            if not data:
                break
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as e:
                if block and e.reason == "unexpected end of data":  # a character cut by the block's end
                    good = e.start
                else:
                    line = lines + data.count(b"\n", 0, e.start) + 1
                    nl = data.rfind(b"\n", 0, e.start)
                    column = e.start - nl if nl >= 0 else offset + e.start - line_start + 1
                    row = line - (2 if suffix == ".csv" else 1)
                    where = f"line {line}" + (f" (row {row})" if suffix != ".json" and row >= 0 else "")
                    raise ValueError(
                        f"data file {path}: {where} is not UTF-8 text (byte 0x{data[e.start]:02x} at column "
                        f"{column}); save the file as UTF-8"
                    ) from e
            blank = blank and not data[:good].strip()
            lines += data.count(b"\n", 0, good)
            nl = data.rfind(b"\n", 0, good)
            if nl >= 0:
                line_start = offset + nl + 1
            offset += good
            carry = data[good:]
            if not block:
                break
    if blank:
        what = "empty (0 bytes)" if offset == 0 else "blank (whitespace only)"
        raise ValueError(f"data file {path} is {what}: it holds no rows; fill it or remove it from data.paths")


def _check_rows(path: Path, ds: datasets.Dataset) -> None:
    """A file that parses but holds no rows (a CSV header without data, a JSON ``[]``) is refused by name."""
    if len(ds) == 0:
        what = f"a header ({', '.join(ds.column_names)}) but no data rows" if ds.column_names else "no rows"
        raise ValueError(f"data file {path} holds {what}; fill it or remove it from data.paths")


def _check_strings(path: Path, ds: datasets.Dataset) -> None:
    """Every text column must hold valid UTF-8 (a Parquet file's bytes are not checked when read): the error
    names the file, the column and the row (counted from 0)."""
    import pyarrow as pa

    for name in ds.column_names:
        column = ds.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        base = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                raw = chunk.cast(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary())
                for i, value in enumerate(raw.to_pylist()):
                    try:
                        (value or b"").decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(
                            f"data file {path}: row {base + i} column {name!r} is not UTF-8 text "
                            f"(byte 0x{value[e.start]:02x} at offset {e.start}); save the file as UTF-8"
                        ) from e
            base += len(chunk)


def _column(ds: datasets.Dataset, name: str) -> list[Any]:
    if name not in ds.column_names:
        return [None] * len(ds)
    return list(ds.data.column(name).to_pylist())


def _check_columns(path: Path, ds: datasets.Dataset) -> None:
    """Every row needs a prompt and an answer: the error names the file and the missing column (checked on the
    Arrow columns, without reading the texts into Python)."""
    import pyarrow.compute as pc

    cols = ds.column_names
    for options in (PROMPT_COLUMNS, ANSWER_COLUMNS):
        present = [c for c in options if c in cols]
        if not present:
            missing = options[1] if "instruction" in cols or "output" in cols else options[0]
            raise ValueError(
                f"{path}: missing column {missing!r} (each row needs 'prompt' and 'target', or 'instruction' and "
                f"'output'; the file has columns {cols})"
            )
        empty = pc.is_null(ds.data.column(present[0]))
        for c in present[1:]:
            empty = pc.and_(empty, pc.is_null(ds.data.column(c)))
        nulls = pc.sum(empty).as_py() or 0
        if nulls:
            raise ValueError(
                f"{path}: row {pc.index(empty, True).as_py()} has no {' or '.join(map(repr, present))} value "
                f"({nulls} rows without one)"
            )
