"""Routing policies on Phi-3.5-MoE's sparsemixer router (transformers `phimoe`), which is not softmax-top-k.

What transformers 5.17's `sparsemixer` computes at inference (training=False), per token with router logits s:
the first choice r1 = argmax s; its weight m1 = softmax over the experts whose logit is within a relative
2·ε of s[r1] (ε = config.router_jitter_noise; (s[r1] − s_j) / max(|s_j|, s[r1]) ≤ 2ε), taken at r1. The second
choice r2 = argmax of s without r1; m2 = the same masked softmax around s[r2] (r1 excluded), taken at r2.
Exactly two experts, whatever num_experts_per_tok says; m1 + m2 is not 1 (each is near 1 when no other logit
is close) and nothing renormalises them.

How each policy maps onto it (documented for users in config/README.md):

* native   — sparsemixer's own (r1, r2) and (m1, m2), by calling transformers' function: bit-identical.
* topk     — k′ = 1: r1 with m1; k′ = 2: native. `renormalize: true` divides the kept multipliers by their
             sum (k′ = 1: weight 1); null/false keep the checkpoint's unnormalised multipliers.
* skip     — r2 is dropped when p2 < β·p1, where p = softmax of all router logits (float32): the same
             probabilities from which the calibrate stage takes β (median of p2/p1).
* top_p    — r2 is kept only while the softmax mass of the experts ranked above it, p1, is < p.
* capacity — as for every family (routing_spec.capacity, routing.apply_capacity): the same capacity per expert per
             call and priority orders, `score` ranking by the softmax probability p; applied after the policy (and
             any renormalisation).

The ranking (r1, r2) is the softmax top-2 order too, so profiling, calibration and dynamic precision, which
read the softmax probability p of each selected expert, see the same experts as the router.
"""
from __future__ import annotations

import torch

from .grid import Routing
from .routing import PolicyRouter, apply_capacity, policy_k, policy_keep


def route_sparsemixer(router_logits: torch.Tensor, probs: torch.Tensor, policy: Routing, jitter_eps: float,
                      valid: torch.Tensor | None = None, skip_beta: float | None = None):
    """A routing policy on sparsemixer's choices. Same return contract as `routing.route`: (top_k_index [T, k′]
    with sentinel E for dropped, top_k_weights [T, k′] in the logits' dtype, keep_before_capacity, keep)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    E = probs.shape[1]
    multiplier, selected = sparsemixer(router_logits, jitter_eps=jitter_eps, training=False)
    k = policy_k(policy, selected.shape[1])  # sparsemixer selects 2
    index, weights = selected[:, :k], multiplier[:, :k]
    p = probs.gather(1, index)  # softmax probability of each choice: what skip, top_p and `score` rank by
    keep = policy_keep(policy, p, valid, skip_beta)
    weights = weights * keep  # exact (×1 or ×0): native stays bit-identical
    if policy.policy != "native" and policy.renormalize:  # null = as the checkpoint, which does not renormalise
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return apply_capacity(policy, index, weights, p, keep, valid, E)


class SparseMixerPolicyRouter(PolicyRouter):
    """PolicyRouter for phimoe: the same accounting and observers, routing by `route_sparsemixer`."""

    def __init__(self, *args, jitter_eps: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.jitter_eps = jitter_eps

    def select(self, router_logits, probs, valid):
        return route_sparsemixer(router_logits, probs, self.policy, self.jitter_eps, valid, self.skip_beta)
