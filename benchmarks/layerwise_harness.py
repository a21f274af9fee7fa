"""What the layer-by-layer stage benchmarks share: a random checkpoint with Qwen3-30B-A3B's layer shapes, the stage
run in a child process (its own peak RSS), and the Markdown header naming command, hardware and versions."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "workflow"))


def card_slug(card: str) -> str:
    """A card's folder of results, benchmarks/results/<card>/: its name lower-cased, every run of other characters
    one '-' ("NVIDIA H200" -> nvidia-h200); CPU results go to cpu/."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextmanager
def random_checkpoint(layers: int, experts: int):
    """Yield (dir, bytes, write seconds) of a random bf16 checkpoint with Qwen3-30B-A3B layer shapes (hidden 2048,
    `experts` experts, top-8, moe_intermediate 768, 32 q / 4 kv heads of 128, per-expert tensors as on the hub) but
    `layers` layers and the embedded model's 512-token vocabulary, in a temporary directory removed afterwards."""
    from transformers import Qwen3MoeConfig

    from moesweep.layerwise import write_random_checkpoint

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True,
                         max_position_embeddings=4096, eos_token_id=0, pad_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", cfg, REPO / "resources/models/tiny-qwen3-moe")
        write_s = time.perf_counter() - t0
        yield ckpt, sum(f.stat().st_size for f in ckpt.glob("*.safetensors")), write_s


def run_child(script: str, ckpt, argv: list[str]) -> dict:
    """Run `script --child --ckpt DIR argv` in a fresh process; its last stdout line (JSON) plus process_s, the
    child's wall time including interpreter start-up and imports."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", "--ckpt", str(ckpt), *argv],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def run_on_random_checkpoint(script: str, argv: list[str], layers: int, experts: int) -> dict:
    """Write a random checkpoint (random_checkpoint) and run `script --child --ckpt DIR argv` on it once. Returns
    the child's JSON line plus ckpt_bytes, write_s (not part of any measurement) and the load average at the start."""
    with random_checkpoint(layers, experts) as (ckpt, ckpt_bytes, write_s):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        res = run_child(script, ckpt, argv)
    return {**res, "ckpt_bytes": ckpt_bytes, "write_s": write_s, "load": load}


def header(title: str, script: str, argv: list[str], threads: int, load: str,
           accelerator: str = "CPU only") -> list[str]:
    import torch
    import transformers

    cmdline = " ".join([f".venv/bin/python benchmarks/{Path(script).name}", *argv])
    return [f"# {title}", "", f"Command: `{cmdline}`  ",
            f"Hardware: {cpu_name()}, {threads} torch threads, {accelerator}; load average at start {load}"
            + (" (the machine's 2 cores may be shared with other jobs: times are upper bounds)  " if accelerator ==
               "CPU only" else "  "),
            f"Versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}  "]


def common_parser(doc: str, out_name: str, n_samples: int, max_length: int, batch_size: int):
    """The options every layer-by-layer benchmark takes (defaults differ per stage)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=n_samples)
    ap.add_argument("--max-length", type=int, default=max_length)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "cpu" / out_name))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    return ap


def layer_gib(experts: int, dtype: str) -> float:
    """One decoder layer's weights at Qwen3-30B-A3B shapes (experts, attention, norms, router; vocab aside)."""
    H, I = 2048, 768
    return (experts * 3 * H * I + 2 * H * 4096 + 2 * 512 * H + H * experts) * {"float32": 4}.get(dtype, 2) / 2**30
