"""Throughput of the reference engine (transformers modules + the project's decode loop) per routing policy.

Prints a table and writes benchmarks/results/<card>/reference_engine.md (<card>: the GPU's name as a folder name,
or cpu). Medians of --repeats timed runs after one warm-up, ratios against native top-k measured in the same
process. Usage:
    PYTHONPATH=workflow python benchmarks/reference_engine.py --device cuda --repeats 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from moesweep.data.sources import load_split  # noqa: E402
from moesweep.engine import generate_greedy  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.model import install_policy, load_model  # noqa: E402
from moesweep.routing import RoutingContext  # noqa: E402
from layerwise_harness import RESULTS, card_slug  # noqa: E402

POLICIES = [Routing("native"), Routing("topk", top_k=2), Routing("topk", top_k=1),
            Routing("topk", top_k=1, capacity_factor=1.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "resources/models/tiny-qwen3-moe"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok, adapter = load_model(args.model, "float32", args.device)
    problems = load_split({"source": "synthetic", "synthetic_seed": 1}, "test", args.n, 0)
    prompts = [f"Question: {p['question']}\nAnswer:" for p in problems]
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        base = None
        for policy in POLICIES:
            ctx = RoutingContext()
            install_policy(adapter, policy, ctx)
            generate_greedy(model, tok, prompts[:bs], 8, bs, (), ctx, args.device)  # warm-up
            tps, tpot = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _, timing = generate_greedy(model, tok, prompts, args.max_new_tokens, bs, (), ctx, args.device)
                tps.append(timing.generated_tokens / (time.perf_counter() - t0))
                tpot.append(1e3 * sum(timing.decode_s) / max(timing.decode_steps, 1))
            med = statistics.median(tps)
            base = base or med
            rows.append((bs, policy.slug(), med, min(tps), max(tps), statistics.median(tpot), med / base))
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    header = "| batch | policy | tok/s (median) | min | max | ms per decode step | vs native |\n|---|---|---|---|---|---|---|\n"
    table = header + "".join(f"| {b} | {p} | {m:.0f} | {lo:.0f} | {hi:.0f} | {t:.2f} | {r:.2f}× |\n" for b, p, m, lo, hi, t, r in rows)
    text = (f"# Reference engine throughput ({args.device})\n\nCommand: `PYTHONPATH=workflow python benchmarks/reference_engine.py "
            f"{' '.join(sys.argv[1:])}`\n\nHardware: {hw}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"model {Path(args.model).name}, fp32, {args.n} synthetic test problems, greedy, ≤ {args.max_new_tokens} new "
            f"tokens, median of {args.repeats} runs after a warm-up.\n\n{table}")
    print(text)
    card = card_slug(torch.cuda.get_device_name(args.device)) if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or RESULTS / card / "reference_engine.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
