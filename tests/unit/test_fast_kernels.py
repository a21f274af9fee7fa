"""Grouped expert kernels of the fast engine against a dequantised float reference.

On the CPU (CI) the kernels run in Triton's interpreter in float32 (its bf16 loads are broken on CPU tensors),
so they are checked for exact logic; on CUDA they run compiled in bf16 and are held to bf16 tolerances.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from moesweep.fast.kernels import align_assignments  # noqa: E402
from moesweep.fast.moe import FastMoeExperts  # noqa: E402
from moesweep.quant import QuantSpec, dequantize, quantize_experts  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 2e-2 if CUDA else 1e-5
E, H, I = 8, 64, 32


class _Experts:  # the two fused tensors a transformers experts module holds
    def __init__(self, gate_up, down):
        self.gate_up_proj, self.down_proj = gate_up, down


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1


def _reference(x, index, weights, gate_up, down):
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e == E:
                continue
            g, u = (x[t].double() @ gate_up[e].double().T).chunk(2)
            out[t] += float(weights[t, j]) * ((F.silu(g) * u) @ down[e].double().T)
    return out


def _routing(T, k, seed, drop=0.2):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    dropped = torch.rand(T, k, generator=g) < drop
    index[dropped] = E
    weights = torch.rand(T, k, generator=g) * (~dropped)
    return index, weights


def _run(widths, quantized, gate_up, down, T=6, k=3, seed=1):
    experts = _Experts(gate_up.to(DEVICE, DTYPE), down.to(DEVICE, DTYPE))
    layer = {b: {"gate_up_proj": quantized[b][0], "down_proj": quantized[b][1]} for b in quantized}
    fast = FastMoeExperts.static(experts, widths, layer)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    index, weights = _routing(T, k, seed)
    got = fast(x.to(DEVICE, DTYPE), index.to(DEVICE), weights.to(DEVICE)).float().cpu()
    return got, x, index, weights


def _quantized(bits, group_size, symmetric, seed=0):
    gate_up, down = _weights(seed)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, method="rtn")
    return gate_up, down, (quantize_experts(gate_up, None, None, spec), quantize_experts(down, None, None, spec))


def _relative(got, want):
    return float((got.double() - want).norm() / want.norm())


def test_align_assignments_covers_each_live_assignment_once():
    index, _ = _routing(T=9, k=3, seed=3)
    sorted_assign, block_expert = align_assignments(index, E, 16)
    flat = index.flatten()
    n = flat.numel()
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_assign[b * 16:(b + 1) * 16].tolist()
        live = [a for a in rows if a < n]
        if e == E:
            assert not live, "blocks past the end must be empty"
        assert all(int(flat[a]) == e for a in live)
        seen += live
    assert sorted(seen) == sorted(int(a) for a in (flat < E).nonzero().flatten())


def test_full_precision_tier_matches_reference():
    gate_up, down = _weights(0)
    got, x, index, weights = _run(torch.full((E,), 16), {}, gate_up, down)
    want = _reference(x, index, weights, gate_up.to(DTYPE).float(), down.to(DTYPE).float())
    assert torch.isfinite(got).all()
    assert _relative(got, want) < TOL


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (16, True), (-1, False), (128, False), (128, True)])
def test_packed_tier_matches_dequantised_reference(bits, group_size, symmetric):
    gate_up, down, (q_gu, q_dn) = _quantized(bits, group_size, symmetric)
    got, x, index, weights = _run(torch.full((E,), bits), {bits: (q_gu, q_dn)}, gate_up, down)
    want = _reference(x, index, weights, dequantize(q_gu, DTYPE).float(), dequantize(q_dn, DTYPE).float())
    assert torch.isfinite(got).all()
    assert _relative(got, want) < TOL


def test_mixed_tiers_and_dropped_assignments_read_no_weights():
    gate_up, down = _weights(0)
    quantized = {}
    for bits in (8, 4, 2):
        spec = QuantSpec(bits=bits, group_size=32, symmetric=False, method="rtn")
        quantized[bits] = (quantize_experts(gate_up, None, None, spec), quantize_experts(down, None, None, spec))
    widths = torch.tensor([16, 8, 4, 2, 16, 8, 4, 2])
    index, weights = _routing(6, 3, seed=1)
    # An expert reached only by dropped assignments: NaN weights in every tier must not reach the output.
    unused = sorted(set(range(E)) - set(index[index < E].tolist()))
    assert unused, "routing draw must leave an expert unhit"
    poisoned_gu, poisoned_dn = gate_up.clone(), down.clone()
    poisoned_gu[unused], poisoned_dn[unused] = float("nan"), float("nan")
    got, x, index, weights = _run(widths, quantized, poisoned_gu, poisoned_dn)
    per_expert_gu = torch.stack([gate_up[e].to(DTYPE).float() if widths[e] == 16 else
                                 dequantize(quantized[int(widths[e])][0], DTYPE)[e].float() for e in range(E)])
    per_expert_dn = torch.stack([down[e].to(DTYPE).float() if widths[e] == 16 else
                                 dequantize(quantized[int(widths[e])][1], DTYPE)[e].float() for e in range(E)])
    want = _reference(x, index, weights, per_expert_gu, per_expert_dn)
    assert torch.isfinite(got).all()
    assert _relative(got, want) < TOL


def test_three_bit_tier_is_refused_with_a_clear_error():
    gate_up, down, (q_gu, q_dn) = _quantized(3, 32, False)
    with pytest.raises(ValueError, match="fast engine serves expert widths"):
        _run(torch.full((E,), 3), {3: (q_gu, q_dn)}, gate_up, down)


@pytest.mark.parametrize("routing", [{}, {"policy": "topk", "top_k": 1, "capacity_factor": 1.0}],
                         ids=["native", "top1-cf1"])
def test_fast_forward_matches_transformers_and_reference_accounting(embedded_model, routing):
    """The fast path's prefill forward (eager glue + kernels) against transformers' forward with the same policy."""
    from moesweep.fast.engine import FastQwen3MoeEngine
    from moesweep.grid import Routing
    from moesweep.model import install_policy, load_model
    from moesweep.routing import RoutingContext

    model, tokenizer, adapter = load_model(str(embedded_model), "float32" if not CUDA else "bfloat16", DEVICE)
    policy = Routing(**routing)
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    fast = FastQwen3MoeEngine(model, adapter, policy, widths, {}, compile=False)
    ids = tokenizer("Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:", return_tensors="pt",
                    add_special_tokens=False).input_ids.to(DEVICE)
    P = ids.shape[1]
    fast._ensure_cache(1, P + 1)
    slots = torch.arange(P, device=DEVICE)
    mask = (slots[:, None] >= torch.arange(fast._cache[0].shape[3], device=DEVICE)[None, :])[None, None]
    valid = torch.ones(P, dtype=torch.bool, device=DEVICE)
    with torch.inference_mode():
        logits = fast._forward(ids, slots[None], slots, mask, valid, False).float()
        context = RoutingContext()
        install_policy(adapter, policy, context)
        context.valid = valid
        want = model(ids).logits[:, -1].float()
    assert _relative(logits.cpu(), want.cpu().double()) < TOL
    got_stats, want_stats = fast.routing_stats(), context.stats
    for layer, s in want_stats.items():
        g = got_stats[layer]
        assert g.tokens == s.tokens
        if CUDA:  # bf16: one near-tie may pick another expert (measured: 1 of 92 assignments on the H200)
            assert int((g.load - s.load).abs().sum()) <= max(2, s.routed // 25)
            assert abs(g.dropped - s.dropped) <= max(2, s.routed // 25)
        else:
            assert (g.routed, g.dropped) == (s.routed, s.dropped)
            assert torch.equal(g.load, s.load)
