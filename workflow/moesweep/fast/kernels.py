"""Grouped expert kernels (Triton): one launch per projection per precision tier.

Written by hand because this is the project's own contribution: a fused-MoE kernel whose experts may sit in
different precision tiers (bf16, or weight-only int8/int4/int2 read straight from the quantize stage's packed
files), where dropped assignments cost no weight reads. Library kernels (vLLM fused_moe, Marlin) take one weight
format per layer and have no notion of a dropped assignment.

Work layout (the vLLM / MegaBlocks "aligned blocks" scheme): the [T, k] routing assignments are sorted by expert
and each expert's run is padded to a multiple of BLOCK_M rows (`align_assignments`). A program owns one block of
BLOCK_M assignments of one expert and BLOCK_N output columns; it reads that expert's weight tile once for all its
rows. The grid is sized for the worst case so its shape never depends on the routing (graph capture, no host
sync): blocks past the end, blocks of experts outside the launch's tier, and the sentinel expert E (dropped
assignments) return at once.

Packed weights (quant/packing.py): each output row is a little-endian bit stream along the input dimension, so
byte j of a row holds input columns j*P .. j*P+P-1 (P = 8 // bits codes per byte, code i in bits i*b..). A tile of
BK input columns is BK/P bytes; the P codes of a byte are split by shifts, and code i of every byte multiplies the
activations of columns k0 + j*P + i, gathered with a stride of P. So the kernels read the stored format as it is.
Dequantisation follows quant/core.py: W = (u - zu) * s with per-(row, group) float16 scale s and uint8 zero zu
(symmetric: zu = 2**(b-1)).

Two kernels, chosen per launch by the block size (`decode_block_m`, one value for all tiers of a layer): prefill-
sized blocks (BM 16, 64) take `_grouped_expert_kernel` (tl.dot); decode blocks of 1, 2 or 4 rows take
`_grouped_expert_gemv_kernel`, which multiplies without tl.dot (whose 16-row minimum made 15 of 16 rows padding at
batch 1) and reads the same formats, with the same semantics.

Packed tiers converted to fast/lowbit.py's serving layout (lowbit.SERVING_LAYOUT, made once at load) take lowbit's
kernels instead: grouped_expert_matmul dispatches on the tier's type (lowbit.ServingTier).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..routing import routing_increments
from ..routing_spec import COUNTERS
from . import FAST_BITS


@dataclass
class ExpertTier:
    """One projection's expert weights at one precision, for the experts (slots) resident in that tier."""
    bits: int  # 16 = the checkpoint's float weights, else packed codes
    weight: torch.Tensor  # float [S, N, K] (bf16 on the GPU) or uint8 [S, N, ceil(K*bits/8)]
    scales: torch.Tensor | None  # float16 [S, N, n_groups]
    zeros: torch.Tensor | None  # [S, N, n_groups] uint8 codes or float (HQQ); None = symmetric
    group_size: int  # input columns per scale group (= K for per-channel)
    in_features: int  # K

    def __post_init__(self):
        if self.bits not in FAST_BITS:
            raise ValueError(f"the fast engine serves expert widths {FAST_BITS}; {self.bits}-bit experts need "
                             f"evaluate.engine: reference")

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]


@triton.jit
def _packed_tile(w_ptr, s_ptr, z_ptr, slot, rows, row_mask, k0, K, group_size, sw0, sw1, ss0, ss1,
                 BITS: tl.constexpr, ASYM: tl.constexpr, GROUP_CONST: tl.constexpr, PB: tl.constexpr):
    """One BK-column tile of packed rows: (codes [PB, BN] int32, scale, zero), each byte loaded once.
    GROUP_CONST: the tile lies inside one scale group, so scale and zero are one value per row ([1, BN]);
    otherwise they are gathered per (column, row) ([PB, BN]) by the caller for every code position."""
    P: tl.constexpr = 8 // BITS
    jb = tl.arange(0, PB)
    byte = k0 // P + jb
    mask = row_mask[None, :] & (byte[:, None] * P < K)
    codes = tl.load(w_ptr + slot * sw0 + rows[None, :] * sw1 + byte[:, None], mask=mask, other=0).to(tl.int32)
    if GROUP_CONST:
        group = slot * ss0 + rows[None, :] * ss1 + k0 // group_size
        scale = tl.load(s_ptr + group, mask=row_mask[None, :], other=0.0).to(tl.float32)
        if ASYM:  # uint8 zero codes (GPTQ/RTN) or float zeros (HQQ) alike
            zero = tl.load(z_ptr + group, mask=row_mask[None, :], other=0).to(tl.float32)
        else:
            zero = scale * 0.0 + (1 << (BITS - 1)) * 1.0
    else:
        scale = tl.zeros((PB, 1), dtype=tl.float32)
        zero = tl.zeros((PB, 1), dtype=tl.float32)
    return codes, scale, zero


