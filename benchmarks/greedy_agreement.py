"""How closely the fast engine's bf16 greedy decoding follows transformers' on the embedded model (CUDA).

For 8 GSM-style prompts, transformers' own forward decodes each prompt alone for 128 steps (the reference; with
each step's top-1 minus top-2 logit). Then, on the same weights:
* the fast engine teacher-forced (each step fed the reference's previous token), batch of 8 with left padding,
  and each prompt alone: which predictions differ, and the reference's margin at each of them;
* the same with torch.topk routing instead of the sort-based top-k (ties between bf16 router logits);
* free-running: prompts whose 128 tokens equal the reference's, for the fast engine (each prompt alone, and the
  batch of 8) and, as the yardstick of what bf16 batching alone does, for transformers' own `generate` on the
  same left-padded batch of 8.

Command (H200 through the device tool):
    PYTHONPATH=workflow python3 benchmarks/greedy_agreement.py --out benchmarks/results/<card>/greedy_agreement.md
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fast_engine import write_report  # noqa: E402
from moesweep.data.prompts import build_prompt, get_preset  # noqa: E402
from moesweep.data.sources import load_split  # noqa: E402
from moesweep.fast import engine as fast_engine  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.model import load_model  # noqa: E402
from moesweep.routing import route  # noqa: E402

STEPS = 128


@torch.inference_mode()
def reference(model, tokenizer, prompt):
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
    cache, tokens, margins = DynamicCache(), [], []
    for _ in range(STEPS):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
        top2 = logits.topk(2, dim=-1).values[0]
        margins.append(float((top2[0] - top2[1]) / logits.abs().max()))
        ids = logits.argmax(-1, keepdim=True)
        tokens.append(int(ids))
    return tokens, margins


def forced(model, adapter, tokenizer, prompts, want, torch_topk: bool, alone: bool = False):
    """alone: each prompt decoded by itself (batch 1, no padding), as the reference; else one left-padded batch."""
    saved = fast_engine.route
    if torch_topk:  # the compiled glue calls route(..., sort_topk=True); this variant ignores it
        fast_engine.route = lambda *a, sort_topk=False, **k: route(*a, **k)
    try:
        widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
        fast = fast_engine.FastQwen3MoeEngine(model, adapter, Routing(), widths, {})
        groups = [[i] for i in range(len(prompts))] if alone else [list(range(len(prompts)))]
        got = []
        for group in groups:
            enc = tokenizer([prompts[i] for i in group], return_tensors="pt", padding=True, add_special_tokens=False)
            got.append(fast.forced_decode(enc.input_ids.cuda(), enc.attention_mask.cuda(), want[group, :-1]))
        got = torch.cat(got)
    finally:
        fast_engine.route = saved
    return fast, got


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "resources" / "models" / "tiny-qwen3-moe"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    model, tokenizer, adapter = load_model(args.model, "bfloat16", "cuda")
    problems = load_split({"source": "synthetic", "synthetic_seed": 1}, "test", 8, 0)
    prompts = [build_prompt(get_preset("zeroshot"), p["question"], []) for p in problems]
    refs = [reference(model, tokenizer, p) for p in prompts]
    want = torch.tensor([r[0] for r in refs], device="cuda")
    margins = torch.tensor([r[1] for r in refs], device="cuda")
    lines = [f"# Fast engine vs transformers, bf16 greedy, embedded model ({args.model.split('/')[-1]})", "",
             f"- Hardware: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers "
             f"{__import__('transformers').__version__}, triton {__import__('triton').__version__}, Python "
             f"{platform.python_version()}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/greedy_agreement.py {' '.join(sys.argv[1:])}`",
             f"- 8 prompts x {STEPS} steps; reference = transformers' forward, each prompt alone. Margin = the "
             "reference's top-1 minus top-2 logit / max |logit| at that step.", ""]
    fast = None
    for name, torch_topk, alone in (("fast engine (sort-based top-k), batch of 8", False, False),
                                    ("fast engine, torch.topk routing, batch of 8", True, False),
                                    ("fast engine, each prompt alone (batch 1)", False, True)):
        fast, got = forced(model, adapter, tokenizer, prompts, want, torch_topk, alone)
        differ = (got != want).nonzero().tolist()
        lines.append(f"## Teacher-forced: {name}: {len(differ)} of {want.numel()} predictions differ")
        lines += [f"- prompt {b}, step {s}: reference token {int(want[b, s])} (margin {float(margins[b, s]):.4f}), "
                  f"fast {int(got[b, s])}" for b, s in differ]
        lines.append("")
    completions, _ = fast.generate(tokenizer, prompts, STEPS, batch_size=8, stop_checks=False)
    same_fast = [tokenizer.decode(r[0], skip_special_tokens=True) == c.text for r, c in zip(refs, completions)]
    alone, _ = fast.generate(tokenizer, prompts, STEPS, batch_size=1, stop_checks=False)
    same_alone = [tokenizer.decode(r[0], skip_special_tokens=True) == c.text for r, c in zip(refs, alone)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    same_hf = [out[b, enc.input_ids.shape[1]:].tolist() == refs[b][0] for b in range(len(prompts))]
    lines += ["## Free-running, 128 tokens equal to the reference's",
              f"- fast engine, each prompt alone (batch 1, as the reference): {sum(same_alone)}/8 prompts",
              f"- fast engine, batch 8: {sum(same_fast)}/8 prompts",
              f"- transformers' own generate, same left-padded batch of 8: {sum(same_hf)}/8 prompts", ""]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
