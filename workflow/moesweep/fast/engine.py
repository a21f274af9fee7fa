"""Fast decode path for transformers' Qwen3-MoE: static KV cache, CUDA-graph decode step, grouped expert kernels.

Why not `generate`: it is overhead-bound (benchmarks/results/nvidia-h200/fast_engine.md: 10.9 tok/s at batch 1
on the H200, 91 ms a step where the weights take ~1.5 ms to read), and `torch.compile(mode="reduce-overhead")`
over transformers' static cache crashed. So this module owns the cache and the graph, and reuses the checkpoint's own weights (embedding, norms, attention
projections, rotary embedding, lm_head). The MoE block is replaced by the policy's router (routing.route, which
has no host synchronisation) and FastMoeExperts.

A decode step is one CUDA graph of few launches per layer, because at batch 1 the weights of a layer take ~40 µs
to read and every launch costs a few µs (benchmarks/results/nvidia-h200/profile_decode_step.md counted 45 per layer
before this layout; 11 at batch 1 now): residual + norm (fast/norm.py) and one q/k/v GEMV over fused weights
(fuse_qkv; fast/gemv.py at batch 1, else cuBLAS), one kernel for the q/k norms, rotary and the cache write, a
split-K decode attention and its combine (fast/attention.py), the o-projection GEMV, residual + norm + router
logits (fast/norm.py up to 4 rows, else compiled), then the policy's routing with its accounting and the expert
alignment (fast/decode_routing.py: one launch) and the grouped expert kernels (fast/kernels.py). Prefill runs
eagerly with transformers' attention composition over SDPA, and routes through routing.route.

Batch semantics equal the reference engine's (engine.py): left padding, prompts sorted by length, greedy, and
tokens of padding or finished sequences are not tokens of the batch (they are routed nowhere, use no capacity
and are not counted). Finished rows stay in the static batch (the graph's shapes are fixed) but are invalid.
EOS is detected on the device; stop strings need the text, so by default the host reads each step's tokens
(one small copy per step); `stop_checks=False` decodes exactly max_new_tokens per sequence with no host
synchronisation (the benchmark's setting), the tokens being collected on the device.
"""
from __future__ import annotations

import os
import time

import torch
import torch._dynamo
import torch.nn.functional as F

from ..engine import Completion, GenerationTiming, _finish, length_sorted_batches
from ..grid import Routing
from ..routing import LayerRoutingStats, policy_k, route
from .attention import decode_attention, qk_norm_rope_store
from . import gemv as dense
from . import decode_routing, norm
from .kernels import align_and_account
from .moe import FastMoeExperts


