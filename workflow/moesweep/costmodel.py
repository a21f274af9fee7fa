"""Cost model: decode tokens/s and memory fit of a grid cell on a hardware profile, from its measured traffic.

Why a model and not a clock: the reference engine is overhead-bound (Python and per-expert kernels; README),
so its tokens/s says nothing about what a policy buys on a GPU. What a policy changes — which experts a decode
step reads, at which width, what crosses the host link — is measured exactly per cell; this module turns those
counts into bytes per decode step and bytes into time on a given card. No torch, no Snakemake here.

Measured per cell (evaluate stage, reference engine, last timed repeat; columns of cells.parquet/layers.parquet):
    S            decode steps (forward calls after prefill; one token per live sequence)
    T            decode tokens per step = decode_tokens / S (mean live batch; finished sequences leave)
    D_l, D_l^hi  per MoE layer: Σ over decode steps of the distinct experts with ≥ 1 kept assignment, and of
                 those at bits_high (the live hot/cold map) — divided by S: distinct experts read per step
    κ_l          kept (token, expert) assignments per decode token in layer l
    C            mean decode context: Σ over decode tokens of the positions attended (prompt + tokens so far)
    H_dec        bytes moved over the host link during decode calls (dynamic-precision swaps, offload fetches)
    B_hi, B_lo   exact packed bytes of one expert at bits_high / bits_low (16 bit = 2 bytes per weight)
    R_exp        resident expert-weight bytes of the precision map (offload: the cache capacity)
From the model's shapes (config.json; weights and KV cache at 16 bit, 2 bytes — the checkpoint dtype of every
Qwen3 release and the same convention as the 16-bit expert tier, whatever compute dtype the CPU run used):
    W_step       non-expert weights read per step: attention (q, k, v, o, q/k norms), layer norms, routers,
                 final norm and lm_head (or the tied embedding matrix), plus T embedding rows
    W_dense      resident non-expert weights: the above with the whole embedding table
    K            KV-cache bytes per token = layers × 2 (K and V) × kv_heads × head_dim × 2 bytes

Traffic per decode step (bytes):
    expert = Σ_l [D_l^hi · B_hi + (D_l − D_l^hi) · B_lo]
    kv     = T · C · K
    HBM    = W_step + expert + kv
    host   = H_dec / S

Prediction on a hardware profile (bandwidth β, efficiency η, host link λ with efficiency η_λ, capacity M):
    t_hbm  = HBM / (β · η)            t_host = host / (λ · η_λ)
    t_ovh  = step_overhead + layers · kernels_per_layer · kernel_launch
    t_step = t_hbm + t_host + t_ovh            (overlap_host_link: max(t_hbm, t_host) + t_ovh)
    tokens/s = T / t_step                      (compare with the measured decode_tokens_per_s)
    resident = W_dense + R_exp + batch_size · (max_prompt_tokens + max_new_tokens) · K + reserved
    fits     = resident ≤ M
Compute is ignored: at decode batch sizes an MoE layer is memory-bound (H200 datasheet: 989 TFLOP/s dense bf16
against 4.8 TB/s — a step would need ≈ 200 FLOP per byte read to be compute-bound), so the prediction is
a bandwidth roofline scaled by η plus explicit overhead terms; with the shipped zero overheads it is an upper
bound on what an engine can reach.

Projection onto another model's shapes (a target config.json, e.g. Qwen3-30B-A3B from the tiny model's run):
what is measured is routing behaviour, what is projected is its size. Target MoE layer j (of L_t) takes the
measured layer m = ⌊j · L_m / L_t⌋. The target's distinct experts per step, with k′ the policy's k (top-k′ for
`topk`, otherwise the native k) and κ_t = κ_m · k′_t / k′_m:
    scaled   (default) D_t = min(ρ · U(T, κ_t, E_t), E_t, T·κ_t), ρ = D_m / U(T, κ_m, E_m),
             U(T, κ, E) = E · (1 − (1 − κ/E)^T), the expectation for T tokens choosing κ of E experts uniformly.
             ρ carries the measured concentration (hot experts: ρ < 1) while the target's own k/E sets the scale;
             exact at T = 1 (ρ = 1, D = κ) and at saturation.
    fraction D_t = D_m / E_m · E_t, the measured fraction of the layer's experts. Only right when both models have
             the same k/E (tiny: 4/16; Qwen3-30B-A3B: 8/128 — at batch 1 this overstates the target's reads 4×).
The share of distinct experts at high precision (D^hi/D), the tier bytes relative to 16 bit (B_hi/B_16, exact
when every projection's input dimension is a multiple of the group size in both models), the resident expert
fraction R_exp / R_16, and host bytes per step relative to expert bytes read per step are carried over
unchanged; W_step, W_dense and K come from the target's shapes. T and C stay the measured ones (the tiny
model's tokenizer and stopping behaviour) unless given.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .checks import moe_layer_indices

HARDWARE_FILE = Path(__file__).resolve().parents[2] / "config" / "hardware.yaml"
WEIGHT_BYTES = 2  # non-expert weights at 16 bit (see the module docstring)
KV_BYTES = 2  # bf16/fp16 KV cache
GB = 1e9  # bandwidths: datasheet GB/s are decimal
GIB = 2 ** 30  # capacities: datasheet "GB" of GPU memory are binary (80 GB HBM = 5 × 16 GiB stacks)
NAME = re.compile(r"^[a-z0-9_]+$")  # profile names become column names: projected_tokens_per_s_<name>
DISTINCT_MODELS = ("scaled", "fraction")
SHAPE_MODEL_TYPES = ("qwen3_moe",)  # families whose parameter shapes ModelShapes knows


class CostModelError(ValueError):
    """Bad hardware profile, cost_model setting, model shapes or cell record; the message names the key."""


# --------------------------------------------------------------------------------------------- model shapes

@dataclass(frozen=True)
class ModelShapes:
    """Parameter shapes of a Qwen3-MoE decoder (what the cost model needs of a config.json)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    dense_intermediate: int  # MLP width of the non-MoE layers (mlp_only_layers), if any
    vocab: int
    tied_embeddings: bool
    attention_bias: bool
    moe_layers: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: Mapping, name: str = "") -> "ModelShapes":
        where = f"model config {name!r}" if name else "model config"
        if cfg.get("model_type") not in SHAPE_MODEL_TYPES:
            raise CostModelError(f"{where}: model_type {cfg.get('model_type')!r}; the cost model knows the shapes of "
                                 f"{', '.join(SHAPE_MODEL_TYPES)}")

        def need(key):
            if cfg.get(key) is None:
                raise CostModelError(f"{where}: missing {key!r}")
            return cfg[key]

        # transformers 5 writes num_local_experts, older configs and the hub checkpoints num_experts
        experts = {k: cfg[k] for k in ("num_experts", "num_local_experts") if cfg.get(k) is not None}
        if not experts:
            raise CostModelError(f"{where}: missing 'num_experts' (or 'num_local_experts')")
        if len(set(experts.values())) > 1:
            raise CostModelError(f"{where}: num_experts and num_local_experts disagree: {experts}")
        layers, heads = int(need("num_hidden_layers")), int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        num_experts = int(next(iter(experts.values())))
        # the sparse-layer rule of transformers' Qwen3MoeDecoderLayer
        moe = moe_layer_indices(cfg) if num_experts > 0 else ()
        dense_inter = int(need("intermediate_size")) if len(moe) < layers else int(cfg.get("intermediate_size") or 0)
        return cls(name=name or str(cfg.get("_name_or_path") or "model"), layers=layers, hidden=hidden, heads=heads,
                   kv_heads=int(need("num_key_value_heads")),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),  # transformers' default when absent
                   num_experts=num_experts, top_k=int(need("num_experts_per_tok")),
                   moe_intermediate=int(need("moe_intermediate_size")), dense_intermediate=dense_inter,
                   vocab=int(need("vocab_size")), tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)), moe_layers=moe)

    @classmethod
    def from_path(cls, path: str | Path, name: str = "") -> "ModelShapes":
        """A checkpoint directory holding config.json, or a config.json file."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise CostModelError(f"target model {str(path)!r}: no config.json there; give a local checkpoint "
                                 f"directory or a config.json file")
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise CostModelError(f"{f}: not JSON ({err})") from None
        return cls.from_config(cfg, name or (p.name if p.is_dir() else p.stem))

    # parameter counts ---------------------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        """Per decoder layer: q/k/v/o projections (+ biases), q/k RMS norms, input and post-attention norms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q + 2 * kv) if self.attention_bias else 0
        return self.hidden * q + 2 * self.hidden * kv + q * self.hidden + bias + 2 * self.head_dim + 2 * self.hidden

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate  # gate + up [2I, H], down [H, I]

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden

    @property
    def dense_layers(self) -> int:
        return self.layers - len(self.moe_layers)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        lm_head = 0 if self.tied_embeddings else self.embedding_params
        return (self.layers * self.attention_params + len(self.moe_layers) * (self.router_params + self.num_experts * self.expert_params)
                + self.dense_layers * 3 * self.hidden * self.dense_intermediate + self.embedding_params + lm_head + self.hidden)

    # bytes ---------------------------------------------------------------------------------------------------
    @property
    def expert_bytes_16bit(self) -> int:
        """One expert at 16 bit."""
        return self.expert_params * WEIGHT_BYTES

    @property
    def dense_weight_bytes(self) -> int:
        """Resident non-expert weights (whole embedding table included)."""
        return (self.total_params - len(self.moe_layers) * self.num_experts * self.expert_params) * WEIGHT_BYTES

    @property
    def dense_step_bytes(self) -> int:
        """Non-expert weights read by one decode step, except the embedding rows: every weight but the embedding
        table; the lm_head (or, tied, the embedding matrix in its lm_head role) is read whole."""
        untouched = 0 if self.tied_embeddings else self.embedding_params
        return (self.total_params - len(self.moe_layers) * self.num_experts * self.expert_params - untouched) * WEIGHT_BYTES

    @property
    def embedding_row_bytes(self) -> int:
        return self.hidden * WEIGHT_BYTES

    def dense_bytes_per_step(self, tokens: float) -> float:
        return self.dense_step_bytes + tokens * self.embedding_row_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * KV_BYTES


