"""Aggregation: Pareto flags and McNemar against the reference cell."""
import pandas as pd

from moesweep.results import mcnemar_vs_reference, pareto_mask


def test_pareto_mask():
    acc = pd.Series([0.9, 0.8, 0.7, 0.85, 0.9])
    tps = pd.Series([100, 200, 150, 150, 90])
    assert pareto_mask(acc, tps).tolist() == [True, True, False, True, False]


def test_mcnemar_against_reference():
    cells = pd.DataFrame({"cell": ["ref", "a"], "routing_policy": ["native", "topk"], "precision_policy": ["full", "full"]})
    problems = pd.DataFrame({"cell": ["ref"] * 10 + ["a"] * 10, "problem_id": list(range(10)) * 2,
                             "correct_strict": [True] * 10 + [False] * 6 + [True] * 4})
    p = mcnemar_vs_reference(cells, problems)
    assert p[0] == 1.0
    assert abs(p[1] - 2 * 0.5 ** 6) < 1e-12  # 6 discordant pairs, all one way
