"""Super-NaturalInstructions (Wang et al. 2022), FlexLoRA's own data, read from a user's checkout of the
official repository (``git clone https://github.com/allenai/natural-instructions``, about 3 GB), given as
``data.path``.

A checkout holds ``tasks/taskNNN_<name>.json`` (``Definition``: a string or a list of strings; ``Positive
Examples`` / ``Negative Examples``: ``{"input", "output", "explanation"}``; ``Instances``: ``{"id", "input",
"output": [...]}``; ``Categories``) and the official English split in ``splits/default/``:
``train_tasks.txt`` and ``test_tasks.txt`` (one task name per line) and ``excluded_tasks.txt``.

* **Tasks and families.** A task is a task file's stem (``task1331_reverse_array``); names have no ``:``, so
  each task is its own family. Only the tasks of the default split are indexed: those in
  ``excluded_tasks.txt`` are left out, and so are those in neither list (the non-English tasks; one log line
  gives the count). A task named in a split file whose file the checkout lacks is skipped with a warning
  (the official split files name tasks that some checkouts do not have); the index's provenance lists them.
* **The split is kept.** Keywords: ``natural-instructions``, ``split:train`` or ``split:test`` and one
  ``category:<name>`` per category (lower-cased, spaces as ``-``: ``category:question-answering``).
  :func:`ni_split` gives (train tasks, test tasks); ``partition.eval_keywords = ["split:test"]`` makes the
  paper's unseen test tasks the held-out ones.
* **Prompts** follow Tk-Instruct's encoding (``DataInputCollatorForNI`` of the official code, the paper's
  "Definition + instance" zero-shot setting: ``add_task_definition = True``, no task name, no positive or
  negative examples, no explanations), :data:`TEMPLATE`::

      "Definition: {definition}.\\n\\nNow complete the following example -\\nInput: {input}.\\nOutput: "

  ``{definition}`` is the (first, where it is a list) definition stripped and ``{input}`` the instance's input
  stripped; each gets a ``.`` only when it does not already end in punctuation (``string.punctuation``); the
  prompt ends in ``"Output: "``, trailing space included. Positive examples are not included by default;
  ``positive_examples = k`` puts the first k between the definition and the instance, as the official code
  does (``" Positive Example {i} -\\nInput: {input}.\\n Output: {output}.\\n\\n"``, the same ``.`` rule). The
  official code drops demonstrations that would make the prompt longer than ``max_source_length`` tokens and
  then cuts the prompt; here no tokenizer is at hand, so all k are kept (``data`` tokenization cuts long
  prompts from the left).
* **Answers.** Generative. ``target`` is the first output, ``references`` all of them (Rouge-L takes the best,
  as the paper's evaluation does), each stripped; empty outputs are dropped and an instance left with none is
  skipped.
* **Size.** The index keeps at most ``max_examples`` instances per task (a seeded subset; NI caps tasks at
  6,500 instances, Tk-Instruct trains on at most 100 per task). The official evaluation uses each test task's
  first 100 instances (label-balanced by the authors); ``test_instances = 100`` keeps exactly those.
* **Once.** The index lives in ``<cache>/natural-instructions/index-<key>``; the key hashes the checkout's
  resolved path, the split files' contents, every task file's name, size and mtime, and the options above, so
  another or an updated checkout gets its own index (old ones stay until removed). Indexing reads the split's
  task files (about 900 of the checkout's ~1,600, most of its 3 GB): minutes, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedrank.data.examples import Example
from fedrank.data.index import DataError, IndexStore, TaskIndex, build_index, index_root

log = logging.getLogger(__name__)

SOURCE = "natural-instructions"
REPOSITORY = "https://github.com/allenai/natural-instructions"
SPLITS = Path("splits") / "default"
TRAIN, TEST, EXCLUDED = "train_tasks.txt", "test_tasks.txt", "excluded_tasks.txt"
FORMAT_VERSION = 1
"""Part of the index key: bump when the prompts or keywords change."""
PROGRESS_EVERY = 100
"""Without a terminal (tqdm off), a log line per this many task files."""
TEMPLATE = "Definition: {definition}\n\n{demonstrations}Now complete the following example -\nInput: {input}\nOutput: "
"""The prompt (``{definition}`` and ``{input}`` with their final ``.`` rule applied; ``{demonstrations}``
empty unless ``positive_examples``), recorded in the index's provenance."""
CHECKOUT = f"a checkout (git clone {REPOSITORY}) holds tasks/*.json and {SPLITS.as_posix()}/{TRAIN}, {TEST}"


def _period(text: str) -> str:
    """``text`` with a final ``.`` unless it ends in punctuation (the official code's rule)."""
    return text if text and text[-1] in string.punctuation else text + "."


def definition_text(raw: Any) -> str:
    """A task's definition: the string, or the first of a list (as the official code reads it)."""
    if isinstance(raw, list):
        raw = raw[0] if raw else ""
    return str(raw).strip()


