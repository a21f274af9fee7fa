"""Decode throughput of the fast engine on Qwen3-30B-A3B shapes (random bf16 weights; int tiers = RTN of them)
against the HBM roofline.

For each (variant, batch): prefill a 128-token prompt, decode 128 new tokens, median of --repeats runs. Prints and
writes a Markdown table: tok/s (decode), ms per decode step, bytes of weights + KV needed per step (distinct experts
actually routed, measured, times their tier's packed size; dense weights; KV at the mean context), and the fraction
of the roofline = (bytes needed / measured copy bandwidth) / measured step time. The baseline, transformers'
`generate` with its `grouped_mm` experts, runs in the same process on the same weights.

Command (H200 through the device tool):
    PYTHONPATH=workflow python3 benchmarks/fast_engine.py --out benchmarks/results/<card>/fast_engine.md
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from moesweep.fast.engine import FastQwen3MoeEngine  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.model import Qwen3MoeAdapter  # noqa: E402

QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                     tie_word_embeddings=False, rms_norm_eps=1e-6)  # config.json of Qwen/Qwen3-30B-A3B


def build_model(layers: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: fp32 would need 122 GB
    try:
        with torch.device("cuda"):
            model = Qwen3MoeForCausalLM(Qwen3MoeConfig(num_hidden_layers=layers, **QWEN3_30B_A3B))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def copy_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy (median)."""
    n = int(gib * 2**30)
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n / statistics.median(times[2:])


