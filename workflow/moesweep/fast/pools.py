"""Online expert precision on the fast engine: DynaExq's fixed pools with asynchronous copies, and offloading.

Written by hand because it is the project's own contribution (no library serves mixed-precision expert pools).
The controller logic is dynamic.py's, shared with the reference path; what differs is how a decision reaches
the weights.

`DevicePrecisionPools` (dynamic, frozen): per layer every expert's low version stays on the GPU (one tier, slot =
expert id), and a fixed pool of N high-precision slots (precision.high_slots) holds the hot experts; the high
versions of all experts wait in pinned host memory. Two [L, E] slot tables say which tier serves each expert.
* The hotness EMA runs on the device, inside the captured decode step (engine.py adds each layer's routed
  probability mass into `mass`; `after_forward` folds it into `score`).
* Every `update_every` calls the host snapshots `score` with a non-blocking copy and decides once the snapshot
  has arrived (Event.query, never a wait): demotions switch the table at once (the low version is resident),
  which frees their slots; the promotions' copies then run on a side stream that first waits (on the GPU) for
  the table switch, so no step still reading a freed slot sees it overwritten.
* An expert switches to its high version at the first call boundary after its copy's event has completed.
  So no forward step waits for a copy, and the host never synchronises with the GPU on the decode path.
  The price: a promotion takes effect a few calls after the reference path would apply it
  (`switch_lag_calls`), and when it does depends on copy vs compute timing. Decisions are made on the same
  scores as on the reference path; a decision due while the previous one is still in flight (scores not yet
  on the host, or copies not complete) is skipped and counted (`decisions_skipped`). The host learns that the
  GPU is done only when it looks: a serving loop that reads each step's tokens (evaluate) sees snapshots one
  call later; a loop that never synchronises may see none before it ends.
`synchronous=True` applies each decision at the call it is due, as the reference path does (tests).

`DeviceOffload` (offload): full-precision experts only in a per-layer pool of floor(budget / expert bytes)
slots, managed by dynamic.OffloadCache (LRU). Which experts a call needs is known only after routing, so each
layer reads its routed set back to the host and fetches misses before its experts run: a host synchronisation
per layer, and therefore no CUDA graph for this policy (the glue is still compiled).
"""
from __future__ import annotations

import dataclasses

import torch

from ..dynamic import DynamicStats, OffloadCache, plan_transitions
from ..grid import FULL_BITS
from ..precision import assert_pool_budget, high_slots
from .kernels import ExpertTier, grouped_expert_matmul
from .moe import PROJECTIONS, FastMoeExperts, block_m, expert_buffers, full_tier, quantized_tier


