"""Calibration and hotness profiling: teacher-forced passes over text, observing routers and experts.

Calibration stores, per layer and expert, the unnormalised input Hessians GPTQ needs (X^T X of the hidden
states routed to the expert for `gate_up_proj`, and of the intermediate activations for `down_proj`) with
token counts, plus per-layer routing statistics (β for dynamic skipping = median of w_2/w_1).
Profiling counts, per layer and expert, how often it is selected and the routing probability mass it gets.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .grid import Routing
from .model import install_policy
from .routing import RoutingContext

log = logging.getLogger(__name__)


def _batches(tokenizer, texts: list[str], max_length: int, batch_size: int, device: str):
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)
        attention = enc.attention_mask.to(device)
        position = (attention.cumsum(-1) - 1).clamp_min(0)
        yield enc.input_ids.to(device), attention, position


@dataclass
class CalibrationResult:
    hessians: dict[str, torch.Tensor]  # "layers.{i}.gate_up_proj" [E, H, H], "layers.{i}.down_proj" [E, I, I]
    token_counts: dict[str, torch.Tensor]  # "layers.{i}" [E] int64
    skip_beta: dict[int, float]  # per layer median of w_2 / w_1 (native routing)
    tokens: int


class _RouterObserver(torch.nn.Module):
    """Wraps a PolicyRouter to record the ratio w_2/w_1 of every valid token (for β)."""

    def __init__(self, inner, sink: list):
        super().__init__()
        self.inner, self.sink = inner, sink

    def forward(self, hidden_states):
        logits, weights, index = self.inner(hidden_states)
        probs = torch.softmax(logits.float(), dim=-1)
        top2 = probs.topk(2, dim=-1).values
        valid = self.inner.context.valid
        ratio = top2[:, 1] / top2[:, 0]
        self.sink.append(ratio[valid] if valid is not None else ratio)
        return logits, weights, index


@torch.inference_mode()
def collect_calibration(model, tokenizer, adapter, texts: list[str], max_length: int, batch_size: int = 8,
                        device: str = "cpu", progress=None, expert_inputs: str = "routed") -> CalibrationResult:
    """One teacher-forced pass with native routing; Hessians accumulated in float64 for stability, stored in float32.

    expert_inputs: "routed" = each expert's Hessians from the tokens routed to it (rare experts see few);
    "all" = every calibration token through every expert (as MoE-specific PTQ work does), while the layer's
    output still uses the native routing, so later layers see the real distribution.
    """
    if expert_inputs not in ("routed", "all"):
        raise ValueError(f"expert_inputs must be 'routed' or 'all', got {expert_inputs!r}")
    context = RoutingContext()
    install_policy(adapter, Routing("native"), context)
    layers = adapter.layers()
    E = adapter.num_experts
    hess: dict[tuple[int, str], torch.Tensor] = {}
    counts = {l.index: torch.zeros(E, dtype=torch.long) for l in layers}
    ratios: dict[int, list] = {l.index: [] for l in layers}

    def observer(layer_idx, expert, x, h):
        for name, act in (("gate_up_proj", x), ("down_proj", h)):
            key = (layer_idx, name)
            if key not in hess:
                hess[key] = torch.zeros(E, act.shape[1], act.shape[1], dtype=torch.float64, device=act.device)
            a = act.double()
            hess[key][expert] += a.T @ a
        counts[layer_idx][expert] += x.shape[0]

    def all_tokens_hook(module, args):
        x = args[0][context.valid] if context.valid is not None else args[0]
        for e in range(E):
            gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            observer(module.moesweep_layer, e, x, module.act_fn(gate) * up)

    handles = []
    for l in layers:
        if expert_inputs == "routed":
            l.experts.moesweep_observer = observer
        else:
            handles.append(l.experts.register_forward_pre_hook(all_tokens_hook))
        adapter.install_router(l, _RouterObserver(l.router, ratios[l.index]))
    total = 0
    try:
        batches = _batches(tokenizer, texts, max_length, batch_size, device)
        for input_ids, attention, position in (progress(batches) if progress else batches):
            context.valid = attention.bool().reshape(-1)
            model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False)
            total += int(attention.sum())
    finally:
        for h in handles:
            h.remove()
        for l in adapter.layers():
            l.experts.moesweep_observer = None
            adapter.install_router(l, l.router.inner)
    hessians = {f"layers.{i}.{name}": h.float().cpu() for (i, name), h in sorted(hess.items())}
    # An expert no calibration token reached still gets an all-zero Hessian of the right shape.
    for l in layers:
        for name, dim in (("gate_up_proj", l.experts.gate_up_proj.shape[2]), ("down_proj", l.experts.down_proj.shape[2])):
            hessians.setdefault(f"layers.{l.index}.{name}", torch.zeros(E, dim, dim))
    betas = {i: float(torch.cat(r).median()) for i, r in ratios.items()}
    return CalibrationResult(hessians, {f"layers.{i}": c for i, c in counts.items()}, betas, total)


@torch.inference_mode()
def profile_hotness(model, tokenizer, adapter, texts: list[str], max_length: int, batch_size: int = 8,
                    device: str = "cpu") -> list[dict]:
    """Selections and routed probability mass per (layer, expert) under native routing, over valid tokens."""
    context = RoutingContext()
    install_policy(adapter, Routing("native"), context)
    E = adapter.num_experts
    mass = {l.index: torch.zeros(E, dtype=torch.float64) for l in adapter.layers()}

    def hook(layer_idx):
        def fn(module, args, output):
            logits, _, index = output
            # Mass = the router's probability of each selected expert (before top-k renormalisation).
            probs = torch.softmax(logits.float(), dim=-1).gather(1, index.clamp_max(E - 1))
            valid = context.valid
            keep = index < E
            if valid is not None:
                keep &= valid[:, None]
            mass[layer_idx].index_add_(0, index[keep].cpu(), probs[keep].double().cpu())
        return fn

    handles = [l.router.register_forward_hook(hook(l.index)) for l in adapter.layers()]
    try:
        for input_ids, attention, position in _batches(tokenizer, texts, max_length, batch_size, device):
            context.valid = attention.bool().reshape(-1)
            model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for layer, stats in sorted(context.stats.items()):
        sel = stats.load.double()
        m = mass[layer]
        rank = torch.argsort(torch.argsort(-m, stable=True))  # 0 = hottest
        for e in range(E):
            rows.append({"layer": layer, "expert": e, "selections": int(sel[e]),
                         "selection_share": float(sel[e] / sel.sum()), "prob_mass": float(m[e]),
                         "prob_share": float(m[e] / m.sum()), "hotness_rank": int(rank[e]),
                         "tokens": stats.tokens})
    return rows
