"""Scoring parity with lm-eval's gsm8k / gsm8k_cot filters and exact_match, and the statistics helpers.

The expected strict / flexible extractions and exact-match verdicts in CASES were written by hand for
this test and then checked once against lm-eval 0.4.13's own classes (RegexFilter + TakeFirstFilter from
lm_eval/filters, exact_match_hf_evaluate from lm_eval/api/metrics.py, with the gsm8k.yaml /
gsm8k-cot.yaml settings) in a scratch venv (`pip install lm-eval==0.4.* torch==2.13.0`): all agreed.
`test_cases_match_lm_eval_live` repeats that check whenever `lm_eval` is importable.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest

from moesweep.scoring import (
    FLEXIBLE_REGEX,
    IGNORED_IN_EXACT_MATCH,
    exact_match,
    extract_flexible,
    extract_strict,
    mcnemar_exact_p,
    numeric_equal,
    wilson_interval,
)

HASH = r"#### (\-?[0-9\.\,]+)"  # lm-eval gsm8k strict-match
COT = r"The answer is (\-?[0-9\.\,]+)."  # lm-eval gsm8k_cot strict-match (unescaped final '.')
OPENCOMPASS = r"The answer is (\-?[0-9\.\,]+)"  # our qwen3_4shot_cot strict regex


class Case(NamedTuple):
    completion: str
    gold: str  # what lm-eval compares against: the gold number (or full answer, see below)
    regex: str
    strict: str
    flexible: str
    strict_ok: bool
    flexible_ok: bool
    strict_numeric_ok: bool  # numeric_equal(strict, gold): our extra column


CASES = {
    "hash_plain": Case("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72", HASH, "72", "72", True, True, True),
    "hash_comma": Case("#### 1,234", "1234", HASH, "1,234", "1,234", True, True, True),
    "hash_dollar_blocks_strict": Case("Total $1,234.\n#### $1,234", "1234", HASH, "[invalid]", "$1,234", False, True, False),
    "hash_negative": Case("The change is 3 - 8 = -5\n#### -5", "-5", HASH, "-5", "-5", True, True, True),
    "hash_decimal_trailing_zero": Case("#### 3.50", "3.5", HASH, "3.50", "3.50", False, False, True),
    "hash_trailing_period": Case("So 9 + 9 = 18.\n#### 18.", "18", HASH, "18.", "18.", True, True, True),
    "hash_first_of_two": Case("#### 5\n#### 6", "6", HASH, "5", "6", False, True, False),
    "no_answer": Case("I don't know.", "3", HASH, "[invalid]", "[invalid]", False, False, False),
    "empty": Case("", "3", HASH, "[invalid]", "[invalid]", False, False, False),
    "hyphen_is_minus_in_flexible": Case("from 5-3 we get 2", "2", HASH, "[invalid]", "2", False, True, False),
    "hash_decimal": Case("Each costs 0.75, so 3 cost 2.25\n#### 2.25", "2.25", HASH, "2.25", "2.25", True, True, True),
    "sentence_period": Case("He has 15 apples.", "15", HASH, "[invalid]", "15", False, True, False),
    "later_number_wins_flexible": Case("#### 10\nThis was in 2020.", "10", HASH, "10", "2020.", True, False, True),
    "hash_units": Case("#### 5 apples", "5", HASH, "5", "5", True, True, True),
    "leading_dot": Case("#### .5", "0.5", HASH, ".5", ".5", False, False, True),
    "trailing_comma": Case("#### 1,000,", "1000", HASH, "1,000,", "1,000,", True, True, True),
    "percent": Case("#### 50%", "50", HASH, "50", "50", True, True, True),
    "list_commas": Case("Numbers 1, 2, 3", "3", HASH, "[invalid]", "3", False, True, False),
    "negative_dollar": Case("#### -$5", "-5", HASH, "[invalid]", "-$5", False, True, False),
    "cot_period": Case("So 21 - 15 = 6 trees. The answer is 42.", "42", COT, "42", "42.", True, True, True),
    # The regex's final '.' needs one more character (not '\n'): at the end of the text the group gives
    # back its last digit, so "42" is read as "4", and a one-digit answer does not match at all.
    "cot_end_of_text_one_digit": Case("The answer is 8", "8", COT, "[invalid]", "8", False, True, False),
    "cot_end_of_text_backtracks": Case("The answer is 42", "42", COT, "4", "42", False, True, False),
    "cot_newline_backtracks": Case("The answer is 42\n", "42", COT, "4", "42", False, True, False),
    "cot_comma_words": Case("The answer is 1,000 dollars.", "1000", COT, "1,000", "1,000", True, True, True),
    "cot_dollar": Case("The answer is $8.", "8", COT, "[invalid]", "$8.", False, True, False),
    "cot_negative": Case("The answer is -3.", "-3", COT, "-3", "-3.", True, True, True),
    "cot_decimal_newline": Case("The answer is 3.5.\n", "3.5", COT, "3.5", "3.5.", True, True, True),
    "cot_first_of_two": Case("The answer is 4. Wait, the answer is 5.", "5", COT, "4.", "5.", False, True, False),
    "opencompass_no_period": Case("14+42+84 = 140 items\nThe answer is 140", "140", OPENCOMPASS, "140", "140", True, True, True),
    "case_insensitive_text": Case("#### 7\n", "7", HASH, "7", "7", True, True, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_extraction_and_exact_match(name):
    case = CASES[name]
    strict = extract_strict(case.completion, case.regex)
    flexible = extract_flexible(case.completion)
    assert (strict, flexible) == (case.strict, case.flexible)
    assert exact_match(strict, case.gold) is case.strict_ok
    assert exact_match(flexible, case.gold) is case.flexible_ok
    assert numeric_equal(strict, case.gold) is case.strict_numeric_ok


def test_exact_match_accepts_full_gsm8k_answer_as_gold():
    # lm-eval gsm8k's doc_to_target is the whole solution; "(?s).*#### " strips up to the last marker.
    gold = "She pays $1,000 for 3.\nSo she has $2,500 - $1,000 = $1,500\n#### 1,500"
    assert exact_match("1,500", gold)
    assert exact_match("$1500.", gold)
    assert not exact_match("1500.0", gold)
    assert numeric_equal("1500.0", gold)


def test_exact_match_ignores_case():
    assert exact_match("[INVALID]", "[invalid]")  # only to show ignore_case; numbers have no case


def test_numeric_equal_rejects_unparsable():
    assert not numeric_equal("[invalid]", "3")
    assert not numeric_equal("1.2.3", "1.2")
    assert not numeric_equal("nan", "nan")
    assert numeric_equal("-$1,000.", "-1000")


def test_cases_match_lm_eval_live():
    """Parity with lm-eval's own filter classes and metric, when lm_eval is installed."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    def lm_eval_extract(completion, regex, group_select):
        filtered = RegexFilter(regex_pattern=regex, group_select=group_select).apply([[completion]], [{}])
        return list(TakeFirstFilter().apply(filtered, [{}]))[0]

    def lm_eval_exact_match(prediction, gold):
        result = exact_match_hf_evaluate(
            predictions=[prediction], references=[gold], regexes_to_ignore=list(IGNORED_IN_EXACT_MATCH),
            ignore_case=True, ignore_punctuation=False,
        )
        return bool(result["exact_match"] > 0.0)

    for name, case in CASES.items():
        strict = lm_eval_extract(case.completion, case.regex, 0)
        flexible = lm_eval_extract(case.completion, FLEXIBLE_REGEX, -1)
        assert (strict, flexible) == (case.strict, case.flexible), name
        assert lm_eval_exact_match(strict, case.gold) is case.strict_ok, name
        assert lm_eval_exact_match(flexible, case.gold) is case.flexible_ok, name


