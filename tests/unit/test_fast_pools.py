"""Dynamic precision pools and offloading on the fast engine (CUDA; skipped without it)."""
import pytest
import torch

from moesweep.grid import Routing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HI, LO = 8, 2


@pytest.fixture(scope="module")
def setup(embedded_model):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from fast_engine import quantized_tiers  # RTN of the model's own weights, in the quantize stage's layout

    from moesweep.model import load_model

    model, tokenizer, adapter = load_model(str(embedded_model), "bfloat16", "cuda")
    quantized = {b: {k: _to_cpu(q) for k, q in t.items()} for b, t in quantized_tiers(adapter, {HI, LO}, 32).items()}
    return model, tokenizer, adapter, quantized


def _to_cpu(q):
    """Quantized tiers as the quantize stage loads them: on the host (the pools pin them)."""
    q.codes, q.scales, q.zeros = q.codes.cpu(), q.scales.cpu(), q.zeros.cpu()
    return q


def _prompts(n):
    from moesweep.data.prompts import build_prompt, get_preset
    from moesweep.data.sources import load_split

    return [build_prompt(get_preset("zeroshot"), p["question"], [])
            for p in load_split({"source": "synthetic", "synthetic_seed": 1}, "test", n, 0)]


def _bytes(adapter, quantized):
    from moesweep.precision import full_expert_bytes

    out = {16: full_expert_bytes(adapter)}
    for b, tiers in quantized.items():
        out[b] = {}
        for l in adapter.layers():
            per = [tiers[f"layers.{l.index}.{p}"] for p in ("gate_up_proj", "down_proj")]
            out[b][l.index] = sum(q.codes[0].numel() + 2 * q.scales[0].numel() + q.zeros[0].numel() for q in per) \
                * torch.ones(adapter.num_experts, dtype=torch.long)
    return out


def _pools(adapter, quantized, synchronous, update_every=4, slots=4):
    from moesweep.fast.pools import DevicePrecisionPools

    E = adapter.num_experts
    by_tier = _bytes(adapter, quantized)
    layers = [l.index for l in adapter.layers()]
    budget = {i: int(by_tier[LO][i].sum()) + slots * int(by_tier[HI][i][0]) for i in layers}
    start = {i: torch.arange(E) < slots for i in layers}
    score = {i: torch.full((E,), 1 / E, dtype=torch.float64) for i in layers}
    return DevicePrecisionPools(adapter, quantized, HI, LO, start, score, by_tier, budget, 0.9, update_every, 0.0, 2,
                                frozen=False, synchronous=synchronous)


def _static_engine(model, adapter, quantized, high):
    from moesweep.fast.engine import FastQwen3MoeEngine

    widths = {i: torch.where(high[li].cpu(), HI, LO) for li, i in enumerate(l.index for l in adapter.layers())}
    return FastQwen3MoeEngine(model, adapter, Routing(), widths, quantized)


def _logits(engine, tokenizer, prompt):
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    P = enc.input_ids.shape[1]
    engine._ensure_cache(1, P + 1)
    slots = torch.arange(P, device="cuda")
    mask = (slots[:, None] >= torch.arange(engine._cache[0].shape[3], device="cuda")[None, :])[None, None]
    with torch.inference_mode():
        return engine._forward(enc.input_ids.cuda(), slots[None], slots, mask, torch.ones(P, dtype=torch.bool,
                                                                                        device="cuda"), False)


@pytest.mark.parametrize("synchronous", [True, False], ids=["synchronous", "asynchronous"])
def test_after_swaps_the_pools_compute_what_a_static_map_does(setup, synchronous):
    """Transitions happen; once their copies are in, the pool-served experts give bit-identical logits to a static
    map of the same experts (right weights in the right slots), and the budget held at every decision."""
    from moesweep.fast.engine import FastQwen3MoeEngine

    model, tokenizer, adapter, quantized = setup
    pools = _pools(adapter, quantized, synchronous)
    engine = FastQwen3MoeEngine(model, adapter, Routing(), None, {}, online=pools)
    engine.generate(tokenizer, _prompts(8), 48, batch_size=8)  # reads each step's tokens, as evaluate does
    pools.finish()
    assert pools.stats.transitions > 0 and pools.stats.bytes_moved > 0
    # synchronous: switched at the decision's own call; asynchronous: at a later call boundary once the copy is in
    # (only promotions of a decision at the very last call can be switched by finish() without a lag)
    assert pools.stats.switch_lag_calls == 0 if synchronous else pools.stats.switch_lag_calls > 0
    assert torch.equal(pools.serving >= 0, pools.high)  # every committed promotion is served
    assert all(int(pools.high[li].sum()) <= pools.slots[li] for li in range(len(pools.slots)))
    assert torch.equal(pools.served_high.cpu(), pools.high)
    static = _static_engine(model, adapter, quantized, pools.high)
    prompt = _prompts(9)[-1]
    assert torch.equal(_logits(engine, tokenizer, prompt), _logits(static, tokenizer, prompt))


