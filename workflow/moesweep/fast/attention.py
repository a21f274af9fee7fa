"""Decode attention of the fast engine (Triton): q/k norm + rotary + cache write, then flash-decoding attention.

Written by hand because decode attention is one query per row against the engine's own static cache, inside the
CUDA graph it replays every step: cuDNN's scaled_dot_product_attention with a bool mask cost 13.7 µs per layer
on the H200 for that, and the torch glue before it (two RMSNorms, rotary, two index_copy_) is a string of small
launches. Here it is two calls, three launches, none reading anything back to the host:

- `qk_norm_rope_store`: the fused q/k/v projection's output -> per-head RMSNorm and rotary of q and k, k and v
  written into the cache at the device-side slot, q into a buffer. It reproduces transformers' bf16 roundings
  op by op, so the engine's numerics do not move.
- `decode_attention`: flash-decoding (split-K over the cache): the L keys are split over several programs per
  (row, KV head) so batch 1 still fills the GPU; each writes float32 partials (max, sum, unnormalised output) and
  a small second kernel merges them. Validity is the engine's per-row key mask (left padding, generated slots),
  an arbitrary per-row bool mask, not the per-row sequence lengths that library decode kernels take.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2 e), exp2 is the cheap instruction


@triton.jit
def _round(x, dt: tl.constexpr):
    """Round a float32 value to the activation dtype and back: what one bf16 torch op does to its result."""
    return x.to(dt).to(tl.float32)


@triton.jit
def _norm_rope(x_ptr, stride, w_ptr, cos, sin, eps, D: tl.constexpr):
    """rope(RMSNorm(x)) of one head, op by op as transformers computes it in the activation dtype:
    RMSNorm in float32, rounded, times the weight (rounded); then q*cos and rotate_half(q)*sin each rounded and
    their sum rounded. Each op is done in float32 and rounded where the torch op rounds; for one op on 16-bit
    inputs that equals the 16-bit op (float32 has more than 2p+2 bits, so the double rounding is harmless)."""
    dt: tl.constexpr = x_ptr.dtype.element_ty
    d = tl.arange(0, D)
    partner = (d + D // 2) % D  # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
    x = tl.load(x_ptr + d * stride).to(tl.float32)
    xp = tl.load(x_ptr + partner * stride).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) * (1.0 / D) + eps)  # D a power of two: exact, as torch's mean
    n = _round(tl.load(w_ptr + d).to(tl.float32) * _round(x * rstd, dt), dt)
    n_partner = _round(tl.load(w_ptr + partner).to(tl.float32) * _round(xp * rstd, dt), dt)
    rotated = tl.where(d < D // 2, -n_partner, n_partner)
    return (_round(n * cos, dt) + _round(rotated * sin, dt)).to(dt)


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, q_ptr, eps, Hq, KVH,
                               sx0, sx1, sc0, sc1, ss0, ss1, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sq0, sq1, sq2,
                               D: tl.constexpr):
    # One program per (row, head) of q and k; program h covers qkv columns [h*D, (h+1)*D) either way, and a k
    # head's program also moves its v head (columns (h + KVH)*D on), so nothing is loaded twice.
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    row = qkv_ptr + b * sx0
    cos = tl.load(cos_ptr + b * sc0 + d * sc1).to(tl.float32)
    sin = tl.load(sin_ptr + b * ss0 + d * ss1).to(tl.float32)
    if h < Hq:
        q = _norm_rope(row + h * D * sx1, sx1, qw_ptr, cos, sin, eps, D)
        tl.store(q_ptr + b * sq0 + h * sq1 + d * sq2, q)
    else:
        j = h - Hq
        slot = tl.load(slot_ptr)  # the cache position, read on the device: the graph replays with a new one
        k = _norm_rope(row + h * D * sx1, sx1, kw_ptr, cos, sin, eps, D)
        tl.store(k_ptr + b * sk0 + j * sk1 + slot * sk2 + d * sk3, k)
        v = tl.load(row + (h + KVH) * D * sx1 + d * sx1)
        tl.store(v_ptr + b * sv0 + j * sv1 + slot * sv2 + d * sv3, v)


def qk_norm_rope_store(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                       q_out: torch.Tensor) -> None:
    """Decode step's attention inputs, one launch: q_out = rope(q_norm(q)), cache[:, :, slot] = rope(k_norm(k)), v.

    qkv [B, (Hq + 2*KVH)*D]: the fused projection's output, q heads then k heads then v heads.
    q_norm_weight, k_norm_weight [D] in the activation dtype; cos, sin [B, D]: each row's rotary embedding.
    k_cache, v_cache [B, KVH, L, D] (any strides); slot int64 [1] on the device; q_out [B, Hq, D].
    """
    B, Hq, D = q_out.shape
    KVH = k_cache.shape[1]
    if qkv.shape != (B, (Hq + 2 * KVH) * D) or D & (D - 1):
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {Hq}+2*{KVH} heads of {D} (a power of two) per row")
    _qk_norm_rope_store_kernel[(B, Hq + KVH)](
        qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, slot, q_out, eps, Hq, KVH,
        *qkv.stride(), *cos.stride(), *sin.stride(), *k_cache.stride(), *v_cache.stride(), *q_out.stride(), D=D,
        # No FMA contraction: LLVM narrows the rounded products to bf16 and would fuse q*cos into the add as one
        # fma.rn.bf16, skipping the rounding of q*cos that torch does (seen in the sm_90 PTX).
        enable_fp_fusion=False)


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, L, KVH, chunk,
                         sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sm0, sm1,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    # One program: the G query heads of one (row, KV head) against one chunk of keys, online softmax in base 2.
    # The G heads ride as the rows of tl.dot, padded to GP >= 16 (tl.dot's minimum) with zero queries.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    S = tl.num_programs(1)
    b = pid // KVH
    kvh = pid % KVH
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = kvh * G + g
    q = tl.load(q_ptr + b * sq0 + heads[:, None] * sq1 + d[None, :] * sq2, mask=(g < G)[:, None], other=0.0)
    k_base = k_ptr + b * sk0 + kvh * sk1
    v_base = v_ptr + b * sv0 + kvh * sv1
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        keep = tl.load(mask_ptr + b * sm0 + n * sm1, mask=n < end, other=0) != 0
        # Blocks with no allowed key (left padding, cache slots not generated yet) are skipped from the device
        # mask alone: their K and V are never read. Inside a block, masked-out keys are masked loads (no reads,
        # and whatever a never-written slot holds cannot reach the output).
        if tl.max(keep.to(tl.int32), 0) > 0:
            k = tl.load(k_base + n[:, None] * sk2 + d[None, :] * sk3, mask=keep[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the block has an allowed key
            alpha = tl.exp2(m_i - m_new)  # exp2(-inf) = 0 before the first allowed key
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * sv2 + d[None, :] * sv3, mask=keep[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    # Every program writes its partial, a chunk without allowed keys the neutral one (max -inf, sum 0, acc 0).
    part = (b * KVH * G + heads) * S + split  # scratch row of (row, query head), column split
    live = g < G
    tl.store(m_ptr + part, m_i, mask=live)
    tl.store(l_ptr + part, l_i, mask=live)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])


@triton.jit
def _decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, Hq, S, so0, so1, so2, SP: tl.constexpr, D: tl.constexpr):
    # One program per (row, query head): rescale the S partials to the global max and normalise once.
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + pid * S + s, mask=s < S, other=float("-inf"))
    l = tl.load(l_ptr + pid * S + s, mask=s < S, other=0.0)
    acc = tl.load(acc_ptr + (pid * S + s)[:, None] * D + d[None, :], mask=(s < S)[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)  # a neutral partial (max -inf) weighs 0; m_max is finite, every row has a key
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + b * so0 + h * so1 + d * so2, o.to(out_ptr.dtype.element_ty))


def num_splits(L: int, split_keys: int = 32, max_splits: int = 64) -> tuple[int, int, int]:
    """(splits, keys per split, BLOCK_N) for a cache of L slots. From the cache length only, never from how many
    keys are valid, so the grid is fixed and the graph replays. Chunks of `split_keys` (a multiple of BLOCK_N),
    at most `max_splits` of them (longer caches get longer chunks), no empty trailing split. 32 keys: a program is
    one block, a chain of dependent loads and two small dots, which is what a decode attention's latency is made of
    (H200, Qwen3-30B shapes, batch 1, 181-slot cache: chunks of 128 took 7.2 µs per layer, as 2 splits x 4 KV
    heads); at 64 splits, longer caches get longer chunks."""
    block_n = min(64, max(16, triton.next_power_of_2(split_keys)))  # >= 16: tl.dot's minimum
    splits = min(triton.cdiv(L, split_keys), max_splits)
    chunk = triton.cdiv(triton.cdiv(L, splits), block_n) * block_n
    return triton.cdiv(L, chunk), chunk, block_n


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                     scale: float, out: torch.Tensor, split_keys: int = 32, max_splits: int = 64) -> None:
    """out = softmax(scale * q k^T over the allowed keys) v, grouped-query (head h reads KV head h // (Hq/KVH)).

    q [B, Hq, D]; k_cache, v_cache [B, KVH, L, D] (any strides); key_mask [B, L] bool, True = may be attended
    (each row needs one); out [B, Hq, D]. Float32 accumulation; two launches, no host synchronisation (the
    float32 scratch is allocated here, which graph capture allows: it comes from the graph's private pool).
    """
    B, Hq, D = q.shape
    KVH, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // KVH
    if G * KVH != Hq or D & (D - 1) or D < 16:
        raise ValueError(f"{Hq} query heads over {KVH} KV heads of {D} (a power of two >= 16) are not supported")
    splits, chunk, block_n = num_splits(L, split_keys, max_splits)
    m = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    mask = key_mask.view(torch.uint8)  # same bytes; Triton's bool pointers are less portable than uint8
    _decode_split_kernel[(B * KVH, splits)](
        q, k_cache, v_cache, mask, m, l, acc, scale * LOG2E, L, KVH, chunk,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mask.stride(),
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # float32 inputs: no silent TF32 on the GPU
    _decode_combine_kernel[(B * Hq,)](m, l, acc, out, Hq, splits, *out.stride(),
                                      SP=triton.next_power_of_2(splits), D=D)
