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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _grouped_expert_kernel(x_ptr, out_ptr, assign_ptr, block_expert_ptr, slot_ptr, routed_weight_ptr,
                           w_ptr, s_ptr, z_ptr, num_assign, x_row_div, N, K, group_size, num_experts,
                           sx, so, sw0, sw1, ss0, ss1,
                           BITS: tl.constexpr, ASYM: tl.constexpr, GROUP_CONST: tl.constexpr, GATE_UP: tl.constexpr,
                           ROUTED_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # past the last block, or the sentinel of dropped assignments
        return
    slot = tl.load(slot_ptr + expert)
    if slot < 0:  # this expert is served by another tier's launch
        return
    assign = tl.load(assign_ptr + pid_m * BM + tl.arange(0, BM))
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


def align_assignments(index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the [T, k] assignments by expert into BLOCK_M-aligned runs (device ops, shapes fixed by T and k).

    Returns (sorted_assign int32 [max_blocks * block_m]: flat assignment index t*k + j, or T*k for padding;
    block_expert int32 [max_blocks]: the expert of each block, num_experts past the end). Dropped assignments
    (index == num_experts) get no block, so no program reads weights for them.
    """
    flat = index.reshape(-1)
    n = flat.shape[0]
    device = flat.device
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts[num_experts:].zero_()  # the sentinel expert owns no blocks (fill_, not a host scalar copy: graph-safe)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices
    sorted_expert = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[sorted_expert]
    max_blocks = triton.cdiv(n, block_m) + min(num_experts, n)
    capacity = max_blocks * block_m
    dest = torch.where(sorted_expert < num_experts, (padded_end - padded)[sorted_expert] + rank, capacity)
    sorted_assign = torch.full((capacity + 1,), n, dtype=torch.int32, device=device)
    sorted_assign.scatter_(0, dest, order.to(torch.int32))  # dropped ones all land in the spare last slot
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end[:num_experts], block_start, right=True).to(torch.int32)
    return sorted_assign[:capacity], block_expert


def tile_sizes(bits: int, num_assign: int, num_experts: int) -> tuple[int, int, int]:
    """(BM, BN, BK). BM 16 (tl.dot's minimum) while experts see few rows each (decode), 64 for prefill.
    BK: at most 128 input columns so a tile lies inside one scale group of the usual sizes (128, 64 for 8 bit),
    and the scale and zero are loaded once per row and tile; at least 16 codes per byte position (tl.dot's K)."""
    bm = 16 if num_assign <= 4 * num_experts else 64
    bk = {16: 64, 8: 64, 4: 128, 2: 128}[bits]
    return bm, 32, bk


def grouped_expert_matmul(x: torch.Tensor, out: torch.Tensor, sorted_assign: torch.Tensor, block_expert: torch.Tensor,
                          slot_of_expert: torch.Tensor, tier: ExpertTier, x_row_div: int, block_m: int,
                          routed_weight: torch.Tensor | None = None, gate_up: bool = False) -> None:
    """out[a] = x[a // x_row_div] @ W[expert(a)]^T for the assignments a of this tier's experts (in place).

    gate_up=True: W is gate_up_proj [2N, K] and out[a] = silu(gate) * up ([N] columns).
    routed_weight [A] (float32): multiplies each assignment's row (the down projection).
    slot_of_expert int32 [E]: the expert's slot in `tier`, -1 when another tier serves it.
    """
    n_out = tier.out_features // 2 if gate_up else tier.out_features
    bm, bn, bk = tile_sizes(tier.bits, out.shape[0], slot_of_expert.shape[0])
    if bm != block_m:
        raise ValueError(f"assignments were aligned to blocks of {block_m}, the kernel uses {bm}")
    w = tier.weight
    scales = tier.scales if tier.scales is not None else w
    zeros = tier.zeros if tier.zeros is not None else w
    grid = (block_expert.shape[0], triton.cdiv(n_out, bn))
    _grouped_expert_kernel[grid](
        x, out, sorted_assign, block_expert, slot_of_expert, routed_weight if routed_weight is not None else x,
        w, scales, zeros, out.shape[0], x_row_div, n_out, tier.in_features, tier.group_size,
        slot_of_expert.shape[0], x.stride(0), out.stride(0), w.stride(0), w.stride(1), scales.stride(0),
        scales.stride(1), BITS=tier.bits, ASYM=tier.zeros is not None, GATE_UP=gate_up,
        GROUP_CONST=tier.bits != 16 and tier.group_size % bk == 0,
        ROUTED_WEIGHT=routed_weight is not None, BM=bm, BN=bn, BK=bk)
