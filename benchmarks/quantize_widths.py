"""Time GPTQ of one expert layer at four widths (2, 3, 4, 8 bits) against one width.

Question (issue): do four widths cost <= 1.5x one width because they share the Hessians?
Three ways are timed per layer (gate_up_proj [E, 2I, H] and down_proj [E, H, I], random weights,
random correlated calibration inputs):
  one      quantize_experts at 4 bits                      (llm-compressor quantize_weight, factorises)
  4 x one  quantize_experts at each width                  (factorises four times)
  shared   quantize_experts_widths                          (factorises once, four block loops)
and where the time of one width goes (grid, Hessian factorisation, GPTQ block loop, code packing).

    .venv/bin/python benchmarks/quantize_widths.py            # embedded shapes + Qwen3-30B-A3B-like layer
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from moesweep.io import write_text  # noqa: E402
from moesweep.quant import QuantSpec, dequantize, quantize_experts, quantize_experts_widths, relative_output_error  # noqa: E402
from moesweep.quant.core import _gptq_loop, _grid, _pack  # noqa: E402  (for the time breakdown only)

WIDTHS = (2, 3, 4, 8)


def correlated_hessian(n_in: int, n_experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = 4 * n_in
    x = torch.randn(tokens, n_in // 8, generator=g) @ torch.randn(n_in // 8, n_in, generator=g)
    x += 0.1 * torch.randn(tokens, n_in, generator=g)
    h = (x.T @ x).expand(n_experts, n_in, n_in).contiguous()
    return x, h, torch.full((n_experts,), tokens)


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per function; the functions take turns so that load from other processes on the
    machine hits all of them alike (main() runs one untimed warm-up of every code path first)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def breakdown(w, h, counts, spec):
    """Seconds of each stage of one width, replaying quantize_experts' steps."""
    from llmcompressor.modifiers.gptq.helpers import factorize_hessian
    t = {}
    t0 = time.perf_counter(); scale, zero = _grid(w, spec); t["grid"] = time.perf_counter() - t0
    hn = h / counts.float().view(-1, 1, 1)
    wb = w.clone()
    t0 = time.perf_counter()
    h_inv = factorize_hessian(wb, hn, spec.damp, torch.zeros(len(w), dtype=torch.bool))
    t["factorise"] = time.perf_counter() - t0
    t0 = time.perf_counter(); w_hat = _gptq_loop(wb, h_inv, scale, zero, spec); t["loop"] = time.perf_counter() - t0
    t0 = time.perf_counter(); _pack(w.shape, w_hat, scale, zero, spec, torch.zeros(len(w), dtype=torch.bool))
    t["pack"] = time.perf_counter() - t0
    return t


