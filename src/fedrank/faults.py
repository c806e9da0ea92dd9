"""Fault injection for the kill tests: ``FEDRANK_FAULT=<point>[:<round>]`` makes the process SIGKILL itself.

A kill is the harshest crash there is (no ``finally``, no flush, no atexit), so a run that resumes
bit-identically after being killed at each of these points survives any crash at them:

- ``train``: after the first client update of a round is trained and recorded;
- ``aggregate``: right after the server aggregated the round, before anything of it is written;
- ``pre-rename``: a round checkpoint's temporary file is written and fsynced, not yet renamed;
- ``post-rename``: right after that rename (before the directory fsync and the pruning of old checkpoints).

``<round>`` is the 1-based round being trained (``train``, ``aggregate``) or the checkpoint's round
(``pre-rename``, ``post-rename``; 0 is the checkpoint after the evaluation before training); without it the
first time the point is reached. Unset (the normal case) costs one environment lookup per call.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "FEDRANK_FAULT"
POINTS = ("train", "aggregate", "pre-rename", "post-rename")


def parse(spec: str) -> tuple[str, int | None]:
    """``"pre-rename:2"`` -> ("pre-rename", 2); unknown points and bad rounds are errors, never ignored."""
    name, sep, rnd = spec.strip().partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown fault point {name!r}; points: {', '.join(POINTS)}")
    if not sep:
        return name, None
    try:
        return name, int(rnd)
    except ValueError as e:
        raise ValueError(f"{ENV}={spec!r}: the round after ':' must be an integer") from e


def hit(point: str, round_index: int) -> None:
    """Kill this process (SIGKILL) if ``FEDRANK_FAULT`` names ``point`` (and ``round_index``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, rnd = parse(spec)
    if name != point or (rnd is not None and rnd != round_index):
        return
    sys.stderr.write(f"fedrank: {ENV}={spec}: killing process {os.getpid()} at {point} (round {round_index})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
