"""The serving layout of packed experts (fast/lowbit.py) and its kernels against the dequantised float reference.

Every width, zero kind (integer zeros, HQQ float zeros, symmetric) and group size (32, 64, 16, per channel), on fresh
random inputs, with outputs prefilled with NaN (every routed row written, nothing else). On the CPU they run in
Triton's interpreter in float32; on CUDA compiled in bf16, held to bf16 tolerances (test_fast_kernels' TOL).
"""
import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from test_fast_kernels import (DEVICE, DTYPE, E, H, I, TOL, _quantized, _reference, _relative,  # noqa: E402
                               _routing, _run)

from moesweep.fast import kernels, lowbit  # noqa: E402
from moesweep.fast.kernels import align_assignments, grouped_expert_matmul  # noqa: E402
from moesweep.fast.moe import quantized_tier  # noqa: E402
from moesweep.quant import dequantize  # noqa: E402

ZEROS = ["asym", "sym", "hqq"]
GROUPS = [32, 64, 16, -1]
# (T, k, forced block_m): the paths a decode or prefill call takes (E = 8): one row per block (batch 1), blocks of 2
# with experts spanning several blocks, blocks of 4, and the tl.dot kernel (blocks of 16)
PATHS = {"bm1": (1, 2, None), "bm2-multiblock": (6, 3, 2), "bm4": (4, 4, None), "dot-bm16": (6, 3, None)}


def _tiers(q_gu, q_dn):
    tiers = [quantized_tier(q, DEVICE, serving=True) for q in (q_gu, q_dn)]
    assert all(isinstance(t, lowbit.ServingTier) for t in tiers)
    return tiers


