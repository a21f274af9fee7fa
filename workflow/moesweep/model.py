"""Loading a checkpoint and reaching its MoE layers through a per-family adapter.

The adapter is the only place that knows where a family keeps its router and fused expert tensors; the
routing, precision and calibration code talk to it. Adding an HF MoE family = writing one adapter.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checks import ConfigError, read_local_model_config
from .routing import PolicyRouter, RoutingContext, sparse_experts_forward

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "moesweep_sparse"


class ModelError(ValueError):
    """The configured model cannot be used; the message names it and what is supported."""


@dataclass
class MoeLayer:
    index: int  # decoder layer index
    block: nn.Module  # the sparse MoE block
    router: nn.Module
    experts: nn.Module  # holds fused gate_up_proj [E, 2I, H] and down_proj [E, H, I]


class Qwen3MoeAdapter:
    model_types = ("qwen3_moe",)
    projections = ("gate_up_proj", "down_proj")

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = bool(cfg.norm_topk_prob)

    def layers(self) -> list[MoeLayer]:
        out = []
        for i, layer in enumerate(self.model.model.layers):
            mlp = layer.mlp
            if hasattr(mlp, "experts") and hasattr(mlp, "gate"):
                out.append(MoeLayer(i, mlp, mlp.gate, mlp.experts))
        return out

    def install_router(self, layer: MoeLayer, router: nn.Module) -> None:
        layer.block.gate = router
        layer.router = router


ADAPTERS = {t: a for a in (Qwen3MoeAdapter,) for t in a.model_types}


def _register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, sparse_experts_forward)


def read_model_type(model_id: str, revision: str | None = None) -> str:
    """model_type of a local dir (checked by checks.read_local_model_config) or a hub id, before loading weights."""
    from transformers import AutoConfig

    try:
        local = read_local_model_config(model_id)
    except ConfigError as err:
        raise ModelError(str(err)) from None
    if local is not None:
        return local["model_type"]
    try:
        return AutoConfig.from_pretrained(model_id, revision=revision).model_type
    except OSError as err:
        raise ModelError(f"model.id {model_id!r}: cannot read its config.json ({err})") from None


def load_model(model_id: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
               trust_remote_code: bool = False):
    """Return (model, tokenizer, adapter) for a supported MoE checkpoint (local path or hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on for {model_id}: code from the checkpoint will run", stacklevel=2)
    model_type = read_model_type(model_id, revision)
    if model_type not in ADAPTERS:
        raise ModelError(f"model.id {model_id!r} has model_type {model_type!r}, which is not a supported MoE family; "
                         f"supported: {', '.join(sorted(ADAPTERS))}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.id {model_id!r}: tokenizer missing or unreadable ({err})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    model.to(device).eval()
    adapter = ADAPTERS[model_type](model)
    if not adapter.layers():
        raise ModelError(f"model.id {model_id!r}: no MoE layers found")
    return model, tokenizer, adapter


def install_policy(adapter, policy, context: RoutingContext, skip_betas: dict[int, float] | None = None) -> None:
    """Replace every router by a PolicyRouter and switch experts to the sentinel-aware implementation."""
    _register_experts_implementation()
    adapter.model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for layer in adapter.layers():
        layer.experts.moesweep_layer = layer.index
        weight = layer.router.weight
        beta = (skip_betas or {}).get(layer.index)
        adapter.install_router(layer, PolicyRouter(weight, adapter.top_k, adapter.norm_topk_prob, layer.index,
                                                   policy, context, beta))


def model_fingerprint(model_id: str) -> dict:
    """What identifies a checkpoint in artefact metadata: its id and, for local dirs, its config.json."""
    cfg_path = Path(model_id) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    keys = ("model_type", "num_hidden_layers", "hidden_size", "moe_intermediate_size", "num_local_experts",
            "num_experts", "num_experts_per_tok", "vocab_size")
    return {"model_id": str(model_id), **{k: cfg.get(k) for k in keys}}
