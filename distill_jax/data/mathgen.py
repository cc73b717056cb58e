"""Synthetic GSM8K-style math word problems: templated multi-step stories with worked solutions.

Every problem is a short story (names, objects, prices, speeds, ages, recipes, ...) whose answer
takes ``steps`` arithmetic computations. The solution has one sentence per computation, written
the way GSM8K writes it, and ends with the answer line::

    Maria buys 6 * 12 = <<6*12=72>>72 crayons.
    Maria has 72 - 15 = <<72-15=57>>57 crayons left.
    #### 57

* Operations: addition, subtraction, multiplication, exact division, percentages and fractions of
  a quantity, rates (price x quantity, speed x time, wage x hours), comparisons ("how many more").
  Every intermediate value and every answer is a non-negative integer of moderate size.
* Reproducible: all randomness comes from one :class:`random.Random` seeded with an integer, and
  all arithmetic is on integers / :class:`fractions.Fraction`, so a seed gives the same problems,
  bit for bit, on every run and platform (no dependence on ``hash()`` or set order).
* Splits: a problem belongs to ``"test"`` or ``"train"`` by a SHA-256 of its question text
  (:func:`split_of`), so no question can ever be in both splits, whatever the seeds.

API: :func:`generate_problem`, :func:`generate`, :func:`write_jsonl`, :func:`parse_answer` (the
scorer for model outputs) and :func:`main`, the CLI::

    python -m distill_jax.data.mathgen --n 1000 --seed 0 --split train --out train.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import operator
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Sequence

__all__ = [
    "GENERATOR_VERSION",
    "MAX_SUPPORTED_STEPS",
    "MathProblem",
    "SPLITS",
    "TEMPLATE_NAMES",
    "generate",
    "generate_problem",
    "answer_value",
    "main",
    "parse_answer",
    "parse_number",
    "split_of",
    "write_jsonl",
]

#: Bumped whenever a change to the templates changes what a seed generates.
GENERATOR_VERSION = 1
SPLITS = ("train", "test")
#: One question in ``TEST_BUCKETS`` (by hash) belongs to the test split.
TEST_BUCKETS = 10
MIN_SUPPORTED_STEPS = 1
MAX_SUPPORTED_STEPS = 8
#: No intermediate value or answer exceeds this.
MAX_VALUE = 1_000_000


@dataclass(frozen=True)
class MathProblem:
    """A word problem, its worked solution (ending ``#### <answer>``), answer and step count."""

    question: str
    solution: str
    answer: int
    steps: int
    template: str = ""


# ---------------------------------------------------------------------------------------------
# Exact arithmetic on the expressions written into solutions
# ---------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*(\d+|[-+*/()])")


def _evaluate(expr: str) -> Fraction:
    """The exact value of ``expr``: integers, ``+ - * /`` and parentheses, usual precedence."""
    tokens: list[str] = []
    text = expr.strip()
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"bad expression {expr!r}")
        tokens.append(m.group(1))
        pos = m.end()
    i = 0

    def atom() -> Fraction:
        nonlocal i
        if i >= len(tokens):
            raise ValueError(f"bad expression {expr!r}")
        tok = tokens[i]
        i += 1
        if tok == "(":
            value = additive()
            if i >= len(tokens) or tokens[i] != ")":
                raise ValueError(f"bad expression {expr!r}")
            i += 1
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        raise ValueError(f"bad expression {expr!r}")

    def multiplicative() -> Fraction:
        nonlocal i
        value = atom()
        while i < len(tokens) and tokens[i] in "*/":
            op = tokens[i]
            i += 1
            rhs = atom()
            value = value * rhs if op == "*" else value / rhs
        return value

    def additive() -> Fraction:
        nonlocal i
        value = multiplicative()
        while i < len(tokens) and tokens[i] in "+-":
            op = tokens[i]
            i += 1
            rhs = multiplicative()
            value = value + rhs if op == "+" else value - rhs
        return value

    result = additive()
    if i != len(tokens):
        raise ValueError(f"bad expression {expr!r}")
    return result


class _Retry(Exception):
    """The random draws did not fit the template's constraints; draw again."""