def _rms_norm(x, weight, eps):
    """transformers' Qwen3MoeRMSNorm as a function (float32 statistics, scaled in the input dtype)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _add_expert_outputs(x, moe_out):
    """x [..., H] plus the previous layer's routed expert outputs (float32 [tokens * k, H], each already times its
    routing weight), summed over k in float32 and rounded once."""
    if moe_out is None:
        return x
    return x + moe_out.view(*x.shape[:-1], -1, x.shape[-1]).sum(-2).to(x.dtype)


def _attention_inputs(x, moe_out, ln, wq, bq, wk, bk, wv, bv, q_norm, k_norm, cos, sin, eps, head_dim):
    """The previous layer's expert outputs into the residual, input norm, q/k/v with their norms and rotary."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

    B, S, H = x.shape
    x = _add_expert_outputs(x, moe_out)
    h = _rms_norm(x, ln, eps)
    q = _rms_norm(F.linear(h, wq, bq).view(B, S, -1, head_dim), q_norm, eps).transpose(1, 2)
    k = _rms_norm(F.linear(h, wk, bk).view(B, S, -1, head_dim), k_norm, eps).transpose(1, 2)
    v = F.linear(h, wv, bv).view(B, S, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return x, q, k, v


def _post_attention(x, o, wo, bo, post_ln, router, eps, decode):
    """Attention output into the residual, post-attention norm and the router logits: (x, h [tokens, H], logits)."""
    H = x.shape[-1]
    # wo None: o is already projected, as float32 split-K partial sums [S, B, H] of gemv.dense_gemv (summed here,
    # where inductor fuses the sum into the residual add, and rounded once as a GEMM's output is)
    x = x + (o.sum(0).to(x.dtype) if wo is None else F.linear(o, wo, bo))
    h = _rms_norm(x, post_ln, eps).reshape(-1, H)
    if decode:  # a reduction inductor fuses (cuBLAS took 6 µs for this 0.5 MB GEMV); float32 sums as F.linear's
        logits = (h[:, None, :].float() * router[None].float()).sum(-1).to(h.dtype)
    else:
        logits = F.linear(h, router)
    return x, h, logits


def _route_block(x, o, wo, bo, post_ln, router, valid, beta, hot, eps, routing, top_k, norm, num_experts, block_m,
                 decode, counts_acc, load_acc, mass_acc):
    """_post_attention, then the policy's routing, its accounting (added in place into counts_acc / load_acc by
    the alignment launch) and the expert-sorted assignment blocks; with mass_acc also the router probability mass
    routed to each expert (dynamic precision's hotness input, as dynamic.DynamicPrecision.observe). All on the
    device; nothing here reads a value back to the host. Decode steps take decode_routing.decode_route instead
    where it applies (the same, in one launch)."""
    x, h, logits = _post_attention(x, o, wo, bo, post_ln, router, eps, decode)
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    index, weights, keep_policy, keep = route(probs, routing, top_k, norm, valid, beta, sort_topk=True)
    sorted_assign, block_expert, hits = align_and_account(index, num_experts, block_m, valid, keep_policy, hot,
                                                          counts_acc, load_acc, decode)
    if mass_acc is not None:  # dropped assignments carry the sentinel index E: their bucket is cut off
        routed_probs = probs.gather(1, index.clamp_max(num_experts - 1)).double() * keep
        mass_acc += torch.zeros(num_experts + 1, dtype=torch.float64, device=x.device).scatter_add_(
            0, index.flatten(), routed_probs.flatten())[:num_experts]
    return x, h, weights, sorted_assign, block_expert, hits


def fuse_qkv(attention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [q; k; v] weight (and bias) for the attention's projections, which become views of it: the decode step
    then reads all three with one GEMM launch instead of three, and no weight is stored twice. Values unchanged,
    so transformers' own forward of the model still computes the same. Idempotent (a second engine on the same
    model reuses the fused tensors)."""
    if not hasattr(attention, "moesweep_qkv"):
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        fused = []
        for name in ("weight", "bias"):
            parts = [getattr(p, name) for p in projections]
            if any(t is None for t in parts):
                fused.append(None)  # Qwen3-MoE: attention_bias applies to all three or none
                continue
            whole = torch.cat([t.detach() for t in parts])
            for p, view in zip(projections, whole.split([t.shape[0] for t in parts])):
                getattr(p, name).data = view
            fused.append(whole)
        attention.moesweep_qkv = tuple(fused)
    return attention.moesweep_qkv


class DeviceRoutingStats:
    """Routing accounting kept on the device (graph-safe, no host sync), read into LayerRoutingStats at the end:
    the same routing_increments as the reference engine's PolicyRouter, summed on the device."""

    def __init__(self, layers: list[int], num_experts: int, device):
        self.layers, self.num_experts = layers, num_experts
        self.counts = torch.zeros(len(layers), len(LayerRoutingStats.COUNTERS), dtype=torch.int64, device=device)
        self.load = torch.zeros(len(layers), num_experts, dtype=torch.int64, device=device)

    def reset(self):
        self.counts.zero_()  # in place: captured graphs add into these very tensors
        self.load.zero_()

    def to_layer_stats(self) -> dict[int, LayerRoutingStats]:
        counts, load = self.counts.cpu(), self.load.cpu()
        out = {}
        for i, layer in enumerate(self.layers):
            s = LayerRoutingStats(self.num_experts)
            s.add(counts[i].tolist(), load[i])
            out[layer] = s
        return out


class FastQwen3MoeEngine:
    """Greedy batched decoding of a Qwen3MoeForCausalLM (bf16, CUDA) under one routing and precision policy."""

    def __init__(self, model, adapter, routing: Routing, widths: dict[int, torch.Tensor], quantized: dict[int, dict],
                 skip_betas: dict[int, float] | None = None, hot_masks: dict[int, torch.Tensor] | None = None,
                 compile: bool = True, online=None):
        """online: a fast/pools.py controller (dynamic, frozen, offload) that owns the experts of every layer and
        their precision; `widths`/`quantized`/`hot_masks` are then unused.
        compile: the per-layer glue of the decode step (residual, norms and the q/k/v GEMM; o-projection, routing,
        accounting, block alignment) goes through torch.compile, which fuses its ~100 small kernels per layer into
        a handful; the captured CUDA graph then replays those. Prefill always runs eagerly (its shapes change
        with every batch)."""
        cfg = model.config
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", False):
            raise ValueError("the fast engine has no sliding-window attention; use evaluate.engine: reference")
        self.model, self.adapter, self.routing = model, adapter, routing
        self.device = next(model.parameters()).device
        self.layers = adapter.layers()
        self.num_experts, self.top_k, self.norm = adapter.num_experts, adapter.top_k, adapter.norm_topk_prob
        self.betas = skip_betas or {}
        self.online = online
        if online is not None:
            self.experts, self.hot = online.experts, online.hot
        else:
            self.experts = {}
            for l in self.layers:
                per_bits = {b: {p: quantized[b][f"layers.{l.index}.{p}"] for p in ("gate_up_proj", "down_proj")}
                            for b in quantized}
                self.experts[l.index] = FastMoeExperts.static(l.experts, widths[l.index], per_bits)
            self.hot = {i: m.to(self.device) for i, m in (hot_masks or {}).items()}
        self._track_mass = online is not None and online.mass is not None
        # CPU (CI: Triton's interpreter) runs the same decode step eagerly: it checks the logic, not the speed
        self._capture = (online is None or online.graph_safe) and self.device.type == "cuda"
        self.stats = DeviceRoutingStats([l.index for l in self.layers], self.num_experts, self.device)
        self._k = policy_k(routing, self.top_k)  # assignments per token
        self._eps = cfg.rms_norm_eps
        self._head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._scaling = self._head_dim ** -0.5
        self._heads = cfg.num_attention_heads
        self._params = self._collect_params()
        # Triton GEMVs for the decode step's attention projections (no bias: Qwen3-MoE's attention_bias is off by
        # default; with a bias the projections stay on cuBLAS, which adds it in its epilogue)
        self._dense_gemv = not getattr(cfg, "attention_bias", False) and (
            self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
        # the capacity factor as a float64 scalar on the device: decode_route computes the capacity as route() does
        self._capacity_factor = None if routing.capacity_factor is None else torch.tensor(
            routing.capacity_factor, dtype=torch.float64, device=self.device)
        self._o_split = dense.split_for(cfg.hidden_size, self._heads * self._head_dim, dense.O_PROJ_TILES)
        self._compiled = None
        if compile:
            # One compiled graph per (batch size, policy, first layer or not); past the default limit of 8 dynamo
            # would fall back to eager code without an error, and the clocks would measure that instead.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 512)
            self._compiled = tuple(torch.compile(f, dynamic=False) for f in (_route_block, _post_attention))
        self.eos = None
        self.context = None
        self._graphs: dict[int, tuple] = {}
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- model ---------------------------------------------------------------------------------------------------
    def _forward(self, input_ids, positions, write_pos, key_mask, valid, decode: bool):
        """input_ids/positions [B, S]; write_pos [S] cache slots of these tokens; key_mask [B, 1, S, L] bool (prefill)
        or [B, L] (decode: S = 1, the step the CUDA graph replays)."""
        m = self.model.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary_emb(x, positions)
        if decode:
            x, moe_out = self._decode_layers(x[:, 0], cos[:, 0], sin[:, 0], write_pos, key_mask, valid)
        else:
            x, moe_out = self._prefill_layers(x, cos, sin, write_pos, key_mask, valid)
        if self.online is not None:
            self.online.after_forward()
        x = _add_expert_outputs(x, moe_out)
        return self.model.lm_head(m.norm(x if decode else x[:, -1]))

    def _layer_accumulators(self, i: int) -> tuple:
        return self.stats.counts[i], self.stats.load[i], self.online.mass[i] if self._track_mass else None

    def _decode_layers(self, x, cos, sin, slot, keys, valid):
        """One new token per row, x [B, H]: per layer the fused q/k/v GEMM, one kernel for the q/k norms, rotary
        and cache write, the decode attention kernels, then routing and the grouped expert kernels. Written for
        the captured step: few launches per layer, no host synchronisation."""
        route_block, post_attention = self._compiled or (_route_block, _post_attention)
        k_cache, v_cache = self._cache
        B = x.shape[0]
        q = torch.empty(B, self._heads, self._head_dim, dtype=x.dtype, device=x.device)
        o = torch.empty_like(q)
        # batch 1: the attention projections as Triton GEMVs (gemv.py), which read the weights faster than cuBLAS
        # does at this size; the o-projection split over its input columns, its partial sums added by the next norm
        gemv = self._dense_gemv and B <= dense.ENGINE_MAX_ROWS
        # routing, alignment and accounting in one launch (decode_routing.py) where one program's tiles hold them;
        # for a few rows also the residual, post-attention norm and router logits in one launch before it (norm.py)
        fused_routing = decode_routing.supports(self.routing, B, self.top_k, self.num_experts, x.device)
        norm_logits = fused_routing and B <= norm.MAX_LOGIT_ROWS
        moe_out = None
        for i, l in enumerate(self.layers):
            p = self._params[i]
            ln, w_qkv, b_qkv = p["qkv"]
            wo, bo, post_ln, router = p["route"]
            # the previous layer's expert outputs into the residual, and the input norm: one launch
            x, h = norm.residual_rms_norm(x, moe_out, self._k, ln, self._eps)
            qkv = dense.dense_gemv(h, w_qkv, tiles=dense.QKV_TILES) if gemv else F.linear(h, w_qkv, b_qkv)
            qk_norm_rope_store(qkv, *p["qk_norm"], cos, sin, self._eps, k_cache[i, :B], v_cache[i, :B], slot, q)
            decode_attention(q, k_cache[i, :B], v_cache[i, :B], keys, self._scaling, o)
            if gemv:
                attn = (dense.dense_gemv(o.view(B, -1), wo, self._o_split, dense.O_PROJ_TILES), None, None)
            else:
                attn = (o.view(B, -1), wo, bo)
            block_m = self.experts[l.index].block_m(B * self._k)
            if fused_routing:
                if norm_logits:  # the o-projection's output (or its split-K partial sums) as the norm's addend
                    add = attn[0] if attn[1] is None else F.linear(*attn)
                    x, h, logits = norm.residual_rms_norm(x, add, 1, post_ln, self._eps, router)
                else:
                    x, h, logits = post_attention(x, *attn, post_ln, router, self._eps, True)
                weights, sorted_assign, block_expert, hits = decode_routing.decode_route(
                    logits, self.routing, self.top_k, self.norm, valid, p["beta"], self._capacity_factor, p["hot"],
                    block_m, *self._layer_accumulators(i))
            else:
                x, h, weights, sorted_assign, block_expert, hits = route_block(
                    x, *attn, post_ln, router, valid, p["beta"], p["hot"], self._eps, self.routing, self.top_k,
                    self.norm, self.num_experts, block_m, True, *self._layer_accumulators(i))
            moe_out = self.experts[l.index].run(h, weights, sorted_assign, block_expert, hits)
        return x, moe_out

    def _prefill_layers(self, x, cos, sin, write_pos, key_mask, valid):
        """Prompts [B, S, H], eagerly (shapes change with every batch): transformers' attention composition with
        SDPA over the static cache."""
        k_cache, v_cache = self._cache
        B, S, H = x.shape
        kv_heads = k_cache.shape[2]
        groups = self._heads // kv_heads
        # Grouped-query attention without repeating the cache: the G query heads of a KV head become G*S rows.
        mask = key_mask.unsqueeze(2).expand(B, 1, groups, S, key_mask.shape[-1]).reshape(B, 1, groups * S, -1)
        moe_out = None
        for i, l in enumerate(self.layers):
            p = self._params[i]
            x, q, k, v = _attention_inputs(x, moe_out, *p["attention"], cos, sin, self._eps, self._head_dim)
            k_cache[i, :B].index_copy_(2, write_pos, k)
            v_cache[i, :B].index_copy_(2, write_pos, v)
            o = F.scaled_dot_product_attention(q.reshape(B, kv_heads, groups * S, -1), k_cache[i, :B], v_cache[i, :B],
                                               attn_mask=mask, scale=self._scaling)
            o = o.reshape(B, kv_heads * groups, S, -1).transpose(1, 2).reshape(B, S, -1)
            x, h, weights, sorted_assign, block_expert, hits = _route_block(
                x, o, *p["route"], valid, p["beta"], p["hot"], self._eps, self.routing, self.top_k, self.norm,
                self.num_experts, self.experts[l.index].block_m(B * S * self._k), False, *self._layer_accumulators(i))
            moe_out = self.experts[l.index].run(h, weights, sorted_assign, block_expert, hits)
        return x, moe_out

    def _collect_params(self):
        """Per layer, the tensors the glue takes as arguments (one compiled graph serves every layer). q/k/v are
        fused first (fuse_qkv), so the prefill's separate projections are views of the decode step's fused weight."""
        out = []
        for l in self.layers:
            layer = self.model.model.layers[l.index]
            a = layer.self_attn
            w_qkv, b_qkv = fuse_qkv(a)
            beta = self.betas.get(l.index)
            out.append({
                "attention": (layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight,
                              a.k_proj.bias, a.v_proj.weight, a.v_proj.bias, a.q_norm.weight, a.k_norm.weight),
                "qkv": (layer.input_layernorm.weight, w_qkv, b_qkv),
                "qk_norm": (a.q_norm.weight, a.k_norm.weight),
                "route": (a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight, l.router.weight),
                "beta": None if beta is None else torch.tensor(beta, dtype=torch.float32, device=self.device),
                "hot": self.hot.get(l.index)})
        return out

    # -- state -----------------------------------------------------------------------------------------------------
    def _ensure_cache(self, batch: int, length: int):
        shape = (len(self.layers), batch, self.model.config.num_key_value_heads, length, self._head_dim)
        if self._cache is None or any(a < b for a, b in zip(self._cache[0].shape, shape)):
            self._graphs.clear()
            # zeros, not empty: masked keys still enter the attention product, and 0 * NaN would be NaN
            self._cache = tuple(torch.zeros(shape, dtype=self.model.dtype, device=self.device) for _ in range(2))

    def _decode_state(self, batch: int):
        """Static buffers and the captured graph of one decode step at this batch size."""
        if batch in self._graphs:
            return self._graphs[batch]
        L = self._cache[0].shape[3]
        dev = self.device
        st = {"token": torch.zeros(batch, 1, dtype=torch.long, device=dev),
              "position": torch.zeros(batch, 1, dtype=torch.long, device=dev),
              "slot": torch.zeros(1, dtype=torch.long, device=dev),
              "keys": torch.zeros(batch, L, dtype=torch.bool, device=dev),
              "live": torch.zeros(batch, dtype=torch.bool, device=dev),
              "eos": torch.full((1,), -1, dtype=torch.long, device=dev),  # a buffer, not a constant of the graph
              "out": torch.zeros(batch, L + 1, dtype=torch.long, device=dev)}  # token of cache slot j at j

        def step():
            st["keys"].index_fill_(1, st["slot"], True)
            logits = self._forward(st["token"], st["position"], st["slot"], st["keys"], st["live"], True)
            nxt = logits.argmax(-1)
            st["out"].index_copy_(1, st["slot"] + 1, nxt[:, None])
            st["live"].logical_and_(nxt != st["eos"])
            st["token"].copy_(nxt[:, None])
            st["position"].add_(1)
            st["slot"].add_(1)

        if not self._capture:  # offloading reads routing results on the host every layer: the step runs eagerly
            self._graphs[batch] = (st, None, step)
            return self._graphs[batch]
        # Warm-up and capture run real steps on dummy rows (no valid token, nothing routed); they must not count,
        # and a batch size first seen mid-generation must not wipe what the earlier batches counted (nor move the
        # hotness EMA of dynamic precision).
        state = [self.stats.counts, self.stats.load] + ([self.online.score, self.online.mass] if self._track_mass else [])
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for t, s in zip(state, saved):
            t.copy_(s)
        self._graphs[batch] = (st, graph, graph.replay)
        return self._graphs[batch]

    # -- generation --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                 stop: tuple[str, ...] = (), stop_checks: bool = True, progress=None, context=None):
        """Same contract as engine.generate_greedy. stop_checks=False: exactly max_new_tokens each, no EOS/stop.
        context: a routing.RoutingContext whose observers (precision controller, traffic meter) see the end of
        every forward call with its phase set, as on the reference engine."""
        self.context = context
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None and stop_checks else -1
        lengths, batches = length_sorted_batches(tokenizer, prompts, batch_size)
        self._ensure_cache(min(batch_size, len(prompts)), max(lengths) + max_new_tokens)
        timing = GenerationTiming(prompt_lengths=lengths)
        completions: dict[int, Completion] = {}
        for batch in (progress(batches, desc="batches") if progress else batches):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            self._generate_batch(batch, enc.input_ids.to(self.device), enc.attention_mask.to(self.device),
                                 tokenizer, max_new_tokens, stop, stop_checks, timing, completions)
        for c in completions.values():
            timing.generated_tokens += c.generated_tokens
            timing.decode_tokens += c.generated_tokens - 1
        return [completions[i] for i in range(len(prompts))], timing

    def _prefill(self, input_ids, attention):
        """Prompts [B, P] (left padding: attention 0) into the cache; the decode state is set for the next step.
        Returns (decode state, step function, first generated token [B])."""
        B, P = input_ids.shape
        L = self._cache[0].shape[3]
        st, _, run_step = self._decode_state(B)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        keys = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        keys[:, :P] = attention.bool()
        slots = torch.arange(P, device=self.device)
        causal = slots[:, None] >= torch.arange(L, device=self.device)[None, :]
        # A padding query sees itself, so no attention row is empty (an empty row would be NaN and poison the cache)
        mask = (keys[:, None, None, :] & causal) | (slots[:, None] == torch.arange(L, device=self.device))
        logits = self._forward(input_ids, positions, slots, mask, attention.bool().reshape(-1), False)
        nxt = logits.argmax(-1)
        st["token"].copy_(nxt[:, None])
        st["position"].copy_(positions[:, -1:] + 1)
        st["slot"].fill_(P)
        st["keys"].copy_(keys)
        st["live"].copy_(nxt != self.eos)
        st["eos"].fill_(self.eos)
        st["out"][:, P] = nxt
        self._end_call("prefill")
        return st, run_step, nxt

    @torch.inference_mode()
    def forced_decode(self, input_ids: torch.Tensor, attention: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """Greedy predictions under teacher forcing: after the prompt, and after each of the N tokens forced [B, N]
        (row b's step s is fed forced[b, s], not its own previous prediction). Returns [B, N + 1]. Checks the decode
        step against another implementation token by token, where a free-running comparison stops meaning
        anything after the first near-tie that the two round differently."""
        self.eos, self.context = -1, None
        B, P = input_ids.shape
        self._ensure_cache(B, P + forced.shape[1] + 1)
        st, run_step, nxt = self._prefill(input_ids, attention)
        predicted = [nxt]
        for s in range(forced.shape[1]):
            st["token"].copy_(forced[:, s:s + 1])
            run_step()
            self._end_call("decode")
            predicted.append(st["token"][:, 0].clone())
        return torch.stack(predicted, 1)

    def _generate_batch(self, batch, input_ids, attention, tokenizer, max_new_tokens, stop, stop_checks, timing,
                        completions, read_tokens=False):
        P = input_ids.shape[1]
        timing.prompt_tokens += int(attention.sum())
        timing.padded_prompt_tokens += attention.numel()
        self._decode_state(input_ids.shape[0])  # capture (first time at this batch size) outside the clock
        self._synchronize()
        t0 = time.perf_counter()
        st, run_step, nxt = self._prefill(input_ids, attention)
        self._synchronize()
        t1 = time.perf_counter()
        timing.prefill_s.append(t1 - t0)

        tokens = {i: [] for i in batch}
        live = set(batch)
        step_tokens = nxt.tolist()
        for step in range(max_new_tokens):
            if stop_checks:
                for row, i in enumerate(batch):
                    if i in live:
                        tokens[i].append(step_tokens[row])
                        if _finish(tokenizer, i, tokens[i], self.eos, stop, max_new_tokens, completions):
                            live.discard(i)
                            st["live"][row] = False  # stop strings are found on the host
                if not live:
                    break
            elif step == max_new_tokens - 1:
                break
            run_step()
            self._end_call("decode")
            timing.decode_steps += 1
            if stop_checks or read_tokens:
                step_tokens = st["token"][:, 0].tolist()  # the one host synchronisation per step
        self._synchronize()
        timing.decode_s.append(time.perf_counter() - t1)
        if not stop_checks and tokenizer is not None:
            for row, toks in enumerate(st["out"][:, P:P + max_new_tokens].tolist()):
                completions[batch[row]] = Completion(batch[row], tokenizer.decode(toks, skip_special_tokens=True),
                                                     max_new_tokens, "length")

    @torch.inference_mode()
    def time_decode(self, input_ids: torch.Tensor, new_tokens: int, read_tokens: bool = False) -> GenerationTiming:
        """Prefill `input_ids` [B, P] (no padding), then decode exactly `new_tokens` tokens per sequence: the
        benchmark's measurement. read_tokens=False: no host synchronisation between steps; True: the host reads
        each step's tokens, as a serving loop (and evaluate) does, which is when it learns what the GPU finished."""
        self.eos = -1
        self.context = None
        B, P = input_ids.shape
        self._ensure_cache(B, P + new_tokens)
        timing = GenerationTiming()
        self._generate_batch(list(range(B)), input_ids, torch.ones_like(input_ids), None, new_tokens, (), False,
                             timing, {}, read_tokens)
        return timing

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _end_call(self, phase: str) -> None:
        """Host side, after a forward call was enqueued: the online controller's between-call work (no wait on
        the GPU), then the routing context's observers, as the reference engine calls them."""
        if self.online is not None:
            self.online.end_call()
        if self.context is not None:
            self.context.phase = phase
            for obs in self.context.observers:
                if obs is not self.online:
                    obs.end_call()

    def routing_stats(self) -> dict[int, LayerRoutingStats]:
        return self.stats.to_layer_stats()

    def reset_stats(self):
        self.stats.reset()
