"""GSM8K answer extraction, correctness and the statistics used to compare runs.

Extraction and exact match mirror lm-eval 0.4.13 (lm_eval/tasks/gsm8k/gsm8k.yaml and gsm8k-cot.yaml):
  strict-match     = regex filter (the preset's regex, group_select 0) then take_first
  flexible-extract = regex filter "(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select -1, then take_first
  exact_match      = api/metrics.py exact_match_hf_evaluate with ignore_case=True,
                     ignore_punctuation=False, regexes_to_ignore [",", "\\$", "(?s).*#### ", "\\.$"]
We score one completion per question (repeats: 1), so take_first is the identity here.
`numeric_equal` is our own extra column (not lm-eval): "1.50" vs "1.5" count as equal.
"""
from __future__ import annotations

import math
import re
from statistics import NormalDist

INVALID = "[invalid]"  # lm-eval RegexFilter's default fallback
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORED_IN_EXACT_MATCH = (",", r"\$", r"(?s).*#### ", r"\.$")  # applied in this order, to both sides
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def _regex_filter(completion: str, regex: str, group_select: int) -> str:
    """lm-eval filters/extraction.py RegexFilter.apply for one response: findall, pick match
    `group_select`; a tuple match (several groups) gives its first non-empty group; then strip()."""
    if not isinstance(completion, str):
        completion = ""
    matches = re.findall(regex, completion)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        non_empty = [group for group in match if group]
        match = non_empty[0] if non_empty else INVALID
    return match.strip()


def extract_strict(completion: str, regex: str) -> str:
    """First match of the preset's strict regex (its group), or "[invalid]"."""
    return _regex_filter(completion, regex, group_select=0)


def extract_flexible(completion: str) -> str:
    """Last number-like match in the completion, or "[invalid]"."""
    return _regex_filter(completion, FLEXIBLE_REGEX, group_select=-1)


def _normalise_for_exact_match(text: str) -> str:
    for pattern in IGNORED_IN_EXACT_MATCH:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, gold: str) -> bool:
    """lm-eval's gsm8k exact_match for one (prediction, gold). `gold` may be the full GSM8K answer
    (lm-eval gsm8k: everything up to the last "#### " is ignored) or just its number (gsm8k_cot)."""
    return _normalise_for_exact_match(prediction) == _normalise_for_exact_match(gold)


def _as_number(text: str) -> float | None:
    if "####" in text:
        text = text.split("####")[-1]
    text = re.sub(r"\.$", "", text.strip().replace(",", "").replace("$", ""))
    return float(text) if _NUMBER.fullmatch(text) else None


def numeric_equal(prediction: str, gold: str) -> bool:
    """Both parse as numbers (after removing `,`, `$`, one trailing `.`) and are equal as floats."""
    a, b = _as_number(prediction), _as_number(gold)
    return a is not None and b is not None and a == b


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion. n == 0 gives (0.0, 1.0): no information."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp float noise; the exact bounds at p = 0 and p = 1 are 0 and 1.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test: under H0 the discordant pairs split Binomial(b + c, 1/2).

    p = min(1, 2 * P(X <= min(b, c))), computed with integers (exact for any n). Equals
    scipy.stats.binomtest(b, b + c, 0.5).pvalue, since the null distribution is symmetric.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)
