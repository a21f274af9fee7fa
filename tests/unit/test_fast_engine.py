"""The fast engine on CUDA (skipped without it): transformers' own greedy tokens, and the reference path's results."""
import json

import pandas as pd
import pytest
import torch

from moesweep.evaluate import evaluate_cell
from moesweep.grid import Routing, expand_grid
from transformers_greedy import transformers_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(n):
    from moesweep.data.prompts import build_prompt, get_preset
    from moesweep.data.sources import load_split

    ds = {"source": "synthetic", "synthetic_seed": 1}
    return [build_prompt(get_preset("zeroshot"), p["question"], []) for p in load_split(ds, "test", n, 0)]


LOGIT_TOLERANCE = 2e-2  # |fast - transformers| / max |logit|, bf16 (the prefill check below)


def test_fast_bf16_decode_follows_transformers(embedded_model):
    """The decode step (CUDA graph, batch of 8 with left padding, as evaluate runs it) against transformers' own
    greedy decoding of each prompt alone, 128 steps.

    Teacher-forced (every step fed transformers' previous token), at most 1 % of the 1,024 predictions may differ.
    Measured on the H200 (benchmarks/results/nvidia-h200/greedy_agreement.md): 6 differ, 5 of them where
    transformers' own top-2 margin is at most 7 % of the largest logit, one at a clear margin (0.54) that follows a routing near-tie
    in the last layer (benchmarks/results/nvidia-h200/trace_divergence.md).
    Free-running, a near-tie that the two round differently sends a continuation elsewhere for good, so the
    yardstick is transformers itself: its own `generate` on the same left-padded batch of 8 keeps 1 of 8 prompts
    equal to the unpadded reference (measured), the fast engine 5 of 8; the fast engine must do at least as well."""
    from moesweep.fast.engine import FastQwen3MoeEngine
    from moesweep.model import load_model

    model, tokenizer, adapter = load_model(str(embedded_model), "bfloat16", "cuda")
    prompts = _prompts(8)
    reference = [transformers_greedy(model, tokenizer, p, 128) for p in prompts]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    with torch.inference_mode():  # before the engine fuses q/k/v (values unchanged, but the same kernels as above)
        batched = model.generate(**enc, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    same_hf = sum(batched[b, enc.input_ids.shape[1]:].tolist() == r[0] for b, r in enumerate(reference))
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    fast = FastQwen3MoeEngine(model, adapter, Routing(), widths, {})

    want = torch.tensor([r[0] for r in reference], device="cuda")
    got = fast.forced_decode(enc.input_ids, enc.attention_mask, want[:, :-1])
    margins = torch.tensor([r[1] for r in reference], device="cuda") / torch.tensor([r[2] for r in reference],
                                                                                     device="cuda")
    differ = got != want
    print(f"teacher-forced: {int(differ.sum())} of {differ.numel()} predictions differ from transformers'; their "
          f"margins {sorted(round(float(m), 4) for m in margins[differ])}")
    assert int(differ.sum()) <= differ.numel() // 100

    completions, timing = fast.generate(tokenizer, prompts, 128, batch_size=8, stop_checks=False)
    assert timing.decode_steps == 127
    same = sum(tokenizer.decode(ref[0], skip_special_tokens=True) == c.text for ref, c in zip(reference, completions))
    print(f"free-running: {same}/8 prompts decode the same 128 tokens as transformers (its own batch of 8: {same_hf}/8)")
    assert same >= same_hf
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
    ref_logits = reference[0][3]
    assert torch.isfinite(logits).all()
    assert float((logits - ref_logits).abs().max() / ref_logits.abs().max()) < LOGIT_TOLERANCE


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
