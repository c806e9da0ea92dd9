from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrank.data import BigBench, BigBenchStore, Federation, InMemoryStore, PartitionConfig, parse_task, read_jsonl
from fedrank.data.bigbench import INDEX_VERSION, build_index, iter_tasks
from fedrank.data.examples import Example
from fedrank.data.tokenize import IGNORE, collate, encode


@pytest.fixture(scope="module")
def bench(bigbench_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> BigBench:
    root = tmp_path_factory.mktemp("index")
    build_index(iter_tasks(bigbench_sdist), root)
    return BigBench.from_dir(root)


def test_index_reads_tasks_subtasks_and_kinds(bench: BigBench) -> None:
    assert set(bench.tasks) == {"toy_compare", "toy_add", "toy_words:upper", "toy_words:reverse", "toy_tiny"}
    assert bench.tasks["toy_compare"].kind == "multiple_choice"
    assert bench.tasks["toy_add"].kind == "generative"
    assert bench.tasks["toy_words:upper"].keywords == ("memorization",)
    assert bench.tasks["toy_tiny"].num_examples == 5  # the example without a target is dropped
    assert bench.tasks["toy_add"].num_examples == 30


def test_parse_task_formats_prompts_targets_and_choices(bench: BigBench) -> None:
    ex = bench.examples("toy_compare")[0]
    assert ex.prompt.startswith("Answer the question. \nQ: Is ")
    assert "\n choice: Yes\n choice: No\nA:" in ex.prompt
    assert ex.choices == ("Yes", "No") and ex.target == ex.choices[ex.correct]
    add = bench.examples("toy_add")[0]
    a, b = [int(t) for t in add.prompt.removeprefix("Q: What is ").removesuffix("?\nA:").split(" plus ")]
    assert add.references == (str(a + b), f"{a + b}.") and add.target == str(a + b) and not add.is_multiple_choice
    up = bench.examples("toy_words:upper")[0]
    assert up.prompt == "Word: apple\nAnswer:" and up.target == "APPLE"
    # task-level settings: choices not appended when append_choices_to_input is false
    no_append = parse_task(
        {"append_choices_to_input": False, "examples": [{"input": "x", "target_scores": {"a": 0, "b": 0.5}}]}, "t"
    )
    assert no_append[0].prompt == "Q: x\nA:" and no_append[0].target == "b" and no_append[0].correct == 1


def test_max_examples_caps_the_cache_with_a_seeded_subset(bigbench_sdist: Path, tmp_path: Path) -> None:
    infos = build_index(iter_tasks(bigbench_sdist), tmp_path / "a", max_examples=10)
    info = {i.name: i for i in infos}["toy_add"]
    assert info.num_examples == 30 and info.cached_examples == 10
    build_index(iter_tasks(bigbench_sdist), tmp_path / "b", max_examples=10)
    a = BigBench.from_dir(tmp_path / "a").examples("toy_add")
    assert a == BigBench.from_dir(tmp_path / "b").examples("toy_add") and len(a) == 10


def test_task_partition_holds_out_unseen_tasks_and_skips_small_ones(bench: BigBench) -> None:
    store = BigBenchStore(bench)
    fed = Federation(store, PartitionConfig(kind="task", num_clients=3, num_eval_tasks=1, min_examples=20, seed=1))
    assert fed.skipped == {"toy_tiny": "fewer than 20 examples (5)"}
    assert len(fed.eval_tasks) == 1 and not set(fed.eval_tasks) & set(fed.train_tasks)
    siblings = {t for t in bench.tasks if t.split(":")[0] in fed.held_out} - set(fed.eval_tasks)
    assert sorted(fed.eval_tasks + fed.train_tasks + sorted(siblings)) == sorted(set(bench.tasks) - {"toy_tiny"})
    for cid in range(3):
        c = fed.client(cid)
        assert c.tasks == (fed.train_tasks[cid],)
        assert (
            len(c.train) == fed.num_examples(cid) and len(c.train) + len(c.test) == bench.tasks[c.tasks[0]].num_examples
        )
        assert not {e.prompt for e in c.train} & {e.prompt for e in c.test}
    by_kw = Federation(
        store, PartitionConfig(kind="task", num_clients=2, eval_keywords=("memorization",), num_eval_tasks=0)
    )
    assert sorted(by_kw.eval_tasks) == ["toy_words:reverse", "toy_words:upper"]
    # more clients than tasks: one task each, clients sharing a task hold disjoint shards of it
    many = Federation(store, PartitionConfig(kind="task", num_clients=9, num_eval_tasks=1, test_fraction=0.0))
    T = len(many.train_tasks)
    held = many.held_out
    assert T == len([t for t in bench.tasks if t != "toy_tiny" and t.split(":")[0] not in held]) >= 2
    for i, task in enumerate(many.train_tasks):
        held = [many.client(c) for c in range(i, 9, T)]
        assert all(c.tasks == (task,) for c in held)
        prompts = [e.prompt for c in held for e in c.train]
        assert len(prompts) == len(set(prompts)) == bench.tasks[task].num_examples
        assert sum(many.num_examples(c) for c in range(i, 9, T)) == bench.tasks[task].num_examples


@pytest.mark.parametrize("kind", ["dirichlet", "iid"])
def test_dirichlet_and_iid_partitions_are_disjoint_complete_and_seeded(kind: str) -> None:
    tasks = {f"t{i}": [Example(f"t{i} q{j}", "a", task=f"t{i}") for j in range(40)] for i in range(6)}
    store = InMemoryStore(tasks)
    cfg = PartitionConfig(kind=kind, num_clients=7, num_eval_tasks=1, dirichlet_alpha=0.3, seed=4)
    fed = Federation(store, cfg)
    seen: list[str] = []
    for cid in range(7):
        c = fed.client(cid)
        assert len(c.train) == fed.num_examples(cid)
        seen += [e.prompt for e in c.train + c.test]
    assert len(seen) == len(set(seen)), "clients' examples must be disjoint"
    assert set(seen) == {e.prompt for t in fed.train_tasks for e in tasks[t]}
    again = Federation(store, cfg)
    assert [again.client(c).train for c in range(7)] == [fed.client(c).train for c in range(7)]
    other = Federation(store, PartitionConfig(kind=kind, num_clients=7, num_eval_tasks=1, dirichlet_alpha=0.3, seed=5))
    assert [other.client(c).train for c in range(7)] != [fed.client(c).train for c in range(7)]
    if kind == "dirichlet":  # small alpha concentrates: most clients hold few of the 5 tasks
        assert sum(len(fed.client(c).tasks) for c in range(7)) / 7 < 5


def test_jsonl_clients(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat", "client": "a"},
        {"instruction": "Add 1+1", "output": "2", "client": "b"},
        {"instruction": "Translate", "input": "chien", "output": "dog", "client": "a"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    store = read_jsonl([f])
    assert store.task_names() == ["a", "b"] and store.count("a") == 2
    assert store.examples("a")[0].prompt == "Translate\n\nchat" and store.examples("b")[0].prompt == "Add 1+1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "no output"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        read_jsonl([bad])
    per_client = tmp_path / "client7.jsonl"
    per_client.write_text(json.dumps({"instruction": "hi", "output": "there"}) + "\n")
    assert read_jsonl([per_client]).task_names() == ["client7"]


def test_encode_masks_prompt_and_truncates_prompt_first(tiny) -> None:
    tok = tiny.tokenizer
    ex = Example("what is the answer to the question", "yes no yes")
    enc = encode(tok, ex, 512)
    answer = tok("yes no yes" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert not enc.truncated
    assert enc.labels[-len(answer) :] == answer and all(x == IGNORE for x in enc.labels[: -len(answer)])
    assert tok.decode(enc.input_ids).endswith("<|im_start|>assistant\nyes no yes<|im_end|>")
    short = encode(tok, ex, len(answer) + 3)
    assert short.truncated and len(short.input_ids) == len(answer) + 3 and short.labels[-len(answer) :] == answer
    batch = collate([enc, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(enc.input_ids))
    assert int(batch["attention_mask"][1].sum()) == len(short.input_ids)
    assert int((batch["labels"][1] != IGNORE).sum()) == len(answer)


def test_sdist_lookup_never_downloads_when_told_not_to(tmp_path: Path, bigbench_sdist: Path) -> None:
    from fedrank.data.bigbench import sdist_path

    with pytest.raises(FileNotFoundError, match="bigbench-1.0.0.tar.gz"):
        sdist_path(tmp_path, download=False)
    (tmp_path / "bigbench").mkdir()
    (tmp_path / "bigbench" / "bigbench-1.0.0.tar.gz").write_bytes(bigbench_sdist.read_bytes())
    assert sdist_path(tmp_path, download=False) == tmp_path / "bigbench" / "bigbench-1.0.0.tar.gz"
    bench = BigBench.open(tmp_path, download=False)  # builds the index from the cached sdist once
    assert "toy_add" in bench.tasks and (tmp_path / "bigbench" / f"index-v{INDEX_VERSION}" / "index.json").is_file()


def family_store() -> InMemoryStore:
    """Six families; three of them with sibling subtasks (``fam:sub``), like BIG-bench."""
    names = ["solo_a", "solo_b", "solo_c", "fam1:x", "fam1:y", "fam1:z", "fam2:x", "fam2:y", "fam3:only"]
    tasks = {t: [Example(f"{t} q{j}", "a", task=t) for j in range(30)] for t in names}
    return InMemoryStore(tasks, {t: ("kw",) if t.startswith("fam1") else ("other",) for t in names})


@pytest.mark.parametrize("kind", ["task", "dirichlet", "iid"])
@pytest.mark.parametrize("seed", range(6))
def test_no_training_client_shares_a_family_with_an_evaluation_task(kind: str, seed: int) -> None:
    store = family_store()
    fed = Federation(store, PartitionConfig(kind=kind, num_clients=5, num_eval_tasks=2, seed=seed))
    assert len(fed.eval_tasks) == 2 and len(fed.held_out) == 2
    held = {t.split(":")[0] for t in fed.eval_tasks}
    assert set(fed.held_out) == held
    for cid in range(fed.num_clients):
        for task in fed.client(cid).tasks:
            assert task.split(":")[0] not in held, (task, fed.eval_tasks)
    # every task outside the held-out families trains
    assert set(fed.train_tasks) == {t for t in store.task_names() if t.split(":")[0] not in held} or kind == "task"
    kw = Federation(store, PartitionConfig(kind=kind, num_clients=3, eval_keywords=("kw",), num_eval_tasks=1))
    assert kw.held_out == ["fam1"] and not any(t.startswith("fam1") for t in kw.train_tasks)


def test_task_holdout_is_the_old_behaviour_and_lets_siblings_train() -> None:
    store = family_store()
    leaks = 0
    for seed in range(10):
        fed = Federation(store, PartitionConfig(num_clients=9, num_eval_tasks=2, holdout="task", seed=seed))
        assert fed.held_out == sorted(fed.eval_tasks)
        train_fams = {t.split(":")[0] for t in fed.train_tasks}
        leaks += any(t.split(":")[0] in train_fams for t in fed.eval_tasks)
    assert leaks > 0, "with holdout = 'task' a held-out subtask's siblings can train"
    with pytest.raises(ValueError, match="holdout"):
        PartitionConfig(holdout="families")
