"""The layer-by-layer profile stage (layerwise.run_layerwise) against the whole-model profile it replaced.

Exact equality throughout: on the CPU the layer-by-layer pass runs the very same modules over the same batches
in the same order (tests/unit/test_calibrate.py shows its hidden states give bit-identical Hessians), so every
float64 sum of routed probability mass and every selection count must come out identical, not merely close.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from family_models import FAMILIES, build_family_checkpoint
from moesweep.calibrate import _batches, profile_hotness, profile_hotness_layerwise
from moesweep.data.sources import load_split, problems_hash, training_text
from moesweep.grid import config_hash
from moesweep.layerwise import LayerwiseModel, skeleton
from moesweep.model import ModelError, load_model
from moesweep.stages import profile_stage

TEXTS = ["Question: Tom has 3 apples and buys 4 more.\nAnswer: 3+4=<<3+4=7>>7\n#### 7", "Question: 5 times 6?\nAnswer: 30",
         "Question: x\nAnswer: y", "Question: A train leaves at 3 and arrives at 7. How long?\nAnswer: 7-3=<<7-3=4>>4\n#### 4"]
SYNTH = {"source": "synthetic", "split": "test", "limit": 4}
PROFILE = {"n_samples": 10, "max_length": 64, "batch_size": 4}  # 3 batches, the last one short, left padding


def layerwise_rows(model_id: str, texts, max_length: int, batch_size: int) -> tuple[list[dict], object]:
    _, tok, _ = load_model(model_id)  # the same tokenizer settings as the stage's (left padding, pad = eos)
    ckpt, sk, adapter, dtype = skeleton(model_id)
    runner = LayerwiseModel(ckpt, sk, adapter, dtype, _batches(tok, texts, max_length, batch_size, "cpu"))
    return profile_hotness_layerwise(runner, adapter), sk


def assert_rows_identical(got: list[dict], ref: list[dict]) -> None:
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        assert g == r, (g, r)  # every value exactly: float64 masses and shares, int counts and ranks


def test_layerwise_profile_equals_whole_model_on_the_embedded_model(embedded_model):
    model, tok, adapter = load_model(str(embedded_model))
    ref = profile_hotness(model, tok, adapter, TEXTS * 3, max_length=64, batch_size=5)
    got, sk = layerwise_rows(str(embedded_model), TEXTS * 3, 64, 5)
    assert_rows_identical(got, ref)
    # padding is not counted: tokens = the valid tokens of every batch, k selections each
    enc = tok(TEXTS * 3, padding=True, truncation=True, max_length=64, add_special_tokens=False)
    valid = sum(sum(m) for m in enc["attention_mask"])
    assert {r["tokens"] for r in got} == {valid}
    per_layer = pd.DataFrame(got).groupby("layer")["selections"].sum()
    assert (per_layer == valid * adapter.top_k).all() and len(per_layer) == len(adapter.layers())
    assert all(p.device.type == "meta" for p in sk.parameters())  # every layer was released


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_checkpoint(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_profile_equals_whole_model_on_each_family(family_checkpoints, family):
    """Qwen2-MoE (a dense layer between MoE layers, shared expert), OLMoE, Mixtral (float32 router weights,
    block_sparse_moe names) and Phi-3.5-MoE (sparsemixer router): the tensor names each family's checkpoint
    uses are read through its adapter, and the rows equal the whole-model pass's."""
    path = str(family_checkpoints[family])
    model, tok, adapter = load_model(path)
    ref = profile_hotness(model, tok, adapter, TEXTS, max_length=64, batch_size=3)
    got, _ = layerwise_rows(path, TEXTS, 64, 3)
    assert_rows_identical(got, ref)
    assert sorted({r["layer"] for r in got}) == [l.index for l in adapter.layers()]


