"""Quantize every expert projection of a model, one layer at a time."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .core import QuantizedExperts, QuantSpec, quantize_experts

PROJECTIONS = ("gate_up_proj", "down_proj")


def quantize_model_experts(expert_weights: Mapping[int, Mapping[str, torch.Tensor]],
                           hessians: Mapping[int, Mapping[str, torch.Tensor]] | None,
                           token_counts: Mapping[int, torch.Tensor] | None,
                           spec: QuantSpec,
                           on_layer: Callable[[int, dict[str, QuantizedExperts]], None] | None = None,
                           ) -> dict[str, QuantizedExperts]:
    """{layer: {proj: [E, out, in]}} -> {"layers.{layer}.{proj}": QuantizedExperts}.

    Peak memory: layers are processed in order and only the packed result is kept, so besides what the
    caller holds, the peak is one projection's float32 working set (weight copy + normalised Hessians +
    GPTQ scratch, about 3x weight + 1x Hessians of that projection), never a second copy of the model.
    Pass lazy mappings (e.g. reading each layer from safetensors on access) to avoid holding the float
    weights of all layers at once; the packed result is ~bits/16 of the bf16 expert weights.
    `token_counts[layer]` is [E] (gate_up and down see the same routed tokens); `on_layer` is called
    after each layer (progress logging, per-layer error checks).
    """
    out: dict[str, QuantizedExperts] = {}
    for layer in sorted(expert_weights):
        done = {}
        for proj in PROJECTIONS:
            if proj not in expert_weights[layer]:
                continue
            hessian = None if hessians is None else hessians[layer][proj]
            counts = None if token_counts is None else token_counts[layer]
            done[f"layers.{layer}.{proj}"] = quantize_experts(expert_weights[layer][proj], hessian, counts, spec)
        out.update(done)
        if on_layer is not None:
            on_layer(layer, done)
    return out
