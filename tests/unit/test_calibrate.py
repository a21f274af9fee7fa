"""Calibration Hessians and hotness profiles against a direct recomputation."""
import torch

from moesweep.calibrate import collect_calibration, profile_hotness
from moesweep.model import load_model

TEXTS = ["Question: Tom has 3 apples and buys 4 more.\nAnswer: 3+4=<<3+4=7>>7\n#### 7", "Question: 5 times 6?\nAnswer: 30",
         "Question: x\nAnswer: y"]


def test_hessians_equal_xtx_of_routed_tokens(random_checkpoint):
    model, tok, adapter = load_model(str(random_checkpoint))
    captured = {}
    first = adapter.layers()[0]
    handle = first.block.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0].detach().clone()))
    res = collect_calibration(model, tok, adapter, TEXTS, max_length=64, batch_size=3)
    handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    valid = enc.attention_mask.bool().reshape(-1)
    with torch.no_grad():
        probs = torch.softmax(torch.nn.functional.linear(x, first.router.weight), dim=-1)
    index = probs.topk(adapter.top_k, dim=-1).indices
    for e in range(adapter.num_experts):
        rows = ((index == e).any(-1) & valid)
        xe = x[rows].double()
        torch.testing.assert_close(res.hessians[f"layers.{first.index}.gate_up_proj"][e].double(), xe.T @ xe, rtol=1e-4, atol=1e-4)
        assert int(res.token_counts[f"layers.{first.index}"][e]) == int(rows.sum())
    assert res.tokens == int(valid.sum())
    assert all(0 < b <= 1 for b in res.skip_beta.values())
    # the model's routers are restored afterwards
    assert type(first.block.gate).__name__ == "PolicyRouter"


def test_hotness_shares_sum_to_one(random_checkpoint):
    model, tok, adapter = load_model(str(random_checkpoint))
    rows = profile_hotness(model, tok, adapter, TEXTS, max_length=64, batch_size=2)
    by_layer = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    for layer_rows in by_layer.values():
        assert abs(sum(r["prob_share"] for r in layer_rows) - 1) < 1e-9
        assert abs(sum(r["selection_share"] for r in layer_rows) - 1) < 1e-9
        assert sorted(r["hotness_rank"] for r in layer_rows) == list(range(adapter.num_experts))


def test_all_tokens_mode_gives_every_expert_every_token(random_checkpoint):
    model, tok, adapter = load_model(str(random_checkpoint))
    routed = collect_calibration(model, tok, adapter, TEXTS, max_length=64, batch_size=3)
    every = collect_calibration(model, tok, adapter, TEXTS, max_length=64, batch_size=3, expert_inputs="all")
    for key, counts in every.token_counts.items():
        assert (counts == every.tokens).all()
        assert int(routed.token_counts[key].sum()) == every.tokens * adapter.top_k
    layer = adapter.layers()[0].index
    h = every.hessians[f"layers.{layer}.gate_up_proj"]
    torch.testing.assert_close(h[0], h[-1])  # the same inputs reach every expert's gate_up projection
    assert routed.skip_beta == every.skip_beta  # routing, and so everything downstream, is unchanged


# --- layer-by-layer path (layerwise.py) against the whole-model path ---------------------------------------

import json  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from moesweep.calibrate import _batches, collect_calibration_layerwise  # noqa: E402
from moesweep.checks import ConfigError, check_calibration_source  # noqa: E402
from moesweep.layerwise import LayerwiseModel, LazyCheckpoint, skeleton, write_random_checkpoint  # noqa: E402
from moesweep.quant import load_quantized  # noqa: E402
from moesweep.stages import calibrate_stage, calibration_samples, fused_quantize_stage, quantize_stage  # noqa: E402


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_layerwise_calibration_is_bit_identical_to_whole_model(embedded_model, mode):
    model, tok, adapter = load_model(str(embedded_model))
    ref = collect_calibration(model, tok, adapter, TEXTS * 3, max_length=64, batch_size=4, expert_inputs=mode)
    ckpt, sk, sk_adapter, dtype = skeleton(str(embedded_model))
    runner = LayerwiseModel(ckpt, sk, sk_adapter, dtype, _batches(tok, TEXTS * 3, 64, 4, "cpu"))
    res = collect_calibration_layerwise({"c": runner}, sk_adapter, mode)["c"]
    assert res.tokens == ref.tokens and res.skip_beta == ref.skip_beta
    assert sorted(res.hessians) == sorted(ref.hessians) and sorted(res.token_counts) == sorted(ref.token_counts)
    for key in ref.hessians:
        assert torch.equal(res.hessians[key], ref.hessians[key]), key
    for key in ref.token_counts:
        assert torch.equal(res.token_counts[key], ref.token_counts[key])
    assert all(p.device.type == "meta" for p in sk.parameters())  # every layer was released