def test_synchronous_pools_follow_the_reference_controller(setup):
    """The same decisions as dynamic.DynamicPrecision would take on the same hotness: replaying the GPU run's
    per-call routed mass through the reference controller's EMA and decisions gives the same trace."""
    model, tokenizer, adapter, quantized = setup
    from moesweep.dynamic import DynamicPrecision
    from moesweep.fast.engine import FastQwen3MoeEngine

    pools = _pools(adapter, quantized, synchronous=True)
    engine = FastQwen3MoeEngine(model, adapter, Routing(), None, {}, online=pools)
    engine.generate(tokenizer, _prompts(4), 24, batch_size=4, stop_checks=True)  # one host sync per step
    assert pools.stats.decisions >= 4
    layers = [l.index for l in adapter.layers()]
    E = adapter.num_experts
    ref = DynamicPrecision({i: type("X", (), {"gate_up_proj": torch.zeros(E, 1), "down_proj": torch.zeros(E, 1)})()
                            for i in layers}, {i: pools.start_high[li] for li, i in enumerate(layers)},
                           {i: pools.start_score[li] for li, i in enumerate(layers)},
                           {b: {i: {"gate_up_proj": torch.zeros(E, 1), "down_proj": torch.zeros(E, 1)} for i in layers}
                            for b in (HI, LO)}, _bytes(adapter, quantized), HI, LO,
                           {i: pools.budget[li] for li, i in enumerate(layers)}, 0.9, 4, 0.0, 2)
    # the GPU trace holds each decision's scores: feed the reference controller exactly those and compare maps
    gpu = [r for r in pools.stats.trace if r["decision"] > 0]
    for d in range(1, pools.stats.decisions + 1):
        rows = {r["layer"]: r for r in gpu if r["decision"] == d}
        for i in layers:
            ref.score[i] = torch.tensor(rows[i]["hotness"], dtype=torch.float64)
        ref.decide()
        for i in layers:
            assert ref.high[i].nonzero().flatten().tolist() == rows[i]["high_experts"], (d, i)
    assert ref.stats.transitions == pools.stats.transitions
    assert ref.stats.bytes_moved == pools.stats.bytes_moved


def test_asynchronous_decode_never_waits_on_the_host(setup, monkeypatch):
    """Between decode steps the controller neither synchronises the device nor waits on an event."""
    from moesweep.fast.engine import FastQwen3MoeEngine

    model, tokenizer, adapter, quantized = setup
    pools = _pools(adapter, quantized, synchronous=False, update_every=2)
    engine = FastQwen3MoeEngine(model, adapter, Routing(), None, {}, online=pools)
    engine.generate(tokenizer, _prompts(4), 8, batch_size=4, stop_checks=False)  # compile + capture first
    pools.reset()
    original_end_call = pools.end_call
    waits = []

    def end_call():
        with monkeypatch.context() as m:
            m.setattr(torch.cuda.Event, "synchronize", lambda self: waits.append("event"))
            m.setattr(torch.cuda, "synchronize", lambda *a: waits.append("device"))
            m.setattr(torch.cuda.Stream, "synchronize", lambda self: waits.append("stream"))
            original_end_call()

    monkeypatch.setattr(pools, "end_call", end_call)
    engine.generate(tokenizer, _prompts(8), 64, batch_size=8)  # evaluate's loop: the host reads each step's tokens
    assert waits == []
    pools.finish()
    assert pools.stats.decisions > 0 and pools.stats.transitions > 0


