"""The run directory under faults (issue 9, persistence): checkpoints that are data and never code, that a kill
at any point cannot lose, a metrics file repaired after a crash, --overwrite that leaves nothing of the old run,
config written by tomli-w, resume with changed settings, and OS errors as one-line messages."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fedrank
from fedrank import checkpoint, run_dir
from fedrank.aggregation import HOMOGENEOUS, METHODS, make_method
from fedrank.checkpoint import CheckpointError
from fedrank.cli import main
from fedrank.config import ConfigError, RunConfig, dumps_config, load_config, to_dict
from fedrank.lowrank import LowRankSVD
from fedrank.run_dir import RunDirError
from fedrank.simulation import Simulation
from fedrank.types import ClientSpec
from helpers import dispatch_and_train as perturbed
from test_simulation import TINY, _interrupt_after, flatten, records, strip_times

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.down_proj": (10, 16)}


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


# ---------------------------------------------------------------------------------------------- helpers
def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Same types, same structure (dict order included), tensors bit-identical with the same dtype and strides."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where  # NaN-safe
        big = [d for d in range(a.ndim) if a.shape[d] > 1]  # strides of size-1 dims do not matter
        assert [a.stride(d) for d in big] == [b.stride(d) for d in big], f"{where}: {a.stride()} != {b.stride()}"
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_identical(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, LowRankSVD):
        for s in LowRankSVD.__slots__:
            assert_identical(getattr(a, s), getattr(b, s), f"{where}.{s}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def roundtrip(obj: Any, kind: str = "state") -> Any:
    return checkpoint.from_bytes(checkpoint.to_bytes(obj, kind), "test", kind)


# ---------------------------------------------------------------------------------------------- 1. no pickle
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_state_round_trips_bit_identically(name: str) -> None:
    opts: dict[str, Any] = {"rank": 4} if name == "fslora" else {}
    method = make_method(name, **opts)
    ranks = [2, 2, 2] if name in HOMOGENEOUS else [2, 4, 3]
    state = method.init_state(SHAPES, max(ranks))
    assert_identical(roundtrip(state), state, name)
    g = torch.Generator().manual_seed(1)
    local: dict[int, Any] = {}
    for rnd in range(3):  # FlexLoRA-like states change type after the first aggregation; RoLoRA alternates
        ups = [perturbed(method, state, ClientSpec(c, r, 5 + c), g, rnd, local.get(c)) for c, r in enumerate(ranks)]
        state = method.aggregate(state, ups, [1.0, 2.0, 3.0])
        for u in ups:
            if (ls := method.local_state(u)) is not None:
                local[u.client_id] = roundtrip(ls, "client_state")
                assert_identical(local[u.client_id], ls)
        back = roundtrip(state)
        assert_identical(back, state, name)
        # the restored state behaves identically: the next dispatch is bit-identical
        a, b = (
            method.dispatch(state, ClientSpec(0, ranks[0], 5), rnd + 1),
            method.dispatch(back, ClientSpec(0, ranks[0], 5), rnd + 1),
        )
        assert_identical(a.factors, b.factors)


def test_checkpoint_tree_keeps_json_values_ints_keys_tuples_nonfinite_and_layouts() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    ck = {
        "round": 3,
        "rank_overrides": {5: 1, 2: 3},
        "metrics_lines": 17,
        "config": to_dict(RunConfig()),
        "torch_rng": torch.get_rng_state(),
        "odd": (1.5, math.nan, -math.inf, None, "s", [True, {"__tensor__": "not a marker"}]),
        "transposed": x.T,  # strides (1, 4): kept
        "sliced": x.T[1:3],  # strides (1, 4) with gaps: kept
        "expanded": torch.ones(3, 1).expand(3, 5),  # stride 0: kept
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }
    back = roundtrip(ck, "checkpoint")
    assert_identical(back, ck)
    assert back["sliced"].stride() == (1, 4) and back["expanded"].stride() == (1, 0)
    with pytest.raises(CheckpointError, match="cannot store a .*Path"):
        checkpoint.to_bytes({"p": Path("x")})
    with pytest.raises(CheckpointError, match="holds a 'checkpoint', not a 'global_state'"):
        checkpoint.from_bytes(checkpoint.to_bytes(ck, "checkpoint"), "f", "global_state")


class Evil:
    """Unpickling an instance creates the directory ``target``: a stand-in for running any code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.target),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_where_a_checkpoint_belongs_is_refused_and_never_run(
    writer: str, cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "would-be-created-by-unpickling"
    payload = {"round": 1, "state": Evil(canary)}
    sanity = tmp_path / "sanity"
    pickle.loads(pickle.dumps({"x": Evil(sanity)}))  # the payload really runs code when unpickled
    assert sanity.is_dir()

    def write(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=4))

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(TINY)
    write(run_dir.checkpoint_path(run, 1))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "round-0001.safetensors is a pickle (torch.save) file" in err and "not loaded" in err
    for path in (run / run_dir.GLOBAL_STATE, run_dir.client_state_path(run, 0, 1)):
        write(path)
        with pytest.raises(CheckpointError, match="is a pickle"):
            checkpoint.load(path)
    assert main(["export", str(run), "--rank", "2", "--out", str(tmp_path / "ad")]) == 2
    assert "is a pickle" in capsys.readouterr().err
    # a run directory of fedrank before 0.2 (checkpoint.pt) is refused the same way
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.toml").write_text(TINY)
    write(old / "checkpoint.pt")
    assert main(["run", "--resume", str(old), "--no-progress"]) == 2
    assert "checkpoint.pt is a checkpoint of fedrank before 0.2 (a pickle)" in capsys.readouterr().err
    assert not canary.exists(), "a pickle was unpickled"