def test_profile_stage_writes_what_the_whole_model_path_wrote(embedded_model, tmp_path):
    """The stage's table, column for column and value for value, equals the table the stage wrote when it loaded
    the whole model (rebuilt here from profile_hotness), config_hash included (of the config with its `device`)."""
    model_cfg = {"id": str(embedded_model)}
    out = tmp_path / "hotness.parquet"
    profile_stage(model_cfg, SYNTH, {**PROFILE, "device": "cpu"}, 0, str(out))
    got = pd.read_parquet(out)

    torch.manual_seed(0)
    problems = load_split(SYNTH, "train", PROFILE["n_samples"], 0, "profile")
    model, tok, adapter = load_model(str(embedded_model))
    ref = pd.DataFrame(profile_hotness(model, tok, adapter, [training_text(p) for p in problems],
                                       PROFILE["max_length"], PROFILE["batch_size"]))
    ref["config_hash"] = config_hash(model_cfg, SYNTH, {**PROFILE, "device": "cpu"}, 0)
    ref["profile_source"] = "synthetic [train]"  # provenance of the profiled problems (issue 19)
    ref["profile_hash"] = problems_hash(problems)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    assert got.columns.tolist() == ["layer", "expert", "selections", "selection_share", "prob_mass", "prob_share",
                                    "hotness_rank", "tokens", "config_hash", "profile_source", "profile_hash"]


def test_profile_device_is_honoured_and_checked(embedded_model, tmp_path):
    model_cfg = {"id": str(embedded_model)}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
            profile_stage(model_cfg, SYNTH, {**PROFILE, "device": "cuda"}, 0, str(tmp_path / "h.parquet"))
        assert not (tmp_path / "h.parquet").exists()
    # auto picks what is there and gives the same table as an explicit cpu on a CPU-only machine
    profile_stage(model_cfg, SYNTH, {**PROFILE, "device": "auto"}, 0, str(tmp_path / "auto.parquet"))
    profile_stage(model_cfg, SYNTH, PROFILE, 0, str(tmp_path / "default.parquet"))
    auto, default = pd.read_parquet(tmp_path / "auto.parquet"), pd.read_parquet(tmp_path / "default.parquet")
    assert (auto["config_hash"] != default["config_hash"]).all()  # the device is part of the config hash
    auto, default = auto.drop(columns="config_hash"), default.drop(columns="config_hash")
    if not torch.cuda.is_available():
        pd.testing.assert_frame_equal(auto, default, check_exact=True)
    else:  # on a GPU the kernels differ: the same layers and experts, the same token count
        assert auto[["layer", "expert", "tokens"]].equals(default[["layer", "expert", "tokens"]])


def test_a_checkpoint_without_moe_layers_is_refused(tmp_path):
    """The skeleton refuses it with the message load_model gives, before any weight is read."""
    ckpt = build_family_checkpoint("qwen2_moe", tmp_path / "dense", mlp_only_layers=[0, 1, 2])
    with pytest.raises(ModelError, match="no MoE layers found"):
        skeleton(str(ckpt))


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_calibration_equals_whole_model_on_each_family(family_checkpoints, family):
    """The layer loop the profile now shares with calibration, on every family. Regression: Qwen2-MoE's config
    sets sliding_window = 0 (not None) when sliding is off and picks its masks per config.layer_types; the
    layer-by-layer path used to read that 0 as a sliding window, so its Qwen2-MoE Hessians were wrong."""
    from moesweep.calibrate import collect_calibration, collect_calibration_layerwise

    path = str(family_checkpoints[family])
    model, tok, adapter = load_model(path)
    ref = collect_calibration(model, tok, adapter, TEXTS, max_length=64, batch_size=3)
    ckpt, sk, sk_adapter, dtype = skeleton(path)
    runner = LayerwiseModel(ckpt, sk, sk_adapter, dtype, _batches(tok, TEXTS, 64, 3, "cpu"))
    res = collect_calibration_layerwise({"c": runner}, sk_adapter)["c"]
    assert res.skip_beta == ref.skip_beta and sorted(res.hessians) == sorted(ref.hessians)
    for key in ref.hessians:
        assert torch.equal(res.hessians[key], ref.hessians[key]), key
    for key in ref.token_counts:
        assert torch.equal(res.token_counts[key], ref.token_counts[key]), key