@torch.no_grad()
def rtn_packed(weight: torch.Tensor, bits: int, group: int = 128):
    """Round-to-nearest of the model's own expert weights on the GPU, in the quantize stage's layout (uint8 bit
    streams, code i of a byte in bits i*b.., fp16 scales, uint8 zeros; quant/core.py). Real codes matter: random
    ones would blow up the activations and change which experts the routers pick."""
    E, n_out, n_in = weight.shape
    qmax = (1 << bits) - 1
    w = weight.float().view(E, n_out, n_in // group, group)
    lo, hi = w.amin(-1, keepdim=True).clamp_max(0), w.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()
    zero = (-lo / scale).round().clamp(0, qmax)
    u = (w / scale + zero).round().clamp(0, qmax).to(torch.int32).view(E, n_out, n_in // (8 // bits), 8 // bits)
    codes = (u << (torch.arange(8 // bits, device=u.device, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)
    spec = SimpleNamespace(bits=bits, symmetric=False, columns_per_group=lambda n: group)
    return SimpleNamespace(shape=(E, n_out, n_in), spec=spec, codes=codes, scales=scale.squeeze(-1).half(),
                           zeros=zero.squeeze(-1).to(torch.uint8))


def quantized_tiers(adapter, widths: set[int], group: int = 128) -> dict[int, dict]:
    out = {}
    for bits in sorted(widths - {16}):
        out[bits] = {}
        for l in adapter.layers():
            for name in ("gate_up_proj", "down_proj"):
                out[bits][f"layers.{l.index}.{name}"] = rtn_packed(getattr(l.experts, name), bits, group)
    return out


def dense_bytes(model) -> int:
    """Weights read every step apart from the experts: attention, norms, routers, final norm, lm_head."""
    total = 0
    for name, p in model.named_parameters():
        if "experts" in name or "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    return total


def expert_bytes(adapter, bits: int) -> int:
    l = adapter.layers()[0]
    n = l.experts.gate_up_proj[0].numel() + l.experts.down_proj[0].numel()
    if bits == 16:
        return 2 * n
    groups = n // 128
    return n * bits // 8 + 3 * groups  # codes + fp16 scale + uint8 zero per group of 128


def kv_bytes(model, batch: int, context: float) -> float:
    cfg = model.config
    return cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.head_dim * 2 * 2 * context


def time_fast(model, adapter, variant, batch, prompt_len, new_tokens, repeats, bandwidth):
    routing, widths_of, hot_fraction = variant["routing"], variant["widths"], variant.get("hot_fraction")
    E = adapter.num_experts
    layers = [l.index for l in adapter.layers()]
    if hot_fraction is None:
        widths = {i: torch.full((E,), widths_of[0]) for i in layers}
        hot = None
    else:  # the first N experts of every layer at the high width (random weights: any N are alike)
        n_hot = int(hot_fraction * E)
        widths = {i: torch.tensor([widths_of[0]] * n_hot + [widths_of[1]] * (E - n_hot)) for i in layers}
        hot = {i: w == widths_of[0] for i, w in widths.items()}
    quantized = quantized_tiers(adapter, set(widths_of))
    engine = FastQwen3MoeEngine(model, adapter, routing, widths, quantized, hot_masks=hot)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    engine.time_decode(ids, new_tokens)  # compile, capture
    step_ms, tps = [], []
    for _ in range(repeats):
        engine.reset_stats()
        t = engine.time_decode(ids, new_tokens)
        step_ms.append(1e3 * t.decode_s[0] / t.decode_steps)
        tps.append(batch * t.decode_steps / t.decode_s[0])
    stats = engine.routing_stats()
    calls = stats[layers[0]].decode_calls
    distinct = statistics.fmean(s.distinct_experts_decode / calls for s in stats.values())
    distinct_high = statistics.fmean(s.distinct_high_decode / calls for s in stats.values())
    hi, lo = widths_of[0], widths_of[-1]
    if hot is None:
        per_layer = distinct * expert_bytes(adapter, hi)
    else:
        per_layer = distinct_high * expert_bytes(adapter, hi) + (distinct - distinct_high) * expert_bytes(adapter, lo)
    needed = dense_bytes(model) + len(layers) * per_layer + kv_bytes(model, batch, prompt_len + new_tokens / 2)
    ms = statistics.median(step_ms)
    del engine, quantized
    gc.collect()
    torch.cuda.empty_cache()
    return {"tok_s": statistics.median(tps), "ms_step": ms, "distinct": distinct, "bytes": needed,
            "roofline": (needed / bandwidth * 1e3) / ms, "roofline_tok_s": batch / (needed / bandwidth)}


def time_hf(model, batch, prompt_len, new_tokens, repeats):
    model.set_experts_implementation("grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    tps = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        tps.append(batch * new_tokens / (time.perf_counter() - t0))
    return statistics.median(tps)


VARIANTS = {
    "bf16": {"routing": Routing(), "widths": (16,)},
    "int8 experts": {"routing": Routing(), "widths": (8,)},
    "int4 experts": {"routing": Routing(), "widths": (4,)},
    "int2 experts": {"routing": Routing(), "widths": (2,)},
    "hot/cold 25% bf16, rest int4": {"routing": Routing(), "widths": (16, 4), "hot_fraction": 0.25},
    "top-1, CF 1.0 (bf16)": {"routing": Routing(policy="topk", top_k=1, capacity_factor=1.0), "widths": (16,)},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hf-new-tokens", type=int, default=32, help="HF generate is slow; fewer tokens, same tok/s")
    ap.add_argument("--hf-repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    model = build_model(args.layers)
    adapter = Qwen3MoeAdapter(model)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; dense bytes {dense_bytes(model) / 1e9:.2f} GB", flush=True)
    rows = []
    for batch in args.batches:
        hf = time_hf(model, batch, args.prompt_len, args.hf_new_tokens, args.hf_repeats) if args.hf_repeats else None
        rows.append(("HF generate, grouped_mm (baseline)", batch, hf, None))
        print(f"HF batch {batch}: {hf} tok/s", flush=True)
        for name in args.variants:
            r = time_fast(model, adapter, VARIANTS[name], batch, args.prompt_len, args.new_tokens, args.repeats, bandwidth)
            rows.append((name, batch, r["tok_s"], r))
            print(f"{name} batch {batch}: {r}", flush=True)
            write_table(args, bandwidth, rows)  # after every row: a run cut short still leaves its table
    write_table(args, bandwidth, rows, final=True)


def write_table(args, bandwidth, rows, final=False):
    gpu = torch.cuda.get_device_name()
    lines = [f"# Fast engine decode throughput, Qwen3-30B-A3B shapes ({args.layers} layers, random bf16 weights)", "",
             f"- Hardware: {gpu}; copy bandwidth (read + write) measured {bandwidth / 1e12:.2f} TB/s",
             f"- Versions: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
             f"triton {__import__('triton').__version__}, Python {platform.python_version()}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/fast_engine.py {' '.join(sys.argv[1:])}`",
             f"- Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs "
             f"(HF generate: {args.hf_new_tokens} new tokens, median of {args.hf_repeats}; it is overhead-bound, "
             f"so its tok/s does not depend on the length)",
             "- tok/s = batch × decode steps / decode time (prefill excluded). Bytes needed per step = dense weights "
             "(attention, norms, routers, lm_head) + Σ_layers distinct experts routed in that step (measured) × their "
             "tier's packed bytes + KV cache at the mean context. Roofline fraction = (bytes / copy bandwidth) / step time.",
             "", "| variant | batch | tok/s | ms/step | distinct experts/layer | GB needed/step | roofline tok/s | "
             "fraction of roofline | × HF |", "|---|---|---|---|---|---|---|---|---|"]
    hf_by_batch = {b: t for _, b, t, r in rows if r is None}
    for name, batch, tps, r in rows:
        if r is None:
            if tps is not None:
                lines.append(f"| {name} | {batch} | {tps:.1f} | {1e3 * batch / tps:.2f} | | | | | 1.00 |")
            continue
        ratio = f"{tps / hf_by_batch[batch]:.1f}" if hf_by_batch.get(batch) else ""
        lines.append(f"| {name} | {batch} | {tps:.1f} | {r['ms_step']:.3f} | {r['distinct']:.1f} | "
                     f"{r['bytes'] / 1e9:.2f} | {r['roofline_tok_s']:.0f} | {r['roofline']:.0%} | {ratio} |")
    write_report(args.out, lines, echo=final)


def write_report(out: Path, lines: list[str], echo: bool = True) -> None:
    """A benchmark's Markdown table into `out` (rewritten after every row, so a run cut short leaves its rows)."""
    text = "\n".join(lines) + "\n"
    if echo:
        print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
