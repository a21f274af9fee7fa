"""A decode step's routing in one Triton launch: router softmax, the policy, the expert-sorted blocks and accounting.

Written by hand because it is the project's own contribution (the routing policies) and because, at decode, the
compiled torch version is 5-6 launches per layer (softmax and sort, the policy's masks, renormalisation, capacity,
block alignment, accounting), each a few µs of launch latency for a few KB of work: ~10 µs per layer, a sixth of
a batch-1 layer (benchmarks/results/nvidia-h200/profile_decode_step.md). One program does all of it from the router
logits [T, E], with every intermediate in registers.

Semantics are routing.route's with sort_topk=True followed by kernels.align_and_account (tests/unit/
test_fast_decode_routing.py holds the two against each other for every policy); the keep rules, the capacity
formula and the counters are routing_spec's, compiled in:
* probabilities: softmax in float32; top-k' by value, equal probabilities to the lower expert id (a stable
  descending sort), taken as k' rounds of "largest, lowest id";
* skip: choice j >= 1 kept while its probability >= beta x the first's; top_p: choice j kept while the mass ranked
  above it < p (the first always); invalid tokens (padding, finished rows) keep nothing;
* weights = probabilities x keep, renormalised over the kept ones when the policy renormalises;
* capacity: ceil(cf x valid tokens x k' / E) per expert in float64, kept in priority order: token order (all first
  choices, then all second, ...) or score (descending probability, ties in token order); dropped assignments get
  the sentinel expert E, and keep_policy (before capacity) is what the accounting calls routed;
* then align_assignments' blocks (flat order t*k' + j within an expert) and routing_increments' counters.
The sums (softmax, renormalisation, top-p's running mass) add in another order than torch's, so weights may differ
from route's by float32 rounding; the choices only differ where the probabilities tie to within that rounding.
"""
from __future__ import annotations

import os
import types

import torch
import triton
import triton.language as tl

from .. import routing_spec
from ..grid import Routing
from ..routing import policy_k, renormalizes
from .kernels import (ALIGN_TILE_LIMIT, COUNTER_SLOTS, N_COUNTERS, aligned_blocks, aligned_blocks_tiles,
                      aligned_sizes, routing_counters)



def _in_kernel(rule):
    """routing_spec's rule as a Triton function: the same code object, given globals that hold triton.language,
    which Triton's interpreter requires of a jit function (routing_spec itself imports neither torch nor triton)."""
    return triton.jit(types.FunctionType(rule.__code__, {**rule.__globals__, "tl": tl}, rule.__name__))


# routing_spec's rules, compiled into the kernel; its keep-rule modes are their positions in KEEP_RULES
_skip_keeps = _in_kernel(routing_spec.skip_keeps)
_top_p_keeps = _in_kernel(routing_spec.top_p_keeps)
_capacity_load = _in_kernel(routing_spec.capacity_load)
_SKIP = tl.constexpr(routing_spec.KEEP_RULES.index("skip"))
_TOP_P = tl.constexpr(routing_spec.KEEP_RULES.index("top_p"))