# ---------------------------------------------------------------------------------------------- kill tests
POINTS = [("train", 2), ("aggregate", 2), ("pre-rename", 2), ("post-rename", 2), ("pre-rename", 0)]
KILL_CFG = ["federation.rounds=3", "method.name=fedsa"]  # global state + per-client state (FedSA's B)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("full")
    (d / "tiny.toml").write_text(TINY)
    Simulation(load_config(d / "tiny.toml", KILL_CFG), d / "run", progress=False).run()
    return d / "run"


def run_killed(cfg: Path, out: Path, fault: str) -> subprocess.CompletedProcess[str]:
    """``python -m fedrank run`` as a real child process that SIGKILLs itself at ``fault``."""
    env = {
        **os.environ,
        "FEDRANK_FAULT": fault,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(fedrank.__file__).parents[1]),
    }
    sets = [a for s in KILL_CFG for a in ("--set", s)]
    cmd = [sys.executable, "-m", "fedrank", "run", str(cfg), "--out", str(out), "--no-progress", *sets]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def global_tensors(run: Path) -> list[torch.Tensor]:
    return flatten(checkpoint.load(run / run_dir.GLOBAL_STATE)["state"])


def assert_same_run(run: Path, full: Path) -> None:
    assert strip_times(records(run)) == strip_times(records(full))
    a, b = global_tensors(run), global_tensors(full)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize(("point", "rnd"), POINTS)
