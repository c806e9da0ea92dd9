"""A run directory and users' data files are untrusted input (issue parts 4 and 6): crafted or damaged files
are refused with one line naming the file and what is wrong, --resume falls back past a crafted newest
checkpoint (its checksum recomputed: the checksum is integrity, not authenticity), and a partition that would
leave clients without data is refused before training."""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from fedrank import checkpoint, run_dir
from fedrank.aggregation import HOMOGENEOUS, METHODS, make_method
from fedrank.checkpoint import FORMAT, CheckpointError
from fedrank.cli import main
from fedrank.config import load_config
from fedrank.data.files import FileStore
from fedrank.data.partition import Federation, PartitionConfig
from fedrank.data.synthetic import synthetic_store
from fedrank.lowrank import LowRankSVD
from fedrank.simulation import Simulation
from fedrank.types import ClientSpec, LoraFactors
from fedrank.untrusted import DataError, load_json, state_bytes_limit, validate_state
from helpers import dispatch_and_train as perturbed
from helpers import tiny_toml
from test_persistence import SHAPES
from test_simulation import TINY, _interrupt_after, records

DEEP = 5000
"""Nesting far past Python's recursion limit (1000)."""


def deep(n: int = DEEP) -> str:
    return "[" * n + "]" * n


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-round FlexLoRA run stopped after round 2: checkpoints of rounds 1 and 2."""
    root = tmp_path_factory.mktemp("stopped")
    cfg = root / "tiny.toml"
    cfg.write_text(TINY)
    with pytest.MonkeyPatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            Simulation(load_config(cfg, ["federation.rounds=3"]), root / "run", progress=False).run()
    assert [r for r, _ in run_dir.checkpoints(root / "run")] == [1, 2]
    return root / "run"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    cfg = root / "tiny.toml"
    cfg.write_text(TINY)
    Simulation(load_config(cfg), root / "run", progress=False).run()
    return root / "run"


@pytest.fixture()
def run(stopped: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


@pytest.fixture()
def done(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "done"
    shutil.copytree(finished, out)
    return out


def write_crafted(path: Path, manifest: str, tensors: dict[str, torch.Tensor], kind: str = "checkpoint") -> None:
    """A checkpoint file holding ``manifest`` as is, with its checksum recomputed (as anyone can)."""
    meta = {"format": FORMAT, "kind": kind, "manifest": manifest, "sha256": checkpoint._digest(kind, manifest, tensors)}
    path.write_bytes(st_save(tensors, metadata=meta))


def write_header(path: Path, header: dict[str, Any] | str, data_bytes: int) -> None:
    """A safetensors file of ``header`` and ``data_bytes`` of tensor data, as a sparse file (no disk used)."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + data_bytes)


def real_meta(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta: dict[str, Any] = json.loads(data[8 : 8 + n])["__metadata__"]
    return meta


@pytest.fixture()
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="fedrank"):
        yield caplog


def resume(out: Path) -> Simulation:
    """--resume up to the restore (the model is built, nothing trains)."""
    return Simulation(load_config(out / "config.toml"), out, resume=True, progress=False)


def assert_fell_back(out: Path, sim: Simulation, log: pytest.LogCaptureFixture, why: str) -> None:
    latest, previous = run_dir.checkpoint_path(out, 2), run_dir.checkpoint_path(out, 1)
    skipped = [r.getMessage() for r in log.records if r.getMessage().startswith(f"skipping checkpoint {latest}")]
    assert len(skipped) == 1 and why in skipped[0], skipped or log.text
    assert "\n" not in skipped[0]
    assert f"falling back from {latest} to {previous}" in log.text
    assert sim.start_round == 1 and latest.with_name(latest.name + ".bad").exists()
    assert len(records(out)) == sim.metrics_lines


