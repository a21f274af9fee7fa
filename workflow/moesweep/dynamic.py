"""Online expert precision (DynaExq-style) and the offloading baseline, on the reference path.

Written here because it is the project's own contribution: no library implements DynaExq's controller.
Semantics (arXiv 2511.15015, see config/README.md):

* hotness S[l, e] ← α·S + (1−α)·c after every forward call, c = router probability mass routed to expert e
  in that call (0 if unselected); S starts from the profile stage's probability shares;
* every `update_every` forward calls, per layer: the N hottest experts should be at high precision, N from the
  memory budget. An outsider replaces the weakest incumbent only when its hotness exceeds it by more than δ
  (hysteresis); transitions happen as demote-then-promote pairs, at most `rate_limit` pairs per layer per
  decision, so the resident expert bytes never exceed the budget, not even between the two halves of a pair;
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


@dataclass
class DynamicStats:
    decisions: int = 0
    transitions: int = 0  # promotions (each paired with one demotion)
    bytes_moved: int = 0  # bytes of expert versions written (promoted high + demoted low)
    calls: int = 0
    swap_s: float = 0.0  # wall time spent in decisions and transitions
    trace: list = field(default_factory=list)  # rows: decision, call, layer, high experts, hotness


class DynamicPrecision:
    """Controller of per-expert precision under a per-layer byte budget."""

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
        self.alpha, self.update_every, self.delta, self.rate_limit = alpha, update_every, delta, rate_limit
        self.frozen = frozen
        self.stats = DynamicStats()
        self._mass = {i: torch.zeros_like(s) for i, s in self.score.items()}
        for i, mask in self.high.items():  # (re)write the starting map: a new controller = a fresh start
            self.assert_budget(i)
            for e in range(mask.shape[0]):
                self._write(i, e, bool(mask[e]))
        self._record_trace()

    def resident_bytes(self, layer: int) -> int:
        hi, lo = self.bytes[self.hi][layer], self.bytes[self.lo][layer]
        m = self.high[layer]
        return int(hi[m].sum() + lo[~m].sum())

    def assert_budget(self, layer: int) -> None:
        used = self.resident_bytes(layer)
        assert used <= self.budget[layer], f"layer {layer}: {used} resident expert bytes exceed the budget {self.budget[layer]}"

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
            s, high = self.score[i], self.high[i]
            outsiders = [int(e) for e in torch.argsort(-s, stable=True) if not high[e]]
            incumbents = [int(e) for e in torch.argsort(s, stable=True) if high[e]]
            pairs = 0
            for out, weak in zip(outsiders, incumbents):
                if pairs >= self.rate_limit or not s[out] > s[weak] + self.delta:
                    break
                self._set(i, weak, high=False)  # demote first: bytes only fall, the budget holds throughout
                self.assert_budget(i)
                self._set(i, out, high=True)
                self.assert_budget(i)
                pairs += 1
            self.stats.transitions += pairs
        self._record_trace()
        self.stats.swap_s += time.perf_counter() - start

    @torch.no_grad()
    def _write(self, layer: int, expert: int, high: bool) -> None:
        for name, tensor in self.versions[self.hi if high else self.lo][layer].items():
            getattr(self.layers[layer], name)[expert] = tensor[expert]

    def _set(self, layer: int, expert: int, high: bool) -> None:
        """A transition: write the other version and count its bytes."""
        self._write(layer, expert, high)
        self.high[layer][expert] = high
        self.stats.bytes_moved += int(self.bytes[self.hi if high else self.lo][layer][expert])

    def _record_trace(self) -> None:
        for i in self.high:
            self.stats.trace.append({"decision": self.stats.decisions, "call": self.stats.calls, "layer": i,
                                     "high_experts": self.high[i].nonzero().flatten().tolist(),
                                     "hotness": self.score[i].tolist()})


class OffloadCache:
    """Full-precision experts resident within a per-layer byte budget, least recently used evicted first."""

    def __init__(self, expert_bytes: dict[int, torch.Tensor], budget: dict[int, int]):
        self.expert_bytes = expert_bytes
        self.slots = {i: int(budget[i] // int(b.max())) for i, b in expert_bytes.items()}
        if any(n < 1 for n in self.slots.values()):
            raise ValueError("offloading budget holds no full-precision expert in some layer")
        self.resident: dict[int, OrderedDict] = {i: OrderedDict() for i in expert_bytes}
        self.misses = self.hits = self.bytes_moved = 0

    def observe(self, layer: int, index: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> None:
        cache = self.resident[layer]
        for e in torch.unique(index[keep]).tolist():  # one fetch per expert per call, however many tokens
            if e in cache:
                cache.move_to_end(e)
                self.hits += 1
                continue
            self.misses += 1
            self.bytes_moved += int(self.expert_bytes[layer][e])
            if len(cache) >= self.slots[layer]:
                cache.popitem(last=False)
            cache[e] = True

    def end_call(self) -> None:
        pass