def test_a_run_killed_at_any_point_resumes_bit_identically(
    point: str, rnd: int, uninterrupted: Path, cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    proc = run_killed(cfg_path, out, f"{point}:{rnd}")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert f"FEDRANK_FAULT={point}:{rnd}: killing process" in proc.stderr
    assert not (out / run_dir.SUMMARY).exists()
    done = [r for r, _ in run_dir.checkpoints(out)]
    want = {"train": [0, 1], "aggregate": [0, 1], "pre-rename": [0, 1], "post-rename": [0, 1, 2]}[point]
    assert done == (want if rnd else []), done
    if point == "pre-rename" and rnd:  # FedSA's client states of the round that is lost are on disk
        assert any(r == 2 for c in (0, 1, 2, 3) for r in run_dir.client_state_rounds(out, c))
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    if rnd == 0:  # killed before its first complete checkpoint: resumes from the start
        assert "has no complete checkpoint" in err and "restarting from round 0" in err
    else:
        assert f"resuming {out} from {run_dir.checkpoint_path(out, done[-1])}" in err
    assert_same_run(out, uninterrupted)
    assert not list(out.rglob("*.tmp"))
    assert [r for r, _ in run_dir.checkpoints(out)] == [2, 3]  # output.keep_checkpoints = 2


def test_fault_spec_is_checked() -> None:
    from fedrank import faults

    assert faults.parse("post-rename:3") == ("post-rename", 3) and faults.parse("train") == ("train", None)
    with pytest.raises(ValueError, match="unknown fault point 'rename'; points: train, aggregate"):
        faults.parse("rename:1")
    with pytest.raises(ValueError, match="must be an integer"):
        faults.parse("train:x")


# ---------------------------------------------------------------------------------------------- fallback
def interrupted(cfg_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch, after: int, sets: list[str]) -> None:
    with monkeypatch.context() as m:
        _interrupt_after(m, after)
        with pytest.raises(KeyboardInterrupt):
            Simulation(load_config(cfg_path, sets), out, progress=False).run()


def test_a_run_stopped_after_its_round_0_checkpoint_does_not_evaluate_round_0_again(
    uninterrupted: Path, cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped in round 1 (only round-0000, the base model's evaluation, on disk): the resume starts training
    at round 1 without a second round-0 evaluation record or a second count of its time."""
    out = tmp_path / "run"
    interrupted(cfg_path, out, monkeypatch, 0, KILL_CFG)
    assert [r for r, _ in run_dir.checkpoints(out)] == [0]
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert [r["round"] for r in records(out) if r["type"] == "eval"] == [0, 3]
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_corrupt_or_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    damage: str,
    uninterrupted: Path,
    cfg_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    interrupted(cfg_path, out, monkeypatch, 2, KILL_CFG)
    latest, previous = run_dir.checkpoint_path(out, 2), run_dir.checkpoint_path(out, 1)
    data = bytearray(latest.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of the tensor data
    latest.write_bytes({"flip": bytes(data), "truncate": bytes(data[: len(data) // 2]), "empty": b""}[damage])
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    why = "does not match its checksum" if damage == "flip" else "truncated"
    assert f"skipping checkpoint {latest}" in err and why in err
    assert f"falling back from {latest} to {previous}" in err
    assert_same_run(out, uninterrupted)


def test_every_checkpoint_corrupt_is_an_error_naming_them(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    interrupted(cfg_path, out, monkeypatch, 1, ["federation.rounds=2"])
    for _, p in run_dir.checkpoints(out):
        p.write_bytes(p.read_bytes()[:100])
    assert main(["run", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedrank: error: no usable checkpoint in") and "round-0000" in err and "round-0001" in err


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_cut_mid_line_is_repaired_on_resume(
    uninterrupted: Path,
    cfg_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 9 case 4: on main the cut line survived the resume and the run failed at its end."""
    out = tmp_path / "run"
    interrupted(cfg_path, out, monkeypatch, 2, KILL_CFG)
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"type": "client", "round": 3, "junk": True}) + "\n" + '{"type": "client", "rou')
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "dropped 1 record(s) written after round-0002.safetensors and a partial last line of 23 bytes" in err
    assert_same_run(out, uninterrupted)


