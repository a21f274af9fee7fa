"""Online expert precision (DynaExq-style) and the offloading baseline: the controller logic, and its
synchronous realisation on the reference path (the fast engine's asynchronous one is fast/pools.py).

Written here because it is the project's own contribution: no library implements DynaExq's controller.
Semantics (arXiv 2511.15015, see config/README.md):

* memory: every expert's low-precision version stays resident (a demoted expert is served at once, with no
  copy), and the rest of the layer's byte budget is a fixed pool of N high-precision slots,
  N = floor((budget − Σ low bytes) / high bytes) (`high_slots`). Fixed-size slots mean no allocation while
  serving and a budget that holds at every instant by construction; the code still asserts it;
* hotness S[l, e] ← α·S + (1−α)·c after every forward call, c = router probability mass routed to expert e
  in that call (0 if unselected); S starts from the profile stage's probability shares, the map from the N
  hottest experts by that profile;
* every `update_every` forward calls, per layer (`plan_transitions`): an outsider replaces the weakest
  incumbent only when its hotness exceeds it by more than δ (hysteresis), as demote-then-promote pairs, at most
  `rate_limit` pairs per layer per decision. A demotion frees a slot (pointer switch, no bytes moved); the
  promotion copies the high version from host memory into that slot;
* `frozen` runs the same tracking but never changes the initial map (the overhead baseline of the paper).

On the CPU reference path a transition writes the other version's (dequantized) weights into the fused
expert tensors synchronously between forward calls; its accuracy effect is real, its time is not a GPU
copy's. The offloading baseline keeps full-precision experts resident within the same budget (LRU per layer)
and counts misses and bytes fetched; outputs equal full precision.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .precision import assert_pool_budget, high_slots


def plan_transitions(score: torch.Tensor, high: torch.Tensor, delta: float, rate_limit: int) -> list[tuple[int, int]]:
    """One layer's decision: (demoted incumbent, promoted outsider) pairs, hottest outsider against weakest
    incumbent first, while the outsider leads by more than delta, at most rate_limit pairs."""
    outsiders = [int(e) for e in torch.argsort(-score, stable=True) if not high[e]]
    incumbents = [int(e) for e in torch.argsort(score, stable=True) if high[e]]
    pairs = []
    for out, weak in zip(outsiders, incumbents):
        if len(pairs) >= rate_limit or not score[out] > score[weak] + delta:
            break
        pairs.append((weak, out))
    return pairs


@dataclass
class DynamicStats:
    decisions: int = 0
    transitions: int = 0  # promotions (each paired with one demotion)
    bytes_moved: int = 0  # bytes copied into high-precision slots (demotions move nothing)
    calls: int = 0
    swap_s: float = 0.0  # reference: wall time of decisions and writes; fast engine: GPU time of the copies
    switch_lag_calls: int = 0  # sum over promotions of forward calls from the decision to the switch
    decisions_skipped: int = 0  # fast engine: due while the previous decision was still in flight
    trace: list = field(default_factory=list)  # rows: decision, call, layer, high experts, hotness

    def record_trace(self, high: dict[int, torch.Tensor], score: dict[int, torch.Tensor]) -> None:
        for i in high:
            self.trace.append({"decision": self.decisions, "call": self.calls, "layer": i,
                               "high_experts": high[i].nonzero().flatten().tolist(), "hotness": score[i].tolist()})


class DynamicPrecision:
    """Controller of per-expert precision under a per-layer byte budget, applied synchronously (reference path)."""

    def __init__(self, layers: dict[int, object], high_mask: dict[int, torch.Tensor], hotness: dict[int, torch.Tensor],
                 versions: dict[int, dict[int, dict[str, torch.Tensor]]], bytes_by_tier: dict[int, dict[int, torch.Tensor]],
                 bits_high: int, bits_low: int, budget: dict[int, int], alpha: float = 0.9, update_every: int = 200,
                 delta: float = 0.01, rate_limit: int = 4, frozen: bool = False):
        self.layers = layers  # layer index -> experts module (fused tensors)
        self.high = {i: m.clone() for i, m in high_mask.items()}
        self.score = {i: h.double().clone() for i, h in hotness.items()}
        self.versions, self.bytes = versions, bytes_by_tier
        self.hi, self.lo = bits_high, bits_low
        self.budget = budget
        self.slots = {i: high_slots(budget[i], bytes_by_tier[bits_low][i], bytes_by_tier[bits_high][i]) for i in self.high}
        self.alpha, self.update_every, self.delta, self.rate_limit = alpha, update_every, delta, rate_limit
        self.frozen = frozen
        self.stats = DynamicStats()
        self._mass = {i: torch.zeros_like(s) for i, s in self.score.items()}
        for i, mask in self.high.items():  # (re)write the starting map: a new controller = a fresh start
            self.assert_budget(i)
            for e in range(mask.shape[0]):
                self._write(i, e, bool(mask[e]))
        self.stats.record_trace(self.high, self.score)

    def resident_bytes(self, layer: int) -> int:
        """Every expert's low version plus the occupied high-precision slots."""
        return int(self.bytes[self.lo][layer].sum() + self.bytes[self.hi][layer][self.high[layer]].sum())

    def allocated_bytes(self, layer: int) -> int:
        """Every expert's low version plus the whole pool of high-precision slots (what a GPU holds)."""
        return int(self.bytes[self.lo][layer].sum()) + self.slots[layer] * int(self.bytes[self.hi][layer].max())

    def assert_budget(self, layer: int) -> None:
        assert_pool_budget(layer, int(self.high[layer].sum()), self.slots[layer], self.resident_bytes(layer),
                           self.budget[layer])

    def observe(self, layer: int, index: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> None:
        """Router output of one layer in the current call: accumulate routed probability mass per expert."""
        self._mass[layer].index_add_(0, index[keep].cpu(), probs[keep].double().cpu())

    def end_call(self) -> None:
        """After every forward call: EMA update, and a decision every `update_every` calls."""
        for i, c in self._mass.items():
            self.score[i].mul_(self.alpha).add_(c, alpha=1 - self.alpha)
            c.zero_()
        self.stats.calls += 1
        if not self.frozen and self.stats.calls % self.update_every == 0:
            self.decide()

    def decide(self) -> None:
        start = time.perf_counter()
        self.stats.decisions += 1
        for i in self.high:
            pairs = plan_transitions(self.score[i], self.high[i], self.delta, self.rate_limit)
            for weak, out in pairs:
                self._set(i, weak, high=False)  # demote first: the slot is free before anything is copied into it
                self.assert_budget(i)
                self._set(i, out, high=True)
                self.assert_budget(i)
            self.stats.transitions += len(pairs)
        self.stats.record_trace(self.high, self.score)
        self.stats.swap_s += time.perf_counter() - start

    @torch.no_grad()
    def _write(self, layer: int, expert: int, high: bool) -> None:
        for name, tensor in self.versions[self.hi if high else self.lo][layer].items():
            getattr(self.layers[layer], name)[expert] = tensor[expert]

    def _set(self, layer: int, expert: int, high: bool) -> None:
        """A transition: serve the other version; a promotion counts the bytes copied into its slot."""
        self._write(layer, expert, high)
        self.high[layer][expert] = high
        if high:
            self.stats.bytes_moved += int(self.bytes[self.hi][layer][expert])


class OffloadCache:
    """Full-precision experts resident within a per-layer byte budget, least recently used evicted first.

    Each resident expert occupies one of the layer's fixed slots; `touch` is the bookkeeping of one call (both
    engines), `observe` its reference-path entry point."""

    def __init__(self, expert_bytes: dict[int, torch.Tensor], budget: dict[int, int]):
        self.expert_bytes = expert_bytes
        self.slots = {i: int(budget[i] // int(b.max())) for i, b in expert_bytes.items()}
        if any(n < 1 for n in self.slots.values()):
            raise ValueError("offloading budget holds no full-precision expert in some layer")
        self.resident: dict[int, OrderedDict] = {i: OrderedDict() for i in expert_bytes}  # expert -> slot
        self.misses = self.hits = self.bytes_moved = 0

    def touch(self, layer: int, experts: list[int]) -> list[tuple[int, int]]:
        """Experts (ascending, each once) used by this call: LRU update; returns the misses as (expert, slot)
        fetches in order. A call using more experts than there are slots evicts some of its own earlier ones
        (the fast engine runs such a call in chunks of at most `slots` experts)."""
        cache, fetches = self.resident[layer], []
        for e in experts:
            if e in cache:
                cache.move_to_end(e)
                self.hits += 1
                continue
            self.misses += 1
            self.bytes_moved += int(self.expert_bytes[layer][e])
            slot = cache.popitem(last=False)[1] if len(cache) >= self.slots[layer] else len(cache)
            cache[e] = slot
            fetches.append((e, slot))
        return fetches

    def observe(self, layer: int, index: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> None:
        self.touch(layer, torch.unique(index[keep]).tolist())  # one fetch per expert per call, however many tokens

    def end_call(self) -> None:
        pass
