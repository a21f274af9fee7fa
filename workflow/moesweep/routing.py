"""Routing policies for MoE layers: native top-k, top-k′, capacity factor, dynamic skipping, top-p.

`route` is a pure function on router probabilities; `PolicyRouter` wraps a model's router with it and
keeps per-layer accounting. Dropped assignments carry the sentinel expert index E (== num_experts) and
weight 0: the experts implementation skips them (no weight read, no NaN), and the residual stream carries
the token. The rules each policy applies, the capacity formula and the counters are routing_spec's; semantics
(documented for users in config/README.md):

* native   — the checkpoint's own top-k; renormalised exactly as its `norm_topk_prob` says.
* topk     — top-k′ (k′ ≤ k); renormalised per `renormalize` (None = as the checkpoint).
* skip     — arXiv 2402.14800 generalised to k: drop ranked expert j > 1 when w_j < β·w_1, β per layer
             from calibration (median of w_2/w_1).
* top_p    — the smallest prefix of the ranked experts whose probability mass reaches p (≥ 1, ≤ k).
* capacity — on top of any of the above: capacity per expert per forward call
             C = ceil(CF · T · k′ / E), T = valid (non-padding, live) tokens in that call. Assignments past C
             are dropped in priority order: `token_order` ranks all first choices before all second choices,
             each in token order (Switch/GShard); `score` ranks by router probability (batch-prioritised
             routing), ties by that same token order. Renormalisation happens before capacity drops, as in
             Switch Transformer: a dropped assignment just loses its share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .grid import Routing
from .routing_spec import COUNTERS, POLICY_KEEP_RULE, capacity, capacity_load, skip_keeps, top_p_keeps


@dataclass
class LayerRoutingStats:
    """Accumulated over every forward call of one evaluation (prefill and decode)."""

    num_experts: int
    load: torch.Tensor = field(default=None)  # kept assignments per expert
    # One field per routing_spec.COUNTERS entry (what each counts is written there); decode counters come from
    # the forward calls the engine marks context.phase == "decode".
    tokens: int = 0
    routed: int = 0
    dropped: int = 0
    hot_hits: int = 0
    decode_calls: int = 0
    decode_tokens: int = 0
    decode_kept: int = 0
    distinct_experts_decode: int = 0
    distinct_high_decode: int = 0

    COUNTERS = COUNTERS  # the order of routing_increments' counts

    def __post_init__(self):
        if self.load is None:
            self.load = torch.zeros(self.num_experts, dtype=torch.long)

    def add(self, counts, load: torch.Tensor) -> None:
        """Add one call's (or a whole run's) counters, in COUNTERS order, and per-expert load."""
        for name, value in zip(self.COUNTERS, counts):
            setattr(self, name, getattr(self, name) + int(value))
        self.load += load


def routing_increments(valid, keep_policy, keep, index, hot, num_experts: int, decode: bool):
    """One forward call's routing accounting, on the device and without host synchronisation (so the fast engine
    can run it inside a captured graph): (counts int64 [len(COUNTERS)] in routing_spec.COUNTERS order, kept
    assignments per expert [E]). Decode counters stay 0 for other calls; an expert is read once per call however
    many tokens it serves, so distinct experts hit = expert weight traffic."""
    kept = torch.where(keep, index, num_experts).flatten()
    hits = torch.zeros(num_experts + 1, dtype=torch.int64, device=index.device)
    hits.scatter_add_(0, kept, torch.ones_like(kept))
    hits = hits[:-1]
    hot = hot if hot is not None else torch.zeros_like(hits, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.int64, device=index.device)
    hit = hits > 0
    values = {"tokens": valid.sum(), "routed": keep_policy.sum(), "dropped": (keep_policy & ~keep).sum(),
              "hot_hits": (hits * hot).sum()}
    decode_values = {"decode_calls": torch.ones_like(zero), "decode_tokens": valid.sum(), "decode_kept": hits.sum(),
                     "distinct_experts_decode": hit.sum(), "distinct_high_decode": (hit & hot).sum()}
    values.update(decode_values if decode else dict.fromkeys(decode_values, zero))
    return torch.stack([values[name] for name in COUNTERS]), hits


class RoutingContext:
    """State shared by the routers of one model: which tokens of the current call are real, and stats.

    The generation loop sets `valid` before every forward call (padding and finished sequences are not
    tokens of the batch, so they neither use capacity nor count in the accounting).
    """

    def __init__(self):
        self.valid: torch.Tensor | None = None
        self.stats: dict[int, LayerRoutingStats] = {}
        self.hot_masks: dict[int, torch.Tensor] = {}
        self.record = True
        # Precision controllers (dynamic precision, offload cache) that see every router output and the end
        # of every forward call.
        self.observers: list = []

    def reset(self):
        self.stats.clear()

    def end_call(self):
        for obs in self.observers:
            obs.end_call()


def _capacity_keep(idx, probs_sel, keep, cap, priority: str, num_experts: int) -> torch.Tensor:
    """Keep at most `cap` of the kept assignments per expert, in priority order. Returns the new keep mask."""
    T, k = idx.shape
    # Assignment (t, j) gets token-order key j*T + t: all first choices, then all second choices, ...
    token_key = (torch.arange(k, device=idx.device)[None, :] * T + torch.arange(T, device=idx.device)[:, None]).flatten()
    if priority == "score":
        # Stable sort by descending probability; equal probabilities keep token order.
        order = torch.sort(token_key, stable=True).indices
        order = order[torch.sort(-probs_sel.flatten()[order].float(), stable=True).indices]
    else:
        order = torch.sort(token_key, stable=True).indices
    experts = idx.flatten()[order]
    kept = keep.flatten()[order]
    # scatter rather than F.one_hot: one_hot checks its input range on the host (a sync per call on CUDA)
    onehot = torch.zeros(experts.shape[0], num_experts, dtype=torch.long, device=experts.device)
    onehot.scatter_(1, experts[:, None], kept[:, None].long())
    position = onehot.cumsum(0).gather(1, experts[:, None]).squeeze(1)  # 1-based rank within the expert
    new_keep_sorted = kept & (position <= cap)
    new_keep = torch.empty_like(new_keep_sorted)
    new_keep[order] = new_keep_sorted
    return new_keep.view(T, k)


def policy_k(policy: Routing, native_k: int) -> int:
    """Experts per token the policy selects before dropping: k′ for `topk` (≤ the checkpoint's k), else k."""
    if policy.policy != "topk":
        return native_k
    if policy.top_k > native_k:
        raise ValueError(f"top_k={policy.top_k} exceeds the checkpoint's k={native_k}")
    return policy.top_k


def renormalizes(policy: Routing, native_norm: bool) -> bool:
    """Whether the kept weights are renormalised to sum to 1: native as the checkpoint's norm_topk_prob says, other
    policies per `renormalize` (None = as the checkpoint)."""
    return native_norm if (policy.policy == "native" or policy.renormalize is None) else policy.renormalize


def route(probs: torch.Tensor, policy: Routing, native_k: int, native_norm: bool,
          valid: torch.Tensor | None = None, skip_beta: float | None = None, sort_topk: bool = False):
    """Apply a routing policy to router probabilities [T, E] (float32).

    sort_topk: take the k largest from a stable descending sort instead of torch.topk: the same experts and
    weights, except that exactly equal probabilities (bf16 router logits can tie) go to the lower expert id,
    where torch.topk leaves the order unspecified. The fast engine's compiled decode step uses it because
    inductor writes a sort into its own Triton kernel, while topk is two ATen launches per layer.

    Returns (top_k_index [T, k′] long with sentinel E for dropped, top_k_weights [T, k′] float32,
    keep_before_capacity [T, k′] bool, keep [T, k′] bool).
    """
    E = probs.shape[1]
    k = policy_k(policy, native_k)
    renorm = renormalizes(policy, native_norm)

    if sort_topk:
        weights, index = (t[:, :k] for t in torch.sort(probs, dim=-1, descending=True, stable=True))
    else:
        weights, index = torch.topk(probs, k, dim=-1)
    keep = policy_keep(policy, weights, valid, skip_beta)
    probs_sel = weights
    weights = weights * keep  # exact (×1 or ×0); unconditional so no host sync decides it
    if renorm:  # with every expert kept this is bit-identical to the HF router (the clamp never binds)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return apply_capacity(policy, index, weights, probs_sel, keep, valid, E)


def policy_keep(policy: Routing, ranked: torch.Tensor, valid: torch.Tensor | None,
                skip_beta: float | None) -> torch.Tensor:
    """[T, k′] bool: which of the ranked choices (probabilities [T, k′], descending) the policy keeps before
    capacity, by routing_spec's rule for it; invalid tokens keep nothing."""
    rule = POLICY_KEEP_RULE[policy.policy]
    if rule == "all":
        keep = torch.ones_like(ranked, dtype=torch.bool)
    else:
        rank = torch.arange(ranked.shape[1], device=ranked.device)[None, :]
        if rule == "skip":
            if skip_beta is None:
                raise ValueError("skip policy needs a per-layer beta from the calibration stage")
            keep = skip_keeps(rank, ranked, ranked[:, :1], skip_beta)
        else:
            keep = top_p_keeps(rank, ranked.cumsum(-1) - ranked, policy.top_p)
    if valid is not None:
        keep &= valid[:, None]
    return keep


def apply_capacity(policy: Routing, index, weights, priority_probs, keep, valid, num_experts: int):
    """Drop the kept assignments past each expert's capacity (none without a capacity factor) and give every
    dropped one the sentinel expert E. priority_probs [T, k′] is what `score` priority ranks by. Returns route's
    (index, weights, keep_before_capacity, keep)."""
    T, k = index.shape
    E = num_experts
    keep_policy = keep
    if policy.capacity_factor is not None:
        if valid is None:
            cap = capacity(policy.capacity_factor, T, k, E)
        else:  # on the device (no host sync): the same float64 operations, in the same order, as capacity()
            cap = torch.ceil(capacity_load(policy.capacity_factor, valid.sum().double(), k, E))
        keep = _capacity_keep(index, priority_probs, keep, cap, policy.priority, E)
        weights = weights * keep
    index = torch.where(keep, index, torch.full_like(index, E))
    return index, weights, keep_policy, keep


class PolicyRouter(nn.Module):
    """Drop-in replacement for a model's top-k router module; same weight, same (logits, weights, index) output."""

    # dtype of the returned weights; None = the router logits' dtype (Qwen's routers cast to it; Mixtral's
    # keeps float32, so its adapter sets float32 here to stay bit-identical in bfloat16 too).
    weights_dtype: torch.dtype | None = None

    def __init__(self, weight: nn.Parameter, native_k: int, native_norm: bool, layer: int,
                 policy: Routing, context: RoutingContext, skip_beta: float | None = None):
        super().__init__()
        self.weight = weight
        self.native_k, self.native_norm, self.layer = native_k, native_norm, layer
        self.policy, self.context, self.skip_beta = policy, context, skip_beta
        self.num_experts = weight.shape[0]

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        valid = self.context.valid
        if valid is not None and valid.shape[0] != probs.shape[0]:
            raise RuntimeError(f"routing context has {valid.shape[0]} valid flags for {probs.shape[0]} tokens")
        index, weights, keep_policy, keep = self.select(router_logits, probs, valid)
        if self.context.record:
            self._account(index, keep_policy, keep, valid, probs.shape[0])
        if self.context.observers:
            selected = probs.gather(1, index.clamp_max(self.num_experts - 1))
            for obs in self.context.observers:
                obs.observe(self.layer, index, selected, keep)
        return router_logits, weights.to(self.weights_dtype or router_logits.dtype), index

    def select(self, router_logits, probs, valid):
        """The policy's (index, weights, keep_before_capacity, keep) for this call; a family whose router is not
        softmax-top-k overrides this (moesweep.sparsemixer)."""
        return route(probs, self.policy, self.native_k, self.native_norm, valid, self.skip_beta)

    @torch.no_grad()
    def _account(self, index, keep_policy, keep, valid, T):
        stats = self.context.stats.setdefault(self.layer, LayerRoutingStats(self.num_experts))
        phase = getattr(self.context, "phase", None)  # None outside the engine (calibration, profiling, tests)
        if phase not in (None, "prefill", "decode"):
            raise ValueError(f"routing context phase {phase!r}; allowed: 'prefill', 'decode' or None")
        if valid is None:
            valid = torch.ones(T, dtype=torch.bool, device=index.device)
        hot = self.context.hot_masks.get(self.layer)  # live view: dynamic precision updates it in place
        counts, hits = routing_increments(valid, keep_policy, keep, index,
                                          None if hot is None else hot.to(index.device), self.num_experts,
                                          phase == "decode")
        stats.add(counts.tolist(), hits.cpu())  # one host copy per call for all counters


def sparse_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts forward that skips sentinel (dropped) assignments and reads only the experts hit.

    Written here rather than using transformers' `eager`, which crashes on the sentinel index in 5.17
    (one_hot with num_classes=E), and `batched_mm`/`grouped_mm`, which compute dropped assignments on a
    clamped expert and multiply by zero (weight reads for nothing, NaN if that output is not finite).
    An optional observer (calibration) sees each expert's inputs and intermediate activations.
    """
    num_experts = self.num_experts
    T, k = top_k_index.shape
    out = torch.zeros_like(hidden_states)
    flat_expert = top_k_index.reshape(-1)
    live = flat_expert < num_experts
    token = torch.arange(T, device=hidden_states.device).repeat_interleave(k)[live]
    expert = flat_expert[live]
    weight = top_k_weights.reshape(-1)[live]
    # Group assignments by expert, keeping token order inside each group.
    order = torch.sort(expert, stable=True).indices
    token, expert, weight = token[order], expert[order], weight[order]
    counts = torch.bincount(expert, minlength=num_experts).tolist()
    observer = getattr(self, "moesweep_observer", None)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token[start:start + n]
        x = hidden_states[rows]
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        if observer is not None:
            observer(self.moesweep_layer, e, x, h)
        y = F.linear(h, self.down_proj[e]) * weight[start:start + n, None]
        out.index_add_(0, rows, y.to(out.dtype))
        start += n
    return out