def test_lazy_expert_weights_equal_from_pretrained(embedded_model):
    model, _, adapter = load_model(str(embedded_model))
    ckpt = LazyCheckpoint(str(embedded_model))
    for layer in adapter.layers():
        lazy = ckpt.experts(layer.index, torch.float32)
        for name in adapter.projections:
            assert torch.equal(lazy[name], getattr(layer.experts, name).detach())


QUANT = {"method": "gptq", "group_size": 32, "min_tokens": 4, "damp": 0.01}
SYNTH = {"source": "synthetic", "split": "test", "limit": 4}
CAL = {"n_samples": 6, "n_heldout": 3, "max_length": 64, "batch_size": 4}


def staged_and_fused(model, d, quant, calib=CAL, widths=(8, 2)):
    calibrate_stage(model, SYNTH, calib, 0, d / "h.safetensors", d / "ho.safetensors", d / "stats.json")
    for b in widths:
        quantize_stage(model, quant, b, quant["method"], str(d / "h.safetensors"), str(d / "ho.safetensors"),
                       str(d / f"s{b}.safetensors"), str(d / f"s{b}.parquet"))
    fused_quantize_stage(model, SYNTH, calib, quant, 0, list(widths), quant["method"],
                         {b: str(d / f"f{b}.safetensors") for b in widths},
                         {b: str(d / f"f{b}.parquet") for b in widths}, str(d / "fstats.json"))


@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_fused_stage_equals_calibrate_then_quantize(embedded_model, tmp_path, method):
    model = {"id": str(embedded_model)}
    quant = {**QUANT, "method": method}
    staged_and_fused(model, tmp_path, quant)
    for b in (8, 2):
        s, _ = load_quantized(tmp_path / f"s{b}.safetensors", {"model_id": str(embedded_model), "method": method})
        f, _ = load_quantized(tmp_path / f"f{b}.safetensors", {"model_id": str(embedded_model), "method": method})
        assert sorted(s) == sorted(f)
        for name in s:
            for part in ("codes", "scales", "zeros", "fallback"):
                assert torch.equal(getattr(s[name], part), getattr(f[name], part)), (name, part)
        es, ef = pd.read_parquet(tmp_path / f"s{b}.parquet"), pd.read_parquet(tmp_path / f"f{b}.parquet")
        pd.testing.assert_frame_equal(es, ef, check_exact=False, rtol=1e-6)
        assert len(es) == 4 * 16 * 2 and (es["relative_error"] > 0).mean() > 0.9  # 0 where no held-out token
    stats, fstats = json.loads((tmp_path / "stats.json").read_text()), json.loads((tmp_path / "fstats.json").read_text())
    assert stats == fstats


@pytest.mark.slow  # about 50 s on 2 shared cores: a 75M-parameter layer is written and run
def test_30b_layer_shapes_on_cpu(tmp_path):
    """Qwen3-30B-A3B's layer shapes (hidden 2048, moe_intermediate 768, 32/4 heads of 128, top-8) with 16
    experts instead of 128 (Hessian memory: the full count is benchmarks/quantize_layerwise.py's job), one
    layer, small vocab: the fused path runs from per-expert shards (equality with the staged path is tested
    on the embedded model above)."""
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=16, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
                         eos_token_id=0, pad_token_id=0)
    ckpt = write_random_checkpoint(tmp_path / "ckpt", cfg, EMBEDDED_MODEL_DIR)
    assert len(list(ckpt.glob("*.safetensors"))) == 2  # embeddings + one layer, per-expert tensors
    calib = {"n_samples": 4, "n_heldout": 2, "max_length": 24, "batch_size": 2}
    fused_quantize_stage({"id": str(ckpt)}, SYNTH, calib, {**QUANT, "method": "rtn", "group_size": 128}, 0, [4], "rtn",
                         {4: str(tmp_path / "f4.safetensors")}, {4: str(tmp_path / "f4.parquet")}, str(tmp_path / "s.json"))
    f, _ = load_quantized(tmp_path / "f4.safetensors", {"shapes": {"layers.0.gate_up_proj": (16, 1536, 2048),
                                                                   "layers.0.down_proj": (16, 2048, 768)}})
    err = pd.read_parquet(tmp_path / "f4.parquet")
    assert err["heldout_tokens"].sum() == 2 * (2 * 24 * 8)  # both projections see the 2 x 24 tokens' 8 experts
    # RTN 4 bit, group 128 on Gaussian weights: about 9 % relative output error
    assert err.loc[err.heldout_tokens > 0, "relative_error"].between(0.05, 0.2).all()


