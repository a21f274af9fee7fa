"""The routing policies' rules, each written once, for every backend to read.

Three backends compute them: the torch reference (routing.route), Phi-3.5-MoE's sparsemixer variant
(sparsemixer.route_sparsemixer) and the fast engine's one-launch Triton decode kernel (fast/decode_routing.py);
the parity tests (tests/unit/test_routing.py, test_fast_decode_routing.py, test_fast_align.py) hold them equal.
The rules below are plain arithmetic and comparisons, so the same function runs on Python numbers, on torch
tensors and, wrapped in triton.jit, inside a Triton kernel. No torch import: the DAG-time code may read it.
"""
from __future__ import annotations

import math

# What each policy does to its k′ ranked choices before capacity: native and topk keep them all, skip and top_p
# apply their rule below. The Triton kernel takes the rule's position here as its MODE.
KEEP_RULES = ("all", "skip", "top_p")
POLICY_KEEP_RULE = {"native": "all", "topk": "all", "skip": "skip", "top_p": "top_p"}

# The routing accounting's counters, in the order of the counts vector that every backend adds into
# (routing.routing_increments, kernels.routing_counters) and LayerRoutingStats reads. The decode counters (from
# decode_calls on) stay 0 for other calls; they are what the cost model reads.
COUNTERS = (
    "tokens",  # valid (non-padding, live) tokens routed
    "routed",  # assignments the policy chose (before capacity)
    "dropped",  # of those, dropped by capacity
    "hot_hits",  # kept assignments to experts at high precision
    "decode_calls",
    "decode_tokens",  # valid tokens in decode calls
    "decode_kept",  # kept assignments in decode calls
    "distinct_experts_decode",  # experts with >= 1 kept assignment, summed over decode calls (weight traffic)
    "distinct_high_decode",  # of those, experts at high precision during that call
)


def keep_rule_mode(policy: str) -> int:
    """The policy's keep rule as an integer (KEEP_RULES order), as the Triton kernel takes it."""
    return KEEP_RULES.index(POLICY_KEEP_RULE[policy])


def skip_keeps(rank, prob, first_prob, beta):
    """skip (arXiv 2402.14800, generalised to k): the first choice always; a later one while its probability is at
    least beta x the first's (beta per layer, from calibration: the median of p2/p1)."""
    return (rank == 0) | (prob >= beta * first_prob)


def top_p_keeps(rank, mass_above, top_p):
    """top_p: the first choice always; a later one while the probability mass ranked above it is below p, so the
    smallest prefix whose mass reaches p."""
    return (rank == 0) | (mass_above < top_p)


def capacity_load(capacity_factor, tokens, k, num_experts):
    """CF · T · k′ / E, the capacity per expert per forward call before rounding up (Switch Transformer,
    arXiv 2101.03961; T = valid tokens in the call). Backends round it up with their own ceil: on the device it
    is computed in float64 from a token count tensor, in this same order of operations."""
    return capacity_factor * tokens * k / num_experts


def capacity(capacity_factor: float, tokens: int, k: int, num_experts: int) -> int:
    """Assignments each expert keeps per forward call: ceil(CF · T · k′ / E)."""
    return math.ceil(capacity_load(capacity_factor, tokens, k, num_experts))