def bench_layer(name, E, H, I, group_size, repeats, seed=0):
    rows = []
    for proj, (out, n_in) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        w = torch.randn(E, out, n_in, generator=torch.Generator().manual_seed(seed + 1)) * 0.02
        x, h, counts = correlated_hessian(n_in, E, seed)
        specs = [QuantSpec(b, group_size) for b in WIDTHS]
        t = median_times({"one": lambda: quantize_experts(w, h, counts, specs[2]),
                          "naive": lambda: [quantize_experts(w, h, counts, s) for s in specs],
                          "shared": lambda: quantize_experts_widths(w, h, counts, specs)}, repeats)
        one, naive, shared = t["one"], t["naive"], t["shared"]
        parts = breakdown(w, h, counts, specs[2])
        err = {}
        if out * n_in * E <= 1 << 22:  # output error of GPTQ vs RTN on the small shapes only (cheap)
            for s, q in zip(specs, quantize_experts_widths(w, h, counts, specs)):
                rtn = quantize_experts(w, None, None, QuantSpec(s.bits, group_size, method="rtn"))
                err[s.bits] = (relative_output_error(w, dequantize(q), x).mean().item(),
                               relative_output_error(w, dequantize(rtn), x).mean().item())
        rows.append(dict(layer=name, proj=proj, shape=(E, out, n_in), one=one, naive=naive, shared=shared,
                         parts=parts, err=err))
        print(f"{name:10s} {proj:12s} {str((E, out, n_in)):18s} one {one:7.3f}s  4x one {naive:7.3f}s "
              f"({naive / one:.2f}x)  shared {shared:7.3f}s ({shared / one:.2f}x)  "
              + "  ".join(f"{k} {v:.3f}s" for k, v in parts.items()), flush=True)
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(rows, args, wall) -> str:
    import compressed_tensors
    import llmcompressor
    import transformers
    lines = [
        "# GPTQ at four widths vs one width (shared Hessians)", "",
        f"Command: `{' '.join(['.venv/bin/python benchmarks/quantize_widths.py', *sys.argv[1:]])}`  ",
        f"Hardware: {cpu_name()}, {torch.get_num_threads()} torch threads, CPU only  ",
        f"Versions: python {platform.python_version()}, torch {torch.__version__}, llmcompressor "
        f"{llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
        f"transformers {transformers.__version__}  ",
        f"Setup: random weights (std 0.02), one correlated calibration Hessian per projection shared by all "
        f"experts, group size {args.group_size}, asymmetric, damp 0.01, GPTQ block 128; median of "
        f"{args.repeats} interleaved runs after a warm-up on small shapes; total wall {wall:.0f} s; load average at start "
        f"{args.load_at_start} (other jobs shared the 2 cores, so single timings are noisy).", "",
        "| layer | projection | E, out, in | 1 width (4 bit) s | 4 x 1 width s | ratio | 4 widths shared s | ratio "
        "| per expert, 4 shared ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['proj']} | {r['shape']} | {r['one']:.3f} | {r['naive']:.3f} | "
                     f"{r['naive'] / r['one']:.2f} | {r['shared']:.3f} | {r['shared'] / r['one']:.2f} | "
                     f"{1000 * r['shared'] / r['shape'][0]:.1f} |")
    for layer in dict.fromkeys(r["layer"] for r in rows):
        sel = [r for r in rows if r["layer"] == layer]
        one, naive, shared = (sum(r[k] for r in sel) for k in ("one", "naive", "shared"))
        lines.append(f"| **{layer}** | both | | {one:.3f} | {naive:.3f} | {naive / one:.2f} | {shared:.3f} | "
                     f"**{shared / one:.2f}** | {1000 * shared / sel[0]['shape'][0]:.1f} |")
    lines += ["", "Where one width's time goes (4 bit, single run, s):", "",
              "| layer | projection | grid | factorise | block loop | pack | best case for 4 widths sharing "
              "the factorisation |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["parts"]
        total = sum(p.values())
        bound = (p["factorise"] + 4 * (total - p["factorise"])) / total
        lines.append(f"| {r['layer']} | {r['proj']} | {p['grid']:.3f} | {p['factorise']:.3f} | {p['loop']:.3f} | "
                     f"{p['pack']:.3f} | {bound:.2f}x |")
    big = max(rows, key=lambda r: r["one"])
    p = big["parts"]
    layers = dict.fromkeys(r["layer"] for r in rows)
    sums = {l: [sum(r[k] for r in rows if r["layer"] == l) for k in ("one", "naive", "shared")] for l in layers}
    lines += ["", "## Conclusion", "",
              "Four widths with one shared Hessian factorisation cost "
              + ", ".join(f"{s / o:.2f}x ({l})" for l, (o, n, s) in sums.items())
              + " the time of one width; four separate `quantize_weight` calls cost "
              + ", ".join(f"{n / o:.2f}x" for l, (o, n, s) in sums.items())
              + ". The issue's target (four widths <= 1.5x one width) does not hold, and cannot with GPTQ: only "
              "the dampen + Cholesky + inverse + Cholesky step can be shared, and it is "
              f"{p['factorise'] / sum(p.values()):.0%} of one width for the largest projection here "
              f"({big['layer']} {big['proj']}). The block loop (error propagation, O(out * in^2) per expert) "
              "depends on the quantized values, so it runs once per width, as do the grid and the packing; "
              "with free factorisation four widths still cost the 'best case' column above. "
              "llm-compressor's `quantize_weight` re-factorises on every call; `quantize_experts_widths` calls its "
              "`factorize_hessian` once and its `gptq_block_update` per width (bit-identical codes, unit-tested). "
              "Timings are CPU-only; on a GPU the factorisation's share differs (not measured here)."]
    errs = [r for r in rows if r["err"]]
    if errs:
        lines += ["", "Output error ||XW^T - XŴ^T|| / ||XW^T|| (mean over experts), GPTQ / RTN:", "",
                  "| layer | projection | " + " | ".join(f"{b} bit" for b in WIDTHS) + " |",
                  "|---|---|" + "---|" * len(WIDTHS)]
        for r in errs:
            lines.append(f"| {r['layer']} | {r['proj']} | " + " | ".join(
                f"{g:.4f} / {n:.4f} ({g / n:.2f})" for g, n in (r["err"][b] for b in WIDTHS)) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--qwen-experts", type=int, default=4, help="experts of the Qwen3-30B-A3B-like layer (0: skip)")
    ap.add_argument("--qwen-hidden", type=int, default=2048)
    ap.add_argument("--qwen-intermediate", type=int, default=768)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu" / "quantize_widths.md"))
    args = ap.parse_args()
    args.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    bench_layer("warm-up", 2, 64, 32, args.group_size, repeats=1)  # first calls pay for lazy initialisation
    rows = bench_layer("embedded", args.experts, args.hidden, args.intermediate, args.group_size, args.repeats)
    if args.qwen_experts:
        rows += bench_layer("qwen3-30b", args.qwen_experts, args.qwen_hidden, args.qwen_intermediate,
                            args.group_size, args.repeats)
    text = report(rows, args, time.perf_counter() - t0)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
