"""Where the fast engine's bf16 decode departs from transformers' at one teacher-forced step (CUDA).

greedy_agreement.py lists the steps whose greedy predictions differ. For each one given here (prompt, step), both
implementations decode the prompt alone, teacher-forced with transformers' own greedy tokens, up to that step; at
that step the script records, per layer, the experts each one routed the new token to, the router's probabilities
and, in transformers, the gap between the k-th and (k+1)-th probability (how near the selection was to a tie).
The fast engine runs its decode step eagerly (no CUDA graph) with a recorder around routing.route; its arithmetic is
that of the compiled step but for inductor's fusion order.

Command (H200 through the device tool):
    PYTHONPATH=workflow python3 benchmarks/trace_divergence.py --at 1:103 0:75 7:108 --out benchmarks/results/<card>/trace_divergence.md
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


@torch.inference_mode()
def reference_routing(model, adapter, tokenizer, prompt, steps):
    """transformers' greedy tokens for `steps` steps, each layer's router probabilities [E] at the last step's input
    token, and the logits of that step."""
    from transformers import DynamicCache

    probs = {}

    def hook(layer):
        def record(module, args, output):
            h = args[0].reshape(-1, args[0].shape[-1])[-1:]
            probs[layer] = torch.softmax(torch.nn.functional.linear(h, module.weight).float(), -1)[0]
        return record

    handles = [l.router.register_forward_hook(hook(l.index)) for l in adapter.layers()]
    try:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
        cache, tokens = DynamicCache(), []
        for _ in range(steps + 1):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
            ids = logits.argmax(-1, keepdim=True)
            tokens.append(int(ids))
    finally:
        for h in handles:
            h.remove()
    return tokens, probs, logits[0]


@torch.inference_mode()
def fast_routing(model, adapter, tokenizer, prompt, forced, num_layers):
    """The fast engine, teacher-forced with `forced` [N]: each layer's routed experts and router probabilities at
    the last forced step, and that step's prediction."""
    calls = []
    saved = fast_engine.route

    def recording_route(probs, *args, **kwargs):
        out = saved(probs, *args, **kwargs)
        calls.append((probs[-1].clone(), out[0][-1].clone()))
        return out

    fast_engine.route = recording_route
    try:
        widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
        fast = fast_engine.FastQwen3MoeEngine(model, adapter, Routing(), widths, {}, compile=False)
        fast._capture = False  # eager steps: the recorder sees every layer's routing
        enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        got = fast.forced_decode(enc.input_ids.cuda(), enc.attention_mask.cuda(), forced[None].cuda())
    finally:
        fast_engine.route = saved
    return got[0], calls[-num_layers:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "resources" / "models" / "tiny-qwen3-moe"))
    ap.add_argument("--at", nargs="+", required=True, help="prompt:step pairs from greedy_agreement.py")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    model, tokenizer, adapter = load_model(args.model, "bfloat16", "cuda")
    problems = load_split({"source": "synthetic", "synthetic_seed": 1}, "test", 8, 0)
    prompts = [build_prompt(get_preset("zeroshot"), p["question"], []) for p in problems]
    layers = adapter.layers()
    k = adapter.top_k
    lines = [f"# Where the fast engine's bf16 decode departs from transformers' (embedded model)", "",
             f"- Hardware: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers "
             f"{__import__('transformers').__version__}, triton {__import__('triton').__version__}, Python "
             f"{platform.python_version()}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/trace_divergence.py {' '.join(sys.argv[1:])}`",
             f"- Per layer at the step: experts only one side routed to; gap = transformers' k-th minus (k+1)-th "
             f"router probability (k = {k}); max |Δp| = largest difference of the two router probability vectors.",
             ""]
    for spec in args.at:
        b, step = (int(v) for v in spec.split(":"))
        tokens, ref_probs, ref_logits = reference_routing(model, adapter, tokenizer, prompts[b], step)
        got, calls = fast_routing(model, adapter, tokenizer, prompts[b], torch.tensor(tokens[:step]), len(layers))
        top2 = ref_logits.topk(2)
        lines += [f"## prompt {b}, step {step}: transformers predicts {tokens[step]} (margin "
                  f"{float(top2.values[0] - top2.values[1]):.3f} logits, next {int(top2.indices[1])}), fast engine "
                  f"{int(got[step])}", "", "| layer | only transformers | only fast | gap at k | max abs Δp |",
                  "|---|---|---|---|---|"]
        for layer, (fast_p, fast_index) in zip(layers, calls):
            p = ref_probs[layer.index]
            ranked = p.sort(descending=True)
            ref_set = set(ranked.indices[:k].tolist())
            fast_set = set(fast_index[fast_index < adapter.num_experts].tolist())
            gap = float(ranked.values[k - 1] - ranked.values[k])
            lines.append(f"| {layer.index} | {sorted(ref_set - fast_set)} | {sorted(fast_set - ref_set)} | "
                         f"{gap:.2e} | {float((p - fast_p).abs().max()):.2e} |")
        lines.append("")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