def format_prompt(definition: str, instance_input: str, demonstrations: list[dict[str, Any]] | None = None) -> str:
    """Tk-Instruct's encoding of one instance: definition, optional positive examples, then the instance."""
    demos = ""
    for i, d in enumerate(demonstrations or (), start=1):
        demos += f" Positive Example {i} -\n"
        demos += _period(f"Input: {str(d.get('input', '')).strip()}") + "\n"
        demos += _period(f" Output: {str(d.get('output', '')).strip()}") + "\n\n"
    head = _period(f"Definition: {definition.strip()}") + "\n\n"
    tail = "Now complete the following example -\n" + _period(f"Input: {instance_input.strip()}") + "\nOutput: "
    return head + demos + tail


def _outputs(raw: Any) -> tuple[str, ...]:
    outs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return tuple(s for s in (str(o).strip() for o in outs if isinstance(o, str | int | float)) if s)


def parse_task(data: Any, name: str, positive_examples: int = 0, first: int = 0) -> list[Example]:
    """One task file's examples (``first``: only the first instances, 0 = all); instances without a non-empty
    output are skipped. A file that is not an NI task object raises :class:`DataError`."""
    if not isinstance(data, dict) or "Definition" not in data or not isinstance(data.get("Instances"), list):
        raise DataError(f"natural-instructions: tasks/{name}.json is not a task (needs Definition and Instances)")
    definition = definition_text(data["Definition"])
    positives = data.get("Positive Examples") or []
    demos = [d for d in positives if isinstance(d, dict)][:positive_examples] if positive_examples > 0 else []
    instances = data["Instances"][:first] if first > 0 else data["Instances"]
    out = []
    for inst in instances:
        if not isinstance(inst, dict):
            continue
        refs = _outputs(inst.get("output"))
        if not refs:
            continue
        prompt = format_prompt(definition, str(inst.get("input", "")), demos)
        out.append(Example(prompt, refs[0], refs, task=name))
    return out


def category_keywords(raw: Any) -> list[str]:
    cats = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return [f"category:{'-'.join(str(c).lower().split())}" for c in cats if str(c).strip()]


def read_split(path: Path) -> list[str]:
    """Task names, one a line (blank lines and ``#`` comments skipped, a ``.json`` suffix dropped)."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.removesuffix(".json"))
    return names


class Checkout:
    """A checked-out Super-NaturalInstructions repository, validated: its task files and default split."""

    def __init__(self, path: str | os.PathLike[str]):
        given = Path(path).expanduser()
        if not given.is_dir():
            what = "does not exist" if not given.exists() else "is not a directory"
            raise DataError(f"natural-instructions: data.path {str(given)!r} {what}; {CHECKOUT}")
        self.root = given.resolve()
        tasks = self.root / "tasks"
        if not tasks.is_dir():
            raise DataError(f"natural-instructions: {tasks} is missing; {CHECKOUT}")
        for f in (TRAIN, TEST):
            if not (self.root / SPLITS / f).is_file():
                raise DataError(f"natural-instructions: {self.root / SPLITS / f} is missing; {CHECKOUT}")
        self.train = read_split(self.root / SPLITS / TRAIN)
        self.test = read_split(self.root / SPLITS / TEST)
        excluded = self.root / SPLITS / EXCLUDED
        self.excluded = read_split(excluded) if excluded.is_file() else []
        self.files = {p.stem: p for p in sorted(tasks.glob("*.json"))}

    def key(self, options: dict[str, Any]) -> str:
        """A short hash of what the index is built from."""
        h = hashlib.sha256()
        h.update(json.dumps({"root": str(self.root), "format": FORMAT_VERSION, **options}, sort_keys=True).encode())
        for f in (TRAIN, TEST, EXCLUDED):
            p = self.root / SPLITS / f
            h.update(f"\0{f}\0".encode() + (p.read_bytes() if p.is_file() else b"<absent>"))
        h.update(f"\0{len(self.files)}\0".encode())
        for name, p in self.files.items():
            st = p.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()[:16]

    def plan(self) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        """(task, "train"/"test") to index, in name order, and what was left out."""
        excluded = set(self.excluded)
        test = set(self.test)
        both = sorted(set(self.train) & test)
        if both:
            log.warning("natural-instructions: %d tasks are in both split files, kept as test: %s", len(both), both[:5])
        listed = {t: "test" for t in test} | {t: "train" for t in self.train if t not in test}
        missing = sorted(t for t in listed if t not in excluded and t not in self.files)
        if missing:
            log.warning(
                "natural-instructions: %d tasks named in %s have no task file in %s and are skipped: %s%s",
                len(missing),
                SPLITS.as_posix(),
                self.root / "tasks",
                ", ".join(missing[:5]),
                ", ..." if len(missing) > 5 else "",
            )
        unlisted = [t for t in self.files if t not in listed and t not in excluded]
        if unlisted:
            log.info(
                "natural-instructions: %d of %d task files are in neither %s nor %s (e.g. non-English tasks): left out",
                len(unlisted),
                len(self.files),
                TRAIN,
                TEST,
            )
        plan = [(t, listed[t]) for t in sorted(listed) if t not in excluded and t in self.files]
        left = {
            "excluded": len([t for t in self.files if t in excluded]),
            "unlisted": len(unlisted),
            "missing": missing,
        }
        return plan, left

    def commit(self) -> str:
        """The checkout's git commit, where ``.git`` can be read (best effort; empty otherwise)."""
        git = self.root / ".git"
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head
            ref = head[5:]
            if (git / ref).is_file():
                return (git / ref).read_text().strip()
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
        except OSError:
            pass
        return ""


