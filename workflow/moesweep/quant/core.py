"""Weight-only integer quantization of fused Qwen3-MoE expert tensors (GPTQ, round-to-nearest or HQQ).

Why llm-compressor: GPTQ is taken from llm-compressor's low-level, batched `quantize_weight`
(maintained by the vLLM project). auto-gptq is archived and cannot even be imported on transformers 5
(`cannot import name 'no_init_weights'`). The quantization grid (scales, zero points, range, rounding) comes from
compressed-tensors' `calculate_qparams`, the same code llm-compressor's observers call.

Grid and stored numbers, per expert e, output row o, input column c, group g = c // group_size:
    signed code   q = clamp(round(W / s + z), -2**(b-1), 2**(b-1) - 1)      (compressed-tensors convention)
    stored code   u = q + 2**(b-1)  in [0, 2**b)     -> bit-packed, see packing.py
    stored zero   zu = z + 2**(b-1) in [0, 2**b)     -> uint8 [E, out, n_groups]; symmetric: z = 0, not stored
    dequantized   W_hat = (u - zu) * s
Scales are rounded to float16 *before* quantizing (QuantizationArgs.scale_dtype), so storing them as
float16 is exact and dequantize() reproduces the quantizer's output bit for bit.
Groups run along the input dimension; when in % group_size != 0 the last group is shorter (its min/max
come from fewer columns), which the embedded model needs (hidden 192 with groups of 128).

HQQ (method "hqq", calibration-free, from the maintained `hqq` library, Half-Quadratic Quantization) uses
hqq's own `Quantizer.quantize(optimize=True, axis=1)` per expert and projection, as hqq quantizes one
nn.Linear: codes u in [0, 2**b) and per-group float scale s and float zero point z with W_hat = (u - z) * s,
the same formula as above, except that z is not an integer. It is stored as float16 (`zeros` float16
instead of uint8), and s as float16, exactly what hqq's HQQLinear keeps with compute_dtype=float16; the
codes are hqq's, computed with its float32 scale and zero. dequantize() therefore equals hqq's own
Quantizer.dequantize given those float16 meta values (tested). HQQ needs in % group_size == 0 (hqq groups
consecutive elements of the flattened weight, so a ragged group would straddle two rows) and has no
symmetric variant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update, quantize_weight
from llmcompressor.modifiers.gptq.helpers import factorize_hessian

from . import format
from .packing import SUPPORTED_BITS, pack_codes, unpack_codes

GPTQ_BLOCKSIZE = 128  # llm-compressor's default lazy-batch width
METHODS = ("gptq", "rtn", "hqq")


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 2, 3, 4 or 8
    group_size: int  # input columns per scale group; -1 or 0 = one group per output channel
    symmetric: bool = False
    method: str = "gptq"  # "gptq" | "rtn" | "hqq"
    damp: float = 0.01  # GPTQ dampening: fraction of the mean Hessian diagonal added to the diagonal
    min_tokens: int = 0  # GPTQ experts with fewer calibration tokens (and always 0 tokens) fall back to RTN

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "hqq" and self.symmetric:
            raise ValueError("method 'hqq' has a float zero point per group; it has no symmetric variant "
                             "(set quantization.symmetric: false)")
        if self.group_size < -1:
            raise ValueError(f"group_size must be > 0, or -1/0 for per channel, got {self.group_size}")

    @property
    def per_channel(self) -> bool:
        return self.group_size <= 0

    def quant_args(self) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=self.symmetric,
            strategy="channel" if self.per_channel else "group",
            group_size=None if self.per_channel else self.group_size,
            scale_dtype=torch.float16,
        )

    def columns_per_group(self, n_in: int) -> int:
        return n_in if self.per_channel else self.group_size

    def n_groups(self, n_in: int) -> int:
        return format.n_groups(n_in, self.group_size)


@dataclass
class QuantizedExperts:
    """One projection of one layer, all experts. See the module docstring for the number layout."""
    codes: torch.Tensor  # uint8 [E, out, ceil(in*bits/8)], each row a packed bit stream (packing.py)
    scales: torch.Tensor  # float16 [E, out, n_groups]
    zeros: torch.Tensor  # uint8 [E, out, n_groups] unsigned zero points (float16 for hqq); shape [0] when symmetric
    shape: tuple[int, int, int]  # (E, out, in)
    spec: QuantSpec
    fallback: torch.Tensor = field(default=None)  # bool [E]: quantized by RTN although method == "gptq"

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        if self.fallback is None:
            self.fallback = torch.zeros(self.shape[0], dtype=torch.bool)


def _half(bits: int) -> int:
    return 1 << (bits - 1)


def _grid(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid per (expert, row, group): float32 scales (float16 values) and signed integer zeros."""
    E, out, n_in = weight.shape
    gs, G = spec.columns_per_group(n_in), spec.n_groups(n_in)
    # Zero padding leaves min/max unchanged because calculate_qparams widens every range to include 0.
    padded = torch.nn.functional.pad(weight.float(), (0, G * gs - n_in)).reshape(E, out, G, gs)
    scale, zero = calculate_qparams(padded.amin(-1), padded.amax(-1), spec.quant_args())
    return scale.float(), zero.float()


