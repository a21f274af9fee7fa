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