def iter_tasks(
    checkout: Checkout, plan: list[tuple[str, str]], positive_examples: int = 0, test_instances: int = 0
) -> Iterator[tuple[str, tuple[str, ...], list[Example]]]:
    """(task, keywords, examples) for each planned task, reading one task file at a time (a progress bar on a
    terminal, else a log line per :data:`PROGRESS_EVERY` files)."""
    bar = tqdm(plan, desc="indexing Natural Instructions", unit="task", disable=None)
    with bar:
        yield from _read_tasks(checkout, plan, bar, positive_examples, test_instances)


def _read_tasks(
    checkout: Checkout, plan: list[tuple[str, str]], bar: Any, positive_examples: int, test_instances: int
) -> Iterator[tuple[str, tuple[str, ...], list[Example]]]:
    start = time.monotonic()
    for done, (name, split) in enumerate(bar, start=1):
        path = checkout.files[name]
        try:
            data = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            raise DataError(f"natural-instructions: {path} is not valid JSON ({e})") from e
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"natural-instructions: cannot read {path} ({e})") from e
        first = test_instances if split == "test" else 0
        examples = parse_task(data, name, positive_examples, first)
        keywords = (SOURCE, f"split:{split}", *category_keywords(data.get("Categories")))
        if bar.disable and (done % PROGRESS_EVERY == 0 or done == len(plan)):
            log.info(
                "natural-instructions: read %d of %d task files (%.0f s)", done, len(plan), time.monotonic() - start
            )
        yield name, keywords, examples


def open_index(
    path: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    max_examples: int = 2000,
    positive_examples: int = 0,
    test_instances: int = 0,
    seed: int = 0,
) -> TaskIndex:
    """The checkout's index in the cache, built on first use (and again when the checkout changes)."""
    if positive_examples < 0 or test_instances < 0 or max_examples <= 0:
        raise DataError(
            "natural-instructions: positive_examples and test_instances must be >= 0 and max_examples > 0, got "
            f"{positive_examples}, {test_instances}, {max_examples}"
        )
    checkout = Checkout(path)
    options = {
        "max_examples": max_examples,
        "positive_examples": positive_examples,
        "test_instances": test_instances,
        "seed": seed,
    }
    key = checkout.key(options)
    root = index_root(cache, SOURCE) / f"index-{key}"

    def build(out: Path) -> None:
        plan, left = checkout.plan()
        if not plan:
            raise DataError(
                f"natural-instructions: no task of {checkout.root / SPLITS} has a task file in "
                f"{checkout.root / 'tasks'}; {CHECKOUT}"
            )
        provenance = {
            "source": SOURCE,
            "path": str(checkout.root),
            "commit": checkout.commit(),
            "key": key,
            "split": SPLITS.as_posix(),
            "template": TEMPLATE,
            **options,
            "train_tasks": sum(s == "train" for _, s in plan),
            "test_tasks": sum(s == "test" for _, s in plan),
            **left,
        }
        tasks = iter_tasks(checkout, plan, positive_examples, test_instances)
        build_index(tasks, out, max_examples=max_examples, seed=seed, provenance=provenance)

    return TaskIndex.open_or_build(root, build, f"Natural Instructions from {checkout.root}", max_examples)


def ni_split(index: TaskIndex | IndexStore) -> tuple[list[str], list[str]]:
    """(train tasks, test tasks) of the official default split, in name order: the test tasks are the paper's
    unseen evaluation tasks."""
    if isinstance(index, IndexStore):
        keywords = {t: index.keywords(t) for t in index.task_names()}
    else:
        keywords = {t: info.keywords for t, info in index.tasks.items()}
    train = sorted(t for t, kw in keywords.items() if "split:train" in kw)
    test = sorted(t for t, kw in keywords.items() if "split:test" in kw)
    return train, test


def ni_store(
    path: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    max_examples: int = 2000,
    positive_examples: int = 0,
    test_instances: int = 0,
) -> IndexStore:
    """The checkout's tasks (train and test of the default split) as a task store."""
    return IndexStore(open_index(path, cache, max_examples, positive_examples, test_instances))
