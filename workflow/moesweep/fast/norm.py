"""Residual add + RMSNorm of a decode step in one launch (Triton), optionally with the router logits.

Written by hand because at decode these are a few KB of work each, and the compiled torch glue spent two launches
on each (the sum of the previous layer's expert outputs, then the norm; the o-projection's partial sums with the
norm, then the router GEMV): ~1.5-2 µs of launch latency apiece, 48 times a step
(benchmarks/results/nvidia-h200/profile_decode_step.md).

Arithmetic as the torch glue (engine._add_expert_outputs, engine._rms_norm, engine._post_attention): the addends
summed in float32 and rounded once to x's dtype, added to x and rounded; the norm's statistics in float32, the
normalised row rounded to x's dtype and then scaled by the weight in that dtype; router logits as float32 sums of
products, rounded to x's dtype. Only the order of the float32 additions differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUTER_ROWS = 8  # router rows per program of the logits launch
MAX_LOGIT_ROWS = 4  # rows of x up to which the router logits join the launch (every program re-normalises each row)


@triton.jit
def _residual_norm_kernel(x_ptr, add_ptr, norm_w_ptr, router_ptr, x_out_ptr, h_out_ptr, logits_ptr,
                          B, H, E, adds, s_add_row, s_add_part, eps,
                          ADDS_P2: tl.constexpr, BLOCK_H: tl.constexpr, RB: tl.constexpr, LOGITS: tl.constexpr):
    # LOGITS: program p computes router rows [p*RB, (p+1)*RB) for every row of x, re-normalising each row (a few KB
    # from L2) rather than waiting for another launch; program 0 writes x and h. Else: program b normalises row b.
    pid = tl.program_id(0)
    dt = x_out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    w = tl.load(norm_w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if LOGITS:
        erows = pid * RB + tl.arange(0, RB)
        router = tl.load(router_ptr + tl.minimum(erows, E - 1)[:, None] * H + cols[None, :], mask=cm[None, :],
                         other=0.0).to(tl.float32)
        first, last, stored = 0, B, tl.where(pid == 0, H, 0)  # columns written: all by program 0, else none
    else:
        first, last, stored = pid, pid + 1, H
    for b in range(first, last):
        x = tl.load(x_ptr + b * H + cols, mask=cm, other=0.0).to(tl.float32)
        if ADDS_P2 > 0:  # all addends in one [adds, H] load (a loop over them was a chain of dependent loads: 4 µs)
            a = tl.arange(0, ADDS_P2)[:, None]
            acc = tl.sum(tl.load(add_ptr + b * s_add_row + a * s_add_part + cols[None, :],
                                 mask=(a < adds) & cm[None, :], other=0.0).to(tl.float32), 0)
        else:
            acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        x = (x + acc.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
        h = (w * (x * inv).to(dt).to(tl.float32)).to(dt)
        tl.store(x_out_ptr + b * H + cols, x.to(dt), mask=cols < stored)
        tl.store(h_out_ptr + b * H + cols, h, mask=cols < stored)
        if LOGITS:
            logits = tl.sum(router * h.to(tl.float32)[None, :], 1)
            tl.store(logits_ptr + b * E + erows, logits.to(dt), mask=erows < E)


def _warps(rows: int, block_h: int) -> int:
    """Warps for [rows, block_h] tiles at about 64 elements a thread."""
    return min(16, max(4, triton.next_power_of_2(rows * block_h // (64 * 32))))


def residual_rms_norm(x: torch.Tensor, add: torch.Tensor | None, adds_per_row: int, norm_weight: torch.Tensor,
                      eps: float, router: torch.Tensor | None = None):
    """x [B, H] plus the sum of its addends, then RMSNorm: returns (x', h) or, with router [E, H], (x', h, logits).

    add: None (nothing to add), the previous layer's routed expert outputs float32 [B * adds_per_row, H] (row b's
    are rows b*k .. b*k + k - 1), or split-K partial sums float32 [adds_per_row, B, H] (gemv.dense_gemv)."""
    B, H = x.shape
    if x.stride(1) != 1 or x.stride(0) != H:
        x = x.contiguous()
    x_out, h = torch.empty_like(x), torch.empty_like(x)
    if add is None:
        add, adds, s_row, s_part = x, 0, 0, 0
    elif add.dim() == 3:  # [S, B, H] partial sums
        adds, s_row, s_part = add.shape[0], add.stride(1), add.stride(0)
    else:  # [B * k, H] expert rows
        adds, s_row, s_part = adds_per_row, adds_per_row * add.stride(0), add.stride(0)
    block_h = triton.next_power_of_2(H)
    adds_p2 = triton.next_power_of_2(adds) if adds else 0
    if router is None:
        _residual_norm_kernel[(B,)](x, add, norm_weight, x, x_out, h, x, B, H, 0, adds, s_row, s_part, eps,
                                    ADDS_P2=adds_p2, BLOCK_H=block_h, RB=1, LOGITS=False, num_warps=_warps(adds, block_h))
        return x_out, h
    if B > MAX_LOGIT_ROWS:
        raise ValueError(f"residual_rms_norm computes router logits for up to {MAX_LOGIT_ROWS} rows; got {B}")
    E = router.shape[0]
    logits = torch.empty(B, E, dtype=x.dtype, device=x.device)
    _residual_norm_kernel[(triton.cdiv(E, ROUTER_ROWS),)](
        x, add, norm_weight, router, x_out, h, logits, B, H, E, adds, s_row, s_part, eps,
        ADDS_P2=adds_p2, BLOCK_H=block_h, RB=ROUTER_ROWS, LOGITS=True, num_warps=_warps(max(adds, ROUTER_ROWS), block_h))
    return x_out, h, logits