# ---------------------------------------------------------------------------------------------- untrusted JSON
def test_load_json_bounds_depth_and_size_with_one_line() -> None:
    assert load_json(deep(64), "x") == load_json("[" * 64 + "]" * 64, "x")
    for text, why in [
        (deep(65), "x is nested deeper than 64 levels"),
        (deep(), "x is nested deeper than 64 levels"),
        ('{"a": ' * DEEP + "1" + "}" * DEEP, "x is nested deeper than 64 levels"),
        ("[1, 2", "x is not JSON ("),
        (b'"\xff"', "x is not UTF-8 text (byte 0xff at offset 1)"),
        ("1" * 100_001, "x is 100001 bytes, more than the 100000 fedrank reads"),
    ]:
        with pytest.raises(DataError) as e:
            load_json(text, "x", max_bytes=100_000)
        assert why in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_state_passes_the_restore_checks(name: str) -> None:
    """What the checks refuse is only what no run writes: every method's state after 3 aggregations (mixed
    ranks, FlexLoRA-like states that change shape, FedSA's B) passes against its initial state and alone,
    within the byte bound."""
    opts: dict[str, Any] = {"rank": 4} if name == "fslora" else {}
    method = make_method(name, **opts)
    ranks = [2, 2, 2] if name in HOMOGENEOUS else [2, 4, 3]
    init = method.init_state(SHAPES, max(ranks))
    bound = max(ranks) * len(ranks)
    state = init
    g = torch.Generator().manual_seed(1)
    for rnd in range(3):
        ups = [perturbed(method, state, ClientSpec(c, r, 5 + c), g, rnd) for c, r in enumerate(ranks)]
        state = method.aggregate(state, ups, [1.0, 2.0, 3.0])
        back = checkpoint.from_bytes(checkpoint.to_bytes(state), "test")
        validate_state(back, init, rank_bound=bound)
        validate_state(back)
        assert checkpoint.tensor_bytes(back) <= state_bytes_limit(init, bound)


def _deep_header(path: Path) -> None:
    meta = json.dumps({"format": FORMAT, "kind": "checkpoint", "manifest": "{}", "sha256": "0"})
    write_header(path, '{"__metadata__": ' + meta + ', "x": ' + deep() + "}", 0)


def _deep_manifest(path: Path) -> None:
    write_crafted(path, deep(), {})


def _huge_declared(path: Path) -> None:  # the header claims 20 GiB and the (sparse) file holds them
    header = {
        "__metadata__": real_meta(path),
        "0:x": {"dtype": "F32", "shape": [5 * 2**30], "data_offsets": [0, 20 * 2**30]},
    }
    write_header(path, header, 20 * 2**30)


def _huge_file(path: Path) -> None:  # a real header, the file extended to 20 GiB
    with path.open("r+b") as f:
        f.truncate(20 * 2**30)


def _edit(change: Any) -> Any:
    def craft(path: Path) -> None:
        ck = checkpoint.load(path, kind="checkpoint")
        change(ck)
        checkpoint.save(ck, path, kind="checkpoint")  # a valid checksum over the lie

    return craft


def _svd_shape(ck: dict[str, Any]) -> None:
    svd = ck["state"].svd
    k = next(iter(svd))
    s = svd[k]
    svd[k] = LowRankSVD(torch.cat([s.U, torch.zeros(1, s.U.shape[1])]), s.S, s.Vh)  # consistent, one row too many


def _float64(ck: dict[str, Any]) -> None:
    delta = ck["state"].delta
    for k, f in delta.items():
        delta[k] = LoraFactors(f.B.double(), f.A.double())


def _scaled(ck: dict[str, Any]) -> None:
    delta = ck["state"].delta
    k = next(iter(delta))
    delta[k] = LoraFactors(delta[k].B * 1e30, delta[k].A)


