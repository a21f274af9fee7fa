"""Serving layout of packed experts and the kernels that read it (issue 20: quantized experts faster than bf16).

The stored format (quant/packing.py: one little-endian bit stream per output row, code i of byte j = column j*P + i)
is made for storage; a decode kernel reading it loads single bytes and must split the activations into P strided
column planes, and it measured bound by those instructions (about 1.2 T weights/s on the H200 at every width,
results/nvidia-h200/expert_kernels.md). `serving_layout` rearranges a tier once, when the engine loads it (the stored
files are unchanged), into what the kernels want:

* words: int32 [S, KT, N, W]. The K axis is cut into KT tiles of GK = W * C columns (C = 32 // bits codes a word);
  word j of row n in tile t holds in its bits [i*bits, (i+1)*bits) the code of column t*GK + i*W + j. So one
  32-bit load gives a thread C codes, and code slot i of all W words of a tile pairs with the W contiguous
  activations x[t*GK + i*W : t*GK + (i+1)*W]: loaded once per program and reused by every row it holds, no
  strided gathers. A tile's words of all rows are contiguous (coalesced loads of BN * W * 4 bytes). K is padded
  with zero codes up to a multiple of GK (their activations are masked to 0).
* meta: float16 [S, NG, N, 2] = (scale, zero) per (group, row), groups outer, so a tile reads the (scale, zero)
  pairs of its BN rows as one contiguous run. Symmetric tiers store zero = 2**(bits-1), HQQ its float zeros,
  GPTQ/RTN their integer zeros (exact in float16).

Dequantisation without int->float conversions (quarter rate) and with the zero point out of the inner loop: the
code is moved to the top of a float32 mantissa and or-ed with the exponent of 1.0, f = 1 + q * 2**-b exactly (one
shift, one and/or). Over the code slots of one scale group the kernel sums t = sum f * a and B = sum a (B is per
column, shared by all rows), and then w.a = s * sum (q - z) a = (s * 2**b) * t - s * (2**b + z) * B: one
multiply-add per code, two per word and group. W divides the group size, so every code slot lies in one group.

Prefill-sized blocks (BM >= 16) take `_serving_dot_kernel`, tl.dot over the same layout (each code slot is a
[W, BN] tile of contiguous columns, so W >= 16, tl.dot's minimum K). A tier whose group size admits no W >= 16
(group sizes without a power-of-two factor of 16, e.g. 24) keeps the stored layout and today's kernels; the
engine logs it once per reason when it loads the tier.

SERVING_LAYOUT selects the path for tiers made from then on (moe.quantized_tier); the old kernels stay in place.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch
import triton
import triton.language as tl

from .kernels import ExpertTier, _block_slot

log = logging.getLogger(__name__)

# Whether moe.quantized_tier converts packed tiers to the serving layout. Off until the GPU run decides
# (benchmarks/expert_kernels.py times both paths in one process); MOESWEEP_SERVING_LAYOUT=1 turns it on for a whole
# process (benchmarks/fast_engine.py, the GPU tests) without editing this line.
SERVING_LAYOUT = os.environ.get("MOESWEEP_SERVING_LAYOUT", "0") == "1"
# Words per row and tile at most, by width. Fewer words a tile put more rows on a thread (its converted activations
# serve them all) and, for groups of 128, one scale flush per tile at int4: the K loop's sm_90 SASS (compiled ahead
# of time, no GPU) took 4.7 instructions per int4 weight at 16 words against 6.1 at 32; int8 was better at 32 (5.2
# vs 5.7: with 4 codes a word, 16 words are a 64-column tile and two flushes per group of 128).
MAX_WORDS = {8: 32, 4: 16, 2: 16}
MIN_WORDS = 16  # tl.dot's minimum K for prefill blocks (one code slot = W contiguous columns)
# GEMV tiles by rows per block: BN weight rows per program (BN_GATE_UP for gate_up, whose programs read a gate and an
# up row per output column), UNROLL tiles loaded before they are used (1 to 4; serving_matmul adapts it to the row's
# KT tiles), num_warps, num_stages (Triton's software pipelining of the K loop; 3 = its default). First choice from
# the sm_90 SASS of the K loop (instructions per weight, compiled without a GPU), not from timings; the benchmark
# sweeps them: 64 rows at 16 words and 4 warps = 2 rows and 8 words a thread (int4 4.7 instructions a weight for
# gate_up, 5.5 for down; 128 rows: 6.8 for down). At batch 1 a layer has 8 live blocks: gate_up at BN 32 gives
# 8 x 768 / 32 = 192 programs on 132 SMs (BN 64: 96, under one wave), down at BN 64 8 x 2048 / 64 = 256. Blocks of
# 8 rows occur only in the benchmark's single-matrix rows; gate_up's 16 rows there keep [8, BN, 16] accumulators
# out of local memory. WARPS_GATE_UP (default num_warps): gate_up's 32 rows on 2 warps put a gate and an up row of
# 4 words a tile on each thread, 4.6 instructions a weight against 5.5 on 4 warps (down at 64 rows: 5.5 on 4 warps,
# 6.7 on 2).
SERVING_GEMV_TILES = {1: {"BN": 64, "BN_GATE_UP": 32, "WARPS_GATE_UP": 2, "UNROLL": 2, "num_warps": 4, "num_stages": 3},
                      2: {"BN": 64, "BN_GATE_UP": 64, "UNROLL": 2, "num_warps": 4, "num_stages": 3},
                      4: {"BN": 32, "BN_GATE_UP": 32, "UNROLL": 1, "num_warps": 4, "num_stages": 3},
                      8: {"BN": 32, "BN_GATE_UP": 16, "UNROLL": 1, "num_warps": 4, "num_stages": 3}}
SERVING_DOT_TILES = {"BN": 32, "num_warps": 4, "num_stages": 3}
_logged: set[str] = set()


@dataclasses.dataclass
class ServingTier(ExpertTier):
    """An ExpertTier in the serving layout: weight = words int32 [S, KT, N, W], scales = meta float16 [S, NG, N, 2],
    zeros None (they are in meta). in_features = the real K (the layout may be padded past it)."""

    @property
    def out_features(self) -> int:
        return self.weight.shape[2]

    @property
    def words(self) -> int:
        return self.weight.shape[3]


def serving_words(bits: int, in_features: int, group_size: int) -> int | None:
    """W for this shape: a power of two in [MIN_WORDS, MAX_WORDS] dividing the group size, the largest whose tile
    divides K (no padding), else the smallest (least padding); None when no W divides the group size."""
    c = 32 // bits
    cands = [w for w in (64, 32, 16, 8, 4, 2, 1) if MIN_WORDS <= w <= MAX_WORDS[bits] and group_size % w == 0]
    if not cands:
        return None
    exact = [w for w in cands if in_features % (w * c) == 0]
    return exact[0] if exact else cands[-1]


def _why_not(tier: ExpertTier) -> str | None:
    if isinstance(tier, ServingTier) or tier.bits == 16:
        return "not packed"
    if serving_words(tier.bits, tier.in_features, tier.group_size) is None:
        return (f"group size {tier.group_size} has no power-of-two factor >= {MIN_WORDS}: int{tier.bits} experts "
                f"of this quantization keep the stored layout and the previous kernels")
    return None


def _unpack(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Stored codes [S, N, ceil(K*bits/8)] uint8 -> [S, N, K] uint8 on packed's device (quant/packing.py's layout
    for 2/4/8 bits: code i of byte j is column j*P + i)."""
    p = 8 // bits
    shifts = torch.arange(p, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :K]