class _Sol:
    """The solution being written: one sentence per computation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.values: list[int] = []

    def step(self, expr: str, sentence: str, *, money: bool = False) -> int:
        """Append ``sentence`` with its ``@`` replaced by ``expr = <<expr=value>>value``."""
        value = _evaluate(expr)
        if value.denominator != 1 or value < 0 or value > MAX_VALUE:
            raise _Retry
        v = int(value)
        if sentence.count("@") != 1:
            raise AssertionError(f"a step sentence needs exactly one '@': {sentence!r}")
        shown = f"{expr} = {'$' if money else ''}<<{expr.replace(' ', '')}={v}>>{v}"
        self.lines.append(sentence.replace("@", shown))
        self.values.append(v)
        return v


# ---------------------------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Person:
    name: str
    subj: str  # she / he
    obj: str  # her / him
    poss: str  # her / his
    refl: str  # herself / himself

    @property
    def Subj(self) -> str:  # noqa: N802  (capitalised pronoun, sentence start)
        return self.subj.capitalize()


_FEMALE = (
    "Natalia", "Janet", "Maria", "Aisha", "Sofia", "Emma", "Olivia", "Priya", "Mei", "Fatima",
    "Chloe", "Hannah", "Grace", "Lucia", "Amara", "Zoe", "Ingrid", "Yuki", "Leila", "Rosa",
    "Nadia", "Carmen", "Beth", "Tamara", "Keiko", "Ana", "Lily", "Nora", "Julia", "Esther",
    "Brenda", "Wendy", "Freya", "Imani", "Elena", "Sakura",
)
_MALE = (
    "James", "Liam", "Noah", "Mateo", "Omar", "Raj", "Kenji", "Lucas", "Ethan", "Tariq",
    "Diego", "Samuel", "Ben", "Hiro", "Ivan", "Kwame", "Marco", "Felix", "Owen", "Arjun",
    "Pedro", "Hassan", "Tom", "Leo", "Daniel", "Carlos", "Yusuf", "Jamal", "Victor", "Oscar",
    "Gary", "Wei", "Anders", "Malik", "Nikolai", "Rafael",
)
_PEOPLE = tuple(
    [_Person(n, "she", "her", "her", "herself") for n in _FEMALE]
    + [_Person(n, "he", "him", "his", "himself") for n in _MALE]
)
_RELATIVES = (
    "sister", "brother", "cousin", "neighbor", "best friend", "classmate", "aunt", "uncle",
    "grandmother", "teacher", "roommate", "coworker",
)
_CHARITIES = ("a local charity", "the school", "a shelter", "the community center", "a hospital")


def _people(rng: random.Random, k: int) -> list[_Person]:
    return rng.sample(_PEOPLE, k)


def _recipient(rng: random.Random, person: _Person, others: Sequence[_Person] = ()) -> str:
    """Someone to give things to: "her sister" or another name (not ``person`` or ``others``)."""
    if rng.random() < 0.5:
        return f"{person.poss} {rng.choice(_RELATIVES)}"
    taken = {person.name, *(p.name for p in others)}
    while True:
        other = rng.choice(_PEOPLE)
        if other.name not in taken:
            return other.name


@dataclass(frozen=True)
class _Item:
    one: str
    many: str
    box: str
    boxes: str
    gain: str  # "{name} picks 5 more apples."
    lose: str  # "{name} eats 5 apples."
    price: tuple[int, int]  # dollars, each


_ITEMS = (
    _Item("marble", "marbles", "bag", "bags", "finds", "loses", (1, 2)),
    _Item("sticker", "stickers", "sheet", "sheets", "buys", "uses", (1, 2)),
    _Item("pencil", "pencils", "box", "boxes", "buys", "loses", (1, 3)),
    _Item("crayon", "crayons", "box", "boxes", "buys", "breaks", (1, 2)),
    _Item("baseball card", "baseball cards", "pack", "packs", "buys", "trades away", (1, 4)),
    _Item("stamp", "stamps", "booklet", "booklets", "buys", "uses", (1, 3)),
    _Item("seashell", "seashells", "bucket", "buckets", "collects", "loses", (1, 3)),
    _Item("bead", "beads", "jar", "jars", "buys", "uses", (1, 2)),
    _Item("button", "buttons", "jar", "jars", "finds", "loses", (1, 2)),
    _Item("toy car", "toy cars", "box", "boxes", "buys", "loses", (2, 6)),
    _Item("postcard", "postcards", "pack", "packs", "buys", "mails", (1, 3)),
    _Item("balloon", "balloons", "bag", "bags", "buys", "pops", (1, 2)),
    _Item("comic book", "comic books", "box", "boxes", "buys", "loses", (2, 6)),
    _Item("candle", "candles", "box", "boxes", "makes", "burns", (2, 5)),
    _Item("apple", "apples", "basket", "baskets", "picks", "eats", (1, 2)),
    _Item("orange", "oranges", "crate", "crates", "picks", "eats", (1, 2)),
    _Item("egg", "eggs", "carton", "cartons", "collects", "uses", (1, 1)),
    _Item("cookie", "cookies", "jar", "jars", "bakes", "eats", (1, 3)),
    _Item("cupcake", "cupcakes", "box", "boxes", "bakes", "eats", (2, 4)),
    _Item("muffin", "muffins", "tray", "trays", "bakes", "eats", (2, 4)),
    _Item("lemon", "lemons", "bag", "bags", "picks", "uses", (1, 2)),
    _Item("peach", "peaches", "basket", "baskets", "picks", "eats", (1, 3)),
    _Item("strawberry", "strawberries", "basket", "baskets", "picks", "eats", (1, 1)),
    _Item("donut", "donuts", "box", "boxes", "buys", "eats", (1, 3)),
    _Item("potato", "potatoes", "sack", "sacks", "digs up", "cooks", (1, 2)),
    _Item("plum", "plums", "basket", "baskets", "picks", "eats", (1, 2)),
    _Item("granola bar", "granola bars", "box", "boxes", "buys", "eats", (1, 2)),
    _Item("tennis ball", "tennis balls", "can", "cans", "buys", "loses", (1, 3)),
)

_FRACTIONS = (
    (1, 2, "half"), (1, 3, "a third"), (1, 4, "a quarter"), (1, 5, "a fifth"),
    (2, 3, "two thirds"), (3, 4, "three quarters"), (2, 5, "two fifths"), (3, 5, "three fifths"),
    (1, 6, "a sixth"), (1, 10, "a tenth"),
)
_PERCENTS = (10, 20, 25, 30, 40, 50, 60, 75, 80)
_TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def _join(words: Sequence[str]) -> str:
    """a, b and c"""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _money(n: int) -> str:
    return f"${n:,}"


def _num(n: int) -> str:
    return f"{n:,}"


def _multiple_in(rng: random.Random, m: int, lo: int, hi: int) -> int:
    """A random multiple of ``m`` in ``[lo, hi]``."""
    first, last = -(-lo // m), hi // m
    if first > last:
        raise _Retry
    return m * rng.randint(first, last)


def _divisor_in(rng: random.Random, x: int, lo: int, hi: int) -> int:
    """A random divisor of ``x`` in ``[lo, hi]``."""
    divisors = [d for d in range(lo, hi + 1) if x % d == 0]
    if not divisors:
        raise _Retry
    return rng.choice(divisors)


def _percent_of(rng: random.Random, x: int, choices: Sequence[int] = _PERCENTS) -> int:
    """A percentage ``p`` with ``x * p / 100`` an integer."""
    fits = [p for p in choices if x * p % 100 == 0]
    if not fits:
        raise _Retry
    return rng.choice(fits)


def _percent_step(p: int) -> int:
    """The smallest ``m`` such that ``p`` percent of any multiple of ``m`` is an integer."""
    return 100 // math.gcd(p, 100)


def _fraction_of(rng: random.Random, x: int) -> tuple[int, int, str]:
    fits = [f for f in _FRACTIONS if x * f[0] % f[1] == 0 and x * f[0] // f[1] > 0]
    if not fits:
        raise _Retry
    return rng.choice(fits)


def _fraction_expr(x: int, n: int, d: int) -> str:
    return f"{x} / {d}" if n == 1 else f"{x} * {n} / {d}"


# ---------------------------------------------------------------------------------------------
# Templates: each takes (rng, steps) and returns (question, solution) with exactly `steps`
# computations, the last one being the answer.
# ---------------------------------------------------------------------------------------------

_Template = Callable[[random.Random, int], tuple[str, _Sol]]


def _t_inventory(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """A person's collection changes through a chain of events; how many at the end?"""
    item = rng.choice(_ITEMS)
    cast = _people(rng, 4)
    first = cast[0]
    spare = list(cast[1:])  # people a "transfer" can pass the story on to
    holder = first
    many = item.many
    sol = _Sol()
    q: list[str] = []
    budget = k
    if budget >= 2 and rng.random() < 0.5:
        b, c = rng.randint(2, 9), rng.choice((4, 5, 6, 8, 10, 12, 15, 20, 24))
        q.append(f"{first.name} buys {b} {item.boxes} of {many}. Each {item.box} "
                 f"{rng.choice(('holds', 'has', 'contains'))} {c} {many}.")
        x = sol.step(f"{b} * {c}", f"{first.name} starts with @ {many}.")
        budget -= 1
        started_by_step = True
    else:
        x = rng.randint(15, 90)
        q.append(rng.choice((f"{first.name} has {x} {many}.",
                             f"{first.name} has a collection of {x} {many}.",
                             f"{first.name} starts the week with {x} {many}.")))
        started_by_step = False
    x0 = x
    special = budget >= 1 and (budget >= 2 or started_by_step) and rng.random() < 0.4
    ops_budget = budget - int(special)
    last_kind = "start"
    connectives = ("", "", "Then ", "Later, ", "After that, ", "The next day, ", "Next, ")

    def say(body: str) -> None:
        prefix = rng.choice(connectives) if q else ""
        q.append(prefix + body if prefix else body[:1].upper() + body[1:])

    while ops_budget > 0:
        h = holder.name
        kinds = ["add", "add2", "sub", "sub", "sub2"]
        if x >= 5000:
            kinds = ["sub", "sub2"]
        if spare and x <= 400:
            kinds += ["times", "more_fewer"]
        if spare and x % 2 == 0:
            kinds.append("half")
        if any(x % d == 0 for d in range(2, 7)) and x >= 8:
            kinds.append("share")
        if ops_budget >= 2:
            kinds += ["boxes", "fraction", "fraction", "percent", "percent"]
        if x < 6:
            kinds = [kd for kd in kinds if kd in ("add", "add2", "times", "boxes")] or ["add"]
        kind = rng.choice(kinds)
        if kind == "add":
            a = rng.randint(2, max(6, min(x // 2, 150)))
            say(rng.choice((f"{h} {item.gain} {a} more {many}.",
                            f"{_recipient(rng, holder, cast)} gives {h} {a} more {many}.",
                            f"{h} gets {a} more {many} as a gift.")))
            x = sol.step(f"{x} + {a}", rng.choice((f"{h} now has @ {many}.",
                                                   f"Then {h} has @ {many}.",
                                                   f"After that, {h} has @ {many}.")))
        elif kind == "add2":
            a, b = rng.randint(2, max(6, min(x // 3, 80))), rng.randint(2, max(6, min(x // 3, 80)))
            say(f"{h} {item.gain} {a} {many} and {_recipient(rng, holder, cast)} gives "
                f"{holder.obj} {b} more.")
            x = sol.step(f"{x} + {a} + {b}", f"{h} now has @ {many}.")
        elif kind == "sub":
            a = rng.randint(2, max(2, x // 2))
            say(rng.choice((f"{h} {item.lose} {a} {many}.",
                            f"{h} gives {a} {many} to {_recipient(rng, holder, cast)}.",
                            f"{h} sells {a} of {holder.poss} {many}.",
                            f"{h} donates {a} {many} to {rng.choice(_CHARITIES)}.")))
            x = sol.step(f"{x} - {a}", rng.choice((f"{h} has @ {many} left.",
                                                   f"After that, {h} has @ {many}.",
                                                   f"That leaves {h} with @ {many}.")))
        elif kind == "sub2":
            a = rng.randint(2, max(2, x // 3))
            b = rng.randint(2, max(2, (x - a) // 2))
            if a + b >= x:
                raise _Retry
            say(f"{h} {item.lose} {a} {many} and gives {b} to {_recipient(rng, holder, cast)}.")
            x = sol.step(f"{x} - {a} - {b}", f"{h} has @ {many} left.")
        elif kind == "times":
            other = spare.pop(0)
            m = rng.choice((2, 3, 4) if x <= 200 else (2,))
            say(f"{other.name} has {_TIMES[m]} as many {many} as {h}.")
            x = sol.step(f"{x} * {m}", f"{other.name} has @ {many}.")
            holder = other
        elif kind == "more_fewer":
            other = spare.pop(0)
            if x >= 8 and rng.random() < 0.5:
                a = rng.randint(2, x // 2)
                say(f"{other.name} has {a} fewer {many} than {h}.")
                x = sol.step(f"{x} - {a}", f"{other.name} has @ {many}.")
            else:
                a = rng.randint(2, max(6, min(x, 100)))
                say(f"{other.name} has {a} more {many} than {h}.")
                x = sol.step(f"{x} + {a}", f"{other.name} has @ {many}.")
            holder = other
        elif kind == "half":
            other = spare.pop(0)
            say(f"{other.name} has half as many {many} as {h}.")
            x = sol.step(f"{x} / 2", f"{other.name} has @ {many}.")
            holder = other
        elif kind == "share":
            d = _divisor_in(rng, x, 2, 6)
            friends = "a friend" if d == 2 else f"{d - 1} friends"
            say(f"{h} shares {holder.poss} {many} equally between {holder.refl} and {friends}.")
            x = sol.step(f"{x} / {d}", f"{h} keeps @ {many}.")
        elif kind == "boxes":
            b, c = rng.randint(2, 6), rng.choice((3, 4, 5, 6, 8, 10, 12))
            say(f"{h} buys {b} more {item.boxes} of {many} with {c} {many} in each {item.box}.")
            new = sol.step(f"{b} * {c}", f"The new {item.boxes} have @ {many}.")
            x = sol.step(f"{x} + {new}", f"Now {h} has @ {many}.")
            ops_budget -= 1
        elif kind == "fraction":
            n, d, word = _fraction_of(rng, x)
            say(rng.choice((f"{h} gives {word} of {holder.poss} {many} to "
                            f"{_recipient(rng, holder, cast)}.",
                            f"{h} {item.lose} {word} of {holder.poss} {many}.",
                            f"{h} sells {word} of {holder.poss} {many}.")))
            part = sol.step(_fraction_expr(x, n, d), f"That is @ {many}.")
            x = sol.step(f"{x} - {part}", f"{h} has @ {many} left.")
            ops_budget -= 1
        elif kind == "percent":
            p = _percent_of(rng, x)
            say(rng.choice((f"{h} sells {p}% of {holder.poss} {many}.",
                            f"{h} {item.lose} {p}% of {holder.poss} {many}.",
                            f"{h} donates {p}% of {holder.poss} {many} to "
                            f"{rng.choice(_CHARITIES)}.")))
            part = sol.step(f"{x} * {p} / 100", f"That is @ {many}.")
            x = sol.step(f"{x} - {part}", f"{h} has @ {many} left.")
            ops_budget -= 1
        else:  # pragma: no cover
            raise AssertionError(kind)
        ops_budget -= 1
        last_kind = kind

    h = holder.name
    if special:
        if x != x0 and rng.random() < 0.5:
            since = "at the start" if holder is first else f"{first.name} had at the start"
            if x > x0:
                q.append(f"How many more {many} does {h} have now than {since}?")
                sol.step(f"{x} - {x0}", f"{h} has @ more {many} than {since}.")
            else:
                q.append(f"How many fewer {many} does {h} have now than {since}?")
                sol.step(f"{x0} - {x}", f"{h} has @ fewer {many} than {since}.")
        else:
            lo, hi = item.price
            p = rng.randint(max(2, lo), max(2, hi))
            q.append(f"If {h} sells each {item.one} for {_money(p)}, how much money will "
                     f"{holder.subj} make?")
            sol.step(f"{x} * {p}", f"{h} makes @.", money=True)
    else:
        left = "left" if last_kind in ("sub", "sub2", "fraction", "percent") else "now"
        q.append(rng.choice((f"How many {many} does {h} have {left}?",
                             f"How many {many} does {h} end up with?")))
    return " ".join(q), sol


_GOODS = (
    ("notebook", "notebooks", 2, 6), ("pen", "pens", 1, 3), ("T-shirt", "T-shirts", 8, 20),
    ("pair of socks", "pairs of socks", 2, 6), ("book", "books", 6, 18),
    ("toy robot", "toy robots", 12, 30), ("bag of chips", "bags of chips", 1, 4),
    ("bottle of juice", "bottles of juice", 2, 5), ("sandwich", "sandwiches", 4, 9),
    ("plant pot", "plant pots", 3, 12), ("scarf", "scarves", 7, 20),
    ("board game", "board games", 15, 40), ("video game", "video games", 20, 60),
    ("cap", "caps", 5, 15), ("mug", "mugs", 4, 10), ("puzzle", "puzzles", 6, 20),
    ("pack of batteries", "packs of batteries", 3, 9), ("pizza", "pizzas", 8, 16),
    ("bag of rice", "bags of rice", 2, 7), ("jar of honey", "jars of honey", 4, 11),
    ("paintbrush", "paintbrushes", 2, 8), ("soccer ball", "soccer balls", 10, 25),
)
_STORES = (
    "the store", "the mall", "a craft store", "the farmers' market", "the bookstore",
    "the school fair", "a garage sale", "the supermarket", "a toy shop", "the hardware store",
)


def _t_shopping(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Buys several goods at unit prices; total, optional discount, optional change."""
    options = [(m, change, disc) for m in range(1, 5) for change in (0, 1) for disc in (0, 2)
               if m + (m >= 2) + change + disc == k]
    m, change, disc = rng.choice(options)
    person = rng.choice(_PEOPLE)
    goods = rng.sample(_GOODS, m)
    buys = [(g, rng.randint(2, 6), rng.randint(g[2], g[3])) for g in goods]
    sol = _Sol()
    parts = [f"{qty} {g[1]} for {_money(price)} each" for g, qty, price in buys]
    q = [f"{person.name} goes to {rng.choice(_STORES)}. {person.Subj} buys {_join(parts)}."]
    costs = []
    for g, qty, price in buys:
        costs.append(sol.step(f"{qty} * {price}", rng.choice((f"The {g[1]} cost @.",
                                                              f"{person.Subj} spends @ on {g[1]}."
                                                              )), money=True))
    total = costs[0]
    if m >= 2:
        total = sol.step(" + ".join(map(str, costs)), "In total, the items cost @.", money=True)
    if disc:
        p = _percent_of(rng, total, (5, 10, 15, 20, 25, 30, 40, 50))
        q.append(f"The cashier gives {person.obj} a {p}% discount on the total.")
        off = sol.step(f"{total} * {p} / 100", "The discount is @.", money=True)
        total = sol.step(f"{total} - {off}", f"After the discount, {person.subj} pays @.",
                         money=True)
    if change:
        bills = [b for b in (10, 20, 50, 100) if b > total]
        if bills and rng.random() < 0.7:
            bill = bills[0]
            q.append(f"{person.Subj} pays with a {_money(bill)} bill.")
        else:
            bill = _multiple_in(rng, 50, total + 1, total + 150)
            q.append(f"{person.Subj} gives the cashier {_money(bill)}.")
        q.append(f"How much change does {person.name} get back?")
        sol.step(f"{bill} - {total}", f"{person.name} gets @ in change.", money=True)
    elif disc:
        q.append(f"How much does {person.name} pay after the discount?")
    else:
        q.append(rng.choice((f"How much does {person.name} spend in total?",
                             f"How much money does {person.name} spend?")))
    return " ".join(q), sol


def _relations(rng: random.Random, k: int, *, ages: bool) -> tuple[str, _Sol]:
    """People's amounts (or ages) defined relative to each other, then a total or a difference."""
    d = k - 1
    cast = _people(rng, d + 1)
    sol = _Sol()
    if ages:
        x = rng.randint(6, 40)
        q = [f"{cast[0].name} is {x} years old."]
    else:
        item = rng.choice(_ITEMS)
        has, aux, aux_pl, base, have = rng.choice((("has", "does", "do", "have", "have"),
                                                   ("collected", "did", "did", "collect",
                                                    "collected")))
        x = rng.randint(8, 60)
        q = [f"{cast[0].name} {has} {x} {item.many}."]
    values = [x]
    for i in range(1, d + 1):
        j = i - 1 if rng.random() < 0.7 else rng.randrange(i)
        a_name, bx, who = cast[j].name, values[j], cast[i].name
        kinds = ["more", "more"]
        if bx >= 8:
            kinds += ["fewer", "fewer"]
        if bx * 2 <= (80 if ages else 400):
            kinds.append("times")
        if bx % 2 == 0 and bx >= 8:
            kinds.append("half")
        kind = rng.choice(kinds)
        if ages:
            if kind == "more":
                a = rng.randint(2, 15)
                q.append(f"{who} is {a} years older than {a_name}.")
                expr = f"{bx} + {a}"
            elif kind == "fewer":
                a = rng.randint(2, min(15, bx - 3))
                q.append(f"{who} is {a} years younger than {a_name}.")
                expr = f"{bx} - {a}"
            elif kind == "times":
                m = rng.choice([m for m in (2, 3) if bx * m <= 90])
                q.append(f"{who} is {_TIMES[m]} as old as {a_name}.")
                expr = f"{bx} * {m}"
            else:
                q.append(f"{who} is half as old as {a_name}.")
                expr = f"{bx} / 2"
            values.append(sol.step(expr, f"{who} is @ years old."))
        else:
            if kind == "more":
                a = rng.randint(2, max(6, bx // 2))
                q.append(f"{who} {has} {a} more {item.many} than {a_name}.")
                expr = f"{bx} + {a}"
            elif kind == "fewer":
                a = rng.randint(2, bx // 2)
                q.append(f"{who} {has} {a} fewer {item.many} than {a_name}.")
                expr = f"{bx} - {a}"
            elif kind == "times":
                m = rng.choice([m for m in (2, 3, 4) if bx * m <= 400])
                q.append(f"{who} {has} {_TIMES[m]} as many {item.many} as {a_name}.")
                expr = f"{bx} * {m}"
            else:
                q.append(f"{who} {has} half as many {item.many} as {a_name}.")
                expr = f"{bx} / 2"
            values.append(sol.step(expr, f"{who} {has} @ {item.many}."))
    hi = max(range(len(values)), key=lambda i: (values[i], -i))
    lo = min(range(len(values)), key=lambda i: (values[i], i))
    final = rng.choice(("total", "diff", "pair")) if values[hi] != values[lo] else "total"
    if ages:
        if final == "total":
            q.append(rng.choice(("What is the sum of their ages?",
                                 "What is the total of all their ages?")))
            sol.step(" + ".join(map(str, values)), "The sum of their ages is @ years.")
        elif final == "diff":
            q.append(f"How many years older is {cast[hi].name} than {cast[lo].name}?")
            sol.step(f"{values[hi]} - {values[lo]}",
                     f"{cast[hi].name} is @ years older than {cast[lo].name}.")
        else:
            n = rng.randint(2, 12)
            q.append(f"How old will {cast[-1].name} be in {n} years?")
            sol.step(f"{values[-1]} + {n}", f"In {n} years, {cast[-1].name} will be @ years old.")
    else:
        if final == "total":
            q.append(f"How many {item.many} {aux_pl} they {base} altogether?")
            sol.step(" + ".join(map(str, values)), f"Together they {have} @ {item.many}.")
        elif final == "diff":
            q.append(f"How many more {item.many} {aux} {cast[hi].name} {base} than "
                     f"{cast[lo].name}?")
            sol.step(f"{values[hi]} - {values[lo]}",
                     f"{cast[hi].name} {has} @ more {item.many} than {cast[lo].name}.")
        else:
            q.append(f"How many {item.many} {aux_pl} {cast[0].name} and {cast[-1].name} "
                     f"{base} together?")
            sol.step(f"{values[0]} + {values[-1]}",
                     f"{cast[0].name} and {cast[-1].name} {have} @ {item.many} together.")
    return " ".join(q), sol


def _t_comparison(rng: random.Random, k: int) -> tuple[str, _Sol]:
    return _relations(rng, k, ages=False)


def _t_ages(rng: random.Random, k: int) -> tuple[str, _Sol]:
    return _relations(rng, k, ages=True)


_JOBS = (
    "babysitting", "tutoring math", "walking dogs", "working at a cafe",
    "working at the library", "working at a bakery", "working as a lifeguard", "washing cars",
    "delivering groceries", "working at a bike shop",
)
_WANTS = (
    "bike", "video game console", "tablet", "skateboard", "guitar", "telescope",
    "pair of sneakers", "camera", "keyboard", "tent",
)


def _t_earnings(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Hourly wage x hours x days, then expenses, weeks, purchases."""
    p = rng.choice(_PEOPLE)
    w, h, d = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)
    sol = _Sol()
    q = [f"{p.name} earns {_money(w)} an hour {rng.choice(_JOBS)}. {p.Subj} works {h} hours a "
         f"day, {d} days a week."]
    daily = sol.step(f"{w} * {h}", f"{p.name} earns @ a day.", money=True)
    weekly = sol.step(f"{daily} * {d}", f"{p.Subj} earns @ a week.", money=True)
    if k == 2:
        q.append(f"How much does {p.name} earn in a week?")
    elif k == 3 and rng.random() < 0.5:
        n = rng.randint(2, 8)
        q.append(f"How much does {p.subj} earn in {n} weeks?")
        sol.step(f"{weekly} * {n}", f"In {n} weeks, {p.subj} earns @.", money=True)
    else:
        e = rng.randint(max(1, weekly // 10), max(2, weekly // 2))
        q.append(f"Every week {p.subj} spends {_money(e)} on "
                 f"{rng.choice(('food', 'bus fares', 'movies', 'games', 'snacks', 'clothes'))} "
                 "and saves the rest.")
        saved = sol.step(f"{weekly} - {e}", f"{p.Subj} saves @ a week.", money=True)
        if k == 3:
            q.append(f"How much does {p.name} save each week?")
        else:
            n = rng.randint(2, 8)
            total = sol.step(f"{saved} * {n}", f"In {n} weeks, {p.subj} saves @.", money=True)
            if k == 4:
                q.append(f"How much does {p.name} save in {n} weeks?")
            else:
                cost = rng.randint(max(1, total // 4), total - 1)
                want = rng.choice(_WANTS)
                q.append(f"After {n} weeks, {p.subj} buys a {want} for {_money(cost)}. "
                         f"How much money does {p.name} have left?")
                sol.step(f"{total} - {cost}", f"{p.name} has @ left.", money=True)
    return " ".join(q), sol


_MODES = (
    ("drives", "miles", 30, 65), ("drives", "kilometers", 40, 100),
    ("cycles", "miles", 8, 16), ("cycles", "kilometers", 12, 25), ("walks", "miles", 2, 4),
    ("jogs", "kilometers", 6, 12), ("rides a scooter", "kilometers", 10, 20),
    ("sails", "miles", 6, 18),
)
_PLACES = ("town", "city", "lake", "campsite", "beach", "museum", "farm", "harbor")


def _t_travel(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Legs of speed x time, the total, and how far is left to a destination."""
    options = [(legs, r) for legs in range(1, 5) for r in (0, 1) if legs + (legs >= 2) + r == k]
    legs, r = rng.choice(options)
    p = rng.choice(_PEOPLE)
    verb, unit, lo, hi = rng.choice(_MODES)
    speeds = [rng.randint(lo, hi) for _ in range(legs)]
    hours = [rng.randint(2, 5) for _ in range(legs)]
    total_guess = sum(s * t for s, t in zip(speeds, hours))
    dest = total_guess + rng.randint(5, max(10, total_guess // 2))
    place = rng.choice(_PLACES)
    sol = _Sol()
    q = [f"{p.name} is going to a {place} that is {_num(dest)} {unit} away."] if r else []
    for i, (s, t) in enumerate(zip(speeds, hours)):
        if i == 0:
            q.append(f"{p.name} {verb} at {s} {unit} per hour for {t} hours.")
        elif i == legs - 1:
            q.append(f"Finally, {p.subj} {verb} at {s} {unit} per hour for {t} more hours.")
        else:
            q.append(f"Then {p.subj} {verb} at {s} {unit} per hour for {t} hours.")
    dists = []
    for i, (s, t) in enumerate(zip(speeds, hours)):
        where = f"In the {_ORDINALS[i]} part, " if legs > 1 else ""
        dists.append(sol.step(f"{s} * {t}", f"{where}{p.name} travels @ {unit}."
                              if not where else f"{where}{p.subj} travels @ {unit}."))
    total = dists[0]
    if legs >= 2:
        total = sol.step(" + ".join(map(str, dists)), f"Altogether, {p.name} travels @ {unit}.")
    if r:
        q.append(f"How many more {unit} does {p.subj} need to travel to reach the {place}?")
        sol.step(f"{dest} - {total}", f"{p.name} still has @ {unit} to go.")
    else:
        q.append(f"How many {unit} does {p.name} travel in total?" if legs > 1
                 else f"How far does {p.name} travel, in {unit}?")
    return " ".join(q), sol


def _t_discount(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """A percentage off a price; the sale price, several of them, change from a bill."""
    p = rng.choice(_PEOPLE)
    good = rng.choice(_GOODS + (("jacket", "jackets", 30, 90), ("lamp", "lamps", 20, 60),
                                ("pair of boots", "pairs of boots", 40, 120)))
    pct = rng.choice((10, 20, 25, 30, 40, 50))
    price = _multiple_in(rng, _percent_step(pct), max(4, good[2]), good[3] * 2)
    sol = _Sol()
    when = rng.choice(("Today it is", "This week it is", "During a sale it is"))
    q = [f"A {good[0]} usually costs {_money(price)}. {when} {pct}% off."]
    off = sol.step(f"{price} * {pct} / 100", "The discount is @.", money=True)
    if k == 1:
        q.append(f"How much money does {p.name} save by buying one on sale?")
        return " ".join(q), sol
    sale = sol.step(f"{price} - {off}", "The sale price is @.", money=True)
    if k == 2:
        q.append(f"How much does {p.name} pay for one {good[0]} on sale?")
        return " ".join(q), sol
    n = rng.randint(2, 5)
    q.append(f"{p.name} buys {n} {good[1]} on sale.")
    cost = sol.step(f"{sale} * {n}", f"{p.name} pays @ for the {good[1]}.", money=True)
    if k == 3:
        q.append(f"How much does {p.subj} pay in total?")
        return " ".join(q), sol
    bill = _multiple_in(rng, 50, cost + 1, cost + 100)
    q.append(f"{p.Subj} pays with {_money(bill)}. How much change does {p.subj} get?")
    sol.step(f"{bill} - {cost}", f"{p.Subj} gets @ in change.", money=True)
    return " ".join(q), sol


_BAKED = ("cookies", "muffins", "pancakes", "brownies", "cupcakes", "scones", "waffles")
_CUP_INGREDIENTS = ("flour", "sugar", "milk", "oats", "chocolate chips", "water")


def _t_recipe(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Scale a recipe: batches, ingredient amounts, what is still missing."""
    p = rng.choice(_PEOPLE)
    baked = rng.choice(_BAKED)
    per_batch = rng.choice((6, 8, 10, 12, 15, 16, 20, 24))
    batches_n = rng.randint(2, 8)
    want = per_batch * batches_n
    ing1, ing2 = rng.sample(_CUP_INGREDIENTS, 2)
    a, s = rng.randint(2, 5), rng.randint(1, 4)
    sol = _Sol()
    if k == 4:
        q = [f"A recipe for {per_batch} {baked} needs {a} cups of {ing1} and {s} cups of {ing2}."]
    else:
        q = [f"A recipe for {per_batch} {baked} needs {a} cups of {ing1}."]
    q.append(f"{p.name} wants to make {want} {baked}.")
    batches = sol.step(f"{want} / {per_batch}", f"{p.name} needs to make @ batches.")
    amount = sol.step(f"{batches} * {a}", f"{p.Subj} needs @ cups of {ing1}.")
    if k == 2:
        q.append(f"How many cups of {ing1} does {p.subj} need?")
    elif k == 3:
        have = rng.randint(1, amount - 1)
        q.append(f"{p.Subj} has {have} cups of {ing1}. How many more cups of {ing1} does "
                 f"{p.subj} need?")
        sol.step(f"{amount} - {have}", f"{p.Subj} needs @ more cups of {ing1}.")
    else:
        other = sol.step(f"{batches} * {s}", f"{p.Subj} needs @ cups of {ing2}.")
        q.append(f"How many cups of {ing1} and {ing2} does {p.subj} need in total?")
        sol.step(f"{amount} + {other}", f"{p.Subj} needs @ cups in total.")
    return " ".join(q), sol


_EVENTS = (
    ("school play", ("adult ticket", "adult tickets", 8, 15),
     ("child ticket", "child tickets", 3, 7)),
    ("bake sale", ("brownie", "brownies", 2, 4), ("cookie", "cookies", 1, 2)),
    ("car wash", ("car", "cars", 8, 12), ("truck", "trucks", 12, 20)),
    ("lemonade stand", ("large cup", "large cups", 3, 5), ("small cup", "small cups", 1, 2)),
    ("craft fair", ("necklace", "necklaces", 10, 25), ("bracelet", "bracelets", 5, 12)),
    ("book fair", ("hardcover book", "hardcover books", 10, 20),
     ("paperback", "paperbacks", 4, 8)),
    ("pumpkin patch", ("large pumpkin", "large pumpkins", 6, 10),
     ("small pumpkin", "small pumpkins", 2, 4)),
)
_CLUBS = (
    "the drama club", "the soccer team", "the school band", "the chess club", "the art class",
    "the science club", "the scout troop", "the swim team",
)


def _t_fundraiser(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Revenue from two price points, costs, profit, and a split among members."""
    event, (a1, am, alo, ahi), (b1, bm, blo, bhi) = rng.choice(_EVENTS)
    club = rng.choice(_CLUBS)
    na, pa = rng.randint(10, 80), rng.randint(alo, ahi)
    nb, pb = rng.randint(10, 80), rng.randint(blo, bhi)
    sol = _Sol()
    verb = "washes" if event == "car wash" else "sells"
    what = (lambda n, m, pr: f"{n} {m} for {_money(pr)} each")
    if k == 2:
        q = [f"At a {event}, {club} {verb} {what(na, am, pa)}."]
        income = sol.step(f"{na} * {pa}", f"{_cap(club)} makes @.", money=True)
    else:
        q = [f"At a {event}, {club} {verb} {what(na, am, pa)} and {what(nb, bm, pb)}."]
        ia = sol.step(f"{na} * {pa}", f"The {am} bring in @.", money=True)
        ib = sol.step(f"{nb} * {pb}", f"The {bm} bring in @.", money=True)
        income = sol.step(f"{ia} + {ib}", f"{_cap(club)} makes @ in total.", money=True)
        if k == 3:
            q.append(f"How much money does {club} make?")
            return " ".join(q), sol
    if k == 5:
        members = rng.randint(2, 8)
        share = rng.randint(max(1, income * 5 // (10 * members)),
                            max(1, income * 9 // (10 * members)))
        cost = income - share * members
        if cost <= 0:
            raise _Retry
    else:
        cost = rng.randint(max(1, income // 10), max(2, income // 2))
    q.append(f"The supplies cost {_money(cost)}.")
    profit = sol.step(f"{income} - {cost}", "The profit is @.", money=True)
    if k == 5:
        q.append(f"The {members} members share the profit equally. How much does each "
                 "member get?")
        sol.step(f"{profit} / {members}", "Each member gets @.", money=True)
    else:
        q.append(f"How much profit does {club} make?")
    return " ".join(q), sol


_CROPS = (
    ("tomato plants", "tomato plant", "tomatoes"), ("pepper plants", "pepper plant", "peppers"),
    ("apple trees", "apple tree", "apples"), ("orange trees", "orange tree", "oranges"),
    ("strawberry plants", "strawberry plant", "strawberries"),
    ("cucumber plants", "cucumber plant", "cucumbers"), ("lemon trees", "lemon tree", "lemons"),
    ("corn stalks", "corn stalk", "ears of corn"), ("pumpkin vines", "pumpkin vine", "pumpkins"),
)


def _t_garden(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Rows x plants, x yield per plant, then losses or bagging."""
    p = rng.choice(_PEOPLE)
    plants_m, plant_1, fruit = rng.choice(_CROPS)
    rows, per_row = rng.randint(2, 12), rng.randint(3, 15)
    sol = _Sol()
    q = [f"{p.name} plants {rows} rows of {plants_m} with {per_row} in each row."]
    plants = sol.step(f"{rows} * {per_row}", f"{p.name} has @ {plants_m}.")
    if k == 1:
        q.append(f"How many {plants_m} does {p.subj} plant?")
        return " ".join(q), sol
    f = rng.randint(2, 20)
    q.append(f"Each {plant_1} produces {f} {fruit}.")
    total = sol.step(f"{plants} * {f}", f"The {plants_m} produce @ {fruit}.")
    if k == 2:
        q.append(f"How many {fruit} does {p.name} harvest?")
    elif k == 3:
        if rng.random() < 0.5:
            size = _divisor_in(rng, total, 4, 12)
            q.append(f"{p.name} packs all the {fruit} into bags of {size}. How many bags does "
                     f"{p.subj} fill?")
            sol.step(f"{total} / {size}", f"{p.Subj} fills @ bags.")
        else:
            g = rng.randint(2, total // 2)
            q.append(f"{p.Subj} gives {g} {fruit} to {p.poss} neighbors. How many {fruit} does "
                     f"{p.subj} have left?")
            sol.step(f"{total} - {g}", f"{p.Subj} has @ {fruit} left.")
    else:
        pct = _percent_of(rng, total)
        cause = rng.choice(("are eaten by birds", "are spoiled by the rain",
                            "are too small to sell", "are damaged by pests"))
        q.append(f"{pct}% of the {fruit} {cause}. How many {fruit} are left?")
        lost = sol.step(f"{total} * {pct} / 100", f"{p.Subj} loses @ {fruit}.")
        sol.step(f"{total} - {lost}", f"{p.Subj} has @ {fruit} left.")
    return " ".join(q), sol


def _t_reading(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Pages read per day, pages left, days to finish."""
    p = rng.choice(_PEOPLE)
    book = rng.choice(("book", "novel", "textbook", "comic collection", "biography", "cookbook"))
    sol = _Sol()
    if k <= 3:
        a, d = rng.randint(5, 40), rng.randint(2, 7)
        c = rng.randint(5, 40)
        m = rng.randint(2, 10)
        total = a * d + (c * m if k == 3 else rng.randint(10, 200))
        q = [f"{p.name} is reading a {total}-page {book}." if k >= 2 else ""]
        q.append(f"{p.Subj if k >= 2 else p.name} reads {a} pages a day for {d} days.")
        done = sol.step(f"{a} * {d}", f"{p.name} reads @ pages.")
        if k == 1:
            q.append(f"How many pages does {p.subj} read?")
        else:
            left = sol.step(f"{total} - {done}", f"{p.Subj} has @ pages left.")
            if k == 2:
                q.append("How many pages does " + f"{p.subj} still have to read?")
            else:
                q.append(f"If {p.subj} then reads {c} pages a day, how many more days will it "
                         "take to finish the book?")
                sol.step(f"{left} / {c}", f"It will take {p.obj} @ more days.")
        return " ".join(s for s in q if s), sol
    # k == 4: yesterday / today / left / a fraction of the rest tomorrow
    a = rng.randint(5, 30)
    m = rng.choice((2, 3))
    n, dd, word = rng.choice(((1, 2, "half"), (1, 3, "a third"), (1, 4, "a quarter")))
    left = dd * rng.randint(5, 40)
    total = a + a * m + left
    q = [f"{p.name} is reading a {total}-page {book}. Yesterday, {p.subj} read {a} pages. "
         f"Today, {p.subj} read {_TIMES[m]} as many pages as yesterday. If {p.subj} wants to "
         f"read {word} of the remaining pages tomorrow, how many pages should {p.subj} read?"]
    today = sol.step(f"{a} * {m}", f"{p.name} read @ pages today.")
    done = sol.step(f"{a} + {today}", f"So far {p.subj} has read @ pages.")
    rest = sol.step(f"{total} - {done}", "There are @ pages left.")
    sol.step(f"{rest} / {dd}", f"{p.Subj} should read @ pages tomorrow.")
    return " ".join(q), sol


_ACTIVITIES = (
    "take the bus to school", "play a sport", "sing in the choir", "bring lunch from home",
    "wear glasses", "signed up for the field trip", "walk to school", "play an instrument",
    "have a pet", "speak two languages",
)


def _t_school(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Classes x students, a percentage of them, the rest, and groups."""
    where = rng.choice(("A school", "A middle school", "A summer camp", "A dance academy"))
    unit = "groups" if "camp" in where else "classes"
    pct = rng.choice((10, 20, 25, 40, 50, 60, 75, 30))
    classes = rng.randint(3, 12)
    size = _multiple_in(rng, _percent_step(pct) // math.gcd(_percent_step(pct), classes),
                        12, 36)
    sol = _Sol()
    q = [f"{where} has {classes} {unit} with {size} students in each."]
    total = sol.step(f"{classes} * {size}", "There are @ students.")
    if k == 1:
        q.append("How many students are there?")
        return " ".join(q), sol
    does = rng.choice(_ACTIVITIES)
    q.append(f"{pct}% of them {does}.")
    part = sol.step(f"{total} * {pct} / 100", f"@ students {does}.")
    if k == 2:
        q.append(f"How many students {does}?")
        return " ".join(q), sol
    if k == 3 or rng.random() < 0.5:
        rest = sol.step(f"{total} - {part}", "@ students do not.")
        if k == 3:
            q.append("How many students do not?")
            return " ".join(q), sol
        g = _divisor_in(rng, rest, 3, 12)
        q.append(f"The students who do not are split into teams of {g}. How many teams are "
                 "there?")
        sol.step(f"{rest} / {g}", "There are @ teams.")
    else:
        g = _divisor_in(rng, part, 3, 12)
        teams = part // g
        if teams <= 1:
            raise _Retry
        extra = rng.randint(1, teams - 1)
        q.append(f"They are put into teams of {g}, and then {extra} of the teams drop out. How "
                 "many teams are left?")
        teams = sol.step(f"{part} / {g}", "They make @ teams.")
        sol.step(f"{teams} - {extra}", "@ teams are left.")
    return " ".join(q), sol


_PRACTICE = (
    "practices the piano", "reads", "jogs", "studies Spanish", "plays chess online",
    "practices the violin", "does yoga", "draws", "swims", "practices basketball",
)


def _t_time(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Minutes a day x days x weeks, converted to hours."""
    p = rng.choice(_PEOPLE)
    act1, act2 = rng.sample(_PRACTICE, 2)
    d = rng.randint(3, 7)
    sol = _Sol()
    if k == 4:
        a = rng.randint(2, 12) * 5
        step = 60 // math.gcd(60, d)
        b = _multiple_in(rng, 5, 10, 90)
        b += (-(a + b)) % step
        if b > 120:
            raise _Retry
        q = [f"{p.name} {act1} for {a} minutes and {act2} for {b} minutes every day, {d} days "
             f"a week. How many hours does {p.subj} spend on both activities in a week?"]
        x = sol.step(f"{a} * {d}", f"{p.Subj} {act1} for @ minutes a week.")
        y = sol.step(f"{b} * {d}", f"{p.Subj} {act2} for @ minutes a week.")
        tot = sol.step(f"{x} + {y}", "That is @ minutes in total.")
        sol.step(f"{tot} / 60", "That is @ hours.")
        return " ".join(q), sol
    w = rng.randint(2, 8)
    step = 60 // math.gcd(60, d * w) if k == 3 else 5
    a = _multiple_in(rng, step, 10, 120)
    q = [f"{p.name} {act1} for {a} minutes a day, {d} days a week."]
    week = sol.step(f"{a} * {d}", f"{p.Subj} {act1} for @ minutes a week.")
    tot = sol.step(f"{week} * {w}", f"In {w} weeks, that is @ minutes.")
    if k == 2:
        q.append(f"How many minutes does {p.subj} spend in {w} weeks?")
    else:
        q.append(f"How many hours does {p.subj} spend in {w} weeks?")
        sol.step(f"{tot} / 60", "That is @ hours.")
    return " ".join(q), sol


def _t_savings(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """How many weeks of saving until a purchase."""
    p = rng.choice(_PEOPLE)
    want = rng.choice(_WANTS)
    sol = _Sol()
    weeks = rng.randint(2, 15)
    if k == 4:
        w1, w2 = rng.randint(3, 15), rng.randint(3, 20)
        weekly_guess = w1 + w2
    else:
        weekly_guess = rng.randint(5, 30)
    need = weekly_guess * weeks
    have = rng.randint(10, 200)
    price = need + have
    q = [f"{p.name} wants to buy a {want} that costs {_money(price)}."]
    if k == 2:
        q.append(f"{p.Subj} has already saved {_money(have)}.")
    else:
        g1 = rng.randint(1, have - 1)
        g2 = have - g1
        q.append(f"{p.Subj} got {_money(g1)} from {p.poss} "
                 f"{rng.choice(('grandmother', 'grandfather', 'aunt', 'uncle'))} and "
                 f"{_money(g2)} from {p.poss} parents.")
    if k == 4:
        q.append(f"Every week {p.subj} saves {_money(w1)} from {p.poss} allowance and earns "
                 f"{_money(w2)} doing chores.")
    else:
        q.append(f"{p.Subj} saves {_money(weekly_guess)} every week.")
    q.append(f"How many weeks will it take {p.obj} to save enough for the {want}?")
    if k >= 3:
        have = sol.step(f"{g1} + {g2}", f"{p.name} already has @.", money=True)
    if k == 4:
        weekly = sol.step(f"{w1} + {w2}", f"{p.Subj} saves @ each week.", money=True)
    else:
        weekly = weekly_guess
    still = sol.step(f"{price} - {have}", f"{p.Subj} still needs @.", money=True)
    sol.step(f"{still} / {weekly}", f"It will take {p.obj} @ weeks.")
    return " ".join(q), sol


def _t_fuel(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Distance / efficiency = fuel, x price = cost; round trips and commutes."""
    p = rng.choice(_PEOPLE)
    metric = rng.random() < 0.5
    unit, fuel, fuels = (("kilometers", "liter", "liters") if metric
                         else ("miles", "gallon", "gallons"))
    eff = rng.randint(8, 18) if metric else rng.randint(20, 40)
    price = 2 if metric else rng.randint(3, 5)
    sol = _Sol()
    q = [f"{p.name}'s car can go {eff} {unit} on one {fuel} of gas. Gas costs {_money(price)} "
         f"per {fuel}."]
    if k == 2:
        dist = eff * rng.randint(2, 20)
        q.append(f"How much does gas cost for a {dist}-{unit[:-1]} trip?")
        gal = sol.step(f"{dist} / {eff}", f"The trip uses @ {fuels} of gas.")
    elif k == 3:
        one_way = _multiple_in(rng, eff // math.gcd(eff, 2), 20, 400)
        q.append(f"{p.Subj} drives to a {rng.choice(_PLACES)} {one_way} {unit} away and back. "
                 "How much does the gas for the round trip cost?")
        dist = sol.step(f"{one_way} * 2", f"The round trip is @ {unit}.")
        gal = sol.step(f"{dist} / {eff}", f"It uses @ {fuels} of gas.")
    else:
        days = rng.randint(3, 6)
        one_way = _multiple_in(rng, eff // math.gcd(eff, 2 * days), 5, 60)
        q.append(f"{p.Subj} drives {one_way} {unit} to work and back every day, {days} days a "
                 f"week. How much does {p.subj} spend on gas each week?")
        daily = sol.step(f"{one_way} * 2", f"{p.Subj} drives @ {unit} a day.")
        weekly = sol.step(f"{daily} * {days}", f"{p.Subj} drives @ {unit} a week.")
        gal = sol.step(f"{weekly} / {eff}", f"That uses @ {fuels} of gas.")
    sol.step(f"{gal} * {price}", "The gas costs @.", money=True)
    return " ".join(q), sol


_ANIMALS = (
    ("chickens", 2), ("ducks", 2), ("cows", 4), ("pigs", 4), ("goats", 4), ("sheep", 4),
    ("horses", 4), ("turkeys", 2), ("geese", 2), ("rabbits", 4), ("llamas", 4),
)
_VEHICLES = (
    ("bicycles", 2), ("tricycles", 3), ("cars", 4), ("motorcycles", 2), ("wagons", 4),
    ("six-wheeled trucks", 6),
)


def _t_legs(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Counting legs on a farm or wheels in a lot."""
    wheels = rng.random() < 0.35
    pool, part = (_VEHICLES, "wheels") if wheels else (_ANIMALS, "legs")
    place = (rng.choice(("a parking lot", "a bike shop", "a garage", "a street fair")) if wheels
             else rng.choice(("a farm", "a petting zoo", "a ranch")))
    sol = _Sol()
    if k == 2:
        kind, n_legs = rng.choice(pool)
        a, b = rng.randint(5, 60), rng.randint(2, 30)
        q = [f"There are {a} {kind} at {place}. Then {b} more {kind} arrive. How many {part} "
             f"do the {kind} have in total?"]
        count = sol.step(f"{a} + {b}", f"There are @ {kind}.")
        sol.step(f"{count} * {n_legs}", f"They have @ {part}.")
        return " ".join(q), sol
    kinds = rng.sample(pool, k - 1)
    counts = [rng.randint(2, 40) for _ in kinds]
    listing = _join([f"{c} {kind}" for c, (kind, _) in zip(counts, kinds)])
    q = [f"At {place} there are {listing}. How many {part} are there in total?"]
    per = [sol.step(f"{c} * {n}", f"The {kind} have @ {part}.")
           for c, (kind, n) in zip(counts, kinds)]
    sol.step(" + ".join(map(str, per)), f"Altogether there are @ {part}.")
    return " ".join(q), sol


_PRODUCTS = (
    ("toy cars", "A toy factory"), ("water bottles", "A bottling plant"),
    ("candles", "A candle shop"), ("jars of jam", "A jam maker"),
    ("loaves of bread", "A bakery"), ("cans of soup", "A cannery"),
    ("bars of soap", "A soap maker"), ("pairs of gloves", "A glove factory"),
)


def _t_packing(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """Production rate x hours, packed into boxes, sold, minus costs."""
    product, maker = rng.choice(_PRODUCTS)
    hours = rng.randint(2, 10)
    box = rng.choice((4, 6, 8, 10, 12, 20, 24))
    rate = _multiple_in(rng, box // math.gcd(box, hours), 10, 200)
    sol = _Sol()
    q = [f"{maker} makes {rate} {product} an hour and works {hours} hours a day."]
    total = sol.step(f"{rate} * {hours}", f"It makes @ {product} a day.")
    if k == 1:
        q.append(f"How many {product} does it make in a day?")
        return " ".join(q), sol
    q.append(f"The {product} are packed in boxes of {box}.")
    boxes = sol.step(f"{total} / {box}", "That fills @ boxes.")
    if k == 2:
        q.append("How many boxes are filled each day?")
        return " ".join(q), sol
    price = rng.randint(5, 40)
    q.append(f"Each box sells for {_money(price)}.")
    income = sol.step(f"{boxes} * {price}", "The boxes sell for @.", money=True)
    if k == 3:
        q.append("How much money does it make from one day's boxes?")
        return " ".join(q), sol
    cost = rng.randint(max(1, income // 10), max(2, income // 2))
    q.append(f"Making them costs {_money(cost)} a day. How much profit does it make in a day?")
    sol.step(f"{income} - {cost}", "The profit is @.", money=True)
    return " ".join(q), sol


_MEALS = (
    ("pizzas", 8, 20), ("burgers", 6, 14), ("bowls of ramen", 9, 16), ("plates of pasta", 10, 22),
    ("tacos", 2, 5), ("salads", 6, 12), ("sushi rolls", 5, 12),
)


def _t_restaurant(rng: random.Random, k: int) -> tuple[str, _Sol]:
    """A bill, a tip percentage, the total, split evenly."""
    cast = _people(rng, 2)
    tip = rng.choice((10, 15, 20, 25))
    step = _percent_step(tip)
    sol = _Sol()
    if k == 2:
        bill = _multiple_in(rng, step, 20, 300)
        q = [f"{cast[0].name} and {cast[1].name} have dinner. The bill comes to {_money(bill)} "
             f"and they leave a {tip}% tip. How much do they pay in total?"]
        t = sol.step(f"{bill} * {tip} / 100", "The tip is @.", money=True)
        sol.step(f"{bill} + {t}", "They pay @ in total.", money=True)
        return " ".join(q), sol
    meal, lo, hi = rng.choice(_MEALS)
    n = rng.randint(2, 8)
    price = _multiple_in(rng, step // math.gcd(step, n), lo, hi)
    q = [f"A group of friends orders {n} {meal} at {_money(price)} each and leaves a {tip}% tip."]
    food = sol.step(f"{n} * {price}", f"The {meal} cost @.", money=True)
    t = sol.step(f"{food} * {tip} / 100", "The tip is @.", money=True)
    total = sol.step(f"{food} + {t}", "The total is @.", money=True)
    if k == 3:
        q.append("How much do they pay in total?")
    else:
        people = _divisor_in(rng, total, 2, 8)
        q.append(f"If the {people} friends split the total evenly, how much does each pay?")
        sol.step(f"{total} / {people}", "Each friend pays @.", money=True)
    return " ".join(q), sol


#: name -> (template, fewest steps, most steps)
_TEMPLATES: dict[str, tuple[_Template, int, int]] = {
    "inventory": (_t_inventory, 1, MAX_SUPPORTED_STEPS),
    "shopping": (_t_shopping, 1, 6),
    "comparison": (_t_comparison, 2, 6),
    "ages": (_t_ages, 2, 5),
    "earnings": (_t_earnings, 2, 5),
    "travel": (_t_travel, 1, 6),
    "discount": (_t_discount, 1, 4),
    "recipe": (_t_recipe, 2, 4),
    "fundraiser": (_t_fundraiser, 2, 5),
    "garden": (_t_garden, 1, 4),
    "reading": (_t_reading, 1, 4),
    "school": (_t_school, 1, 4),
    "time": (_t_time, 2, 4),
    "savings": (_t_savings, 2, 4),
    "fuel": (_t_fuel, 2, 4),
    "legs": (_t_legs, 2, 6),
    "packing": (_t_packing, 1, 4),
    "restaurant": (_t_restaurant, 2, 4),
}
TEMPLATE_NAMES = tuple(_TEMPLATES)

_MAX_TRIES = 200


def _check_steps(min_steps: int, max_steps: int) -> None:
    for name, v in (("min_steps", min_steps), ("max_steps", max_steps)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if not MIN_SUPPORTED_STEPS <= min_steps <= max_steps <= MAX_SUPPORTED_STEPS:
        raise ValueError(f"need {MIN_SUPPORTED_STEPS} <= min_steps <= max_steps <= "
                         f"{MAX_SUPPORTED_STEPS}, got min_steps={min_steps}, max_steps={max_steps}")


def generate_problem(rng: random.Random, *, min_steps: int = 2, max_steps: int = 6) -> MathProblem:
    """One problem drawn with ``rng``, needing between ``min_steps`` and ``max_steps`` computations.

    The step count is drawn uniformly, then a template that can produce it. Deterministic given
    the state of ``rng``.
    """
    _check_steps(min_steps, max_steps)
    steps = rng.randint(min_steps, max_steps)
    names = [n for n, (_, lo, hi) in _TEMPLATES.items() if lo <= steps <= hi]
    name = rng.choice(names)
    template = _TEMPLATES[name][0]
    for _ in range(_MAX_TRIES):
        try:
            question, sol = template(rng, steps)
        except _Retry:
            continue
        if len(sol.lines) != steps:  # a template bug, not bad luck
            raise AssertionError(f"template {name!r} wrote {len(sol.lines)} steps, not {steps}")
        answer = sol.values[-1]
        if answer <= 0:
            continue
        solution = "\n".join([*sol.lines, f"#### {answer}"])
        return MathProblem(question, solution, answer, steps, name)
    raise RuntimeError(f"template {name!r} found no valid {steps}-step problem in "
                       f"{_MAX_TRIES} tries")


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: fixed by a SHA-256 of the question, so splits never overlap."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def generate(n: int, *, seed: int = 0, split: str = "train", min_steps: int = 2,
             max_steps: int = 6) -> list[MathProblem]:
    """``n`` distinct problems of ``split``, reproducible from ``seed``.

    Problems are drawn from ``random.Random(seed)`` and kept when :func:`split_of` their question
    is ``split`` and the question is new, so ``generate(m)`` is a prefix of ``generate(n)`` for
    ``m <= n``, and the train and test splits can never share a question.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed = operator.index(seed)
    _check_steps(min_steps, max_steps)
    rng = random.Random(seed)
    out: list[MathProblem] = []
    seen: set[str] = set()
    limit = 100 * TEST_BUCKETS * (n + 10)
    for _ in range(limit):
        if len(out) >= n:
            return out
        problem = generate_problem(rng, min_steps=min_steps, max_steps=max_steps)
        if problem.question in seen or split_of(problem.question) != split:
            continue
        seen.add(problem.question)
        out.append(problem)
    if len(out) >= n:
        return out
    raise RuntimeError(f"only {len(out)} distinct {split} problems found in {limit} draws")


# ---------------------------------------------------------------------------------------------
# Files and scoring
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, problems: Iterable[MathProblem], *,
                prompt_field: str = "prompt", response_field: str = "response") -> int:
    """Write ``{prompt_field: question, response_field: solution}`` lines to ``path``, atomically.

    The records go to a temporary file in the same directory that then replaces ``path``, so a
    reader sees either the old file or the complete new one. Returns the number of records.
    """
    if prompt_field == response_field:
        raise ValueError(f"prompt_field and response_field must differ, both are {prompt_field!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for p in problems:
                record = {prompt_field: p.question, response_field: p.solution}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return count


# A number: optional minus (not when glued to a preceding digit, as in "16-3"), digits with
# optional thousands commas ("1,234"), optional decimals.
_NUMBER = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\d.])-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# A final answer: a LaTeX fraction, a fraction written "a/b" (no spaces, so "48 / 2" in a
# worked step is not one), or a number.
_FRACTION = (r"-?\\[dt]?frac\{\s*(?:" + _NUMBER + r")\s*\}\{\s*(?:" + _NUMBER + r")\s*\}"
             r"|(?<!/)(?:" + _NUMBER + r")/(?:" + _NUMBER + r")(?![\d/])")
_VALUE_RE = re.compile(_FRACTION + "|" + _NUMBER)
_HASH_ANSWER_RE = re.compile(r"####\s*\$?\s*\+?(" + _FRACTION + "|" + _NUMBER + ")")
_BOXED = "\\boxed{"
# What may surround a boxed number: spaces, dollar signs (plain or LaTeX), LaTeX spacing, a
# trailing percent sign or full stop.
_BOXED_NOISE_RE = re.compile(r"\\[$,!;: ]|\\%|[$%\s]|\.$")


def parse_number(text: str) -> Fraction | None:
    """The exact value of one number written the ways final answers are: ``"1,234"``,
    ``"-3"``, ``"+3"``, ``"2.50"``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"-\\dfrac{1}{2}"``, with
    surrounding spaces, ``$`` and a trailing ``%`` or ``.`` ignored; ``None`` when ``text`` is
    not one number (or divides by zero)."""
    s = _BOXED_NOISE_RE.sub("", text or "")
    s = s[1:] if s.startswith("+") else s
    if not s or _VALUE_RE.fullmatch(s) is None:
        return None
    nums = [Fraction(n.replace(",", "")) for n in _NUMBER_RE.findall(s)]
    if len(nums) == 1:
        return nums[0]
    num, den = nums
    if den == 0:
        return None
    value = num / den
    # "-\frac{1}{2}": the sign is outside both numbers
    return -value if s.startswith("-\\") else value


def _boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def answer_value(text: str) -> Fraction | None:
    """The exact final answer in ``text`` (see :func:`parse_answer` for the rules), as a
    :class:`~fractions.Fraction`; ``None`` when there is none."""
    if not text:
        return None
    m = _HASH_ANSWER_RE.search(text)
    if m is not None:
        return parse_number(m.group(1))
    boxed = _boxed(text)
    if boxed is not None:
        return parse_number(boxed)
    values = _VALUE_RE.findall(text)
    return parse_number(values[-1]) if values else None


def parse_answer(text: str) -> int | float | None:
    """The final answer in ``text``: the number after the first ``####`` if there is one, else
    the number in the last ``\\boxed{...}`` (None if that holds no single number), else the
    last number in the text; ``None`` if there is none. Commas ("1,234"), a leading ``$`` or
    ``+``, negatives, decimals and fractions ("3/4", ``\\frac{3}{4}``) are understood; integral
    values ("12.00", "8/4") come back as ``int``, others as ``float``
    (:func:`answer_value` gives the exact value).
    """
    value = answer_value(text)
    if value is None:
        return None
    return int(value) if value.denominator == 1 else float(value)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill_jax.data.mathgen --n 1000 --seed 0 --split train --out train.jsonl``"""
    parser = argparse.ArgumentParser(
        prog="python -m distill_jax.data.mathgen",
        description="Write GSM8K-style synthetic math word problems as prompt/response JSONL.")
    parser.add_argument("--n", type=int, default=1000, help="number of problems (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="hash-based split; train and test never share a question")
    parser.add_argument("--out", required=True, help="output .jsonl path (written atomically)")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be >= 0")
    try:
        _check_steps(args.min_steps, args.max_steps)
    except ValueError as e:
        parser.error(str(e))
    problems = generate(args.n, seed=args.seed, split=args.split, min_steps=args.min_steps,
                        max_steps=args.max_steps)
    count = write_jsonl(args.out, problems, prompt_field=args.prompt_field,
                        response_field=args.response_field)
    print(f"wrote {count} {args.split} problems (seed {args.seed}) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
