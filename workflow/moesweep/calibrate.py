"""Calibration and hotness profiling: teacher-forced passes over text, observing routers and experts.

Calibration stores, per layer and expert, the unnormalised input Hessians GPTQ needs (X^T X of the hidden
states routed to the expert for `gate_up_proj`, and of the intermediate activations for `down_proj`) with
token counts, plus per-layer routing statistics (β for dynamic skipping = median of w_2/w_1).
Profiling counts, per layer and expert, how often it is selected and the routing probability mass it gets.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .grid import Routing
from .model import install_policy
from .routing import RoutingContext

log = logging.getLogger(__name__)


def _batches(tokenizer, texts: list, max_length: int, batch_size: int, device: str):
    """Batches of (input_ids, attention_mask, position_ids), left-padded. A sample is a string (tokenized,
    truncated to max_length) or a list of token ids (a plain-text calibration chunk, used as is)."""
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if all(isinstance(t, str) for t in chunk):
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False)
        else:
            enc = tokenizer.pad({"input_ids": [list(t) for t in chunk]}, return_tensors="pt", padding=True)
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


class _Accumulator:
    """Per-expert Hessians, token counts and β ratios of one calibration set, filled layer by layer or all
    at once; the same code serves the whole-model and the layer-by-layer pass, so both sum the same
    float64 products in the same order."""

    def __init__(self, E: int, context: RoutingContext, expert_inputs: str):
        if expert_inputs not in ("routed", "all"):
            raise ValueError(f"expert_inputs must be 'routed' or 'all', got {expert_inputs!r}")
        self.E, self.context, self.expert_inputs = E, context, expert_inputs
        self.hess: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.ratios: dict[int, list] = {}
        self._handles: dict[int, object] = {}

    def observer(self, layer_idx, expert, x, h):
        for name, act in (("gate_up_proj", x), ("down_proj", h)):
            key = (layer_idx, name)
            if key not in self.hess:
                self.hess[key] = torch.zeros(self.E, act.shape[1], act.shape[1], dtype=torch.float64, device=act.device)
            a = act.double()
            self.hess[key][expert] += a.T @ a
        self.counts[layer_idx][expert] += x.shape[0]

    def _all_tokens_hook(self, module, args):
        x = args[0][self.context.valid] if self.context.valid is not None else args[0]
        for e in range(self.E):
            gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            self.observer(module.moesweep_layer, e, x, module.act_fn(gate) * up)

    def attach(self, adapter, layer) -> None:
        self.counts.setdefault(layer.index, torch.zeros(self.E, dtype=torch.long))
        self.ratios.setdefault(layer.index, [])
        if self.expert_inputs == "routed":
            layer.experts.moesweep_observer = self.observer
        else:
            self._handles[layer.index] = layer.experts.register_forward_pre_hook(self._all_tokens_hook)
        adapter.install_router(layer, _RouterObserver(layer.router, self.ratios[layer.index]))

    def detach(self, adapter, layer) -> None:
        handle = self._handles.pop(layer.index, None)
        if handle is not None:
            handle.remove()
        layer.experts.moesweep_observer = None
        if isinstance(layer.router, _RouterObserver):
            adapter.install_router(layer, layer.router.inner)

    def layer_hessians(self, layer, device="cpu") -> dict[str, torch.Tensor]:
        """Finished float32 Hessians of one layer ("layers.i.proj" -> [E, d, d]); frees the float64 sums.
        An expert no calibration token reached still gets an all-zero Hessian of the right shape."""
        out = {}
        for name, dim in (("gate_up_proj", layer.experts.gate_up_proj.shape[2]),
                          ("down_proj", layer.experts.down_proj.shape[2])):
            h = self.hess.pop((layer.index, name), None)
            out[f"layers.{layer.index}.{name}"] = (h.float().to(device) if h is not None
                                                   else torch.zeros(self.E, dim, dim, device=device))
        return out

    def beta(self, index: int) -> float:
        return float(torch.cat(self.ratios[index]).median())


@torch.inference_mode()
def collect_calibration(model, tokenizer, adapter, texts: list, max_length: int, batch_size: int = 8,
                        device: str = "cpu", progress=None, expert_inputs: str = "routed") -> CalibrationResult:
    """One teacher-forced pass of the whole model with native routing; Hessians accumulated in float64 for
    stability, stored in float32. (The stages use collect_calibration_layerwise, which gives the same
    numbers without loading the model; this is its reference.)

    expert_inputs: "routed" = each expert's Hessians from the tokens routed to it (rare experts see few);
    "all" = every calibration token through every expert (as MoE-specific PTQ work does), while the layer's
    output still uses the native routing, so later layers see the real distribution.
    """
    context = RoutingContext()
    acc = _Accumulator(adapter.num_experts, context, expert_inputs)
    install_policy(adapter, Routing("native"), context)
    layers = adapter.layers()
    for l in layers:
        acc.attach(adapter, l)
    total = 0
    try:
        batches = _batches(tokenizer, texts, max_length, batch_size, device)
        for input_ids, attention, position in (progress(batches) if progress else batches):
            context.valid = attention.bool().reshape(-1)
            model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False)
            total += int(attention.sum())
    finally:
        for l in adapter.layers():
            acc.detach(adapter, l)
    hessians = {}
    for l in adapter.layers():
        hessians.update(acc.layer_hessians(l))
    return CalibrationResult(hessians, {f"layers.{i}": c for i, c in acc.counts.items()},
                             {l.index: acc.beta(l.index) for l in layers}, total)


@torch.inference_mode()
def collect_calibration_layerwise(runners: dict, adapter, expert_inputs: str = "routed", on_layer=None,
                                  progress=None, keep: bool = True) -> dict[str, CalibrationResult]:
    """Calibration of several sample sets (e.g. {"calibration": ..., "heldout": ...}) in one layer-by-layer
    pass over a skeleton model (layerwise.LayerwiseModel per set, all sharing `adapter`'s skeleton; the layer
    loop is layerwise.run_layerwise).

    Each decoder layer is materialised once, every set's batches run through it, and its Hessians are
    finished before the next layer loads. `on_layer(layer, module, {set: {"layers.i.proj": H}}, {set: counts})`
    is called while the layer's weights are still on the device (the fused quantize stage quantizes
    there); with keep=False the Hessians are not kept in the result (only counts, β and token totals).
    Gives the same numbers as collect_calibration on each set (tested).
    """
    from .layerwise import run_layerwise

    contexts = {name: RoutingContext() for name in runners}
    accs = {name: _Accumulator(adapter.num_experts, contexts[name], expert_inputs) for name in runners}
    results = {name: CalibrationResult({}, {}, {}, r.tokens) for name, r in runners.items()}
    layer_hess: dict[str, dict[str, torch.Tensor]] = {}

    @contextmanager
    def observe(name, moe):
        accs[name].attach(adapter, moe)
        try:
            yield
        finally:
            accs[name].detach(adapter, moe)
        # Finished right after this set's forward, not after all sets: only one set's float64 sums are
        # alive at a time (for Qwen3-30B-A3B 4.9 GB per layer and set).
        layer_hess[name] = accs[name].layer_hessians(moe, runners[name].device)
        results[name].token_counts[f"layers.{moe.index}"] = accs[name].counts[moe.index]
        results[name].skip_beta[moe.index] = accs[name].beta(moe.index)

    def finish(moe):
        if on_layer is not None:
            on_layer(moe, layer_hess, {n: accs[n].counts[moe.index] for n in runners})
        if keep:
            for name in runners:
                results[name].hessians.update({k: v.cpu() for k, v in layer_hess[name].items()})
        layer_hess.clear()

    run_layerwise(runners, adapter, contexts, observe, finish, progress)
    return results


class _Hotness:
    """Routed probability mass per (layer, expert): a routing-context observer that sees the selected experts'
    router probabilities (before top-k renormalisation) the PolicyRouters already computed, as dynamic precision
    does; selections and tokens come from the context's own accounting. The same code serves the whole-model
    and the layer-by-layer pass, so both add the same float64 numbers in the same order."""

    def __init__(self, E: int, context: RoutingContext):
        self.E, self.context = E, context
        self.mass: dict[int, torch.Tensor] = {}
        context.observers.append(self)

    def observe(self, layer: int, index: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> None:
        # keep already excludes padding and dropped assignments (route() applies context.valid)
        mass = self.mass.setdefault(layer, torch.zeros(self.E, dtype=torch.float64))
        mass.index_add_(0, index[keep].cpu(), probs[keep].double().cpu())

    def end_call(self) -> None:
        pass

    def rows(self) -> list[dict]:
        rows = []
        for layer, stats in sorted(self.context.stats.items()):
            sel = stats.load.double()
            m = self.mass[layer]
            rank = torch.argsort(torch.argsort(-m, stable=True))  # 0 = hottest
            for e in range(self.E):
                rows.append({"layer": layer, "expert": e, "selections": int(sel[e]),
                             "selection_share": float(sel[e] / sel.sum()), "prob_mass": float(m[e]),
                             "prob_share": float(m[e] / m.sum()), "hotness_rank": int(rank[e]),
                             "tokens": stats.tokens})
        return rows


@torch.inference_mode()
def profile_hotness(model, tokenizer, adapter, texts: list[str], max_length: int, batch_size: int = 8,
                    device: str = "cpu") -> list[dict]:
    """Selections and routed probability mass per (layer, expert) under native routing, over valid tokens, in
    one pass of the whole model. (The profile stage uses profile_hotness_layerwise, which gives the same rows
    without loading the model; this is its reference.)"""
    context = RoutingContext()
    install_policy(adapter, Routing("native"), context)
    hot = _Hotness(adapter.num_experts, context)
    for input_ids, attention, position in _batches(tokenizer, texts, max_length, batch_size, device):
        context.valid = attention.bool().reshape(-1)
        model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False)
    return hot.rows()


@torch.inference_mode()
def profile_hotness_layerwise(runner, adapter, progress=None) -> list[dict]:
    """profile_hotness's rows from a layer-by-layer pass (layerwise.run_layerwise) over `runner`'s batches
    (a LayerwiseModel on `adapter`'s skeleton): the model is never loaded whole. Same rows, same numbers
    (tested against profile_hotness)."""
    from .layerwise import run_layerwise

    context = RoutingContext()
    hot = _Hotness(adapter.num_experts, context)
    run_layerwise({"profile": runner}, adapter, {"profile": context}, progress=progress)
    return hot.rows()