@triton.jit
def _decode_route_kernel(logits_ptr, valid_ptr, beta_ptr, cf_ptr, hot_ptr, weights_ptr, sorted_ptr, block_expert_ptr,
                         hits_ptr, counts_acc_ptr, load_acc_ptr, mass_acc_ptr, T, num_experts, capacity, max_blocks,
                         top_p, s_logits,
                         K: tl.constexpr, T_P2: tl.constexpr, K_P2: tl.constexpr, E_P2: tl.constexpr,
                         BLOCK_M: tl.constexpr, MODE: tl.constexpr, RENORM: tl.constexpr, CAPACITY: tl.constexpr,
                         SCORE: tl.constexpr, HOT: tl.constexpr, MASS: tl.constexpr, FILL: tl.constexpr,
                         BLOCKS: tl.constexpr):
    t = tl.arange(0, T_P2)
    e = tl.arange(0, E_P2)
    j = tl.arange(0, K_P2)
    live_t = t < T
    live_e = e < num_experts
    # every input first, so their latencies overlap (loads after the stores below would wait for them in order)
    valid = tl.load(valid_ptr + t, mask=live_t, other=0) != 0
    ci = tl.arange(0, COUNTER_SLOTS)  # counter index, routing_spec.COUNTERS
    counts_before = tl.load(counts_acc_ptr + ci, mask=ci < N_COUNTERS, other=0)
    load_before = tl.load(load_acc_ptr + e, mask=live_e, other=0)
    if HOT:
        hot = tl.load(hot_ptr + e, mask=live_e, other=0).to(tl.int32)
    else:
        hot = tl.zeros((E_P2,), dtype=tl.int32)
    if MASS:
        mass_before = tl.load(mass_acc_ptr + e, mask=live_e, other=0.0)
    # softmax over the experts (float32, as F.softmax(dtype=float)); padding rows and columns get probability 0
    x = tl.load(logits_ptr + t[:, None] * s_logits + e[None, :], mask=live_t[:, None] & live_e[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(live_t[:, None], x, 0.0)
    z = tl.exp(x - tl.max(x, 1)[:, None])
    probs = z / tl.sum(z, 1)[:, None]
    probs = tl.where(live_e[None, :], probs, 0.0)

    # top-k': K rounds of "the largest left, lowest id among equals" = a stable descending sort's first K
    left = tl.where(live_e[None, :], probs, -1.0)
    chosen = tl.zeros((T_P2, K_P2), dtype=tl.int32) + num_experts
    prob = tl.zeros((T_P2, K_P2), dtype=tl.float32)
    for r in tl.static_range(K):
        top = tl.max(left, 1)
        pick = tl.min(tl.where(left == top[:, None], e[None, :], E_P2), 1)
        chosen = tl.where(j[None, :] == r, pick[:, None], chosen)
        prob = tl.where(j[None, :] == r, top[:, None], prob)
        left = tl.where(e[None, :] == pick[:, None], -1.0, left)

    real = live_t[:, None] & (j[None, :] < K)  # [T_P2, K_P2] slots that are assignments at all
    keep = real & valid[:, None]
    if MODE == _SKIP:
        first = tl.sum(tl.where(j[None, :] == 0, prob, 0.0), 1)
        keep = keep & _skip_keeps(j[None, :], prob, first[:, None], tl.load(beta_ptr))
    if MODE == _TOP_P:
        above = tl.cumsum(tl.where(real, prob, 0.0), 1) - prob
        keep = keep & _top_p_keeps(j[None, :], above, top_p)
    keep_policy = keep
    weights = tl.where(keep, prob, 0.0)
    if RENORM:
        weights = weights / tl.maximum(tl.sum(weights, 1), 1.1754943508222875e-38)[:, None]  # float32 tiny

    N: tl.constexpr = T_P2 * K_P2
    if CAPACITY:
        tokens64 = tl.sum(valid.to(tl.int32), 0).to(tl.float64)
        cap = tl.ceil(_capacity_load(tl.load(cf_ptr), tokens64, K, num_experts))  # float64, as route() on the device
        if SCORE:  # rank among the expert's kept assignments: higher probability first, ties in token order
            key = (j[None, :] * T + t[:, None]).reshape(N)
            p_flat = prob.reshape(N)
            ex_flat = tl.where(keep, chosen, num_experts).reshape(N)
            before = (ex_flat[:, None] == ex_flat[None, :]) & (
                (p_flat[None, :] > p_flat[:, None]) | ((p_flat[None, :] == p_flat[:, None]) & (key[None, :] <= key[:, None])))
            position = tl.sum(before.to(tl.int32), 1).reshape(T_P2, K_P2)
        else:  # token order: all first choices, then all second, ...: cumulative count in (j, t) order
            kept_hot = ((chosen[:, :, None] == e[None, None, :]) & keep[:, :, None]).to(tl.int32)  # [T, K, E]
            by_choice = tl.permute(kept_hot, (1, 0, 2)).reshape(N, E_P2)
            rank = tl.sum(tl.cumsum(by_choice, 0) * by_choice, 1).reshape(K_P2, T_P2)
            position = tl.permute(rank, (1, 0))
        keep = keep & (position.to(tl.float64) <= cap)
        weights = tl.where(keep, weights, 0.0)
    tl.store(weights_ptr + t[:, None] * K + j[None, :], weights, mask=real)

    # align_assignments: expert-sorted runs padded to BLOCK_M, flat order t*K + j within an expert
    n = T * K
    assign = (t[:, None] * K + j[None, :]).reshape(N)
    expert = tl.where(keep, chosen, num_experts).reshape(N)
    onehot, counts = aligned_blocks(expert, assign, n, num_experts, capacity, max_blocks, sorted_ptr,
                                    block_expert_ptr, E_P2, BLOCK_M, FILL, BLOCKS)

    # routing_increments (decode), in routing_spec.COUNTERS order
    tokens = tl.sum(valid.to(tl.int32), 0)
    routed = tl.sum(tl.sum(keep_policy.to(tl.int32), 1), 0)
    tl.store(counts_acc_ptr + ci, counts_before + routing_counters(ci, tokens, routed, counts, hot, True),
             mask=ci < N_COUNTERS)
    tl.store(hits_ptr + e, counts.to(tl.int64), mask=live_e)
    tl.store(load_acc_ptr + e, load_before + counts.to(tl.int64), mask=live_e)
    if MASS:  # router probability routed to each expert (dynamic precision's hotness input), float64
        routed_prob = tl.where(keep, prob, 0.0).reshape(N).to(tl.float64)
        mass = tl.sum(tl.where(onehot != 0, routed_prob[:, None], 0.0), 0)
        tl.store(mass_acc_ptr + e, mass_before + mass, mask=live_e)


def _warps(tile: int) -> int:
    """Warps for a one-hot tile of this many elements: the fewest that keep it within ~64 registers a thread, since
    the program is a chain of small reductions, and reductions within one warp need no shared memory or barrier."""
    return min(8, max(1, tile // (64 * 32)))


def supports(policy: Routing, tokens: int, native_k: int, num_experts: int, device: torch.device) -> bool:
    """Whether decode_route serves this call: on the GPU or in Triton's interpreter, with its tiles in one program."""
    on_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    k = policy_k(policy, native_k)
    t_p2, k_p2, e_p2 = (triton.next_power_of_2(v) for v in (tokens, k, num_experts))
    n = t_p2 * k_p2
    # one program holds [tokens, k', experts] one-hot tiles, and for score priority [assignments, assignments]
    # comparisons: at most as many elements as kernels._align_kernel's tile
    return on_triton and n * e_p2 <= ALIGN_TILE_LIMIT and (policy.priority != "score" or n * n <= ALIGN_TILE_LIMIT)


def decode_route(logits: torch.Tensor, policy: Routing, native_k: int, native_norm: bool, valid: torch.Tensor,
                 beta: torch.Tensor | None, capacity_factor: torch.Tensor | None, hot: torch.Tensor | None,
                 block_m: int, counts_acc: torch.Tensor, load_acc: torch.Tensor, mass_acc: torch.Tensor | None):
    """routing.route(softmax(logits), policy, ..., sort_topk=True) then kernels.align_and_account(..., decode=True),
    in one launch. logits [T, E] (any float dtype); valid [T] bool; beta: the skip policy's float32 scalar tensor;
    capacity_factor: a float64 scalar tensor holding policy.capacity_factor (a tensor, so the kernel computes in
    float64 as route does). Adds into counts_acc / load_acc / mass_acc in place. Returns (weights float32 [T, k'],
    sorted_assign, block_expert, hits [E] int64), as the glue it replaces."""
    T, E = logits.shape
    k = policy_k(policy, native_k)
    mode = routing_spec.keep_rule_mode(policy.policy)
    if mode == _SKIP and beta is None:
        raise ValueError("skip policy needs a per-layer beta from the calibration stage")
    capped = policy.capacity_factor is not None
    if capped and capacity_factor is None:
        raise ValueError("a capacity-limited policy needs capacity_factor as a float64 tensor")
    renorm = renormalizes(policy, native_norm)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    max_blocks, rows = aligned_sizes(T * k, E, block_m)
    weights = torch.empty(T, k, dtype=torch.float32, device=device)
    sorted_assign = torch.empty(rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    hits = torch.empty(E, dtype=torch.int64, device=device)
    t_p2, k_p2, e_p2 = (triton.next_power_of_2(v) for v in (T, k, E))
    unused = weights  # pointers the kernel never dereferences (their feature is off)
    _decode_route_kernel[(1,)](
        logits, valid, beta if beta is not None else unused, capacity_factor if capped else unused,
        hot if hot is not None else unused, weights,
        sorted_assign, block_expert, hits, counts_acc, load_acc, mass_acc if mass_acc is not None else unused,
        T, E, rows, max_blocks, float(policy.top_p or 0.0), logits.stride(0),
        K=k, T_P2=t_p2, K_P2=k_p2, E_P2=e_p2, BLOCK_M=block_m, MODE=mode, RENORM=bool(renorm), CAPACITY=capped,
        SCORE=policy.priority == "score", HOT=hot is not None, MASS=mass_acc is not None,
        **aligned_blocks_tiles(rows, max_blocks, e_p2), num_warps=_warps(t_p2 * k_p2 * e_p2))
    return weights, sorted_assign, block_expert, hits