# ------------------------------------------------------------------------------------ measured host traffic

class HostTrafficMeter:
    """Precision-controller observer: splits the bytes a controller moves over the host link by call phase.

    `moved()` returns the controller's running byte count. Placed after the controller in the routing context's
    observers, its end_call sees the transitions the controller made at the end of that call (dynamic) and the
    fetches made during it (offload), and books them to the phase the engine set for the call.
    """

    def __init__(self, moved: Callable[[], int], context):
        self.moved, self.context = moved, context
        self.bytes = {"prefill": 0, "decode": 0}
        self._last = moved()

    def observe(self, layer, index, probs, keep) -> None:
        pass  # only the end of a call matters

    def end_call(self) -> None:
        phase = getattr(self.context, "phase", None)
        if phase not in self.bytes:
            raise RuntimeError(f"routing context phase is {phase!r}; the engine must set 'prefill' or 'decode' "
                               f"before every forward call")
        now = self.moved()
        self.bytes[phase] += now - self._last
        self._last = now


# --------------------------------------------------------------------------------------- traffic per step

@dataclass(frozen=True)
class DecodeTraffic:
    """Bytes per decode step by component, and resident bytes, of one cell (on its own or a target's shapes)."""

    model: str
    layers: int  # decoder layers (kernel-count overhead)
    tokens_per_step: float
    dense_bytes: float
    expert_bytes: float
    kv_bytes: float
    host_bytes: float
    resident_weight_bytes: float  # non-expert weights + resident expert weights
    kv_cache_bytes: float  # KV cache of a full batch at its longest: batch × (max prompt + max new tokens)

    @property
    def hbm_bytes(self) -> float:
        return self.dense_bytes + self.expert_bytes + self.kv_bytes


