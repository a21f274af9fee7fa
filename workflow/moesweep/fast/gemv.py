"""Dense decode GEMV (Triton) for the attention projections of a decode step: out = x @ W^T for a few rows of x.

Written by hand because at batch 1 the q/k/v and o projections are matrix-vector products, memory-bound, and
cuBLAS read their weights at ~2.3 TB/s on the H200 (60 % of the copy bandwidth), the o-projection as a split-K
GEMM plus a separate reduction launch (benchmarks/results/nvidia-h200/profile_decode_step.md). Here a program owns BN
weight rows and one slice of the input columns, reads its [BN, BK] weight tiles once and multiplies them with
every row of x by broadcasting; products accumulate elementwise in float32 (one [BN, BK] tile per row of x) and
are summed over the columns once, after the loop (no reduction inside it).

Split-K (`split_k`) gives a short-and-wide projection (o_proj: 2048 rows) enough programs to fill the GPU: each
slice writes its float32 partial sums, and the caller adds the slices inside the glue that consumes them (the
engine's residual add, which inductor fuses), so no extra launch. Either way the sum is float32 and rounded once
at the end, as cuBLAS does; only the order of the additions differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles: BN weight rows per program, BK columns per loop iteration, warps (benchmarks/decode_gemv.py sweeps them, passing
# each as `tiles`). DENSE_GEMV_TILES: the default of callers that do not choose; the engine's are measured on the
# H200 at one row (results/nvidia-h200/decode_gemv.md): q/k/v [5120, 2048] 7.3 µs with QKV_TILES, cuBLAS 8.0;
# o_proj [2048, 4096] in 4 slices 5.9 µs with O_PROJ_TILES, cuBLAS 9.3 (its split-K GEMM and reduction launch).
DENSE_GEMV_TILES = {"BN": 16, "BK": 256, "num_warps": 4}
QKV_TILES = {"BN": 8, "BK": 512, "num_warps": 4}
O_PROJ_TILES = {"BN": 8, "BK": 256, "num_warps": 4}
MAX_ROWS = 4  # rows of x the kernel takes (one accumulator tile each)
# Rows up to which the decode step takes this kernel instead of cuBLAS: measured faster for both projections at one
# row; at two only the o-projection was (7.2 vs 9.4 µs; q/k/v 8.7 vs 8.1), at four neither.
ENGINE_MAX_ROWS = 1
TARGET_PROGRAMS = 1024  # ~8 per SM on an H200 (132 SMs): split-K until the grid has this many programs

@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, sx, sw, so_split, so,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_SLICE: tl.constexpr,
                       EVEN: tl.constexpr):
    # One [BN, BK] float32 accumulator per row of x (BM <= 4, unrolled by hand): a [BM, BN, BK] tile would make
    # the compiler move every weight tile through shared memory into a 3-D layout, which measured slower than cuBLAS.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # rows past N read row N - 1 instead of masking the loads; their results are never stored
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * sw  # [BN, 1]
    kk = tl.arange(0, BK)
    acc0 = tl.zeros((BN, BK), dtype=tl.float32)
    acc1 = tl.zeros((BN, BK), dtype=tl.float32)
    acc2 = tl.zeros((BN, BK), dtype=tl.float32)
    acc3 = tl.zeros((BN, BK), dtype=tl.float32)
    k_start = pid_k * K_SLICE
    for k0 in range(k_start, k_start + K_SLICE, BK):
        if EVEN:  # K_SLICE a multiple of BK, and the slices tile K exactly: no column masks
            w = tl.load(w_rows + k0 + kk[None, :]).to(tl.float32)
            acc0 += w * tl.load(x_ptr + k0 + kk).to(tl.float32)[None, :]
            if BM > 1:
                acc1 += w * tl.load(x_ptr + tl.minimum(1, M - 1) * sx + k0 + kk).to(tl.float32)[None, :]
            if BM > 2:
                acc2 += w * tl.load(x_ptr + tl.minimum(2, M - 1) * sx + k0 + kk).to(tl.float32)[None, :]
                acc3 += w * tl.load(x_ptr + tl.minimum(3, M - 1) * sx + k0 + kk).to(tl.float32)[None, :]
        else:
            col = k0 + kk < K
            w = tl.load(w_rows + k0 + kk[None, :], mask=col[None, :], other=0.0).to(tl.float32)
            acc0 += w * tl.load(x_ptr + k0 + kk, mask=col, other=0.0).to(tl.float32)[None, :]
            if BM > 1:
                acc1 += w * tl.load(x_ptr + tl.minimum(1, M - 1) * sx + k0 + kk, mask=col, other=0.0).to(
                    tl.float32)[None, :]
            if BM > 2:
                acc2 += w * tl.load(x_ptr + tl.minimum(2, M - 1) * sx + k0 + kk, mask=col, other=0.0).to(
                    tl.float32)[None, :]
                acc3 += w * tl.load(x_ptr + tl.minimum(3, M - 1) * sx + k0 + kk, mask=col, other=0.0).to(
                    tl.float32)[None, :]
    cols = pid_n * BN + tl.arange(0, BN)
    out = out_ptr + pid_k * so_split + cols
    dt = out_ptr.dtype.element_ty
    tl.store(out, tl.sum(acc0, axis=1).to(dt), mask=cols < N)
    if BM > 1:
        tl.store(out + so, tl.sum(acc1, axis=1).to(dt), mask=(cols < N) & (tl.full((BN,), 1, tl.int32) < M))
    if BM > 2:
        tl.store(out + 2 * so, tl.sum(acc2, axis=1).to(dt), mask=(cols < N) & (tl.full((BN,), 2, tl.int32) < M))
        tl.store(out + 3 * so, tl.sum(acc3, axis=1).to(dt), mask=(cols < N) & (tl.full((BN,), 3, tl.int32) < M))


def split_for(n_out: int, k: int, tiles: dict | None = None) -> int:
    """Slices of the input columns for a projection of n_out rows: the smallest power of two that gives the grid
    TARGET_PROGRAMS programs, keeping every slice at least two BK tiles."""
    tiles = tiles or DENSE_GEMV_TILES
    bn, bk = tiles["BN"], tiles["BK"]
    split = 1
    while triton.cdiv(n_out, bn) * split < TARGET_PROGRAMS and k // (2 * split) >= bk:
        split *= 2
    return split


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, split_k: int | None = None,
               tiles: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, rows contiguous) times weight [N, K]^T; tiles default to DENSE_GEMV_TILES.

    split_k None: [M, N] in x's dtype. split_k = S >= 1: float32 partial sums [S, M, N] over S slices of the
    columns, to be summed by the caller (float32, then rounded once)."""
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"dense_gemv needs x [M, K] and weight [N, K] with contiguous rows; got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if M > MAX_ROWS:
        raise ValueError(f"dense_gemv serves up to {MAX_ROWS} rows (register tile); got {M}")
    partials = split_k is not None
    split_k = split_k or 1
    tiles = tiles or DENSE_GEMV_TILES
    bn, bk, warps = tiles["BN"], tiles["BK"], tiles["num_warps"]
    bm = triton.next_power_of_2(M)
    # BM [BN, BK] float32 accumulator tiles: at most 64 registers a thread
    bk = max(16, min(bk, triton.next_power_of_2(triton.cdiv(K, split_k)), 64 * 32 * warps // (bm * bn)))
    k_slice = triton.cdiv(triton.cdiv(K, split_k), bk) * bk  # columns per slice, whole tiles
    out = torch.empty((split_k, M, N), dtype=torch.float32 if partials else x.dtype, device=x.device)
    _dense_gemv_kernel[(triton.cdiv(N, bn), split_k)](
        x, weight, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        BM=bm, BN=bn, BK=bk, K_SLICE=k_slice, EVEN=k_slice * split_k == K,
        num_warps=warps)
    return out if partials else out[0]
