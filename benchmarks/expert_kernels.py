"""Expert kernels of one MoE layer on Qwen3-30B-A3B shapes: the tl.dot decode path against the GEMV path, per width.

One layer's experts (E 128, hidden 2048, moe_intermediate 768; random bf16 weights, int8/int4/int2 = RTN of them in
the quantize stage's packed layout, `rtn_packed` of benchmarks/fast_engine.py, groups of 128) and random top-8
routings of T tokens. Timed: FastMoeExperts.run, i.e. what the engine runs per layer after routing (gate_up launch,
down launch, and the per-call buffers: zero-filled outputs, routing weights cast to float32), captured in a CUDA
graph of --calls consecutive calls and replayed --repeats times; µs per layer = median replay time / calls.

Paths: "tl.dot BM 16" forces the block size of the kernel the GEMV path replaced at decode (kernels.FORCE_BLOCK_M =
16); "GEMV" is the default rule (kernels.decode_block_m: BM 1 at T 1, 2 at T 8, 4 at T 32, E 128, top-8) under each
(BN, BK bytes per weight row and iteration, num_warps) of --configs (kernels.GEMV_TILES and GEMV_TILES_ONE_ROW); at
T 1 16-bit blocks of one row take the 2-D kernel (kernels.ROW_GEMV), "3d:BN,BK,num_warps" the general GEMV kernel
instead ("GEMV 3-D"); or the tl.dot kernel at BM 16 with other tiles ("dot:BN,BK16,num_warps,num_stages";
kernels.DOT_DECODE_TILES).
Reads are kept out of L2: every call takes the next of --routings random routings and the next of C copies of the
layer's weights (separate memory, C chosen so that C calls touch at least 4x the L2 size), as decode does with 48
layers between two calls of a layer.
GB/s = the packed bytes of the distinct experts each call routes to (codes + fp16 scales + uint8 zeros of gate_up
and down; bf16: 2 bytes a weight), averaged over the routings, / µs per layer. "× bf16" = bf16 µs / this width's µs
on the same path and config; "× dot" = tl.dot µs / this µs for the same width. "rel. diff" = ||y - y_dot|| /
||y_dot|| for one routing (bf16 arithmetic on both sides, different summation orders).

Command (H200 through the device tool; needs CUDA, about two minutes, most of it Triton compiling):
    PYTHONPATH=workflow python3 benchmarks/expert_kernels.py --out $OUT/expert_kernels_h200.md
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_engine import copy_bandwidth, rtn_packed, write_report  # noqa: E402
from moesweep.fast import kernels  # noqa: E402
from moesweep.fast.kernels import ExpertTier, align_assignments  # noqa: E402
from moesweep.fast.moe import FastMoeExperts  # noqa: E402

E, H, I, TOP_K = 128, 2048, 768, 8  # config.json of Qwen/Qwen3-30B-A3B
GROUP = 128
DOT_BLOCK_M = 16
DEFAULT_CONFIGS = ["32,256,4", "16,256,4", "64,256,4", "32,512,4", "32,256,8"]
DEFAULT_DOT_TILES = {**kernels.DOT_DECODE_TILES, "BK": dict(kernels.DOT_DECODE_TILES["BK"])}


def build_weights(seed: int):
    """bf16 gate_up [E, 2I, H] and down [E, H, I] (init-like scale), and their RTN packings per width."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    down = (torch.randn(E, H, I, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    packed = {bits: (rtn_packed(gate_up, bits, GROUP), rtn_packed(down, bits, GROUP)) for bits in (8, 4, 2)}
    return gate_up, down, packed


def expert_bytes(bits: int) -> int:
    """Bytes one expert's gate_up + down occupy at this width (what a call reads per distinct routed expert)."""
    n = 2 * I * H + H * I
    if bits == 16:
        return 2 * n
    return n * bits // 8 + 3 * (n // GROUP)  # codes + fp16 scale + uint8 zero per group


def layer_copies(bits, gate_up, down, packed, copies: int) -> list[FastMoeExperts]:
    """`copies` FastMoeExperts over separate copies of the layer: one tier of E * copies slots, copy c's slot table
    points expert e at slot c * E + e."""
    if bits == 16:
        tiers = [ExpertTier(16, w.repeat(copies, 1, 1), None, None, w.shape[2], w.shape[2]) for w in (gate_up, down)]
    else:
        tiers = [ExpertTier(bits, q.codes.repeat(copies, 1, 1), q.scales.repeat(copies, 1, 1),
                            q.zeros.repeat(copies, 1, 1), GROUP, q.shape[2]) for q in packed[bits]]
    out = []
    for c in range(copies):
        slots = (torch.arange(E, device="cuda") + c * E).to(torch.int32)
        out.append(FastMoeExperts([(slots, *tiers)], E, H, I))
    return out


