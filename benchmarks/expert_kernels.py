"""Expert kernels of one MoE layer on Qwen3-30B-A3B shapes: the engine's kernels (stored layout) against lowbit's
serving-layout kernels, per width, and a peer (gemlite) on single expert matrices.

Part 1, one layer's experts (E 128, hidden 2048, moe_intermediate 768; random bf16 weights, int8/int4/int2 = RTN of
them in the quantize stage's packed layout, `rtn_packed` of benchmarks/fast_engine.py, groups of 128) and random top-8
routings of T tokens. Timed: FastMoeExperts.run, i.e. what the engine runs per layer after routing (gate_up launch,
down launch, and the per-call buffers: zero-filled outputs, routing weights cast to float32), captured in a CUDA
graph of --calls consecutive calls and replayed --repeats times; µs per layer = median replay time / calls.
Paths: "old" = the engine's kernels on the stored layout with its default rules (kernels.py: tl.dot for bf16/int8
blocks, the byte-wise GEMV kernel for int4/int2, the 2-D kernel for bf16 at one row); "new" = fast/lowbit.py's
serving layout and kernels with SERVING_GEMV_TILES, and "new BN,UNROLL,warps" the same with other tiles
(--serving-configs); "old sweep" rows are the previous GEMV tiles (--configs, BN,BK,num_warps; none by default).
Reads are kept out of L2: every call takes the next of --routings random routings and the next of C copies of the
layer's weights (separate memory, C chosen so that C calls touch at least 4x the L2 size), as decode does with 48
layers between two calls of a layer.
GB/s = the bytes of the distinct experts each call routes to (stored format: codes + fp16 scales + uint8 zeros of
gate_up and down; bf16: 2 bytes a weight; the serving layout reads the same codes plus 4 bytes of scale and zero per
group), averaged over the routings, / µs per layer; "% copy" = that against the measured copy bandwidth. "× bf16" =
bf16 "old" µs / this µs (same T); "× old" = this width's "old" µs / this µs. "rel. diff" = ||y - y_old|| / ||y_old||
for one routing (bf16 arithmetic on both sides, different summation orders).

Part 2 (--peer), one expert matrix, gate_up 1536x2048 and down 2048x768 (out x in), int4 and int2, groups of 128,
at T tokens: torch's bf16 matmul x @ W.T, the engine's old kernel and the new one on that matrix (one expert, all T
rows in one block), and gemlite's GemLiteLinear (A16Wn, HQQ-style (q - z) * s with bf16 scales/zeros; its default
kernel choice: GEMV_REVSPLITK at T 1, GEMM_SPLITK at T 8) when `import gemlite` works (skipped otherwise). Each
timed over C copies of the matrix (C up to 32) in a CUDA graph when the contender can be captured, else eagerly with
events (marked); median of --repeats.

Command (H200/H100 through the device tool; needs CUDA, about two minutes, most of it Triton compiling):
    PYTHONPATH=workflow python3 benchmarks/expert_kernels.py --out benchmarks/results/<card>/expert_kernels.md
"""
from __future__ import annotations

import argparse
import dataclasses
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
from moesweep.fast import kernels, lowbit  # noqa: E402
from moesweep.fast.kernels import ExpertTier, align_assignments  # noqa: E402
from moesweep.fast.moe import FastMoeExperts, quantized_tier  # noqa: E402

E, H, I, TOP_K = 128, 2048, 768, 8  # config.json of Qwen/Qwen3-30B-A3B
GROUP = 128
DOT_BLOCK_M = 16
DEFAULT_CONFIGS: list[str] = []  # old GEMV tiles to sweep (BN,BK,num_warps); the engine's defaults are "old"
# new kernel tiles: BN,UNROLL,num_warps[,num_stages[,BN_GATE_UP[,WARPS_GATE_UP]]] (gate_up's default to BN, num_warps)
DEFAULT_SERVING_CONFIGS = ["64,2,4", "64,4,4,3,32,2", "64,2,4,1,32,2"]
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


