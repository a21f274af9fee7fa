"""Wall time of the whole fused quantize stage at one width vs four widths, at Qwen3-30B-A3B layer shapes.

Issue #4 asks whether four widths cost <= 1.5x one width thanks to the shared Hessians.
results/cpu/quantize_widths.md times the GPTQ solve alone (only the factorisation is shared there); what the pipeline shares across widths is the whole
calibration, so this times stages.fused_quantize_stage (load each layer, calibration + held-out forward, float64
per-expert Hessians, GPTQ, held-out error, write) on a random checkpoint (layerwise_harness.random_checkpoint)
for three configurations, each run in a fresh child process:
  (a) one width            --bits 4
  (b) four widths, shared  --bits 2 3 4 8 in one stage run (one calibration, one factorisation per projection)
  (c) four widths, apart   one-width stage runs at 2, 3, 4 and 8 bits, summed (a pipeline without sharing);
                           its 4-bit run is (a)'s run of the same round
The rounds interleave (a), (b) and (c)'s runs, in a rotating order, so that load from other jobs hits all alike;
medians are reported. The stage is timed by the wall clock around its call, without explicit synchronisation: it
ends by writing its results from the host (on CUDA the timed call includes creating the CUDA context, as a
pipeline job would). On the CPU every run also times the stage's parts through wrappers around library functions
(no change to the library); on CUDA the wrappers must synchronise, so they run in one extra, untimed run of (a)
and (b). The time grows with n_samples x max_length (calibration) and with the expert count (per width), so
`--calib` takes several calibration sizes; --runs-json lets several invocations build one report.

    .venv/bin/python benchmarks/quantize_stage_widths.py --experts 16 --threads 2          # CPU, two calibration sizes
    python benchmarks/quantize_stage_widths.py --device cuda --experts 128 --out $OUT/x.md  # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "benchmarks"))

from layerwise_harness import RESULTS, card_slug, common_parser, header, random_checkpoint, run_child  # noqa: E402

ONE, WIDTHS = 4, (2, 3, 4, 8)
PER_WIDTH = ("GPTQ", "error", "write")  # parts of the breakdown done once per width; the others once per layer


def instrument(sync) -> dict:
    """Wrap the library functions the stage calls so that each part's exclusive seconds add up in the returned
    dict (a part called inside another, e.g. the Hessian observer inside the forward, is subtracted from it)."""
    from moesweep import calibrate, layerwise, stages
    from moesweep.quant import QuantSpec, core, store

    parts, stack = defaultdict(float), []

    def bits(args):
        return next(s.bits for s in (getattr(a, "spec", a) for a in args) if isinstance(s, QuantSpec))

    def wrap(owner, name, part):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                dt, inner = time.perf_counter() - t0, stack.pop()
                parts[part if part not in PER_WIDTH else f"{part} {bits(args)}"] += dt - inner
                if stack:
                    stack[-1] += dt
        setattr(owner, name, timed)

    wrap(layerwise.LayerwiseModel, "materialise", "load")
    wrap(layerwise.LayerwiseModel, "release", "load")
    wrap(layerwise.LayerwiseModel, "forward_layer", "forward")
    wrap(calibrate._Accumulator, "observer", "hessian")  # float64 X^T X of the tokens routed to each expert
    wrap(calibrate._Accumulator, "layer_hessians", "hessian")
    wrap(core, "factorize_hessian", "factorise")  # once per projection (and expert chunk) for all widths
    for name in ("_grid", "_rtn", "_gptq_loop", "_pack"):
        wrap(core, name, "GPTQ")
    wrap(stages, "_error_rows", "error")
    wrap(store.QuantizedWriter, "add", "write")
    return parts


def child(args) -> None:
    """Run the stage once; print one JSON line: stage seconds, parts, tokens, peak memory."""
    import pandas as pd
    import torch

    from moesweep.stages import fused_quantize_stage

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)
    parts = instrument(sync) if args.instrument else {}
    out = Path(args.ckpt).parent / "out"
    out.mkdir(exist_ok=True)
    # CPU seconds too (all threads): a cross-check of the wall clock, less inflated when other jobs share the cores
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fused_quantize_stage({"id": args.ckpt, "dtype": args.dtype}, {"source": "synthetic", "split": "test", "limit": 1},
                         {"n_samples": args.n_samples, "n_heldout": args.n_heldout, "max_length": args.max_length,
                          "batch_size": args.batch_size, "device": args.device},
                         {"method": "gptq", "bits": args.bits, "group_size": args.group_size, "min_tokens": 16,
                          "damp": 0.01, "device": args.device}, 0, args.bits, "gptq",
                         {b: str(out / f"w{b}.safetensors") for b in args.bits},
                         {b: str(out / f"e{b}.parquet") for b in args.bits}, str(out / "stats.json"))
    total, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    err = pd.read_parquet(out / f"e{args.bits[0]}.parquet").query("projection == 'down_proj'")
    print(json.dumps({
        "total_s": total, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        "parts": {**parts, "other": total - sum(parts.values())} if parts else {},
        # every token is routed to 8 experts (top-8, dropless)
        "tokens": [int(err[c].sum()) // 8 // args.layers for c in ("calibration_tokens", "heldout_tokens")],
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "gpu_max_gib": torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None,
        "gpu": torch.cuda.get_device_name(args.device) if cuda else None}))


def child_argv(args, calib, bits, instrument):
    n, length, heldout = calib
    argv = ["--bits", *map(str, bits), "--n-samples", str(n), "--max-length", str(length), "--n-heldout",
            str(heldout), "--batch-size", str(args.batch_size), "--group-size", str(args.group_size), "--dtype",
            args.dtype, "--threads", str(args.threads), "--device", args.device, "--layers", str(args.layers)]
    return argv + ["--instrument"] * instrument


def measure(args, ckpt, calib, repeats) -> dict:
    """Interleaved rounds of (a), (b) and (c)'s other widths; per configuration a list of child results."""
    cpu = args.device == "cpu"
    runs = {"a": [], "b": [], **{f"c{w}": [] for w in WIDTHS if w != ONE}}
    bits = {"a": [ONE], "b": list(WIDTHS), **{f"c{w}": [w] for w in WIDTHS if w != ONE}}
    for r in range(repeats):
        for key in list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]:  # rotate: no run always goes first
            runs[key].append(run_child(__file__, ckpt, child_argv(args, calib, bits[key], instrument=cpu)))
            print(f"{calib} round {r + 1} {key}: {runs[key][-1]['total_s']:.1f} s", flush=True)
    if not cpu:  # breakdown from one synchronising run each, not mixed into the timings
        for key in ("a", "b"):
            runs[key + "_parts"] = [run_child(__file__, ckpt, child_argv(args, calib, bits[key], instrument=True))]
    others = [k for k in runs if k.startswith("c")]
    runs["c"] = [{**{k: sum(r[k] for r in rs) for k in ("total_s", "cpu_s", "process_s")},
                  "peak_rss_kb": max(r["peak_rss_kb"] for r in rs), "gpu_max_gib": rs[0]["gpu_max_gib"] and
                  max(r["gpu_max_gib"] for r in rs)} for rs in zip(runs["a"], *(runs[k] for k in others))]
    return runs


