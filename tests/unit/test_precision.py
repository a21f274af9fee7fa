"""Precision maps under a memory budget."""
import pytest
import torch

from moesweep.grid import Precision
from moesweep.precision import BudgetError, build_map, layer_budgets

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


def test_dynamic_pool_holds_every_low_version_plus_high_slots():
    pmap = build_map(Precision("dynamic", 8, 2, 0.4, allocation="uniform"), LAYERS, E, TIERS, HOT)
    # per layer 3200 bytes: 8 * 140 low versions, (3200 - 1120) // 520 = 4 slots of the 4 hottest
    assert pmap.bits[0].tolist() == [8, 8, 2, 8, 8, 2, 2, 2]
    assert pmap.expert_bytes == 2 * (1120 + 4 * 520)


def test_budget_in_gb_equals_the_same_bytes_as_a_fraction():
    frac = build_map(Precision("hotcold", 8, 2, 0.4, allocation="uniform"), LAYERS, E, TIERS, HOT)
    gb = build_map(Precision("hotcold", 8, 2, None, 6400e-9, allocation="uniform"), LAYERS, E, TIERS, HOT)
    assert all(torch.equal(frac.bits[i], gb.bits[i]) for i in LAYERS)
    assert gb.budget_bytes == 6400 and gb.expert_bytes == frac.expert_bytes


def test_hotness_allocation_moves_slots_to_the_layer_whose_routing_is_concentrated():
    shares = {0: torch.tensor([0.3, 0.3, 0.3, 0.02, 0.02, 0.02, 0.02, 0.02], dtype=torch.float64),
              1: torch.full((E,), 1 / E, dtype=torch.float64)}
    hot = {0: list(range(E)), 1: list(range(E))}
    uniform = layer_budgets(Precision("dynamic", 8, 2, 0.4, allocation="uniform"), TIERS, shares)
    ranked = layer_budgets(Precision("dynamic", 8, 2, 0.4, allocation="hotness"), TIERS, shares)
    assert uniform == {0: 3200, 1: 3200}
    # 6400 - 2 * 1120 = 4160 = 8 slots of 520: layer 0's three 0.3 experts first, then layer 1's 1/8 experts
    # (five fit); layer 0's 0.02 experts get none
    assert ranked == {0: 1120 + 3 * 520, 1: 1120 + 5 * 520}
    pmap = build_map(Precision("dynamic", 8, 2, 0.4, allocation="hotness"), LAYERS, E, TIERS, hot, shares)
    assert int((pmap.bits[0] == 8).sum()) == 3 and int((pmap.bits[1] == 8).sum()) == 5
    assert pmap.expert_bytes <= pmap.budget_bytes == 6400
    with pytest.raises(ValueError, match="needs the profile stage"):
        layer_budgets(Precision("hotcold", 8, 2, 0.4, allocation="hotness"), TIERS)
