"""Synthetic GSM8K-style word problems, written by this project, deterministic by seed.

Each problem is a short story (stickers, a bakery, pocket money, ...) whose quantity changes in a few
arithmetic steps. The answer is a worked solution in GSM8K's format: one line per step with a calculator
annotation such as `3*4=<<3*4=12>>12`, and a last line `#### N`.

Train and test are disjoint for every seed: a question belongs to the split chosen by a SHA-256 hash of its
text, and generation keeps drawing until it has `n` distinct questions of the requested split.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "test")
TEST_SHARE_PER_MILLE = 200  # a fifth of all possible questions belong to the test split
OPERATIONS = ("add", "sub", "mul", "div", "pack")


@dataclass(frozen=True)
class SyntheticSpec:
    # Defaults: hard enough that the embedded 4-layer model lands near 80 % (easier specs saturate at 95-99 %).
    min_steps: int = 2  # number of arithmetic steps (calculator annotations) in the worked solution
    max_steps: int = 4
    max_value: int = 999  # starting amounts and added/removed amounts are drawn from 1..max_value
    max_factor: int = 20  # multipliers, divisors, pack counts and pack sizes are drawn from 2..max_factor
    max_result: int = 9999  # no intermediate or final result exceeds this
    operations: tuple[str, ...] = OPERATIONS  # which step kinds stories may use ("pack" is two steps)

    def validate(self) -> None:
        if self.min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {self.min_steps}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if self.max_value < 2:
            raise ValueError(f"max_value must be >= 2, got {self.max_value}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
        if self.max_result < self.max_value:
            raise ValueError(f"max_result ({self.max_result}) must be >= max_value ({self.max_value})")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        if not set(self.operations) & {"add", "sub", "mul", "div"}:
            raise ValueError("operations needs at least one single-step kind (add, sub, mul or div)")


_NAMES = [("Tom", "he", "his"), ("Mia", "she", "her"), ("Sam", "he", "his"), ("Ava", "she", "her"),
          ("Leo", "he", "his"), ("Zoe", "she", "her"), ("Ben", "he", "his"), ("Lily", "she", "her"),
          ("Omar", "he", "his"), ("Nina", "she", "her"), ("Raj", "he", "his"), ("Emma", "she", "her"),
          ("Carlos", "he", "his"), ("Aisha", "she", "her"), ("Jack", "he", "his"), ("Sofia", "she", "her")]
_FRIENDS = ["a friend", "{pos} brother", "{pos} sister", "a neighbor", "a classmate", "the teacher"]
_SHOPS = ["market", "toy store", "bookshop", "bakery", "corner shop"]

# Each story says how its quantity is introduced, changed and asked for. `pack` sentences introduce a
# product a*b that is then added (or, for money, subtracted: buying costs). Stories without a template for an
# operation never use it.
_STORIES = [
    dict(items=["stickers", "marbles", "apples", "cards", "shells", "pencils", "stamps", "beads"],
         start="{Name} has {v} {item}.",
         add="{Pro} finds {n} more {item}.",
         sub="{Pro} gives {n} {item} to {friend}.",
         mul="Later {pos} collection of {item} grows to {k} times as many.",
         div="{Pro} puts the {item} into {k} equal piles and keeps one pile.",
         pack="{Pro} buys {a} bags of {item} with {b} {item} in each bag.", pack_sign=1,
         line="{Name} has {expr} {item}.", pack_line="The bags hold {expr} {item}.",
         question="How many {item} does {Name} have now?"),
    dict(items=["cookies", "muffins", "rolls", "cupcakes", "bagels"],
         start="A bakery makes {v} {item} in the morning.",
         add="In the afternoon it makes {n} more {item}.",
         sub="It sells {n} {item} before noon.",
         mul="The next day it makes {k} times as many {item} as it has now.",
         div="It packs the {item} equally into {k} boxes and sells all boxes but one.",
         pack="It bakes {a} trays with {b} {item} on each tray.", pack_sign=1,
         line="The count is {expr} {item}.", pack_line="The trays give {expr} {item}.",
         question="How many {item} are there at the end?"),
    dict(items=["dollars"],
         start="{Name} has ${v}.",
         add="{Pro} earns ${n} by helping {friend}.",
         sub="{Pro} spends ${n} at the {shop}.",
         div="{Pro} splits the money equally into {k} envelopes and keeps one envelope.",
         pack="{Pro} buys {a} notebooks at the {shop} for ${b} each.", pack_sign=-1,
         line="{Name} has {expr} dollars.", pack_line="The notebooks cost {expr} dollars.",
         question="How many dollars does {Name} have now?"),
    dict(items=["pages"],
         start="{Name} reads {v} pages of a book on Monday.",
         add="Later {pro} reads {n} more pages.",
         mul="By the weekend {pro} has read {k} times as many pages as that.",
         div="{Pro} writes a summary for every {k} pages read.",
         pack="Then {pro} reads {a} chapters of {b} pages each.", pack_sign=1,
         line="The count is {expr} pages.", pack_line="The chapters have {expr} pages.",
         question="How many pages has {Name} read?", div_question="How many summaries does {Name} write?",
         div_last_only=True),
    dict(items=["tomatoes", "carrots", "peppers", "onions"],
         start="{Name} picks {v} {item} in {pos} garden.",
         add="The next week {pro} picks {n} more {item}.",
         sub="{Pro} cooks {n} of the {item} for dinner.",
         mul="Then {pos} harvest of {item} becomes {k} times as big.",
         div="{Pro} shares the {item} equally with {k_minus_1} friends, keeping one share.",
         pack="{Pro} also picks {a} baskets with {b} {item} in each basket.", pack_sign=1,
         line="{Name} has {expr} {item}.", pack_line="The baskets hold {expr} {item}.",
         question="How many {item} does {Name} have now?"),
]

_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _calc(a: int, op: str, b: int) -> tuple[int, str]:
    """The result of `a op b` and its GSM8K calculator annotation `a op b=<<a op b=r>>r`."""
    sym = _SYMBOL[op]
    r = {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b}[op]
    return r, f"{a}{sym}{b}=<<{a}{sym}{b}={r}>>{r}"


def _feasible_steps(story: dict, spec: SyntheticSpec, v: int, steps_left: int, is_last: bool) -> list[str]:
    ops = []
    for op in spec.operations:
        if op not in story or (op == "pack" and steps_left < 2):
            continue
        if op == "div" and story.get("div_last_only") and not is_last:
            continue
        if op == "add" and v + 1 > spec.max_result:
            continue
        if op == "sub" and v < 2:
            continue
        if op == "mul" and v * 2 > spec.max_result:
            continue
        if op == "div" and not _divisors(v, spec):
            continue
        if op == "pack" and story["pack_sign"] < 0 and v < 4:
            continue
        if op == "pack" and story["pack_sign"] > 0 and v + 4 > spec.max_result:
            continue
        ops.append(op)
    return ops


def _divisors(v: int, spec: SyntheticSpec) -> list[int]:
    return [k for k in range(2, spec.max_factor + 1) if v % k == 0 and v // k >= 1]


def _draw_problem(rng: random.Random, spec: SyntheticSpec) -> tuple[str, str]:
    story = rng.choice(_STORIES)
    name, pro, pos = rng.choice(_NAMES)
    words = dict(Name=name, pro=pro, Pro=pro.capitalize(), pos=pos, Pos=pos.capitalize(),
                 item=rng.choice(story["items"]), friend=rng.choice(_FRIENDS).format(pos=pos),
                 shop=rng.choice(_SHOPS))
    n_steps = rng.randint(spec.min_steps, spec.max_steps)
    v = rng.randint(2, spec.max_value)
    sentences, lines = [story["start"].format(v=v, **words)], []
    question = story["question"]
    steps_done = 0
    while steps_done < n_steps:
        steps_left = n_steps - steps_done
        ops = _feasible_steps(story, spec, v, steps_left, is_last=steps_left == 1)
        if not ops:  # dead end (e.g. a value no step fits); the caller draws again
            return "", ""
        op = rng.choice(ops)
        if op == "pack":
            sign = story["pack_sign"]
            limit = v if sign < 0 else spec.max_result - v
            pairs = [(a, b) for a in range(2, spec.max_factor + 1) for b in range(2, spec.max_factor + 1)
                     if a * b <= limit]
            if not pairs:
                return "", ""
            a, b = rng.choice(pairs)
            c, expr = _calc(a, "mul", b)
            sentences.append(story["pack"].format(a=a, b=b, **words))
            lines.append(story["pack_line"].format(expr=expr, **words))
            v, expr = _calc(v, "add" if sign > 0 else "sub", c)
            lines.append(story["line"].format(expr=expr, **words))
            steps_done += 2
            continue
        if op == "add":
            n = rng.randint(1, min(spec.max_value, spec.max_result - v))
            sentences.append(story["add"].format(n=n, **words))
            v, expr = _calc(v, "add", n)
        elif op == "sub":
            n = rng.randint(1, min(spec.max_value, v - 1))
            sentences.append(story["sub"].format(n=n, **words))
            v, expr = _calc(v, "sub", n)
        elif op == "mul":
            k = rng.randint(2, min(spec.max_factor, spec.max_result // v))
            sentences.append(story["mul"].format(k=k, **words))
            v, expr = _calc(v, "mul", k)
        else:  # div
            k = rng.choice(_divisors(v, spec))
            sentences.append(story["div"].format(k=k, k_minus_1=k - 1, **words))
            v, expr = _calc(v, "div", k)
            question = story.get("div_question", question)
        lines.append(story["line"].format(expr=expr, **words))
        steps_done += 1
    sentences.append(question.format(**words))
    lines.append(f"#### {v}")
    return " ".join(sentences), "\n".join(lines)


def split_of(question: str) -> str:
    """The split a question belongs to, from a hash of its text (stable across machines and seeds)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 1000 < TEST_SHARE_PER_MILLE else "train"


def generate_problems(split: str, n: int, seed: int, spec: SyntheticSpec = SyntheticSpec()) -> list[dict]:
    """`n` distinct problems of `split` ("train" or "test") as GSM8K-style dicts: id, question, answer.

    The same (split, n, seed, spec) gives the same list on every machine; a shorter n gives a prefix.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    spec.validate()
    # A string seed is hashed with SHA-512 by `random`, so the stream is the same on every machine.
    rng = random.Random(f"moesweep-synthetic:{split}:{seed}")
    problems, seen = [], set()
    max_draws = 100 * n + 10_000
    for _ in range(max_draws):
        question, answer = _draw_problem(rng, spec)
        if not question or question in seen or split_of(question) != split:
            continue
        seen.add(question)
        problems.append({"id": f"syn-{split}-{len(problems):06d}", "question": question, "answer": answer})
        if len(problems) == n:
            return problems
    raise ValueError(f"could only find {len(problems)} distinct {split} problems of {n} asked for with {spec}; "
                     "widen the spec (max_value, max_steps) or ask for fewer")


_FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")


def final_answer(text: str) -> str | None:
    """The number after the first `#### ` (GSM8K strict match), without commas; None when there is none."""
    match = _FINAL.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None