def med(runs, field):
    return statistics.median(r[field] for r in runs)


def med_parts(runs) -> dict:
    names = dict.fromkeys(k for r in runs for k in r["parts"])
    return {k: statistics.median(r["parts"].get(k, 0.0) for r in runs) for k in names}


SHARED = {"load": "read the layer from the shards, free it",
          "forward": "forward of both sample sets (attention, router, experts)",
          "hessian": "Hessian accumulation (float64 X^T X per routed expert, both sets) and finishing",
          "factorise": "Hessian factorisation (dampen, Cholesky, inverse; shared by the widths)",
          "other": "other (start-up: tokenizer, samples, skeleton, embeddings; Hessian normalisation, chunk merging, "
                   "error tables, stats)"}
FIXED = ("forward", "hessian", "other")  # parts whose cost does not grow with the expert count (each token meets 8)


def section(args, calib, runs) -> tuple[list[str], tuple[float, float, float]]:
    """The Markdown of one calibration size, and its ratios (b)/(a), (c)/(a), projected (b)/(a) at 128 experts."""
    n, length, heldout = calib
    E, L = args.experts, args.layers
    a, b, c = (med(runs[k], "total_s") for k in "abc")
    cpu_a = med(runs["a"], "cpu_s")
    tokens, meta = runs["a"][0]["tokens"], runs["meta"]
    lines = [f"## Calibration {n} + held-out {heldout} samples x max_length {length} ({tokens[0]} + {tokens[1]} "
             f"tokens)", "", f"{len(runs['a'])} round(s) in {meta['minutes']:.0f} min, by the invocation with "
             f"`{meta['command']}`; load average {meta['load']}.", "",
             "| configuration | stage wall s (median) | / (a) | ms per expert and layer | each run s | stage CPU s "
             "| / (a) | process s | peak RSS GiB | GPU max allocated GiB |", "|---" * 10 + "|"]
    for key, label, t in (("a", f"(a) one width, {ONE} bit", a), ("b", "(b) 2, 3, 4, 8 bit in one run (shared)", b),
                          ("c", "(c) 2, 3, 4, 8 bit in four runs (summed)", c)):
        rs = runs[key]
        gpu = max(r["gpu_max_gib"] or 0 for r in rs)
        lines.append(f"| {label} | **{t:.1f}** | **{t / a:.2f}x** | {1000 * t / (E * L):.0f} | "
                     + ", ".join(f"{r['total_s']:.1f}" for r in rs) + f" | {med(rs, 'cpu_s'):.0f} | "
                     f"{med(rs, 'cpu_s') / cpu_a:.2f}x | {med(rs, 'process_s'):.1f} | "
                     f"{max(r['peak_rss_kb'] for r in rs) / 2**20:.1f} | " + (f"{gpu:.1f}" if gpu else "–") + " |")
    lines += ["", "(c)'s one-width runs, median s: " + ", ".join(
        f"{w} bit {med(runs['a' if w == ONE else f'c{w}'], 'total_s'):.1f}" for w in WIDTHS) + f" (the {ONE}-bit one "
        f"is (a)).", ""]
    pa, pb = (med_parts(runs.get(k + "_parts", runs[k])) for k in "ab")
    lines += [f"Where the time goes ({L} layer(s); seconds, median over the "
              f"{'timed runs' if args.device == 'cpu' else 'one synchronising run'}):", "",
              "| part | (a) 4 bit | (b) 2, 3, 4, 8 bit |", "|---|---|---|"]
    lines += [f"| {what} | {pa.get(k, 0):.1f} | {pb.get(k, 0):.1f} |" for k, what in SHARED.items()]
    for part, what in zip(PER_WIDTH, ("GPTQ (grid, block loop, RTN fallbacks, packing)",
                                      "held-out error tr(dW H dW^T) in float64", "write the packed experts")):
        lines.append(f"| {what}, per width | {pa.get(f'{part} {ONE}', 0):.1f} | "
                     + " + ".join(f"{pb.get(f'{part} {w}', 0):.1f}" for w in WIDTHS) + " |")
    oa, ob = (sum(p.get(k, 0) for k in SHARED) for p in (pa, pb))
    wa, wb = (sum(v for k, v in p.items() if k.split()[0] in PER_WIDTH) / m for p, m in ((pa, 1), (pb, len(WIDTHS))))
    lines.append(f"| **once per run** / **per width** | {oa:.1f} / {wa:.1f} | {ob:.1f} / {wb:.1f} (mean) |")
    # The per-width work, reading the layer and the factorisation grow with the expert count; the forward and the
    # Hessian flops do not: a rough projection of one layer to Qwen3-30B-A3B's 128 experts.
    scale = 128 / E
    a128, b128 = (sum(p.get(k, 0) for k in FIXED) + scale * sum(v for k, v in p.items() if k not in FIXED)
                  for p in (pa, pb))
    err = pa.get(f"error {ONE}", 0) / wa if wa else 0
    lines += ["", f"Once-per-run part / one width's part = {oa / wa:.1f} in (a) (four widths cost <= 1.5x one width "
              f"only when it is >= 5). The held-out error is {err:.0%} of one width's part. Projected to 128 experts "
              f"({', '.join(FIXED)} kept, the rest x {scale:g}): (a) {a128:.0f} s ({a128 / 128:.1f} s per expert), "
              f"(b) {b128:.0f} s ({b128 / 128:.1f} s per expert), "
              f"**(b)/(a) = {b128 / a128:.2f}x** (a projection, not a measurement).", ""]
    return lines, (b / a, c / a, b128 / a128, med(runs["b"], "cpu_s") / cpu_a)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_calib(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)\+(\d+)", text)
    if not m:
        raise ValueError(f"--calib wants SAMPLESxMAX_LENGTH+HELDOUT, e.g. 16x128+8, got {text!r}")
    return tuple(map(int, m.groups()))