def _per_column(t: torch.Tensor, spec: QuantSpec, n_in: int) -> torch.Tensor:
    """[E, out, G] -> [E, out, in] by repeating each group's value over its columns."""
    return t.repeat_interleave(spec.columns_per_group(n_in), dim=-1)[..., :n_in]


def _signed_codes(w: torch.Tensor, scale_col: torch.Tensor, zero_col: torch.Tensor, bits: int) -> torch.Tensor:
    # Same arithmetic as compressed-tensors' fake quantize: x / s + z, clamp, round half to even.
    return torch.clamp(torch.round(w / scale_col + zero_col), -_half(bits), _half(bits) - 1)


def _normalised_hessians(hessian, counts, idx, device):
    # llm-compressor's prepare_batch divides by the sample count too (its factor 2 cancels in GPTQ).
    return hessian[idx.to(hessian.device)].to(device, torch.float32) / counts[idx].to(device, torch.float32).view(-1, 1, 1)


def _gptq_subset(weight, hessian, counts, active, scale, zero, spec):
    """Run llm-compressor's batched GPTQ on the experts in `active` (CPU bool [E]); return (idx, W_q, not_pd)."""
    idx = active.nonzero().flatten()
    dev_idx = idx.to(weight.device)
    # quantize_weight uses its input buffers as scratch, hence the fresh tensors.
    h = _normalised_hessians(hessian, counts, idx, weight.device)
    w = weight[dev_idx].float().clone()
    w_q, _losses, not_pd = quantize_weight(
        w, h, scale[dev_idx], zero[dev_idx], None, spec.quant_args(), blocksize=GPTQ_BLOCKSIZE, percdamp=spec.damp)
    return dev_idx, w_q, not_pd.cpu()


def _fallback_mask(hessian, token_counts, spec, E) -> torch.Tensor:
    if spec.method in ("rtn", "hqq"):
        return torch.zeros(E, dtype=torch.bool)
    if hessian is None or token_counts is None:
        raise ValueError("method 'gptq' needs the per-expert Hessians and token counts")
    if hessian.shape[0] != E or token_counts.shape != (E,):
        raise ValueError(f"Hessian {tuple(hessian.shape)} / counts {tuple(token_counts.shape)} do not match {E} experts")
    return token_counts.cpu() < max(spec.min_tokens, 1)


def _rtn(weight, scale, zero, spec) -> torch.Tensor:
    n_in = weight.shape[-1]
    s_col, z_col = _per_column(scale, spec, n_in), _per_column(zero, spec, n_in)
    return (_signed_codes(weight.float(), s_col, z_col, spec.bits) - z_col) * s_col


def _pack(weight_shape, w_hat, scale, zero, spec, fallback, experts_per_chunk=8) -> QuantizedExperts:
    """Recover integer codes from grid values, check they reproduce w_hat, and pack (chunked over experts
    to keep the per-column temporaries small)."""
    E, out, n_in = weight_shape
    half = _half(spec.bits)
    codes = []
    for e0 in range(0, E, experts_per_chunk):
        sl = slice(e0, e0 + experts_per_chunk)
        s_col, z_col = _per_column(scale[sl], spec, n_in), _per_column(zero[sl], spec, n_in)
        q = _signed_codes(w_hat[sl], s_col, z_col, spec.bits)
        # GPTQ returns fake-quantized weights: decoding the recovered codes must give them back.
        off_grid = ((q - z_col) * s_col - w_hat[sl]).abs() / s_col
        if off_grid.numel() and off_grid.max().item() > 1e-3:
            raise AssertionError(f"quantized weights off the grid by {off_grid.max().item():g} steps")
        codes.append(pack_codes((q + half).to(torch.uint8).cpu(), spec.bits))
    zeros = (zero + half).to(torch.uint8) if not spec.symmetric else torch.zeros(0, dtype=torch.uint8)
    return QuantizedExperts(torch.cat(codes), scale.to(torch.float16).cpu(), zeros.cpu(), (E, out, n_in), spec,
                            fallback.cpu())


