"""fast/decode_routing.py (one launch) against routing.route + kernels.align_and_account (the torch glue it replaces),
for every policy, with padding rows, ties and capacity that binds. CPU: Triton's interpreter; CUDA: compiled."""
import pytest
import torch

pytest.importorskip("triton")

from moesweep.fast.decode_routing import decode_route, supports  # noqa: E402
from moesweep.fast.kernels import align_and_account  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.routing import LayerRoutingStats, route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE_K = 4

POLICIES = {
    "native": Routing(),
    "native-cf1": Routing(capacity_factor=1.0),
    "top1-cf1": Routing(policy="topk", top_k=1, capacity_factor=1.0),
    "top2-cf0.5-score": Routing(policy="topk", top_k=2, capacity_factor=0.5, priority="score"),
    "top3-norenorm": Routing(policy="topk", top_k=3, renormalize=False),
    "skip": Routing(policy="skip"),
    "skip-cf1.5-score": Routing(policy="skip", capacity_factor=1.5, priority="score"),
    "top_p": Routing(policy="top_p", top_p=0.5),
    "top_p-cf1": Routing(policy="top_p", top_p=0.7, capacity_factor=1.0),
}


def _logits(T, E, seed, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    if ties:  # bf16-like coarse logits: equal probabilities within a row, so the tie-break is exercised
        logits = (logits * 2).round() / 2
    return logits


def _both(policy, T, E, seed, ties=False, invalid=(), hot=True, mass=True, block_m=1):
    logits = _logits(T, E, seed, ties).to(DEVICE)
    valid = torch.ones(T, dtype=torch.bool, device=DEVICE)
    valid[list(invalid)] = False
    beta = torch.tensor(0.3, device=DEVICE)
    hot_mask = (torch.arange(E, device=DEVICE) % 3 == 0) if hot else None
    cf = None if policy.capacity_factor is None else torch.tensor(policy.capacity_factor, dtype=torch.float64,
                                                                   device=DEVICE)
    ncount = len(LayerRoutingStats.COUNTERS)
    out = {}
    for name in ("torch", "fused"):
        counts = torch.full((ncount,), 5, dtype=torch.int64, device=DEVICE)  # accumulators: added into
        load = torch.full((E,), 2, dtype=torch.int64, device=DEVICE)
        mass_acc = torch.full((E,), 0.25, dtype=torch.float64, device=DEVICE) if mass else None
        if name == "torch":
            probs = torch.softmax(logits, -1, dtype=torch.float)
            index, weights, keep_policy, keep = route(probs, policy, NATIVE_K, True, valid, beta, sort_topk=True)
            sorted_assign, block_expert, hits = align_and_account(index, E, block_m, valid, keep_policy, hot_mask,
                                                                  counts, load, True)
            if mass:
                routed = probs.gather(1, index.clamp_max(E - 1)).double() * keep
                mass_acc += torch.zeros(E + 1, dtype=torch.float64, device=DEVICE).scatter_add_(
                    0, index.flatten(), routed.flatten())[:E]
        else:
            weights, sorted_assign, block_expert, hits = decode_route(
                logits, policy, NATIVE_K, True, valid, beta, cf, hot_mask, block_m, counts, load, mass_acc)
        out[name] = dict(weights=weights.cpu(), sorted=sorted_assign.cpu(), blocks=block_expert.cpu(),
                         hits=hits.cpu(), counts=counts.cpu(), load=load.cpu(),
                         mass=None if mass_acc is None else mass_acc.cpu())
    return out["torch"], out["fused"]


def _assert_same(want, got):
    assert torch.equal(got["sorted"], want["sorted"])
    assert torch.equal(got["blocks"], want["blocks"])
    assert torch.equal(got["hits"], want["hits"])
    assert torch.equal(got["counts"], want["counts"])
    assert torch.equal(got["load"], want["load"])
    torch.testing.assert_close(got["weights"], want["weights"], rtol=1e-6, atol=1e-7)
    if want["mass"] is not None:
        torch.testing.assert_close(got["mass"], want["mass"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("T,E,block_m", [(1, 16, 1), (5, 16, 2), (12, 24, 4)])
def test_fused_routing_equals_route_and_alignment(name, T, E, block_m):
    policy = POLICIES[name]
    assert supports(policy, T, NATIVE_K, E, torch.device(DEVICE))  # on the CPU: Triton's interpreter (conftest)
    want, got = _both(policy, T, E, seed=T * 100 + E, invalid=[T - 1] if T > 1 else [], block_m=block_m)
    _assert_same(want, got)


@pytest.mark.parametrize("name", ["native", "top2-cf0.5-score", "top1-cf1", "top_p"])
def test_tied_probabilities_go_to_the_lower_expert_id(name):
    """Coarse logits: several experts of a row share a probability; the stable sort's choice (lower id) wins."""
    want, got = _both(POLICIES[name], 9, 16, seed=7, ties=True, block_m=2)
    _assert_same(want, got)


def test_without_hot_mask_or_mass_and_all_tokens_invalid():
    want, got = _both(POLICIES["native-cf1"], 4, 16, seed=3, invalid=range(4), hot=False, mass=False, block_m=2)
    _assert_same(want, got)
    assert int(got["hits"].sum()) == 0


def test_capacity_binds_and_drops_in_priority_order():
    """Top-1 at CF 0.5 over 8 tokens and 4 experts: capacity 1 per expert, so most assignments are dropped."""
    policy = Routing(policy="topk", top_k=1, capacity_factor=0.5)
    want, got = _both(policy, 8, 4, seed=11, block_m=1)
    _assert_same(want, got)
    dropped = int(got["counts"][2]) - 5  # the accumulator started at 5
    assert dropped >= 4


def test_skip_without_beta_is_refused():
    with pytest.raises(ValueError, match="beta"):
        decode_route(torch.zeros(1, 8, device=DEVICE), Routing(policy="skip"), 2, True,
                     torch.ones(1, dtype=torch.bool, device=DEVICE), None, None, None, 1,
                     torch.zeros(9, dtype=torch.int64, device=DEVICE), torch.zeros(8, dtype=torch.int64, device=DEVICE),
                     None)


def test_supports_only_one_program_sizes():
    dev = torch.device("cuda")
    assert supports(Routing(), 32, 8, 128, dev)
    assert not supports(Routing(), 128, 8, 128, dev)  # 1024 assignments x 128 experts: one program's tiles too big
    assert not supports(Routing(capacity_factor=1.0, priority="score"), 64, 8, 128, dev)  # 512 x 512 comparisons
