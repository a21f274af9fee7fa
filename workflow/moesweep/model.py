"""Loading a checkpoint and reaching its MoE layers through a per-family adapter.

The adapter is the only place that knows where a family keeps its router and fused expert tensors; the
routing, precision and calibration code talk to it. Adding an HF MoE family = writing one adapter.

Supported (transformers 5.17 implementations; every one keeps its routed experts as fused 3-D tensors
`gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] dispatched through `@use_experts_implementation`, so the
project's sparse experts forward, calibration observer and precision maps work on all of them unchanged):

* qwen3_moe  — softmax top-k router `mlp.gate`; `norm_topk_prob` from the config.
* qwen2_moe  — the same router, plus a shared expert (`mlp.shared_expert`, gated by `mlp.shared_expert_gate`)
               that every token goes through. The adapter never hands it out: routing policies cannot drop it and
               precision maps, quantization, calibration and byte budgets cover routed experts only, so it stays at
               the checkpoint's precision. Dense layers (`mlp_only_layers`, `decoder_sparse_step`) are skipped.
* olmoe      — softmax top-k router `mlp.gate`; `norm_topk_prob` from the config (OLMoE-1B-7B: false).
* mixtral    — softmax top-k router `mlp.gate` that always renormalises the k weights and returns them in
               float32 (not cast to the logits' dtype); the adapter reproduces both.
* phimoe     — Phi-3.5-MoE's sparsemixer router `mlp.router`, exactly two experts; see moesweep.sparsemixer for
               how each routing policy maps onto it.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checks import PHIMOE_TOP_K, SUPPORTED_MODEL_TYPES, ConfigError, check_family_config, read_local_model_config
from .routing import PolicyRouter, RoutingContext, sparse_experts_forward
from .sparsemixer import SparseMixerPolicyRouter

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


class MoeAdapter:
    """A family whose decoder layers' `mlp` is either dense or a sparse block holding a router at `router_attr`
    (weight [E, H], no bias) and `experts` with fused tensors, `act_fn` and `num_experts`."""

    model_types: tuple[str, ...] = ()
    projections = ("gate_up_proj", "down_proj")
    router_attr = "gate"
    experts_attr = "num_experts"  # config attribute holding E (read through the config class's attribute_map)
    weights_dtype: torch.dtype | None = None  # dtype the family's router returns weights in (None: the logits')
    # How the family's checkpoint files name the block, its router and the per-expert projections (gate, up,
    # down). from_pretrained converts them (transformers' conversion_mapping); the layer-by-layer path
    # (layerwise.py) reads shards itself and asks `checkpoint_key` / these names.
    checkpoint_block = "mlp"
    checkpoint_router = "gate"
    checkpoint_expert_projections = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.num_experts = getattr(cfg, self.experts_attr)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = self.native_norm(cfg)

    def native_norm(self, cfg) -> bool:
        """Whether the family's router renormalises its k weights to sum 1."""
        return bool(cfg.norm_topk_prob)

    def layers(self) -> list[MoeLayer]:
        out = []
        for i, layer in enumerate(self.model.model.layers):
            block = layer.mlp
            if not (hasattr(block, "experts") and hasattr(block, self.router_attr)):
                continue  # a dense layer
            self._check_experts(i, block.experts)
            out.append(MoeLayer(i, block, getattr(block, self.router_attr), block.experts))
        return out

    def _check_experts(self, index: int, experts: nn.Module) -> None:
        """The fused layout every stage relies on; another layout (a future transformers) must fail here, clearly."""
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        E = self.num_experts
        if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
                and gu.shape[0] == dn.shape[0] == E and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]
                and getattr(experts, "num_experts", None) == E and hasattr(experts, "act_fn")):
            raise ModelError(f"layer {index}: {type(experts).__name__} does not hold {E} fused experts as "
                             f"gate_up_proj [E, 2I, H] and down_proj [E, H, I] (transformers 5.17's layout)")

    def make_router(self, layer: MoeLayer, policy, context: RoutingContext, skip_beta: float | None) -> PolicyRouter:
        router = PolicyRouter(layer.router.weight, self.top_k, self.norm_topk_prob, layer.index, policy, context,
                              skip_beta)
        router.weights_dtype = self.weights_dtype
        return router

    def install_router(self, layer: MoeLayer, router: nn.Module) -> None:
        setattr(layer.block, self.router_attr, router)
        layer.router = router

    @classmethod
    def checkpoint_key(cls, key: str) -> str:
        """A decoder layer's state-dict key (e.g. 'mlp.router.weight') as the family's checkpoint names it
        ('block_sparse_moe.gate.weight' for phimoe). Fused expert tensors are not covered (per-expert in files)."""
        if not key.startswith("mlp."):
            return key
        rest = key[len("mlp."):]
        if rest.startswith(cls.router_attr + "."):
            rest = cls.checkpoint_router + rest[len(cls.router_attr):]
        return f"{cls.checkpoint_block}.{rest}"


class Qwen3MoeAdapter(MoeAdapter):
    model_types = ("qwen3_moe",)


