"""Super-NaturalInstructions from a checkout in the official layout, written in tmp_path (offline)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from fedrank.data import natural_instructions as ni
from fedrank.data.index import DataError, IndexStore
from fedrank.data.partition import family

REVERSE: dict[str, Any] = {
    "Definition": ["In this task, you are given an array. Reverse it", "A second definition (unused)."],
    "Categories": ["Program Execution"],
    "Positive Examples": [
        {"input": "[1, 2, 3]", "output": "[3, 2, 1]", "explanation": "Reversed."},
        {"input": "[4, 5]", "output": "[5, 4]", "explanation": "Reversed."},
    ],
    "Negative Examples": [{"input": "[1, 2]", "output": "[1, 2]", "explanation": "Not reversed."}],
    "Instances": [
        {"id": "task1331-a", "input": " [7, 8, 9] ", "output": ["[9, 8, 7]"]},
        {"id": "task1331-b", "input": "[0, 1]", "output": ["[1, 0]", " [1,0] "]},
    ],
}
QA: dict[str, Any] = {
    "Definition": "Answer the question about the passage?",
    "Categories": ["Question Answering", "Commonsense Classification"],
    "Positive Examples": [{"input": "Q: sky colour?", "output": "blue", "explanation": "."}],
    "Negative Examples": [],
    "Instances": [
        {"id": "task001-a", "input": "Q: 2+2?", "output": ["4", "four"]},
        {"id": "task001-b", "input": "Q: empty?", "output": [""]},
        {"id": "task001-c", "input": "Q: none?", "output": []},
        {"input": "Q: no id?", "output": ["yes"]},
    ],
}
SENTIMENT: dict[str, Any] = {
    "Definition": ["Classify the review as positive or negative."],
    "Categories": ["Sentiment Analysis"],
    "Positive Examples": [],
    "Negative Examples": [],
    "Instances": [{"id": f"task200-{i}", "input": f"review {i}", "output": ["positive"]} for i in range(3)],
}
EXCLUDED: dict[str, Any] = {**SENTIMENT, "Definition": ["Excluded task."]}
GERMAN: dict[str, Any] = {**SENTIMENT, "Definition": ["Eine deutsche Aufgabe."]}

TASKS = {
    "task001_qa": QA,
    "task200_sentiment": SENTIMENT,
    "task1331_reverse_array": REVERSE,
    "task300_excluded": EXCLUDED,
    "task400_german": GERMAN,
}


def write_checkout(root: Path) -> Path:
    (root / "tasks").mkdir(parents=True)
    for name, data in TASKS.items():
        (root / "tasks" / f"{name}.json").write_text(json.dumps(data, indent=1))
    (root / "tasks" / "README.md").write_text("not a task")
    splits = root / "splits" / "default"
    splits.mkdir(parents=True)
    # task999_absent: named by the split but not in this checkout
    (splits / "train_tasks.txt").write_text("task001_qa\ntask200_sentiment\ntask300_excluded\ntask999_absent\n")
    (splits / "test_tasks.txt").write_text("task1331_reverse_array\n\n")
    (splits / "excluded_tasks.txt").write_text("task300_excluded\n")
    return root


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return write_checkout(tmp_path / "natural-instructions")


@pytest.fixture
def store(checkout: Path, tmp_path: Path) -> IndexStore:
    return ni.ni_store(checkout, cache=tmp_path / "cache")


def by_input(store: IndexStore, task: str, needle: str) -> Any:
    (ex,) = [e for e in store.examples(task) if f"Input: {needle}" in e.prompt]
    return ex


def test_prompt_is_tk_instruct_definition_plus_instance(store: IndexStore) -> None:
    ex = by_input(store, "task1331_reverse_array", "[7, 8, 9]")
    # list Definition: its first entry, "." added (no final punctuation); input stripped, no "." (as the
    # official code: "]" is in string.punctuation)
    assert ex.prompt == (
        "Definition: In this task, you are given an array. Reverse it.\n\n"
        "Now complete the following example -\n"
        "Input: [7, 8, 9]\n"
        "Output: "
    )
    assert ex.target == "[9, 8, 7]" and ex.task == "task1331_reverse_array"
    assert ex.choices is None and not ex.messages and not ex.rule
    # string Definition ending in punctuation: no extra "."
    qa = by_input(store, "task001_qa", "Q: 2+2?")
    assert qa.prompt == (
        "Definition: Answer the question about the passage?\n\nNow complete the following example -\n"
        "Input: Q: 2+2?\nOutput: "
    )


def test_references_are_all_outputs(store: IndexStore) -> None:
    qa = by_input(store, "task001_qa", "Q: 2+2?")
    assert qa.target == "4" and qa.references == ("4", "four")
    rev = by_input(store, "task1331_reverse_array", "[0, 1]")
    assert rev.references == ("[1, 0]", "[1,0]")


def test_instances_without_output_are_skipped(store: IndexStore) -> None:
    inputs = sorted(e.prompt.split("Input: ")[1].split("\n")[0] for e in store.examples("task001_qa"))
    assert inputs == ["Q: 2+2?", "Q: no id?"]
    assert store.count("task001_qa") == 2


def test_split_kept_excluded_and_unlisted_out(store: IndexStore) -> None:
    assert store.task_names() == ["task001_qa", "task1331_reverse_array", "task200_sentiment"]
    assert ni.ni_split(store) == (["task001_qa", "task200_sentiment"], ["task1331_reverse_array"])
    assert ni.ni_split(store.index) == ni.ni_split(store)
    # each task is its own family
    assert {family(t) for t in store.task_names()} == set(store.task_names())
    prov = store.provenance
    assert prov["source"] == "natural-instructions"
    assert prov["train_tasks"] == 2 and prov["test_tasks"] == 1
    assert prov["excluded"] == 1 and prov["unlisted"] == 1 and prov["missing"] == ["task999_absent"]


def test_missing_and_unlisted_tasks_are_logged(
    checkout: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedrank.data.natural_instructions"):
        ni.ni_store(checkout, cache=tmp_path / "cache")
    text = caplog.text
    assert "task999_absent" in text and "skipped" in text
    assert "1 of 5 task files are in neither" in text
    assert "read 3 of 3 task files" in text  # progress without a terminal


def test_keywords(store: IndexStore) -> None:
    assert store.keywords("task001_qa") == (
        "natural-instructions",
        "split:train",
        "category:question-answering",
        "category:commonsense-classification",
    )
    assert store.keywords("task1331_reverse_array") == (
        "natural-instructions",
        "split:test",
        "category:program-execution",
    )


def test_positive_examples_option(checkout: Path, tmp_path: Path) -> None:
    store = ni.ni_store(checkout, cache=tmp_path / "cache", positive_examples=2)
    ex = by_input(store, "task1331_reverse_array", "[7, 8, 9]")
    assert ex.prompt == (
        "Definition: In this task, you are given an array. Reverse it.\n\n"
        " Positive Example 1 -\nInput: [1, 2, 3]\n Output: [3, 2, 1]\n\n"
        " Positive Example 2 -\nInput: [4, 5]\n Output: [5, 4]\n\n"
        "Now complete the following example -\nInput: [7, 8, 9]\nOutput: "
    )
    # fewer demonstrations than asked: those there are; none: the zero-shot prompt
    qa = by_input(store, "task001_qa", "Q: 2+2?")
    assert qa.prompt == (
        "Definition: Answer the question about the passage?\n\n"
        " Positive Example 1 -\nInput: Q: sky colour?\n Output: blue.\n\n"
        "Now complete the following example -\nInput: Q: 2+2?\nOutput: "
    )
    assert "Positive Example" not in store.examples("task200_sentiment")[0].prompt


def test_test_instances_keeps_the_first_of_test_tasks(checkout: Path, tmp_path: Path) -> None:
    store = ni.ni_store(checkout, cache=tmp_path / "cache", test_instances=1)
    assert [e.target for e in store.examples("task1331_reverse_array")] == ["[9, 8, 7]"]
    assert store.count("task200_sentiment") == 3  # train tasks are not cut


def test_max_examples(checkout: Path, tmp_path: Path) -> None:
    store = ni.ni_store(checkout, cache=tmp_path / "cache", max_examples=2)
    assert store.count("task200_sentiment") == 2
    assert store.index.tasks["task200_sentiment"].num_examples == 3


def test_index_built_once(checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    calls = []
    real = ni.iter_tasks

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ni, "iter_tasks", counting)
    first = ni.ni_store(checkout, cache=cache)
    examples = first.examples("task200_sentiment")
    assert len(calls) == 1
    assert [p.name for p in (cache / "data" / "natural-instructions").iterdir()] == [first.index.root.name]
    assert first.index.root.name.startswith("index-")

    # nothing changed: the index is read, not built. A task file made unreadable but with its size and mtime
    # kept proves the examples come from the index.
    path = checkout / "tasks" / "task200_sentiment.json"
    st = path.stat()
    path.write_bytes(b"{" + b" " * (st.st_size - 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = ni.ni_store(checkout, cache=cache)
    assert len(calls) == 1
    assert again.index.root == first.index.root
    assert again.examples("task200_sentiment") == examples


def test_changed_checkout_gets_a_new_index(checkout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = ni.ni_store(checkout, cache=cache)
    (checkout / "splits" / "default" / "test_tasks.txt").write_text("task1331_reverse_array\ntask200_sentiment\n")
    second = ni.ni_store(checkout, cache=cache)
    assert second.index.root != first.index.root
    assert ni.ni_split(second) == (["task001_qa"], ["task1331_reverse_array", "task200_sentiment"])
    assert ni.ni_split(first) == (["task001_qa", "task200_sentiment"], ["task1331_reverse_array"])

    # a removed task file changes the checkout too
    (checkout / "tasks" / "task001_qa.json").unlink()
    third = ni.ni_store(checkout, cache=cache)
    assert third.index.root not in (first.index.root, second.index.root)
    assert "task001_qa" not in third.task_names()


def test_another_checkout_gets_its_own_index(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = ni.ni_store(write_checkout(tmp_path / "a"), cache=cache)
    b = ni.ni_store(write_checkout(tmp_path / "b"), cache=cache)
    assert a.index.root != b.index.root
    assert a.provenance["path"] == str((tmp_path / "a").resolve())


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*git clone https://github.com/allenai/natural-instructions"):
        ni.ni_store(tmp_path / "nowhere", cache=tmp_path / "cache")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="is not a directory"):
        ni.ni_store(tmp_path / "file", cache=tmp_path / "cache")


def test_missing_tasks_folder(checkout: Path, tmp_path: Path) -> None:
    for p in (checkout / "tasks").iterdir():
        p.unlink()
    (checkout / "tasks").rmdir()
    with pytest.raises(DataError, match=r"natural-instructions/tasks is missing.*git clone"):
        ni.ni_store(checkout, cache=tmp_path / "cache")


@pytest.mark.parametrize("split", ["train_tasks.txt", "test_tasks.txt"])
def test_missing_split_file(checkout: Path, tmp_path: Path, split: str) -> None:
    (checkout / "splits" / "default" / split).unlink()
    with pytest.raises(DataError, match=rf"splits/default/{split} is missing.*git clone"):
        ni.ni_store(checkout, cache=tmp_path / "cache")


def test_excluded_tasks_file_is_optional(checkout: Path, tmp_path: Path) -> None:
    (checkout / "splits" / "default" / "excluded_tasks.txt").unlink()
    store = ni.ni_store(checkout, cache=tmp_path / "cache")
    assert "task300_excluded" in ni.ni_split(store)[0]


def test_invalid_json_names_the_file(checkout: Path, tmp_path: Path) -> None:
    (checkout / "tasks" / "task200_sentiment.json").write_text('{"Definition": [')
    with pytest.raises(DataError, match=r"tasks/task200_sentiment\.json is not valid JSON"):
        ni.ni_store(checkout, cache=tmp_path / "cache")
    # a failed build leaves no index behind; fixed, the next open builds it
    assert not any((tmp_path / "cache" / "data" / "natural-instructions").glob("index-*"))
    (checkout / "tasks" / "task200_sentiment.json").write_text(json.dumps(SENTIMENT))
    assert "task200_sentiment" in ni.ni_store(checkout, cache=tmp_path / "cache").task_names()


def test_not_a_task_object_names_the_file(checkout: Path, tmp_path: Path) -> None:
    (checkout / "tasks" / "task001_qa.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"tasks/task001_qa\.json is not a task"):
        ni.ni_store(checkout, cache=tmp_path / "cache")


def test_no_listed_task_present(checkout: Path, tmp_path: Path) -> None:
    (checkout / "splits" / "default" / "train_tasks.txt").write_text("task998_gone\n")
    (checkout / "splits" / "default" / "test_tasks.txt").write_text("task999_gone\n")
    with pytest.raises(DataError, match="no task of"):
        ni.ni_store(checkout, cache=tmp_path / "cache")


def test_format_prompt_punctuation_rule() -> None:
    assert ni.format_prompt("Do it!", "x?") == (
        "Definition: Do it!\n\nNow complete the following example -\nInput: x?\nOutput: "
    )
    assert ni.format_prompt("  Do it  ", "") == (
        "Definition: Do it.\n\nNow complete the following example -\nInput: .\nOutput: "
    )
    assert ni.definition_text([]) == "" and ni.definition_text("  d ") == "d"
