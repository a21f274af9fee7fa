"""The synthetic GSM-style generator: deterministic, disjoint splits, correct worked solutions, working knobs."""
import re

import pytest

from moesweep.data.synthetic import SyntheticSpec, final_answer, generate_problems, split_of

ANNOTATION = re.compile(r"(\d+)([-+*/])(\d+)=<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def steps_of(answer: str) -> list[tuple[int, str, int, int]]:
    steps = []
    for a, op, b, a2, op2, b2, r, r2 in ANNOTATION.findall(answer):
        assert (a, op, b, r) == (a2, op2, b2, r2), answer  # text and annotation agree
        steps.append((int(a), op, int(b), int(r)))
    return steps


def test_same_arguments_give_same_problems_and_shorter_n_is_a_prefix():
    first = generate_problems("test", 40, seed=3)
    assert first == generate_problems("test", 40, seed=3)
    assert generate_problems("test", 10, seed=3) == first[:10]
    assert first != generate_problems("test", 40, seed=4)
    assert [p["id"] for p in first[:2]] == ["syn-test-000000", "syn-test-000001"]


def test_splits_are_disjoint_across_seeds_and_distinct_within():
    train = generate_problems("train", 3000, seed=0)
    test = generate_problems("test", 600, seed=0) + generate_problems("test", 600, seed=1)
    train_questions = {p["question"] for p in train}
    assert len(train_questions) == len(train)
    assert not train_questions & {p["question"] for p in test}
    assert all(split_of(p["question"]) == "test" for p in test)


def test_every_annotation_is_right_and_final_answer_is_the_last_result():
    spec = SyntheticSpec()
    for p in generate_problems("train", 1500, seed=7):
        steps = steps_of(p["answer"])
        assert spec.min_steps <= len(steps) <= spec.max_steps, p
        for a, op, b, r in steps:
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
            assert r == expected, p["answer"]
            assert 0 <= r <= spec.max_result
        assert p["answer"].splitlines()[-1] == f"#### {steps[-1][3]}"
        assert final_answer(p["answer"]) == str(steps[-1][3])


def test_knobs_change_the_problems():
    short = generate_problems("train", 300, 0, SyntheticSpec(min_steps=1, max_steps=1, max_value=9,
                                                             max_factor=3, max_result=50))
    long = generate_problems("train", 300, 0, SyntheticSpec(min_steps=5, max_steps=6))
    assert {len(steps_of(p["answer"])) for p in short} == {1}
    assert {len(steps_of(p["answer"])) for p in long} <= {5, 6}
    assert max(int(final_answer(p["answer"])) for p in short) <= 50
    only_add = generate_problems("train", 200, 0, SyntheticSpec(operations=("add",)))
    assert {op for p in only_add for _, op, _, _ in steps_of(p["answer"])} == {"+"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="dev", n=5, seed=0), "unknown split"),
    (dict(split="test", n=0, seed=0), "positive"),
    (dict(split="test", n=5, seed=0, spec=SyntheticSpec(min_steps=4, max_steps=2)), "min_steps"),
    (dict(split="test", n=5, seed=0, spec=SyntheticSpec(max_factor=1)), "max_factor"),
    (dict(split="test", n=5, seed=0, spec=SyntheticSpec(operations=("pow",))), "operations"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_problems(**kwargs)


def test_a_spec_too_small_for_n_raises(monkeypatch):
    from moesweep.data import synthetic

    monkeypatch.setattr(synthetic, "_STORIES", synthetic._STORIES[:1])
    monkeypatch.setattr(synthetic, "_NAMES", synthetic._NAMES[:1])
    tiny = SyntheticSpec(min_steps=1, max_steps=1, max_value=2, max_factor=2, max_result=4, operations=("add",))
    with pytest.raises(ValueError, match="distinct"):
        generate_problems("train", 100, 0, tiny)