def test_serving_layout_round_trips_the_codes():
    """Word j of row n in tile t holds, in slot i, the code of column t*GK + i*W + j (zero past K)."""
    for bits in (8, 4, 2):
        _, _, (q, _) = _quantized(bits, 32, "asym")
        tier = quantized_tier(q, "cpu", serving=True)
        words = tier.weight  # [S, KT, N, W]
        S, KT, N, W = words.shape
        c = 32 // bits
        slots = torch.stack([(words >> (i * bits)) & ((1 << bits) - 1) for i in range(c)], 3)  # [S, KT, N, c, W]
        cols = slots.permute(0, 2, 1, 3, 4).reshape(S, N, KT * c * W)
        codes = ((q.codes[..., None].int() >> (torch.arange(8 // bits) * bits)) & ((1 << bits) - 1)).reshape(S, N, -1)
        assert torch.equal(cols[..., :H], codes[..., :H])
        assert not cols[..., H:].any()
        meta = tier.scales  # [S, NG, N, 2]
        assert torch.equal(meta[:, :2, :, 0].permute(0, 2, 1), q.scales)
        assert torch.equal(meta[:, :2, :, 1].permute(0, 2, 1), q.zeros.half())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("zeros", ZEROS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_serving_kernels_match_dequantised_reference(bits, zeros, group_size, path, monkeypatch):
    """Each launch alone (gate_up, then down) on one tier serving half the experts, outputs prefilled with NaN: every
    routed row of those experts holds its result, rows of dropped assignments and other experts stay untouched."""
    if DEVICE == "cuda" and path in ("bm4", "dot-bm16") and group_size in (64, 16):
        pytest.skip("GPU compile time: blocks of 1 and 2 rows cover this group size, 4 and 16 rows groups 32 and -1")
    T, k, forced = PATHS[path]
    monkeypatch.setattr(kernels, "FORCE_BLOCK_M", forced)
    gate_up, down, (q_gu, q_dn) = _quantized(bits, group_size, zeros, seed=bits + group_size)
    gu_tier, dn_tier = _tiers(q_gu, q_dn)
    ref_gu, ref_dn = dequantize(q_gu, DTYPE).float(), dequantize(q_dn, DTYPE).float()
    index, weights = _routing(T, k, seed=7 + bits)
    flat = index.flatten()
    mine = torch.zeros(E, dtype=torch.bool)  # the experts of every other routed assignment
    mine[flat[flat < E][::2]] = True
    slots = torch.where(mine, torch.arange(E), -1).to(torch.int32).to(DEVICE)
    block_m = kernels.decode_block_m(T * k, E)
    sorted_assign, block_expert = align_assignments(index.to(DEVICE), E, block_m)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(11)).to(DTYPE)
    h = torch.full((T * k, I), float("nan"), device=DEVICE, dtype=DTYPE)
    grouped_expert_matmul(x.to(DEVICE), h, sorted_assign, block_expert, slots, gu_tier, k, block_m, gate_up=True)
    live = (flat < E) & mine[flat.clamp(max=E - 1)]
    assert live.any() and (~live).any()
    h_in = torch.randn(T * k, I, generator=torch.Generator().manual_seed(12)).to(DTYPE)
    y = torch.full((T * k, H), float("nan"), device=DEVICE, dtype=torch.float32)
    rw = weights.reshape(-1).float()
    grouped_expert_matmul(h_in.to(DEVICE), y, sorted_assign, block_expert, slots, dn_tier, 1, block_m,
                          routed_weight=rw.to(DEVICE))
    h, y = h.float().cpu(), y.cpu()
    for a in range(T * k):
        if not live[a]:
            assert h[a].isnan().all() and y[a].isnan().all(), f"assignment {a} must not be written"
            continue
        e = int(flat[a])
        g, u = (x[a // k].double() @ ref_gu[e].double().T).chunk(2)
        assert not h[a].isnan().any() and _relative(h[a], F.silu(g) * u) < TOL
        want_y = float(rw[a]) * (h_in[a].double() @ ref_dn[e].double().T)
        assert not y[a].isnan().any() and _relative(y[a], want_y) < TOL


@pytest.mark.parametrize("unroll", [4, 3, 2])
@pytest.mark.parametrize("bits,group_size,zeros,hidden", [(4, 32, "asym", 512), (2, 64, "hqq", 1024),
                                                           (8, -1, "sym", 256)])
def test_unrolled_k_loop_matches_reference(bits, group_size, zeros, hidden, unroll, monkeypatch):
    """gate_up's K = hidden is 4 tiles of 16 words a row: UNROLL tiles loaded per iteration (3: a last iteration
    with 2 spare tiles past K), blocks of 1 and 2 rows."""
    monkeypatch.setattr(lowbit, "MAX_WORDS", {b: 16 for b in (8, 4, 2)})  # more tiles on a K the interpreter runs fast
    for bm in (1, 2):
        monkeypatch.setitem(lowbit.SERVING_GEMV_TILES, bm, {"BN": 16, "UNROLL": unroll, "num_warps": 4})
    monkeypatch.setattr(lowbit, "SERVING_LAYOUT", True)
    gate_up, down, (q_gu, q_dn) = _quantized(bits, group_size, zeros, seed=3, hidden=hidden)
    assert quantized_tier(q_gu, DEVICE).weight.shape[1] == 4
    for T, k in ((1, 2), (6, 3)):
        got, x, index, weights = _run(torch.full((E,), bits), {bits: (q_gu, q_dn)}, gate_up, down, T=T, k=k)
        want = _reference(x, index, weights, dequantize(q_gu, DTYPE).float(), dequantize(q_dn, DTYPE).float())
        assert torch.isfinite(got).all()
        assert _relative(got, want) < TOL


@pytest.mark.parametrize("bits,group_size", [(8, 32), (4, 64), (2, -1)])
def test_engine_layer_with_mixed_tiers_on_the_serving_layout(bits, group_size, monkeypatch):
    """FastMoeExperts with a bf16 tier and a packed tier (moe.quantized_tier under lowbit.SERVING_LAYOUT), dropped
    assignments included, against the reference layer."""
    monkeypatch.setattr(lowbit, "SERVING_LAYOUT", True)
    gate_up, down, (q_gu, q_dn) = _quantized(bits, group_size, "asym", seed=5)
    widths = torch.tensor([16, bits] * (E // 2))
    got, x, index, weights = _run(widths, {bits: (q_gu, q_dn)}, gate_up, down, T=4, k=4)
    dq_gu, dq_dn = dequantize(q_gu, DTYPE).float(), dequantize(q_dn, DTYPE).float()
    ref_gu = torch.stack([gate_up[e].to(DTYPE).float() if widths[e] == 16 else dq_gu[e] for e in range(E)])
    ref_dn = torch.stack([down[e].to(DTYPE).float() if widths[e] == 16 else dq_dn[e] for e in range(E)])
    want = _reference(x, index, weights, ref_gu, ref_dn)
    assert torch.isfinite(got).all()
    assert _relative(got, want) < TOL


def test_group_sizes_without_a_fast_layout_fall_back_and_say_so(caplog):
    """Groups of 24 columns admit no 16-word tile: the tier keeps the stored layout (the previous kernels serve it)
    and the load logs why."""
    _, _, (q, _) = _quantized(4, 24, "asym", hidden=48, inter=24)
    with caplog.at_level(logging.WARNING, logger="moesweep.fast.lowbit"):
        lowbit._logged.clear()
        tier = quantized_tier(q, DEVICE, serving=True)
    assert not isinstance(tier, lowbit.ServingTier)
    assert "group size 24" in caplog.text