def _pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pinned host copy (the source of asynchronous host-to-device copies)."""
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def _tier_parts(tier: ExpertTier) -> tuple:
    return tier.weight, tier.scales, tier.zeros


def _host_version(module, quantized_layer, bits) -> dict[str, tuple]:
    """Per projection (weight, scales, zeros) of every expert at `bits`, in pinned host memory."""
    out = {}
    for p in PROJECTIONS:
        tier = full_tier(getattr(module, p)) if bits == FULL_BITS else quantized_tier(quantized_layer[bits][p], "cpu")
        out[p] = (tier, tuple(_pinned(t) for t in _tier_parts(tier)))
    return out


def _pool_tier(template: ExpertTier, host: tuple, n: int, device) -> ExpertTier:
    """An empty tier of n slots shaped like one expert of `template`."""
    w, s, z = (None if t is None else torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=device) for t in host)
    return dataclasses.replace(template, weight=w, scales=s, zeros=z)  # keeps the layout (lowbit.ServingTier)


def _copy_expert(pool: ExpertTier, host: tuple, expert: int, slot: int) -> None:
    for dst, src in zip(_tier_parts(pool), host):
        if dst is not None:
            dst[slot].copy_(src[expert], non_blocking=True)


def _push(device_table: torch.Tensor, host_table: torch.Tensor) -> None:
    """Host mirror -> device table in stream order, without a host wait (pinned staging; torch's caching host
    allocator keeps the staging block alive until the copy has run)."""
    device_table.copy_(host_table.pin_memory(), non_blocking=True)


class DevicePrecisionPools:
    graph_safe = True  # the decode step can be captured: nothing in it reads back to the host

    def __init__(self, adapter, quantized: dict[int, dict], bits_high: int, bits_low: int,
                 start_high: dict[int, torch.Tensor], start_score: dict[int, torch.Tensor],
                 bytes_by_tier: dict[int, dict[int, torch.Tensor]], budget: dict[int, int], alpha: float,
                 update_every: int, delta: float, rate_limit: int, frozen: bool, synchronous: bool = False):
        layers = adapter.layers()
        self.layer_ids = [l.index for l in layers]
        self.device = layers[0].experts.down_proj.device
        E = adapter.num_experts
        self.hi, self.lo = bits_high, bits_low
        self.alpha, self.update_every, self.delta, self.rate_limit = alpha, update_every, delta, rate_limit
        self.frozen, self.synchronous = frozen, synchronous
        self.budget = [budget[i] for i in self.layer_ids]
        self.low_bytes = [int(bytes_by_tier[bits_low][i].sum()) for i in self.layer_ids]
        self.high_bytes = [int(bytes_by_tier[bits_high][i].max()) for i in self.layer_ids]
        self.slots = [high_slots(budget[i], bytes_by_tier[bits_low][i], bytes_by_tier[bits_high][i])
                      for i in self.layer_ids]
        self.start_high = torch.stack([start_high[i].bool() for i in self.layer_ids])
        self.start_score = torch.stack([start_score[i].double() for i in self.layer_ids])
        L = len(layers)
        self.score = torch.zeros(L, E, dtype=torch.float64, device=self.device)
        self.mass = torch.zeros_like(self.score)
        self.hi_table = torch.full((L, E), -1, dtype=torch.int32, device=self.device)  # expert -> pool slot
        self.lo_table = torch.full((L, E), -1, dtype=torch.int32, device=self.device)  # expert -> expert, or -1
        self.served_high = torch.zeros(L, E, dtype=torch.bool, device=self.device)  # accounting's hot mask
        self.hot = {i: self.served_high[li] for li, i in enumerate(self.layer_ids)}
        self.host_high, self.pools, self.experts = [], [], {}
        for li, l in enumerate(layers):
            high = _host_version(l.experts, {b: {p: quantized[b][f"layers.{l.index}.{p}"] for p in PROJECTIONS}
                                             for b in quantized}, bits_high)
            low = {p: (full_tier(getattr(l.experts, p)) if bits_low == FULL_BITS else
                       quantized_tier(quantized[bits_low][f"layers.{l.index}.{p}"], self.device)) for p in PROJECTIONS}
            self.host_high.append({p: host for p, (_, host) in high.items()})
            pool = {p: _pool_tier(tier, host, self.slots[li], self.device) for p, (tier, host) in high.items()}
            self.pools.append(pool)
            tiers = [(self.lo_table[li], *(low[p] for p in PROJECTIONS))]
            if self.slots[li]:  # a pool without slots serves nothing: no launch
                tiers.insert(0, (self.hi_table[li], *(pool[p] for p in PROJECTIONS)))
            self.experts[l.index] = FastMoeExperts(tiers, E, l.experts.down_proj.shape[1], l.experts.down_proj.shape[2])
        self.copy_stream = torch.cuda.Stream(device=self.device)
        self._snapshot = torch.empty(L, E, dtype=torch.float64, pin_memory=True)
        self.reset()

    # -- state ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """The starting map, pools filled with its high experts, the profiled hotness, fresh stats."""
        torch.cuda.current_stream().wait_stream(self.copy_stream)  # nothing of a previous run still copying
        self.high = self.start_high.clone()  # committed map (a promotion in flight counts as high: its slot is taken)
        self.slot_of = torch.full(self.high.shape, -1, dtype=torch.int32)  # host: pool slot of each high expert
        for li in range(len(self.layer_ids)):
            experts = self.high[li].nonzero().flatten().tolist()
            assert len(experts) <= self.slots[li], f"starting map of layer {self.layer_ids[li]} exceeds its pool"
            for slot, e in enumerate(experts):
                for p in PROJECTIONS:
                    _copy_expert(self.pools[li][p], self.host_high[li][p], e, slot)
                self.slot_of[li, e] = slot
        self.serving = self.slot_of.clone()  # host mirror of hi_table: slots whose copy has completed
        self._push_tables()
        self.score.copy_(self.start_score)
        self.mass.zero_()
        self.stats = DynamicStats()
        self.pending: list[tuple] = []  # (layer position, expert, slot, copy event, decision call)
        self._snapshot_event = None
        self._copy_clock: list[tuple] = []
        self.stats.record_trace(self._map_by_layer(), self._score_by_layer(self.start_score))
        torch.cuda.synchronize(self.device)

    def _push_tables(self) -> None:
        _push(self.hi_table, self.serving)
        high = self.serving >= 0
        _push(self.lo_table, torch.where(high, -1, torch.arange(self.serving.shape[1], dtype=torch.int32)))
        _push(self.served_high, high)

    def _map_by_layer(self) -> dict[int, torch.Tensor]:
        return {i: self.high[li] for li, i in enumerate(self.layer_ids)}

    def _score_by_layer(self, score: torch.Tensor) -> dict[int, torch.Tensor]:
        return {i: score[li] for li, i in enumerate(self.layer_ids)}

    def assert_budget(self, li: int) -> None:
        n = int(self.high[li].sum())
        assert_pool_budget(self.layer_ids[li], n, self.slots[li], self.low_bytes[li] + n * self.high_bytes[li],
                           self.budget[li])

    # -- per forward call -----------------------------------------------------------------------------------------
    def after_forward(self) -> None:
        """End of a forward call, on the device (inside the captured step): the hotness EMA."""
        self.score.mul_(self.alpha).add_(self.mass, alpha=1 - self.alpha)
        self.mass.zero_()

    def observe(self, layer, index, probs, keep) -> None:
        pass  # the fast engine accumulates the routed mass on the device

    def end_call(self) -> None:
        """Host side, between forward calls: switch completed promotions; snapshot and decide on schedule."""
        self.stats.calls += 1
        self._switch_completed()
        if not self.frozen and self.stats.calls % self.update_every == 0:
            if self._snapshot_event is not None or self.pending:
                # the previous decision is not through yet (its scores or its copies): deciding now could demote
                # an expert whose copy is still in flight, so this one is skipped, and counted
                self.stats.decisions_skipped += 1
            else:
                self._snapshot.copy_(self.score, non_blocking=True)
                self._snapshot_event = torch.cuda.Event()
                self._snapshot_event.record()
                self._snapshot_call = self.stats.calls
        if self._snapshot_event is not None and not self.pending and (self.synchronous or self._snapshot_event.query()):
            if self.synchronous:
                self._snapshot_event.synchronize()
            self._snapshot_event = None
            self._decide(self._snapshot.clone())
            if self.synchronous:
                self.finish()

    def _decide(self, score: torch.Tensor) -> None:
        self.stats.decisions += 1
        promotions = []
        for li in range(len(self.layer_ids)):
            pairs = plan_transitions(score[li], self.high[li], self.delta, self.rate_limit)
            for weak, out in pairs:
                slot = int(self.slot_of[li, weak])  # demote: the low version is resident, the slot is free
                self.high[li, weak], self.slot_of[li, weak], self.serving[li, weak] = False, -1, -1
                self.assert_budget(li)
                self.high[li, out], self.slot_of[li, out] = True, slot  # promote into the freed slot
                self.assert_budget(li)
                promotions.append((li, out, slot))
                self.stats.bytes_moved += self.high_bytes[li]
            self.stats.transitions += len(pairs)
        self.stats.record_trace(self._map_by_layer(), self._score_by_layer(score))
        if not promotions:
            return
        self._push_tables()  # demotions take effect in stream order
        freed = torch.cuda.Event()
        freed.record()
        start = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(freed)  # on the GPU: steps enqueued before the switch are done with the slots
            start.record()
            for li, e, slot in promotions:
                for p in PROJECTIONS:
                    _copy_expert(self.pools[li][p], self.host_high[li][p], e, slot)
                done = torch.cuda.Event(enable_timing=True)
                done.record()
                self.pending.append((li, e, slot, done, self._snapshot_call))
        self._copy_clock.append((start, done))

    def _switch_completed(self) -> None:
        switched = False
        while self.pending and self.pending[0][3].query():  # one stream: copies complete in order
            li, e, slot, _, call = self.pending.pop(0)
            self.serving[li, e] = slot
            self.stats.switch_lag_calls += self.stats.calls - call
            switched = True
        if switched:
            self._push_tables()
        while self._copy_clock and self._copy_clock[0][1].query():
            start, end = self._copy_clock.pop(0)
            self.stats.swap_s += start.elapsed_time(end) / 1e3

    def finish(self) -> None:
        """Wait for copies in flight and switch them (after a timed run, or at once when synchronous)."""
        if self.pending:
            self.pending[-1][3].synchronize()
        self._switch_completed()


class _OffloadLayer:
    """One layer's experts under offloading: fetch the call's misses into the LRU slots, run in chunks of at most
    `slots` experts (a call may use more experts than fit; OffloadCache evicts in the same order)."""

    def __init__(self, owner: "DeviceOffload", li: int, module):
        self.owner, self.li = owner, li
        self.layer = owner.layer_ids[li]
        self.host = {p: _pinned(getattr(module, p).detach()) for p in PROJECTIONS}
        n = owner.cache.slots[self.layer]
        self.pool = {p: full_tier(torch.empty((n, *self.host[p].shape[1:]), dtype=self.host[p].dtype,
                                              device=owner.device)) for p in PROJECTIONS}
        self.table = torch.full((module.down_proj.shape[0],), -1, dtype=torch.int32, device=owner.device)
        self.num_experts, self.hidden, self.intermediate = module.down_proj.shape

    def block_m(self, num_assign: int) -> int:
        return block_m(num_assign, self.num_experts)

    def run(self, x, weights, sorted_assign, block_expert, hits):
        T, k = weights.shape
        block_m = self.block_m(T * k)
        h, y, routed = expert_buffers(x, weights, self.intermediate, self.hidden)
        used = hits.nonzero().flatten().tolist()  # the host synchronisation of offloading: which experts to fetch
        cache = self.owner.cache
        per_chunk = cache.slots[self.layer]
        for c in range(0, len(used), per_chunk):
            chunk = used[c:c + per_chunk]
            for e, slot in cache.touch(self.layer, chunk):
                for p in PROJECTIONS:  # on the compute stream: this layer's experts need them next
                    self.pool[p].weight[slot].copy_(self.host[p][e], non_blocking=True)
            table = torch.full((self.num_experts,), -1, dtype=torch.int32)
            table[chunk] = torch.tensor([cache.resident[self.layer][e] for e in chunk], dtype=torch.int32)
            _push(self.table, table)  # only this chunk's experts: each row is computed exactly once
            grouped_expert_matmul(x, h, sorted_assign, block_expert, self.table, self.pool["gate_up_proj"], k, block_m,
                                  gate_up=True)
            grouped_expert_matmul(h, y, sorted_assign, block_expert, self.table, self.pool["down_proj"], 1, block_m,
                                  routed_weight=routed)
        return y


class DeviceOffload:
    graph_safe = False  # routing results go to the host every layer

    def __init__(self, adapter, expert_bytes: dict[int, torch.Tensor], budget: dict[int, int]):
        layers = adapter.layers()
        self.layer_ids = [l.index for l in layers]
        self.device = layers[0].experts.down_proj.device
        self.expert_bytes, self.budget_bytes = expert_bytes, budget
        self.cache = OffloadCache(expert_bytes, budget)
        self.experts = {l.index: _OffloadLayer(self, li, l.experts) for li, l in enumerate(layers)}
        self.hot = {}
        self.mass = None

    def reset(self) -> None:
        self.cache = OffloadCache(self.expert_bytes, self.budget_bytes)  # empty: every expert is fetched on first use

    @property
    def misses(self) -> int:
        return self.cache.misses

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def bytes_moved(self) -> int:
        return self.cache.bytes_moved

    def after_forward(self) -> None:
        pass

    def observe(self, layer, index, probs, keep) -> None:
        pass

    def end_call(self) -> None:
        pass

    def finish(self) -> None:
        pass