def test_metrics_missing_counted_records_fall_back_to_an_older_checkpoint(
    uninterrupted: Path,
    cfg_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    interrupted(cfg_path, out, monkeypatch, 2, KILL_CFG)
    m = out / "metrics.jsonl"
    m.write_bytes(m.read_bytes()[:-10])  # the last record counted by round 2's checkpoint is cut
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fewer than the" in err and "falling back from" in err and "round-0001.safetensors" in err
    assert_same_run(out, uninterrupted)


def test_non_finite_metrics_are_written_as_null(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 case 4: NaN in metrics.jsonl is not JSON; now null, and the run still writes its summary."""
    import fedrank.simulation as sim_mod

    real = sim_mod.evaluate_task

    def diverged(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {**real(*args, **kwargs), "loss": math.nan, "perplexity": math.inf}

    monkeypatch.setattr(sim_mod, "evaluate_task", diverged)
    out = tmp_path / "run"
    Simulation(load_config(cfg_path, ["federation.rounds=1"]), out, progress=False).run()

    def strict(text: str) -> Any:
        def bad(c: str) -> Any:
            raise ValueError(f"not JSON: {c}")

        return json.loads(text, parse_constant=bad)

    recs = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if r["type"] == "eval"][-1]
    assert ev["unseen_avg"]["loss"] is None and ev["unseen_avg"]["perplexity"] is None
    summary = strict((out / "summary.json").read_text())
    assert summary["unseen_after"]["loss"] is None and summary["unseen_change"]["loss"] is None


# ---------------------------------------------------------------------------------------------- overwrite
def test_overwrite_leaves_nothing_of_the_old_run(cfg_path: Path, tmp_path: Path) -> None:
    """Issue 9 case 1: the old run's FedSA client states were loaded by the new one."""
    args = ["run", str(cfg_path), "--no-progress", "--set", "method.name=fedsa", "--set", "federation.rounds=3"]
    fresh, reused = tmp_path / "fresh", tmp_path / "reused"
    assert main([*args, "--out", str(fresh)]) == 0
    assert main([*args, "--out", str(reused), "--set", "seed=1", "--set", "partition.seed=1"]) == 0
    assert main([*args, "--out", str(reused)]) == 2  # not without --overwrite
    assert main([*args, "--out", str(reused), "--overwrite"]) == 0
    assert_same_run(reused, fresh)
    assert sorted(p.relative_to(reused) for p in reused.rglob("*")) == sorted(
        p.relative_to(fresh) for p in fresh.rglob("*")
    )


def test_a_failed_overwrite_leaves_no_old_outputs(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 case 1: after a failed overwrite the old summary, global state and adapter sat next to the new
    config, and export exported the old model under it."""
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(out), "--no-progress", "--set", "output.plots=true"]) == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code = main(["run", str(cfg_path), "--out", str(out), "--overwrite", "--no-progress", "--set", "seed=5"])
        assert code == 130  # Ctrl-C: one line, exit 130
    names = {p.name for p in out.iterdir()} - {run_dir.LOCK}
    assert names == {"config.toml", "metrics.jsonl", "checkpoints"}, names
    # export now takes the new run's newest checkpoint, under the new config
    assert main(["export", str(out), "--rank", "2", "--out", str(tmp_path / "ad")]) == 0
    _, saved, source = run_dir.load_global_state(out)
    assert saved["seed"] == 5 and source == run_dir.checkpoint_path(out, 1)
    # and a state file that does not belong to config.toml (the mix main left behind) is never exported
    (out / "config.toml").write_text(dumps_config(load_config(cfg_path, ["seed=6"])))
    capsys.readouterr()
    assert main(["export", str(out), "--rank", "2", "--out", str(tmp_path / "ad2")]) == 2
    err = capsys.readouterr().err
    assert "round-0001.safetensors was written under another config than" in err and "(differs in seed)" in err


def test_overwrite_refuses_a_directory_holding_other_files(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(TINY)
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(cfg_path), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fedrank: error: refusing to empty {out}: it holds files that are not a fedrank run's (notes.txt); "
        "remove them or choose another output directory"
    )
    assert sorted(p.name for p in out.iterdir()) == [run_dir.LOCK, "config.toml", "notes.txt"]  # nothing removed


def test_compare_and_export_refuse_a_non_empty_directory_without_overwrite(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 case 1: compare into an existing directory and export --out into a run directory overwrote."""
    run = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(run), "--no-progress", "--set", "federation.rounds=1"]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for overwrite in ([], ["--overwrite"]):  # a run directory is never an export target
        assert main(["export", str(run), "--rank", "2", "--out", str(run), *overwrite]) == 2
    err = capsys.readouterr().err
    assert f"{run} is not empty; pass --overwrite" in err
    assert f"refusing to empty {run}: it holds files that are not an exported adapter's (adapter, checkpoints" in err
    assert main(["compare", str(cfg_path), "--methods", "fedit", "--out", str(run), "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    ad = tmp_path / "ad"
    assert main(["export", str(run), "--rank", "2", "--out", str(ad)]) == 0
    assert main(["export", str(run), "--rank", "3", "--out", str(ad)]) == 2
    assert main(["export", str(run), "--rank", "3", "--out", str(ad), "--overwrite"]) == 0
    assert json.loads((ad / "adapter_config.json").read_text())["r"] == 3


def test_compare_overwrite_clears_only_a_comparison_layout(tmp_path: Path) -> None:
    cmp = tmp_path / "cmp"
    (cmp / "flexlora" / "seed0" / "checkpoints").mkdir(parents=True)
    (cmp / "flexlora" / "seed0" / "config.toml").write_text("")
    (cmp / "comparison.md").write_text("")
    with pytest.raises(RunDirError, match="is not empty"):
        run_dir.prepare_output(cmp, "compare", overwrite=False)
    (cmp / "flexlora" / "seed0" / "mine.txt").write_text("")
    (cmp / "notes").mkdir()
    with pytest.raises(RunDirError, match=r"not a fedrank comparison's \(flexlora/seed0/mine.txt, notes\)"):
        run_dir.prepare_output(cmp, "compare", overwrite=True)
    (cmp / "flexlora" / "seed0" / "mine.txt").unlink()
    (cmp / "notes").rmdir()
    run_dir.prepare_output(cmp, "compare", overwrite=True)
    assert list(cmp.iterdir()) == []


# ---------------------------------------------------------------------------------------------- config
def test_resolved_config_round_trips_through_tomli_w_for_every_field(tmp_path: Path) -> None:
    data = {
        "seed": 7,
        "model": {
            "name": "tiny",
            "target_modules": ["q_proj", "v_proj"],
            "alpha": 8.0,
            "rslora": True,
            "device": "auto",
            "onednn": False,
        },
        "data": {
            "source": "jsonl",
            "paths": ["a.jsonl", 'dir with "quotes"\\b.jsonl'],
            "group_by": "task",
            "cache_dir": "/tmp/cäche\nline",
            "synthetic_tasks": 5,
            "synthetic_examples": 9,
            "path": "/checkout with 'quotes'",
            "suite": "mmlu",
            "prompt_format": "plain",
            "scripts": ["non-latin", "latin"],
            "max_prompt_chars": 7,
            "license_exceptions": True,
        },
        "partition": {
            "kind": "dirichlet",
            "num_clients": 7,
            "num_eval_tasks": 2,
            "holdout": "task",
            "eval_keywords": ["x"],
            "tasks": ["t1", "t2"],
            "dirichlet_alpha": 0.25,
            "test_fraction": 0.3,
            "min_examples": 3,
            "max_examples_per_client": 11,
            "max_eval_examples": 13,
            "seed": 5,
        },
        "ranks": {"distribution": "budget", "choices": [2, 8], "budgets_mib": [1.5, 3.0], "per_client": [2, 8]},
        "method": {
            "name": "hetlora",
            "options": {"x": 1, "nested": {"a": [1, 2], "b": "s"}, "f": 1e-7},
            "prune": {"reg": 0.01, "gamma": 0.5, "threshold": 0.9},
            "per_method": {"fslora": {"server_lr": 0.5, "normalize": "holders"}, "flexlora": {}},
        },
        "federation": {
            "rounds": 4,
            "clients_per_round": 0,
            "fraction": 0.5,
            "min_clients": 2,
            "max_skipped_rounds": 5,
            "dropout": 0.25,
            "client_deadline_s": 30.5,
            "max_update_norm": 10.0,
            "weighting": "seen",
        },
        "train": {
            "lr": 1e-4,
            "weight_decay": 0.01,
            "warmup_steps": 1,
            "steps": 0,
            "epochs": 1.5,
            "batch_size": 3,
            "grad_accum": 2,
            "max_grad_norm": 0.5,
            "max_seq_len": 64,
            "precision": "bf16",
            "optimizer": "sgd",
            "momentum": 0.5,
            "nesterov": True,
            "pack": False,
            "pass_tokens": 100,
        },
        "eval": {
            "every": 2,
            "before": False,
            "participants": 1,
            "seen_by": "task",
            "reuse_base": False,
            "settings": {
                "max_new_tokens": 3,
                "max_new_tokens_cap": 5,
                "batch_size": 2,
                "generate_batch_size": 4,
                "max_seq_len": 32,
                "generate": False,
            },
        },
        "output": {"dir": "runs/x", "export_rank": 3, "plots": False, "keep_checkpoints": 3, "tensorboard": True},
    }
    from fedrank.config import from_dict

    cfg: RunConfig = from_dict(RunConfig, data)
    default = to_dict(RunConfig())

    def leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            is_section = isinstance(v, dict) and key not in ("method.options", "method.prune", "method.per_method")
            out.update(leaves(v, key) if is_section else {key: v})
        return out

    same = [k for k, v in leaves(to_dict(cfg)).items() if leaves(default)[k] == v]
    # method.scale = "fold" excludes HetLoRA's pruning (set above), and [privacy] excludes pruning and
    # max_update_norm: they round-trip in configs of their own (below)
    same = [k for k in same if not k.startswith(("privacy.", "secure."))]
    assert same == ["method.scale"], f"give these config fields a non-default value in this test: {same}"
    p = tmp_path / "config.toml"
    p.write_text(dumps_config(cfg))
    assert load_config(p) == cfg
    from fedrank.config import override

    private = override(
        RunConfig(),
        {
            "method.name": "fedit",
            "ranks.distribution": "fixed",
            "federation.weighting": "uniform",
            "privacy.clip": 0.5,
            "privacy.noise_multiplier": 1.2,
            "privacy.epsilon": 9.0,
            "privacy.delta": 1e-6,
            "privacy.accountant": "pld",
            "privacy.seeded": True,
            "privacy.sampling": "poisson",
        },
    )
    left = [k for k, v in leaves(to_dict(private)).items() if k.startswith("privacy.") and leaves(default)[k] == v]
    assert left == [], f"give these privacy fields a non-default value in this test: {left}"
    p.write_text(dumps_config(private))
    assert load_config(p) == private
    secure = override(
        RunConfig(),
        {
            "method.name": "ffa",
            "secure.enabled": True,
            "secure.shares": 0.6,
            "secure.threshold": 0.8,
            "secure.clip_range": 2.5,
            "secure.quantization_range": 2**20,
            "secure.modulus_range": 2**30,
        },
    )
    left = [k for k, v in leaves(to_dict(secure)).items() if k.startswith("secure.") and leaves(default)[k] == v]
    assert left == [], f"give these secure fields a non-default value in this test: {left}"
    p.write_text(dumps_config(secure))
    assert load_config(p) == secure
    folded = from_dict(RunConfig, {"method": {"name": "fedsa", "scale": "fold"}})
    p.write_text(dumps_config(folded))
    assert load_config(p) == folded and folded.method.scale == "fold"
    assert not hasattr(fedrank.config, "dumps_toml")


def test_resume_may_change_output_and_eval_settings_only(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    interrupted(cfg_path, out, monkeypatch, 1, [])
    bad = ["--set", "train.lr=0.5", "--set", "method.options={components = 3}", "--set", "output.plots=true"]
    assert main(["run", "--resume", str(out), "--no-progress", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume: method.options.components (unset -> 3), train.lr (0.01 -> 0.5) differ(s) from the config" in err
    assert "output.plots" not in err.split("; only")[0] and "only output.*, eval.*, data.cache_dir.* may change" in err
    ok = ["--set", "output.plots=true", "--set", "eval.participants=0", "--set", "output.keep_checkpoints=1"]
    assert main(["run", "--resume", str(out), "--no-progress", *ok]) == 0
    assert load_config(out / "config.toml").output.keep_checkpoints == 1
    assert [r for r, _ in run_dir.checkpoints(out)] == [2] and (out / "plots").is_dir()


# ---------------------------------------------------------------------------------------------- OS errors
def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedrank: error: ")
    return last


def test_out_under_a_regular_file_is_a_one_line_error(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 case 7."""
    f = tmp_path / "file"
    f.write_text("")
    assert main(["run", str(cfg_path), "--out", str(f / "run"), "--no-progress"]) == 2
    assert one_line_error(capsys) == f"fedrank: error: cannot create output directory {f / 'run'}: Not a directory"
    assert main(["run", str(cfg_path), "--out", str(f), "--no-progress"]) == 2
    assert one_line_error(capsys) == f"fedrank: error: output directory {f} exists and is not a directory"
    assert main(["run", "--resume", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "holds no config.toml" in one_line_error(capsys)
    # a missing parent is created
    assert (
        main(
            ["run", str(cfg_path), "--out", str(tmp_path / "a" / "b"), "--no-progress", "--set", "federation.rounds=1"]
        )
        == 0
    )


def test_read_only_output_directory_is_a_one_line_error(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 case 7. Root ignores permission bits, so the read-only file system is simulated at os.open."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["run", str(cfg_path), "--out", str(ro / "run"), "--no-progress"]) == 2
    assert (
        one_line_error(capsys)
        == f"fedrank: error: output directory {ro / 'run'} is not writable: Read-only file system"
    )
    if os.geteuid() != 0:  # the real thing, where permission bits apply
        monkeypatch.setattr(os, "open", real_open)
        ro.chmod(0o500)
        try:
            assert main(["run", str(cfg_path), "--out", str(ro / "x"), "--no-progress"]) == 2
            assert "Permission denied" in one_line_error(capsys)
        finally:
            ro.chmod(0o700)


def test_disk_full_is_a_one_line_error_and_the_run_resumes(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 case 7: ENOSPC while writing round 1's checkpoint; no temporary is left, --resume continues."""
    real = checkpoint._write_synced

    def full(path: Path, data: bytes) -> None:
        if path.name == ".round-0001.safetensors.tmp":
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_write_synced", full)
        assert main(["run", str(cfg_path), "--out", str(out), "--no-progress"]) == 2
    tmp = out / "checkpoints" / ".round-0001.safetensors.tmp"
    assert one_line_error(capsys) == f"fedrank: error: no space left on device: {tmp}"
    assert not tmp.exists() and [r for r, _ in run_dir.checkpoints(out)] == [0]
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0


def test_free_space_is_checked_before_training(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(out), "--no-progress"]) == 2
    msg = one_line_error(capsys)
    assert msg.startswith(f"fedrank: error: output directory {out} has 0.0 MiB free; a checkpoint of this run needs")
    assert not (out / "metrics.jsonl").exists(), "nothing may train before the check"
    with pytest.raises(RunDirError, match="needs about 1.0 MiB"):
        run_dir.check_writable(out, run_dir.checkpoint_bytes({"t": torch.zeros(10)}))
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        load_config(cfg_path, ["output.keep_checkpoints=0"])


def test_the_simulator_refuses_secure_aggregation_before_making_a_directory(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[secure] runs on Flower only: run and compare refuse it in one line, leaving nothing behind."""
    secure = ["--set", "secure.enabled=true", "--set", "method.name=ffa"]
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress", *secure]) == 2
    assert main(["compare", str(cfg_path), "--methods", "ffa", "--out", str(tmp_path / "cmp"), *secure]) == 2
    err = capsys.readouterr().err
    assert err.count("fedrank: error: secure aggregation ([secure] enabled) runs on Flower") == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()
