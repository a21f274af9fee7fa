"""Cost model: equations on hand-computed cases, profiles and their refusals, traffic accounting, aggregation."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moesweep.costmodel import (GIB, HARDWARE_FILE, CostModelError, CostModelSettings, DecodeTraffic, HostTrafficMeter,
                                ModelShapes, cell_traffic, load_cost_model, load_hardware_file, predict,
                                profile_from_dict, random_distinct)
from moesweep.grid import Routing
from moesweep.routing import PolicyRouter, RoutingContext

REPO = Path(__file__).resolve().parents[2]
QWEN3_30B = REPO / "config" / "models" / "qwen3-30b-a3b.json"


def spec(**over):
    s = {"label": "test card", "hbm_bandwidth_gb_s": 1000, "memory_gib": 1, "host_link_gb_s": 32,
         "bandwidth_efficiency": 0.5, "host_link_efficiency": 1.0, "kernel_launch_us": 5, "kernels_per_layer": 10,
         "step_overhead_us": 100, "reserved_gib": 0, "source": "made up for the test"}
    s.update(over)
    return s


def traffic(**over):
    t = dict(model="m", layers=4, tokens_per_step=8, dense_bytes=2e8, expert_bytes=7e8, kv_bytes=1e8, host_bytes=32e6,
             resident_weight_bytes=GIB / 2, kv_cache_bytes=GIB / 4)
    t.update(over)
    return DecodeTraffic(**t)


# ------------------------------------------------------------------------------------------------ equations

def test_step_time_is_bytes_over_bandwidth_plus_link_plus_overhead():
    p = predict(traffic(), profile_from_dict("card", spec(), "test"))
    assert p.hbm_s == pytest.approx(1e9 / (1000e9 * 0.5))  # 2 ms: 1 GB at half of 1 TB/s
    assert p.host_s == pytest.approx(32e6 / 32e9)  # 1 ms
    assert p.overhead_s == pytest.approx(100e-6 + 4 * 10 * 5e-6)  # 0.3 ms
    assert p.step_s == pytest.approx(3.3e-3)
    assert p.tokens_per_s == pytest.approx(8 / 3.3e-3)
    overlapped = predict(traffic(), profile_from_dict("card", spec(), "test"), overlap_host_link=True)
    assert overlapped.step_s == pytest.approx(2.3e-3)  # the link hides behind the HBM reads


def test_bandwidth_bound_roofline_of_qwen3_30b_matches_hand_count():
    """Qwen3-30B-A3B's shapes read 6.08 GB per token at batch 1 in bf16; / (4.8 TB/s x 0.89 = 4.28 TB/s) = 1.42 ms."""
    shapes = ModelShapes.from_path(QWEN3_30B)
    weights = shapes.dense_step_bytes + len(shapes.moe_layers) * shapes.top_k * shapes.expert_bytes_16bit
    assert weights / 1e9 == pytest.approx(6.08, abs=0.01)
    h200 = load_hardware_file()["h200_141gb"]
    p = predict(traffic(tokens_per_step=1, dense_bytes=weights, expert_bytes=0, kv_bytes=0, host_bytes=0), h200)
    assert p.step_s == pytest.approx(weights / 4.272e12, rel=1e-9)  # 4.8 TB/s × 0.89
    assert p.step_s == pytest.approx(1.42e-3, abs=0.01e-3)


def test_fits_at_the_capacity_boundary():
    prof = profile_from_dict("card", spec(memory_gib=1, reserved_gib=0.25), "test")
    exact = traffic(resident_weight_bytes=GIB / 2, kv_cache_bytes=GIB / 4)  # + 1/4 reserve = exactly 1 GiB
    assert predict(exact, prof).resident_bytes == GIB
    assert predict(exact, prof).fits
    assert not predict(traffic(resident_weight_bytes=GIB / 2 + 1, kv_cache_bytes=GIB / 4), prof).fits