# --- plain-text calibration ---------------------------------------------------------------------------

from conftest import EMBEDDED_MODEL as EMBEDDED_MODEL_DIR  # noqa: E402

PROSE = ("The river ran past the mill and under the old stone bridge. " * 3 + "\n") * 1


def text_file(tmp_path, kind):
    docs = [f"Document {i}. " + PROSE * (1 + i % 3) for i in range(30)]
    if kind == "txt":
        p = tmp_path / "corpus.txt"
        p.write_text("\n\n".join(docs))
    else:
        p = tmp_path / "corpus.jsonl"
        p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n")
    return p


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_text_calibration_gives_chunks_of_max_length_tokens(embedded_model, tmp_path, kind):
    from moesweep.stages import _tokenizer

    tok = _tokenizer({"id": str(embedded_model)})
    calib = {"n_samples": 5, "n_heldout": 2, "max_length": 48, "format": "text", "source": str(text_file(tmp_path, kind))}
    chunks, provenance = calibration_samples(SYNTH, calib, 0, tok)
    assert provenance["calibration_source"].endswith("[train, text]") and len(provenance["calibration_hash"]) == 16
    assert len(chunks) == 7 and all(len(c) == 48 for c in chunks)
    assert "river" in tok.decode(chunks[0]) and "Question:" not in tok.decode(chunks[0])
    assert chunks == calibration_samples(SYNTH, calib, 0, tok)[0]  # deterministic by seed
    if kind == "jsonl":  # documents are shuffled by seed (a .txt file is one document)
        assert chunks != calibration_samples(SYNTH, calib, 1, tok)[0]
    with pytest.raises(ValueError, match="needs n_samples \\+ n_heldout = 1007 chunks"):
        calibration_samples(SYNTH, {**calib, "n_samples": 1005}, 0, tok)
    if kind == "jsonl":
        with pytest.raises(ValueError, match="no 'body' field .* set calibration.text_field"):
            calibration_samples(SYNTH, {**calib, "text_field": "body"}, 0, tok)


def test_text_calibration_runs_the_calibrate_stage(embedded_model, tmp_path):
    calib = {"n_samples": 4, "n_heldout": 2, "max_length": 40, "batch_size": 4, "format": "text",
             "source": str(text_file(tmp_path, "txt"))}
    calibrate_stage({"id": str(embedded_model)}, SYNTH, calib, 0, tmp_path / "h.safetensors",
                    tmp_path / "ho.safetensors", tmp_path / "stats.json")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["tokens"] == 4 * 40 and stats["samples"] == 4  # no padding: every chunk is max_length long


def test_text_calibration_source_checked_when_the_dag_is_built(tmp_path):
    good = text_file(tmp_path, "jsonl")
    check_calibration_source({"format": "text", "source": str(good)})
    check_calibration_source({"format": "text", "source": "Salesforce/wikitext"})  # hub ids: checked on load
    pd.DataFrame({"body": ["a b c"]}).to_parquet(tmp_path / "t.parquet")
    cases = [({"format": "text", "source": "synthetic"}, "needs calibration.source"),
             ({"format": "text"}, "needs calibration.source"),
             ({"format": "text", "source": str(tmp_path / "missing.txt")}, "no such file"),
             ({"format": "text", "source": str(tmp_path / "corpus.csv")}, "must end in .txt"),
             ({"format": "text", "source": str(good), "text_field": "body"}, "no 'body' field"),
             ({"format": "text", "source": str(tmp_path / "t.parquet")}, "no column 'text'"),
             ({"source": str(tmp_path / "corpus.txt")}, "must end in .jsonl")]  # problems format: GSM files only
    (tmp_path / "empty.txt").write_text("")
    cases.append(({"format": "text", "source": str(tmp_path / "empty.txt")}, "empty"))
    for calib, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_calibration_source(calib)
