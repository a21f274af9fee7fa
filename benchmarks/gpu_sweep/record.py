"""The record of a GPU rehearsal sweep (run_rehearsal.sh): per stage wall time, peak GPU memory, peak host memory
and disk written; per cell its engine and tokens/s; extrapolated to Qwen3-30B-A3B's 48 layers and GSM8K's 1,319
test problems. Writes benchmarks/results/<card>/gpu_sweep.md (the current table only; history is git's) and prints it.

Sources: Snakemake's `benchmark:` files (wall s, max_rss, io_out), each stage log's "peak CUDA memory" line
(moesweep.logs), nvidia-smi's whole-card samples (gpu_memory.csv), results/<run>/summary/cells.parquet.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))
FULL_LAYERS, FULL_PROBLEMS = 48, 1319
# Usable memory of a 48 GB (RTX A6000 class), 80 GB (H100/A100) and 141 GB (H200) card, GiB (nvidia-smi's total
# less ~0.5 GiB the driver keeps).
CARDS_GIB = {"48 GB": 47.5, "80 GB": 79.1, "141 GB": 139.9}
PEAK = re.compile(r"peak CUDA memory: allocated (\d+) bytes, reserved (\d+) bytes")


def read_tsv(path: Path) -> dict:
    with path.open() as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    return {k: (float(v) if v not in ("-", "NA", "") and k != "h:m:s" else v) for k, v in row.items()}


def peak_cuda_gb(log: Path) -> float | None:
    """PyTorch's peak reserved GPU memory of the job (what the card must hold), from its log."""
    m = PEAK.findall(log.read_text(errors="replace")) if log.is_file() else []
    return int(m[-1][1]) / 1e9 if m else None


def stage_rows(run: str) -> list[dict]:
    bench, logs = Path("benchmarks/rules") / run, Path("logs") / run  # the run's working directory
    rows = []
    for tsv in sorted(bench.rglob("*.tsv")):
        rel = tsv.relative_to(bench).with_suffix("")
        b = read_tsv(tsv)
        rows.append({"job": str(rel), "wall_s": b["s"], "host_peak_gb": b["max_rss"] / 1e3,
                     "disk_written_gb": b["io_out"] / 1e3 if isinstance(b["io_out"], float) else None,
                     "gpu_peak_gb": peak_cuda_gb(logs / f"{rel}.log")})  # cell ids hold dots: no with_suffix
    return rows


