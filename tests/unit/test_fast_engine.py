"""The fast engine on CUDA (skipped without it): transformers' own greedy tokens, and the reference path's results."""
import json

import pandas as pd
import pytest
import torch

from moesweep.evaluate import evaluate_cell
from moesweep.grid import Routing, expand_grid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(n):
    from moesweep.data.prompts import build_prompt, get_preset
    from moesweep.data.sources import load_split

    ds = {"source": "synthetic", "synthetic_seed": 1}
    return [build_prompt(get_preset("zeroshot"), p["question"], []) for p in load_split(ds, "test", n, 0)]


@torch.inference_mode()
def _transformers_greedy(model, tokenizer, prompt, steps):
    """transformers' own forward (its default experts implementation), one sequence, no padding."""
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
    cache, out, first_logits = DynamicCache(), [], None
    for _ in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        first_logits = logits if first_logits is None else first_logits
        ids = logits.argmax(-1, keepdim=True)
        out.append(int(ids))
    return out, first_logits.float()


def test_fast_bf16_greedy_equals_transformers(embedded_model):
    from moesweep.fast.engine import FastQwen3MoeEngine
    from moesweep.model import load_model

    model, tokenizer, adapter = load_model(str(embedded_model), "bfloat16", "cuda")
    prompts = _prompts(8)
    reference = [_transformers_greedy(model, tokenizer, p, 128) for p in prompts]
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    fast = FastQwen3MoeEngine(model, adapter, Routing(), widths, {})
    completions, timing = fast.generate(tokenizer, prompts, 128, batch_size=8, stop_checks=False)
    assert timing.decode_steps == 127
    same = [tokenizer.decode(ref, skip_special_tokens=True) == c.text for (ref, _), c in zip(reference, completions)]
    # Measured on the H200 (2026-11-29): 5 of 8 prompts give the same 128 tokens. The fast path rounds less often
    # (silu(gate)*up and the sum over experts in float32, one bf16 rounding), so a near-tie can flip a token and
    # the continuation diverges from there; the prefill logits below bound the difference itself.
    print(f"greedy: {sum(same)}/8 prompts decode the same 128 tokens as transformers")
    assert sum(same) >= 5, f"{sum(same)}/8 prompts decode the same 128 greedy tokens as transformers"
    # prefill logits of one unpadded prompt against transformers' own
    enc = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)
    fast._ensure_cache(1, enc.input_ids.shape[1] + 1)
    P = enc.input_ids.shape[1]
    slots = torch.arange(P, device="cuda")
    L = fast._cache[0].shape[3]
    mask = (slots[:, None] >= torch.arange(L, device="cuda")[None, :])[None, None]
    with torch.inference_mode():  # the cache was made under inference mode by generate()
        logits = fast._forward(enc.input_ids.cuda(), slots[None], slots, mask,
                               torch.ones(P, dtype=torch.bool, device="cuda"), False).float()
    ref_logits = reference[0][1]
    assert torch.isfinite(logits).all()
    assert float((logits - ref_logits).abs().max() / ref_logits.abs().max()) < 2e-2


# top-1 with capacity is left out: in bf16 a rounding difference moves a capacity drop and the completions (0.5 %
# accurate on this model) diverge (12 % equal, measured); its accounting is checked on the CPU against the
# reference router (test_fast_kernels.py).
GRID = [{"routing": {"policy": "native"}, "precision": {"policy": "full"}},
        {"routing": {"policy": "topk", "top_k": 2}, "precision": {"policy": "full"}}]


@pytest.mark.parametrize("cell", expand_grid(GRID), ids=lambda c: c.id)
def test_fast_cell_matches_reference_cell(embedded_model, tmp_path, cell):
    results = {}
    # 40 problems in batches of 16: the last batch (8) is a batch size first seen mid-run (a second graph capture),
    # which must not disturb the accounting (evaluate checks decode calls per layer against the engine's steps).
    for engine in ("reference", "fast"):
        settings = {"seed": 0, "model": {"id": str(embedded_model), "dtype": "bfloat16"},
                    "dataset": {"source": "synthetic", "synthetic_seed": 1, "split": "test", "limit": 40},
                    "prompt": {"preset": "zeroshot", "max_new_tokens": 128},
                    "evaluate": {"batch_size": 16, "device": "cuda", "repeats": 1, "engine": engine}}
        d = tmp_path / engine
        d.mkdir()
        evaluate_cell(cell.to_dict(), settings, {}, None, None, d / "c.json", d / "p.parquet", d / "l.parquet",
                      d / "t.parquet")
        results[engine] = (json.loads((d / "c.json").read_text()), pd.read_parquet(d / "p.parquet"),
                           pd.read_parquet(d / "l.parquet"))
    (ref, p_ref, l_ref), (fast, p_fast, l_fast) = results["reference"], results["fast"]
    assert fast["engine"] == "fast" and ref["engine"] == "reference"
    same = (p_ref["completion"] == p_fast["completion"]).mean()
    assert same >= 0.9, f"only {same:.0%} of completions equal between the reference and the fast engine (bf16)"
    assert abs(ref["drop_rate"] - fast["drop_rate"]) < 0.02
    assert abs(ref["accuracy_strict"] - fast["accuracy_strict"]) <= 0.07
