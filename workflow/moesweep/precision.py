"""Expert precision maps under a memory budget, and applying them to a model (reference path).

A precision map assigns each (layer, expert) a width: 16 (the checkpoint's weights) or a quantized width
from the quantize stage. On the reference path the chosen version of each expert is materialised into the
fused expert tensors (dequantised on load), which is numerically what a weight-only kernel computes.
Memory accounting uses the exact packed bytes of each expert version (16-bit = 2 bytes per weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import FULL_BITS, Precision


class BudgetError(ValueError):
    """A memory budget that no precision map of the requested tiers can meet."""


def high_slots(budget: int, low_bytes: torch.Tensor, high_bytes: torch.Tensor) -> int:
    """High-precision slots of one layer's pool under the online policies (dynamic, frozen): what the budget
    leaves after every expert's low version, which stays resident so a demoted expert is served at once."""
    free = int(budget) - int(low_bytes.sum())
    if free < 0:
        raise BudgetError(f"the budget of {int(budget)} bytes is below the {int(low_bytes.sum())} bytes of every "
                          f"expert at the low width")
    return min(len(low_bytes), free // int(high_bytes.max()))


def assert_pool_budget(layer: int, n_high: int, slots: int, resident: int, budget: int) -> None:
    """The online policies' invariant, checked after each half of a transition by both controllers."""
    assert n_high <= slots and resident <= budget, (
        f"layer {layer}: {n_high} high-precision experts in {slots} slots, {resident} resident expert bytes; "
        f"they exceed the budget {budget}")


@dataclass
class PrecisionMap:
    bits: dict[int, torch.Tensor]  # layer -> [E] int width per expert
    expert_bytes: int  # resident expert-weight bytes of this map
    full_bytes: int  # the same experts at 16 bit
    budget_bytes: int | None
    layer_budgets: dict[int, int] | None = None  # the budget of each layer (policies with a budget)

    def hot_masks(self, high: int) -> dict[int, torch.Tensor]:
        return {layer: b == high for layer, b in self.bits.items()}


def full_expert_bytes(adapter) -> dict[int, torch.Tensor]:
    """Bytes per expert per layer at 16 bit: gate_up + down weights × 2 bytes."""
    out = {}
    for l in adapter.layers():
        per_expert = (l.experts.gate_up_proj[0].numel() + l.experts.down_proj[0].numel()) * 2
        out[l.index] = torch.full((adapter.num_experts,), per_expert, dtype=torch.long)
    return out


def tier_bytes(quantized: dict[int, dict], layers: list[int], full: dict[int, torch.Tensor]) -> dict[int, dict[int, torch.Tensor]]:
    """bytes[bits][layer] = [E] exact bytes per expert version; `quantized[bits]` = loaded quant file."""
    out = {FULL_BITS: full}
    for bits, tensors in quantized.items():
        from .quant import expert_nbytes  # only when quantized tiers are used (needs llm-compressor)

        out[bits] = {i: expert_nbytes(tensors[f"layers.{i}.gate_up_proj"]) + expert_nbytes(tensors[f"layers.{i}.down_proj"])
                     for i in layers}
    return out


def budget_text(precision: Precision) -> str:
    return (f"memory_budget {precision.memory_budget:g}" if precision.memory_budget_gb is None
            else f"memory_budget_gb {precision.memory_budget_gb:g}")


def total_budget(precision: Precision, full: dict[int, torch.Tensor]) -> int:
    """Resident expert bytes the cell may use over all MoE layers."""
    if precision.memory_budget_gb is not None:
        return int(precision.memory_budget_gb * 1e9)
    return int(precision.memory_budget * sum(int(b.sum()) for b in full.values()))


def layer_budgets(precision: Precision, bytes_by_tier, shares: dict[int, torch.Tensor] | None = None) -> dict[int, int]:
    """Per-layer byte budgets.

    uniform (and offload): the budget split in proportion to each layer's 16-bit expert bytes.
    hotness (hotcold/dynamic/frozen, `allocation: hotness`): every layer's low versions first; the rest goes to
    high-precision experts across layers in order of their profiled share of the routed probability mass,
    hottest (layer, expert) first, until the next one does not fit. Layers whose routing concentrates on few
    experts thus get more high-precision slots. A layer's budget is exactly its low bytes plus what it got."""
    full = bytes_by_tier[FULL_BITS]
    if precision.allocation != "hotness":
        if precision.memory_budget_gb is None:  # per layer, as the fraction says (no rounding across layers)
            return {i: int(precision.memory_budget * int(b.sum())) for i, b in full.items()}
        total, full_total = total_budget(precision, full), sum(int(b.sum()) for b in full.values())
        return {i: total * int(b.sum()) // full_total for i, b in full.items()}
    if shares is None:
        raise ValueError("allocation 'hotness' needs the profile stage's hotness table")
    hi, lo = bytes_by_tier[precision.bits_high], bytes_by_tier[precision.bits_low]
    budget = {i: int(lo[i].sum()) for i in full}
    free = total_budget(precision, full) - sum(budget.values())
    if free < 0:
        raise BudgetError(f"{budget_text(precision)} is below the smallest feasible for tiers ({precision.bits_high}, "
                          f"{precision.bits_low}): every expert at {precision.bits_low} bit needs {sum(budget.values())} "
                          f"bytes")
    pool = precision.policy in ("dynamic", "frozen")  # a pool slot costs a whole high version (dynamic.py)
    ranked = sorted(((float(shares[i][e]), i, e) for i in full for e in range(len(shares[i]))),
                    key=lambda t: (-t[0], t[1], t[2]))
    for _, i, e in ranked:
        cost = int(hi[i].max()) if pool else int(hi[i][e]) - int(lo[i][e])
        if cost > free:
            break
        budget[i] += cost
        free -= cost
    return budget


def build_map(precision: Precision, layers: list[int], num_experts: int, bytes_by_tier, hotness=None,
              shares=None) -> PrecisionMap:
    """Uniform or hot/cold map, or the starting map of dynamic and frozen, within `layer_budgets`. Hot/cold: per
    layer the largest N such that the N hottest experts (by profiled routed probability mass) at bits_high and the
    rest at bits_low fit the layer's budget. Dynamic/frozen: the N hottest fill the layer's pool of `high_slots`
    high-precision slots, every low version staying resident. `shares`: profiled shares (allocation: hotness)."""
    full = bytes_by_tier[FULL_BITS]
    full_total = int(sum(int(full[i].sum()) for i in layers))
    if precision.policy == "full":
        bits = {i: torch.full((num_experts,), FULL_BITS) for i in layers}
        return PrecisionMap(bits, full_total, full_total, None)
    if precision.policy == "uniform":
        bits = {i: torch.full((num_experts,), precision.bits_low) for i in layers}
        used = sum(int(bytes_by_tier[precision.bits_low][i].sum()) for i in layers)
        return PrecisionMap(bits, used, full_total, None)

    budgets = layer_budgets(precision, bytes_by_tier, shares)
    if precision.policy == "offload":
        # Weights stay at full precision; what is resident is a per-layer LRU cache of whole experts.
        bits = {i: torch.full((num_experts,), FULL_BITS) for i in layers}
        resident = sum(budgets[i] // int(full[i].max()) * int(full[i].max()) for i in layers)
        return PrecisionMap(bits, resident, full_total, total_budget(precision, full), budgets)

    hi, lo = precision.bits_high, precision.bits_low
    bits, used = {}, 0
    for i in layers:
        budget = budgets[i]
        order = hotness[i]  # expert ids, hottest first
        b_hi, b_lo = bytes_by_tier[hi][i], bytes_by_tier[lo][i]
        layer_bits = torch.full((num_experts,), lo)
        cost = int(b_lo.sum())
        if cost > budget:
            raise BudgetError(f"{budget_text(precision)} is below the smallest feasible for tiers ({hi}, {lo}): all "
                              f"experts of layer {i} at {lo} bit need {cost / int(full[i].sum()):.4f} of the 16-bit "
                              f"bytes")
        if precision.policy in ("dynamic", "frozen"):
            # Online policies: every low version resident plus a pool of N high slots (dynamic.py); the starting
            # map fills the pool with the N hottest experts, and what the pool holds is allocated whether used or not.
            n = high_slots(budget, b_lo, b_hi)
            layer_bits[torch.tensor(order[:n], dtype=torch.long)] = hi
            cost += n * int(b_hi.max())
        else:
            for e in order:
                extra = int(b_hi[e]) - int(b_lo[e])
                if cost + extra > budget:
                    break
                layer_bits[e] = hi
                cost += extra
        bits[i], used = layer_bits, used + cost
    return PrecisionMap(bits, used, full_total, total_budget(precision, full), budgets)


@torch.no_grad()
def apply_map(adapter, pmap: PrecisionMap, quantized: dict[int, dict]) -> None:
    """Materialise each expert's chosen version into the model's fused tensors (dequantised)."""
    for l in adapter.layers():
        widths = pmap.bits[l.index]
        for bits in sorted(set(widths.tolist()) - {FULL_BITS}):
            from .quant import dequantize  # only for quantized tiers (needs llm-compressor)

            experts = (widths == bits).nonzero().flatten()
            for name in ("gate_up_proj", "down_proj"):
                target = getattr(l.experts, name)
                dq = dequantize(quantized[bits][f"layers.{l.index}.{name}"], dtype=target.dtype)
                target[experts] = dq[experts].to(target.device)


@torch.no_grad()
def expert_versions(adapter, quantized: dict[int, dict], widths) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    """versions[bits][layer][projection] = [E, out, in] weights of every expert at that width (16 = current)."""
    from .quant import dequantize

    out = {}
    for bits in widths:
        out[bits] = {}
        for l in adapter.layers():
            out[bits][l.index] = {}
            for name in ("gate_up_proj", "down_proj"):
                target = getattr(l.experts, name)
                out[bits][l.index][name] = (target.detach().clone() if bits == FULL_BITS else
                                            dequantize(quantized[bits][f"layers.{l.index}.{name}"], dtype=target.dtype))
    return out