def test_wilson_known_values():
    # R: prop.test(50, 100, correct = FALSE)$conf.int -> 0.4038315 0.5961685
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038315, abs=1e-7)
    assert high == pytest.approx(0.5961685, abs=1e-7)
    # p = 0: upper bound z^2 / (n + z^2) = 3.841459 / 13.841459
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775328, abs=1e-7))
    assert wilson_interval(10, 10) == (pytest.approx(1 - 0.2775328, abs=1e-7), 1.0)
    # Half-width at p = 0.9 over GSM8K's 1319 test problems: about 1.96 * sqrt(0.9 * 0.1 / 1319) = 1.6 points.
    low, high = wilson_interval(1187, 1319)
    assert (high - low) / 2 == pytest.approx(0.016, abs=0.001)
    # A wider confidence gives a wider interval.
    assert wilson_interval(50, 100, 0.99)[0] < wilson_interval(50, 100, 0.95)[0]


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes=11, n=10"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),
        (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10
        (9, 1, 22 / 1024),
        (0, 5, 2 / 32),
        (3, 3, 1.0),  # 2 * P(X <= 3 | n=6) > 1, clipped
        (2, 8, 2 * (1 + 10 + 45) / 1024),
        (10, 30, 2 * sum(math.comb(40, k) for k in range(11)) / 2**40),
    ],
)
def test_mcnemar_exact_known_values(b, c, expected):
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 9), (12, 30), (100, 130), (7, 7), (0, 3)]:
        assert mcnemar_exact_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_large_counts_and_errors():
    p = mcnemar_exact_p(600, 700)  # exact integer arithmetic, no overflow at GSM8K sizes
    assert 0.0 < p < 0.01
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)
