"""Dynamic expert precision (DynaExq-style) and the offload cache, on synthetic routing streams."""
import random
from types import SimpleNamespace

import pytest
import torch

from moesweep.dynamic import DynamicPrecision, OffloadCache, plan_transitions
from moesweep.precision import BudgetError

E, LAYERS = 8, [0, 1]
BYTES = {16: {i: torch.full((E,), 1000) for i in LAYERS}, 8: {i: torch.full((E,), 520) for i in LAYERS},
         2: {i: torch.full((E,), 140) for i in LAYERS}}


def make(n_high=3, budget=None, **kw):
    experts = {i: SimpleNamespace(gate_up_proj=torch.zeros(E, 2, 2), down_proj=torch.zeros(E, 2, 2)) for i in LAYERS}
    # version tensors hold their width as the value, so the fused tensors show which version is resident
    versions = {b: {i: {n: torch.full((E, 2, 2), float(b)) for n in ("gate_up_proj", "down_proj")} for i in LAYERS}
                for b in (8, 2)}
    high = {i: torch.arange(E) < n_high for i in LAYERS}
    for i in LAYERS:
        for n in ("gate_up_proj", "down_proj"):
            getattr(experts[i], n)[:] = torch.where(high[i][:, None, None], 8.0, 2.0)
    # every expert's low version + a pool of n_high high slots (dynamic.py's memory model)
    budget = budget or {i: E * 140 + n_high * 520 for i in LAYERS}
    hot = {i: torch.full((E,), 1 / E, dtype=torch.float64) for i in LAYERS}
    ctl = DynamicPrecision(experts, high, hot, versions, BYTES, 8, 2, budget, **kw)
    return ctl, experts


def feed(ctl, weights, calls, rng, tokens=16):
    """`calls` forward calls whose tokens pick experts by `weights` (per layer the same)."""
    for _ in range(calls):
        for i in LAYERS:
            idx = torch.tensor(rng.choices(range(E), weights=weights, k=tokens))[:, None]
            ctl.observe(i, idx, torch.full((tokens, 1), 0.5), torch.ones(tokens, 1, dtype=torch.bool))
        ctl.end_call()


def resident_matches_map(ctl, experts):
    for i in LAYERS:
        for n in ("gate_up_proj", "down_proj"):
            widths = getattr(experts[i], n)[:, 0, 0]
            assert torch.equal(widths == 8.0, ctl.high[i])


def test_follows_the_hottest_experts_when_the_stream_shifts():
    ctl, experts = make(update_every=10, delta=0.0, rate_limit=8)
    rng = random.Random(0)
    feed(ctl, [1] * 4 + [20] * 3 + [1], 60, rng)  # experts 4, 5, 6 hot; the start map has 0, 1, 2 high
    assert all(ctl.high[i].nonzero().flatten().tolist() == [4, 5, 6] for i in LAYERS)
    feed(ctl, [20, 1, 1, 1, 1, 1, 20, 20], 80, rng)  # shift: experts 0, 6, 7
    assert all(ctl.high[i].nonzero().flatten().tolist() == [0, 6, 7] for i in LAYERS)
    resident_matches_map(ctl, experts)


def test_stationary_stream_stops_changing():
    ctl, _ = make(update_every=10, delta=0.01)
    rng = random.Random(1)
    feed(ctl, [5, 5, 1, 1, 8, 1, 1, 1], 100, rng)
    settled = ctl.stats.transitions
    feed(ctl, [5, 5, 1, 1, 8, 1, 1, 1], 300, rng)
    assert ctl.stats.transitions == settled  # no thrash once the map matches the stream


def test_frozen_never_changes_the_map():
    ctl, experts = make(update_every=5, frozen=True)
    start = {i: m.clone() for i, m in ctl.high.items()}
    feed(ctl, [1] * 5 + [50] * 3, 50, random.Random(2))
    assert ctl.stats.transitions == 0 and all(torch.equal(ctl.high[i], start[i]) for i in LAYERS)


