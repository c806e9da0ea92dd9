"""Small synthetic tasks generated in-process (no download): for tests, demos and smoke runs.

Each task is a simple string transformation or question (generative), or a yes/no comparison
(multiple choice), with seeded examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fedrank.data.examples import Example
from fedrank.data.store import InMemoryStore

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "light",
    "table",
    "music",
    "ocean",
    "piano",
    "tiger",
    "bread",
    "chair",
    "dream",
    "flame",
    "grape",
    "house",
    "juice",
    "knife",
    "lemon",
    "mango",
    "night",
    "olive",
    "pearl",
    "queen",
    "robin",
    "sugar",
    "train",
    "umbra",
    "violet",
    "water",
    "yacht",
    "zebra",
]


def _gen(rnd: random.Random, kind: str) -> Example:
    w = rnd.choice(WORDS)
    a, b = rnd.randint(0, 30), rnd.randint(0, 30)
    makers: dict[str, Callable[[], Example]] = {
        "upper": lambda: Example(f"Write the word in capitals: {w}", w.upper()),
        "reverse": lambda: Example(f"Write the word backwards: {w}", w[::-1]),
        "first_letter": lambda: Example(f"What is the first letter of {w}?", w[0]),
        "length": lambda: Example(f"How many letters are in {w}?", str(len(w))),
        "add": lambda: Example(f"What is {a} plus {b}?", str(a + b)),
        "double": lambda: Example(f"What is twice {a}?", str(2 * a)),
        "greater": lambda: Example(
            f"Is {a} greater than {b}?", "yes" if a > b else "no", choices=("yes", "no"), correct=0 if a > b else 1
        ),
        "even": lambda: Example(
            f"Is {a} an even number?",
            "yes" if a % 2 == 0 else "no",
            choices=("yes", "no"),
            correct=0 if a % 2 == 0 else 1,
        ),
    }
    return makers[kind]()


KINDS = ("upper", "reverse", "first_letter", "length", "add", "double", "greater", "even")


def synthetic_store(num_tasks: int = 16, examples_per_task: int = 40, seed: int = 0) -> InMemoryStore:
    """``num_tasks`` tasks cycling through the task kinds, named ``<kind>_<i>``."""
    tasks: dict[str, list[Example]] = {}
    keywords: dict[str, tuple[str, ...]] = {}
    for i in range(num_tasks):
        kind = KINDS[i % len(KINDS)]
        name = f"{kind}_{i}"
        rnd = random.Random(f"{seed}:{name}")
        exs = [_gen(rnd, kind) for _ in range(examples_per_task)]
        tasks[name] = [Example(e.prompt, e.target, e.references, e.choices, e.correct, name) for e in exs]
        keywords[name] = ("multiple choice",) if kind in ("greater", "even") else ("generative",)
    return InMemoryStore(tasks, keywords)
