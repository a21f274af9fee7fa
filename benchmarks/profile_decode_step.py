"""Where the time of one captured decode step goes: GPU kernels of the fast engine by total time (torch profiler).

Qwen3-30B-A3B shapes (random bf16 weights), one variant and batch: capture the decode step, then profile
--steps replays of the CUDA graph (CUPTI records the kernels inside the graph). Prints and writes a table of
kernel names by total GPU time per step, and the sum against the measured step time.

Command (H200 through the device tool):
    PYTHONPATH=workflow python3 benchmarks/profile_decode_step.py --out benchmarks/results/<card>/profile_decode_step.md
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_engine import build_model, write_report  # noqa: E402
from moesweep.fast.engine import FastQwen3MoeEngine  # noqa: E402
from moesweep.grid import Routing  # noqa: E402
from moesweep.model import Qwen3MoeAdapter  # noqa: E402


def _one_layer(prof, steps: int) -> list[tuple[str, float]]:
    """(name, µs) of the kernels between the down-projection expert launches of two consecutive layers, in start
    order, from the middle replay: what one decoder layer launches."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_step = len(events) // steps
    step = events[per_step * (steps // 2): per_step * (steps // 2 + 1)]
    experts = [i for i, e in enumerate(step) if "expert" in e.name]
    if len(experts) < 6:
        return []
    a, b = experts[3], experts[5]  # gate_up and down of each layer: from layer 1's down to layer 2's down
    return [(e.name, e.time_range.end - e.time_range.start) for e in step[a + 1:b + 1]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    model = build_model(args.layers)
    adapter = Qwen3MoeAdapter(model)
    widths = {l.index: torch.full((adapter.num_experts,), 16) for l in adapter.layers()}
    engine = FastQwen3MoeEngine(model, adapter, Routing(), widths, {})
    ids = torch.randint(0, model.config.vocab_size, (args.batch, 128), device="cuda")
    with torch.inference_mode():
        engine._ensure_cache(args.batch, 128 + 8 + 5 + 2 * args.steps)  # room for the replays below
        engine.time_decode(ids, 8)  # compile + capture
        st, graph, _ = engine._graphs[args.batch]
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            graph.replay()
        torch.cuda.synchronize()
        step_ms = 1e3 * (time.perf_counter() - t0) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                graph.replay()
            torch.cuda.synchronize()
    kernels = {}
    sequence = _one_layer(prof, args.steps)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total_us = sum(t for _, t in kernels.values()) / args.steps
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    lines = [f"# One decode step of the fast engine, by GPU kernel (Qwen3-30B-A3B shapes, {args.layers} layers, bf16, "
             f"batch {args.batch})", "",
             f"- Hardware: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}, Python {platform.python_version()}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/profile_decode_step.py {' '.join(sys.argv[1:])}`",
             f"- Measured step (graph replay, median-free mean of {args.steps}): **{step_ms:.3f} ms**; sum of kernel "
             f"time per step: **{total_us / 1e3:.3f} ms**; kernels per step: "
             f"{sum(n for n, _ in kernels.values()) / args.steps:.0f}", "",
             "| kernel | launches/step | µs/step | share | µs/launch |", "|---|---|---|---|---|"]
    for name, (n, t) in rows[:args.top]:
        lines.append(f"| `{name[:90]}` | {n / args.steps:.0f} | {t / args.steps:.0f} | {t / args.steps / total_us:.1%} | "
                     f"{t / n:.1f} |")
    lines += ["", f"## The kernels of one decoder layer in launch order ({len(sequence)} kernels, "
              f"{sum(t for _, t in sequence):.1f} µs)", "", "| # | kernel | µs |", "|---|---|---|"]
    lines += [f"| {i} | `{name[:90]}` | {t:.1f} |" for i, (name, t) in enumerate(sequence)]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
