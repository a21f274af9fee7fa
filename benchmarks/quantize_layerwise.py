"""Peak memory and time of the fused layer-by-layer calibrate + quantize path at Qwen3-30B-A3B layer shapes.

A random-weight checkpoint with Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts, top-8,
moe_intermediate 768, 32 q / 4 kv heads of 128, per-expert tensors as on the hub) but `--layers` decoder
layers and the embedded model's 512-token vocabulary is written to a temporary directory (layerwise.
write_random_checkpoint). The stage (stages.fused_quantize_stage) then runs in a child process, whose peak
RSS (ru_maxrss of the child) and per-layer wall time (from its log lines) are reported, and projected to 48
layers. The checkpoint writing is not part of the measurement.

    .venv/bin/python benchmarks/quantize_layerwise.py                       # 1 layer, 128 experts, GPTQ 8/4/2
    .venv/bin/python benchmarks/quantize_layerwise.py --method hqq --bits 4
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "benchmarks"))

from layerwise_harness import common_parser, header, layer_gib, run_on_random_checkpoint  # noqa: E402


def child(args) -> None:
    """Run the stage; print one JSON line with per-layer times and this process's peak RSS."""
    import torch

    from moesweep.stages import fused_quantize_stage

    torch.set_num_threads(args.threads)
    stamps = []

    class Stamp(logging.Handler):
        def emit(self, record):
            if "calibrated and quantized" in record.getMessage():
                stamps.append(time.perf_counter())

    logging.getLogger("moesweep").addHandler(Stamp())
    logging.getLogger("moesweep").setLevel(logging.INFO)
    out = Path(args.ckpt).parent / "out"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    fused_quantize_stage({"id": args.ckpt, "dtype": args.dtype}, {"source": "synthetic", "split": "test", "limit": 1},
                         {"n_samples": args.n_samples, "n_heldout": args.n_heldout, "max_length": args.max_length,
                          "batch_size": args.batch_size},
                         {"method": args.method, "bits": args.bits, "group_size": args.group_size, "min_tokens": 16,
                          "damp": 0.01}, 0, args.bits, args.method,
                         {b: str(out / f"w{b}.safetensors") for b in args.bits},
                         {b: str(out / f"e{b}.parquet") for b in args.bits}, str(out / "stats.json"))
    total = time.perf_counter() - t0
    layer_times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    sizes = {b: os.path.getsize(out / f"w{b}.safetensors") for b in args.bits}
    print(json.dumps({"total_s": total, "layer_s": layer_times, "after_last_layer_s": total - (stamps[-1] - t0),
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "file_bytes": sizes}))


def main():
    ap = common_parser(__doc__, "quantize_layerwise.md", n_samples=16, max_length=128, batch_size=8)
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn", "hqq"])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-heldout", type=int, default=8)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from moesweep.io import write_text

    res = run_on_random_checkpoint(__file__, sys.argv[1:], args.layers, args.experts)
    ckpt_bytes, write_s = res["ckpt_bytes"], res["write_s"]
    peak_gb = res["peak_rss_kb"] / 2**20
    per_layer = sum(res["layer_s"]) / len(res["layer_s"])
    E, H, I = args.experts, 2048, 768
    hess_gb = E * (H * H + I * I) * 8 / 2**30  # one set's float64 sums of one layer
    layer_gb = layer_gib(E, args.dtype)
    text = "\n".join([
        *header("Fused layer-by-layer calibrate + quantize at Qwen3-30B-A3B layer shapes (CPU)", __file__, sys.argv[1:],
                args.threads, res["load"]),
        f"Setup: random bf16 checkpoint, {args.layers} decoder layer(s) x {E} experts (hidden 2048, moe_intermediate 768, "
        f"32/4 heads x 128, top-8, vocab 512), per-expert safetensors shards ({ckpt_bytes / 2**30:.2f} GiB, written in "
        f"{write_s:.0f} s, not timed); model dtype {args.dtype}; {args.method} at {args.bits} bits, group {args.group_size}; "
        f"calibration {args.n_samples} + held-out {args.n_heldout} samples x {args.max_length} tokens, batch {args.batch_size}.",
        "", "| measure | value |", "|---|---|",
        f"| peak RSS of the stage process | **{peak_gb:.1f} GiB** |",
        f"| wall time per layer (calibration forward of both sets + Hessians + {len(args.bits)} widths x 2 projections "
        f"x {E} experts + error + write) | **{per_layer:.0f} s** ({1000 * per_layer / E:.0f} ms per expert) |",
        f"| per layer, each | " + ", ".join(f"{t:.1f} s" for t in res["layer_s"]) + " |",
        f"| start-up (skeleton, embeddings) and finish (error tables, stats) | "
        f"{res['total_s'] - sum(res['layer_s']) - res['after_last_layer_s']:.1f} s + {res['after_last_layer_s']:.1f} s |",
        "| packed output per layer | " + ", ".join(f"{b} bit {s / args.layers / 2**20:.0f} MiB" for b, s in res["file_bytes"].items()) + " |",
        "", "## Projection to Qwen3-30B-A3B (48 layers, 128 experts)", "",
        f"- Memory does not grow with the layer count: one layer's weights ({layer_gb:.2f} GiB in {args.dtype}), the hidden "
        f"states of both sample sets ({(args.n_samples + args.n_heldout) * args.max_length * H * 4 / 2**20:.0f} MiB here; "
        f"n x max_length x 2048 x 4 bytes in float32), the float64 Hessian sums of one layer and one set "
        f"({hess_gb:.1f} GiB) plus both sets' float32 Hessians ({hess_gb:.1f} GiB), and the quantization scratch. "
        f"The measured {peak_gb:.1f} GiB peak is therefore also the 48-layer peak for these sample counts; on one GPU "
        f"the same tensors live in device memory (plus the CUDA context), far below an H200's 141 GB; host memory "
        f"holds the skeleton (no weights) and one layer read from the shards at a time.",
        f"- Time: 48 x {per_layer:.0f} s = **{48 * per_layer / 3600:.1f} h** for {args.method} on these 2 shared CPU "
        f"cores. Besides the method itself, every layer pays the float64 Hessian accumulation "
        f"(O(tokens x k x (H^2 + I^2))) and the held-out error tr(dW H dW^T) (O(E x out x in^2) per width, in float64). "
        f"GPTQ adds its block loop: about 3 s per expert for 4 widths on this CPU (results/cpu/quantize_widths.md), "
        f"i.e. ~6 min per layer more. On a GPU all of these are batched matrix products; not measured on a GPU here.",
    ]) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
