"""Running a checkpoint one decoder layer at a time, with weights read lazily from its safetensors shards.

Why: the calibrate and quantize stages need every expert's inputs and weights, not the model's output.
Loading Qwen3-30B-A3B whole (61 GB in bf16, twice that in fp32) is what kept them off one GPU. Here the
model exists only as a skeleton on the `meta` device (module structure and config, no memory); the
calibration set's hidden states are kept between layers, and each decoder layer in turn is read from the
shards (safetensors `safe_open`, tensor by tensor), moved to the device, run over every batch, and dropped.
Peak memory = one layer's weights + the hidden states of the calibration set + what the caller keeps per
layer (Hessians, quantization scratch). `run_layerwise` is the one layer loop every stage drives (calibrate,
the fused quantize job, profile); each attaches its own observers to the MoE layer while the batches run.

Exactness: the layer modules, the causal mask (`create_causal_mask`), the rotary embedding, the routers
(PolicyRouter) and the experts forward (moesweep's sparse implementation) are the very ones the whole-model
path runs, over the same batches in the same order, so on one device the hidden states and everything
accumulated from them are bit-identical to a whole-model pass (tested on the CPU).

Checkpoint layouts: transformers 5 keeps Qwen3-MoE experts fused ([E, 2I, H] gate_up, [E, H, I] down) but
saves, and the hub checkpoints hold, one tensor per expert and projection (`experts.{e}.gate_proj.weight`,
`up_proj`, `down_proj`). Both are read; per-expert tensors are merged as transformers merges them
(gate rows first, then up rows).
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXPERT_KEYS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class CheckpointError(ValueError):
    """A checkpoint directory lacks a tensor or a file the layer-by-layer path needs."""


def resolve_checkpoint_dir(model_id: str, revision: str | None = None) -> Path:
    """A local directory as is; a hub id through the hub cache (config, shards, index, tokenizer files)."""
    from .checks import is_local

    if is_local(model_id):
        root = Path(model_id).expanduser()
        if not root.is_dir():
            raise CheckpointError(f"model.id {model_id!r}: no such directory")
        return root
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


class LazyCheckpoint:
    """Tensor-by-tensor access to a safetensors checkpoint (one file or a sharded index); nothing is
    read until asked for, and every read opens the shard for just that call, so no mapping stays open."""

    def __init__(self, model_id: str, revision: str | None = None, layout=None):
        from .model import MoeAdapter

        self.model_id = model_id
        # The family's adapter class: how its files name the MoE block, router and per-expert projections
        # (Mixtral/Phi-MoE: block_sparse_moe, w1/w3/w2). None = module names with gate/up/down_proj (Qwen).
        self.layout = layout or MoeAdapter
        self.root = resolve_checkpoint_dir(model_id, revision)
        index = self.root / "model.safetensors.index.json"
        single = self.root / "model.safetensors"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise CheckpointError(f"{self.root}: neither model.safetensors nor model.safetensors.index.json "
                                  f"(the layer-by-layer path reads safetensors checkpoints only)")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{self.root}: tensors missing from the checkpoint: {missing[:3]}"
                                  f"{' ...' if len(missing) > 3 else ''}")
        by_shard = defaultdict(list)
        for n in names:
            by_shard[self.weight_map[n]].append(n)
        out = {}
        for shard, shard_names in by_shard.items():
            with safe_open(str(self.root / shard), framework="pt") as f:
                for n in shard_names:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None else t
        return out

    def experts(self, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]} of one layer, fused as transformers fuses them."""
        prefix = f"model.layers.{layer}.mlp.experts"
        fused = [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
        if all(n in self for n in fused):
            t = self.read(fused, dtype)
            return {"gate_up_proj": t[fused[0]], "down_proj": t[fused[1]]}
        prefix = f"model.layers.{layer}.{self.layout.checkpoint_block}.experts"
        g, u, d = self.layout.checkpoint_expert_projections
        n_experts = 0
        while f"{prefix}.{n_experts}.{d}.weight" in self:
            n_experts += 1
        if n_experts == 0:
            raise CheckpointError(f"{self.root}: layer {layer} has neither fused nor per-expert expert tensors")
        names = [f"{prefix}.{e}.{p}.weight" for e in range(n_experts) for p in (g, u, d)]
        t = self.read(names, dtype)
        gate_up = torch.stack([torch.cat([t[f"{prefix}.{e}.{g}.weight"], t[f"{prefix}.{e}.{u}.weight"]])
                               for e in range(n_experts)])
        down = torch.stack([t[f"{prefix}.{e}.{d}.weight"] for e in range(n_experts)])
        return {"gate_up_proj": gate_up, "down_proj": down}

    def layer_state(self, layer: int, keys, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """State dict of decoder layer `layer` for the module keys `keys` (its own state_dict's keys)."""
        prefix = f"model.layers.{layer}."
        plain = [k for k in keys if k not in EXPERT_KEYS]
        # by name: read() returns tensors grouped by shard, not in the order asked for
        names = {k: prefix + self.layout.checkpoint_key(k) for k in plain}
        tensors = self.read(list(names.values()), dtype)
        state = {k: tensors[n] for k, n in names.items()}
        if any(k in EXPERT_KEYS for k in keys):
            ex = self.experts(layer, dtype)
            state["mlp.experts.gate_up_proj"], state["mlp.experts.down_proj"] = ex["gate_up_proj"], ex["down_proj"]
        return state


def skeleton(model_id: str, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False):
    """(checkpoint, model on the meta device, adapter): the model's structure without any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import adapter_class, attach_adapter

    cls = adapter_class(model_id, revision, trust_remote_code)
    ckpt = LazyCheckpoint(model_id, revision, cls)
    config = AutoConfig.from_pretrained(str(ckpt.root), trust_remote_code=trust_remote_code)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    return ckpt, model, attach_adapter(cls, model, model_id), torch_dtype


def _mask_functions(config, num_layers: int) -> tuple[list[str], dict]:
    """(attention kind of each decoder layer, {kind: transformers mask function}), chosen as each family's
    own model forward chooses. A config with `layer_types` (Qwen2-MoE) maps every layer to a full or a
    sliding-window mask; the others build one mask for all layers, sliding-window when `sliding_window` is set
    (Qwen3-MoE, Mixtral, Phi-MoE; OLMoE has no such key). Qwen2-MoE sets sliding_window = 0, not None, when
    sliding is off, so it must not take the second rule: its layer_types then say full attention everywhere."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kinds = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - kinds.keys())
        if unknown or len(layer_types) != num_layers:
            raise CheckpointError(f"config.layer_types {list(layer_types)!r}: the layer-by-layer path knows "
                                  f"{', '.join(kinds)} for each of the {num_layers} layers")
        return list(layer_types), {k: kinds[k] for k in dict.fromkeys(layer_types)}
    kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
    return [kind] * num_layers, {kind: kinds[kind]}


@dataclass
class _Batch:
    hidden: torch.Tensor  # [B, S, H] on the device
    masks: dict  # attention kind -> what its mask function returned (tensor or None)
    position: torch.Tensor
    rope: tuple  # (cos, sin)
    valid: torch.Tensor  # [B*S] bool: non-padding tokens


class LayerwiseModel:
    """The decoder stack of a skeleton model, run layer by layer over a fixed set of batches.

    `batches` yields (input_ids, attention_mask, position_ids) like calibrate._batches. The embedding is
    read once, applied, and dropped; each `run_layer` materialises one decoder layer, runs all batches
    through it (hidden states replaced in place) and frees it.
    """

    def __init__(self, ckpt: LazyCheckpoint, model, adapter, dtype: torch.dtype, batches, device: str = "cpu"):
        self.ckpt, self.model, self.adapter, self.dtype, self.device = ckpt, model, adapter, dtype, device
        config = model.config
        self.layer_masks, mask_fns = _mask_functions(config, len(model.model.layers))
        embed = ckpt.read(["model.embed_tokens.weight"], dtype)["model.embed_tokens.weight"].to(device)
        rotary = type(model.model.rotary_emb)(config=config).to(device)  # built on the CPU, moved: as from_pretrained
        self.batches: list[_Batch] = []
        with torch.inference_mode():
            for input_ids, attention, position in batches:
                hidden = torch.nn.functional.embedding(input_ids.to(device), embed)
                masks = {kind: fn(config=config, inputs_embeds=hidden, attention_mask=attention.to(device),
                                  past_key_values=None, position_ids=position.to(device))
                         for kind, fn in mask_fns.items()}
                self.batches.append(_Batch(hidden, masks, position.to(device), rotary(hidden, position.to(device)),
                                           attention.bool().reshape(-1).to(device)))
        del embed
        self.tokens = int(sum(b.valid.sum() for b in self.batches))

    def materialise(self, index: int):
        """Load decoder layer `index` from the checkpoint onto the device; returns the module."""
        layer = self.model.model.layers[index]
        keys = list(layer.state_dict().keys())
        layer.load_state_dict(self.ckpt.layer_state(index, keys, self.dtype), strict=True, assign=True)
        return layer.to(self.device)

    def release(self, index: int) -> None:
        self.model.model.layers[index].to("meta")

    @torch.inference_mode()
    def forward_layer(self, index: int, context=None) -> None:
        """Run every batch through the (materialised) layer `index`, replacing the kept hidden states."""
        layer = self.model.model.layers[index]
        kind = self.layer_masks[index]
        for b in self.batches:
            if context is not None:
                context.valid = b.valid
            b.hidden = layer(b.hidden, attention_mask=b.masks[kind], position_ids=b.position, past_key_values=None,
                             use_cache=False, position_embeddings=b.rope)

    def hidden_bytes(self) -> int:
        return sum(b.hidden.numel() * b.hidden.element_size() for b in self.batches)


def run_layerwise(runners: dict, adapter, contexts: dict, observe=None, on_layer=None, progress=None) -> None:
    """Run every set of batches (`runners`: name -> LayerwiseModel, all on `adapter`'s skeleton) through the
    whole decoder stack under native routing, one decoder layer at a time.

    Each layer is materialised once; every set's batches run through it in turn, and the layer is released
    before the next one loads (also when a caller's code raises). For an MoE layer, the router reads `valid`
    from `contexts[name]` while set `name` runs, and `observe(name, moe_layer)` (a context manager, or None)
    is entered around that set's forward: the caller attaches its hooks on entry, detaches them on exit, and
    may finish per-set work after the block (only reached when the forward succeeded). `on_layer(moe_layer)`
    is then called once, while the layer's weights are still on the device. Dense layers just run.
    """
    from .grid import Routing
    from .model import install_policy

    if not runners or runners.keys() != contexts.keys():
        raise ValueError(f"run_layerwise needs one routing context per sample set; sets {sorted(runners)}, "
                         f"contexts {sorted(contexts)}")
    # The routers become PolicyRouters under native routing: bit for bit the family's own router, plus the
    # routing accounting (context.stats) the profile reads.
    install_policy(adapter, Routing("native"), next(iter(contexts.values())))
    first = next(iter(runners.values()))
    moe_by_index = {l.index: l for l in adapter.layers()}
    indices = range(len(first.model.model.layers))
    for index in (progress(indices) if progress else indices):
        first.materialise(index)  # the sets share one skeleton: one materialised layer serves all of them
        moe = moe_by_index.get(index)
        try:
            for name, runner in runners.items():
                if moe is not None:
                    moe.router.context = contexts[name]
                with observe(name, moe) if (observe is not None and moe is not None) else nullcontext():
                    runner.forward_layer(index, contexts[name])
            if moe is not None and on_layer is not None:
                on_layer(moe)
        finally:
            first.release(index)


def write_random_checkpoint(out: str | Path, config, tokenizer_dir: str | Path, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, std: float = 0.02, router_std: float = 0.5) -> Path:
    """A random-weight checkpoint of `config` (e.g. a Qwen3MoeConfig with Qwen3-30B-A3B layer shapes) in
    the hub's per-expert layout, written one decoder layer per shard with an index, without ever building
    the model (benchmarks and tests of the layer-by-layer path at real shapes). Tokenizer files are copied
    from `tokenizer_dir`; config.vocab_size must fit that tokenizer."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale=std):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    weight_map = {}
    shards = {"model-embed.safetensors": {}}
    for name, p in meta_model.state_dict().items():
        if name.startswith("model.layers."):
            continue
        norm = name.endswith("norm.weight")
        shards["model-embed.safetensors"][name] = torch.ones(*p.shape, dtype=dtype) if norm else rand(p.shape)
    for i, layer in enumerate(meta_model.model.layers):
        shard = shards.setdefault(f"model-layer{i:03d}.safetensors", {})
        for name, p in layer.state_dict().items():
            key = f"model.layers.{i}.{name}"
            if name == "mlp.experts.gate_up_proj":
                for e in range(p.shape[0]):
                    half = p.shape[1] // 2
                    shard[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"] = rand((half, p.shape[2]))
                    shard[f"model.layers.{i}.mlp.experts.{e}.up_proj.weight"] = rand((half, p.shape[2]))
            elif name == "mlp.experts.down_proj":
                for e in range(p.shape[0]):
                    shard[f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"] = rand(p.shape[1:])
            elif name.endswith("norm.weight"):
                shard[key] = torch.ones(*p.shape, dtype=dtype)
            else:
                shard[key] = rand(p.shape, router_std if name == "mlp.gate.weight" else std)
        save_file(shard, str(out / f"model-layer{i:03d}.safetensors"))
        weight_map.update({k: f"model-layer{i:03d}.safetensors" for k in shard})
        shards.pop(f"model-layer{i:03d}.safetensors")  # written: free it before the next layer
    save_file(shards["model-embed.safetensors"], str(out / "model-embed.safetensors"))
    weight_map.update({k: "model-embed.safetensors" for k in shards["model-embed.safetensors"]})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out
