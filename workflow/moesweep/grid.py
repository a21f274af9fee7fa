"""The sweep grid: config → ordered list of frozen cell records with stable, readable ids.

A cell is one point of the grid: a routing policy × a precision policy, evaluated under the config's
shared evaluation settings. This module is the one definition of what a cell is; the Snakefile uses the
ids as the evaluate rule's only wildcard, the evaluate stage receives the record, and the record's fields
become columns of `cells.parquet`. Parse-time cheap: no torch import.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass

ROUTING_POLICIES = ("native", "topk", "skip", "top_p")
PRECISION_POLICIES = ("full", "uniform", "hotcold", "dynamic", "frozen", "offload")
# DynaExq's published Qwen3-30B-A3B settings (arXiv 2511.15015): α, T_u (forward calls), δ, transitions per decision.
DYNAMIC_DEFAULTS = {"alpha": 0.9, "update_every": 200, "delta": 0.01, "rate_limit": 4}
PRIORITIES = ("token_order", "score")
QUANT_BITS = (2, 3, 4, 8)
FULL_BITS = 16


class GridError(ValueError):
    """The grid section of the config is invalid; the message names the entry and what is allowed."""


@dataclass(frozen=True)
class Routing:
    policy: str = "native"
    top_k: int | None = None  # None = the checkpoint's own k
    capacity_factor: float | None = None  # None = dropless
    priority: str = "token_order"
    renormalize: bool | None = None  # None = as the checkpoint's norm_topk_prob says
    top_p: float | None = None

    def slug(self) -> str:
        if self.policy == "native":
            base = "native"
        elif self.policy == "topk":
            base = f"top{self.top_k}"
        elif self.policy == "skip":
            base = "skip"
        else:
            base = f"topp{self.top_p:g}"
        if self.capacity_factor is not None:
            base += f"-cf{self.capacity_factor:g}"
            if self.priority == "score":
                base += "-bpr"
        if self.renormalize is not None and self.policy != "native":
            base += "-renorm" if self.renormalize else "-norenorm"
        return base


@dataclass(frozen=True)
class Precision:
    policy: str = "full"
    bits_high: int = FULL_BITS
    bits_low: int = FULL_BITS
    memory_budget: float | None = None  # fraction of the unquantized (16-bit) expert-weight bytes
    memory_budget_gb: float | None = None  # or absolute: GB (1e9 bytes) of resident expert weights, all MoE layers
    allocation: str | None = None  # hotcold/dynamic/frozen: high-precision slots per layer, "uniform" or "hotness"
    alpha: float | None = None  # dynamic/frozen: hotness EMA factor
    update_every: int | None = None  # dynamic/frozen: forward calls between decisions (T_u)
    delta: float | None = None  # dynamic/frozen: hysteresis margin
    rate_limit: int | None = None  # dynamic/frozen: demote-promote pairs per layer per decision

    def slug(self) -> str:
        if self.policy == "full":
            return "w16"
        if self.policy == "uniform":
            return f"w{self.bits_low}"
        budget = f"b{self.memory_budget:g}" if self.memory_budget_gb is None else f"b{self.memory_budget_gb:g}GB"
        if self.policy == "offload":
            return f"offload-{budget}"
        prefix = {"hotcold": "hot", "dynamic": "dyn", "frozen": "frozen"}[self.policy]
        slug = f"{prefix}{self.bits_high}-cold{self.bits_low}-{budget}"
        if self.allocation == "hotness":
            slug += "-alloc_hot"
        if self.policy in ("dynamic", "frozen"):  # parameters that differ from the published defaults
            short = {"alpha": "a", "update_every": "u", "delta": "d", "rate_limit": "r"}
            slug += "".join(f"-{short[k]}{getattr(self, k):g}" for k, v in DYNAMIC_DEFAULTS.items() if getattr(self, k) != v)
        return slug

    @property
    def widths(self) -> tuple[int, ...]:
        """Quantized widths this cell reads from the quantize stage."""
        return tuple(sorted({b for b in (self.bits_high, self.bits_low) if b != FULL_BITS}))


@dataclass(frozen=True)
class Cell:
    id: str
    family: str
    routing: Routing
    precision: Precision

    def to_dict(self) -> dict:
        return {"id": self.id, "family": self.family, "routing": asdict(self.routing), "precision": asdict(self.precision)}

    @staticmethod
    def from_dict(d: dict) -> "Cell":
        return Cell(d["id"], d["family"], Routing(**d["routing"]), Precision(**d["precision"]))


def _expand(params: dict) -> list[dict]:
    """Cartesian product over list-valued parameters (scalars stay fixed); key order is kept."""
    keys = list(params)
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _routing(spec: dict, where: str) -> Routing:
    policy = spec.get("policy")
    if policy not in ROUTING_POLICIES:
        raise GridError(f"{where}: unknown routing policy {policy!r}; allowed: {', '.join(ROUTING_POLICIES)}")
    r = Routing(**spec)
    if r.policy == "topk" and (not isinstance(r.top_k, int) or r.top_k < 1):
        raise GridError(f"{where}: top_k must be an integer ≥ 1 for policy 'topk', got {r.top_k!r}")
    if r.policy != "topk" and r.top_k is not None:
        raise GridError(f"{where}: top_k is only allowed with policy 'topk' (got policy {r.policy!r})")
    if r.capacity_factor is not None and not r.capacity_factor > 0:
        raise GridError(f"{where}: capacity_factor must be > 0 or null (dropless), got {r.capacity_factor!r}")
    if r.priority not in PRIORITIES:
        raise GridError(f"{where}: priority must be one of {PRIORITIES}, got {r.priority!r}")
    if (r.policy == "top_p") != (r.top_p is not None):
        raise GridError(f"{where}: top_p (in (0, 1]) is required by, and only allowed with, policy 'top_p'")
    if r.top_p is not None and not 0 < r.top_p <= 1:
        raise GridError(f"{where}: top_p must be in (0, 1], got {r.top_p!r}")
    return r


ALLOCATIONS = ("uniform", "hotness")
PRECISION_KEYS = {"full": set(), "uniform": {"bits"},
                  "hotcold": {"bits_high", "bits_low", "memory_budget", "memory_budget_gb", "allocation"},
                  "offload": {"memory_budget", "memory_budget_gb"}}
PRECISION_KEYS["dynamic"] = PRECISION_KEYS["frozen"] = PRECISION_KEYS["hotcold"] | set(DYNAMIC_DEFAULTS)


def _precision(spec: dict, where: str) -> Precision:
    policy = spec.get("policy")
    if policy in PRECISION_KEYS:
        extra = set(spec) - {"policy"} - PRECISION_KEYS[policy]
        if extra:
            raise GridError(f"{where}: {', '.join(sorted(extra))} not allowed with precision policy {policy!r}; "
                            f"allowed: {', '.join(sorted(PRECISION_KEYS[policy])) or 'none'}")
    if policy == "full":
        return Precision()
    if policy == "uniform":
        bits = spec.get("bits")
        if bits not in QUANT_BITS:
            raise GridError(f"{where}: uniform precision bits must be one of {QUANT_BITS}, got {bits!r}")
        return Precision("uniform", bits, bits, None)
    if policy == "offload":
        budget, gb = _budget(spec, where, 1)
        return Precision("offload", FULL_BITS, FULL_BITS, budget, gb)
    if policy in ("hotcold", "dynamic", "frozen"):
        hi, lo = spec.get("bits_high"), spec.get("bits_low")
        if hi not in QUANT_BITS + (FULL_BITS,) or lo not in QUANT_BITS or lo >= hi:
            raise GridError(f"{where}: hotcold needs bits_high in {QUANT_BITS + (FULL_BITS,)} and bits_low in "
                            f"{QUANT_BITS} with bits_low < bits_high, got ({hi!r}, {lo!r})")
        # dynamic/frozen keep every low version resident besides their high slots: all experts high needs
        # 1 + (low bytes / 16-bit bytes) of the 16-bit bytes, hence up to 2
        budget, gb = _budget(spec, where, 1 if policy == "hotcold" else 2)
        allocation = spec.get("allocation", "uniform")
        if allocation not in ALLOCATIONS:
            raise GridError(f"{where}: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if policy == "hotcold":
            return Precision("hotcold", hi, lo, budget, gb, allocation)
        params = {k: spec.get(k, v) for k, v in DYNAMIC_DEFAULTS.items()}
        if not 0 < params["alpha"] < 1:
            raise GridError(f"{where}: alpha must be in (0, 1), got {params['alpha']!r}")
        if not (isinstance(params["update_every"], int) and params["update_every"] >= 1):
            raise GridError(f"{where}: update_every must be an integer ≥ 1 (forward calls), got {params['update_every']!r}")
        if not params["delta"] >= 0:
            raise GridError(f"{where}: delta must be ≥ 0, got {params['delta']!r}")
        if not (isinstance(params["rate_limit"], int) and params["rate_limit"] >= 1):
            raise GridError(f"{where}: rate_limit must be an integer ≥ 1, got {params['rate_limit']!r}")
        return Precision(policy, hi, lo, budget, gb, allocation, **params)
    raise GridError(f"{where}: unknown precision policy {policy!r}; allowed: {', '.join(PRECISION_POLICIES)}")


def _budget(spec: dict, where: str, top: float) -> tuple[float | None, float | None]:
    """(memory_budget, memory_budget_gb): exactly one, a fraction in (0, top] of the 16-bit expert bytes or a
    positive number of GB (1e9 bytes) over all MoE layers (checked against the checkpoint when the DAG is built)."""
    budget, gb = spec.get("memory_budget"), spec.get("memory_budget_gb")
    if (budget is None) == (gb is None):
        raise GridError(f"{where}: give exactly one of memory_budget (a fraction of the 16-bit expert bytes) and "
                        f"memory_budget_gb (GB of resident expert weights)")
    if gb is not None:
        if not isinstance(gb, (int, float)) or isinstance(gb, bool) or not gb > 0:
            raise GridError(f"{where}: memory_budget_gb must be a number of GB > 0, got {gb!r}")
        return None, float(gb)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= top:
        raise GridError(f"{where}: memory_budget must be a fraction in (0, {top:g}] of the 16-bit expert bytes, "
                        f"got {budget!r}")
    return float(budget), None


def expand_grid(grid: list[dict]) -> list[Cell]:
    """Expand the config's `grid` entries into cells, in config order, refusing duplicates and an empty grid."""
    if not grid:
        raise GridError("grid: empty; list at least one entry (see config/README.md)")
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(grid):
        family = entry.get("family") or f"entry{i}"
        where = f"grid[{i}] ({family})"
        for r_params in _expand(dict(entry.get("routing", {"policy": "native"}))):
            routing = _routing(r_params, where)
            for p_params in _expand(dict(entry.get("precision", {"policy": "full"}))):
                precision = _precision(p_params, where)
                cell_id = f"{routing.slug()}-{precision.slug()}"
                if cell_id in seen:
                    raise GridError(f"{where}: cell {cell_id!r} is already produced by {seen[cell_id]}; remove the duplicate")
                seen[cell_id] = where
                cells.append(Cell(cell_id, family, routing, precision))
    return cells


def config_hash(*parts) -> str:
    """Short stable hash of JSON-serialisable parts (sorted keys), recorded in every result row."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