def serving_layout(tier: ExpertTier, chunk: int = 8) -> ExpertTier:
    """The tier in the serving layout (module docstring), on the tier's device, or the tier itself (logged once per
    reason) when its group size cannot take it."""
    why = _why_not(tier)
    if why is not None:
        if why != "not packed" and why not in _logged:
            _logged.add(why)
            log.warning("serving layout: %s", why)
        return tier
    bits, K, G = tier.bits, tier.in_features, tier.group_size
    S, N = tier.weight.shape[:2]
    c = 32 // bits
    W = serving_words(bits, K, G)
    gk = W * c
    KT = -(-K // gk)
    NG = -(-(KT * gk) // G)  # groups of the padded K (the extra ones have scale 0)
    device = tier.weight.device
    # host tiers (pools' pinned high versions) are rearranged on the GPU when there is one: seconds per layer on
    # the CPU, for 48 layers
    work = torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device
    words = torch.empty(S, KT, N, W, dtype=torch.int32, device=device)
    shifts = torch.arange(c, device=work, dtype=torch.int64) * bits
    for s0 in range(0, S, chunk):  # bound the unpacked temporaries (int64: 8 bytes a code)
        codes = _unpack(tier.weight[s0:s0 + chunk].to(work), bits, K)
        codes = torch.nn.functional.pad(codes, (0, KT * gk - K)).reshape(-1, N, KT, c, W).to(torch.int64)
        word = (codes << shifts[:, None]).sum(3)  # [s, N, KT, W], the word's value as an unsigned 32-bit number
        # the low half of each int64 (little endian) is the word's bit pattern as int32
        word = word.contiguous().view(torch.int32)[..., 0::2]
        words[s0:s0 + chunk] = word.permute(0, 2, 1, 3).to(device)
    scales = tier.scales.to(torch.float16)
    zeros = (torch.full_like(scales, float(1 << (bits - 1))) if tier.zeros is None else tier.zeros.to(torch.float16))
    meta = torch.stack([scales, zeros], -1)  # [S, N, n_groups, 2]
    meta = torch.nn.functional.pad(meta, (0, 0, 0, NG - meta.shape[2]))
    meta = meta.permute(0, 2, 1, 3).contiguous()
    return ServingTier(bits, words, meta, None, G, K)


@triton.jit
def _magic(words, code_mask, SLOT: tl.constexpr, BITS: tl.constexpr):
    """Code slot SLOT of every word as the float32 1 + q * 2**-BITS, exactly: the code moved to the top of the
    mantissa (one shift) and or-ed with the exponent of 1.0 (one and/or, a single LOP3). code_mask = the code's
    bits there, ((1 << BITS) - 1) << (23 - BITS), passed as an argument so that it stays in a register: as a
    constant, ptxas rematerialised it with a MOV before every LOP3 (which takes one immediate), half an
    instruction per weight (sm_90 SASS). Arithmetic right shifts are fine: the sign bits land above the mask."""
    TOP: tl.constexpr = 23 - BITS
    if SLOT * BITS <= TOP:
        v = words << (TOP - SLOT * BITS)
    else:
        v = words >> (SLOT * BITS - TOP)
    return ((v & code_mask) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _scale_pair(m_ptr, g, BITS: tl.constexpr):
    """(s * 2**BITS, s * (2**BITS + z)) from the meta pairs at g ([..., 1] offsets of the scale)."""
    s = tl.load(m_ptr + g).to(tl.float32)
    z = tl.load(m_ptr + g + 1).to(tl.float32)
    return s * (1 << BITS), s * ((1 << BITS) + z)


@triton.jit
def _tile_gemv(acc, acc_up, words, words_up, x_base, m_base, m_up, kt, K, GROUP, NG, sm1, code_mask,
               BITS: tl.constexpr, W: tl.constexpr, SPG: tl.constexpr, GATE_UP: tl.constexpr, EVEN_K: tl.constexpr):
    """One tile of GK = W * C columns: acc [BM, BN, W] += the tile's products (see the module docstring). Without
    EVEN_K the tile may lie past K (the last iteration's spare tiles): its activations are 0 and its group index is
    clamped, so it adds 0."""
    C: tl.constexpr = 32 // BITS
    j = tl.arange(0, W)[None, None, :]
    for i in tl.static_range(C):
        col = kt + i * W + j
        if EVEN_K:
            a = tl.load(x_base + col).to(tl.float32)  # [BM, 1, W]
        else:
            a = tl.load(x_base + col, mask=col < K, other=0.0).to(tl.float32)
        f = _magic(words, code_mask, i, BITS)  # [1, BN, W]
        if i % SPG == 0:
            t = f * a
            b = a
            if GATE_UP:
                t_up = _magic(words_up, code_mask, i, BITS) * a
        else:
            t += f * a
            b += a
            if GATE_UP:
                t_up += _magic(words_up, code_mask, i, BITS) * a
        if (i + 1) % SPG == 0:  # the last slot of a scale group: fold in its scale and zero
            g = (kt + (i + 1 - SPG) * W) // GROUP
            if not EVEN_K:
                g = tl.minimum(g, NG - 1)
            g = g * sm1
            s2, c = _scale_pair(m_base, g, BITS)  # [1, BN, 1]
            acc = tl.fma(s2, t, tl.fma(-c, b, acc))  # two FFMA an element
            if GATE_UP:
                s2, c = _scale_pair(m_up, g, BITS)
                acc_up = tl.fma(s2, t_up, tl.fma(-c, b, acc_up))
    return acc, acc_up


@triton.jit
def _tile_words(w_base, up_base, t, KT, sw1, GATE_UP: tl.constexpr, EVEN_K: tl.constexpr):
    """Tile t's words [1, BN, W] (and the up rows' for gate_up); t past KT reads tile KT - 1 (never used)."""
    if not EVEN_K:
        t = tl.minimum(t, KT - 1)
    w = tl.load(w_base + t * sw1)
    w_up = w
    if GATE_UP:
        w_up = tl.load(up_base + t * sw1)
    return w, w_up


@triton.jit
def _serving_gemv_kernel(x_ptr, out_ptr, assign_ptr, block_expert_ptr, slot_ptr, routed_weight_ptr, w_ptr, m_ptr,
                         num_assign, x_row_div, N, K, KT, GROUP, num_experts, sx, so, sw0, sw1, sm0, sm1, code_mask,
                         NG,
                         BITS: tl.constexpr, W: tl.constexpr, SPG: tl.constexpr, GATE_UP: tl.constexpr,
                         ROUTED_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr,
                         EVEN_K: tl.constexpr):
    """Blocks of BM < 16 rows (decode) over the serving layout, same arguments and semantics as
    kernels._grouped_expert_gemv_kernel (plus NG, the layout's groups). Every weight word is loaded once per
    program and unpacked once for all BM rows; products accumulate elementwise in [BM, BN, W] float32 and are
    summed over W after the loop. UNROLL tiles' words are loaded before the first is used. Rows past N and padding
    rows read valid rows (N - 1, activations row 0); their results are never stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = _block_slot(block_expert_ptr, slot_ptr, pid_m, num_experts)
    if slot < 0:
        return
    assign = tl.load(assign_ptr + pid_m * BM + tl.arange(0, BM))
    m_mask = assign < num_assign
    x_base = x_ptr + tl.where(m_mask, assign // x_row_div, 0)[:, None, None].to(tl.int64) * sx  # [BM, 1, 1]
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)[None, :, None]  # [1, BN, 1]
    w_base = w_ptr + slot.to(tl.int64) * sw0 + rows * W + tl.arange(0, W)[None, None, :]
    up_base = w_base + N * W  # gate_up_proj stacks the gate rows [0, N) over the up rows [N, 2N)
    m_base = m_ptr + slot.to(tl.int64) * sm0 + rows * 2
    m_up = m_base + N * 2
    acc = tl.zeros((BM, BN, W), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN, W), dtype=tl.float32)
    GK: tl.constexpr = W * (32 // BITS)
    for t0 in range(0, KT, UNROLL):
        # all UNROLL tiles' words in flight before the first is unpacked (a program's K loop is only KT <= 8
        # iterations at these shapes: each round trip to memory not overlapped is a large part of its time).
        # Without EVEN_K the last iteration's tiles past KT re-read tile KT - 1 and add 0 (_tile_gemv).
        w0, w0u = _tile_words(w_base, up_base, t0, KT, sw1, GATE_UP, EVEN_K)
        if UNROLL >= 2:
            w1, w1u = _tile_words(w_base, up_base, t0 + 1, KT, sw1, GATE_UP, EVEN_K)
        if UNROLL >= 3:
            w2, w2u = _tile_words(w_base, up_base, t0 + 2, KT, sw1, GATE_UP, EVEN_K)
        if UNROLL >= 4:
            w3, w3u = _tile_words(w_base, up_base, t0 + 3, KT, sw1, GATE_UP, EVEN_K)
        acc, acc_up = _tile_gemv(acc, acc_up, w0, w0u, x_base, m_base, m_up, t0 * GK, K, GROUP, NG, sm1,
                                 code_mask, BITS, W, SPG, GATE_UP, EVEN_K)
        if UNROLL >= 2:
            acc, acc_up = _tile_gemv(acc, acc_up, w1, w1u, x_base, m_base, m_up, (t0 + 1) * GK, K, GROUP, NG, sm1,
                                     code_mask, BITS, W, SPG, GATE_UP, EVEN_K)
        if UNROLL >= 3:
            acc, acc_up = _tile_gemv(acc, acc_up, w2, w2u, x_base, m_base, m_up, (t0 + 2) * GK, K, GROUP, NG, sm1,
                                     code_mask, BITS, W, SPG, GATE_UP, EVEN_K)
        if UNROLL >= 4:
            acc, acc_up = _tile_gemv(acc, acc_up, w3, w3u, x_base, m_base, m_up, (t0 + 3) * GK, K, GROUP, NG, sm1,
                                     code_mask, BITS, W, SPG, GATE_UP, EVEN_K)
    acc = tl.sum(acc, axis=2)  # [BM, BN]
    cols = pid_n * BN + tl.arange(0, BN)
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * tl.sum(acc_up, axis=2)  # silu(gate) * up
    if ROUTED_WEIGHT:
        acc = acc * tl.load(routed_weight_ptr + assign, mask=m_mask, other=0.0)[:, None]
    tl.store(out_ptr + assign[:, None].to(tl.int64) * so + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (cols < N)[None, :])


@triton.jit
def _dot_slot(a, words, code_mask, m_base, g, BITS: tl.constexpr, SLOT: tl.constexpr):
    """Code slot SLOT of a [W, BN] words tile dequantised to a's dtype: fma(f, s * 2**b, -s * (2**b + z))."""
    s2, c = _scale_pair(m_base, g, BITS)  # [1, BN]
    return (_magic(words, code_mask, SLOT, BITS) * s2 - c).to(a.dtype)


@triton.jit
def _serving_dot_kernel(x_ptr, out_ptr, assign_ptr, block_expert_ptr, slot_ptr, routed_weight_ptr, w_ptr, m_ptr,
                        num_assign, x_row_div, N, K, KT, GROUP, num_experts, sx, so, sw0, sw1, sm0, sm1, code_mask,
                        BITS: tl.constexpr, W: tl.constexpr, GATE_UP: tl.constexpr, ROUTED_WEIGHT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr):
    """Prefill blocks (BM >= 16) over the serving layout with tl.dot: code slot i of a tile is the [W, BN] weight
    tile of columns kt + i*W .. + W, multiplied with those activations [BM, W]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = _block_slot(block_expert_ptr, slot_ptr, pid_m, num_experts)
    if slot < 0:
        return
    assign = tl.load(assign_ptr + pid_m * BM + tl.arange(0, BM))
    m_mask = assign < num_assign
    x_base = x_ptr + tl.where(m_mask, assign // x_row_div, 0)[:, None].to(tl.int64) * sx  # [BM, 1]
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)[None, :]  # [1, BN]
    jw = tl.arange(0, W)
    w_base = w_ptr + slot.to(tl.int64) * sw0 + rows * W + jw[:, None]  # [W, BN]
    m_base = m_ptr + slot.to(tl.int64) * sm0 + rows * 2
    C: tl.constexpr = 32 // BITS
    GK: tl.constexpr = W * C
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, KT):
        words = tl.load(w_base + t * sw1)
        if GATE_UP:
            words_up = tl.load(w_base + N * W + t * sw1)
        for i in tl.static_range(C):
            col = t * GK + i * W + jw[None, :]
            a = tl.load(x_base + col, mask=m_mask[:, None] & (col < K), other=0.0)
            g = (t * GK + i * W) // GROUP * sm1
            acc = tl.dot(a, _dot_slot(a, words, code_mask, m_base, g, BITS, i), acc)
            if GATE_UP:
                acc_up = tl.dot(a, _dot_slot(a, words_up, code_mask, m_base + N * 2, g, BITS, i), acc_up)
    cols = pid_n * BN + tl.arange(0, BN)
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if ROUTED_WEIGHT:
        acc = acc * tl.load(routed_weight_ptr + assign, mask=m_mask, other=0.0)[:, None]
    tl.store(out_ptr + assign[:, None].to(tl.int64) * so + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (cols < N)[None, :])


def slots_per_group(tier: ServingTier) -> int:
    """Code slots summed before a scale is applied: all of a tile's slots of one group when groups and tiles nest
    (either divides the other), else one (a group boundary may fall after any slot)."""
    c = 32 // tier.bits
    gk = tier.words * c
    G = tier.group_size
    if gk % G == 0:
        return G // tier.words
    if G % gk == 0:
        return c
    return 1


def serving_matmul(x, out, sorted_assign, block_expert, slot_of_expert, tier: ServingTier, x_row_div: int,
                   block_m: int, routed_weight=None, gate_up: bool = False) -> None:
    """kernels.grouped_expert_matmul for a ServingTier (same contract)."""
    n_out = tier.out_features // 2 if gate_up else tier.out_features
    w, meta = tier.weight, tier.scales
    KT, W = w.shape[1], w.shape[3]
    gk = W * 32 // tier.bits
    rw = routed_weight if routed_weight is not None else x
    common = (x, out, sorted_assign, block_expert, slot_of_expert, rw, w, meta, out.shape[0], x_row_div, n_out,
              tier.in_features, KT, tier.group_size, slot_of_expert.shape[0], x.stride(0), out.stride(0),
              w.stride(0), w.stride(1), meta.stride(0), meta.stride(1),
              ((1 << tier.bits) - 1) << (23 - tier.bits))  # code_mask (_magic)
    if block_m >= 16:
        bn = SERVING_DOT_TILES["BN"]
        _serving_dot_kernel[(block_expert.shape[0], triton.cdiv(n_out, bn))](
            *common, BITS=tier.bits, W=W, GATE_UP=gate_up, ROUTED_WEIGHT=routed_weight is not None, BM=block_m, BN=bn,
            num_warps=SERVING_DOT_TILES["num_warps"], num_stages=SERVING_DOT_TILES["num_stages"])
        return
    tiles = SERVING_GEMV_TILES[max(bm for bm in SERVING_GEMV_TILES if bm <= block_m)]
    bn = tiles.get("BN_GATE_UP", tiles["BN"]) if gate_up else tiles["BN"]
    # UNROLL tiles per iteration, at most KT; a short row (KT <= 4) that UNROLL does not divide takes all its tiles in
    # one iteration (down at K 768 is 3 tiles), a longer one a last iteration with spare tiles
    unroll = min(tiles["UNROLL"], KT)
    if KT % unroll and KT <= 4:
        unroll = KT
    _serving_gemv_kernel[(block_expert.shape[0], triton.cdiv(n_out, bn))](
        *common, meta.shape[1], BITS=tier.bits, W=W, SPG=slots_per_group(tier), GATE_UP=gate_up,
        ROUTED_WEIGHT=routed_weight is not None, BM=block_m, BN=bn, UNROLL=unroll,
        EVEN_K=KT * gk == tier.in_features and KT % unroll == 0,
        num_warps=tiles.get("WARPS_GATE_UP", tiles["num_warps"]) if gate_up else tiles["num_warps"],
        num_stages=tiles.get("num_stages", 3))
