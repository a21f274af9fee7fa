"""Precision maps under a memory budget."""
import pytest
import torch

from moesweep.grid import Precision
from moesweep.precision import BudgetError, build_map

E, LAYERS = 8, [0, 1]
FULL = {i: torch.full((E,), 1000) for i in LAYERS}
TIERS = {16: FULL, 8: {i: torch.full((E,), 520) for i in LAYERS}, 2: {i: torch.full((E,), 140) for i in LAYERS}}
HOT = {0: [3, 1, 4, 0, 5, 2, 6, 7], 1: list(range(E))}


def test_hotcold_takes_the_hottest_within_budget():
    pmap = build_map(Precision("hotcold", 8, 2, 0.4), LAYERS, E, TIERS, HOT)
    # per layer: 0.4 * 8000 = 3200 bytes; 8*140 = 1120 base; each promotion costs 380 → 5 promotions (3020).
    assert pmap.bits[0].tolist() == [8, 8, 2, 8, 8, 8, 2, 2]
    assert int((pmap.bits[1] == 8).sum()) == 5
    assert pmap.expert_bytes == 2 * (5 * 520 + 3 * 140) <= pmap.budget_bytes


def test_full_budget_means_all_high_and_tight_budget_is_refused():
    assert all((b == 8).all() for b in build_map(Precision("hotcold", 8, 2, 1.0), LAYERS, E, TIERS, HOT).bits.values())
    with pytest.raises(BudgetError, match="below the smallest feasible"):
        build_map(Precision("hotcold", 8, 2, 0.1), LAYERS, E, TIERS, HOT)


def test_uniform_and_full_bytes():
    assert build_map(Precision("uniform", 2, 2), LAYERS, E, TIERS).expert_bytes == 2 * 8 * 140
    full = build_map(Precision(), LAYERS, E, TIERS)
    assert full.expert_bytes == full.full_bytes == 16000
