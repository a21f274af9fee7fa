"""Mixed-precision MoE experts for the fast engine: per layer, one tier per width, one kernel launch per tier.

A precision map (precision.build_map) says which width serves each expert. Each tier of a layer references the
weights of that width for all experts (bf16: the model's own fused tensors; int: the quantize stage's packed
codes, moved to the device once) and a slot table that is -1 for experts served by another tier, so an expert's
weights are read by exactly one launch. The routing result never leaves the device.
"""
from __future__ import annotations

import torch

from ..grid import FULL_BITS
from . import lowbit
from .kernels import ExpertTier, align_assignments, grouped_expert_matmul, tile_sizes

PROJECTIONS = ("gate_up_proj", "down_proj")


def quantized_tier(q, device, serving: bool | None = None) -> ExpertTier:
    """An ExpertTier over a quant.core.QuantizedExperts (all experts) on `device`: as stored, or in lowbit's serving
    layout (made here, once per load; serving None = lowbit.SERVING_LAYOUT). Group sizes the serving layout cannot
    take keep the stored layout, logged by lowbit.serving_layout."""
    E, _, n_in = q.shape
    zeros = None if q.spec.symmetric else q.zeros.to(device)
    tier = ExpertTier(q.spec.bits, q.codes.to(device), q.scales.to(device), zeros, q.spec.columns_per_group(n_in), n_in)
    if lowbit.SERVING_LAYOUT if serving is None else serving:
        return lowbit.serving_layout(tier)
    return tier


def full_tier(weight: torch.Tensor) -> ExpertTier:
    """The checkpoint's own [E, out, in] expert tensor, read in place (no copy)."""
    return ExpertTier(FULL_BITS, weight, None, None, weight.shape[2], weight.shape[2])


def expert_buffers(x: torch.Tensor, weights: torch.Tensor, intermediate: int, hidden: int):
    """Per-assignment buffers of one layer's expert launches: the activations h (x's dtype), the routed outputs y
    (float32; rows of dropped assignments stay 0) and the routing weights as float32."""
    n = weights.numel()
    h = torch.empty(n, intermediate, dtype=x.dtype, device=x.device)
    y = torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    return h, y, weights.reshape(-1).float()


def block_m(num_assign: int, num_experts: int) -> int:
    """Rows per aligned block for this many assignments (one value for every tier of a layer)."""
    return tile_sizes(FULL_BITS, num_assign, num_experts)[0]


def static_tiers(experts_module, widths: torch.Tensor, quantized_layer: dict[int, dict[str, object]]) -> list[tuple]:
    """Tiers of a fixed precision map. widths [E]: the width serving each expert; quantized_layer[bits][projection]
    = QuantizedExperts. Each tier references all experts' weights at its width and a slot table (slot = expert id,
    -1 for experts served by another tier)."""
    device = experts_module.gate_up_proj.device
    E = widths.shape[0]
    tiers = []  # (slot_of_expert int32 [E], gate_up tier, down tier)
    for bits in sorted(set(widths.tolist()), reverse=True):
        slots = torch.where(widths == bits, torch.arange(E), -1).to(torch.int32).to(device)
        if bits == FULL_BITS:
            pair = [full_tier(getattr(experts_module, p)) for p in PROJECTIONS]
        else:
            pair = [quantized_tier(quantized_layer[bits][p], device) for p in PROJECTIONS]
        tiers.append((slots, *pair))
    return tiers


class FastMoeExperts:
    """Experts of one layer; __call__(x [T, H], index [T, k] (sentinel E = dropped), weights [T, k]) -> [T, H].

    tiers: (slot table int32 [E], gate_up ExpertTier, down ExpertTier), one kernel launch per projection each; an
    expert's row in a slot table is the index of its weights in that tier, -1 where another tier serves it. The
    tables may change between calls (fast/pools.py) as long as every expert stays in exactly one tier."""

    def __init__(self, tiers: list[tuple], num_experts: int, hidden: int, intermediate: int):
        self.tiers, self.num_experts, self.hidden, self.intermediate = tiers, num_experts, hidden, intermediate

    @classmethod
    def static(cls, experts_module, widths: torch.Tensor, quantized_layer: dict[int, dict[str, object]]):
        E, H, I = experts_module.down_proj.shape
        return cls(static_tiers(experts_module, widths, quantized_layer), E, H, I)

    def block_m(self, num_assign: int) -> int:
        return block_m(num_assign, self.num_experts)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, k = index.shape
        sorted_assign, block_expert = align_assignments(index, self.num_experts, self.block_m(T * k))
        return self.run(x, weights, sorted_assign, block_expert).view(T, k, self.hidden).sum(1).to(x.dtype)

    def run(self, x: torch.Tensor, weights: torch.Tensor, sorted_assign: torch.Tensor, block_expert: torch.Tensor,
            hits: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [T*k, H]: each assignment's expert output times its routing weight (0 for dropped ones).

        Summed over k by the caller: every row is written by exactly one tier or stays 0, and the sum order is
        fixed (deterministic, unlike atomics). `hits` (routed assignments per expert) is for offloading's experts."""
        T, k = weights.shape
        block_m = self.block_m(T * k)
        h, y, routed = expert_buffers(x, weights, self.intermediate, self.hidden)
        for slots, gate_up, _ in self.tiers:
            grouped_expert_matmul(x, h, sorted_assign, block_expert, slots, gate_up, k, block_m, gate_up=True)
        for slots, _, down in self.tiers:
            grouped_expert_matmul(h, y, sorted_assign, block_expert, slots, down, 1, block_m, routed_weight=routed)
        return y
