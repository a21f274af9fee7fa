"""Expert quantization library: packing, grids, GPTQ vs RTN, storage."""
import json
import math

import pytest
import torch

from moesweep.io import ArtefactError
from moesweep.quant import (QuantSpec, dequantize, expert_nbytes, load_quantized, pack_codes, quantize_experts,
                            quantize_experts_widths, quantize_model_experts, relative_output_error,
                            save_quantized, unpack_codes)

WIDTHS = (2, 3, 4, 8)
E, OUT, IN = 3, 64, 128


def correlated_inputs(tokens=1024, n_in=IN, rank=32, seed=0):
    """Columns driven by a few shared factors plus a little noise: the case GPTQ is built for."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g)
    return z @ torch.randn(rank, n_in, generator=g) + 0.1 * torch.randn(tokens, n_in, generator=g)


def weights(e=E, out=OUT, n_in=IN, seed=1):
    return torch.randn(e, out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.02


def hessian_for(x, e=E):
    return torch.stack([x.T @ x] * e), torch.full((e,), x.shape[0])


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", [1, 7, 8, 13, 129])
def test_packing_round_trips_exactly(bits, n):
    codes = torch.randint(0, 1 << bits, (2, 5, n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, math.ceil(n * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packing_layout_is_lsb_first_bit_stream():
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3).tolist() == [0xD1, 0x58, 0x1F]
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]


def test_packing_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", [-1, 32, 48])  # 48: ragged last group (128 = 2*48 + 32)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_stays_within_half_a_step(bits, group_size, symmetric):
    w = weights()
    q = quantize_experts(w, None, None, QuantSpec(bits, group_size, symmetric, method="rtn"))
    spec = q.spec
    assert q.scales.dtype == torch.float16 and q.scales.shape == (E, OUT, spec.n_groups(IN))
    assert q.zeros.numel() == 0 if symmetric else q.zeros.shape == q.scales.shape
    per_col = lambda t: t.float().repeat_interleave(spec.columns_per_group(IN), -1)[..., :IN]
    step = per_col(q.scales)
    zero = per_col(q.zeros) if not symmetric else torch.full_like(step, 2 ** (bits - 1))
    lo, hi = (0 - zero) * step, (2**bits - 1 - zero) * step  # the grid's end points
    err = (dequantize(q) - w).abs()
    inside = (w >= lo) & (w <= hi)
    slack = 1 + 1e-4  # float rounding
    assert (err[inside] <= 0.5 * step[inside] * slack).all()
    # Weights past an end point (integer zero point, float16 scale) are clamped, still within one step.
    assert (err <= step * slack).all()
    assert not q.fallback.any()


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size,symmetric", [(-1, False), (32, True), (-1, True), (32, False)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, symmetric):
    x = correlated_inputs()
    w = weights()
    h, n = hessian_for(x)
    gptq = quantize_experts(w, h, n, QuantSpec(bits, group_size, symmetric, method="gptq"))
    rtn = quantize_experts(w, None, None, QuantSpec(bits, group_size, symmetric, method="rtn"))
    ratio = relative_output_error(w, dequantize(gptq), x) / relative_output_error(w, dequantize(rtn), x)
    assert (ratio < 0.8).all(), ratio  # measured 0.35-0.42 here
    assert not gptq.fallback.any()


def test_gptq_output_is_on_the_stored_grid_and_matches_shared_hessian_path():
    x = correlated_inputs()
    w = weights()
    h, n = hessian_for(x)
    specs = [QuantSpec(b, 32) for b in WIDTHS]
    shared = quantize_experts_widths(w, h, n, specs)
    for spec, q in zip(specs, shared):
        single = quantize_experts(w, h, n, spec)
        assert torch.equal(single.codes, q.codes) and torch.equal(single.scales, q.scales)


def test_experts_without_tokens_fall_back_to_rtn():
    x = correlated_inputs()
    w = weights()
    h, n = hessian_for(x)
    h[1] = 0
    n[1] = 0
    n[2] = 10
    spec = QuantSpec(4, 32, min_tokens=16)
    q = quantize_experts(w, h, n, spec)
    assert q.fallback.tolist() == [False, True, True]
    rtn = quantize_experts(w, None, None, QuantSpec(4, 32, method="rtn"))
    assert torch.equal(q.codes[1:], rtn.codes[1:]) and not torch.equal(q.codes[0], rtn.codes[0])


def test_all_experts_falling_back_needs_no_gptq_call():
    w = weights()
    q = quantize_experts(w, torch.zeros(E, IN, IN), torch.zeros(E, dtype=torch.long), QuantSpec(3, -1))
    assert q.fallback.all()


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, 48, False), (4, -1, True), (2, 32, False)])
def test_expert_nbytes_is_exact(bits, group_size, symmetric):
    q = quantize_experts(weights(), None, None, QuantSpec(bits, group_size, symmetric, method="rtn"))
    n_groups = QuantSpec(bits, group_size).n_groups(IN)
    expected = OUT * math.ceil(IN * bits / 8) + OUT * n_groups * 2 + (0 if symmetric else OUT * n_groups)
    slices = q.codes[0].nbytes + q.scales[0].nbytes + (q.zeros[0].nbytes if q.zeros.numel() else 0)
    assert expert_nbytes(q).tolist() == [expected] * E and slices == expected


def small_model(spec):
    x = correlated_inputs(n_in=IN)
    act = correlated_inputs(n_in=OUT, seed=2)
    ws = {i: {"gate_up_proj": weights(seed=10 + i), "down_proj": weights(out=IN, n_in=OUT, seed=20 + i)} for i in (0, 1)}
    hs = {i: {"gate_up_proj": hessian_for(x)[0], "down_proj": hessian_for(act)[0]} for i in (0, 1)}
    counts = {i: torch.tensor([1024, 0, 1024]) for i in (0, 1)}
    return quantize_model_experts(ws, hs, counts, spec), ws


@pytest.mark.parametrize("symmetric", [False, True])
def test_save_load_round_trip(tmp_path, symmetric):
    spec = QuantSpec(3, 32, symmetric)
    layers, ws = small_model(spec)
    assert sorted(layers) == ["layers.0.down_proj", "layers.0.gate_up_proj", "layers.1.down_proj", "layers.1.gate_up_proj"]
    path = tmp_path / "experts.safetensors"
    save_quantized(path, layers, {"model_id": "tiny/qwen3-moe", "calibration_hash": "abc"})
    shapes = {name: q.shape for name, q in layers.items()}
    loaded, meta = load_quantized(path, {"model_id": "tiny/qwen3-moe", "bits": 3, "shapes": shapes})
    assert meta["format"] == "moesweep-quantized" and meta["calibration_hash"] == "abc"
    assert json.loads(meta["shapes"])["layers.1.down_proj"] == [E, IN, OUT]
    for name, q in layers.items():
        assert loaded[name].spec == spec and loaded[name].shape == q.shape
        assert torch.equal(dequantize(loaded[name]), dequantize(q))
        assert loaded[name].fallback.tolist() == [False, True, False]


def test_load_refuses_other_model_shapes_and_version(tmp_path):
    layers, _ = small_model(QuantSpec(4, -1))
    path = tmp_path / "experts.safetensors"
    save_quantized(path, layers, {"model_id": "tiny/qwen3-moe"})
    with pytest.raises(ArtefactError, match=r"experts\.safetensors.*model_id.*rerun the quantize stage"):
        load_quantized(path, {"model_id": "Qwen/Qwen3-30B-A3B"})
    with pytest.raises(ArtefactError, match="shapes"):
        load_quantized(path, {"shapes": {"layers.0.down_proj": (E, IN, OUT)}})
    with pytest.raises(ArtefactError, match="bits"):
        load_quantized(path, {"bits": 3})
    from safetensors.torch import save_file

    from moesweep.io import save_safetensors
    save_safetensors(tmp_path / "old.safetensors", {"x": torch.zeros(1)},
                     {"format": "moesweep-quantized", "format_version": "0"})
    with pytest.raises(ArtefactError, match="format_version"):
        load_quantized(tmp_path / "old.safetensors", {})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unsealed.safetensors"),
              metadata={"format": "moesweep-quantized", "format_version": "2"})
    with pytest.raises(ArtefactError, match="unsealed.safetensors: no content hash recorded"):
        load_quantized(tmp_path / "unsealed.safetensors", {})


def test_load_refuses_truncated_or_missing_file(tmp_path):
    layers, _ = small_model(QuantSpec(2, 32))
    path = tmp_path / "experts.safetensors"
    save_quantized(path, layers, {"model_id": "tiny/qwen3-moe"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtefactError, match=r"experts\.safetensors.*rerun the quantize stage"):
        load_quantized(path, {"model_id": "tiny/qwen3-moe"})
    with pytest.raises(ArtefactError, match="missing"):
        load_quantized(tmp_path / "nope.safetensors", {})


def test_non_positive_definite_hessian_falls_back_to_rtn():
    x = correlated_inputs()
    w = weights()
    h, n = hessian_for(x)
    h[0] = -h[0]
    q = quantize_experts(w, h, n, QuantSpec(4, 32))
    rtn = quantize_experts(w, None, None, QuantSpec(4, 32, method="rtn"))
    assert q.fallback.tolist() == [True, False, False] and torch.equal(q.codes[0], rtn.codes[0])


# --- HQQ (hqq library), format version 2 (float16 zero points), layer-by-layer writer -------------------

HQQ_BOUND = {32: 0.96, -1: 0.995}  # HQQ/RTN weight error, measured 0.90-0.93 (group 32), 0.95-0.985 (per channel)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", [32, -1])
def test_hqq_weight_error_is_below_rtn(bits, group_size):
    w = weights()
    hqq = quantize_experts(w, None, None, QuantSpec(bits, group_size, method="hqq"))
    rtn = quantize_experts(w, None, None, QuantSpec(bits, group_size, method="rtn"))
    ratio = (dequantize(hqq) - w).flatten(1).norm(dim=1) / (dequantize(rtn) - w).flatten(1).norm(dim=1)
    assert (ratio < HQQ_BOUND[group_size]).all(), ratio
    assert hqq.zeros.dtype == torch.float16 and hqq.scales.dtype == torch.float16 and not hqq.fallback.any()


@pytest.mark.parametrize("bits", WIDTHS)
def test_hqq_codes_and_dequantize_match_hqq_itself(bits):
    from hqq.core.quantize import Quantizer

    from moesweep.quant.core import hqq_expert

    w = weights()
    spec = QuantSpec(bits, 32, method="hqq")
    q = quantize_experts(w, None, None, spec)
    ours = dequantize(q)
    for e in range(E):
        w_q, meta = hqq_expert(w[e], spec)
        assert torch.equal(unpack_codes(q.codes[e], bits, IN).float(), w_q.reshape(OUT, IN))
        # hqq's own dequantize with the float16 meta we store (what HQQLinear keeps with compute_dtype=float16)
        half = {**meta, "compute_dtype": torch.float32, "scale": meta["scale"].half().float(),
                "zero": meta["zero"].half().float()}
        assert torch.equal(Quantizer.dequantize(w_q, half), ours[e])
        # ... and within float16 rounding of hqq's float32 meta
        exact = Quantizer.dequantize(w_q, {**meta, "compute_dtype": torch.float32})
        step = meta["scale"].abs().max().item()
        assert (exact - ours[e]).abs().max().item() < 2 ** -9 * (2 ** bits) * step


def test_hqq_refuses_symmetric_and_ragged_groups():
    with pytest.raises(ValueError, match="no symmetric variant"):
        QuantSpec(4, 32, symmetric=True, method="hqq")
    with pytest.raises(ValueError, match="multiple of group_size 48"):
        quantize_experts(weights(), None, None, QuantSpec(4, 48, method="hqq"))


def test_hqq_store_round_trip(tmp_path):
    spec = QuantSpec(3, 32, method="hqq")
    layers = {"layers.0.gate_up_proj": quantize_experts(weights(), None, None, spec),
              "layers.0.down_proj": quantize_experts(weights(out=IN, n_in=OUT), None, None, spec)}
    path = tmp_path / "hqq.safetensors"
    save_quantized(path, layers, {"model_id": "m"})
    loaded, meta = load_quantized(path, {"model_id": "m", "method": "hqq"})
    assert meta["zero_dtype"] == "float16" and meta["format_version"] == "2"
    for name, q in layers.items():
        assert loaded[name].zeros.dtype == torch.float16 and torch.equal(loaded[name].zeros, q.zeros)
        assert torch.equal(dequantize(loaded[name]), dequantize(q))
    assert expert_nbytes(layers["layers.0.gate_up_proj"]).tolist() == [OUT * IN * 3 // 8 + OUT * 4 * (2 + 2)] * E


def _resave(path, out, edit_tensors=None, edit_meta=None):
    """A copy with edited tensors or metadata, sealed with its own content hash (moesweep.io), so that the
    loader's format checks, not the hash, are what the edit meets."""
    from safetensors import safe_open

    from moesweep.io import HASH_KEY, save_safetensors

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    (edit_tensors or (lambda t: None))(tensors)
    (edit_meta or (lambda m: None))(meta)
    meta.pop(HASH_KEY)
    save_safetensors(out, tensors, meta)