def test_offload_gives_full_precision_outputs_and_counts_fetches(setup):
    from moesweep.fast.engine import FastQwen3MoeEngine
    from moesweep.fast.pools import DeviceOffload
    from moesweep.precision import full_expert_bytes

    model, tokenizer, adapter, quantized = setup
    E = adapter.num_experts
    layers = [l.index for l in adapter.layers()]
    full = full_expert_bytes(adapter)
    budget = {i: int(full[i][0]) * (E // 4) for i in layers}  # a quarter of the experts fit
    widths = {i: torch.full((E,), 16) for i in layers}
    prompts = _prompts(8)
    reference = FastQwen3MoeEngine(model, adapter, Routing(), widths, {})
    expected, _ = reference.generate(tokenizer, prompts, 32, batch_size=8)
    offload = DeviceOffload(adapter, full, budget)
    engine = FastQwen3MoeEngine(model, adapter, Routing(), None, {}, online=offload)
    got, _ = engine.generate(tokenizer, prompts, 32, batch_size=8)
    assert [c.text for c in got] == [c.text for c in expected]
    assert offload.misses > 0 and offload.bytes_moved == offload.misses * int(full[layers[0]][0])


@pytest.fixture(scope="module")
def stage_files(embedded_model, tmp_path_factory):
    """The embedded model's calibrate → GPTQ 8/2 → profile outputs, as the DAG makes them."""
    from moesweep.stages import calibrate_stage, profile_stage, quantize_stage

    d = tmp_path_factory.mktemp("stages")
    model = {"id": str(embedded_model)}
    ds = {"source": "synthetic", "split": "test", "limit": 16}
    calibrate_stage(model, ds, {"n_samples": 16, "n_heldout": 4, "max_length": 128, "batch_size": 8}, 0,
                    d / "h.safetensors", d / "ho.safetensors", d / "stats.json")
    for bits in (HI, LO):
        quantize_stage(model, {"group_size": 32, "min_tokens": 1}, bits, "gptq", str(d / "h.safetensors"),
                       str(d / "ho.safetensors"), str(d / f"w{bits}.safetensors"), str(d / f"e{bits}.parquet"))
    profile_stage(model, ds, {"n_samples": 16, "max_length": 128, "batch_size": 8}, 0, str(d / "hot.parquet"))
    return d


def test_online_cells_run_on_the_fast_engine(embedded_model, stage_files, tmp_path):
    """evaluate picks the fast engine for dynamic, frozen and offload cells; offloading gives the 16-bit cell's
    completions; dynamic moves experts and stays within its budget; the reference engine's dynamic cell agrees."""
    import json

    import pandas as pd

    from moesweep.evaluate import evaluate_cell
    from moesweep.grid import expand_grid

    grid = [{"routing": {"policy": "native"}, "precision": p} for p in (
        {"policy": "full"}, {"policy": "offload", "memory_budget": 0.5},
        {"policy": "frozen", "bits_high": HI, "bits_low": LO, "memory_budget": 0.5},
        {"policy": "dynamic", "bits_high": HI, "bits_low": LO, "memory_budget": 0.5, "update_every": 8})]
    results = {}
    for cell in expand_grid(grid):
        for engine in (("fast", "reference") if cell.precision.policy == "dynamic" else ("fast",)):
            settings = {"seed": 0, "model": {"id": str(embedded_model), "dtype": "bfloat16"},
                        "dataset": {"source": "synthetic", "synthetic_seed": 1, "split": "test", "limit": 40},
                        "prompt": {"preset": "zeroshot", "max_new_tokens": 128},
                        "evaluate": {"batch_size": 16, "device": "cuda", "repeats": 1, "engine": engine}}
            d = tmp_path / f"{cell.id}-{engine}"
            d.mkdir()
            widths = {b for b in (cell.precision.bits_high, cell.precision.bits_low) if b in (HI, LO)}
            evaluate_cell(cell.to_dict(), settings, {b: str(stage_files / f"w{b}.safetensors") for b in widths},
                          str(stage_files / "hot.parquet"), None, d / "c.json", d / "p.parquet", d / "l.parquet",
                          d / "t.parquet")
            results[(cell.precision.policy, engine)] = (json.loads((d / "c.json").read_text()),
                                                        pd.read_parquet(d / "p.parquet"))
    assert all(s["engine"] == e for (_, e), (s, _) in results.items())
    full, offload = results[("full", "fast")], results[("offload", "fast")]
    assert offload[1]["completion"].tolist() == full[1]["completion"].tolist()
    assert offload[0]["cache_misses"] > 0 and offload[0]["bytes_moved"] > 0
    frozen, dyn, ref = results[("frozen", "fast")][0], results[("dynamic", "fast")][0], results[("dynamic", "reference")][0]
    assert frozen["transitions"] == 0 and dyn["transitions"] > 0 and ref["transitions"] > 0
    assert dyn["budget_utilisation"] <= 1 and dyn["expert_weight_bytes"] == frozen["expert_weight_bytes"]
    assert dyn["switch_lag_calls"] >= 0 and ref["switch_lag_calls"] == 0
    assert abs(dyn["accuracy_strict"] - ref["accuracy_strict"]) <= 0.1