CELL_COLUMNS = ("cell", "model", "routing_policy", "top_k", "native_top_k", "num_layers", "moe_layers", "num_experts",
                "decode_steps", "decode_tokens", "distinct_experts_per_step", "distinct_high_experts_per_step",
                "expert_bytes_high", "expert_bytes_low", "host_bytes_decode", "mean_decode_context", "max_prompt_tokens",
                "dense_weight_bytes", "dense_step_bytes", "embedding_row_bytes", "kv_bytes_per_token",
                "expert_weight_bytes", "expert_weight_bytes_16bit", "batch_size", "max_new_tokens")
LAYER_COLUMNS = ("layer", "decode_steps", "decode_tokens", "decode_assignments", "distinct_experts_decode",
                 "distinct_high_decode")


def _require(record: Mapping, keys, what: str) -> None:
    missing = [k for k in keys if k not in record or _isnull(record[k])]
    if missing:
        raise CostModelError(f"{what}: missing {missing}. Cells evaluated before the cost model existed have no "
                             f"traffic counts (rebuild them: snakemake --forcerun evaluate); cells of a model family "
                             f"other than {', '.join(SHAPE_MODEL_TYPES)} have no shape columns")


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def random_distinct(tokens: float, kept: float, experts: int) -> float:
    """U(T, κ, E): expected distinct experts when T tokens each pick κ of E experts uniformly at random."""
    return experts * (1.0 - max(0.0, 1.0 - kept / experts) ** tokens)