class Qwen2MoeAdapter(MoeAdapter):
    # The shared expert and its gate stay in the block, outside layers()' experts: never routed, never quantized.
    model_types = ("qwen2_moe",)


class OlmoeAdapter(MoeAdapter):
    model_types = ("olmoe",)


class MixtralAdapter(MoeAdapter):
    model_types = ("mixtral",)
    checkpoint_block = "block_sparse_moe"
    checkpoint_expert_projections = ("w1", "w3", "w2")
    weights_dtype = torch.float32  # MixtralTopKRouter does not cast its weights back to the logits' dtype

    def native_norm(self, cfg) -> bool:
        return True  # MixtralTopKRouter always divides the top-k weights by their sum; the config has no switch


class PhimoeAdapter(MoeAdapter):
    model_types = ("phimoe",)
    router_attr = "router"
    experts_attr = "num_local_experts"
    checkpoint_block = "block_sparse_moe"
    checkpoint_expert_projections = ("w1", "w3", "w2")

    def __init__(self, model):
        super().__init__(model)
        if self.top_k != PHIMOE_TOP_K:
            raise ModelError(f"phimoe with num_experts_per_tok={self.top_k}: transformers' sparsemixer router always "
                             f"selects exactly {PHIMOE_TOP_K} experts; allowed: {PHIMOE_TOP_K}")
        self.jitter_eps = float(model.config.router_jitter_noise)

    def native_norm(self, cfg) -> bool:
        return False  # sparsemixer's multipliers are not renormalised

    def make_router(self, layer, policy, context, skip_beta):
        return SparseMixerPolicyRouter(layer.router.weight, self.top_k, self.norm_topk_prob, layer.index, policy,
                                       context, skip_beta, jitter_eps=self.jitter_eps)


ADAPTERS = {t: a for a in (Qwen3MoeAdapter, Qwen2MoeAdapter, OlmoeAdapter, MixtralAdapter, PhimoeAdapter)
            for t in a.model_types}


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
        cfg = AutoConfig.from_pretrained(model_id, revision=revision)
    except OSError as err:
        raise ModelError(f"model.id {model_id!r}: cannot read its config.json ({err})") from None
    if cfg.model_type in ADAPTERS:  # the checks local dirs got at DAG time, before any weight is downloaded
        try:
            check_family_config(cfg.to_dict(), f"model.id {model_id!r}")
        except ConfigError as err:
            raise ModelError(str(err)) from None
    return cfg.model_type


def resolve_device(device: str | None, key: str = "device") -> str:
    """`auto` (or unset) = CUDA when present, else the CPU; an explicit CUDA device without CUDA is an error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{key}: device {device!r} requested but CUDA is not available on this machine")
    return device


def adapter_class(model_id: str, revision: str | None = None, trust_remote_code: bool = False):
    """The family adapter of a supported MoE checkpoint, decided from its config before any weight is read."""
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on for {model_id}: code from the checkpoint will run", stacklevel=3)
    model_type = read_model_type(model_id, revision)
    if model_type not in ADAPTERS:
        raise ModelError(f"model.id {model_id!r} has model_type {model_type!r}, which is not a supported MoE family; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return ADAPTERS[model_type]


def attach_adapter(cls, model, model_id: str):
    """`cls(model)`, refusing a checkpoint without MoE layers (nothing to route, calibrate or profile)."""
    adapter = cls(model)
    if not adapter.layers():
        raise ModelError(f"model.id {model_id!r}: no MoE layers found")
    return adapter


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, left-padding (batched greedy decoding and calibration batches alike)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.id {model_id!r}: tokenizer missing or unreadable ({err})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_id: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
               trust_remote_code: bool = False):
    """Return (model, tokenizer, adapter) for a supported MoE checkpoint (local path or hub id)."""
    from transformers import AutoModelForCausalLM

    cls = adapter_class(model_id, revision, trust_remote_code)
    tokenizer = load_tokenizer(model_id, revision, trust_remote_code)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, tokenizer, attach_adapter(cls, model, model_id)


def install_policy(adapter, policy, context: RoutingContext, skip_betas: dict[int, float] | None = None) -> None:
    """Replace every router by a PolicyRouter and switch experts to the sentinel-aware implementation."""
    _register_experts_implementation()
    adapter.model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for layer in adapter.layers():
        layer.experts.moesweep_layer = layer.index
        beta = (skip_betas or {}).get(layer.index)
        adapter.install_router(layer, adapter.make_router(layer, policy, context, beta))


def model_fingerprint(model_id: str) -> dict:
    """What identifies a checkpoint in artefact metadata: its id and, for local dirs, its config.json."""
    cfg_path = Path(model_id) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    # Expert shape and routing keys of every supported family (absent ones are recorded as None).
    keys = ("model_type", "num_hidden_layers", "hidden_size", "moe_intermediate_size", "intermediate_size",
            "shared_expert_intermediate_size", "num_local_experts", "num_experts", "num_experts_per_tok",
            "norm_topk_prob", "router_jitter_noise", "vocab_size")
    return {"model_id": str(model_id), **{k: cfg.get(k) for k in keys}}
