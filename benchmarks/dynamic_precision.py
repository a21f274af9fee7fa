"""Dynamic expert precision vs frozen map vs offloading at equal memory budget, on the fast engine (GPU).

Qwen3-30B-A3B shapes (random bf16 weights, int4 tier = RTN of them), DynaExq's published tiers FP16/INT4 and
controller settings (α 0.9, T_u 200 calls, δ 0.01, rate limit 4). At each budget (fraction of the 16-bit expert
bytes, the same bytes for every policy) and batch size: prefill a --prompt-len prompt, decode --new-tokens
tokens, median of --repeats runs; the controller is reset before every run. Every variant's loop reads each
step's tokens on the host, as a serving loop (and evaluate) does: that is when the dynamic controller learns
that a snapshot or a copy has completed (a loop that never synchronises would never apply a decision).

- dynamic / frozen: fast/pools.py — every expert's int4 version resident plus a pool of N bf16 slots per layer;
  dynamic re-decides every T_u calls and copies promotions on a side stream; frozen keeps the starting map.
- offload: bf16 experts only, an LRU pool of floor(budget / expert bytes) per layer, misses fetched from pinned
  host memory when a layer needs them (a host synchronisation per layer, no CUDA graph).
- references in the same process: static hot/cold at the same budget (the N hottest at bf16, the rest int4, no
  low copy of the hot ones), all-int4, and all-bf16 (needs the whole 16-bit budget).
- dynamic, T_u 20: ten times the decision rate, a stress of the copy path.
Random weights have no expert specialisation: over a run every expert is used alike (static hot-41 of 128 served
0.32-0.35 of the assignments), so hotness is noise and dynamic moves the rate limit at most decisions:
an upper bound on its copy traffic. The starting map is the first N experts (all experts are alike here).

Command (H200 through the device tool):
    PYTHONPATH=workflow python3 benchmarks/dynamic_precision.py --out benchmarks/results/<card>/dynamic_precision.md
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_engine import build_model, quantized_tiers  # noqa: E402
from moesweep.fast.engine import FastQwen3MoeEngine  # noqa: E402
from moesweep.fast.pools import DeviceOffload, DevicePrecisionPools  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.model import Qwen3MoeAdapter  # noqa: E402
from moesweep.precision import full_expert_bytes, high_slots  # noqa: E402

HI, LO = 16, 4


def tier_bytes(adapter, quantized) -> dict[int, dict[int, torch.Tensor]]:
    """Exact bytes per expert per tier: bf16 weights; int4 codes + fp16 scales + uint8 zeros."""
    out = {HI: full_expert_bytes(adapter), LO: {}}
    for l in adapter.layers():
        per = [quantized[LO][f"layers.{l.index}.{p}"] for p in ("gate_up_proj", "down_proj")]
        n = sum(q.codes[0].numel() + 2 * q.scales[0].numel() + q.zeros[0].numel() for q in per)
        out[LO][l.index] = torch.full((adapter.num_experts,), n, dtype=torch.long)
    return out


def variants(adapter, quantized, by_tier, budget_fraction):
    """(name, engine kwargs builder) for one budget; builders return (widths, hot, online) so pools are built
    (and their pinned host copies allocated) one variant at a time."""
    E = adapter.num_experts
    layers = [l.index for l in adapter.layers()]
    budget = {i: int(budget_fraction * int(by_tier[HI][i].sum())) for i in layers}
    lo_sum, hi_one = int(by_tier[LO][layers[0]].sum()), int(by_tier[HI][layers[0]][0])
    n_pool = high_slots(budget[layers[0]], by_tier[LO][layers[0]], by_tier[HI][layers[0]])
    n_static = min(E, (budget[layers[0]] - lo_sum) // (hi_one - int(by_tier[LO][layers[0]][0])))
    start = {i: torch.arange(E) < n_pool for i in layers}
    score = {i: torch.full((E,), 1 / E, dtype=torch.float64) for i in layers}

    def pools(frozen, update_every=200):
        return lambda: (None, None, DevicePrecisionPools(adapter, quantized, HI, LO, start, score, by_tier, budget, 0.9,
                                                         update_every, 0.01, 4, frozen=frozen))

    def static(n_hot):
        widths = {i: torch.where(torch.arange(E) < n_hot, HI, LO) for i in layers}
        return lambda: (widths, {i: w == HI for i, w in widths.items()}, None)

    return [(f"dynamic (pool of {n_pool} bf16 slots)", pools(False)),
            (f"frozen (pool of {n_pool} bf16 slots)", pools(True)),
            (f"dynamic, T_u 20 (stress)", pools(False, 20)),
            (f"offload (LRU of {budget[layers[0]] // hi_one} bf16 experts)",
             lambda: (None, None, DeviceOffload(adapter, by_tier[HI], budget))),
            (f"static hot/cold ({n_static} bf16, rest int4)", static(n_static))]


def run_variant(model, adapter, quantized, build, batch, prompt_len, new_tokens, repeats):
    widths, hot, online = build()
    engine = FastQwen3MoeEngine(model, adapter, Routing(), widths, quantized, hot_masks=hot, online=online)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    engine._ensure_cache(batch, prompt_len + new_tokens)  # sized once: the capture below serves the timed runs
    engine.time_decode(ids, min(new_tokens, 8), read_tokens=True)  # compile, capture
    tps, step_ms = [], []
    for _ in range(repeats):
        if online is not None:
            online.reset()
        engine.reset_stats()
        t = engine.time_decode(ids, new_tokens, read_tokens=True)
        tps.append(batch * t.decode_steps / t.decode_s[0])
        step_ms.append(1e3 * t.decode_s[0] / t.decode_steps)
    if online is not None:
        online.finish()
    stats = engine.routing_stats()
    routed = sum(s.routed - s.dropped for s in stats.values())
    row = {"tok_s": statistics.median(tps), "tok_s_min": min(tps), "tok_s_max": max(tps),
           "ms_step": statistics.median(step_ms), "high_hit": sum(s.hot_hits for s in stats.values()) / routed}
    if isinstance(online, DevicePrecisionPools):
        s = online.stats
        row.update(decisions=s.decisions, transitions=s.transitions, moved_gb=s.bytes_moved / 1e9,
                   copy_ms=1e3 * s.swap_s, lag=s.switch_lag_calls / s.transitions if s.transitions else None)
    elif isinstance(online, DeviceOffload):
        row.update(high_hit=1.0, misses=online.misses, hit_rate=online.hits / max(online.hits + online.misses, 1),
                   moved_gb=online.bytes_moved / 1e9)
    elif widths is not None and all(bool((w == HI).all()) for w in widths.values()):
        row["high_hit"] = 1.0
    del engine, online
    gc.collect()
    torch.cuda.empty_cache()
    return row


def host_bandwidth(gib: float = 2.0) -> float:
    """Pinned host -> device copy bandwidth (median of 5), the link offloading and promotions use."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return src.numel() / statistics.median(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-new-tokens", type=int, default=64,
                    help="offloading is transfer-bound (tens of ms per step): fewer tokens, the same per-step cost")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    model = build_model(args.layers)
    adapter = Qwen3MoeAdapter(model)
    quantized = {b: {k: _host(q) for k, q in t.items()} for b, t in quantized_tiers(adapter, {LO}).items()}
    by_tier = tier_bytes(adapter, quantized)
    link = host_bandwidth()
    print(f"host->device {link / 1e9:.1f} GB/s", flush=True)
    rows = []
    for budget in args.budgets:
        for batch in args.batches:
            for name, build in variants(adapter, quantized, by_tier, budget):
                tokens = args.offload_new_tokens if name.startswith("offload") else args.new_tokens
                r = run_variant(model, adapter, quantized, build, batch, args.prompt_len, tokens, args.repeats)
                rows.append((budget, batch, name, r))
                print(budget, batch, name, r, flush=True)
                write_table(args, link, rows)
            for name, w in (("all int4", LO), ("all bf16 (budget 1.0)", HI)):
                widths = {l.index: torch.full((adapter.num_experts,), w) for l in adapter.layers()}
                r = run_variant(model, adapter, quantized, lambda: (widths, None, None), batch, args.prompt_len,
                                args.new_tokens, args.repeats)
                rows.append((budget, batch, name, r))
                print(budget, batch, name, r, flush=True)
                write_table(args, link, rows)
    print(write_table(args, link, rows))