def test_store_reads_version_1_and_validates_dtypes(tmp_path):
    layers, _ = small_model(QuantSpec(4, 32, method="rtn"))
    path = tmp_path / "v2.safetensors"
    save_quantized(path, layers, {"model_id": "m"})
    v1 = tmp_path / "v1.safetensors"  # what version 1 wrote: no zero_dtype key
    _resave(path, v1, edit_meta=lambda m: (m.pop("zero_dtype"), m.update(format_version="1")))
    loaded, _ = load_quantized(v1, {"model_id": "m"})
    assert all(torch.equal(dequantize(loaded[n]), dequantize(q)) for n, q in layers.items())
    wrong = tmp_path / "wrong.safetensors"
    _resave(path, wrong, edit_tensors=lambda t: t.update({"layers.0.down_proj.zeros": t["layers.0.down_proj.zeros"].half()}))
    with pytest.raises(ArtefactError, match=r"layers\.0\.down_proj\.zeros is .*float16.*expected .*uint8"):
        load_quantized(wrong, {})
    claims_hqq = tmp_path / "claims.safetensors"
    _resave(path, claims_hqq, edit_meta=lambda m: m.update(zero_dtype="float16"))
    with pytest.raises(ArtefactError, match="zero_dtype is 'float16', but method 'rtn'"):
        load_quantized(claims_hqq, {})


