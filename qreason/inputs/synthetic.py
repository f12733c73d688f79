"""Seeded arithmetic word problems with known answers: the demo task that needs no dataset.

Each problem starts a person with a count of some item and applies ``steps`` operations (add, take away,
multiply, share equally). Every intermediate value is a positive integer, so the answer and the reference
steps are exact. The same (seed, index, steps) always gives the same problem.
"""

from __future__ import annotations

import random

NAMES = [
    ("Ana", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Dev", "he"),
    ("Eli", "they"),
    ("Farah", "she"),
    ("Gus", "he"),
    ("Hana", "she"),
    ("Ivo", "he"),
    ("Jun", "they"),
]
ITEMS = ["apples", "marbles", "stickers", "pencils", "coins", "stamps", "cookies", "shells", "cards", "beads"]
FRIENDS = ["a neighbour", "a classmate", "a cousin", "a friend", "the teacher"]
MULTIPLIER_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}


def _has(pronoun: str) -> str:
    return "have" if pronoun == "they" else "has"


OPERATIONS = ("add", "sub", "mul", "div")


def make_problem(
    rng: random.Random, steps: int, ops: tuple[str, ...] = OPERATIONS, max_number: int | None = None
) -> tuple[str, int, list[str]]:
    """One problem with ``steps`` operations drawn from ``ops``: (question, answer, reference steps).
    ``max_number`` caps the starting count and every number added or taken away (the default draws the start
    from 5-40 and the operands from 2-30); small caps make the easy problems a very small model can solve."""
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    top = max_number or 40
    value = rng.randint(min(5, top), top)
    add_top = min(30, max_number) if max_number else 30
    sentences = [f"{name} {_has(pron)} {value} {item}."]
    reference = []
    for _ in range(steps):
        divisors = [k for k in (2, 3, 4, 5) if value % k == 0 and value // k >= 2]
        allowed = [o for o in ops if (o != "div" or divisors) and (o != "sub" or value > 3)]
        op = rng.choice(allowed or ["add"])
        if op == "add":
            b = rng.randint(min(2, add_top), add_top)
            sentences.append(f"Then {pron} {'get' if pron == 'they' else 'gets'} {b} more {item}.")
            reference.append(f"{value} + {b} = {value + b}")
            value += b
        elif op == "sub":
            b = rng.randint(2, min(value - 1, 25, max_number or 25))
            sentences.append(
                f"{pron.capitalize()} {'give' if pron == 'they' else 'gives'} {b} {item} to "
                f"{rng.choice(FRIENDS)}."
            )
            reference.append(f"{value} - {b} = {value - b}")
            value -= b
        elif op == "mul":
            k = rng.choice([2, 3, 4]) if value < 200 else 2
            sentences.append(f"Then the number of {item} {pron} {_has(pron)} {MULTIPLIER_WORDS[k]}.")
            reference.append(f"{value} * {k} = {value * k}")
            value *= k
        else:
            k = rng.choice(divisors)
            sentences.append(
                f"{pron.capitalize()} {'share' if pron == 'they' else 'shares'} the {item} equally "
                f"among {k} boxes and {'keep' if pron == 'they' else 'keeps'} one box."
            )
            reference.append(f"{value} / {k} = {value // k}")
            value //= k
    sentences.append(
        f"How many {item} does {name} have now?" if pron != "they" else f"How many {item} do they have now?"
    )
    return " ".join(sentences), value, reference


MAX_PROBLEMS = 100_000  # far beyond a useful run; a typo (1e9) must not fill the memory of the planner
MAX_STEPS = 50


def generate(
    n: int = 50,
    min_steps: int = 1,
    max_steps: int = 4,
    seed: int = 0,
    ops: list[str] | tuple[str, ...] = OPERATIONS,
    max_number: int | None = None,
) -> list[dict]:
    """``n`` problems as plain rows (id, question, answer, steps, reference_steps), difficulties spread
    evenly. ``ops``: the operations to draw from (add, sub, mul, div). ``max_number``: the largest starting
    count and operand (at least 3; default: starts 5-40, operands 2-30)."""
    if n < 1 or min_steps < 1 or max_steps < min_steps:
        raise ValueError("need n >= 1 and 1 <= min_steps <= max_steps")
    if n > MAX_PROBLEMS or max_steps > MAX_STEPS:
        raise ValueError(f"at most {MAX_PROBLEMS} problems of at most {MAX_STEPS} steps")
    if max_number is not None and max_number < 3:
        raise ValueError("max_number must be at least 3")
    if not ops or set(ops) - set(OPERATIONS):
        raise ValueError(f"ops must be a non-empty subset of {', '.join(OPERATIONS)}")
    ops = tuple(ops)
    rows = []
    span = max_steps - min_steps + 1
    for i in range(n):
        steps = min_steps + i % span
        rng = random.Random(f"qreason-synthetic/{seed}/{i}/{steps}")
        question, answer, reference = make_problem(rng, steps, ops, max_number)
        rows.append(
            {
                "id": f"s{seed}-{i:05d}",
                "question": question,
                "answer": str(answer),
                "steps": steps,
                "reference_steps": reference,
            }
        )
    return rows