@pytest.mark.parametrize("seed", range(5))
def test_budget_and_rate_limit_hold_at_every_step_of_a_random_simulation(seed, monkeypatch):
    rng = random.Random(seed)
    ctl, experts = make(n_high=rng.randint(0, 4), update_every=rng.randint(1, 7), delta=rng.random() * 0.05,
                        rate_limit=rng.randint(1, 3))
    checks = []
    original = ctl.assert_budget
    monkeypatch.setattr(ctl, "assert_budget", lambda i: (checks.append(i), original(i)))
    before = ctl.stats.transitions
    for _ in range(40):
        decisions = ctl.stats.decisions
        feed(ctl, [rng.random() ** 3 for _ in range(E)], 1, rng)
        if ctl.stats.decisions > decisions:
            assert ctl.stats.transitions - before <= ctl.rate_limit * len(LAYERS)
            before = ctl.stats.transitions
        for i in LAYERS:
            assert ctl.resident_bytes(i) <= ctl.budget[i]
    resident_matches_map(ctl, experts)
    assert len(checks) == 2 * ctl.stats.transitions  # checked after each demotion and each promotion


def test_budget_violation_is_caught():
    with pytest.raises(AssertionError, match="4 high-precision experts in 2 slots"):
        make(n_high=4, budget={i: E * 140 + 2 * 520 + 519 for i in LAYERS})
    with pytest.raises(BudgetError, match="below the 1120 bytes of every expert at the low width"):
        make(n_high=0, budget={i: 1000 for i in LAYERS})


def test_pool_slots_follow_the_budget():
    ctl, _ = make(n_high=3)
    assert ctl.slots == {0: 3, 1: 3} and ctl.allocated_bytes(0) == E * 140 + 3 * 520 == ctl.budget[0]


def test_plan_transitions_hysteresis_and_rate_limit():
    score = torch.tensor([0.10, 0.30, 0.05, 0.50, 0.29], dtype=torch.float64)
    high = torch.tensor([True, True, True, False, False])
    # hottest outsider 3 (0.50) vs weakest incumbent 2 (0.05), then 4 (0.29) vs 0 (0.10)
    assert plan_transitions(score, high, 0.0, 4) == [(2, 3), (0, 4)]
    assert plan_transitions(score, high, 0.0, 1) == [(2, 3)]
    assert plan_transitions(score, high, 0.2, 4) == [(2, 3)]  # 0.29 does not lead 0.10 by more than 0.2
    assert plan_transitions(score, high, 0.5, 4) == []


def test_offload_cache_counts_lru_misses():
    cache = OffloadCache({0: torch.full((4,), 100)}, {0: 250})  # two experts fit
    for experts in ([0, 1], [0, 1], [2], [0], [1]):
        idx = torch.tensor(experts)[:, None]
        cache.observe(0, idx, torch.ones(len(experts), 1), torch.ones(len(experts), 1, dtype=torch.bool))
    # calls: miss 0, miss 1 | hit 0, hit 1 | miss 2 (evicts 0) | miss 0 (evicts 1) | miss 1 (evicts 2)
    assert (cache.misses, cache.hits, cache.bytes_moved) == (5, 2, 500)
    assert dict(cache.resident[0]) == {0: 1, 1: 0}  # expert -> slot: each fetch reuses the evicted one's slot


def test_offload_touch_returns_fetches_into_evicted_slots():
    cache = OffloadCache({0: torch.full((6,), 100)}, {0: 300})  # three slots
    assert cache.touch(0, [0, 1, 2]) == [(0, 0), (1, 1), (2, 2)]
    assert cache.touch(0, [1, 4]) == [(4, 0)]  # 0 was least recently used
    # more experts than slots in one call: its own earlier experts are evicted as it goes
    assert cache.touch(0, [0, 2, 3, 5]) == [(0, 2), (2, 1), (3, 0), (5, 2)]  # 5 evicts 0, fetched this call