CRAFTED = {
    "deep-header": (_deep_header, "its safetensors header is nested deeper than 64 levels"),
    "deep-manifest": (_deep_manifest, "its manifest is nested deeper than 64 levels"),
    "huge-declared": (_huge_declared, "declares 20.00 GiB of tensors, more than a checkpoint of this run holds"),
    "huge-file": (_huge_file, "is truncated or corrupt: its header declares"),
    "svd-shape": (_edit(_svd_shape), "layer, but this run's layer is"),
    "rng": (
        _edit(lambda ck: ck.update(torch_rng=torch.zeros(16, dtype=torch.uint8))),
        "torch_rng is torch.uint8 (16,)",
    ),
    "float64": (_edit(_float64), "is torch.float64, but this run's state is torch.float32"),
    "scaled-1e30": (_edit(_scaled), "B holds a value of magnitude "),
    "metrics_lines=0": (
        _edit(lambda ck: ck.update(metrics_lines=0)),
        "counts the records of rounds [], not of rounds 1..2",
    ),
    "metrics_lines=-2": (_edit(lambda ck: ck.update(metrics_lines=-2)), "metrics_lines = -2 is not a count"),
    "round=99": (_edit(lambda ck: ck.update(round=99)), "round = 99 is outside 0..3 (federation.rounds)"),
    "elapsed=-1": (_edit(lambda ck: ck.update(elapsed_seconds=-1.0)), "elapsed_seconds = -1.0 is not a duration"),
    "elapsed=nan": (_edit(lambda ck: ck.update(elapsed_seconds=math.nan)), "elapsed_seconds = nan is not a duration"),
    "elapsed=text": (_edit(lambda ck: ck.update(elapsed_seconds="1")), "elapsed_seconds = '1' is not a duration"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_newest_checkpoint_is_refused_and_resume_falls_back(
    case: str, run: Path, warnings: pytest.LogCaptureFixture
) -> None:
    craft, why = CRAFTED[case]
    craft(run_dir.checkpoint_path(run, 2))
    assert_fell_back(run, resume(run), warnings, why)


def test_a_crafted_checkpoint_resumes_from_the_older_one_and_trains_to_the_end(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """round = 99 used to give "after = round 0" without training: now round 2's checkpoint is skipped and
    rounds 2 and 3 are trained again."""
    _edit(lambda ck: ck.update(round=99))(run_dir.checkpoint_path(run, 2))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "round = 99 is outside 0..3" in capsys.readouterr().err
    recs = records(run)
    assert [r["round"] for r in recs if r["type"] == "round"] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["eval_after_round"] == 3


def test_a_resumed_runs_seconds_count_its_earlier_sittings(run: Path) -> None:
    """The summary's seconds (and the study's compute, read from them) span every sitting: the stopped
    sitting's time up to its checkpoint, made 1000 s here, plus the resumed sitting's."""
    path = run_dir.checkpoint_path(run, 2)
    before = checkpoint.load(path, kind="checkpoint")["elapsed_seconds"]
    assert 0 < checkpoint.load(run_dir.checkpoint_path(run, 1), kind="checkpoint")["elapsed_seconds"] < before
    _edit(lambda ck: ck.update(elapsed_seconds=1000.0))(path)
    t0 = time.perf_counter()
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    sitting = time.perf_counter() - t0
    s = json.loads((run / "summary.json").read_text())
    assert 1000.0 < s["seconds"] < 1000.0 + sitting
    assert 1000.0 < s["time_split"]["total"] < 1000.0 + sitting + s["load_seconds"] + s["data_seconds"]
    assert checkpoint.load(run_dir.checkpoint_path(run, 3), kind="checkpoint")["elapsed_seconds"] > 1000.0


def test_every_checkpoint_crafted_is_one_line(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for _, p in run_dir.checkpoints(run):
        _huge_declared(p)
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedrank: error: no usable checkpoint in") and last.count("declares 20.00 GiB") == 2


def test_checkpoint_load_reads_nothing_past_a_lying_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "round-0009.safetensors"
    checkpoint.save({"t": torch.ones(3)}, path)
    _huge_declared(path)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 2**30)
    with pytest.raises(CheckpointError, match=r"declares 20\.00 GiB of tensors, more than the 1\.00 GiB of memory"):
        checkpoint.load(path)
    bad = {"__metadata__": {}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    write_header(path, bad, 8)
    with pytest.raises(CheckpointError, match=r"tensor 'a' \(F32 \[4\]\) needs 16 bytes, its offsets span 8"):
        checkpoint.load(path)


def test_a_crafted_global_state_is_refused_by_export(
    done: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    final = done / run_dir.GLOBAL_STATE
    good = final.read_bytes()
    write_crafted(final, deep(), {}, kind="global_state")
    assert main(["export", str(done), "--rank", "2", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"fedrank: error: {final}: its manifest is nested deeper than 64 levels")
    final.write_bytes(good)
    g = checkpoint.load(final, kind="global_state")
    svd = g["state"].svd
    k = next(iter(svd))
    svd[k] = LowRankSVD(svd[k].U[:-1], svd[k].S, svd[k].Vh)
    checkpoint.save(g, final, kind="global_state")
    assert main(["export", str(done), "--rank", "2", "--out", str(tmp_path / "b")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"fedrank: error: {final}: state.svd[") and "layer" in last


# ---------------------------------------------------------------------------------------------- fedrank report
def assert_named(rc: int, err: str, path: Path, line: int | None = None) -> None:
    """No traceback; the file (and its line or record) named on one line: an error (exit 2) or a warning."""
    assert "Traceback" not in err, err
    assert rc in (0, 2), err
    if rc == 2:
        last = err.strip().splitlines()[-1]
        assert last.startswith("fedrank: error: ") and str(path) in last, err
    named = [x for x in err.splitlines() if str(path) in x]
    assert named, err
    if line is not None:
        assert any(f"line {line}" in x or f"record {line}" in x for x in named), err


def test_report_refuses_a_deeply_nested_metrics_line(done: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = done / "metrics.jsonl"
    lines = m.read_text().splitlines()
    lines.insert(2, deep())
    m.write_text("\n".join(lines) + "\n")
    assert main(["report", str(done)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"fedrank: error: {m} line 3 is nested deeper than 64 levels")


def test_report_refuses_a_huge_metrics_line(done: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = done / "metrics.jsonl"
    with m.open("a") as f:
        f.write('{"type": "x", "pad": "' + "a" * (65 * 2**20) + '"}\n')
    assert main(["report", str(done)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    n = len(m.read_text().splitlines())
    assert last.startswith(f"fedrank: error: {m} line {n} is ") and "more than the 67108864 fedrank reads" in last


@pytest.mark.parametrize(
    "damage",
    ["list-record", "no-type", "train_loss-abc", "summary-list", "summary-deep", "mathtext-method"],
)
def test_report_on_damaged_files_names_file_and_line_without_a_traceback(
    damage: str, done: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m, s = done / "metrics.jsonl", done / "summary.json"
    lines = m.read_text().splitlines()
    line: int | None = None
    path = m
    if damage == "list-record":
        lines.insert(1, "[1, 2]")
        line = 2
    elif damage == "no-type":
        rec = json.loads(lines[1])
        del rec["type"]
        lines[1] = json.dumps(rec)
        line = 2
    elif damage == "train_loss-abc":
        i = next(i for i, x in enumerate(lines) if json.loads(x)["type"] == "round")
        rec = json.loads(lines[i])
        rec["train_loss"] = "abc"
        lines[i] = json.dumps(rec)
        line = i + 1
    elif damage == "summary-list":
        s.write_text("[1]")
        path = s
    elif damage == "summary-deep":
        s.write_text(deep())
        path = s
    else:
        cfg = done / "config.toml"
        cfg.write_text(cfg.read_text().replace('name = "flexlora"', 'name = "$\\\\frac{$"', 1))
        assert "frac" in cfg.read_text()
    m.write_text("\n".join(lines) + "\n")
    rc = main(["report", str(done)])
    err = capsys.readouterr().err
    if damage == "mathtext-method":
        assert rc == 0 and "Traceback" not in err and (done / "plots" / "eval.png").is_file()
        return
    assert_named(rc, err, path, line)


# ---------------------------------------------------------------------------------------------- users' data
def test_invalid_utf8_in_a_data_row_is_named_at_indexing(tmp_path: Path) -> None:
    good = '{"prompt": "p", "target": "t"}\n'
    jl = tmp_path / "rows.jsonl"
    jl.write_bytes(good.encode() * 2 + b'{"prompt": "caf\xe9", "target": "t"}\n' + good.encode())
    with pytest.raises(ValueError) as e:
        FileStore([jl])
    assert (
        str(e.value)
        == f"data file {jl}: line 3 (row 2) is not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"
    )
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b"prompt,target\np,t\nq,\xff\n")
    with pytest.raises(ValueError, match=r"rows\.csv: line 3 \(row 1\) is not UTF-8 text \(byte 0xff at column 3\)"):
        FileStore([csv])
    js = tmp_path / "rows.json"
    js.write_bytes(b'[\n{"prompt": "p", "target": "t"},\n{"prompt": "\xc3(", "target": "t"}\n]\n')
    with pytest.raises(ValueError, match=r"rows\.json: line 3 is not UTF-8 text \(byte 0xc3 at column 13\)"):
        FileStore([js])


def test_invalid_utf8_in_a_parquet_string_is_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = pa.array([b"p", b"q\xff", b"r"], type=pa.binary()).view(pa.string())
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": bad, "target": pa.array(["t", "u", "v"])}), path)
    with pytest.raises(ValueError, match=r"rows\.parquet: row 1 column 'prompt' is not UTF-8 text \(byte 0xff"):
        FileStore([path])


def test_empty_and_header_only_files_say_they_hold_no_rows(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data file .*empty\.jsonl is empty \(0 bytes\): it holds no rows"):
        FileStore([empty])
    blank = tmp_path / "blank.csv"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.csv is blank \(whitespace only\): it holds no rows"):
        FileStore([blank])
    header = tmp_path / "header.csv"
    header.write_text("prompt,target\n")
    with pytest.raises(ValueError, match=r"header\.csv holds a header \(prompt, target\) but no data rows"):
        FileStore([header])
    no_rows = tmp_path / "none.json"
    no_rows.write_text("[]")
    with pytest.raises(ValueError, match=r"none\.json holds no rows; fill it or remove it from data\.paths"):
        FileStore([no_rows])


def test_a_deeply_nested_list_cell_is_one_line(tmp_path: Path) -> None:
    csv = tmp_path / "mc.csv"
    csv.write_text('prompt,target,choices\np,t,"' + deep() + '"\n')
    with pytest.raises(ValueError, match=r"mc\.csv: row 0: column 'choices' is nested deeper than 64 levels"):
        FileStore([csv]).examples("mc")


# ---------------------------------------------------------------------------------------------- part 6
def test_task_partition_with_clients_beyond_the_examples_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress", "--set", "partition.num_clients=100000"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedrank: error: partition.kind 'task': partition.num_clients = 100000 clients share")
    assert "some clients would hold none" in last and "Lower partition.num_clients to at most" in last
    assert not (out / "metrics.jsonl").exists() and not (out / "adapter").exists()
    # the bound is exact: at most that many clients each hold an example, one more is refused
    store = synthetic_store(8, 16)
    most = int(last.rsplit(" ", 1)[1])
    fed = Federation(store, PartitionConfig(kind="task", num_clients=most, num_eval_tasks=2, min_examples=8))
    assert min(fed.num_examples(c) + fed.num_test_examples(c) for c in range(most)) >= 1
    with pytest.raises(ValueError, match=f"at most {most}$"):
        Federation(store, PartitionConfig(kind="task", num_clients=most + 1, num_eval_tasks=2, min_examples=8))


def test_a_crafted_fedsa_client_state_is_blamed_on_its_file(tmp_path: Path) -> None:
    """FedSA's persisted per-client B (clients/<id>/after-round-N.safetensors) is a run-directory file too: a
    non-finite, ×1e30, non-float or non-map one is refused naming the file, before any client trains on it."""
    import torch

    from fedrank import checkpoint, run_dir
    from fedrank.config import load_config
    from fedrank.simulation import Simulation

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_toml(method={"name": "fedsa"}, federation={"rounds": 1}))
    sim = Simulation(load_config(cfg), tmp_path / "run", progress=False)
    sim.run()
    cid = next(c for c in range(sim.fed.num_clients) if run_dir.client_state_rounds(sim.out, c))
    path = run_dir.client_state_path(sim.out, cid, 1)
    good = checkpoint.load(path)
    assert sim._load_local(cid, 1) is not None
    name = next(iter(good))
    for bad, why in (
        ({**good, name: good[name] * 1e30 + 1}, "above"),
        ({**good, name: torch.full_like(good[name], float("nan"))}, "not finite"),
        ({**good, name: good[name].to(torch.int64)}, "torch.int64"),
        ([1, 2], "not a client state"),
    ):
        checkpoint.save(bad, path, kind="client_state")
        with pytest.raises(checkpoint.CheckpointError, match=why) as err:
            sim._load_local(cid, 1)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_crafted_config_toml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory's config.toml nested 100,000 deep (tomllib's RecursionError) or not UTF-8: --resume says so
    in one line."""
    from fedrank.cli import main

    for name, raw in (("deep", b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n"), ("bytes", b"seed = 0\n\xff\n")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.toml").write_bytes(raw)
        assert main(["run", "--resume", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(run / "config.toml") in err[0], err
