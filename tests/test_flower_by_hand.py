"""The README's "TLS and SuperNode authentication by hand" steps: scripts/flower_by_hand.sh runs them as printed
(the lines between its README markers are the README's code block, checked here), and the slow test runs the
script on the tiny config: 3 SuperNodes over TLS with SuperNode authentication on 127.0.0.1, a run that
finishes bit-identical to the simulator, and no process left behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "flower_by_hand.sh"
README = ROOT / "README.md"
BEGIN, END = "# --- README begin ---\n", "# --- README end ---\n"


def script_block() -> str:
    """The script's lines between its README markers (markers excluded)."""
    text = SCRIPT.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{SCRIPT}: expected one {BEGIN!r} and one {END!r}"
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)]


def readme_bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_the_readme_shows_the_script_verbatim() -> None:
    block = script_block()
    assert block in readme_bash_blocks(), (
        f"README.md's by-hand ```bash block differs from {SCRIPT.relative_to(ROOT)} between its README markers: "
        "copy the script's block into the README (the script is what the slow test runs)"
    )


def test_the_connection_file_it_writes_is_valid_toml() -> None:
    """Step 2's heredoc, with its variables filled in, is a TOML connection table `flwr` can read."""
    heredoc = re.search(r'cat > "\$FLWR_HOME/config.toml" <<EOF\n(.*?)^EOF$', script_block(), flags=re.S | re.M)
    assert heredoc is not None
    text = heredoc.group(1).replace("$LINK_PORT", "8100").replace("$WORK", "/abs/work")
    doc = tomllib.loads(text)
    assert doc["superlink"]["default"] == "deploy-tls"
    assert doc["superlink"]["deploy-tls"] == {"address": "127.0.0.1:8100", "root-certificates": "/abs/work/ca.crt"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_the_readme_steps_run(tmp_path: Path) -> None:
    pytest.importorskip("flwr", reason="flwr is not installed: pip install -e '.[flower]'")
    pytest.importorskip("psutil", reason="psutil is not installed: pip install -e '.[flower]'")
    missing = [tool for tool in ("bash", "openssl", "ssh-keygen", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    from test_flower import TINY
    from test_flower_deploy import scan_proc
    from test_flower_deployment import check_run, simulate

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    work = (tmp_path / "work").resolve()
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(work), str(cfg)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = ""
    try:
        out, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap then stops everything it started
        out, _ = proc.communicate(timeout=90)
        pytest.fail(f"the script did not finish within 480 s:\n{out[-4000:]}")
    finally:
        (tmp_path / "script.log").write_text(out)  # kept for a look after a failure
        left = scan_proc(work / "flwr-home")
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"^run \d+: finished:completed$", out, flags=re.M), out[-3000:]
    assert not left, f"processes left behind: {left}"
    assert (work / "keys" / "node2.pub").is_file() and (work / "flwr-home" / "config.toml").is_file()
    assert oct(work.stat().st_mode & 0o777) == "0o700"
    check_run(work / "run", simulate(cfg, tmp_path / "sim"))  # summary.json with 2 rounds; bit-identical