def layer_copies(bits, gate_up, down, packed, copies: int, serving: bool = False) -> list[FastMoeExperts]:
    """`copies` FastMoeExperts over separate copies of the layer: one tier of E * copies slots, copy c's slot table
    points expert e at slot c * E + e. serving: the packed tier in lowbit's serving layout."""
    if bits == 16:
        tiers = [ExpertTier(16, w.repeat(copies, 1, 1), None, None, w.shape[2], w.shape[2]) for w in (gate_up, down)]
    else:
        tiers = [ExpertTier(bits, q.codes.repeat(copies, 1, 1), q.scales.repeat(copies, 1, 1),
                            q.zeros.repeat(copies, 1, 1), GROUP, q.shape[2]) for q in packed[bits]]
        if serving:  # the layout made once from one copy (as the engine does at load), then repeated
            tiers = [lowbit.serving_layout(ExpertTier(bits, q.codes, q.scales, q.zeros, GROUP, q.shape[2]))
                     for q in packed[bits]]
            assert all(isinstance(t, lowbit.ServingTier) for t in tiers)
            tiers = [dataclasses.replace(t, weight=t.weight.repeat(copies, 1, 1, 1),
                                         scales=t.scales.repeat(copies, 1, 1, 1)) for t in tiers]
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


_DEFAULTS = {"GEMV_TILES": dict(kernels.GEMV_TILES), "GEMV_TILES_ONE_ROW": dict(kernels.GEMV_TILES_ONE_ROW),
             "ROW_GEMV_TILES": dict(kernels.ROW_GEMV_TILES), "GEMV_BITS": kernels.GEMV_BITS,
             "ROW_GEMV": kernels.ROW_GEMV, "FORCE_BLOCK_M": kernels.FORCE_BLOCK_M}
_SERVING_DEFAULTS = {bm: dict(t) for bm, t in lowbit.SERVING_GEMV_TILES.items()}


def restore_defaults():
    for name, value in _DEFAULTS.items():
        if isinstance(value, dict):
            getattr(kernels, name).update(value)
        else:
            setattr(kernels, name, value)
    kernels.DOT_DECODE_TILES.update(DEFAULT_DOT_TILES, BK=dict(DEFAULT_DOT_TILES["BK"]))
    for bm, tiles in _SERVING_DEFAULTS.items():  # replaced, not updated: a sweep may have added keys
        lowbit.SERVING_GEMV_TILES[bm].clear()
        lowbit.SERVING_GEMV_TILES[bm].update(tiles)


def set_path(path):
    """path: ("old",) the engine's kernels and rules; ("old", BN, BK, num_warps) every width through the old GEMV
    kernel with these tiles; ("new",) the serving-layout kernels with their default tiles; ("new", BN, UNROLL,
    num_warps) with these tiles for every block size."""
    restore_defaults()
    if path[0] == "old" and len(path) > 1:
        kernels.GEMV_BITS = (16, 8, 4, 2)
        for tiles in (kernels.GEMV_TILES, kernels.GEMV_TILES_ONE_ROW, kernels.ROW_GEMV_TILES):
            tiles.update(BN=path[1], BK=path[2], num_warps=path[3])
    if path[0] == "new" and len(path) > 1:
        for tiles in lowbit.SERVING_GEMV_TILES.values():
            tiles.update(BN=path[1], UNROLL=path[2], num_warps=path[3], num_stages=path[4] if len(path) > 4 else 3,
                         BN_GATE_UP=path[5] if len(path) > 5 else path[1],
                         WARPS_GATE_UP=path[6] if len(path) > 6 else path[3])


def path_name(path) -> str:
    return {"old": "old" if len(path) == 1 else "old sweep", "new": "new"}[path[0]]


def width_name(bits: int) -> str:
    return "bf16" if bits == 16 else f"int{bits}"


def config_name(path) -> str:
    if len(path) == 1:
        tiles = lowbit.SERVING_GEMV_TILES if path[0] == "new" else None
        return "default" if tiles is None else "default " + "/".join(
            f"{t['BN']},{t['UNROLL']},{t['num_warps']},{t['num_stages']},{t['BN_GATE_UP']},"
            f"{t.get('WARPS_GATE_UP', t['num_warps'])}"
            for bm, t in sorted(tiles.items()) if bm <= 4)
    return ", ".join(str(v) for v in path[1:])


