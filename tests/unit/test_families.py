"""Qwen2-MoE, OLMoE, Mixtral and Phi-3.5-MoE (phimoe) through the adapters, on tiny random-weight checkpoints
built from transformers' own config classes (tests/family_models.py; no downloads)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from family_models import EXPERTS, FAMILIES, INTER, build_family_checkpoint
from moesweep.calibrate import collect_calibration, profile_hotness
from moesweep.checks import (FAMILIES as CHECKED_FAMILIES, SUPPORTED_MODEL_TYPES, ConfigError, check_config,
                             check_family_config, smallest_budget)
from moesweep.grid import Routing, expand_grid
from moesweep.model import (ADAPTERS, EXPERTS_IMPLEMENTATION, ModelError, install_policy, load_model,
                            model_fingerprint)
from moesweep.quant.format import packed_expert_bytes
from moesweep.routing import RoutingContext, capacity
from moesweep.sparsemixer import route_sparsemixer

HIDDEN = 64
MOE_LAYERS = {"qwen2_moe": [0, 2], "olmoe": [0, 1], "mixtral": [0, 1], "phimoe": [0, 1]}
NATIVE_NORM = {"qwen2_moe": False, "olmoe": False, "mixtral": True, "phimoe": False}
TEXTS = ["Question: Tom has 3 apples and buys 4 more.\nAnswer: 3+4=<<3+4=7>>7\n#### 7", "Question: 5 times 6?\nAnswer: 30",
         "Question: x\nAnswer: y"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_checkpoint(f, root / f) for f in FAMILIES}


def _ids(seed=0, shape=(3, 20)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, shape, generator=g)


def test_every_checked_family_has_an_adapter_and_the_default_comes_first():
    assert set(ADAPTERS) == set(SUPPORTED_MODEL_TYPES) == set(CHECKED_FAMILIES) == {"qwen3_moe", *FAMILIES}
    assert SUPPORTED_MODEL_TYPES[0] == "qwen3_moe"


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_the_moe_layers(checkpoints, family):
    _, _, adapter = load_model(str(checkpoints[family]))
    layers = adapter.layers()
    assert [l.index for l in layers] == MOE_LAYERS[family]  # qwen2_moe's layer 1 is dense (mlp_only_layers)
    assert (adapter.num_experts, adapter.top_k, adapter.norm_topk_prob) == (EXPERTS, 2, NATIVE_NORM[family])
    for l in layers:
        assert l.experts.gate_up_proj.shape == (EXPERTS, 2 * INTER, HIDDEN)
        assert l.experts.down_proj.shape == (EXPERTS, HIDDEN, INTER)


def _hf_router_io(model, adapter, ids):
    """Inputs and outputs of every unmodified HF router during one forward pass."""
    seen = {}
    hooks = [l.router.register_forward_hook(lambda m, a, o, i=l.index: seen.__setitem__(i, (a[0].clone(), o)))
             for l in adapter.layers()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_native_policy_router_is_bit_identical_to_the_hf_router(checkpoints, family, dtype):
    model, _, adapter = load_model(str(checkpoints[family]), dtype=dtype)
    seen = _hf_router_io(model, adapter, _ids())
    for l in adapter.layers():
        x, (hf_logits, hf_weights, hf_index) = seen[l.index]
        router = adapter.make_router(l, Routing("native"), RoutingContext(), None)
        with torch.no_grad():
            logits, weights, index = router(x)
        assert torch.equal(logits, hf_logits) and torch.equal(index, hf_index)
        # dtype too: Mixtral returns float32 weights from bf16 logits, the others the logits' dtype
        assert weights.dtype == hf_weights.dtype and torch.equal(weights, hf_weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_model_equals_the_unmodified_hf_model(checkpoints, family):
    model, _, adapter = load_model(str(checkpoints[family]))
    ids = _ids(1)
    with torch.no_grad():
        hf_default = model(ids).logits  # as loaded: transformers' default experts implementation (grouped_mm)
        model.set_experts_implementation("eager")
        hf_eager = model(ids).logits
        install_policy(adapter, Routing("native"), RoutingContext())
        sparse = model(ids).logits
        model.set_experts_implementation("eager")  # the policy routers with HF's own experts loop
        policy_eager = model(ids).logits
    # Bit-identical: the routers reproduce HF's routing exactly inside the whole model.
    assert torch.equal(policy_eager, hf_eager)
    # The project's experts forward gathers each expert's rows in token order, HF eager in (choice, token) order;
    # CPU GEMM results depend on a row's position in the block (measured: ~1e-9 per layer in fp32), and
    # grouped_mm sums differently again. So fp32-tolerance closeness, not bit equality, for the full forward.
    torch.testing.assert_close(sparse, hf_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse, hf_default, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_top1_and_capacity_routing_run_and_account(checkpoints, family):
    model, _, adapter = load_model(str(checkpoints[family]))
    ids = _ids(2, (2, 16))
    T = ids.numel()
    for policy, cf in ((Routing("topk", top_k=1), None), (Routing("topk", top_k=1, capacity_factor=1.0), 1.0),
                       (Routing("native", capacity_factor=0.5, priority="score"), 0.5)):
        ctx = RoutingContext()
        install_policy(adapter, policy, ctx)
        ctx.valid = torch.ones(T, dtype=torch.bool)
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        k = 1 if policy.policy == "topk" else adapter.top_k
        assert sorted(ctx.stats) == MOE_LAYERS[family]
        for stats in ctx.stats.values():
            assert stats.tokens == T and stats.routed == T * k
            assert stats.routed - stats.dropped == int(stats.load.sum())
            if cf is None:
                assert stats.dropped == 0
            else:
                assert int(stats.load.max()) <= capacity(cf, T, k, adapter.num_experts)
        if cf is not None:  # 32 tokens over 8 experts at 4 (or 4) slots each: random routing overflows somewhere
            assert sum(s.dropped for s in ctx.stats.values()) > 0


def test_qwen2_shared_expert_is_never_dropped_or_quantized(checkpoints):
    from moesweep.precision import PrecisionMap, apply_map, full_expert_bytes
    from moesweep.quant import QuantSpec, quantize_experts

    model, _, adapter = load_model(str(checkpoints["qwen2_moe"]))
    layer = adapter.layers()[0]
    block = layer.block
    shared_before = {k: v.clone() for k, v in block.shared_expert.state_dict().items()}
    gate_before = block.shared_expert_gate.weight.clone()
    x = torch.randn(1, 10, HIDDEN)
    with torch.no_grad():
        shared_only = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)

    # Every routed assignment dropped (as for padding): the block's output is exactly the shared expert's.
    ctx = RoutingContext()
    install_policy(adapter, Routing("topk", top_k=1, capacity_factor=0.01), ctx)
    ctx.valid = torch.zeros(10, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(block(x), shared_only)
    assert ctx.stats[layer.index].load.shape == (EXPERTS,)  # accounting knows routed experts only

    # A 2-bit precision map rewrites the routed experts and nothing else; budgets count routed experts only.
    full = full_expert_bytes(adapter)
    assert int(full[layer.index].sum()) == EXPERTS * (2 * INTER * HIDDEN + HIDDEN * INTER) * 2
    spec = QuantSpec(2, 32, False, "rtn")
    quantized = {2: {f"layers.{l.index}.{name}": quantize_experts(getattr(l.experts, name).detach().float(), None, None, spec)
                     for l in adapter.layers() for name in adapter.projections}}
    routed_before = layer.experts.gate_up_proj.detach().clone()
    bits = {l.index: torch.full((EXPERTS,), 2) for l in adapter.layers()}
    apply_map(adapter, PrecisionMap(bits, 0, 0, None), quantized)
    assert not torch.equal(layer.experts.gate_up_proj, routed_before)
    assert all(torch.equal(v, shared_before[k]) for k, v in block.shared_expert.state_dict().items())
    assert torch.equal(block.shared_expert_gate.weight, gate_before)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_and_profile_cover_every_moe_layer(checkpoints, family):
    model, tok, adapter = load_model(str(checkpoints[family]))
    res = collect_calibration(model, tok, adapter, TEXTS, max_length=64, batch_size=3)
    assert sorted(res.hessians) == sorted(f"layers.{i}.{p}" for i in MOE_LAYERS[family] for p in adapter.projections)
    for i in MOE_LAYERS[family]:
        assert res.hessians[f"layers.{i}.gate_up_proj"].shape == (EXPERTS, HIDDEN, HIDDEN)
        assert res.hessians[f"layers.{i}.down_proj"].shape == (EXPERTS, INTER, INTER)
        assert int(res.token_counts[f"layers.{i}"].sum()) == res.tokens * adapter.top_k
        assert 0 < res.skip_beta[i] <= 1
    # routers restored to the family's policy router, not left wrapped in the calibration observer
    assert all(type(l.router).__name__.endswith("PolicyRouter") for l in adapter.layers())
    rows = profile_hotness(model, tok, adapter, TEXTS, max_length=64, batch_size=3)
    assert len(rows) == len(MOE_LAYERS[family]) * EXPERTS
    for i in MOE_LAYERS[family]:
        assert abs(sum(r["prob_share"] for r in rows if r["layer"] == i) - 1) < 1e-9


# ---- phimoe: sparsemixer and the policy mapping, against a per-token loop written from the paper/HF code ----

def reference_sparsemixer(s: list[float], eps: float):
    """Eval-mode sparsemixer for one token: ((r1, m1), (r2, m2)), in float64."""
    def choose(excluded):
        cand = [j for j in range(len(s)) if j not in excluded]
        r = max(cand, key=lambda j: (s[j], -j))
        top = s[r]
        near = [j for j in cand if (top - s[j]) / max(abs(s[j]), top) <= 2 * eps]
        return r, math.exp(s[r]) / sum(math.exp(s[j]) for j in near)
    r1, m1 = choose(set())
    r2, m2 = choose({r1})
    return (r1, m1), (r2, m2)


def reference_route_sparsemixer(logits, policy, eps, valid=None, beta=None):
    T, E = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    k = policy.top_k if policy.policy == "topk" else 2
    chosen = []  # per token: (expert, p, weight, keep)
    for t in range(T):
        picks = reference_sparsemixer(logits[t].double().tolist(), eps)[:k]
        ps = [float(probs[t, e]) for e, _ in picks]
        keep = [True] * k
        if policy.policy == "skip":
            keep = [j == 0 or ps[j] >= beta * ps[0] for j in range(k)]
        if policy.policy == "top_p":
            keep = [j == 0 or sum(ps[:j]) < policy.top_p for j in range(k)]
        if valid is not None and not valid[t]:
            keep = [False] * k
        ws = [m if kp else 0.0 for (_, m), kp in zip(picks, keep)]
        if policy.policy != "native" and policy.renormalize:
            ws = [w / sum(ws) if kp else 0.0 for w, kp in zip(ws, keep)]
        chosen.append([(e, p, w, kp) for (e, _), p, w, kp in zip(picks, ps, ws, keep)])
    final = [[c[3] for c in row] for row in chosen]
    if policy.capacity_factor is not None:
        cap = math.ceil(policy.capacity_factor * (T if valid is None else int(valid.sum())) * k / E)
        order = [(t, j) for t in range(T) for j in range(k) if chosen[t][j][3]]
        if policy.priority == "score":
            order.sort(key=lambda a: (-chosen[a[0]][a[1]][1], a[1] * T + a[0]))
        else:
            order.sort(key=lambda a: (a[1], a[0]))
        used, final = [0] * E, [[False] * k for _ in range(T)]
        for t, j in order:
            if used[chosen[t][j][0]] < cap:
                used[chosen[t][j][0]] += 1
                final[t][j] = True
    index = torch.tensor([[c[0] if final[t][j] else E for j, c in enumerate(row)] for t, row in enumerate(chosen)])
    weight = torch.tensor([[c[2] if final[t][j] else 0.0 for j, c in enumerate(row)] for t, row in enumerate(chosen)],
                          dtype=torch.float64)
    return index, weight


SPARSEMIXER_POLICIES = [
    Routing("native"),
    Routing("topk", top_k=1),
    Routing("topk", top_k=1, renormalize=True),
    Routing("topk", top_k=2, renormalize=True),
    Routing("skip"),
    Routing("top_p", top_p=0.5),
    Routing("topk", top_k=1, capacity_factor=1.0),
    Routing("native", capacity_factor=0.5, priority="score"),
    Routing("top_p", top_p=0.3, capacity_factor=1.25),
]


@pytest.mark.parametrize("eps", [0.01, 0.3])  # 0.01 = Phi-3.5-MoE's; 0.3 makes the masked softmax span several experts
@pytest.mark.parametrize("policy", SPARSEMIXER_POLICIES, ids=str)
def test_sparsemixer_policies_match_a_per_token_reference(policy, eps):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(24, 8, generator=g) * 2
    valid = torch.ones(24, dtype=torch.bool)
    valid[[3, 10, 11]] = False  # padding: never routed, no capacity used
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    index, weight, _, keep = route_sparsemixer(logits, probs, policy, eps, valid, skip_beta=0.4)
    ref_index, ref_weight = reference_route_sparsemixer(logits, policy, eps, valid, beta=0.4)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-6, atol=1e-7)
    assert not keep[~valid].any()
    if eps == 0.3 and policy.policy == "native":  # the test exercises masks with more than one expert
        spread = [reference_sparsemixer(r.double().tolist(), eps)[0][1] < 1 - 1e-9 for r in logits]
        assert any(spread)


def test_sparsemixer_top_k_above_two_is_refused():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="top_k=3 exceeds the checkpoint's k=2"):
        route_sparsemixer(logits, torch.softmax(logits, -1), Routing("topk", top_k=3), 0.01)


# ---- DAG-time checks and fingerprints per family ----

def _cfg(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())


def _dag_config(model_id, grid):
    return ({"model": {"id": str(model_id)}, "dataset": {"source": "synthetic"},
             "quantization": {"method": "gptq", "bits": [8, 2], "group_size": 32}}, expand_grid(grid))


@pytest.mark.parametrize("family", FAMILIES)
def test_smallest_budget_reads_each_familys_expert_shape(checkpoints, family):
    _, _, adapter = load_model(str(checkpoints[family]))
    experts = adapter.layers()[0].experts
    (two_i, h), (_, i) = experts.gate_up_proj.shape[1:], experts.down_proj.shape[1:]
    low = packed_expert_bytes(two_i, h, 2, 32, False, "gptq") + packed_expert_bytes(h, i, 2, 32, False, "gptq")
    full = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 2
    assert smallest_budget(_cfg(checkpoints[family]), 2, {"group_size": 32}) == pytest.approx(low / full, rel=1e-12)
    fp = model_fingerprint(str(checkpoints[family]))
    assert fp["model_type"] == family and INTER in (fp["moe_intermediate_size"], fp["intermediate_size"])


@pytest.mark.parametrize("family", FAMILIES)
def test_dag_checks_accept_each_family_and_refuse_k_prime_above_its_k(checkpoints, family):
    check_config(*_dag_config(checkpoints[family], [{"routing": {"policy": "topk", "top_k": 1},
                                                     "precision": {"policy": "offload", "memory_budget": 0.25}}]))
    with pytest.raises(ConfigError, match=r"top_k=3 exceeds the checkpoint's num_experts_per_tok=2; allowed: 1..2"):
        check_config(*_dag_config(checkpoints[family], [{"routing": {"policy": "topk", "top_k": 3},
                                                         "precision": {"policy": "full"}}]))
    # offload needs one whole expert per layer: the bound reads each family's expert-count key
    with pytest.raises(ConfigError, match=f"allowed: {1 / EXPERTS:.4f}..1"):
        check_config(*_dag_config(checkpoints[family], [{"routing": {"policy": "native"},
                                                         "precision": {"policy": "offload", "memory_budget": 0.1}}]))


@pytest.mark.parametrize("family,key", [("qwen2_moe", "num_experts"), ("olmoe", "num_experts"),
                                        ("mixtral", "num_local_experts"), ("phimoe", "num_local_experts")])
def test_a_config_without_the_familys_expert_count_is_refused(checkpoints, family, key, tmp_path):
    cfg = _cfg(checkpoints[family])
    del cfg[key]
    with pytest.raises(ConfigError, match=f"needs a positive integer expert count in config.json key {key}"):
        check_family_config(cfg, "model.id 'x'")


def test_phimoe_with_k_other_than_two_is_refused_at_dag_time_and_at_load(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(checkpoints["phimoe"])
    cfg["num_experts_per_tok"] = 4
    with pytest.raises(ConfigError, match="sparsemixer router always selects exactly 2 experts; allowed: 2"):
        check_family_config(cfg, "model.id 'x'")
    model = AutoModelForCausalLM.from_pretrained(str(checkpoints["phimoe"]))
    model.config.num_experts_per_tok = 4
    with pytest.raises(ModelError, match="always selects exactly 2 experts"):
        ADAPTERS["phimoe"](model)


def test_mixtral_router_weights_stay_float32_in_bfloat16(checkpoints):
    """Why MixtralAdapter sets weights_dtype: HF's Mixtral router keeps float32 weights (checked here, so a
    transformers change that casts them shows up as this test failing, not as a silent mismatch)."""
    model, _, adapter = load_model(str(checkpoints["mixtral"]), dtype="bfloat16")
    seen = _hf_router_io(model, adapter, _ids())
    assert all(o[1].dtype == torch.float32 for _, o in seen.values())
    install_policy(adapter, Routing("topk", top_k=1, capacity_factor=1.0), RoutingContext())
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_reader_maps_each_familys_checkpoint_names(checkpoints, family):
    """The layer-by-layer path reads shards itself; transformers saves Mixtral/Phi-MoE as the hub does
    (block_sparse_moe, gate, experts.{e}.w1/w3/w2) and Qwen2-MoE/OLMoE per expert: each must come back
    exactly as from_pretrained converts it."""
    from moesweep.layerwise import skeleton

    model, _, _ = load_model(str(checkpoints[family]))
    ckpt, _, adapter, _ = skeleton(str(checkpoints[family]))
    assert type(adapter).__name__ == type(ADAPTERS[family](model)).__name__
    for i, layer in enumerate(model.model.layers):
        ref = layer.state_dict()
        got = ckpt.layer_state(i, list(ref), torch.float32)
        assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref), f"layer {i}"
