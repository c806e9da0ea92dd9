from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

# One intra-op thread: the tiny model's ops are too small to gain from more, and two test processes sharing
# the 2 cores with OpenMP's busy-waiting threads ran up to 200x slower.
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def private_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Each test's caches (kept evaluations, Arrow copies) in a directory of its own, not the user's
    ~/.cache/fedrank; the integration tests use the real one (the model copy, the BIG-bench download)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("FEDRANK_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def bigbench_sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed task.json fixtures packed like the bigbench==1.0.0 sdist."""
    out = tmp_path_factory.mktemp("sdist") / "bigbench-1.0.0.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        for path in sorted((FIXTURES / "bigbench").rglob("*")):
            if path.is_file():
                tf.add(path, arcname="bigbench-1.0.0/" + str(path.relative_to(FIXTURES)))
        info = tarfile.TarInfo("bigbench-1.0.0/setup.py")
        data = b"# not a task\n"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="session")
def tiny():
    """A random-weight tiny Llama and its in-process tokenizer (no downloads)."""
    from fedrank.models import tiny_llama

    return tiny_llama(seed=0)
