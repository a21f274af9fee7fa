"""Aggregation: Pareto flags and McNemar against the reference cell."""
import pandas as pd
import pytest

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


def test_holm_adjustment_by_hand():
    from moesweep.results import holm

    # m = 4 tests (the reference's null is not in the family): sorted 0.01, 0.02, 0.03, 0.5
    p = pd.Series([None, 0.03, 0.01, 0.5, 0.02])
    adj = holm(p)
    assert pd.isna(adj[0])
    assert adj[2] == pytest.approx(0.04)  # 4 x 0.01
    assert adj[4] == pytest.approx(0.06)  # 3 x 0.02
    assert adj[1] == pytest.approx(0.06)  # max(0.06, 2 x 0.03)
    assert adj[3] == pytest.approx(0.5)  # max(0.06, 1 x 0.5)
    assert (adj.dropna() >= p.dropna()).all()


def test_holm_caps_at_one_and_keeps_order():
    from moesweep.results import holm

    # sorted 0.3, 0.4, 0.9 -> 3 x 0.3 = 0.9, max(0.9, 2 x 0.4), max(0.9, 0.9): monotone in the raw order
    assert holm(pd.Series([0.4, 0.3, 0.9])).tolist() == pytest.approx([0.9, 0.9, 0.9])
    assert holm(pd.Series([0.7, 0.6])).tolist() == [1.0, 1.0]  # 2 x 0.6 capped at 1, then max(1, 0.7)


def test_headline_measure_and_pareto_on_bytes():
    from moesweep.results import headline_measure

    cpu = pd.DataFrame({"device": ["cpu", "cpu"], "weight_bytes_per_token": [1.0, 2.0],
                        "expert_bytes_per_token": [0.5, 1.5]})
    assert headline_measure(cpu) == "weight_bytes_per_token"
    assert headline_measure(cpu.assign(weight_bytes_per_token=[None, 2.0])) == "expert_bytes_per_token"
    assert headline_measure(cpu.assign(device=["cuda", "cuda:1"])) == "fixed_decode_tokens_per_s"
    assert headline_measure(cpu.assign(device=["cuda", "cpu"])) == "weight_bytes_per_token"
    # fewer bytes is better: a cheaper, less accurate cell is on the frontier, a dearer, less accurate one is not
    acc = pd.Series([0.8, 0.5, 0.7])
    cost = pd.Series([10.0, 5.0, 12.0])
    assert pareto_mask(acc, -cost).tolist() == [True, True, False]