@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_layer_by_layer_writer_equals_save_quantized(tmp_path, method):
    from moesweep.quant import QuantizedWriter

    layers, _ = small_model(QuantSpec(4, 32, method=method))
    save_quantized(tmp_path / "whole.safetensors", layers, {"model_id": "m"})
    shapes = {n: q.shape for n, q in layers.items()}
    with QuantizedWriter(tmp_path / "streamed.safetensors", QuantSpec(4, 32, method=method), shapes, {"model_id": "m"}) as w:
        for name in reversed(list(layers)):  # any order
            w.add(name, layers[name])
    a, meta_a = load_quantized(tmp_path / "whole.safetensors", {})
    b, meta_b = load_quantized(tmp_path / "streamed.safetensors", {"shapes": shapes})
    assert meta_a == meta_b
    for name in layers:
        for part in ("codes", "scales", "zeros", "fallback"):
            assert torch.equal(getattr(a[name], part), getattr(b[name], part))
    # a file missing a declared layer is never left behind
    with pytest.raises(ValueError, match="never written"):
        with QuantizedWriter(tmp_path / "partial.safetensors", QuantSpec(4, 32, method=method), shapes, {}) as w:
            w.add("layers.0.down_proj", layers["layers.0.down_proj"])
    assert not (tmp_path / "partial.safetensors").exists() and len(list(tmp_path.iterdir())) == 2
