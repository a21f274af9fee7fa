"""Reference generation engine: batched greedy decoding with a KV cache, left padding and honest clocks.

Written as an explicit loop (not `generate`) because the routing policies need to know, for every
forward call, which tokens are real (padding and finished sequences must not use expert capacity), and
because time to first token and per-step decode time are measured directly. Finished sequences are
removed from the batch and the cache, so "decode tokens per call" = live sequences.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .routing import RoutingContext


@dataclass
class Completion:
    index: int  # position in the caller's prompt list
    text: str  # decoded completion, cut at the first stop string
    generated_tokens: int  # tokens produced for this sequence (incl. the one that stopped it); never padding
    stopped: str  # "eos", "stop_string" or "length"


@dataclass
class GenerationTiming:
    prefill_s: list[float] = field(default_factory=list)  # one per batch (time to first token)
    decode_s: list[float] = field(default_factory=list)  # one per batch
    decode_steps: int = 0  # forward calls after prefill
    generated_tokens: int = 0
    decode_tokens: int = 0  # generated tokens after the first one of each sequence
    prompt_tokens: int = 0  # real (non-padding) prompt tokens
    padded_prompt_tokens: int = 0  # prompt positions including padding
    prompt_lengths: list[int] = field(default_factory=list)  # tokens of each prompt, in the caller's order


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def length_sorted_batches(tokenizer, prompts: list[str], batch_size: int) -> tuple[list[int], list[list[int]]]:
    """Token length of every prompt, and batches of prompt indices, longest first (least padding per batch)."""
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    return lengths, [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def _first_stop(text: str, stops) -> int:
    cut = [text.find(s) for s in stops if s and s in text]
    return min(cut) if cut else -1


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    stop: tuple[str, ...] = (), context: RoutingContext | None = None,
                    device: str = "cpu", progress=None) -> tuple[list[Completion], GenerationTiming]:
    """Greedy-decode every prompt; batches are formed after sorting by prompt length (less padding)."""
    from transformers import DynamicCache

    context = context or RoutingContext()
    eos = tokenizer.eos_token_id
    lengths, batches = length_sorted_batches(tokenizer, prompts, batch_size)
    timing = GenerationTiming(prompt_lengths=lengths)
    completions: dict[int, Completion] = {}

    for batch in (progress(batches, desc="batches") if progress else batches):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids, attention = enc.input_ids.to(device), enc.attention_mask.to(device)
        timing.prompt_tokens += int(attention.sum())
        timing.padded_prompt_tokens += attention.numel()
        position = (attention.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        live = list(batch)  # caller indices of the rows still in the batch
        tokens: dict[int, list[int]] = {i: [] for i in batch}

        _sync(device)
        t0 = time.perf_counter()
        context.valid = attention.bool().reshape(-1)
        context.phase = "prefill"  # routers and controllers account decode traffic separately
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        context.end_call()
        next_token = logits.argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        timing.prefill_s.append(t1 - t0)

        while True:
            step_tokens = next_token.tolist()
            keep_rows = []
            for row, i in enumerate(live):
                tokens[i].append(step_tokens[row])
                done = _finish(tokenizer, i, tokens[i], eos, stop, max_new_tokens, completions)
                if not done:
                    keep_rows.append(row)
            if not keep_rows:
                break
            if len(keep_rows) < len(live):
                rows = torch.tensor(keep_rows, device=device)
                cache.batch_select_indices(rows)
                attention, position, next_token = attention[rows], position[rows], next_token[rows]
                live = [live[r] for r in keep_rows]
            attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=1)
            position = position[:, -1:] + 1
            context.valid = torch.ones(len(live), dtype=torch.bool, device=device)
            context.phase = "decode"
            logits = model(input_ids=next_token[:, None], attention_mask=attention, position_ids=position,
                           past_key_values=cache, use_cache=True).logits[:, -1]
            context.end_call()  # precision controllers update between forward calls
            next_token = logits.argmax(-1)
            timing.decode_steps += 1
        _sync(device)
        timing.decode_s.append(time.perf_counter() - t1)

    for c in completions.values():
        timing.generated_tokens += c.generated_tokens
        timing.decode_tokens += c.generated_tokens - 1
    context.valid = None
    context.phase = None
    return [completions[i] for i in range(len(prompts))], timing


def _finish(tokenizer, i, toks, eos, stop, max_new_tokens, completions) -> bool:
    """Record sequence i as finished if its last token ends it; return whether it did."""
    if toks[-1] == eos:
        completions[i] = Completion(i, tokenizer.decode(toks[:-1], skip_special_tokens=True), len(toks), "eos")
        return True
    # A stop string completed by this token lies within its last len(stop) tokens (every token is ≥ 1 byte),
    # so only that tail is decoded each step; the whole text is decoded once, when it is found.
    if stop and _first_stop(tokenizer.decode(toks[-max(map(len, stop)):], skip_special_tokens=True), stop) >= 0:
        text = tokenizer.decode(toks, skip_special_tokens=True)
        completions[i] = Completion(i, text[:_first_stop(text, stop)], len(toks), "stop_string")
        return True
    if len(toks) >= max_new_tokens:
        completions[i] = Completion(i, tokenizer.decode(toks, skip_special_tokens=True), len(toks), "length")
        return True
    return False


@torch.inference_mode()
def time_decode(model, input_ids: torch.Tensor, new_tokens: int, context: RoutingContext | None = None,
                device: str = "cpu") -> GenerationTiming:
    """Fixed-shape timing pass (the fast engine's `time_decode` on the reference engine): prefill `input_ids`
    [B, P] (no padding), then decode until every row has `new_tokens` tokens. EOS and stop strings are ignored,
    so every step carries all B rows and the clock measures the policy's per-step cost, not how long its
    outputs were."""
    from transformers import DynamicCache

    context = context or RoutingContext()
    input_ids = input_ids.to(device)
    B, P = input_ids.shape
    attention = torch.ones_like(input_ids)
    cache = DynamicCache()
    timing = GenerationTiming(prompt_lengths=[P] * B, prompt_tokens=B * P, padded_prompt_tokens=B * P)
    _sync(device)
    t0 = time.perf_counter()
    context.valid = attention.bool().reshape(-1)
    context.phase = "prefill"
    logits = model(input_ids=input_ids, attention_mask=attention, past_key_values=cache, use_cache=True).logits[:, -1]
    context.end_call()
    next_token = logits.argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    timing.prefill_s.append(t1 - t0)
    position = torch.full((B, 1), P - 1, dtype=torch.long, device=device)
    for _ in range(new_tokens - 1):
        attention = torch.cat([attention, attention.new_ones(B, 1)], dim=1)
        position = position + 1
        context.valid = torch.ones(B, dtype=torch.bool, device=device)
        context.phase = "decode"
        logits = model(input_ids=next_token[:, None], attention_mask=attention, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        context.end_call()
        next_token = logits.argmax(-1)
        timing.decode_steps += 1
    _sync(device)
    timing.decode_s.append(time.perf_counter() - t1)
    timing.generated_tokens = B * new_tokens
    timing.decode_tokens = B * (new_tokens - 1)
    context.valid = None
    context.phase = None
    return timing
