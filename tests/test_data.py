from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedrank.config import ConfigError, DataConfig
from fedrank.data import (
    DataError,
    Federation,
    FileStore,
    IndexStore,
    InMemoryStore,
    PartitionConfig,
    TaskIndex,
    node_data,
    parse_task,
)
from fedrank.data.artifacts import sha256_of
from fedrank.data.bigbench import iter_checkout, iter_tasks, open_index, with_examples
from fedrank.data.examples import Example
from fedrank.data.files import row_example
from fedrank.data.index import build_index
from fedrank.data.tokenize import IGNORE, collate, encode

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def bench(bigbench_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> TaskIndex:
    root = tmp_path_factory.mktemp("index") / "index"
    build_index(with_examples(iter_tasks(bigbench_sdist)), root)
    return TaskIndex.from_dir(root)


def test_index_reads_tasks_subtasks_and_kinds(bench: TaskIndex) -> None:
    assert set(bench.tasks) == {"toy_compare", "toy_add", "toy_words:upper", "toy_words:reverse", "toy_tiny"}
    assert bench.tasks["toy_compare"].kind == "multiple_choice"
    assert bench.tasks["toy_add"].kind == "generative"
    assert bench.tasks["toy_words:upper"].keywords == ("memorization",)
    assert bench.tasks["toy_tiny"].num_examples == 5  # the example without a target is dropped
    assert bench.tasks["toy_add"].num_examples == 30


def test_parse_task_formats_prompts_targets_and_choices(bench: TaskIndex) -> None:
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
    infos = build_index(with_examples(iter_tasks(bigbench_sdist)), tmp_path / "a", max_examples=10)
    info = {i.name: i for i in infos}["toy_add"]
    assert info.num_examples == 30 and info.cached_examples == 10
    build_index(with_examples(iter_tasks(bigbench_sdist)), tmp_path / "b", max_examples=10)
    a = TaskIndex.from_dir(tmp_path / "a").examples("toy_add")
    assert a == TaskIndex.from_dir(tmp_path / "b").examples("toy_add") and len(a) == 10


def test_task_partition_holds_out_unseen_tasks_and_skips_small_ones(bench: TaskIndex) -> None:
    store = IndexStore(bench)
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


def test_bigbench_reads_a_placed_sdist_or_a_checkout_and_never_downloads(tmp_path: Path, bigbench_sdist: Path) -> None:
    with pytest.raises(DataError, match=r"no longer served.*data.path = a checkout.*bigbench-1.0.0.tar.gz"):
        open_index(tmp_path)
    (tmp_path / "bigbench").mkdir()
    (tmp_path / "bigbench" / "bigbench-1.0.0.tar.gz").write_bytes(bigbench_sdist.read_bytes())
    from_sdist = open_index(tmp_path)  # builds the index from the placed sdist once
    assert "toy_add" in from_sdist.tasks and (tmp_path / "data" / "bigbench" / "sdist-index" / "index.json").is_file()
    assert from_sdist.provenance["sha256"] == sha256_of(tmp_path / "bigbench" / "bigbench-1.0.0.tar.gz")
    checkout = FIXTURES / "bigbench"  # the committed tree is in the official repository's layout
    from_checkout = open_index(tmp_path, checkout)
    assert from_checkout.tasks == from_sdist.tasks
    assert all(from_checkout.examples(t) == from_sdist.examples(t) for t in from_sdist.tasks)
    assert [n for n, _ in iter_checkout(checkout)][:1] != ["toy_words:upper"]  # parents before subtasks


def test_bigbench_checkout_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory"):
        open_index(tmp_path, tmp_path / "nowhere")
    (tmp_path / "repo" / "bigbench").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no bigbench/benchmark_tasks/<task>/task.json"):
        open_index(tmp_path, tmp_path / "repo")


def family_store() -> InMemoryStore:
    """Six families; three of them with sibling subtasks (``fam:sub``), like BIG-bench; example j of every
    task is held by client j mod 5 (for the ``natural`` partition)."""
    names = ["solo_a", "solo_b", "solo_c", "fam1:x", "fam1:y", "fam1:z", "fam2:x", "fam2:y", "fam3:only"]
    tasks = {t: [Example(f"{t} q{j}", "a", task=t) for j in range(30)] for t in names}
    clients = {t: [f"c{j % 5}" for j in range(30)] for t in names}
    return InMemoryStore(tasks, {t: ("kw",) if t.startswith("fam1") else ("other",) for t in names}, clients)


@pytest.mark.parametrize("kind", ["task", "dirichlet", "iid", "natural"])
@pytest.mark.parametrize("seed", range(6))
def test_no_training_client_shares_a_family_with_an_evaluation_task(kind: str, seed: int) -> None:
    store = family_store()
    fed = Federation(store, PartitionConfig(kind=kind, num_clients=5, num_eval_tasks=2, seed=seed))
    assert len(fed.eval_tasks) == 2 and len(fed.held_out) == 2
    held = {t.split(":")[0] for t in fed.eval_tasks}
    assert set(fed.held_out) == held
    for cid in range(fed.num_clients):
        c = fed.client(cid)
        for task in c.tasks:
            assert task.split(":")[0] not in held, (task, fed.eval_tasks)
        assert all(e.task.split(":")[0] not in held for e in c.train + c.test)
    # every task outside the held-out families trains
    assert set(fed.train_tasks) == {t for t in store.task_names() if t.split(":")[0] not in held} or kind == "task"
    k = 5 if kind == "natural" else 3  # natural: one client per distinct id
    kw = Federation(store, PartitionConfig(kind=kind, num_clients=k, eval_keywords=("kw",), num_eval_tasks=1))
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


# ---------------------------------------------------------------------------------------------- users' files
FILES = Path(__file__).parent / "fixtures" / "files"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 12 rows as .jsonl, .json, .csv (committed) and .parquet (written here from the JSONL)."""
    import pyarrow.json
    import pyarrow.parquet

    out = tmp_path_factory.mktemp("files") / "examples.parquet"
    pyarrow.parquet.write_table(pyarrow.json.read_json(FILES / "examples.jsonl"), out)
    return {
        "jsonl": FILES / "examples.jsonl",
        "json": FILES / "examples.json",
        "csv": FILES / "examples.csv",
        "parquet": out,
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrow copies of data files go to a test cache, not ~/.cache/fedrank."""
    monkeypatch.setenv("FEDRANK_CACHE", str(tmp_path_factory.getbasetemp() / "fedrank-cache"))


def test_every_file_format_reads_to_the_same_examples(data_files: dict[str, Path]) -> None:
    stores = {fmt: FileStore([p], group_by="task") for fmt, p in data_files.items()}
    base = stores["jsonl"]
    assert base.task_names() == ["compare", "math", "translate"]
    assert [base.count(t) for t in base.task_names()] == [4, 4, 4]
    tr = base.examples("translate")
    assert tr[0] == Example("Translate to English\n\nchat", "cat", ("cat",), task="translate")
    math = base.examples("math")
    assert (
        math[0].prompt == "What is 2 plus 3?" and math[0].references == ("5", "five") and math[1].references == ("8",)
    )
    mc = base.examples("compare")
    assert mc[1] == Example("Is 1 greater than 5?", "no", ("no",), ("yes", "no"), 1, "compare")
    assert mc[2].scores == (1.0, 0.0, 0.5) and mc[2].credit(2) == 0.5
    assert base.client_ids("translate") == [1, 2, 10, 1]
    for fmt, store in stores.items():
        assert store.task_names() == base.task_names(), fmt
        for t in base.task_names():
            assert store.examples(t) == base.examples(t), (fmt, t)
            assert store.client_ids(t) == base.client_ids(t), (fmt, t)  # CSV's "10" is the number 10 too
    # group_by's default is "client" (each client's rows one task, as JSONL was read before); no such
    # column: the file's stem
    by_client = FileStore([data_files["csv"]])
    assert by_client.task_names() == ["1", "10", "2"] and by_client.count("10") == 4
    assert FileStore([data_files["json"]], group_by="nope").task_names() == ["examples"]


def test_file_errors_name_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    no_output = tmp_path / "a.jsonl"
    no_output.write_text('{"instruction": "x", "answer": "y"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl: missing column 'output'.*'answer'"):
        FileStore([no_output])
    no_prompt = tmp_path / "b.csv"
    no_prompt.write_text("question,target\nx,y\n")
    with pytest.raises(ValueError, match=r"b\.csv: missing column 'prompt'"):
        FileStore([no_prompt])
    empty_cell = tmp_path / "c.jsonl"
    empty_cell.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": null}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl: row 1 has no 'output' value"):
        FileStore([empty_cell])
    with pytest.raises(
        ValueError, match=r"d\.txt: unknown extension '\.txt'; known: \.json, \.jsonl, \.csv, \.parquet"
    ):
        FileStore([tmp_path / "d.txt"])
    with pytest.raises(FileNotFoundError, match=r"e\.parquet does not exist"):
        FileStore([tmp_path / "e.parquet"])
    bad_mc = tmp_path / "f.json"
    bad_mc.write_text('[{"prompt": "p", "target": "t", "choices": ["t", "u"], "correct": 5}]')
    with pytest.raises(ValueError, match=r"f\.json: row 0: multiple-choice example needs 0 <= correct < 2"):
        FileStore([bad_mc]).examples("f")
    half_clients = tmp_path / "g.jsonl"
    half_clients.write_text('{"instruction": "x", "output": "y", "client": 1}\n{"instruction": "z", "output": "w"}\n')
    with pytest.raises(ValueError, match=r"g\.jsonl: row 1 has no 'client' value"):
        FileStore([half_clients])
    broken = tmp_path / "h.jsonl"
    broken.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": \n')
    with pytest.raises(ValueError, match=r"h\.jsonl could not be read as json: JSON parse error.* row 1"):
        FileStore([broken])
    with pytest.raises(ConfigError, match="needs data.paths"):
        DataConfig(source="files")
    with pytest.raises(ConfigError, match=r"\['x\.txt'\]: unknown extension"):
        DataConfig(source="files", paths=("x.jsonl", "x.txt"))
    assert DataConfig(source="jsonl", paths=("x.csv",)).source == "jsonl"  # the old name still reads any format


def test_files_are_cached_as_arrow_outside_the_data_directory(data_files: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_bytes(data_files["jsonl"].read_bytes())
    store = FileStore([data / "rows.jsonl"], cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in data.iterdir()) == ["rows.jsonl"]
    assert list((tmp_path / "cache" / "datasets").rglob("*.arrow"))
    assert store.count("2") == 4
    # a changed file is read again, not served from the cache
    (data / "rows.jsonl").write_text('{"instruction": "x", "output": "y", "client": 7}\n')
    os.utime(data / "rows.jsonl", (1, 1))
    assert FileStore([data / "rows.jsonl"], cache_dir=tmp_path / "cache").task_names() == ["7"]


# ---------------------------------------------------------------------------------------------- partitions
def counted_store(tasks: int = 6, per_task: int = 40) -> InMemoryStore:
    return InMemoryStore(
        {f"t{i}": [Example(f"t{i} q{j}", "a", task=f"t{i}") for j in range(per_task)] for i in range(tasks)}
    )


def test_dirichlet_is_flwr_datasets_dirichlet_partitioner_over_the_task_index() -> None:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    store = counted_store()
    cfg = PartitionConfig(kind="dirichlet", num_clients=7, num_eval_tasks=1, dirichlet_alpha=0.3, seed=4)
    fed = Federation(store, cfg)
    counts = [store.count(t) for t in fed.train_tasks]
    table = Dataset.from_dict({"task": [i for i, n in enumerate(counts) for _ in range(n)]})
    ref = DirichletPartitioner(num_partitions=7, partition_by="task", alpha=0.3, min_partition_size=2, seed=4)
    ref.dataset = table
    for cid in range(7):
        part = ref.load_partition(cid)["task"]
        assert fed.num_examples(cid) + fed.num_test_examples(cid) == len(part) >= 2
        assert fed.client_tasks(cid) == tuple(fed.train_tasks[t] for t in sorted(set(part)))


def test_iid_clients_hold_equal_shares() -> None:
    fed = Federation(counted_store(), PartitionConfig(kind="iid", num_clients=7, num_eval_tasks=1, seed=2))
    sizes = [fed.num_examples(c) + fed.num_test_examples(c) for c in range(7)]
    assert sum(sizes) == 200 and max(sizes) - min(sizes) <= 1 and sizes == [29, 29, 29, 29, 28, 28, 28]
    assert all(len(fed.client_tasks(c)) >= 3 for c in range(7))  # 29 random rows of 5 tasks: most of them


def test_partitions_refuse_clearly_what_they_cannot_do() -> None:
    store = counted_store(tasks=6, per_task=40)
    with pytest.raises(ValueError, match=r"200 training examples cannot give each of the 101 clients 2"):
        Federation(store, PartitionConfig(kind="iid", num_clients=101, num_eval_tasks=1))
    with pytest.raises(
        ValueError, match=r"Dirichlet\(alpha=0\.001\) over 20 clients .* raise partition\.dirichlet_alpha"
    ):
        Federation(store, PartitionConfig(kind="dirichlet", num_clients=20, num_eval_tasks=1, dirichlet_alpha=0.001))
    with pytest.raises(ValueError, match="natural' needs a 'client' column"):
        Federation(store, PartitionConfig(kind="natural", num_clients=3, num_eval_tasks=1))


def test_natural_partition_is_the_client_column(data_files: dict[str, Path]) -> None:
    store = FileStore([data_files["csv"]], group_by="task")
    with pytest.raises(ValueError, match=r"3 distinct 'client' ids, but partition.num_clients = 4; set .* = 3"):
        Federation(store, PartitionConfig(kind="natural", num_clients=4, num_eval_tasks=1, min_examples=1))
    for seed in range(4):
        cfg = PartitionConfig(
            kind="natural", num_clients=3, num_eval_tasks=1, min_examples=1, test_fraction=0.0, seed=seed
        )
        fed = Federation(store, cfg)
        assert fed.natural_ids == [1, 2, 10]  # numeric order, from CSV text as from JSON numbers
        rows = [json.loads(line) for line in data_files["jsonl"].read_text().splitlines()]
        for cid, natural in enumerate(fed.natural_ids):
            want = {row_example(r, "").prompt for r in rows if r["client"] == natural and r["task"] in fed.train_tasks}
            got = fed.client(cid)
            assert {e.prompt for e in got.train} == want and fed.num_examples(cid) == len(want)
            assert set(got.tasks) <= set(fed.train_tasks) and fed.eval_tasks[0] not in got.tasks


@pytest.mark.parametrize("kind", ["dirichlet", "iid", "natural"])
def test_library_partitions_are_seeded_and_build_no_examples(kind: str) -> None:
    class Counting(InMemoryStore):
        loads = 0

        def examples(self, task: str) -> list[Example]:
            Counting.loads += 1
            return super().examples(task)

    base = counted_store()
    store = Counting(base.tasks, clients={t: [j % 7 for j in range(40)] for t in base.tasks})
    cfg = PartitionConfig(kind=kind, num_clients=7, num_eval_tasks=1, seed=3)
    a, b = Federation(store, cfg), Federation(store, cfg)
    assert Counting.loads == 0 and [a.num_examples(c) for c in range(7)] == [b.num_examples(c) for c in range(7)]
    assert [a.client(c) for c in range(7)] == [b.client(c) for c in range(7)]
    other = Federation(store, PartitionConfig(kind=kind, num_clients=7, num_eval_tasks=1, seed=8))
    assert [other.client(c).train for c in range(7)] != [a.client(c).train for c in range(7)]


# ---------------------------------------------------------------------------------------------- node data
def test_node_data_routes(data_files: dict[str, Path]) -> None:
    data = DataConfig(source="synthetic", synthetic_tasks=6, synthetic_examples=20)
    part = PartitionConfig(kind="dirichlet", num_clients=4, num_eval_tasks=1, min_examples=1, seed=1)
    from fedrank.data import federation, open_store

    fed = Federation(open_store(data, seed=5), part)
    # partition-id (Ray simulation: partition-id and num-partitions only): the simulator's client
    for pid in range(4):
        got = node_data(data, part, {"partition-id": pid, "num-partitions": 4}, seed=5)
        assert got == fed.client(pid)
    assert node_data(data, part, {"partition-id": "2"}, seed=5) == fed.client(2)  # node config values may be text
    assert federation(data, part, 5) is federation(data, part, 5)  # built once per process
    with pytest.raises(ValueError, match="num-partitions = 3, but the run registers partition.num_clients = 4"):
        node_data(data, part, {"partition-id": 0, "num-partitions": 3}, seed=5)
    with pytest.raises(ValueError, match="partition-id 4 is outside the run's 4 clients"):
        node_data(data, part, {"partition-id": 4}, seed=5)
    # task: every example of one training task
    task = fed.train_tasks[0]
    got = node_data(data, part, {"task": task, "partition-id": 3}, seed=5)
    assert got.client_id == 3 and got.tasks == (task,) and len(got.train) == 16 and len(got.test) == 4
    assert sorted(e.prompt for e in got.train + got.test) == sorted(e.prompt for e in fed.store.examples(task))
    with pytest.raises(ValueError, match=f"task {fed.eval_tasks[0]!r}: its family .* is held out for evaluation"):
        node_data(data, part, {"task": fed.eval_tasks[0]}, seed=5)
    with pytest.raises(ValueError, match="task 'nope': unknown; the run's data has 6 tasks"):
        node_data(data, part, {"task": "nope"}, seed=5)
    # data-path: the node's own file, all of it
    own = node_data(data, part, {"data-path": str(data_files["parquet"]), "partition-id": 1}, seed=5)
    assert own.client_id == 1 and own.tasks == ("1", "10", "2")
    assert len(own.train) == 10 and len(own.test) == 2
    assert {e.prompt for e in own.train + own.test} == {
        e.prompt for e in FileStore([data_files["jsonl"]]).examples("1")
    } | {e.prompt for t in ("2", "10") for e in FileStore([data_files["jsonl"]]).examples(t)}
    with pytest.raises(ValueError, match="both data-path and task"):
        node_data(data, part, {"data-path": str(data_files["csv"]), "task": task}, seed=5)
    with pytest.raises(ValueError, match="names no data: give partition-id"):
        node_data(data, part, {"rank": 8}, seed=5)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        node_data(data, part, {"data-path": "/nonexistent/missing.jsonl"}, seed=5)


def test_data_imports_no_flwr_and_datasets_only_offline_and_on_use() -> None:
    """``flwr`` is fedrank.flower's alone; datasets / flwr-datasets load when a file or partition needs them,
    with the offline switches on."""
    import subprocess
    import sys

    code = (
        "import sys, fedrank.config, fedrank.data\n"
        "assert not {'datasets', 'flwr_datasets', 'flwr'} & set(sys.modules), 'imported at start'\n"
        "from fedrank.data import Federation, PartitionConfig\n"
        "from fedrank.data.synthetic import synthetic_store\n"
        "Federation(synthetic_store(), PartitionConfig(kind='dirichlet', num_clients=4, num_eval_tasks=1))\n"
        "import datasets\n"
        "assert 'flwr_datasets' in sys.modules and 'flwr' not in sys.modules\n"
        "assert datasets.config.HF_DATASETS_OFFLINE and datasets.config.HF_HUB_OFFLINE\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_run_on_users_files_with_the_natural_partition(data_files: dict[str, Path], tmp_path: Path) -> None:
    from fedrank.config import load_config
    from fedrank.simulation import Simulation

    cfg_path = tmp_path / "files.toml"
    cfg_path.write_text(
        f"""
[model]
name = "tiny"
[data]
source = "files"
paths = [{json.dumps(str(data_files["csv"]))}, {json.dumps(str(data_files["parquet"]))}]
group_by = "task"
[partition]
kind = "natural"
num_clients = 3
num_eval_tasks = 1
min_examples = 1
[ranks]
distribution = "uniform"
choices = [2, 4]
[federation]
rounds = 1
clients_per_round = 2
[train]
steps = 1
batch_size = 2
max_seq_len = 32
[eval]
participants = 1
[eval.settings]
max_new_tokens = 2
max_new_tokens_cap = 2
max_seq_len = 32
[output]
plots = false
"""
    )
    sim = Simulation(load_config(cfg_path), tmp_path / "run", progress=False)
    assert sim.fed.natural_ids == [1, 2, 10] and len(sim.fed.train_tasks) == 2
    assert sum(sim.fed.num_examples(c) + sim.fed.num_test_examples(c) for c in range(3)) == 16  # 2 tasks x 4 x 2 files
    sim.run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if r["type"] == "client"]) == 2
