"""Routing policies against a plain per-token reference loop written for the test."""
import math

import pytest
import torch

from moesweep.grid import Routing
from moesweep.routing import capacity, route


def reference_route(probs, policy, native_k, native_norm, valid=None, beta=None):
    """Per-token loop: the policy's choice per token, then capacity over assignments in priority order."""
    T, E = probs.shape
    k = policy.top_k if policy.policy == "topk" else native_k
    renorm = native_norm if (policy.policy == "native" or policy.renormalize is None) else policy.renormalize
    chosen = []  # per token: list of (rank, expert, prob)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-probs[t, e].item(), e))[:k]
        ps = [probs[t, e].item() for e in order]
        keep = [True] * k
        if policy.policy == "skip":
            keep = [j == 0 or ps[j] >= beta * ps[0] for j in range(k)]
        if policy.policy == "top_p":
            mass = 0.0
            for j in range(k):
                keep[j] = j == 0 or mass < policy.top_p
                mass += ps[j]
        if valid is not None and not valid[t]:
            keep = [False] * k
        total = sum(p for p, kp in zip(ps, keep) if kp)
        ws = [(p / total if renorm else p) if kp else 0.0 for p, kp in zip(ps, keep)]
        chosen.append([(j, order[j], ps[j], ws[j], keep[j]) for j in range(k)])
    final_keep = [[c[4] for c in row] for row in chosen]
    if policy.capacity_factor is not None:
        n_valid = T if valid is None else int(sum(bool(v) for v in valid))
        cap = math.ceil(policy.capacity_factor * n_valid * k / E)
        assignments = [(t, j) for t in range(T) for j in range(k) if chosen[t][j][4]]
        if policy.priority == "score":
            assignments.sort(key=lambda a: (-chosen[a[0]][a[1]][2], a[1] * T + a[0]))
        else:
            assignments.sort(key=lambda a: (a[1], a[0]))
        used = [0] * E
        final_keep = [[False] * k for _ in range(T)]
        for t, j in assignments:
            e = chosen[t][j][1]
            if used[e] < cap:
                used[e] += 1
                final_keep[t][j] = True
    index = torch.tensor([[c[1] if final_keep[t][j] else E for j, c in enumerate(row)] for t, row in enumerate(chosen)])
    weight = torch.tensor([[c[3] if final_keep[t][j] else 0.0 for j, c in enumerate(row)] for t, row in enumerate(chosen)])
    return index, weight


POLICIES = [
    Routing("native"),
    Routing("topk", top_k=1),
    Routing("topk", top_k=2, renormalize=False),
    Routing("topk", top_k=1, capacity_factor=0.5),
    Routing("topk", top_k=1, capacity_factor=1.0),
    Routing("topk", top_k=2, capacity_factor=1.25),
    Routing("topk", top_k=1, capacity_factor=1.0, priority="score"),
    Routing("topk", top_k=2, capacity_factor=0.75, priority="score", renormalize=True),
    Routing("native", capacity_factor=1.0),
    Routing("skip"),
    Routing("skip", capacity_factor=2.0),
    Routing("top_p", top_p=0.5),
    Routing("top_p", top_p=0.9, capacity_factor=1.0),
    Routing("top_p", top_p=1.0),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.slug())
@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (7, 8, 4), (33, 16, 4), (5, 16, 8)])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_reference_loop(policy, T, E, k, norm):
    torch.manual_seed(T * 100 + E + k)
    probs = torch.softmax(torch.randn(T, E) * 2, dim=-1)
    valid = torch.rand(T) > 0.2
    valid[0] = True
    index, weight, _, _ = route(probs, policy, k, norm, valid, skip_beta=0.6)
    ref_index, ref_weight = reference_route(probs, policy, k, norm, valid.tolist(), beta=0.6)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weight, ref_weight, rtol=1e-6, atol=1e-7)


