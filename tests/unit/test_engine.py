"""Reference engine: batched = unbatched completions, no padding counted, stop handling."""

from moesweep.engine import generate_greedy
from moesweep.model import install_policy, load_model
from moesweep.grid import Routing
from moesweep.routing import RoutingContext

PROMPTS = ["Question: Tom has 3 apples.\nAnswer:", "Question: x\nAnswer:",
           "Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:", "Question: 7\nAnswer:"]


def test_batched_equals_unbatched(random_checkpoint):
    model, tok, adapter = load_model(str(random_checkpoint))
    ctx = RoutingContext()
    install_policy(adapter, Routing("native"), ctx)
    batched, t_b = generate_greedy(model, tok, PROMPTS, 16, batch_size=4, context=ctx)
    single, t_s = generate_greedy(model, tok, PROMPTS, 16, batch_size=1, context=ctx)
    assert [c.text for c in batched] == [c.text for c in single]
    assert t_b.generated_tokens == t_s.generated_tokens == sum(c.generated_tokens for c in batched)
    assert t_b.prompt_tokens == t_s.prompt_tokens < t_b.padded_prompt_tokens  # padding is not counted


def test_routing_sees_only_real_tokens(random_checkpoint):
    model, tok, adapter = load_model(str(random_checkpoint))
    ctx = RoutingContext()
    install_policy(adapter, Routing("native"), ctx)
    _, timing = generate_greedy(model, tok, PROMPTS, 8, batch_size=4, context=ctx)
    # Every real prompt token and every generated token except each sequence's last goes through each layer.
    expected = timing.prompt_tokens + timing.generated_tokens - len(PROMPTS)
    assert {s.tokens for s in ctx.stats.values()} == {expected}


def test_stop_strings_and_length(random_checkpoint):
    model, tok, adapter = load_model(str(random_checkpoint))
    out, _ = generate_greedy(model, tok, PROMPTS[:2], 5, batch_size=2)
    assert all(c.generated_tokens <= 5 for c in out)
    assert all(c.stopped in ("eos", "stop_string", "length") for c in out)
    text = out[0].text
    assert len(text) > 2
    # a stop string equal to the first generated characters stops at once, and the text is cut before it
    cut, _ = generate_greedy(model, tok, PROMPTS[:1], 5, batch_size=1, stop=(text[:2],))
    assert cut[0].text == "" and cut[0].stopped == "stop_string"


def test_batched_equals_unbatched_on_the_embedded_model(embedded_model):
    """Real completions (tens of tokens, stopping at different steps) on the shipped model, fp32 CPU."""
    from moesweep.data.sources import load_split

    model, tok, adapter = load_model(str(embedded_model))
    install_policy(adapter, Routing("native"), RoutingContext())
    problems = load_split({"source": "synthetic", "synthetic_seed": 1}, "test", 8, 0)
    prompts = [f"Question: {p['question']}\nAnswer:" for p in problems]
    batched, _ = generate_greedy(model, tok, prompts, 128, batch_size=8)
    single, _ = generate_greedy(model, tok, prompts, 128, batch_size=1)
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.stopped for c in batched] == [c.stopped for c in single]
    assert sum(c.stopped == "eos" for c in batched) >= 6