@torch.no_grad()
def quantize_experts(weight: torch.Tensor, hessian: torch.Tensor | None, token_counts: torch.Tensor | None,
                     spec: QuantSpec) -> QuantizedExperts:
    """Quantize all experts of one projection, weight [E, out, in] (each slice used as F.linear(x, W[e])).

    hessian: [E, in, in] unnormalised sum of x x^T over the rows routed to each expert; token_counts: [E].
    Fallback rule (method "gptq"): experts with token_counts < max(min_tokens, 1), and experts whose dampened
    Hessian is not positive definite (llm-compressor reports them), are quantized by RTN on the same grid;
    `fallback` marks them. Columns that saw no input (zero Hessian diagonal) are set to 0 by GPTQ, as usual.
    """
    if weight.ndim != 3:
        raise ValueError(f"expected fused expert weights [E, out, in], got {tuple(weight.shape)}")
    if spec.method == "hqq":
        return quantize_experts_hqq(weight, spec)
    E, out, n_in = weight.shape
    fallback = _fallback_mask(hessian, token_counts, spec, E)
    scale, zero = _grid(weight, spec)
    use_rtn = (fallback if spec.method == "gptq" else torch.ones(E, dtype=torch.bool)).to(weight.device)
    w_hat = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    w_hat[use_rtn] = _rtn(weight[use_rtn], scale[use_rtn], zero[use_rtn], spec)
    if not use_rtn.all():
        idx, w_q, not_pd = _gptq_subset(weight, hessian, token_counts.cpu(), ~fallback, scale, zero, spec)
        w_hat[idx] = w_q
        fallback[idx.cpu()[not_pd]] = True
    return _pack(weight.shape, w_hat, scale, zero, spec, fallback)


@torch.no_grad()
def quantize_experts_widths(weight: torch.Tensor, hessian: torch.Tensor, token_counts: torch.Tensor,
                            specs: list[QuantSpec]) -> list[QuantizedExperts]:
    """GPTQ at several widths sharing one Hessian factorisation (same damp and min_tokens for all specs).

    quantize_weight() dampens and factorises the Hessian (Cholesky, inverse, Cholesky) on every call; here
    llm-compressor's own factorize_hessian runs once and its gptq_block_update runs the loop of
    quantize_weight (without activation ordering) once per width. Results equal quantize_experts().
    """
    if {(s.method, s.damp, s.min_tokens) for s in specs} != {("gptq", specs[0].damp, specs[0].min_tokens)}:
        raise ValueError("shared-Hessian quantization needs GPTQ specs with equal damp and min_tokens")
    E, out, n_in = weight.shape
    fallback = _fallback_mask(hessian, token_counts, specs[0], E)
    idx = (~fallback).nonzero().flatten()
    dev_idx = idx.to(weight.device)
    w_base = weight[dev_idx].float().clone()
    h = _normalised_hessians(hessian, token_counts.cpu(), idx, weight.device)
    not_pd = torch.zeros(len(idx), dtype=torch.bool, device=weight.device)
    h_inv = factorize_hessian(w_base, h, specs[0].damp, not_pd)  # also zeroes dead columns of w_base
    fallback[idx[not_pd.cpu()]] = True
    dev_fallback = fallback.to(weight.device)
    results = []
    for spec in specs:
        scale, zero = _grid(weight, spec)
        w_hat = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        w_hat[dev_fallback] = _rtn(weight[dev_fallback], scale[dev_fallback], zero[dev_fallback], spec)
        if len(idx):
            w_hat[dev_idx] = _gptq_loop(w_base.clone(), h_inv, scale[dev_idx], zero[dev_idx], spec)
        results.append(_pack(weight.shape, w_hat, scale, zero, spec, fallback.clone()))
    return results


def quantize_all_widths(weight: torch.Tensor, hessian: torch.Tensor | None, token_counts: torch.Tensor | None,
                        specs: list[QuantSpec]) -> list[QuantizedExperts]:
    """Every spec of one projection; GPTQ specs share one Hessian factorisation (quantize_experts_widths),
    RTN and HQQ need no Hessian."""
    if specs and all(s.method == "gptq" for s in specs):
        return quantize_experts_widths(weight, hessian, token_counts, specs)
    return [quantize_experts(weight, hessian, token_counts, s) for s in specs]