def cell_traffic(cell: Mapping, layers: Sequence[Mapping] | None = None, target: ModelShapes | None = None,
                 distinct: str = "scaled", tokens_per_step: float | None = None,
                 mean_context: float | None = None) -> DecodeTraffic:
    """Traffic per decode step of a cell (a cell.json / cells.parquet row), on its own model or on `target`.

    `layers` (the cell's layers.parquet rows) is needed for a target; `tokens_per_step` and `mean_context`
    replace the measured T and C (a target's tokenizer and batch), only with a target.
    """
    _require(cell, CELL_COLUMNS, f"cell {cell.get('cell')!r}")
    steps = int(cell["decode_steps"])
    if steps <= 0:
        raise CostModelError(f"cell {cell['cell']!r}: no decode steps were measured (max_new_tokens 1, or every "
                             f"sequence stopped at its first token); there is no decode step to model")
    T_m = cell["decode_tokens"] / steps
    ctx = float(cell["mean_decode_context"]) if mean_context is None else float(mean_context)
    max_context = cell["max_prompt_tokens"] + cell["max_new_tokens"]
    host_m = cell["host_bytes_decode"] / steps
    resident_fraction = cell["expert_weight_bytes"] / cell["expert_weight_bytes_16bit"]

    if target is None:
        if tokens_per_step is not None or mean_context is not None:
            raise CostModelError("tokens_per_step / mean_context replace measured values only when projecting onto "
                                 "a target model's shapes")
        d, d_hi = cell["distinct_experts_per_step"], cell["distinct_high_experts_per_step"]
        return DecodeTraffic(
            model=str(cell["model"]), layers=int(cell["num_layers"]), tokens_per_step=T_m,
            dense_bytes=cell["dense_step_bytes"] + T_m * cell["embedding_row_bytes"],
            expert_bytes=d_hi * cell["expert_bytes_high"] + (d - d_hi) * cell["expert_bytes_low"],
            kv_bytes=T_m * ctx * cell["kv_bytes_per_token"], host_bytes=host_m,
            resident_weight_bytes=cell["dense_weight_bytes"] + cell["expert_weight_bytes"],
            kv_cache_bytes=cell["batch_size"] * max_context * cell["kv_bytes_per_token"])

    if distinct not in DISTINCT_MODELS:
        raise CostModelError(f"distinct-expert model {distinct!r}; allowed: {', '.join(DISTINCT_MODELS)}")
    if layers is None:
        raise CostModelError(f"cell {cell['cell']!r}: projecting onto {target.name!r} needs the cell's per-layer rows")
    rows = sorted(layers, key=lambda r: r["layer"])
    for r in rows:
        _require(r, LAYER_COLUMNS, f"cell {cell['cell']!r} layer {r.get('layer')!r}")
    if len(rows) != int(cell["moe_layers"]):
        raise CostModelError(f"cell {cell['cell']!r}: {len(rows)} layer rows for {cell['moe_layers']} MoE layers")
    E_m, L_m = int(cell["num_experts"]), len(rows)
    b16_m = cell["expert_weight_bytes_16bit"] / (L_m * E_m)
    b16_t = target.expert_bytes_16bit
    k_m = int(cell["top_k"])  # the policy's k′ (the native k for native, skip, top_p)
    if cell["routing_policy"] == "topk":
        if k_m > target.top_k:
            raise CostModelError(f"cell {cell['cell']!r}: top_k {k_m} exceeds {target.name!r}'s k={target.top_k}")
        k_t = k_m
    else:
        k_t = target.top_k
    T_t = T_m if tokens_per_step is None else float(tokens_per_step)
    L_t, E_t = len(target.moe_layers), target.num_experts
    expert = 0.0
    for j in range(L_t):
        r = rows[j * L_m // L_t]
        D_m = r["distinct_experts_decode"] / r["decode_steps"]
        kappa_m = r["decode_assignments"] / r["decode_tokens"] if r["decode_tokens"] else 0.0
        kappa_t = kappa_m * k_t / k_m
        if distinct == "fraction":
            D_t = D_m / E_m * E_t
        else:
            u_m = random_distinct(T_m, kappa_m, E_m)
            rho = D_m / u_m if u_m > 0 else 0.0
            D_t = min(rho * random_distinct(T_t, kappa_t, E_t), E_t, T_t * kappa_t)
        hi_share = r["distinct_high_decode"] / r["distinct_experts_decode"] if r["distinct_experts_decode"] else 0.0
        expert += D_t * (hi_share * cell["expert_bytes_high"] + (1 - hi_share) * cell["expert_bytes_low"]) / b16_m * b16_t
    all_16_t = L_t * E_t * b16_t
    # host bytes in proportion to expert reads: offload fetches and swaps are of experts the step reads
    expert_m = cell_traffic(cell).expert_bytes
    return DecodeTraffic(
        model=target.name, layers=target.layers, tokens_per_step=T_t,
        dense_bytes=target.dense_bytes_per_step(T_t), expert_bytes=expert,
        kv_bytes=T_t * ctx * target.kv_bytes_per_token,
        host_bytes=host_m / expert_m * expert if expert_m > 0 else 0.0,
        resident_weight_bytes=target.dense_weight_bytes + resident_fraction * all_16_t,
        kv_cache_bytes=cell["batch_size"] * max_context * target.kv_bytes_per_token)


# ------------------------------------------------------------------------------------- hardware profiles

@dataclass(frozen=True)
class HardwareProfile:
    name: str
    label: str
    hbm_bandwidth: float  # B/s, datasheet peak
    memory_capacity: float  # bytes
    host_link_bandwidth: float  # B/s per direction
    bandwidth_efficiency: float  # achievable fraction of hbm_bandwidth
    host_link_efficiency: float  # achievable fraction of host_link_bandwidth
    kernel_launch_s: float
    kernels_per_layer: float
    step_overhead_s: float
    reserved_bytes: float  # CUDA context, activations, allocator slack: not available for weights and cache
    source: str


# yaml key -> (dataclass field, scale to SI, check, what is allowed)
PROFILE_KEYS = {
    "label": ("label", None, lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "hbm_bandwidth_gb_s": ("hbm_bandwidth", GB, lambda v: v > 0, "a number > 0 (datasheet GB/s)"),
    "memory_gib": ("memory_capacity", GIB, lambda v: v > 0, "a number > 0 (GiB)"),
    "host_link_gb_s": ("host_link_bandwidth", GB, lambda v: v > 0, "a number > 0 (GB/s per direction)"),
    "bandwidth_efficiency": ("bandwidth_efficiency", 1, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "host_link_efficiency": ("host_link_efficiency", 1, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "kernel_launch_us": ("kernel_launch_s", 1e-6, lambda v: v >= 0, "a number ≥ 0 (µs)"),
    "kernels_per_layer": ("kernels_per_layer", 1, lambda v: v >= 0, "a number ≥ 0"),
    "step_overhead_us": ("step_overhead_s", 1e-6, lambda v: v >= 0, "a number ≥ 0 (µs)"),
    "reserved_gib": ("reserved_bytes", GIB, lambda v: v >= 0, "a number ≥ 0 (GiB)"),
    "source": ("source", None, lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string (citation)"),
}


def profile_from_dict(name: str, spec, where: str) -> HardwareProfile:
    """One profile from its YAML mapping; every key required, nothing else allowed."""
    if not isinstance(name, str) or not NAME.match(name):
        raise CostModelError(f"{where}: profile name {name!r} must match {NAME.pattern} (it names result columns)")
    if not isinstance(spec, Mapping):
        raise CostModelError(f"{where}.{name}: must be a mapping of {', '.join(PROFILE_KEYS)}")
    unknown = sorted(set(spec) - set(PROFILE_KEYS))
    if unknown:
        raise CostModelError(f"{where}.{name}: unknown key {unknown[0]!r}; allowed: {', '.join(PROFILE_KEYS)}")
    missing = [k for k in PROFILE_KEYS if k not in spec]
    if missing:
        raise CostModelError(f"{where}.{name}: missing key {missing[0]!r}; required: {', '.join(PROFILE_KEYS)}")
    values = {}
    for key, (attr, scale, ok, allowed) in PROFILE_KEYS.items():
        v = spec[key]
        numeric = scale is not None
        if numeric and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise CostModelError(f"{where}.{name}.{key}: must be {allowed}, got {v!r}")
        if not ok(v):
            raise CostModelError(f"{where}.{name}.{key}: must be {allowed}, got {v!r}")
        values[attr] = v * scale if numeric else v
    return HardwareProfile(name=name, **values)


def load_hardware_file(path: str | Path = HARDWARE_FILE) -> dict[str, HardwareProfile]:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CostModelError(f"hardware profiles file {path} is missing") from None
    except yaml.YAMLError as err:
        raise CostModelError(f"{path}: not YAML ({err})") from None
    if not isinstance(doc, Mapping) or set(doc) != {"profiles"} or not isinstance(doc["profiles"], Mapping):
        raise CostModelError(f"{path}: must hold exactly one key, 'profiles', mapping names to profiles")
    return {name: profile_from_dict(name, spec, f"{path}: profiles") for name, spec in doc["profiles"].items()}


@dataclass(frozen=True)
class CostModelSettings:
    profiles: dict[str, HardwareProfile]  # in the order of cost_model.profiles
    target: ModelShapes | None = None
    distinct: str = "scaled"
    overlap_host_link: bool = False


COST_MODEL_KEYS = ("profiles", "extra_profiles", "target_model", "distinct_experts", "overlap_host_link")


def load_cost_model(cfg: Mapping, hardware_file: str | Path = HARDWARE_FILE) -> CostModelSettings:
    """The `cost_model` config section → settings (shipped profiles + extra_profiles; the target's shapes)."""
    if not isinstance(cfg, Mapping):
        raise CostModelError(f"cost_model must be a mapping with keys {', '.join(COST_MODEL_KEYS)}")
    unknown = sorted(set(cfg) - set(COST_MODEL_KEYS))
    if unknown:
        raise CostModelError(f"cost_model: unknown key {unknown[0]!r}; allowed: {', '.join(COST_MODEL_KEYS)}")
    shipped = load_hardware_file(hardware_file)
    extra_spec = cfg.get("extra_profiles") or {}
    if not isinstance(extra_spec, Mapping):
        raise CostModelError("cost_model.extra_profiles: must map profile names to profiles")
    clash = sorted(set(extra_spec) & set(shipped))
    if clash:
        raise CostModelError(f"cost_model.extra_profiles.{clash[0]}: a shipped profile has that name "
                             f"({hardware_file}); choose another name")
    known = {**shipped, **{n: profile_from_dict(n, s, "cost_model.extra_profiles") for n, s in extra_spec.items()}}
    wanted = cfg.get("profiles")
    if not isinstance(wanted, list) or not wanted:
        raise CostModelError("cost_model.profiles: must be a non-empty list of profile names; known: "
                             + ", ".join(known))
    if len(set(wanted)) != len(wanted):
        raise CostModelError(f"cost_model.profiles: names repeat: {wanted}")
    for n in wanted:
        if n not in known:
            raise CostModelError(f"cost_model.profiles: unknown profile {n!r}; known: {', '.join(known)} "
                                 f"(add others under cost_model.extra_profiles)")
    distinct = cfg.get("distinct_experts", "scaled")
    if distinct not in DISTINCT_MODELS:
        raise CostModelError(f"cost_model.distinct_experts: {distinct!r}; allowed: {', '.join(DISTINCT_MODELS)}")
    overlap = cfg.get("overlap_host_link", False)
    if not isinstance(overlap, bool):
        raise CostModelError(f"cost_model.overlap_host_link: must be true or false, got {overlap!r}")
    target = cfg.get("target_model")
    return CostModelSettings(profiles={n: known[n] for n in wanted},
                             target=ModelShapes.from_path(target) if target else None,
                             distinct=distinct, overlap_host_link=overlap)


# --------------------------------------------------------------------------------------------- prediction

@dataclass(frozen=True)
class Prediction:
    profile: str
    hbm_s: float
    host_s: float
    overhead_s: float
    step_s: float
    tokens_per_s: float
    resident_bytes: float  # weights + full-batch KV cache + the profile's reserve
    fits: bool


def predict(traffic: DecodeTraffic, profile: HardwareProfile, overlap_host_link: bool = False) -> Prediction:
    hbm_s = traffic.hbm_bytes / (profile.hbm_bandwidth * profile.bandwidth_efficiency)
    host_s = traffic.host_bytes / (profile.host_link_bandwidth * profile.host_link_efficiency)
    overhead_s = profile.step_overhead_s + traffic.layers * profile.kernels_per_layer * profile.kernel_launch_s
    step_s = (max(hbm_s, host_s) if overlap_host_link else hbm_s + host_s) + overhead_s
    resident = traffic.resident_weight_bytes + traffic.kv_cache_bytes + profile.reserved_bytes
    return Prediction(profile.name, hbm_s, host_s, overhead_s, step_s, traffic.tokens_per_step / step_s, resident,
                      resident <= profile.memory_capacity)


def compare_measured(cell: Mapping, profile: HardwareProfile, overlap_host_link: bool = False) -> dict:
    """Projected vs measured decode speed of a cell that ran on `profile`'s hardware (same model, no target).

    implied_overhead_s = measured time per decode step − the modelled transfer time: what the engine spends
    beyond moving bytes (the value that step_overhead_us would need for the projection to match).
    """
    _require(cell, ("tpot_ms", "decode_tokens_per_s"), f"cell {cell.get('cell')!r}")
    p = predict(cell_traffic(cell), profile, overlap_host_link)
    measured_step = cell["tpot_ms"] / 1e3
    transfer = max(p.hbm_s, p.host_s) if overlap_host_link else p.hbm_s + p.host_s
    return {"cell": cell["cell"], "profile": profile.name, "measured_decode_tokens_per_s": cell["decode_tokens_per_s"],
            "projected_tokens_per_s": p.tokens_per_s, "measured_step_s": measured_step, "projected_step_s": p.step_s,
            "hbm_s": p.hbm_s, "host_s": p.host_s, "implied_overhead_s": measured_step - transfer,
            "measured_over_projected_speed": cell["decode_tokens_per_s"] / p.tokens_per_s}