def _host(q):
    q.codes, q.scales, q.zeros = q.codes.cpu(), q.scales.cpu(), q.zeros.cpu()  # as the quantize stage loads them
    return q


def write_table(args, link, rows) -> str:
    lines = [f"# Dynamic precision vs frozen vs offloading at equal budget, Qwen3-30B-A3B shapes ({args.layers} layers)",
             "", f"- Hardware: {torch.cuda.get_device_name()}; pinned host -> device {link / 1e9:.1f} GB/s (measured)",
             f"- Versions: torch {torch.__version__}, transformers {__import__('transformers').__version__}, triton "
             f"{__import__('triton').__version__}, Python {platform.python_version()}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/dynamic_precision.py {' '.join(sys.argv[1:])}`",
             f"- Tiers bf16 / int4 (RTN, group 128); prompt {args.prompt_len}, {args.new_tokens} new tokens "
             f"(offload: {args.offload_new_tokens}, it is transfer-bound), decode "
             f"tok/s median of {args.repeats} (min–max in brackets); budget = fraction of the 16-bit expert bytes, "
             "per layer. high hit = share of routed assignments served at bf16. Random weights: no expert specialisation "
             "(hotness is noise), though consecutive steps reuse experts (offloading's LRU hit rate).",
             "", "| budget | batch | policy | tok/s | ms/step | vs frozen | high hit | decisions | transitions | "
             "GB moved | copy GPU ms | switch lag (calls) | offload misses (hit rate) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    frozen = {(b, n): r["tok_s"] for b, n, name, r in rows if name.startswith("frozen")}

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    for budget, batch, name, r in rows:
        f = frozen.get((budget, batch))
        cells = [f"{budget:g}", str(batch), name, f"{r['tok_s']:.1f} ({r['tok_s_min']:.1f}–{r['tok_s_max']:.1f})",
                 f"{r['ms_step']:.2f}", fmt(r["tok_s"] / f if f else None, ".3f"), f"{r['high_hit']:.3f}",
                 fmt(r.get("decisions"), "d"), fmt(r.get("transitions"), "d"), fmt(r.get("moved_gb"), ".2f"),
                 fmt(r.get("copy_ms"), ".1f"), fmt(r.get("lag"), ".1f"),
                 f"{r['misses']} ({r['hit_rate']:.3f})" if "misses" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