def _gptq_loop(W, h_inv, scale, zero, spec, blocksize=GPTQ_BLOCKSIZE):
    """The block loop of llm-compressor's quantize_weight (no actorder), given the factorised Hessian."""
    n_in = W.shape[-1]
    args = spec.quant_args()
    g_idx = None if spec.per_channel else torch.arange(n_in, dtype=torch.int, device=W.device) // spec.group_size
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = W[:, :, i1:i2].clone()
        Q1, Err1, losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        gptq_block_update(W1, h_inv[:, i1:i2, i1:i2], Q1, Err1, losses1, scale=scale, zero_point=zero,
                          global_scale=None, g_idx=g_idx, quant_args=args, i1=i1)
        W[:, :, i1:i2] = Q1
        W[:, :, i2:] -= torch.bmm(Err1, h_inv[:, i1:i2, i2:])
    return W


def hqq_group_size(spec: QuantSpec, n_in: int) -> int:
    gs = spec.columns_per_group(n_in)
    if n_in % gs:
        raise ValueError(f"method 'hqq' needs the input width {n_in} to be a multiple of group_size {gs} "
                         f"(hqq groups the flattened weight); choose a group size dividing it, or -1")
    return gs


def hqq_expert(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict]:
    """hqq's Quantizer.quantize on one expert's [out, in] weight: (unpacked codes [out*in/gs, gs], hqq meta)."""
    from hqq.core.quantize import Quantizer

    # device must be named: hqq defaults to "cuda". On CUDA hqq optimises in float16, on the CPU in float32.
    return Quantizer.quantize(weight.float(), nbits=spec.bits, channel_wise=True,
                              group_size=hqq_group_size(spec, weight.shape[-1]), optimize=True, axis=1,
                              bitpack=False, device=str(weight.device))


@torch.no_grad()
def quantize_experts_hqq(weight: torch.Tensor, spec: QuantSpec) -> QuantizedExperts:
    """HQQ of every expert (one hqq call per expert: hqq's early stopping looks at the whole tensor it is
    given, so this is what quantizing each expert's nn.Linear with hqq gives)."""
    E, out, n_in = weight.shape
    G = n_in // hqq_group_size(spec, n_in)
    codes, scales, zeros = [], [], []
    for e in range(E):
        w_q, meta = hqq_expert(weight[e], spec)
        u = w_q.reshape(out, n_in)
        if u.min() < 0 or u.max() >= 1 << spec.bits or not torch.equal(u, u.round()):
            raise AssertionError("hqq returned codes outside the integer grid")
        codes.append(pack_codes(u.to(torch.uint8).cpu(), spec.bits))
        scales.append(meta["scale"].reshape(out, G).to(torch.float16).cpu())
        zeros.append(meta["zero"].reshape(out, G).to(torch.float16).cpu())
    return QuantizedExperts(torch.stack(codes), torch.stack(scales), torch.stack(zeros), (E, out, n_in), spec)


def dequantize(q: QuantizedExperts, dtype=torch.float32) -> torch.Tensor:
    """[E, out, in] weights in `dtype` (computed in float32, then cast). Zero points may be uint8 (integer
    grid: gptq, rtn) or float16 (hqq); the formula (u - z) * s is the same."""
    E, out, n_in = q.shape
    spec = q.spec
    u = unpack_codes(q.codes, spec.bits, n_in).float()
    zu = q.zeros.float() if not spec.symmetric else torch.full_like(q.scales, _half(spec.bits), dtype=torch.float32)
    return ((u - _per_column(zu, spec, n_in)) * _per_column(q.scales.float(), spec, n_in)).to(dtype)


def expert_nbytes(q: QuantizedExperts) -> torch.Tensor:
    """int64 [E]: bytes of one expert's codes + scales + zeros (all experts of a projection are equal), by
    format.packed_expert_bytes, the formula the DAG-time budget checks use."""
    E, out, n_in = q.shape
    spec = q.spec
    per_expert = format.packed_expert_bytes(out, n_in, spec.bits, spec.group_size, spec.symmetric, spec.method)
    return torch.full((E,), per_expert, dtype=torch.int64)


def relative_output_error(weight: torch.Tensor, weight_hat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per expert ||X W^T - X W_hat^T||_F / ||X W^T||_F; inputs [tokens, in] shared or [E, tokens, in]."""
    x = inputs.float()
    if x.ndim == 2:
        x = x.expand(weight.shape[0], *x.shape)
    ref = torch.bmm(x, weight.float().transpose(1, 2))
    diff = ref - torch.bmm(x, weight_hat.float().transpose(1, 2))
    return diff.flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)