def test_native_is_bit_identical_to_the_hf_router():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)
    hf = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(hf.weight)
    x = torch.randn(40, 32)
    _, hf_w, hf_i = hf(x)
    probs = torch.softmax(torch.nn.functional.linear(x, hf.weight), dtype=torch.float, dim=-1)
    for policy in (Routing("native"), Routing("topk", top_k=4)):  # k′ = k, CF = none equals native
        index, weight, _, _ = route(probs, policy, 4, True)
        assert torch.equal(index, hf_i) and torch.equal(weight, hf_w)


@pytest.mark.parametrize("cf,tokens,k,E,expected", [
    (1.0, 8, 1, 16, 1),   # T < E: capacity rounds up to 1
    (0.5, 3, 1, 16, 1),
    (0.5, 64, 1, 16, 2),
    (1.25, 64, 4, 16, 20),
    (2.0, 10, 2, 8, 5),
    (0.1, 1, 1, 128, 1),
])
def test_capacity_arithmetic(cf, tokens, k, E, expected):
    assert capacity(cf, tokens, k, E) == expected


def test_capacity_ties_keep_token_order():
    probs = torch.full((6, 4), 0.25)  # every token ties on every expert; topk picks expert 0 for all
    index, _, _, keep = route(probs, Routing("topk", top_k=1, capacity_factor=1.0, priority="score"), 2, True)
    # capacity ceil(1.0 * 6 * 1 / 4) = 2: ties broken by token order, so tokens 0 and 1 keep their slot.
    assert keep[:, 0].tolist() == [True, True, False, False, False, False]
    assert (index[2:, 0] == 4).all()


def test_padding_uses_no_capacity():
    probs = torch.softmax(torch.randn(8, 4), dim=-1)
    valid = torch.tensor([True, False] * 4)
    index, weight, _, keep = route(probs, Routing("topk", top_k=1, capacity_factor=1.0), 2, True, valid)
    assert not keep[~valid].any()
    assert (weight[~valid] == 0).all()


def test_dropped_assignments_never_nan_in_any_experts_implementation(random_checkpoint):
    from moesweep.model import EXPERTS_IMPLEMENTATION, install_policy, load_model
    from moesweep.routing import RoutingContext

    model, _, adapter = load_model(str(random_checkpoint))
    install_policy(adapter, Routing("topk", top_k=1, capacity_factor=0.25), RoutingContext())
    ids = torch.randint(0, 100, (4, 16))
    for impl in (EXPERTS_IMPLEMENTATION, "batched_mm", "grouped_mm"):
        model.set_experts_implementation(impl)
        logits = model(ids).logits
        assert torch.isfinite(logits).all(), impl
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)


def test_sparse_experts_match_transformers_eager(random_checkpoint):
    """Without drops, the project's experts forward equals transformers' eager implementation."""
    from moesweep.model import install_policy, load_model
    from moesweep.routing import RoutingContext

    model, _, adapter = load_model(str(random_checkpoint))
    ids = torch.randint(0, 100, (3, 12))
    model.set_experts_implementation("eager")
    reference = model(ids).logits
    install_policy(adapter, Routing("native"), RoutingContext())
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-6)


def test_routing_accounting(random_checkpoint):
    from moesweep.model import install_policy, load_model
    from moesweep.routing import RoutingContext

    model, _, adapter = load_model(str(random_checkpoint))
    ctx = RoutingContext()
    install_policy(adapter, Routing("topk", top_k=1, capacity_factor=0.5), ctx)
    ctx.valid = torch.ones(2 * 16, dtype=torch.bool)
    model(torch.randint(0, 100, (2, 16)))
    cap = capacity(0.5, 32, 1, adapter.num_experts)
    for stats in ctx.stats.values():
        assert stats.tokens == 32 and stats.routed == 32
        assert int(stats.load.max()) <= cap
        assert stats.routed - stats.dropped == int(stats.load.sum())
