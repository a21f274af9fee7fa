"""Peak memory and time of the layer-by-layer profile stage at Qwen3-30B-A3B layer shapes (CPU).

A random-weight checkpoint with Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts, top-8, moe_intermediate
768, 32 q / 4 kv heads of 128, per-expert tensors as on the hub) but `--layers` decoder layers and the embedded
model's 512-token vocabulary is written to a temporary directory (layerwise.write_random_checkpoint). The stage
(stages.profile_stage, the config's defaults: 128 synthetic train problems, max_length 256, batch 16) then runs
in a child process, whose peak RSS and per-layer wall time (tqdm-free: timed around each layer) are reported.
The checkpoint writing is not part of the measurement.

    .venv/bin/python benchmarks/profile_layerwise.py                # 1 layer, 128 experts, float32
"""
from __future__ import annotations

import json
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
    import pandas as pd
    import torch

    from moesweep.stages import profile_stage

    torch.set_num_threads(args.threads)
    stamps = []

    def progress(indices):  # the stage's progress hook sees every decoder layer: time each one
        for i in indices:
            stamps.append(time.perf_counter())
            yield i
        stamps.append(time.perf_counter())

    out = Path(args.ckpt).parent / "hotness.parquet"
    t0 = time.perf_counter()
    profile_stage({"id": args.ckpt, "dtype": args.dtype}, {"source": "synthetic", "split": "test", "limit": 1},
                  {"n_samples": args.n_samples, "max_length": args.max_length, "batch_size": args.batch_size,
                   "device": "cpu"}, 0, str(out), progress=progress)
    total = time.perf_counter() - t0
    df = pd.read_parquet(out)
    print(json.dumps({"total_s": total, "layer_s": [b - a for a, b in zip(stamps, stamps[1:])],
                      "before_first_layer_s": stamps[0] - t0, "tokens": int(df["tokens"].iloc[0]),
                      "rows": len(df), "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main():
    ap = common_parser(__doc__, "profile_layerwise.md", n_samples=128, max_length=256, batch_size=16)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from moesweep.io import write_text

    res = run_on_random_checkpoint(__file__, sys.argv[1:], args.layers, args.experts)
    ckpt_bytes, write_s = res["ckpt_bytes"], res["write_s"]
    peak_gb = res["peak_rss_kb"] / 2**20
    per_layer = sum(res["layer_s"]) / len(res["layer_s"])
    E, H, I = args.experts, 2048, 768
    width = {"float32": 4}.get(args.dtype, 2)
    layer_gb = layer_gib(E, args.dtype)
    embed_gb = 151936 * H * width / 2**30  # Qwen3-30B-A3B's real vocabulary; read once, then dropped
    text = "\n".join([
        *header("Layer-by-layer profile stage at Qwen3-30B-A3B layer shapes (CPU)", __file__, sys.argv[1:],
                args.threads, res["load"]),
        f"Setup: random bf16 checkpoint, {args.layers} decoder layer(s) x {E} experts (hidden 2048, moe_intermediate 768, "
        f"32/4 heads x 128, top-8, vocab 512), per-expert safetensors shards ({ckpt_bytes / 2**30:.2f} GiB, written in "
        f"{write_s:.0f} s, not timed); model dtype {args.dtype}; {args.n_samples} synthetic train problems, max_length "
        f"{args.max_length}, batch {args.batch_size} = {res['tokens']} non-padding tokens.",
        "", "| measure | value |", "|---|---|",
        f"| peak RSS of the stage process | **{peak_gb:.2f} GiB** |",
        f"| wall time per layer (read the layer's {E} x 3 expert tensors, run all batches, route, account, free) | "
        f"**{per_layer:.1f} s** |",
        f"| per layer, each | " + ", ".join(f"{t:.1f} s" for t in res["layer_s"]) + " |",
        f"| start-up (data, tokenizer, skeleton, embeddings) | {res['before_first_layer_s']:.1f} s |",
        f"| rows written | {res['rows']} |",
        "", "## Projection to Qwen3-30B-A3B (48 layers, 128 experts)", "",
        f"- Memory does not grow with the layer count: the skeleton (no weights), one layer's weights "
        f"({layer_gb:.2f} GiB in {args.dtype}), the kept hidden states (n x max_length x 2048 x {width} bytes at most) "
        f"and the per-layer routing sums; the peak comes while a layer's per-expert tensors are read and merged "
        f"(bf16 as stored, cast, stacked). The real checkpoint's embedding matrix ({embed_gb:.2f} GiB in {args.dtype}, "
        f"vocabulary 151936) is read once before the first layer and freed before it loads, so it stays below that "
        f"peak; up to n x max_length = {args.n_samples * args.max_length} tokens of hidden states add "
        f"{args.n_samples * args.max_length * H * width / 2**30:.2f} GiB at most. The measured {peak_gb:.1f} GiB is "
        f"therefore the 48-layer peak too.",
        f"- Time: 48 x {per_layer:.1f} s = **{48 * per_layer / 60:.0f} min** on these {args.threads} CPU threads "
        f"(with real GSM8K problems, longer than the synthetic ones, the token count and the time grow up to "
        f"n x max_length). Not measured on a GPU here.",
    ]) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