@triton.jit
def _dequant(x_ptr, codes, scale, zero, s_ptr, z_ptr, slot, rows, row_mask, kk, K, group_size, ss0, ss1,
             SUB: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr, GROUP_CONST: tl.constexpr):
    """Code SUB of every byte of the tile, dequantised to the activations' dtype: (u - z) * s (quant/core.py)."""
    q = ((codes >> (SUB * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    if not GROUP_CONST:
        mask = row_mask[None, :] & (kk[:, None] < K)
        group = slot * ss0 + rows[None, :] * ss1 + (kk // group_size)[:, None]
        scale = tl.load(s_ptr + group, mask=mask, other=0.0).to(tl.float32)
        if ASYM:
            zero = tl.load(z_ptr + group, mask=mask, other=0).to(tl.float32)
        else:
            zero = tl.zeros_like(scale) + (1 << (BITS - 1)) * 1.0
    return ((q - zero) * scale).to(x_ptr.dtype.element_ty)  # masked rows: scale 0 -> weight 0


@triton.jit
def _block_slot(block_expert_ptr, slot_ptr, pid_m, num_experts):
    """The weight slot of block pid_m's expert in this launch's tier, or -1: the block is past the last one or
    holds dropped assignments (sentinel expert E), or its expert is served by another tier's launch."""
    expert = tl.load(block_expert_ptr + pid_m)
    return tl.where(expert < num_experts, tl.load(slot_ptr + tl.minimum(expert, num_experts - 1)), -1)


@triton.jit
def _grouped_expert_kernel(x_ptr, out_ptr, assign_ptr, block_expert_ptr, slot_ptr, routed_weight_ptr,
                           w_ptr, s_ptr, z_ptr, num_assign, x_row_div, N, K, group_size, num_experts,
                           sx, so, sw0, sw1, ss0, ss1,
                           BITS: tl.constexpr, ASYM: tl.constexpr, GROUP_CONST: tl.constexpr, GATE_UP: tl.constexpr,
                           ROUTED_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           ROWS: tl.constexpr):
    # ROWS <= BM: the rows of an aligned block; fewer than BM (tl.dot's 16-row minimum) when decode aligned the
    # assignments to small blocks for the GEMV kernel of another tier (the rest of the tile is padding)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = _block_slot(block_expert_ptr, slot_ptr, pid_m, num_experts)
    if slot < 0:
        return
    r = tl.arange(0, BM)
    assign = tl.load(assign_ptr + pid_m * ROWS + r, mask=r < ROWS, other=num_assign)
    m_mask = assign < num_assign
    x_row = tl.where(m_mask, assign // x_row_div, 0)
    rows = pid_n * BN + tl.arange(0, BN)
    n_mask = rows < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    if BITS == 16:
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + x_row[:, None] * sx + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
            w_mask = n_mask[None, :] & (kk[:, None] < K)
            w = tl.load(w_ptr + slot * sw0 + rows[None, :] * sw1 + kk[:, None], mask=w_mask, other=0.0)
            acc = tl.dot(a, w, acc)
            if GATE_UP:  # gate_up_proj stacks the gate rows [0, N) over the up rows [N, 2N)
                w = tl.load(w_ptr + slot * sw0 + (rows + N)[None, :] * sw1 + kk[:, None], mask=w_mask, other=0.0)
                acc_up = tl.dot(a, w, acc_up)
    else:
        P: tl.constexpr = 8 // BITS
        PB: tl.constexpr = BK // P
        jb = tl.arange(0, PB)
        for k0 in range(0, K, BK):
            codes, scale, zero = _packed_tile(w_ptr, s_ptr, z_ptr, slot, rows, n_mask, k0, K, group_size, sw0,
                                              sw1, ss0, ss1, BITS, ASYM, GROUP_CONST, PB)
            if GATE_UP:
                codes_up, scale_up, zero_up = _packed_tile(w_ptr, s_ptr, z_ptr, slot, rows + N, n_mask, k0, K,
                                                           group_size, sw0, sw1, ss0, ss1, BITS, ASYM, GROUP_CONST, PB)
            for sub in tl.static_range(P):
                kk = k0 + jb * P + sub  # code `sub` of byte j is input column k0 + j*P + sub
                a = tl.load(x_ptr + x_row[:, None] * sx + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K),
                            other=0.0)
                w = _dequant(x_ptr, codes, scale, zero, s_ptr, z_ptr, slot, rows, n_mask, kk, K, group_size, ss0, ss1,
                             sub, BITS, ASYM, GROUP_CONST)
                acc = tl.dot(a, w, acc)
                if GATE_UP:
                    w = _dequant(x_ptr, codes_up, scale_up, zero_up, s_ptr, z_ptr, slot, rows + N, n_mask, kk, K,
                                 group_size, ss0, ss1, sub, BITS, ASYM, GROUP_CONST)
                    acc_up = tl.dot(a, w, acc_up)
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, the Qwen3-MoE expert activation
    if ROUTED_WEIGHT:
        acc = acc * tl.load(routed_weight_ptr + assign, mask=m_mask, other=0.0)[:, None]
    tl.store(out_ptr + assign[:, None] * so + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_expert_gemv_kernel(x_ptr, out_ptr, assign_ptr, block_expert_ptr, slot_ptr, routed_weight_ptr,
                                w_ptr, s_ptr, z_ptr, num_assign, x_row_div, N, K, num_experts,
                                sx, so, sw0, sw1, ss0, ss1,
                                BITS: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr,
                                GROUP_CONST: tl.constexpr, GATE_UP: tl.constexpr, ROUTED_WEIGHT: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, GK: tl.constexpr, UNROLL: tl.constexpr,
                                EVEN_K: tl.constexpr):
    """The decode path of _grouped_expert_kernel (same arguments and semantics; BM < 16 rows per block): no
    tl.dot, whose 16-row minimum made 15 of 16 rows padding at batch 1 and whose operand layout costs a
    shared-memory round trip of every dequantised weight. The weight tile [BN, GK] is loaded with K contiguous
    (packed rows: GK / P bytes per row, each byte loaded once), dequantised once in registers per subtile of GK
    columns, and multiplied with each of the block's BM activation rows by broadcasting; the products accumulate
    elementwise in a [BM, BN, GK / P] float32 tile that is summed over K once, after the loop (no reductions in
    the loop). A loop iteration covers UNROLL subtiles (loads of all of them in flight at once).

    Packed widths: code i of byte j is column j*P + i, so the activations [BM, GK] are loaded contiguously and
    split in registers into P column planes (plane i = columns j*P + i) that pair with code i of every byte.
    GROUP_CONST: every subtile lies inside one scale group (GK divides GROUP, or GROUP >= K), so the scale and zero
    are one value per row and subtile; otherwise they are gathered per column. EVEN_K: K is a multiple of
    GK * UNROLL (no column masks). Rows past N and padding rows read valid rows (N - 1, activations row 0) instead
    of masking the loads; their results are never stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = _block_slot(block_expert_ptr, slot_ptr, pid_m, num_experts)
    if slot < 0:
        return
    P: tl.constexpr = 8 // BITS if BITS < 16 else 1
    PB: tl.constexpr = GK // P  # bytes (16 bit: columns) of a weight row in one subtile
    TOP: tl.constexpr = 23 - BITS if BITS < 16 else 0  # a code's place in a float32 mantissa
    CODE: tl.constexpr = ((1 << BITS) - 1) << TOP if BITS < 16 else 0
    assign = tl.load(assign_ptr + pid_m * BM + tl.arange(0, BM))
    m_mask = assign < num_assign
    x_base = x_ptr + tl.where(m_mask, assign // x_row_div, 0)[:, None].to(tl.int64) * sx  # [BM, 1]
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)[None, :, None]  # [1, BN, 1]
    w_base = w_ptr + slot.to(tl.int64) * sw0 + rows * sw1
    up_base = w_base + N * sw1  # gate_up_proj stacks the gate rows [0, N) over the up rows [N, 2N)
    s_base = slot * ss0 + rows * ss1
    jb = tl.arange(0, PB)[None, None, :]
    kx = tl.arange(0, GK)[None, :]
    acc = tl.zeros((BM, BN, PB), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN, PB), dtype=tl.float32)
    for k0 in range(0, K, GK * UNROLL):
        for u in tl.static_range(UNROLL):
            kt = k0 + u * GK
            if EVEN_K:
                a = tl.load(x_base + kt + kx).to(tl.float32)  # [BM, GK]
            else:
                a = tl.load(x_base + kt + kx, mask=kt + kx < K, other=0.0).to(tl.float32)
            if BITS == 16:
                if EVEN_K:
                    w = tl.load(w_base + kt + jb)
                    if GATE_UP:
                        w_up = tl.load(up_base + kt + jb)
                else:
                    w = tl.load(w_base + kt + jb, mask=kt + jb < K, other=0.0)
                    if GATE_UP:
                        w_up = tl.load(up_base + kt + jb, mask=kt + jb < K, other=0.0)
                acc += w.to(tl.float32) * a[:, None, :]
                if GATE_UP:
                    acc_up += w_up.to(tl.float32) * a[:, None, :]
            else:
                byte = kt // P + jb
                if EVEN_K:
                    wb = tl.load(w_base + byte).to(tl.int32)
                    if GATE_UP:
                        wb_up = tl.load(up_base + byte).to(tl.int32)
                else:
                    wb = tl.load(w_base + byte, mask=byte * P < K, other=0).to(tl.int32)
                    if GATE_UP:
                        wb_up = tl.load(up_base + byte, mask=byte * P < K, other=0).to(tl.int32)
                if GROUP_CONST:
                    if EVEN_K:
                        group = s_base + kt // GROUP  # [1, BN, 1]
                    else:  # the last iteration may hold subtiles past K (their activations are 0)
                        group = s_base + tl.minimum(kt, K - 1) // GROUP
                if P == 1:
                    a0 = a
                elif P == 2:
                    a0, a1 = tl.split(tl.reshape(a, (BM, PB, 2)))
                else:  # [m, j, h, l] = column j*4 + 2h + l
                    a02, a13 = tl.split(tl.reshape(a, (BM, PB, 2, 2)))
                    a0, a2 = tl.split(a02)
                    a1, a3 = tl.split(a13)
                for sub in tl.static_range(P):
                    if sub == 0:
                        plane = a0[:, None, :]
                    elif sub == 1:
                        plane = a1[:, None, :]
                    elif sub == 2:
                        plane = a2[:, None, :]
                    else:
                        plane = a3[:, None, :]
                    if not GROUP_CONST:
                        group = s_base + tl.minimum(kt + jb * P + sub, K - 1) // GROUP  # [1, BN, PB]
                    if sub == 0 or not GROUP_CONST:
                        # w = fma(1 + u * 2**-BITS, s * 2**BITS, -(2**BITS + z) * s) = (u - z) * s (quant/core.py)
                        scale = tl.load(s_ptr + group).to(tl.float32)
                        if ASYM:  # uint8 zero codes (GPTQ/RTN) or float zeros (HQQ) alike
                            zero = tl.load(z_ptr + group).to(tl.float32)
                        else:
                            zero = (1 << (BITS - 1)) * 1.0
                        s2, c = scale * (1 << BITS), -((1 << BITS) + zero) * scale
                        if GATE_UP:
                            scale = tl.load(s_ptr + group + N * ss1).to(tl.float32)
                            if ASYM:
                                zero = tl.load(z_ptr + group + N * ss1).to(tl.float32)
                            s2_up, c_up = scale * (1 << BITS), -((1 << BITS) + zero) * scale
                    # code `sub` of every byte as the float 1 + u * 2**-BITS, exactly: shifted to the top of the
                    # mantissa and or-ed with the exponent of 1.0 (two integer ops; int->float is quarter rate)
                    f = (((wb << (TOP - sub * BITS)) & CODE) | 0x3F800000).to(tl.float32, bitcast=True)
                    acc += tl.fma(f, s2, c) * plane
                    if GATE_UP:
                        f = (((wb_up << (TOP - sub * BITS)) & CODE) | 0x3F800000).to(tl.float32, bitcast=True)
                        acc_up += tl.fma(f, s2_up, c_up) * plane
    acc = tl.sum(acc, axis=2)
    assign = tl.load(assign_ptr + pid_m * BM + tl.arange(0, BM))  # 2-D from here: [BM, BN]
    m_mask = assign < num_assign
    cols = pid_n * BN + tl.arange(0, BN)
    if GATE_UP:
        acc_up = tl.sum(acc_up, axis=2)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up
    if ROUTED_WEIGHT:
        acc = acc * tl.load(routed_weight_ptr + assign, mask=m_mask, other=0.0)[:, None]
    tl.store(out_ptr + assign[:, None] * so + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (cols < N)[None, :])


@triton.jit
def _grouped_expert_gemv_row_kernel(x_ptr, out_ptr, assign_ptr, block_expert_ptr, slot_ptr, routed_weight_ptr, w_ptr,
                                    num_assign, x_row_div, N, K, num_experts, sx, so, sw0, sw1,
                                    GATE_UP: tl.constexpr, ROUTED_WEIGHT: tl.constexpr, BN: tl.constexpr,
                                    GK: tl.constexpr, UNROLL: tl.constexpr, EVEN_K: tl.constexpr):
    """16-bit experts in blocks of one row (batch 1: one assignment per hit expert), as _grouped_expert_gemv_kernel
    with BM = 1 but 2-D: [BN, GK] weight tiles times the activations [GK] broadcast along the rows, float32
    products accumulated elementwise and summed over K after the loop. On the H200 it reads a layer's bf16 experts
    in 23.9 µs where the tl.dot kernel over a 16-row tile took 27.0 (results/nvidia-h200/profile_decode_step.md).
    Packed widths stay on the general kernel: a 2-D variant that loads each code position's activations as a strided
    vector measured slower there (int4 48 vs 31 µs per layer, results/nvidia-h200/expert_kernels.md)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = _block_slot(block_expert_ptr, slot_ptr, pid_m, num_experts)
    assign = tl.load(assign_ptr + pid_m)
    if (slot < 0) | (assign >= num_assign):
        return
    x_row = x_ptr + (assign // x_row_div).to(tl.int64) * sx
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)[:, None]  # [BN, 1]; rows past N are never stored
    w_base = w_ptr + slot.to(tl.int64) * sw0 + rows * sw1
    up_base = w_base + N * sw1  # gate_up_proj stacks the gate rows [0, N) over the up rows [N, 2N)
    kk = tl.arange(0, GK)[None, :]
    acc = tl.zeros((BN, GK), dtype=tl.float32)
    acc_up = tl.zeros((BN, GK), dtype=tl.float32)
    for k0 in range(0, K, GK * UNROLL):
        for u in tl.static_range(UNROLL):
            kt = k0 + u * GK
            if EVEN_K:
                a = tl.load(x_row + kt + kk).to(tl.float32)
                w = tl.load(w_base + kt + kk)
                if GATE_UP:
                    w_up = tl.load(up_base + kt + kk)
            else:
                a = tl.load(x_row + kt + kk, mask=kt + kk < K, other=0.0).to(tl.float32)
                w = tl.load(w_base + kt + kk, mask=kt + kk < K, other=0.0)
                if GATE_UP:
                    w_up = tl.load(up_base + kt + kk, mask=kt + kk < K, other=0.0)
            acc += w.to(tl.float32) * a
            if GATE_UP:
                acc_up += w_up.to(tl.float32) * a
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.sum(acc, axis=1)
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * tl.sum(acc_up, axis=1)  # silu(gate) * up
    if ROUTED_WEIGHT:
        acc = acc * tl.load(routed_weight_ptr + assign)
    tl.store(out_ptr + assign.to(tl.int64) * so + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def aligned_blocks(expert, assign, n, num_experts, capacity, max_blocks, sorted_ptr, block_expert_ptr,
                   E_P2: tl.constexpr, BLOCK_M: tl.constexpr, FILL: tl.constexpr, BLOCKS: tl.constexpr):
    """align_assignments' outputs written by one program: expert [N] of each assignment (num_experts: dropped or no
    assignment), assign [N] the flat index stored for it; padding rows get n. Returns (onehot [N, E_P2] int32, counts
    [E_P2]) for the caller's accounting. Every assignment's rank within its expert comes from a cumulative sum over
    the one-hot tile (stable: earlier assignments of the same expert first)."""
    e = tl.arange(0, E_P2)
    onehot = ((expert[:, None] == e[None, :]) & (e[None, :] < num_experts)).to(tl.int32)  # sentinel: no column
    counts = tl.sum(onehot, 0)
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    dest = tl.sum(onehot * (end - padded)[None, :], 1) + rank
    for c0 in range(0, capacity, FILL):  # padding rows point past the assignments
        c = c0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + c, tl.zeros((FILL,), dtype=tl.int32) + n, mask=c < capacity)
    tl.debug_barrier()  # the fill above must land before the scatter below (same addresses, other threads)
    tl.store(sorted_ptr + dest, assign, mask=expert < num_experts)
    for b0 in range(0, max_blocks, BLOCKS):  # a block's expert: how many experts' runs end at or before its start
        b = b0 + tl.arange(0, BLOCKS)
        ended = (end[None, :] <= (b * BLOCK_M)[:, None]) & (e[None, :] < num_experts)
        tl.store(block_expert_ptr + b, tl.sum(ended.to(tl.int32), 1), mask=b < max_blocks)
    return onehot, counts


# routing_spec.COUNTERS as the kernels see it: how many, a power-of-two tile holding them, and each one's slot
N_COUNTERS = tl.constexpr(len(COUNTERS))
COUNTER_SLOTS = tl.constexpr(triton.next_power_of_2(len(COUNTERS)))
_TOKENS = tl.constexpr(COUNTERS.index("tokens"))
_ROUTED = tl.constexpr(COUNTERS.index("routed"))
_DROPPED = tl.constexpr(COUNTERS.index("dropped"))
_HOT_HITS = tl.constexpr(COUNTERS.index("hot_hits"))
_DECODE_CALLS = tl.constexpr(COUNTERS.index("decode_calls"))
_DECODE_TOKENS = tl.constexpr(COUNTERS.index("decode_tokens"))
_DECODE_KEPT = tl.constexpr(COUNTERS.index("decode_kept"))
_DISTINCT = tl.constexpr(COUNTERS.index("distinct_experts_decode"))
_DISTINCT_HIGH = tl.constexpr(COUNTERS.index("distinct_high_decode"))


@triton.jit
def routing_counters(c, tokens, routed, counts, hot, DECODE: tl.constexpr):
    """routing.routing_increments' counts as an int64 vector over counter index c (routing_spec.COUNTERS order,
    entries from N_COUNTERS on 0): tokens valid, assignments the policy routed, counts [E_P2] kept per expert,
    hot [E_P2] 0/1 high-precision experts; the decode counters only for decode calls."""
    kept = tl.sum(counts, 0)
    values = tl.where(c == _TOKENS, tokens, 0) + tl.where(c == _ROUTED, routed, 0) + \
        tl.where(c == _DROPPED, routed - kept, 0) + tl.where(c == _HOT_HITS, tl.sum(counts * hot, 0), 0)
    if DECODE:
        hit = (counts > 0).to(tl.int32)
        values += tl.where(c == _DECODE_CALLS, 1, 0) + tl.where(c == _DECODE_TOKENS, tokens, 0) + \
            tl.where(c == _DECODE_KEPT, kept, 0) + tl.where(c == _DISTINCT, tl.sum(hit, 0), 0) + \
            tl.where(c == _DISTINCT_HIGH, tl.sum(hit * hot, 0), 0)
    return values.to(tl.int64)


@triton.jit
def _align_kernel(index_ptr, sorted_ptr, block_expert_ptr, n, num_experts, capacity, max_blocks,
                  valid_ptr, keep_policy_ptr, hot_ptr, hits_ptr, counts_acc_ptr, load_acc_ptr, T,
                  BLOCK_M: tl.constexpr, N_P2: tl.constexpr, E_P2: tl.constexpr, T_P2: tl.constexpr,
                  FILL: tl.constexpr, BLOCKS: tl.constexpr, ACCOUNT: tl.constexpr, HOT: tl.constexpr,
                  DECODE: tl.constexpr):
    """align_assignments for decode-sized calls in one program (the torch version is ~10 launches, which at a few
    µs each cost more than the whole layer's expert weights take to read). Every assignment's rank within its
    expert comes from a cumulative sum over a one-hot [assignments, experts] tile held in registers.
    ACCOUNT: also routing.routing_increments of this call (the per-expert counts are already here), added into
    the accumulators and the per-expert hits written out, which spares the accounting its own ~10 launches."""
    i = tl.arange(0, N_P2)
    e = tl.arange(0, E_P2)
    expert = tl.load(index_ptr + i, mask=i < n, other=num_experts).to(tl.int32)
    _, counts = aligned_blocks(expert, i, n, num_experts, capacity, max_blocks, sorted_ptr, block_expert_ptr,
                               E_P2, BLOCK_M, FILL, BLOCKS)
    if ACCOUNT:  # routing_increments, in routing_spec.COUNTERS order
        t = tl.arange(0, T_P2)
        tokens = tl.sum(tl.load(valid_ptr + t, mask=t < T, other=0).to(tl.int32), 0)
        routed = tl.sum(tl.load(keep_policy_ptr + i, mask=i < n, other=0).to(tl.int32), 0)
        if HOT:
            hot = tl.load(hot_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
        else:
            hot = tl.zeros((E_P2,), dtype=tl.int32)
        c = tl.arange(0, COUNTER_SLOTS)
        acc = tl.load(counts_acc_ptr + c, mask=c < N_COUNTERS, other=0)
        tl.store(counts_acc_ptr + c, acc + routing_counters(c, tokens, routed, counts, hot, DECODE),
                 mask=c < N_COUNTERS)
        live = e < num_experts
        tl.store(hits_ptr + e, counts.to(tl.int64), mask=live)
        tl.store(load_acc_ptr + e, tl.load(load_acc_ptr + e, mask=live, other=0) + counts.to(tl.int64), mask=live)


# one program holds a [assignments, experts] one-hot tile: up to this many elements (decode: 256 x 128)
ALIGN_TILE_LIMIT = 64 * 1024


def align_and_account(index, num_experts: int, block_m: int, valid, keep_policy, hot, counts_acc, load_acc,
                      decode: bool):
    """align_assignments, plus routing.routing_increments of the call added into counts_acc [len(COUNTERS)] and
    load_acc [E] (int64, in place); returns (sorted_assign, block_expert, hits [E]). One launch for decode-sized
    calls; otherwise the torch ops."""
    n, T = index.numel(), valid.shape[0]
    if not _one_launch(index, num_experts):
        sorted_assign, block_expert = align_assignments(index, num_experts, block_m)
        counts, hits = routing_increments(valid, keep_policy, index < num_experts, index, hot, num_experts, decode)
        counts_acc += counts
        load_acc += hits
        return sorted_assign, block_expert, hits
    hits = torch.empty(num_experts, dtype=torch.int64, device=index.device)
    # bool -> uint8 by conversion, not a view: inductor cannot lower a bool dtype view (it fuses the conversion)
    sorted_assign, block_expert = _align_launch(index, num_experts, block_m, account=(
        valid.to(torch.uint8), keep_policy.reshape(-1).to(torch.uint8),
        None if hot is None else hot.to(torch.uint8), hits, counts_acc, load_acc, T, decode))
    return sorted_assign, block_expert, hits


def aligned_blocks_tiles(rows: int, max_blocks: int, e_p2: int) -> dict:
    """aligned_blocks' chunk sizes: padding rows filled FILL at a time, blocks' experts found BLOCKS at a time (a
    [BLOCKS, E_P2] comparison tile)."""
    return {"FILL": min(1024, triton.next_power_of_2(rows)),
            "BLOCKS": max(1, min(8192 // e_p2, triton.next_power_of_2(max_blocks)))}


def aligned_sizes(n: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(blocks, rows) of the aligned layout, fixed by the call's shape: every expert may need a partial block."""
    max_blocks = triton.cdiv(n, block_m) + min(num_experts, n)
    return max_blocks, max_blocks * block_m


def _one_launch(index, num_experts: int) -> bool:
    """Whether the one-program alignment applies: a decode-sized call, on the GPU or in Triton's interpreter."""
    on_triton = index.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_triton and triton.next_power_of_2(index.numel()) * triton.next_power_of_2(num_experts) <= ALIGN_TILE_LIMIT


def _align_launch(index, num_experts: int, block_m: int, account=None):
    flat = index.reshape(-1)
    n = flat.shape[0]
    max_blocks, capacity = aligned_sizes(n, num_experts, block_m)
    sorted_assign = torch.empty(capacity, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=flat.device)
    # without accounting the kernel never touches these pointers (ACCOUNT is off): any tensor will do
    valid, keep_policy, hot, hits, counts_acc, load_acc, T, decode = account or (flat, flat, None, flat, flat, flat,
                                                                                 1, False)
    n_p2, e_p2 = triton.next_power_of_2(n), triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](flat, sorted_assign, block_expert, n, num_experts, capacity, max_blocks,
                        valid, keep_policy, hot if hot is not None else flat, hits, counts_acc, load_acc, T,
                        BLOCK_M=block_m, N_P2=n_p2, E_P2=e_p2, T_P2=triton.next_power_of_2(T),
                        **aligned_blocks_tiles(capacity, max_blocks, e_p2), ACCOUNT=account is not None, HOT=hot is not None, DECODE=decode,
                        num_warps=8 if n_p2 * e_p2 > 8192 else 4)
    return sorted_assign, block_expert


def align_assignments(index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the [T, k] assignments by expert into BLOCK_M-aligned runs (device ops, shapes fixed by T and k).

    Returns (sorted_assign int32 [max_blocks * block_m]: flat assignment index t*k + j, or T*k for padding;
    block_expert int32 [max_blocks]: the expert of each block, num_experts past the end). Dropped assignments
    (index == num_experts) get no block, so no program reads weights for them. Within an expert, assignments
    keep their flat order. Decode-sized calls take one Triton launch, prompts the torch ops below.
    """
    if _one_launch(index, num_experts):
        return _align_launch(index, num_experts, block_m)
    flat = index.reshape(-1)
    n = flat.shape[0]
    device = flat.device
    max_blocks, capacity = aligned_sizes(n, num_experts, block_m)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts[num_experts:].zero_()  # the sentinel expert owns no blocks (fill_, not a host scalar copy: graph-safe)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices
    sorted_expert = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[sorted_expert]
    dest = torch.where(sorted_expert < num_experts, (padded_end - padded)[sorted_expert] + rank, capacity)
    sorted_assign = torch.full((capacity + 1,), n, dtype=torch.int32, device=device)
    sorted_assign.scatter_(0, dest, order.to(torch.int32))  # dropped ones all land in the spare last slot
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end[:num_experts], block_start, right=True).to(torch.int32)
    return sorted_assign[:capacity], block_expert


# Tiles of the decode (GEMV) path, blocks of BM < 16 rows (tile_sizes): BN output rows per program, BK bytes of every
# weight row per loop iteration (16 bit: 2 bytes a column, int4: half a byte), num_warps. Memory-bound decode on an
# H200 (benchmarks/expert_kernels.py sweeps them; results/nvidia-h200/expert_kernels.md): blocks of one row (batch 1) take
# many small programs (BN 8, 2 warps: int4 31.1 vs 34.7 µs per layer with BN 32, 4 warps); blocks of 2 and 4 rows
# keep BN 32 with 4 warps (BN 16 gained 2 % at 8 tokens but cost the int4 engine 27 % at batch 32:
# results/nvidia-h200/fast_engine.md). Tests shrink them.
GEMV_TILES_ONE_ROW = {"BN": 8, "BK": 256, "num_warps": 2}
GEMV_TILES = {"BN": 32, "BK": 256, "num_warps": 4}
# Rows per aligned block for every launch, instead of tile_sizes' rule (None). Benchmarks set 16 for the tl.dot
# decode path that the GEMV path replaced; tests use it to give experts several blocks.
FORCE_BLOCK_M: int | None = None
DOT_MIN_BLOCK_M = 16  # tl.dot's minimum; blocks of fewer rows take the GEMV kernel (widths in GEMV_BITS)
# Widths whose small blocks take the GEMV kernel. 16- and 8-bit tiers stay on tl.dot (a 16-row tile over a block of
# fewer rows): on the H200 it was faster for them at decode (bf16 33.7 vs 40.2 µs, int8 35.7 vs 45.5 µs per layer at
# batch 1; benchmarks/results/nvidia-h200/expert_kernels.md), while int4/int2 dequantise 2x / 1.4x faster without it.
# Except 16-bit blocks of one row, which take the 2-D kernel (ROW_GEMV below).
GEMV_BITS = (4, 2)
# 16-bit tiers in one-row blocks (batch 1) take the 2-D kernel _grouped_expert_gemv_row_kernel, with ROW_GEMV_TILES
# (BN 16, BK 512 bytes, 4 warps: 27.7 µs per layer in the sweep against tl.dot's 28.9, within 3 % of the best tiles
# tried; 23.9 vs 27.0 µs in the engine's step: results/nvidia-h200/expert_kernels.md and profile_decode_step.md).
ROW_GEMV = True
ROW_GEMV_TILES = {"BN": 16, "BK": 512, "num_warps": 4}
# Tiles of the tl.dot kernel for decode-sized blocks (BM < 64): BN output rows per program, BK input columns per
# loop iteration by width (at most one scale group), num_warps, num_stages. benchmarks/expert_kernels.py sweeps them
# ("dot:BN,BK16,warps,stages"); prefill blocks (BM 64) keep BN 32 and the width's BK.
# Five stages of software pipelining keep more weight tiles in flight than Triton's default three: bf16 experts 29.1
# vs 33.6 µs per layer at batch 1, 126 vs 139 µs at 8 tokens (results/nvidia-h200/expert_kernels.md).
DOT_DECODE_TILES = {"BN": 32, "BK": {16: 64, 8: 64, 4: 128, 2: 128}, "num_warps": 4, "num_stages": 5}


def decode_block_m(num_assign: int, num_experts: int) -> int:
    """Rows per aligned block (one value for all tiers of a layer) from the mean number of rows per expert,
    lam = num_assign / num_experts (routing is near uniform; a hit expert's rows are about Poisson(lam)).

    A block reads its expert's weight tile once for all its rows, and the GEMV path spends BM multiply-adds per
    weight on padding rows as on real ones, so BM is the smallest that holds most hit experts' rows in one block;
    an expert with more rows gets several adjacent blocks, whose repeated weight reads mostly come from L2.
    lam <= 1/4 (Qwen3-30B-A3B, E 128, top-8: T <= 4; batch 1 has exactly one row per hit expert): BM 1, P(rows >= 2 |
    hit) <= 12%. lam <= 1 (T <= 16): BM 2, P(rows >= 3 | hit) <= 13%. lam <= 2 (T <= 32): BM 4, P(rows >= 5 | hit)
    <= 6%. Beyond, the tl.dot kernel: BM 16 while lam <= 4 (its decode setting before the GEMV path), 64 for
    prefill."""
    if FORCE_BLOCK_M is not None:
        return FORCE_BLOCK_M
    if 4 * num_assign <= num_experts:
        return 1
    if num_assign <= num_experts:
        return 2
    if num_assign <= 2 * num_experts:
        return 4
    return 16 if num_assign <= 4 * num_experts else 64


def tile_sizes(bits: int, num_assign: int, num_experts: int) -> tuple[int, int, int]:
    """(BM, BN, BK); BM from decode_block_m, so it never depends on `bits`.
    BM >= 16 (tl.dot kernel): BK at most 128 input columns so a tile lies inside one scale group of the usual sizes
    (128, 64 for 8 bit), and the scale and zero are loaded once per row and tile; at least 16 codes per byte
    position (tl.dot's K); decode-sized blocks (BM < 64) take DOT_DECODE_TILES. BM < 16 (GEMV kernel, widths in
    GEMV_BITS, or 16-bit one-row blocks): gemv_tiles(BM, bits), BK returned in input columns per loop
    iteration."""
    bm = decode_block_m(num_assign, num_experts)
    if bm >= 64:
        return bm, 32, {16: 64, 8: 64, 4: 128, 2: 128}[bits]
    if bm >= DOT_MIN_BLOCK_M or (bits not in GEMV_BITS and not _row_path(bm, bits)):
        return bm, DOT_DECODE_TILES["BN"], DOT_DECODE_TILES["BK"][bits]
    tiles = gemv_tiles(bm, bits)
    return bm, tiles["BN"], tiles["BK"] * 8 // bits


def gemv_tiles(bm: int, bits: int) -> dict:
    """The GEMV kernels' tiles for blocks of bm rows at this width: ROW_GEMV_TILES for the 2-D kernel (one row,
    16 bit), GEMV_TILES_ONE_ROW for the general kernel at one row, else GEMV_TILES."""
    if bm == 1:
        return ROW_GEMV_TILES if _row_path(bm, bits) else GEMV_TILES_ONE_ROW
    return GEMV_TILES


def _row_path(bm: int, bits: int) -> bool:
    """Whether blocks of bm rows at this width take the 2-D one-row kernel."""
    return ROW_GEMV and bm == 1 and bits == 16


def _gemv_tiling(tier: ExpertTier, bm: int, bn: int, bk: int, num_warps: int,
                 gate_up: bool) -> tuple[int, int, bool, bool]:
    """(GK, UNROLL, GROUP_CONST, EVEN_K) of the GEMV kernel: subtiles of GK columns (a power of two), UNROLL of
    them per loop iteration, at most bk columns in all."""
    K = tier.in_features
    p = 8 // tier.bits if tier.bits < 16 else 1
    # registers: a thread holds the activations of its columns for every row of the block, BM * BN * GK / threads
    # floats (one weight row a thread), at most 64, and the [BM, BN, GK / P] accumulators (two for gate_up), at most
    # 32 each
    budget = 32 * num_warps * min(64, 32 * p) // (bm * bn)
    gk = max(p, _pow2_floor(min(bk, budget)))
    gk = min(gk, triton.next_power_of_2(K))
    group_const = True
    if tier.bits < 16 and tier.group_size < K:
        low = tier.group_size & -tier.group_size  # the largest power of two that divides the group size
        if low >= p:
            gk = min(gk, low)  # then every subtile lies inside one group (ragged last group too)
        else:
            group_const = False  # scale and zero gathered per column
    steps = triton.cdiv(K, gk)
    # weight bytes a thread has in flight per iteration (both halves of gate_up) at most 128, 32 registers
    row_bytes = bn * (gk // p) * (2 if tier.bits == 16 else 1) * (2 if gate_up else 1)
    unroll = max(1, min(bk // gk, steps, 128 * 32 * num_warps // row_bytes))
    if K % gk == 0:  # as many subtiles as fit, dividing K: no column masks
        unroll = max(d for d in range(1, unroll + 1) if steps % d == 0)
    return gk, unroll, group_const, K % (gk * unroll) == 0


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def grouped_expert_matmul(x: torch.Tensor, out: torch.Tensor, sorted_assign: torch.Tensor, block_expert: torch.Tensor,
                          slot_of_expert: torch.Tensor, tier: ExpertTier, x_row_div: int, block_m: int,
                          routed_weight: torch.Tensor | None = None, gate_up: bool = False) -> None:
    """out[a] = x[a // x_row_div] @ W[expert(a)]^T for the assignments a of this tier's experts (in place).

    gate_up=True: W is gate_up_proj [2N, K] and out[a] = silu(gate) * up ([N] columns).
    routed_weight [A] (float32): multiplies each assignment's row (the down projection).
    slot_of_expert int32 [E]: the expert's slot in `tier`, -1 when another tier serves it.
    Blocks of BM < 16 rows (decode) take the GEMV kernel for widths in GEMV_BITS, all others the tl.dot one.
    """
    n_out = tier.out_features // 2 if gate_up else tier.out_features
    bm, bn, bk = tile_sizes(tier.bits, out.shape[0], slot_of_expert.shape[0])
    if bm != block_m:
        raise ValueError(f"assignments were aligned to blocks of {block_m}, the kernel uses {bm}")
    from .lowbit import ServingTier, serving_matmul  # lowbit imports this module
    if isinstance(tier, ServingTier):  # packed experts in the serving layout: lowbit's kernels
        serving_matmul(x, out, sorted_assign, block_expert, slot_of_expert, tier, x_row_div, block_m, routed_weight,
                       gate_up)
        return
    w = tier.weight
    scales = tier.scales if tier.scales is not None else w
    zeros = tier.zeros if tier.zeros is not None else w
    grid = (block_expert.shape[0], triton.cdiv(n_out, bn))
    row = _row_path(bm, tier.bits)
    if bm < DOT_MIN_BLOCK_M and (tier.bits in GEMV_BITS or row):
        num_warps = gemv_tiles(bm, tier.bits)["num_warps"]
        gk, unroll, group_const, even_k = _gemv_tiling(tier, bm, bn, bk, num_warps, gate_up)
        if row:
            _grouped_expert_gemv_row_kernel[grid](
                x, out, sorted_assign, block_expert, slot_of_expert, routed_weight if routed_weight is not None else x,
                w, out.shape[0], x_row_div, n_out, tier.in_features, slot_of_expert.shape[0], x.stride(0),
                out.stride(0), w.stride(0), w.stride(1), GATE_UP=gate_up, ROUTED_WEIGHT=routed_weight is not None,
                BN=bn, GK=gk, UNROLL=unroll, EVEN_K=even_k, num_warps=num_warps)
            return
        _grouped_expert_gemv_kernel[grid](
            x, out, sorted_assign, block_expert, slot_of_expert, routed_weight if routed_weight is not None else x,
            w, scales, zeros, out.shape[0], x_row_div, n_out, tier.in_features, slot_of_expert.shape[0],
            x.stride(0), out.stride(0), w.stride(0), w.stride(1), scales.stride(0), scales.stride(1),
            BITS=tier.bits, ASYM=tier.zeros is not None, GROUP=tier.group_size if tier.bits != 16 else 0,
            GROUP_CONST=group_const, GATE_UP=gate_up, ROUTED_WEIGHT=routed_weight is not None, BM=bm, BN=bn,
            GK=gk, UNROLL=unroll, EVEN_K=even_k, num_warps=num_warps)
        return
    _grouped_expert_kernel[grid](
        x, out, sorted_assign, block_expert, slot_of_expert, routed_weight if routed_weight is not None else x,
        w, scales, zeros, out.shape[0], x_row_div, n_out, tier.in_features, tier.group_size,
        slot_of_expert.shape[0], x.stride(0), out.stride(0), w.stride(0), w.stride(1), scales.stride(0),
        scales.stride(1), BITS=tier.bits, ASYM=tier.zeros is not None, GATE_UP=gate_up,
        GROUP_CONST=tier.bits != 16 and tier.group_size % bk == 0,
        ROUTED_WEIGHT=routed_weight is not None, BM=max(bm, DOT_MIN_BLOCK_M), BN=bn, BK=bk, ROWS=bm,
        **({} if bm >= 64 else {k: DOT_DECODE_TILES[k] for k in ("num_warps", "num_stages")}))
