"""A run directory is untrusted and has one writer: links planted where fedrank writes are refused, a second
writer is refused while the first holds the lock (released by the kernel on SIGKILL), an interrupted
comparison resumes, Ctrl-C is one line."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedrank import run_dir as rd
from fedrank.cli import main
from helpers import tiny_toml


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(tiny_toml(federation={"rounds": 1}))
    return p


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (plots and report on), copied by the tests that plant links in it."""
    root = tmp_path_factory.mktemp("finished")
    cfg = root / "tiny.toml"
    cfg.write_text(tiny_toml(federation={"rounds": 1}, output={"plots": True}))
    assert main(["run", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def outside(tmp_path: Path) -> tuple[Path, Path]:
    """A directory and a file outside the run, with their contents to compare afterwards."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "keep.txt").write_text("outside file\n")
    f = tmp_path / "outside.txt"
    f.write_text("outside file\n")
    return d, f


def plant(run: Path, name: str, points_to: Path) -> Path:
    """``run/name`` replaced by a symbolic link to ``points_to``."""
    target = run / name
    if target.is_dir() and not target.is_symlink():
        subprocess.run(["rm", "-rf", str(target)], check=True)
    else:
        target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(points_to)
    return target


def snapshot(*paths: Path) -> dict[str, bytes]:
    out = {}
    for p in paths:
        for q in [p, *p.rglob("*")] if p.is_dir() else [p]:
            if q.is_file():
                out[str(q)] = q.read_bytes()
    return out


PLANTS = [
    ("plots", "dir"),
    ("plots/eval.png", "file"),
    ("report.html", "file"),
    ("adapter", "dir"),
    ("tensorboard", "dir"),
    ("metrics.jsonl", "file"),
    ("checkpoints/round-0001.safetensors", "file"),
    ("checkpoints", "dir"),
    ("clients", "dir"),
    ("summary.json", "file"),
]


@pytest.mark.parametrize(("name", "kind"), PLANTS)
def test_a_link_where_fedrank_writes_is_refused_and_nothing_outside_changes(
    name: str, kind: str, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path / "run")
    d, f = outside(tmp_path)
    target = plant(run, name, d if kind == "dir" else f)
    before = snapshot(d, f)
    assert rd.links_in(run) == [name]
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "symbolic link" in err
    # report only reads a run directory that holds links: the plots are not written; it reads through a link
    # to a file (here not JSON: one line naming it)
    code = main(["report", str(run), "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err.strip()
    if name == "summary.json" and code == 2:  # read as damaged: one line naming it
        assert len(err.splitlines()) == 1 and name in err
    elif name == "metrics.jsonl":
        assert code == 2 and len(err.splitlines()) == 1 and name in err
    else:
        assert code == 0 and (tmp_path / "r.html").is_file()
    assert target.is_symlink()
    # --overwrite removes the link itself (never what it points to) with the run's other files
    cfg = run.parent / "fresh.toml"
    cfg.write_text((run / "config.toml").read_text())
    assert main(["run", str(cfg), "--out", str(run), "--overwrite", "--no-progress"]) == 0
    assert rd.links_in(run) == []
    assert snapshot(d, f) == before and (d / "keep.txt").read_text() == "outside file\n"


def test_a_planted_probe_link_is_removed_not_written_through(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _, f = outside(tmp_path)
    probe = run / f".fedrank-probe-{os.getpid()}"
    probe.symlink_to(f)
    rd.check_writable(run)
    assert f.read_text() == "outside file\n" and not probe.exists() and not probe.is_symlink()


def test_a_comparison_with_a_link_inside_one_of_its_runs_is_refused(finished: Path, tmp_path: Path) -> None:
    cmp = tmp_path / "cmp"
    (cmp / "flexlora").mkdir(parents=True)
    run = copy_run(finished, cmp / "flexlora" / "seed0")
    d, _ = outside(tmp_path)
    subprocess.run(["rm", "-rf", str(run / "plots")], check=True)
    (run / "plots").symlink_to(d)
    assert rd.links_in(cmp, "compare") == ["flexlora/seed0/plots"]
    with pytest.raises(rd.RunDirError, match="flexlora/seed0/plots"):
        rd.refuse_links(cmp, "compare")


HOLD = """
import sys, time
from pathlib import Path
from fedrank import run_dir
with run_dir.exclusive(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    time.sleep(60)
"""


def hold_lock(d: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    marker = tmp_path / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(d), str(marker)])
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    holder = hold_lock(out, tmp_path)
    try:
        for argv in (
            ["run", str(cfg_path), "--out", str(out), "--no-progress"],
            ["run", str(cfg_path), "--out", str(out), "--overwrite", "--no-progress"],
            ["compare", str(cfg_path), "--methods", "flexlora", "--out", str(out), "--no-progress"],
            ["export", str(tmp_path / "nowhere"), "--rank", "2", "--out", str(out)],
        ):
            code = main(argv)
            err = capsys.readouterr().err.strip()
            if argv[0] == "export":  # export checks its run directory first: no such run, one line
                assert code == 2 and len(err.splitlines()) == 1
                continue
            assert code == 2 and err.splitlines() == [
                f"fedrank: error: {out} is in use by another fedrank process (pid {holder.pid}); wait for it to "
                "finish, or choose another output directory"
            ]
        assert sorted(p.name for p in out.iterdir()) == [rd.LOCK], "the refused writers wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with the process: the run now goes ahead
    assert main(["run", str(cfg_path), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["registered_clients"] == 4


def test_two_runs_started_together_one_wins_the_other_is_refused(cfg_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedrank", "run", str(cfg_path), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "in use by another fedrank process" in loser or "is not empty" in loser
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in evals if r["type"] == "round"] == [1]  # one run's records, not two interleaved
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1


def mtimes(d: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != rd.LOCK}


def test_compare_resume_keeps_finished_runs_resumes_interrupted_ones_and_starts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_toml(federation={"rounds": 2}))
    out = tmp_path / "cmp"
    args = ["compare", str(cfg), "--methods", "flexlora,fedit", "--seeds", "0,1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    finished = out / "flexlora" / "seed0"
    kept = mtimes(finished)
    want = json.loads((out / "fedit" / "seed0" / "summary.json").read_text())["unseen_after"]
    # interrupted after round 1: its newest checkpoint and everything after it gone
    interrupted = out / "fedit" / "seed0"
    for name in ("summary.json", "global_state.safetensors", "report.html"):
        (interrupted / name).unlink()
    subprocess.run(["rm", "-rf", str(interrupted / "adapter")], check=True)
    (interrupted / "checkpoints" / "round-0002.safetensors").unlink()
    subprocess.run(["rm", "-rf", str(out / "fedit" / "seed1")], check=True)  # never started
    assert main(args) == 2  # without --resume: refused, nothing redone
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert mtimes(finished) == kept  # not redone
    assert json.loads((interrupted / "summary.json").read_text())["unseen_after"] == pytest.approx(want)
    assert (out / "fedit" / "seed1" / "summary.json").is_file()
    md = (out / "comparison.md").read_text()
    assert "| flexlora | 2 |" in md and "| fedit | 2 |" in md
    # another config is refused by name, not silently mixed into the table
    assert main([*args, "--resume", "--set", "train.lr=0.5"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_ctrl_c_is_one_line_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedrank.cli as cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_compare", interrupted)
    assert main(["compare", "x.toml", "--methods", "flexlora"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "--resume" in err[0]


WRITTEN = [*(n for n, _ in PLANTS), "clients/0", "tensorboard/events.out.tfevents.1", ".fedrank-probe-1"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_every_path_fedrank_writes_linked_to_a_file_or_a_directory_is_named(
    kind: str, finished: Path, tmp_path: Path
) -> None:
    d, f = outside(tmp_path)
    for i, name in enumerate(WRITTEN):
        run = copy_run(finished, tmp_path / f"run{i}")
        plant(run, name, d if kind == "dir" else f)
        assert rd.links_in(run) == [name], name
        with pytest.raises(rd.RunDirError, match=re.escape(name)):
            rd.open_existing(run)
        with pytest.raises(rd.RunDirError, match=re.escape(name)):
            rd.start_fresh(run)
    assert (d / "keep.txt").read_text() == f.read_text() == "outside file\n"


def test_report_only_reads_a_read_only_run_directory(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores permission bits, so the read-only file system is simulated at open(): report --html writes
    its page elsewhere and leaves the run directory as it was (the plots are not rewritten there)."""
    import builtins

    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    real_open = builtins.open

    def read_only(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith(str(run)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    assert main(["report", str(run), "--html", str(tmp_path / "page.html")]) == 0
    monkeypatch.setattr(builtins, "open", real_open)
    assert (tmp_path / "page.html").stat().st_size > 1000 and snapshot(run) == before
