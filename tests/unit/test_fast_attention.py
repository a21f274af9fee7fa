"""Decode attention kernels of the fast engine (fast/attention.py) against the engine's current torch composition.

The reference is what engine._forward does today for one decode token: engine._rms_norm of q and k per head,
transformers' apply_rotary_pos_emb, index_copy_ into the static cache, scaled_dot_product_attention with the
engine's bool mask reshaped for grouped-query attention; and a float64 softmax for the attention values.
On the CPU (CI) the kernels run in Triton's interpreter in float32 (its bf16 loads are broken on CPU tensors);
the op-by-op rounding is then checked in float16, which the interpreter loads correctly. On CUDA everything
runs compiled in bf16.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from moesweep.fast.attention import decode_attention, num_splits, qk_norm_rope_store  # noqa: E402
from moesweep.fast.engine import _rms_norm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 2e-2 if CUDA else 1e-5
EPS = 1e-6
# (query heads, KV heads, head dim): the embedded test model (G=2) and Qwen3-30B-A3B (G=8)
SHAPES = [pytest.param((4, 2, 32), id="G2-D32"), pytest.param((32, 4, 128), id="G8-D128")]
# (cache length, keys per split): one split, and five splits (the last one partial)
LENGTHS = [pytest.param(40, 128, id="L40-1split"), pytest.param(300, 64, id="L300-5splits")]


def _inputs(shape, B, L, seed, dtype=DTYPE):
    """qkv, norm weights, cos/sin of each row's position, and a [layers, B+1, KVH, L, D] cache of noise."""
    Hq, KVH, D = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (Hq + 2 * KVH) * D, generator=g) * 2
    qw, kw = 1 + 0.2 * torch.randn(D, generator=g), 1 + 0.2 * torch.randn(D, generator=g)
    angle = torch.randint(0, 4000, (B, 1), generator=g) / (10000 ** (torch.arange(0, D, 2) / D))
    angle = torch.cat([angle, angle], -1)  # transformers' rotary layout: the frequencies twice
    cache = torch.randn(2, 2, B + 1, KVH, L, D, generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    return (qkv.to(**to), qw.to(**to), kw.to(**to), angle.cos().to(**to), angle.sin().to(**to),
            cache[0].to(**to), cache[1].to(**to))


def _reference_inputs(qkv, qw, kw, cos, sin, shape):
    """engine._attention_inputs after the projections, for one token per row: q, k, v as [B, heads, 1, D]."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

    Hq, KVH, D = shape
    B = qkv.shape[0]
    q, k, v = qkv.view(B, 1, -1, D).split([Hq, KVH, KVH], dim=2)
    q = _rms_norm(q, qw, EPS).transpose(1, 2)
    k = _rms_norm(k, kw, EPS).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None])  # rotary_emb's [B, S=1, D]
    return q, k, v.transpose(1, 2)


def _key_mask(B, L, slot, seed):
    """Rows cycle through: left padding then prompt and generated slots up to `slot` with a few holes; only the
    cache's last key; every slot up to `slot`."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        if b % 3 == 0:
            pad = int(torch.randint(0, slot, (1,), generator=g))
            mask[b, pad:slot + 1] = torch.rand(slot + 1 - pad, generator=g) < 0.8
            mask[b, slot] = True
        elif b % 3 == 1:
            mask[b, L - 1] = True
        else:
            mask[b, :slot + 1] = True
    return mask.to(DEVICE)


def _softmax_reference(q, k_cache, v_cache, mask, scale):
    """float64 grouped-query softmax attention: q [B, Hq, D], caches [B, KVH, L, D], mask [B, L]."""
    B, Hq, D = q.shape
    KVH = k_cache.shape[1]
    qq = q.double().view(B, KVH, Hq // KVH, D)
    s = (qq @ k_cache.double().transpose(-1, -2) * scale).masked_fill(~mask[:, None, None, :], float("-inf"))
    return (s.softmax(-1) @ v_cache.double()).view(B, Hq, D)


def _sdpa_engine(q, k_cache, v_cache, mask, scale):
    """engine._forward's attention for S=1: the G query heads of a KV head as G rows, the mask expanded to match."""
    B, Hq, D = q.shape
    KVH, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // KVH
    key_mask = mask[:, None, None, :]  # [B, 1, S, L]
    m = key_mask.unsqueeze(2).expand(B, 1, G, 1, L).reshape(B, 1, G, L)
    o = F.scaled_dot_product_attention(q.reshape(B, KVH, G, D), k_cache, v_cache, attn_mask=m, scale=scale)
    return o.reshape(B, Hq, D)


def _relative(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_num_splits_depends_on_the_cache_length_only():
    assert num_splits(40) == (2, 32, 32)
    assert num_splits(40, 128) == (1, 64, 64)
    assert num_splits(300, 64) == (5, 64, 64)
    assert num_splits(4096) == (64, 64, 32)
    assert num_splits(4096, 128) == (32, 128, 64)
    assert num_splits(4096, 256) == (16, 256, 64)
    splits, chunk, block_n = num_splits(100_000)
    assert splits <= 64 and splits * chunk >= 100_000 and chunk % block_n == 0 and (splits - 1) * chunk < 100_000


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_store_matches_engine_composition(shape, B):
    Hq, KVH, D = shape
    L, slot = 24, 17
    qkv, qw, kw, cos, sin, k_all, v_all = _inputs(shape, B, L, seed=B)
    k_before, v_before = k_all.clone(), v_all.clone()
    q_out = torch.full((B, Hq, D), float("nan"), device=DEVICE, dtype=DTYPE)
    qk_norm_rope_store(qkv, qw, kw, cos, sin, EPS, k_all[1, :B], v_all[1, :B],
                       torch.tensor([slot], device=DEVICE), q_out)

    q, k, v = _reference_inputs(qkv, qw, kw, cos, sin, shape)
    k_before[1, :B].index_copy_(2, torch.tensor([slot], device=DEVICE), k)
    v_before[1, :B].index_copy_(2, torch.tensor([slot], device=DEVICE), v)
    assert not q_out.isnan().any()
    torch.testing.assert_close(q_out, q[:, :, 0], rtol=TOL, atol=TOL)
    torch.testing.assert_close(k_all, k_before, rtol=TOL, atol=TOL)
    # v is a copy; every cache position other than `slot` of rows < B of layer 1 is untouched, bit for bit
    assert torch.equal(v_all, v_before)
    written = torch.zeros_like(k_all, dtype=torch.bool)
    written[1, :B, :, slot] = True
    assert torch.equal(k_all[~written], k_before[~written])


@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_rounds_like_transformers(shape):
    """In a 16-bit dtype every torch op rounds once; the kernel reproduces each rounding, so the results are the
    eager composition's bits, up to a rare last-bit difference from the float32 mean's summation order."""
    Hq, KVH, D = shape
    dtype = torch.bfloat16 if CUDA else torch.float16
    B, L, slot = 3, 8, 5
    qkv, qw, kw, cos, sin, k_all, v_all = _inputs(shape, B, L, seed=7, dtype=dtype)
    q_out = torch.empty(B, Hq, D, device=DEVICE, dtype=dtype)
    qk_norm_rope_store(qkv, qw, kw, cos, sin, EPS, k_all[0, :B], v_all[0, :B],
                       torch.tensor([slot], device=DEVICE), q_out)
    q, k, _ = _reference_inputs(qkv, qw, kw, cos, sin, shape)
    got = torch.cat([q_out.flatten(), k_all[0, :B, :, slot].flatten()]).float()
    want = torch.cat([q.flatten(), k.flatten()]).float()
    assert (got != want).float().mean() <= 0.01
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * eps, atol=8 * eps)


@pytest.mark.parametrize("L,split_keys", LENGTHS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_matches_softmax_and_engine_sdpa(shape, B, L, split_keys):
    Hq, KVH, D = shape
    _, _, _, _, _, k_all, v_all = _inputs(shape, B, L, seed=L + B)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(B)).to(DEVICE, DTYPE)
    k_cache, v_cache = k_all[1, :B], v_all[1, :B]  # strided views of a [layers, Bmax, KVH, L, D] cache
    mask = _key_mask(B, L, slot=L - 7, seed=L)
    scale = D ** -0.5
    out = torch.full((B, Hq, D), float("nan"), device=DEVICE, dtype=DTYPE)
    decode_attention(q, k_cache, v_cache, mask, scale, out, split_keys=split_keys)

    want = _softmax_reference(q, k_cache, v_cache, mask, scale)
    assert not out.isnan().any()
    assert _relative(out, want) < TOL
    assert _relative(_sdpa_engine(q, k_cache, v_cache, mask, scale), want) < TOL  # the two references agree


@pytest.mark.parametrize("shape", SHAPES)
def test_keys_outside_the_mask_are_never_read(shape):
    """Only the cache's last key allowed and NaN everywhere else: four splits are empty (neutral partials), the
    live one reads one key, and softmax over one key is that key's value, exactly."""
    Hq, KVH, D = shape
    L = 300
    _, _, _, _, _, k_all, v_all = _inputs(shape, 1, L, seed=3)
    k_cache, v_cache = k_all[0, :1], v_all[0, :1]
    k_cache[:, :, :-1] = float("nan")
    v_cache[:, :, :-1] = float("nan")
    mask = torch.zeros(1, L, dtype=torch.bool, device=DEVICE)
    mask[0, -1] = True
    q = torch.randn(1, Hq, D, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    out = torch.full((1, Hq, D), float("nan"), device=DEVICE, dtype=DTYPE)
    decode_attention(q, k_cache, v_cache, mask, D ** -0.5, out, split_keys=64)
    assert torch.equal(out, v_cache[:, :, -1:].expand(1, KVH, Hq // KVH, D).reshape(1, Hq, D))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_step_matches_engine_forward(shape, B):
    """Both kernels as the engine will chain them (write the token's k/v, then attend over the cache including
    it) against the engine's current norm/rope/index_copy_/SDPA step."""
    Hq, KVH, D = shape
    L, slot = 300, 250
    qkv, qw, kw, cos, sin, k_all, v_all = _inputs(shape, B, L, seed=11)
    k_ref, v_ref = k_all.clone(), v_all.clone()
    mask = _key_mask(B, L, slot=slot, seed=5)
    slot_t = torch.tensor([slot], device=DEVICE)
    scale = D ** -0.5

    q_out = torch.empty(B, Hq, D, device=DEVICE, dtype=DTYPE)
    out = torch.full((B, Hq, D), float("nan"), device=DEVICE, dtype=DTYPE)
    qk_norm_rope_store(qkv, qw, kw, cos, sin, EPS, k_all[1, :B], v_all[1, :B], slot_t, q_out)
    decode_attention(q_out, k_all[1, :B], v_all[1, :B], mask, scale, out, split_keys=64)

    q, k, v = _reference_inputs(qkv, qw, kw, cos, sin, shape)
    k_ref[1, :B].index_copy_(2, slot_t, k)
    v_ref[1, :B].index_copy_(2, slot_t, v)
    want = _sdpa_engine(q[:, :, 0], k_ref[1, :B], v_ref[1, :B], mask, scale)
    assert not out.isnan().any()
    assert _relative(out, want) < TOL
    assert _relative(out, _softmax_reference(q[:, :, 0], k_ref[1, :B], v_ref[1, :B], mask, scale)) < TOL