def routings(T: int, n: int, seed: int):
    """n random top-8 routings of T tokens: (x [T, H] bf16, index [T, 8], weights [T, 8] summing to 1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        index = torch.rand(T, E, device="cuda", generator=g).topk(TOP_K, dim=1).indices
        weights = torch.rand(T, TOP_K, device="cuda", generator=g) + 0.1
        weights = (weights / weights.sum(1, keepdim=True)).to(torch.bfloat16)
        x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
        out.append((x, index, weights))
    return out


def time_calls(calls, repeats: int) -> float:
    """µs per call: the calls captured in one CUDA graph, replayed `repeats` times, median."""
    for f in calls:  # compile, allocate
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def measure(experts: list[FastMoeExperts], routes, n_calls: int, repeats: int):
    """(µs per layer, y of the first routing) for the kernel settings now in `kernels`."""
    block_m = experts[0].block_m(routes[0][1].numel())
    aligned = [align_assignments(index, E, block_m) for _, index, _ in routes]
    calls = [partial(experts[i % len(experts)].run, routes[i % len(routes)][0], routes[i % len(routes)][2],
                     *aligned[i % len(routes)]) for i in range(n_calls)]
    us = time_calls(calls, repeats)
    x, _, weights = routes[0]
    y = experts[0].run(x, weights, *aligned[0]).float()
    return us, y, block_m


def set_path(path):
    """path: "dot" (the tl.dot kernel at BM 16, default tiles), ("dot", BN, BK, num_warps, num_stages) (tl.dot at BM 16
    with these tiles; BK for 16-bit weights, other widths keep theirs) or (BN, BK, num_warps) of the GEMV path."""
    kernels.DOT_DECODE_TILES.update(DEFAULT_DOT_TILES, BK=dict(DEFAULT_DOT_TILES["BK"]))
    if path == "dot":
        kernels.FORCE_BLOCK_M = DOT_BLOCK_M
    elif path[0] == "dot":
        kernels.FORCE_BLOCK_M = DOT_BLOCK_M
        kernels.DOT_DECODE_TILES.update(BN=path[1], num_warps=path[3], num_stages=path[4])
        kernels.DOT_DECODE_TILES["BK"][16] = path[2]
    else:  # every width through the GEMV kernels (the engine keeps 16/8-bit tiers on tl.dot: kernels.GEMV_BITS)
        kernels.FORCE_BLOCK_M = None
        kernels.GEMV_BITS = (16, 8, 4, 2)
        kernels.ROW_GEMV = path[0] != "3d"
        for tiles in (kernels.GEMV_TILES, kernels.GEMV_TILES_ONE_ROW, kernels.ROW_GEMV_TILES):
            tiles.update(BN=path[-3], BK=path[-2], num_warps=path[-1])


def path_name(path) -> str:
    if path == "dot" or path[0] == "dot":
        return "tl.dot BM 16"
    return "GEMV 3-D" if path[0] == "3d" else "GEMV"


def width_name(bits: int) -> str:
    return "bf16" if bits == 16 else f"int{bits}"


def config_name(path) -> str:
    if path == "dot":
        return ""
    if path[0] == "dot":
        return "dot " + ", ".join(str(v) for v in path[1:])
    return ", ".join(str(v) for v in path[-3:])


def parse_config(text: str):
    """ "BN,BK,num_warps" (GEMV), "3d:BN,BK,num_warps" (the general GEMV kernel for one-row blocks too) or
    "dot:BN,BK16,num_warps,num_stages" (tl.dot tiles at BM 16)."""
    for prefix in ("dot", "3d"):
        if text.startswith(prefix + ":"):
            return (prefix, *(int(v) for v in text[len(prefix) + 1:].split(",")))
    return tuple(int(v) for v in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 8, 4, 2])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                    help="GEMV tiles as BN,BK,num_warps (BK: bytes of every weight row per loop iteration), or "
                         "tl.dot tiles at BM 16 as dot:BN,BK16,num_warps,num_stages (BK16: columns, 16-bit weights)")
    ap.add_argument("--routings", type=int, default=16, help="distinct random routings the calls cycle through")
    ap.add_argument("--calls", type=int, default=48, help="layer calls per CUDA graph")
    ap.add_argument("--repeats", type=int, default=7, help="graph replays; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("expert_kernels.py needs a CUDA device")
    if 16 not in args.widths:
        args.widths = [16, *args.widths]  # the ratios are against bf16
    args.widths = sorted(set(args.widths), reverse=True)
    configs = [parse_config(c) for c in args.configs]

    bandwidth = copy_bandwidth(2.0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    gate_up, down, packed = build_weights(args.seed)
    saved = (kernels.FORCE_BLOCK_M, dict(kernels.GEMV_TILES), kernels.GEMV_BITS, dict(kernels.GEMV_TILES_ONE_ROW),
             kernels.ROW_GEMV, dict(kernels.ROW_GEMV_TILES))
    rows = []  # dicts, one per (T, path, config, width)
    try:
        for T in args.tokens:
            routes = routings(T, args.routings, args.seed + T)
            distinct = statistics.fmean(int(torch.unique(index).numel()) for _, index, _ in routes)
            y_dot = {}
            for bits in args.widths:
                per_call = distinct * expert_bytes(bits)
                # the tl.dot kernel offsets a tier's weights by slot * stride in int32: stay below 2**31 elements
                slot_elems = 2 * I * H * (bits if bits < 16 else 8) // 8
                copies = max(1, min(16, math.ceil(4 * l2 / per_call), (2**31 - 1) // (E * slot_elems)))
                experts = layer_copies(bits, gate_up, down, packed, copies)
                for path in ["dot", *configs]:
                    set_path(path)
                    us, y, block_m = measure(experts, routes, args.calls, args.repeats)
                    if path == "dot":
                        y_dot[bits] = y
                    row = dict(T=T, bits=bits, path=path, us=us, block_m=block_m, distinct=distinct,
                               bytes=per_call, copies=copies,
                               diff=float((y - y_dot[bits]).norm() / y_dot[bits].norm()))
                    rows.append(row)
                    print(f"T={T} {bits}-bit {path_name(path)} {config_name(path)}: {us:.1f} µs (BM {block_m}, "
                          f"{per_call / us / 1e3:.0f} GB/s, rel. diff vs dot {row['diff']:.1e})", flush=True)
                    write_table(args, bandwidth, l2, rows)  # after every row: a run cut short still leaves a table
                del experts
                torch.cuda.empty_cache()
    finally:
        kernels.FORCE_BLOCK_M, kernels.GEMV_BITS, kernels.ROW_GEMV = saved[0], saved[2], saved[4]
        kernels.GEMV_TILES.update(saved[1])
        kernels.GEMV_TILES_ONE_ROW.update(saved[3])
        kernels.ROW_GEMV_TILES.update(saved[5])
        kernels.DOT_DECODE_TILES.update(DEFAULT_DOT_TILES, BK=dict(DEFAULT_DOT_TILES["BK"]))
    write_table(args, bandwidth, l2, rows, final=True)


def write_table(args, bandwidth, l2, rows, final=False):
    gpu = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    lines = [f"# Expert kernels of one MoE layer, Qwen3-30B-A3B shapes (E {E}, hidden {H}, moe_intermediate {I}, "
             f"top-{TOP_K})", "",
             f"- Hardware: {gpu}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; copy bandwidth "
             f"(read + write) measured {bandwidth / 1e12:.2f} TB/s",
             f"- Versions: torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"CUDA {torch.version.cuda}, Python {platform.python_version()}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/expert_kernels.py {' '.join(sys.argv[1:])}`",
             f"- Timed: FastMoeExperts.run (gate_up + down launches, output buffers), {args.calls} calls per CUDA "
             f"graph cycling over {args.routings} random top-{TOP_K} routings and C copies of the weights (out of "
             f"L2), median of {args.repeats} replays. Packed widths: RTN, groups of {GROUP}, fp16 scales, uint8 "
             f"zeros.",
             "- GB/s = packed bytes of the distinct routed experts / time. × bf16 = bf16 time / this time (same path "
             "and config). × dot = tl.dot BM 16 time / this time (same width). GEMV config = BN, BK (bytes of a "
             "weight row per loop iteration), num_warps.", "",
             "| T | width | path | GEMV config | BM | µs / layer | distinct experts | MB read | GB/s | × bf16 | "
             "× dot | rel. diff vs dot | C |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    us_of = {(r["T"], r["bits"], r["path"]): r["us"] for r in rows}

    def ratio(num, den):
        return f"{num / den:.2f}" if num else ""

    for r in rows:
        lines.append(f"| {r['T']} | {width_name(r['bits'])} | {path_name(r['path'])} | {config_name(r['path'])} | "
                     f"{r['block_m']} | {r['us']:.1f} | {r['distinct']:.1f} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['bytes'] / r['us'] / 1e3:.0f} | {ratio(us_of.get((r['T'], 16, r['path'])), r['us'])} | "
                     f"{ratio(us_of.get((r['T'], r['bits'], 'dot')), r['us'])} | {r['diff']:.1e} | {r['copies']} |")
    lines += ["", "## Best config per token count and width (GEMV, or tl.dot with other tiles)", "",
              "| T | width | tl.dot µs (default tiles) | best other µs | config | × dot | × bf16 (best each) |",
              "|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        key = (r["T"], r["bits"])
        if r["path"] != "dot" and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    for (T, bits), r in best.items():
        bf16 = best.get((T, 16))
        lines.append(f"| {T} | {width_name(bits)} | {us_of[(T, bits, 'dot')]:.1f} | {r['us']:.1f} | "
                     f"{config_name(r['path'])} | {ratio(us_of[(T, bits, 'dot')], r['us'])} | "
                     f"{ratio(bf16['us'] if bf16 else None, r['us'])} |")
    write_report(args.out, lines, echo=final)


if __name__ == "__main__":
    main()