def fits(gb: float | None) -> str:
    if gb is None:
        return "no GPU"
    return ", ".join(name for name, gib in CARDS_GIB.items() if gb * 1e9 / 2**30 <= gib) or "none of 48/80/141 GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", default="rehearsal")
    ap.add_argument("--second-call", help="log of the second `snakemake -n` (must say nothing to be done)")
    ap.add_argument("--results-root", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--card", help="GPU name, when recording a fetched run elsewhere (default: this machine's)")
    ap.add_argument("--versions", help="'torch X, triton Y, ...' of the run, when recording it elsewhere")
    args = ap.parse_args()

    import pandas as pd
    import torch
    import transformers
    import triton
    from importlib.metadata import version

    cfg = yaml.safe_load(Path(args.config).read_text())
    run = cfg["run"]
    ckpt = Path(cfg["model"]["id"])
    model_cfg = json.loads((ckpt / "config.json").read_text())
    layers = model_cfg["num_hidden_layers"]
    shards = {p.name: p.stat().st_size for p in ckpt.glob("*.safetensors")}
    layer_gb = sum(v for k, v in shards.items() if "layer" in k) / layers / 1e9
    other_gb = sum(v for k, v in shards.items() if "layer" not in k) / 1e9
    n_problems = cfg["dataset"]["limit"]
    scale_l, scale_p = FULL_LAYERS / layers, FULL_PROBLEMS / n_problems
    card = args.card or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    versions = args.versions or (f"torch {torch.__version__}, triton {triton.__version__}, transformers "
                                 f"{transformers.__version__}, snakemake {version('snakemake')}")
    run_dir = Path(args.run_dir)
    start, end = (int((run_dir / f).read_text()) for f in ("snakemake.start", "snakemake.end"))
    rc = int((run_dir / "snakemake.rc").read_text())
    card_peak = None
    if (run_dir / "gpu_memory.csv").is_file():
        used = [float(r[1].split()[0]) for r in csv.reader((run_dir / "gpu_memory.csv").open()) if len(r) > 1]
        card_peak = max(used) / 1024 if used else None
    second = Path(args.second_call).read_text() if args.second_call else ""
    nothing = "Nothing to be done" in second

    lines = [f"# GPU rehearsal sweep: Qwen3-30B-A3B shapes, {layers} of 48 layers, random weights ({card})", "",
             "Random weights: every accuracy below is meaningless. What this records is that a sweep at real shapes "
             "runs from safetensors shards to the report in one Snakemake call, what each stage needs, and each "
             "cell's throughput on the engine that ran it.", "",
             f"- command: `bash benchmarks/gpu_sweep/run_rehearsal.sh start {layers}` (checkpoint + problems, then "
             f"`snakemake --cores {os.environ.get('CORES', 16)} --configfile={args.config}`), `... wait`, `... record`",
             f"- commit: {os.environ.get('MOESWEEP_COMMIT', 'unknown')}; card: {card}; {versions}",
             f"- checkpoint: {layers} layers, {layer_gb:.2f} GB per layer + {other_gb:.2f} GB embeddings/head (bf16); "
             f"{n_problems} GSM8K-format problems, {cfg['prompt']['max_new_tokens']} new tokens, preset "
             f"{cfg['prompt']['preset']}, chat template {cfg['prompt'].get('chat_template', False)}",
             f"- snakemake exit status {rc}, {end - start} s wall for the whole DAG; the second call "
             f"{'ran no job (Nothing to be done)' if nothing else 'WOULD RUN JOBS: see ' + str(args.second_call)}",
             f"- whole-card peak GPU memory (nvidia-smi, all processes): "
             f"{'%.1f GB' % card_peak if card_peak is not None else 'not sampled'}", "",
             "## Stages", "",
             "GPU peak = PyTorch's peak reserved memory in that job (GB = 1e9 bytes). Extrapolated to 48 layers and "
             "1,319 problems: quantize and profile scale by layers (one layer at a time: their GPU peak stays); "
             "evaluate's timed generation scales by layers x problems and the rest of its wall time (load, "
             "compilation, graph capture) by layers; its GPU peak keeps the embeddings/head and the "
             "depth-independent activations and scales the rest (decoder weights as the cell holds them, KV cache) "
             "by layers. 'Cards' compares that with the usable memory of 48 / 80 / 141 GB cards.",
             "", "| job | wall s | GPU peak GB | host peak GB | disk written GB | 48 layers, 1,319 problems: wall | "
             "GPU GB | cards that hold it |", "|---|---|---|---|---|---|---|---|"]
    totals = {}
    rows = stage_rows(run)
    # Evaluate's peak = embeddings/head + per-layer part (the decoder layers' weights as the cell holds them, their
    # KV cache) + activations that do not grow with depth (prefill's logits over a 151,936-token vocabulary
    # dominate). The activations are estimated once, from the native cell: its peak minus the checkpoint's bytes
    # and its KV cache. Only the per-layer part is scaled to 48 layers.
    cells_df = pd.read_parquet(Path("results") / run / "summary" / "cells.parquet").set_index("cell")
    native = next((r for r in rows if r["job"] == "evaluate/native-w16" and r["gpu_peak_gb"] is not None), None)
    activations = 0.0
    if native is not None:
        c = cells_df.loc["native-w16"]
        kv = c["kv_bytes_per_token"] * c["batch_size"] * (c["max_prompt_tokens"] + c["max_new_tokens"]) / 1e9
        activations = max(0.0, native["gpu_peak_gb"] - layers * layer_gb - other_gb - kv)
    lines.insert(-3, "")
    lines.insert(-3, f"Evaluate's depth-independent activations, from the native cell: {activations:.1f} GB.")
    for r in rows:
        kind = r["job"].split("/")[0]
        if kind == "evaluate":
            per_layer = None if r["gpu_peak_gb"] is None else r["gpu_peak_gb"] - other_gb - activations
            # generation (timed repeats) scales with depth and problems; the rest (model load, compilation,
            # CUDA graph capture, scoring) is taken to scale with depth only
            c = cells_df.loc[r["job"].split("/", 1)[1]]
            gen = c["e2e_s"] * c["repeats"] if "e2e_s" in c else 0.0
            wall = (r["wall_s"] - gen) * scale_l + gen * scale_l * scale_p
            gpu = None if per_layer is None else r["gpu_peak_gb"] + per_layer * (scale_l - 1)
        elif kind in ("quantize", "profile", "calibrate"):
            wall, gpu = r["wall_s"] * scale_l, r["gpu_peak_gb"]
        else:
            wall, gpu = r["wall_s"], r["gpu_peak_gb"]
        totals[kind] = totals.get(kind, 0) + wall
        fmt = lambda v, f="%.1f": "–" if v is None else f % v  # noqa: E731
        lines.append(f"| {r['job']} | {r['wall_s']:.1f} | {fmt(r['gpu_peak_gb'])} | {r['host_peak_gb']:.1f} | "
                     f"{fmt(r['disk_written_gb'], '%.2f')} | {wall / 60:.1f} min | {fmt(gpu)} | {fits(gpu)} |")
    lines += ["", "Extrapolated GPU time per stage kind at 48 layers and 1,319 problems (one GPU, jobs one after "
              "another): " + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in sorted(totals.items())) + ".", ""]
    cells = cells_df.reset_index()
    cols = [c for c in ("cell", "engine", "batch_size", "n", "tokens_per_s", "decode_tokens_per_s", "tpot_ms",
                        "expert_weight_bytes", "accuracy_strict") if c in cells.columns]
    lines += ["## Cells", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in cells[cols].iterrows():
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |")
    text = "\n".join(lines) + "\n"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.results_root) / slug / "gpu_sweep.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_sweep.md").write_text(text)


if __name__ == "__main__":
    main()
