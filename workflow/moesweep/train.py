"""Train the embedded default model: a tiny transformers `Qwen3MoeForCausalLM` on synthetic GSM-style problems.

The model is built from `Qwen3MoeConfig` alone (no custom model code), so everything downstream loads it with
`AutoModelForCausalLM.from_pretrained`. Training text is `Question: {q}\nAnswer: {a}<|endoftext|>` with the
loss on the answer only; evaluation prompts end at `Answer:` and greedy generation stops at `<|endoftext|>`.
After saving (weights in bfloat16), the checkpoint is reloaded on the CPU in float32 and its greedy accuracy on
the synthetic test split is measured, the way the sweep will see it.

CLI (used on the GPU machine): `python -m moesweep.train --out DIR [--seed N] [--set key=value ...]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moesweep.data.synthetic import SyntheticSpec, final_answer, generate_problems
from moesweep.data.tokenizer import EOS, train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    # model (hidden and moe_intermediate_size divisible by 32 = the quantization group size;
    # moe_intermediate_size * 4 bytes a multiple of 16 so CPU grouped_mm works in fp32)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 16
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    router_aux_loss_coef: float = 0.001  # small on purpose: some hot/cold expert skew should remain
    vocab_size: int = 512  # tokenizer target; the model's vocabulary is the tokenizer's
    # optimisation
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    n_train: int = 200_000
    # evaluation
    n_eval: int = 500
    eval_batch_size: int = 64
    max_new_tokens: int = 128
    eval_every: int = 500  # steps between quick accuracy checks on the training device (0: never)
    time_budget_s: float = 0.0  # > 0: after 20 timed steps, lower `steps` so training fits this many seconds
    # data (SyntheticSpec fields)
    min_steps: int = SyntheticSpec.min_steps
    max_steps: int = SyntheticSpec.max_steps
    max_value: int = SyntheticSpec.max_value
    max_factor: int = SyntheticSpec.max_factor
    max_result: int = SyntheticSpec.max_result

    @classmethod
    def from_dict(cls, settings: dict | None) -> "TrainSettings":
        settings = dict(settings or {})
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"unknown train settings {unknown}; known: {sorted(known)}")
        return cls(**settings)

    def data_spec(self) -> SyntheticSpec:
        return SyntheticSpec(min_steps=self.min_steps, max_steps=self.max_steps, max_value=self.max_value,
                             max_factor=self.max_factor, max_result=self.max_result)


def prompt_text(question: str) -> str:
    return "Question: " + question + "\nAnswer:"


def completion_text(answer: str) -> str:
    return " " + answer + EOS


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(s: TrainSettings, tokenizer):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    for name in ("hidden_size", "moe_intermediate_size"):
        if getattr(s, name) % 32:
            raise ValueError(f"{name}={getattr(s, name)} must be divisible by 32 (quantization group size)")
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=4 * s.hidden_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, max_position_embeddings=512,
        num_experts=s.num_experts, num_experts_per_tok=s.num_experts_per_tok,
        moe_intermediate_size=s.moe_intermediate_size, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], router_aux_loss_coef=s.router_aux_loss_coef, output_router_logits=False,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen3MoeForCausalLM(config)


def encode(problems: list[dict], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, the prompt length and the full length of each training example."""
    prompts = tokenizer([prompt_text(p["question"]) for p in problems])["input_ids"]
    completions = tokenizer([completion_text(p["answer"]) for p in problems])["input_ids"]
    seqs = [a + b for a, b in zip(prompts, completions)]
    ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_token_id, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    return ids, torch.tensor([len(p) for p in prompts]), torch.tensor([len(s) for s in seqs])


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    """Left-padded batched greedy generation; a problem is right when its `#### N` equals the gold N."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, new_tokens, seconds = 0, 0, 0.0
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        enc = tokenizer([prompt_text(p["question"]) for p in batch], return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        t0 = time.perf_counter()
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - t0
        generated = out[:, enc["input_ids"].shape[1] :]
        new_tokens += _tokens_until_eos(generated, tokenizer.eos_token_id)
        for problem, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            correct += final_answer(text) == final_answer(problem["answer"])
    model.train(was_training)
    return {"n": len(problems), "correct": correct, "accuracy": correct / len(problems),
            "generate_seconds": seconds, "tokens_per_s": new_tokens / seconds, "batch_size": batch_size}


def _tokens_until_eos(generated: torch.Tensor, eos_id: int) -> int:
    """Generated tokens per row up to and including the first eos (what is padding after it is not work)."""
    is_eos = generated == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated.shape[1])
    return int(first_eos.sum())


def _experts_implementation(device: torch.device) -> str:
    """grouped_mm where it runs in fp32 on this device (it does on CPU and on recent CUDA), else eager."""
    try:
        from torch.nn.functional import grouped_mm
    except ImportError:
        grouped_mm = getattr(torch, "_grouped_mm", None)
    try:
        x = torch.randn(8, 32, device=device)
        w = torch.randn(2, 32, 32, device=device)
        grouped_mm(x, w, offs=torch.tensor([4, 8], dtype=torch.int32, device=device))
        return "grouped_mm"
    except Exception as err:  # noqa: BLE001 - any failure means: use the safe loop
        log.info("grouped_mm unusable in fp32 on %s (%s); training with eager experts", device, err)
        return "eager"


def hardware_info(device: torch.device) -> dict:
    info = {"device": str(device), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_model_dir(model, tokenizer, out_dir: Path, summary: dict) -> None:
    """Write the model dir into a temporary sibling and rename it into place (bf16 weights)."""
    from transformers import GenerationConfig

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        GenerationConfig(do_sample=False, max_new_tokens=128, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def train_embedded_model(out_dir: str, settings: dict, seed: int) -> dict:
    """Train, save to `out_dir`, reload on CPU in fp32, measure test accuracy; returns the summary."""
    import transformers

    s = TrainSettings.from_dict(settings)
    out_dir = Path(out_dir)
    t_start = time.time()
    torch.manual_seed(seed)
    device = pick_device()
    spec = s.data_spec()

    train_problems = generate_problems("train", s.n_train, seed, spec)
    test_problems = generate_problems("test", s.n_eval, seed, spec)
    tokenizer = train_tokenizer((prompt_text(p["question"]) + completion_text(p["answer"])
                                 for p in train_problems[:50_000]), vocab_size=s.vocab_size)
    ids, prompt_lens, lens = encode(train_problems, tokenizer)
    log.info("data: %d train problems, %d tokens max, vocab %d; device %s",
             len(train_problems), ids.shape[1], len(tokenizer), device)

    model = build_model(s, tokenizer)
    model.set_experts_implementation(_experts_implementation(device))
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    order = torch.Generator().manual_seed(seed)
    positions = torch.arange(ids.shape[1])
    perm, cursor, history = torch.randperm(len(ids), generator=order), 0, []
    t_train = time.time()
    step = 0
    while step < s.steps:
        if step == 20 and s.time_budget_s > 0:  # the schedule is only read against `steps` after warmup
            fitted = int(s.time_budget_s / ((time.time() - t_train) / 20))
            if fitted < s.steps:
                log.info("time budget %.0f s: %d steps instead of %d", s.time_budget_s, fitted, s.steps)
                s = dataclasses.replace(s, steps=max(fitted, s.warmup_steps + 1, step + 1))
        if cursor + s.batch_size > len(perm):
            perm, cursor = torch.randperm(len(ids), generator=order), 0
        rows = perm[cursor : cursor + s.batch_size]
        cursor += s.batch_size
        width = int(lens[rows].max())
        batch = ids[rows, :width]
        mask = positions[:width] < lens[rows, None]
        labels = batch.masked_fill((positions[:width] < prompt_lens[rows, None]) | ~mask, -100)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, s)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=batch.to(device), attention_mask=mask.long().to(device),
                        labels=labels.to(device), output_router_logits=True)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optim.step()
        if step % 100 == 0 or step == s.steps - 1:
            entry = {"step": step, "loss": round(out.loss.item(), 4), "aux_loss": round(out.aux_loss.item(), 4),
                     "seconds": round(time.time() - t_train, 1)}
            if s.eval_every and step > 0 and (step % s.eval_every == 0 or step == s.steps - 1):
                entry["quick_accuracy"] = greedy_accuracy(model, tokenizer, test_problems[:128], 128,
                                                          s.max_new_tokens)["accuracy"]
            history.append(entry)
            log.info("%s", entry)
        step += 1
    train_seconds = time.time() - t_train

    summary = {
        "settings": dataclasses.asdict(s), "seed": seed, "steps": s.steps, "final_loss": history[-1]["loss"],
        "history": history, "parameters": n_params, "train_seconds": round(train_seconds, 1),
        "hardware": hardware_info(device), "experts_implementation_in_training": model.config._experts_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    save_model_dir(model, tokenizer, out_dir, summary)

    # Measure the shipped artefact as the sweep sees it: bf16 file -> fp32 on the CPU.
    reloaded, reloaded_tok = load_model_dir(out_dir)
    evaluation = greedy_accuracy(reloaded, reloaded_tok, test_problems, s.eval_batch_size, s.max_new_tokens)
    evaluation["where"] = "cpu fp32, reloaded from the saved bf16 checkpoint"
    summary.update(evaluation=evaluation, accuracy=evaluation["accuracy"],
                   wall_seconds=round(time.time() - t_start, 1),
                   model_bytes={f.name: f.stat().st_size for f in sorted(out_dir.iterdir())})
    from moesweep.io import write_json

    write_json(out_dir / "training_summary.json", summary)
    (out_dir / "training_summary.json").chmod(0o644)
    log.info("accuracy %.3f on %d test problems (cpu fp32, %.0f tok/s at batch %d); wall %.0f s",
             evaluation["accuracy"], evaluation["n"], evaluation["tokens_per_s"], s.eval_batch_size,
             summary["wall_seconds"])
    return summary


def load_model_dir(model_dir: str | os.PathLike):
    """The saved model in fp32 on the CPU and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a TrainSettings field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = dict(item.split("=", 1) for item in args.set)
    summary = train_embedded_model(args.out, {k: _parse_value(v) for k, v in settings.items()}, args.seed)
    print(json.dumps({k: summary[k] for k in ("accuracy", "final_loss", "wall_seconds", "parameters")}))


if __name__ == "__main__":
    main()
