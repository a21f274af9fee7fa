"""Everything the GPU rehearsal sweep reads, made offline by one command:

    python benchmarks/gpu_sweep/make_rehearsal.py --layers 8 --out rehearsal

- `<out>/qwen3-30b-a3b-shapes/`: a checkpoint in the hub's layout (config.json, one safetensors shard per decoder
  layer + an index, per-expert tensors as the released Qwen3-30B-A3B files have them) with Qwen3-30B-A3B's shapes
  (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32/4 heads, vocab 151,936, untied embeddings) and
  random weights, `--layers` decoder layers deep. Its tokenizer is the embedded model's byte-level BPE padded with
  placeholder tokens to all 151,936 ids (a random model emits any id, and every id must decode), plus Qwen's
  chat markers and a ChatML template, so `prompt.chat_template: true` runs as on an Instruct checkpoint.
- `<out>/gsm8k-train.jsonl`, `<out>/gsm8k-test.jsonl`: GSM8K-format records (question, answer ending in
  `#### <number>`) from the project's synthetic generator, disjoint by construction (split by question hash).

Random weights make every accuracy meaningless: the rehearsal proves that a sweep at real shapes finishes, with
what resources, and measures each cell's throughput on the fast engine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))

SHAPES = REPO / "config" / "models" / "qwen3-30b-a3b.json"
TINY_TOKENIZER = REPO / "resources" / "models" / "tiny-qwen3-moe"
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def padded_tokenizer(out: Path, vocab_size: int) -> None:
    """The embedded BPE with placeholder entries up to `vocab_size` ids. Placeholders have no merges, so text
    never tokenizes into them; they only give every id a decodable string (`<ph123>`: printable ASCII, which
    the byte-level decoder maps to itself)."""
    tok = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tok["added_tokens"]}
    next_id = max(used) + 1
    for marker in CHAT_MARKERS:
        tok["added_tokens"].append({"id": next_id, "content": marker, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        vocab[marker] = next_id
        next_id += 1
    for i in range(next_id, vocab_size):
        vocab[f"<ph{i}>"] = i
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    cfg.update({"chat_template": CHATML, "additional_special_tokens": list(CHAT_MARKERS)})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def write_problems(out: Path, n_train: int, n_test: int) -> None:
    from moesweep.data.synthetic import generate_problems

    for split, n in (("train", n_train), ("test", n_test)):
        rows = generate_problems(split, n, seed=7)
        rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
        (out / f"gsm8k-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="rehearsal", help="output folder (default: rehearsal/)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--train", type=int, default=1024, help="GSM8K-format train problems")
    ap.add_argument("--test", type=int, default=64, help="GSM8K-format test problems")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import Qwen3MoeConfig

    from moesweep.layerwise import write_random_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_problems(out, args.train, args.test)
    shapes = {k: v for k, v in json.loads(SHAPES.read_text()).items() if not k.startswith("_")}
    shapes.update(num_hidden_layers=args.layers, max_position_embeddings=40960, rope_theta=1e6,
                  rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    config = Qwen3MoeConfig(**shapes)
    ckpt = out / "qwen3-30b-a3b-shapes"
    with tempfile.TemporaryDirectory() as tmp:
        padded_tokenizer(Path(tmp), config.vocab_size)
        write_random_checkpoint(ckpt, config, tmp, seed=args.seed, dtype=torch.bfloat16)
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    print(f"{ckpt}: {args.layers} layers, {size / 1e9:.2f} GB; problems: {args.train} train, {args.test} test; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