def main():
    ap = common_parser(__doc__, "quantize_stage_widths.md", n_samples=16, max_length=128, batch_size=16)
    ap.set_defaults(experts=16)
    ap.add_argument("--calib", nargs="+", default=["16x128+8", "128x256+32"],
                    help="calibration sizes SAMPLESxMAX_LENGTH+HELDOUT, each measured in turn (128x256+32 is the "
                         "config's default); they set the stage's --n-samples, --max-length, --n-heldout")
    ap.add_argument("--device", default="cpu", help="calibration.device and quantization.device: cpu, cuda, cuda:N")
    ap.add_argument("--repeats", type=int, nargs="+", default=[3], help="rounds per calibration size (one value: all)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--runs-json", help="keep the measured runs in this JSON file: a later invocation with the same "
                    "setup reuses the calibration sizes found there, so that a long benchmark can be split into "
                    "shorter invocations")
    ap.add_argument("--bits", type=int, nargs="+", default=[ONE], help=argparse.SUPPRESS)
    ap.add_argument("--n-heldout", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--instrument", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    default_out = ap.get_default("out")
    if args.device != "cpu":  # never overwrite the CPU record with GPU numbers
        if args.out == default_out:
            import torch

            args.out = str(RESULTS / card_slug(torch.cuda.get_device_name(args.device)) / Path(default_out).name)
        elif Path(args.out).resolve() == Path(default_out).resolve():
            sys.exit(f"--device {args.device}: write elsewhere than the CPU record {default_out}")

    from moesweep.io import write_text

    calibs = [parse_calib(c) for c in args.calib]
    repeats = args.repeats * len(calibs) if len(args.repeats) == 1 else args.repeats
    if len(repeats) != len(calibs):
        sys.exit("--repeats takes one value, or one per --calib size")
    cache = json.loads(Path(args.runs_json).read_text()) if args.runs_json and Path(args.runs_json).exists() else {}
    setup = " ".join(f"{k}={getattr(args, k)}" for k in ("device", "experts", "layers", "dtype", "group_size",
                                                          "batch_size", "threads"))
    body, ratios = [], {}
    with random_checkpoint(args.layers, args.experts) as (ckpt, ckpt_bytes, write_s):
        for name, calib, n in zip(args.calib, calibs, repeats):
            key = f"{setup} calib={name}"
            if key not in cache:  # else measured by an earlier invocation (--runs-json)
                load, t0 = loadavg(), time.perf_counter()
                cache[key] = measure(args, ckpt, calib, n)
                cache[key]["meta"] = {"command": " ".join(sys.argv[1:]), "minutes": (time.perf_counter() - t0) / 60,
                                      "load": f"{load} at start, {loadavg()} at end"}
                if args.runs_json:
                    write_text(args.runs_json, json.dumps(cache))
            runs = cache[key]
            lines, ratios[calib] = section(args, calib, runs)
            body += lines
            print("\n".join(lines), flush=True)
    import compressed_tensors
    import llmcompressor

    text = "\n".join([
        *header(f"Fused quantize stage: four widths vs one width ({args.device})", __file__, sys.argv[1:],
                args.threads, "given per calibration size below",
                "CPU only" if args.device == "cpu" else f"stage on {args.device} ({runs['a'][0]['gpu']})"),
        f"Versions (more): llmcompressor {llmcompressor.__version__}, compressed-tensors "
        f"{compressed_tensors.__version__}  ",
        f"Setup: random bf16 checkpoint, {args.layers} decoder layer(s) x **{args.experts} experts** (Qwen3-30B-A3B "
        f"has 128; hidden 2048, moe_intermediate 768, 32/4 heads x 128, top-8, vocab 512; "
        f"{ckpt_bytes / 2**30:.2f} GiB, written in {write_s:.0f} s, not timed); model dtype {args.dtype}; GPTQ, group "
        f"{args.group_size}, asymmetric, damp 0.01, min_tokens 16; synthetic train problems, batch {args.batch_size}; "
        f"stage wall = the fused_quantize_stage call in a fresh process (process s adds interpreter start-up and "
        f"imports); median of interleaved rounds (with 2 rounds: their mean).",
        "", *body, "## Conclusion", "", conclusion(args, ratios)]) + "\n"
    print(text)
    write_text(args.out, text)


def conclusion(args, ratios) -> str:
    measured = "; ".join(f"{n} x {length} (+{h} held out): (b)/(a) = {b:.2f}x ({bc:.2f}x in CPU seconds), (c)/(a) = "
                         f"{c:.2f}x (sharing saves {1 - b / c:.0%} of (c)), projected to 128 experts (b)/(a) = {p:.2f}x"
                         for (n, length, h), (b, c, p, bc) in ratios.items())
    held = [f"{n} x {length}" for (n, length, _), (b, *_) in ratios.items() if b <= 1.5]
    return (f"On {args.device} with {args.experts} experts per layer: {measured}. The issue's target (four widths "
            f"<= 1.5x one width) " + (f"holds at {', '.join(held)}" if held else "holds at no calibration size "
                                      "measured") + ". Sharing saves the calibration (layer reads, forward passes, "
            "Hessian accumulation) and the factorisation; GPTQ's block loop, the held-out error and the write still "
            "run once per width, so (b)/(a) = (once + 4 x per width) / (once + per width), <= 1.5 only when the "
            "once-per-run part is >= 5x one width's part: more calibration tokens lower the ratio, more experts per "
            "layer raise it (the per-width work grows with the expert count, the calibration's flops do not). "
            "Without sharing, (c) pays the whole calibration four times.")


if __name__ == "__main__":
    main()