def test_random_distinct_limits():
    assert random_distinct(1, 4, 16) == pytest.approx(4)  # one token reads its own experts
    assert random_distinct(10_000, 4, 16) == pytest.approx(16)  # saturation
    assert random_distinct(32, 8, 128) == pytest.approx(128 * (1 - (1 - 8 / 128) ** 32))


# ------------------------------------------------------------------------------------------------- shapes

def test_shapes_count_every_parameter_of_the_real_module(random_checkpoint, embedded_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    for path in (random_checkpoint, embedded_model):
        cfg = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(cfg)
        shapes = ModelShapes.from_path(path)
        assert shapes.total_params == sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert shapes.dense_weight_bytes == 2 * (shapes.total_params - experts)
        # transformers' config object and the file give the same shapes (evaluate uses the former)
        assert ModelShapes.from_config(cfg.to_dict(), shapes.name) == shapes


def test_published_qwen3_sizes():
    s = ModelShapes.from_path(QWEN3_30B)
    assert s.total_params / 1e9 == pytest.approx(30.5, abs=0.05)  # Qwen3 report: 30.5 B total
    assert s.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2
    assert ModelShapes.from_path(REPO / "config/models/qwen3-235b-a22b.json").total_params / 1e9 == pytest.approx(235, abs=0.5)


def test_shapes_refusals(tmp_path):
    cfg = json.loads(QWEN3_30B.read_text())
    with pytest.raises(CostModelError, match="model_type 'mixtral'.*qwen3_moe"):
        ModelShapes.from_config({**cfg, "model_type": "mixtral"})
    with pytest.raises(CostModelError, match="missing 'hidden_size'"):
        ModelShapes.from_config({k: v for k, v in cfg.items() if k != "hidden_size"})
    with pytest.raises(CostModelError, match="disagree"):
        ModelShapes.from_config({**cfg, "num_local_experts": 64})
    with pytest.raises(CostModelError, match="no config.json"):
        ModelShapes.from_path(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- profiles

def test_shipped_profiles_carry_datasheet_numbers():
    profiles = load_hardware_file()
    assert list(profiles) == ["rtx_a6000", "rtx_4090", "a100_sxm_80gb", "h100_sxm_80gb", "h200_141gb"]
    bw = {n: p.hbm_bandwidth for n, p in profiles.items()}
    assert bw == {"rtx_a6000": 768e9, "rtx_4090": 1008e9, "a100_sxm_80gb": 2039e9, "h100_sxm_80gb": 3350e9,
                  "h200_141gb": 4800e9}
    assert profiles["rtx_a6000"].memory_capacity == 48 * GIB and profiles["h200_141gb"].memory_capacity == 141 * GIB
    assert profiles["h200_141gb"].host_link_bandwidth == 63e9 and profiles["rtx_4090"].host_link_bandwidth == 31.5e9
    assert profiles["h200_141gb"].bandwidth_efficiency == pytest.approx(4.28 / 4.8, abs=0.005)  # measured copy / datasheet
    assert all(p.source.strip() for p in profiles.values())


@pytest.mark.parametrize("bad, message", [
    ({"bandwidth_efficiency": 1.5}, r"card\.bandwidth_efficiency: must be a number in \(0, 1\], got 1\.5"),
    ({"memory_gib": "48"}, r"card\.memory_gib: must be a number > 0 \(GiB\), got '48'"),
    ({"kernels_per_layer": True}, r"card\.kernels_per_layer: must be a number ≥ 0, got True"),
    ({"hbm_bandwidth_gb_s": 0}, r"card\.hbm_bandwidth_gb_s: must be a number > 0"),
    ({"source": ""}, r"card\.source: must be a non-empty string"),
    ({"bandwith_gb_s": 1}, r"card: unknown key 'bandwith_gb_s'; allowed: label, hbm_bandwidth_gb_s"),
])
def test_bad_profile_is_one_clear_error(bad, message):
    with pytest.raises(CostModelError, match=message):
        profile_from_dict("card", spec(**bad), "cost_model.extra_profiles")


def test_missing_key_and_bad_name():
    s = spec()
    del s["source"]
    with pytest.raises(CostModelError, match=r"extra_profiles\.card: missing key 'source'; required: label"):
        profile_from_dict("card", s, "cost_model.extra_profiles")
    with pytest.raises(CostModelError, match=r"profile name 'My-Card' must match"):
        profile_from_dict("My-Card", spec(), "cost_model.extra_profiles")


def test_user_profile_from_config_and_refusals(tmp_path):
    cm = load_cost_model({"profiles": ["my_card", "h200_141gb"], "extra_profiles": {"my_card": spec()}})
    assert list(cm.profiles) == ["my_card", "h200_141gb"]
    assert cm.profiles["my_card"].hbm_bandwidth == 1000e9 and cm.target is None and cm.distinct == "scaled"
    with pytest.raises(CostModelError, match=r"unknown profile 'a6000'; known: rtx_a6000, .*extra_profiles"):
        load_cost_model({"profiles": ["a6000"]})
    with pytest.raises(CostModelError, match=r"extra_profiles\.h200_141gb: a shipped profile has that name"):
        load_cost_model({"profiles": ["h200_141gb"], "extra_profiles": {"h200_141gb": spec()}})
    with pytest.raises(CostModelError, match=r"cost_model: unknown key 'profile'; allowed: profiles"):
        load_cost_model({"profile": ["h200_141gb"]})
    with pytest.raises(CostModelError, match=r"distinct_experts: 'uniform'; allowed: scaled, fraction"):
        load_cost_model({"profiles": ["h200_141gb"], "distinct_experts": "uniform"})
    with pytest.raises(CostModelError, match="no config.json"):
        load_cost_model({"profiles": ["h200_141gb"], "target_model": str(tmp_path / "missing")})
    bad_file = tmp_path / "hw.yaml"
    bad_file.write_text(yaml.safe_dump({"cards": {}}))
    with pytest.raises(CostModelError, match="exactly one key, 'profiles'"):
        load_cost_model({"profiles": ["x"]}, bad_file)


def test_config_schema_checks_cost_model():
    import jsonschema

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    jsonschema.validate(cfg, schema)
    load_cost_model(cfg["cost_model"])  # the default config's profiles and target exist
    bad = {**cfg, "cost_model": {**cfg["cost_model"], "extra_profiles": {"my_card": {**spec(), "memory_gib": -1}}}}
    with pytest.raises(jsonschema.ValidationError, match="-1"):
        jsonschema.validate(bad, schema)


# ------------------------------------------------------------------------------------------ traffic accounting

def router(E=4, k=2, policy=None, hot=None):
    ctx = RoutingContext()
    if hot is not None:
        ctx.hot_masks = {0: torch.tensor(hot)}
    r = PolicyRouter(torch.nn.Parameter(torch.eye(E)), k, True, 0, policy or Routing("native"), ctx)
    return r, ctx


def call(r, ctx, phase, rows):
    x = torch.tensor(rows, dtype=torch.float32)
    ctx.valid, ctx.phase = torch.ones(len(rows), dtype=torch.bool), phase
    return r(x)


def test_distinct_experts_on_a_hand_built_stream():
    # router weight = identity: a token's logits are its hidden vector, so its top-2 are its two largest entries
    r, ctx = router(hot=[True, False, True, False])
    call(r, ctx, "prefill", [[0, 0, 5, 4], [0, 5, 0, 4]])  # prefill: not decode traffic
    call(r, ctx, "decode", [[5, 4, 0, 0], [5, 0, 4, 0]])  # experts {0,1} and {0,2}: 3 distinct, hot 0 and 2
    call(r, ctx, "decode", [[0, 0, 4, 5]])  # {2,3}: 2 distinct, hot 2
    ctx.phase = None
    call(r, ctx, None, [[5, 4, 3, 0]])  # outside the engine: not decode traffic
    s = ctx.stats[0]
    assert (s.decode_calls, s.decode_tokens, s.decode_kept) == (2, 3, 6)
    assert s.distinct_experts_decode == 3 + 2
    assert s.distinct_high_decode == 2 + 1
    assert s.tokens == 2 + 2 + 1 + 1  # all calls still count in the totals


def test_distinct_counts_only_kept_experts():
    # top-1 with CF 1: capacity ceil(1 · 2 · 1 / 4) = 1; both tokens want expert 0, the second is dropped
    r, ctx = router(k=2, policy=Routing("topk", top_k=1, capacity_factor=1.0))
    call(r, ctx, "decode", [[5, 0, 0, 0], [5, 1, 0, 0]])
    s = ctx.stats[0]
    assert (s.dropped, s.decode_kept, s.distinct_experts_decode, s.distinct_high_decode) == (1, 1, 1, 0)


def test_unknown_phase_is_refused():
    r, ctx = router()
    with pytest.raises(ValueError, match="phase 'decoding'"):
        call(r, ctx, "decoding", [[5, 4, 0, 0]])


def test_host_meter_books_bytes_to_the_phase_of_the_call():
    moved = [100]  # a controller that had already moved 100 bytes before the meter started
    ctx = RoutingContext()
    meter = HostTrafficMeter(lambda: moved[0], ctx)
    for phase, add in (("prefill", 10), ("decode", 5), ("decode", 7)):
        ctx.phase = phase
        moved[0] += add
        meter.end_call()
    assert meter.bytes == {"prefill": 10, "decode": 12}
    ctx.phase = None
    with pytest.raises(RuntimeError, match="phase is None"):
        meter.end_call()


# ------------------------------------------------------------------------------------------- per-cell traffic

def measured_cell(shapes: ModelShapes, **over):
    """A cell record as evaluate writes it, for `shapes`, with hand-chosen traffic."""
    L, E = len(shapes.moe_layers), shapes.num_experts
    c = {"cell": "c", "model": shapes.name, "routing_policy": "native", "top_k": shapes.top_k,
         "native_top_k": shapes.top_k, "num_layers": shapes.layers, "moe_layers": L, "num_experts": E,
         "decode_steps": 10, "decode_tokens": 80, "distinct_experts_per_step": 10.0,
         "distinct_high_experts_per_step": 4.0, "expert_bytes_high": 0.5 * shapes.expert_bytes_16bit,
         "expert_bytes_low": 0.125 * shapes.expert_bytes_16bit, "host_bytes_decode": 5000, "mean_decode_context": 100.0,
         "max_prompt_tokens": 150, "dense_weight_bytes": shapes.dense_weight_bytes, "dense_step_bytes": shapes.dense_step_bytes,
         "embedding_row_bytes": shapes.embedding_row_bytes, "kv_bytes_per_token": shapes.kv_bytes_per_token,
         "expert_weight_bytes": L * E * shapes.expert_bytes_16bit // 4, "expert_weight_bytes_16bit": L * E * shapes.expert_bytes_16bit,
         "batch_size": 8, "max_new_tokens": 50, "tpot_ms": 2.0, "decode_tokens_per_s": 4000.0}
    c.update(over)
    return c


def layer_rows(cell, per_layer_distinct, per_layer_high, kept_per_token):
    return [{"layer": i, "decode_steps": cell["decode_steps"], "decode_tokens": cell["decode_tokens"],
             "decode_assignments": int(kept_per_token * cell["decode_tokens"]),
             "distinct_experts_decode": d * cell["decode_steps"], "distinct_high_decode": h * cell["decode_steps"]}
            for i, (d, h) in enumerate(zip(per_layer_distinct, per_layer_high))]


def test_measured_traffic_by_component(embedded_model):
    s = ModelShapes.from_path(embedded_model)
    c = measured_cell(s)
    t = cell_traffic(c)
    b16 = s.expert_bytes_16bit
    assert t.tokens_per_step == 8
    assert t.expert_bytes == pytest.approx(4 * 0.5 * b16 + 6 * 0.125 * b16)
    assert t.dense_bytes == s.dense_step_bytes + 8 * s.embedding_row_bytes
    assert t.kv_bytes == 8 * 100 * s.kv_bytes_per_token
    assert t.host_bytes == 500
    assert t.resident_weight_bytes == s.dense_weight_bytes + c["expert_weight_bytes"]
    assert t.kv_cache_bytes == 8 * (150 + 50) * s.kv_bytes_per_token


def test_projection_onto_its_own_shapes_is_the_identity(embedded_model):
    s = ModelShapes.from_path(embedded_model)
    distinct, high = [3, 2, 3, 2], [1, 1, 1, 1]  # Σ = 10 and 4 per step, as the cell says
    c = measured_cell(s)
    rows = layer_rows(c, distinct, high, 4)
    measured = cell_traffic(c)
    for mode in ("scaled", "fraction"):
        projected = cell_traffic(c, rows, s, mode)
        for f in ("tokens_per_step", "dense_bytes", "expert_bytes", "kv_bytes", "host_bytes", "resident_weight_bytes",
                  "kv_cache_bytes"):
            assert getattr(projected, f) == pytest.approx(getattr(measured, f)), (mode, f)


def test_projection_onto_qwen3_30b(embedded_model):
    tiny, big = ModelShapes.from_path(embedded_model), ModelShapes.from_path(QWEN3_30B)
    # batch 1: each token reads its own 4 of 16 experts per layer (random routing would too: ρ = 1)
    c = measured_cell(tiny, decode_tokens=10, distinct_experts_per_step=16.0, distinct_high_experts_per_step=0.0,
                      expert_bytes_high=tiny.expert_bytes_16bit, expert_bytes_low=tiny.expert_bytes_16bit,
                      host_bytes_decode=0)
    rows = layer_rows(c, [4] * 4, [0] * 4, 4)
    scaled = cell_traffic(c, rows, big, "scaled")
    # Qwen3-30B-A3B reads its own top-8 in each of 48 layers
    assert scaled.expert_bytes == pytest.approx(48 * 8 * big.expert_bytes_16bit)
    assert scaled.model == "qwen3-30b-a3b" and scaled.layers == 48
    assert scaled.dense_bytes == big.dense_bytes_per_step(1)
    # the literal fraction carries 4/16 of the experts over: 32 of 128, 4× the scaled reads
    assert cell_traffic(c, rows, big, "fraction").expert_bytes == pytest.approx(48 * 32 * big.expert_bytes_16bit)
    # resident experts: the measured fraction (1/4) of the target's 16-bit expert bytes
    assert scaled.resident_weight_bytes == pytest.approx(big.dense_weight_bytes + 48 * 128 * big.expert_bytes_16bit / 4)
    # top-1 of the tiny model stays top-1 on the target
    one = cell_traffic({**c, "routing_policy": "topk", "top_k": 1}, layer_rows(c, [1] * 4, [0] * 4, 1), big)
    assert one.expert_bytes == pytest.approx(48 * 1 * big.expert_bytes_16bit)
    # host-link bytes keep their measured ratio to expert reads (here: one in four experts read is fetched)
    fetched = cell_traffic({**c, "host_bytes_decode": 16 * tiny.expert_bytes_16bit * 10 // 4}, rows, big)
    assert fetched.host_bytes == pytest.approx(scaled.expert_bytes / 4)


def test_cells_without_traffic_counts_are_refused(embedded_model):
    c = measured_cell(ModelShapes.from_path(embedded_model))
    del c["decode_steps"]
    with pytest.raises(CostModelError, match=r"missing \['decode_steps'\].*forcerun evaluate"):
        cell_traffic(c)
    c = measured_cell(ModelShapes.from_path(embedded_model), decode_steps=0)
    with pytest.raises(CostModelError, match="no decode steps"):
        cell_traffic(c)


# -------------------------------------------------------------------------- end to end: evaluate → aggregate

@pytest.fixture(scope="module")
def evaluated(random_checkpoint, tmp_path_factory):
    from moesweep.evaluate import evaluate_cell
    from moesweep.grid import expand_grid

    tmp = tmp_path_factory.mktemp("cells")
    test = tmp / "test.jsonl"
    with open(test, "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"Tom has {i} apples and gets {i + 1} more. How many?",
                                "answer": f"#### {2 * i + 1}"}) + "\n")
    settings = {"seed": 3, "model": {"id": str(random_checkpoint), "dtype": "float32"},
                "dataset": {"source": str(test), "split": "test", "limit": 6},
                "prompt": {"preset": "zeroshot", "max_new_tokens": 6}, "evaluate": {"batch_size": 4, "device": "cpu"}}
    cells = expand_grid([{"family": "native", "routing": {"policy": "native"}, "precision": {"policy": "full"}},
                         {"family": "top1", "routing": {"policy": "topk", "top_k": 1}, "precision": {"policy": "full"}},
                         {"family": "offload", "routing": {"policy": "native"},
                          "precision": {"policy": "offload", "memory_budget": 0.25}}])
    out = {}
    for cell in cells:
        d = tmp / cell.id
        paths = [d / n for n in ("cell.json", "problems.parquet", "layers.parquet", "trace.parquet")]
        evaluate_cell(cell.to_dict(), settings, {}, None, None, *paths)
        out[cell.id] = paths
    return out, settings


def test_evaluate_writes_consistent_traffic_counts(evaluated, random_checkpoint):
    from transformers import AutoTokenizer

    from moesweep.data.prompts import build_prompt, get_preset
    from moesweep.data.sources import load_split

    evaluated, settings = evaluated
    shapes = ModelShapes.from_path(random_checkpoint)
    tok = AutoTokenizer.from_pretrained(random_checkpoint)
    prompt_len = {p["id"]: len(tok(build_prompt(get_preset("zeroshot"), p["question"], []), add_special_tokens=False).input_ids)
                  for p in load_split(settings["dataset"], "test", 6, settings["seed"])}
    for cell_json, problems_pq, layers_pq, _ in evaluated.values():
        c, layers = json.loads(cell_json.read_text()), pd.read_parquet(layers_pq)
        # decode call j of a sequence attends its prompt and j generated tokens
        gen = pd.read_parquet(problems_pq).set_index("problem_id")["generated_tokens"]
        positions = sum((g - 1) * prompt_len[i] + (g - 1) * g / 2 for i, g in gen.items())
        assert c["mean_decode_context"] == pytest.approx(positions / (gen - 1).sum())
        assert c["decode_tokens"] == (gen - 1).sum() and c["max_prompt_tokens"] == max(prompt_len.values())
        assert c["decode_steps"] > 0 and (layers["decode_steps"] == c["decode_steps"]).all()
        # the routers' count of decode tokens equals the engine's
        assert (layers["decode_tokens"] == c["decode_tokens"]).all()
        assert c["distinct_experts_per_step"] == pytest.approx(layers["distinct_experts_decode"].sum() / c["decode_steps"])
        assert (layers["distinct_experts_decode"] <= layers["decode_steps"] * shapes.num_experts).all()
        assert (layers["distinct_experts_decode"] <= layers["decode_assignments"]).all()
        assert c["distinct_high_experts_per_step"] == 0  # no hot/cold map
        if c["precision_policy"] == "offload":  # fetches happen in prefill and decode; the meter splits them
            assert 0 < c["host_bytes_decode"] < c["bytes_moved"]
            assert c["host_bytes_decode"] % shapes.expert_bytes_16bit == 0  # whole 16-bit experts
        else:
            assert c["host_bytes_decode"] == 0  # static policies move nothing
        assert c["expert_bytes_low"] == shapes.expert_bytes_16bit
        assert (c["dense_weight_bytes"], c["kv_bytes_per_token"]) == (shapes.dense_weight_bytes, shapes.kv_bytes_per_token)
        assert cell_traffic(c).expert_bytes > 0
    top1 = json.loads(evaluated["top1-w16"][0].read_text())
    assert top1["distinct_experts_per_step"] <= top1["decode_tokens"] / top1["decode_steps"] * top1["moe_layers"]


def test_aggregate_writes_typed_projection_columns(evaluated, tmp_path, random_checkpoint):
    import pyarrow.parquet as pq

    from moesweep import plots
    from moesweep.results import aggregate

    files = list(zip(*evaluated[0].values()))
    settings = load_cost_model({"profiles": ["rtx_4090", "tiny_card"],
                                "extra_profiles": {"tiny_card": spec(memory_gib=1e-6)}})
    out = {k: tmp_path / k for k in ("cells.parquet", "problems.parquet", "layers.parquet", "cells.csv", "trace.parquet")}
    aggregate([str(p) for p in files[0]], [str(p) for p in files[1]], [str(p) for p in files[2]], out["cells.parquet"],
              out["problems.parquet"], out["layers.parquet"], out["cells.csv"], [str(p) for p in files[3]],
              out["trace.parquet"], settings)
    schema = pq.read_schema(out["cells.parquet"])
    for name in ("rtx_4090", "tiny_card"):
        assert str(schema.field(f"projected_tokens_per_s_{name}").type) == "double"
        assert str(schema.field(f"fits_{name}").type) == "bool"
    assert str(schema.field("distinct_experts_per_step").type) == "double"
    assert str(schema.field("decode_steps").type) == "int64"
    assert str(pq.read_schema(out["layers.parquet"]).field("distinct_experts_decode").type) == "int64"
    cells = pd.read_parquet(out["cells.parquet"])
    assert cells["fits_rtx_4090"].all() and not cells["fits_tiny_card"].any()  # a 1 KiB card holds nothing
    for _, c in cells.iterrows():
        expected = predict(cell_traffic(c.to_dict()), settings.profiles["rtx_4090"]).tokens_per_s
        assert c["projected_tokens_per_s_rtx_4090"] == pytest.approx(expected)
    assert (cells["projected_model"] == cells["model"]).all()
    # without a cost_model section: no per-profile columns, the profile-independent ones null
    aggregate([str(p) for p in files[0]], [str(p) for p in files[1]], [str(p) for p in files[2]], out["cells.parquet"],
              out["problems.parquet"], out["layers.parquet"], out["cells.csv"])
    plain = pd.read_parquet(out["cells.parquet"])
    assert not any(n.startswith(("projected_tokens_per_s_", "fits_")) for n in plain.columns)
    assert plain["projected_model"].isna().all()
    # the figure, from the table with projections onto Qwen3-30B-A3B
    target = CostModelSettings(settings.profiles, ModelShapes.from_path(QWEN3_30B))
    aggregate([str(p) for p in files[0]], [str(p) for p in files[1]], [str(p) for p in files[2]], out["cells.parquet"],
              out["problems.parquet"], out["layers.parquet"], out["cells.csv"], cost_model=target)
    cells = pd.read_parquet(out["cells.parquet"])
    assert (cells["projected_model"] == "qwen3-30b-a3b").all()
    fits = cells.set_index("precision_policy")["fits_rtx_4090"]
    assert not fits["full"].any()  # 61 GB of bf16 weights in a 24 GB card
    assert fits["offload"]  # 3.1 GB dense + a quarter of 58 GB of experts + KV cache
    offload = cells.set_index("precision_policy").loc["offload"]
    assert offload["projected_host_bytes_per_step"] > 0
    assert offload["projected_tokens_per_s_rtx_4090"] < cells.set_index("cell").loc["native-w16", "projected_tokens_per_s_rtx_4090"]
    plots.projection(cells, tmp_path / "projection.png")
    assert (tmp_path / "projection.png").stat().st_size > 0 and (tmp_path / "projection.svg").stat().st_size > 0


def test_dynamic_precision_traffic(random_checkpoint, tmp_path):
    """Dynamic precision: decode reads split by tier via the live hot mask; swaps in decode booked to decode."""
    from moesweep.evaluate import evaluate_cell
    from moesweep.grid import expand_grid
    from moesweep.stages import calibrate_stage, profile_stage, quantize_stage

    dataset, model = {"source": "synthetic", "split": "test", "limit": 6}, {"id": str(random_checkpoint)}
    calibrate_stage(model, dataset, {"n_samples": 6, "n_heldout": 2, "max_length": 64, "batch_size": 4}, 0,
                    tmp_path / "h.safetensors", tmp_path / "ho.safetensors", tmp_path / "stats.json")
    for bits in (8, 2):
        quantize_stage(model, {"group_size": 32, "min_tokens": 1}, bits, "gptq", str(tmp_path / "h.safetensors"),
                       str(tmp_path / "ho.safetensors"), str(tmp_path / f"w{bits}.safetensors"), str(tmp_path / f"e{bits}.parquet"))
    profile_stage(model, dataset, {"n_samples": 6, "max_length": 64, "batch_size": 4}, 0, str(tmp_path / "hot.parquet"))
    cell = expand_grid([{"routing": {"policy": "native"}, "precision": {
        "policy": "dynamic", "bits_high": 8, "bits_low": 2, "memory_budget": 0.3, "update_every": 3, "delta": 0.0}}])[0]
    settings = {"seed": 0, "model": model, "dataset": dataset, "prompt": {"preset": "zeroshot", "max_new_tokens": 10},
                "evaluate": {"batch_size": 3, "device": "cpu"}}
    out = [tmp_path / n for n in ("cell.json", "p.parquet", "l.parquet", "t.parquet")]
    evaluate_cell(cell.to_dict(), settings, {b: str(tmp_path / f"w{b}.safetensors") for b in (8, 2)},
                  str(tmp_path / "hot.parquet"), None, *out)
    c, layers = json.loads(out[0].read_text()), pd.read_parquet(out[2])
    assert 0 < c["distinct_high_experts_per_step"] < c["distinct_experts_per_step"]  # both tiers read
    assert (layers["distinct_high_decode"] <= layers["distinct_experts_decode"]).all()
    assert c["expert_bytes_low"] < c["expert_bytes_high"] < ModelShapes.from_path(random_checkpoint).expert_bytes_16bit
    assert 0 < c["host_bytes_decode"] <= c["bytes_moved"]  # most decisions fall between decode calls
    t = cell_traffic(c)
    d, d_hi = c["distinct_experts_per_step"], c["distinct_high_experts_per_step"]
    assert t.expert_bytes == pytest.approx(d_hi * c["expert_bytes_high"] + (d - d_hi) * c["expert_bytes_low"])
    assert t.host_bytes == pytest.approx(c["host_bytes_decode"] / c["decode_steps"])
    # provenance (issue 19): the calibration and profile data behind this cell's weights and map, by content hash
    from moesweep.data.sources import calibration_problems, load_split, problems_hash, profile_problems

    calib = {"n_samples": 6, "n_heldout": 2}
    assert c["calibration_source"] == "synthetic [train]"
    assert c["calibration_hash"] == problems_hash(calibration_problems(dataset, calib, 0))
    assert c["profile_source"] == "synthetic [train]"
    assert c["profile_hash"] == problems_hash(profile_problems(dataset, {"n_samples": 6}, 0))
    assert c["dataset_hash"] == problems_hash(load_split(dataset, "test", 6, 0))
    assert json.loads((tmp_path / "stats.json").read_text())["calibration_hash"] == c["calibration_hash"]
    # one fixed-shape pass per cell, dynamic controller included: per-step cost with spread
    assert c["fixed_repeats"] == 3 and c["fixed_ms_per_step_min"] <= c["fixed_ms_per_step"] <= c["fixed_ms_per_step_max"]
    assert c["high_precision_hit_rate"] is not None  # two tiers
