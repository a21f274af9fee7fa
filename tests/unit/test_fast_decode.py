"""The fast engine's decode step (fused q/k/v, norm+rotary+cache kernel, decode attention, one-launch alignment,
decode expert kernels) on the CPU: Triton's interpreter, float32, eager (no graph). There it must decode exactly
what the reference engine decodes, token for token and counter for counter. On CUDA test_fast_engine.py checks it
in bf16 against transformers."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check in float32; CUDA: test_fast_engine.py")

from moesweep.engine import generate_greedy  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.model import install_policy, load_model  # noqa: E402
from moesweep.routing import RoutingContext  # noqa: E402
from transformers_greedy import transformers_greedy  # noqa: E402

PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:", "Question: 7 + 5?\nAnswer:",
           "Question: A farmer has 12 cows and sells 5. How many are left?\nAnswer:"]
NEW_TOKENS = 24


@pytest.mark.parametrize("routing", [{}, {"policy": "topk", "top_k": 1, "capacity_factor": 1.0}],
                         ids=["native", "top1-cf1"])
def test_decode_equals_reference_engine_tokens_and_accounting(embedded_model, routing):
    from moesweep.fast.engine import FastQwen3MoeEngine

    policy = Routing(**routing)
    model, tokenizer, adapter = load_model(str(embedded_model), "float32", "cpu")
    context = RoutingContext()
    install_policy(adapter, policy, context)
    want, want_timing = generate_greedy(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=3, context=context,
                                        stop=())

    model, tokenizer, adapter = load_model(str(embedded_model), "float32", "cpu")
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    fast = FastQwen3MoeEngine(model, adapter, policy, widths, {}, compile=False)
    fast_context = RoutingContext()
    got, got_timing = fast.generate(tokenizer, PROMPTS, NEW_TOKENS, batch_size=3, context=fast_context)

    assert [c.text for c in got] == [c.text for c in want]
    assert got_timing.decode_steps == want_timing.decode_steps
    got_stats = fast.routing_stats()
    for layer, s in context.stats.items():
        g = got_stats[layer]
        for name in s.COUNTERS:
            assert getattr(g, name) == getattr(s, name), (layer, name)
        assert torch.equal(g.load, s.load)


def test_forced_decode_predicts_the_reference_continuation(embedded_model):
    """Teacher forcing with transformers' own greedy tokens gives back those tokens (float32: no near-ties)."""
    from moesweep.fast.engine import FastQwen3MoeEngine

    model, tokenizer, adapter = load_model(str(embedded_model), "float32", "cpu")
    ref = torch.tensor([transformers_greedy(model, tokenizer, p, 12)[0] for p in PROMPTS[:2]])
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    fast = FastQwen3MoeEngine(model, adapter, Routing(), widths, {}, compile=False)
    enc = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(fast.forced_decode(enc.input_ids, enc.attention_mask, ref[:, :-1]), ref)


def test_batch_one_decode_takes_the_gemv_projections_and_follows_transformers(embedded_model, monkeypatch):
    """Batch 1 is where the decode step projects q/k/v and o with fast/gemv.py (o split over its columns, the partial
    sums added in the compiled glue): teacher-forced predictions equal transformers' greedy tokens."""
    from moesweep.fast import engine as fast_engine, gemv

    calls = []
    real = gemv.dense_gemv
    monkeypatch.setattr(gemv, "dense_gemv", lambda *a, **k: calls.append(a[2] if len(a) > 2 else None) or real(*a, **k))
    model, tokenizer, adapter = load_model(str(embedded_model), "float32", "cpu")
    ref = torch.tensor([transformers_greedy(model, tokenizer, PROMPTS[2], 12)[0]])
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    fast = fast_engine.FastQwen3MoeEngine(model, adapter, Routing(), widths, {}, compile=False)
    enc = tokenizer(PROMPTS[2:], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(fast.forced_decode(enc.input_ids, enc.attention_mask, ref[:, :-1]), ref)
    # per decode step and layer: q/k/v unsplit, then o in slices
    assert calls[:2] == [None, fast._o_split] and len(calls) == 2 * 11 * len(adapter.layers())