def serving_bytes(bits: int) -> int:
    """Bytes one expert's gate_up + down occupy in the serving layout (codes + a float16 scale and zero per group)."""
    n = 2 * I * H + H * I
    return n * bits // 8 + 4 * (n // GROUP)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 8, 4, 2])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                    help="old GEMV tiles as BN,BK,num_warps (BK: bytes of every weight row per loop iteration)")
    ap.add_argument("--serving-configs", nargs="+", default=DEFAULT_SERVING_CONFIGS,
                    help="new (serving-layout) GEMV tiles as BN,UNROLL,num_warps, besides lowbit's defaults")
    ap.add_argument("--no-peer", action="store_true", help="skip part 2 (single matrices, torch bf16, gemlite)")
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
    paths = [("old",), ("new",), *(("new", *map(int, c.split(","))) for c in args.serving_configs),
             *(("old", *map(int, c.split(","))) for c in args.configs)]

    bandwidth = copy_bandwidth(2.0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    gate_up, down, packed = build_weights(args.seed)
    rows, peer = [], []  # dicts, one per (T, width, path)
    try:
        for T in args.tokens:
            routes = routings(T, args.routings, args.seed + T)
            distinct = statistics.fmean(int(torch.unique(index).numel()) for _, index, _ in routes)
            for bits in args.widths:
                y_old = None
                for serving in ([False] if bits == 16 else [False, True]):
                    per_call = distinct * (serving_bytes(bits) if serving else expert_bytes(bits))
                    # the old tl.dot kernel offsets a tier's weights by slot * stride in int32: stay below 2**31
                    slot_elems = 2 * I * H * (bits if bits < 16 else 8) // 8
                    copies = max(1, min(16, math.ceil(4 * l2 / per_call), (2**31 - 1) // (E * slot_elems)))
                    experts = layer_copies(bits, gate_up, down, packed, copies, serving)
                    for path in paths:
                        if (path[0] == "new") != serving:
                            continue
                        set_path(path)
                        try:
                            us, y, block_m = measure(experts, routes, args.calls, args.repeats)
                        except Exception as err:  # one config failing (compile, resources) must not lose the rest
                            print(f"T={T} {width_name(bits)} {path_name(path)} {config_name(path)}: failed "
                                  f"({type(err).__name__}: {str(err)[:200]})", flush=True)
                            if path == ("old",):
                                break
                            continue
                        if path == ("old",):
                            y_old = y
                        row = dict(T=T, bits=bits, path=path, config=config_name(path), us=us, block_m=block_m,
                                   distinct=distinct, bytes=per_call, copies=copies,
                                   diff=float((y - y_old).norm() / y_old.norm()) if y_old is not None else float("nan"))
                        rows.append(row)
                        print(f"T={T} {width_name(bits)} {path_name(path)} {row['config']}: {us:.1f} µs (BM {block_m}, "
                              f"{per_call / us / 1e3:.0f} GB/s, rel. diff vs old {row['diff']:.1e})", flush=True)
                        write_table(args, bandwidth, l2, rows, peer)  # after every row: a run cut short leaves a table
                    del experts
                    torch.cuda.empty_cache()
        restore_defaults()
        if not args.no_peer:
            run_peer(args, l2, rows, peer, bandwidth)
    finally:
        restore_defaults()
    write_table(args, bandwidth, l2, rows, peer, final=True)


PEER_SHAPES = {"gate_up": (2 * I, H), "down": (H, I)}  # (out, in) of one expert's matrix


def _gemlite():
    try:
        import gemlite
        return gemlite
    except Exception as err:  # not installed, or its import fails on this stack: part 2 runs without it
        print(f"gemlite unavailable ({type(err).__name__}: {err}); its rows are skipped", flush=True)
        return None


def time_maybe_graph(calls, repeats: int) -> tuple[float, bool]:
    """(µs per call, captured): time_calls' CUDA graph when the calls can be captured, else eager calls timed with
    events (median of repeats)."""
    try:
        return time_calls(calls, repeats), True
    except Exception as err:
        print(f"  graph capture failed ({type(err).__name__}); timing eagerly", flush=True)
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for f in calls:
            f()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times), False


def run_peer(args, l2, rows, peer, bandwidth):
    """Part 2: single expert matrices (module docstring)."""
    gl = _gemlite()
    g = torch.Generator(device="cuda").manual_seed(args.seed + 99)
    for name, (n_out, n_in) in PEER_SHAPES.items():
        w = (torch.randn(1, n_out, n_in, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        for bits in (4, 2):
            q = rtn_packed(w, bits, GROUP)
            packed_bytes = n_out * n_in * bits // 8 + 3 * n_out * n_in // GROUP
            copies = max(1, min(32, math.ceil(4 * l2 / packed_bytes)))
            stored = ExpertTier(bits, q.codes.repeat(copies, 1, 1), q.scales.repeat(copies, 1, 1),
                                q.zeros.repeat(copies, 1, 1), GROUP, n_in)
            serving = lowbit.serving_layout(stored)
            w_copies = [w[0].clone() for _ in range(copies)]
            lin = []
            if gl is not None:
                codes = _unpacked(q.codes[0], bits, n_in)
                s = q.scales[0].to(torch.bfloat16)
                z = q.zeros[0].to(torch.bfloat16)
                for _ in range(copies):
                    m = gl.GemLiteLinear(bits, group_size=GROUP, in_features=n_in, out_features=n_out,
                                         input_dtype=gl.DType.BF16, output_dtype=gl.DType.BF16)
                    m.pack(codes, s, z, None)
                    lin.append(m)
            for T in args.tokens:
                x = torch.randn(T, n_in, device="cuda", generator=g).to(torch.bfloat16)
                want = x.float() @ _dequant(q, bits, n_in).T
                contenders = {"torch bf16 matmul": [partial(torch.matmul, x, wc.T) for wc in w_copies]}
                for label, tier in (("old", stored), ("new", serving)):
                    contenders[label] = [partial(_one_expert, x, tier, c) for c in range(copies)]
                if lin:
                    contenders["gemlite"] = [partial(m, x) for m in lin]
                for label, calls in contenders.items():
                    calls = [calls[i % copies] for i in range(max(args.calls, copies))]
                    try:
                        us, graphed = time_maybe_graph(calls, args.repeats)
                        y = calls[0]().float()
                    except Exception as err:  # a contender that fails on this stack is reported, not fatal
                        print(f"  {name} int{bits} T={T} {label}: failed ({type(err).__name__}: {err})", flush=True)
                        continue
                    diff = float((y - want).norm() / want.norm()) if label != "torch bf16 matmul" else float("nan")
                    nbytes = 2 * n_out * n_in if label == "torch bf16 matmul" else packed_bytes
                    peer.append(dict(matrix=name, shape=f"{n_out}x{n_in}", bits=bits, T=T, who=label, us=us,
                                     graphed=graphed, bytes=nbytes, copies=copies, diff=diff))
                    print(f"{name} {n_out}x{n_in} int{bits} T={T} {label}: {us:.2f} µs"
                          f"{'' if graphed else ' (eager)'}, rel. err vs dequantised {diff:.1e}", flush=True)
                    write_table(args, bandwidth, l2, rows, peer)


def _unpacked(codes, bits, n_in):
    """Stored codes [N, bytes] -> [N, n_in] uint8 (gemlite packs them itself)."""
    p = 8 // bits
    shifts = torch.arange(p, device=codes.device, dtype=torch.uint8) * bits
    return ((codes[..., None] >> shifts) & ((1 << bits) - 1)).reshape(codes.shape[0], -1)[:, :n_in].contiguous()


def _dequant(q, bits, n_in):
    u = _unpacked(q.codes[0], bits, n_in).float()
    s = q.scales[0].float().repeat_interleave(GROUP, 1)[:, :n_in]
    z = q.zeros[0].float().repeat_interleave(GROUP, 1)[:, :n_in]
    return (u - z) * s


_ONE = {}


def _one_expert(x, tier, copy):
    """y [T, out] = x @ W^T for one expert matrix (copy `copy` of the tier's slots), all T rows in one block: the
    decode kernels' block of T rows (kernels.FORCE_BLOCK_M = T for this call)."""
    T = x.shape[0]
    key = (T, x.device)
    if key not in _ONE:
        index = torch.zeros(T, 1, dtype=torch.int64, device=x.device)
        saved = kernels.FORCE_BLOCK_M
        kernels.FORCE_BLOCK_M = T
        try:
            _ONE[key] = align_assignments(index, 1, T)
        finally:
            kernels.FORCE_BLOCK_M = saved
    sorted_assign, block_expert = _ONE[key]
    slots = _slot_tables(tier.weight.shape[0], x.device)[copy]
    out = torch.empty(T, tier.out_features, dtype=x.dtype, device=x.device)
    saved = kernels.FORCE_BLOCK_M
    kernels.FORCE_BLOCK_M = T
    try:
        kernels.grouped_expert_matmul(x, out, sorted_assign, block_expert, slots, tier, 1, T)
    finally:
        kernels.FORCE_BLOCK_M = saved
    return out


_SLOTS = {}


def _slot_tables(copies, device):
    if copies not in _SLOTS:
        _SLOTS[copies] = [torch.tensor([c], dtype=torch.int32, device=device) for c in range(copies)]
    return _SLOTS[copies]


def write_table(args, bandwidth, l2, rows, peer, final=False):
    gpu = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    gl = sys.modules.get("gemlite")
    lines = [f"# Expert kernels of one MoE layer, Qwen3-30B-A3B shapes (E {E}, hidden {H}, moe_intermediate {I}, "
             f"top-{TOP_K}): stored-layout kernels (old) vs serving layout (new, fast/lowbit.py)", "",
             f"- Hardware: {gpu}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; copy bandwidth "
             f"(read + write) measured {bandwidth / 1e12:.2f} TB/s",
             f"- Versions: torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"CUDA {torch.version.cuda}, Python {platform.python_version()}, gemlite "
             f"{getattr(gl, '__version__', 'not installed') if gl else 'not installed'}",
             f"- Command: `PYTHONPATH=workflow python3 benchmarks/expert_kernels.py {' '.join(sys.argv[1:])}`",
             f"- Timed: FastMoeExperts.run (gate_up + down launches, output buffers), {args.calls} calls per CUDA "
             f"graph cycling over {args.routings} random top-{TOP_K} routings and C copies of the weights (out of "
             f"L2), median of {args.repeats} replays. Packed widths: RTN, groups of {GROUP}, fp16 scales, uint8 "
             f"zeros (stored); the serving layout is made from them at load.",
             "- GB/s = bytes of the distinct routed experts / time; % copy = against the copy bandwidth. × bf16 = "
             "bf16 old µs / this µs; × old = this width's old µs / this µs. Config: old = the engine's rules; new = "
             "BN,UNROLL,num_warps[,num_stages[,BN_GATE_UP[,WARPS_GATE_UP]]] (rows a program; default: blocks of "
             "1/2/4 rows).",
             "",
             "| T | width | path | config | BM | µs / layer | distinct experts | MB read | GB/s | % copy | × bf16 | "
             "× old | rel. diff vs old | C |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    us_of = {(r["T"], r["bits"], r["path"]): r["us"] for r in rows}

    def ratio(num, den):
        return f"{num / den:.2f}" if num else ""

    for r in rows:
        gbs = r["bytes"] / r["us"] / 1e3
        lines.append(f"| {r['T']} | {width_name(r['bits'])} | {path_name(r['path'])} | {r['config']} | "
                     f"{r['block_m']} | {r['us']:.1f} | {r['distinct']:.1f} | {r['bytes'] / 1e6:.1f} | "
                     f"{gbs:.0f} | {100 * gbs * 1e9 / bandwidth:.0f} | "
                     f"{ratio(us_of.get((r['T'], 16, ('old',))), r['us'])} | "
                     f"{ratio(us_of.get((r['T'], r['bits'], ('old',))), r['us'])} | {r['diff']:.1e} | {r['copies']} |")
    lines += ["", "## Best per token count and width", "",
              "| T | width | old µs | best new µs | new config | × old | × bf16 | % copy | targets (issue 20) |",
              "|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        key = (r["T"], r["bits"])
        if r["path"][0] == "new" and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    target = {8: "≥ 1.6× bf16", 4: "≥ 2.5× bf16", 2: "≥ 1.3× int4"}
    for (T, bits), r in sorted(best.items()):
        bf16 = us_of.get((T, 16, ("old",)))
        int4 = best.get((T, 4))
        gbs = r["bytes"] / r["us"] / 1e3
        goal = target[bits] + (f" (× int4: {int4['us'] / r['us']:.2f})" if bits == 2 and int4 else "")
        lines.append(f"| {T} | {width_name(bits)} | {us_of.get((T, bits, ('old',)), float('nan')):.1f} | "
                     f"{r['us']:.1f} | {r['config']} | {ratio(us_of.get((T, bits, ('old',))), r['us'])} | "
                     f"{ratio(bf16, r['us'])} | {100 * gbs * 1e9 / bandwidth:.0f} | {goal} |")
    if peer:
        lines += ["", "## Single expert matrices: torch bf16, old, new, gemlite (groups of 128)", "",
                  "Each over C copies of the matrix (C up to 32; int2 and int4 copies may partly stay in L2, alike for "
                  "every contender). rel. err = against x @ dequantised W in float32. (eager) = not graph-captured.",
                  "", "| matrix | width | T | contender | µs | GB/s | × torch bf16 | × gemlite | rel. err | C |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        by = {(p["matrix"], p["bits"], p["T"], p["who"]): p["us"] for p in peer}
        for p in peer:
            lines.append(f"| {p['matrix']} {p['shape']} | int{p['bits']} | {p['T']} | {p['who']}"
                         f"{'' if p['graphed'] else ' (eager)'} | {p['us']:.2f} | {p['bytes'] / p['us'] / 1e3:.0f} | "
                         f"{ratio(by.get((p['matrix'], p['bits'], p['T'], 'torch bf16 matmul')), p['us'])} | "
                         f"{ratio(by.get((p['matrix'], p['bits'], p['T'], 'gemlite')), p['us'])} | "
                         f"{p['diff']:.1e} | {p['copies']} |")
    write_report(args.out, lines, echo=final)


if __name__ == "__main__":
    main()
