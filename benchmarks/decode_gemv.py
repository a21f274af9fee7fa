"""The decode step's attention projections: cuBLAS (F.linear) against the Triton dense GEMV (fast/gemv.py).

Qwen3-30B-A3B shapes: q/k/v fused [5120, 2048] and o_proj [2048, 4096], bf16, M = 1, 2, 4 rows (the decode batch).
Timed: --calls consecutive calls captured in one CUDA graph and replayed --repeats times (median), each call on the
next of C copies of the weight (C * size >= 4x L2), as decode reads each layer's weights once per step from HBM.
GEMV configs (BN, BK, num_warps, split): split "auto" = gemv.split_for. The kernel writes float32 partials (one slice
per split) whose sum the engine fuses into its residual add (the o-projection); the time here is the kernel alone.
q/k/v take the kernel without split (bf16 output) in the engine. F.linear's time
includes cuBLAS's own split-K reduction launch when it picks one.

Command (H200 through the device tool; needs CUDA):
    PYTHONPATH=workflow python3 benchmarks/decode_gemv.py --out benchmarks/results/<card>/decode_gemv.md
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from expert_kernels import time_calls  # noqa: E402
from fast_engine import copy_bandwidth, write_report  # noqa: E402
from moesweep.fast import gemv  # noqa: E402

SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096)}  # (out, in) of Qwen/Qwen3-30B-A3B's attention
DEFAULT_CONFIGS = ["16,256,4,auto", "8,256,4,auto", "32,256,4,auto", "16,512,4,auto", "16,256,8,auto",
                   "16,128,4,auto", "8,512,2,auto", "16,256,4,1", "16,256,4,4"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="BN,BK,num_warps,split (split: int|auto)")
    ap.add_argument("--calls", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_gemv.py needs a CUDA device")
    bandwidth = copy_bandwidth(2.0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    header = [f"# Decode projections: cuBLAS vs the Triton dense GEMV (Qwen3-30B-A3B attention shapes, bf16)", "",
              f"- Hardware: {torch.cuda.get_device_name()}, L2 {l2 / 2**20:.0f} MiB; copy bandwidth (read + write) "
              f"{bandwidth / 1e12:.2f} TB/s",
              f"- Versions: torch {torch.__version__}, triton {__import__('triton').__version__}, CUDA "
              f"{torch.version.cuda}, Python {platform.python_version()}",
              f"- Command: `PYTHONPATH=workflow python3 benchmarks/decode_gemv.py {' '.join(sys.argv[1:])}`",
              f"- {args.calls} calls per CUDA graph over C weight copies (out of L2), median of {args.repeats} "
              "replays. TB/s = weight bytes / time. config = BN, BK, num_warps, split. × cuBLAS = F.linear µs / this "
              "µs. rel. diff = ||y - y_cuBLAS|| / ||y_cuBLAS||.", "",
              "| projection | M | path | config | µs | TB/s | × cuBLAS | rel. diff |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, (n_out, k) in SHAPES.items():
        size = n_out * k * 2
        copies = max(1, math.ceil(4 * l2 / size))
        weights = [torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y_ref = F.linear(x, weights[0]).float()
            calls = [partial(F.linear, x, weights[i % copies]) for i in range(args.calls)]
            base = time_calls(calls, args.repeats)
            rows.append(f"| {name} | {m} | cuBLAS |  | {base:.1f} | {size / base / 1e6:.2f} | 1.00 | 0 |")
            print(rows[-1], flush=True)
            for config in args.configs:
                bn, bk, warps, split = config.split(",")
                tiles = {"BN": int(bn), "BK": int(bk), "num_warps": int(warps)}
                split = gemv.split_for(n_out, k, tiles) if split == "auto" else int(split)
                calls = [partial(gemv.dense_gemv, x, weights[i % copies], split, tiles)
                         for i in range(args.calls)]
                us = time_calls(calls, args.repeats)
                y = gemv.dense_gemv(x, weights[0], split, tiles).sum(0)
                diff = float((y - y_ref).norm() / y_ref.norm())
                rows.append(f"| {name} | {m} | Triton GEMV | {bn}, {bk}, {warps}, {split} | {us:.1f} | "
                            f"{size / us / 1e6:.2f} | {base / us:.2f} | {diff:.1e} |")
                print(rows[-1], flush=True)
                write_report(args.out, header + rows, echo=False)
        del weights
        torch.cuda.empty_cache()
    write_report(args.out, header + rows, echo=False)


if __name__ == "__main__":
    main()
