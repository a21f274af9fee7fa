"""One grid cell end to end: load model, apply routing + precision policy, generate, score, account, write."""
from __future__ import annotations

import hashlib
import logging
import platform
import statistics
from pathlib import Path

import pandas as pd
import torch
import transformers

from . import io
from .data.prompts import LMEVAL_FEWSHOT_SEED, build_prompt, exemplars_per_question, get_preset
from .data.sources import SYNTHETIC, assert_disjoint, load_split, problems_hash
from .engine import generate_greedy, time_decode
from .grid import FULL_BITS, Cell, config_hash
from .fast import FAST_BITS
from .model import install_policy, load_model, resolve_device
from .dynamic import DynamicPrecision, OffloadCache
from .precision import apply_map, build_map, expert_versions, full_expert_bytes, tier_bytes
from .routing import RoutingContext
from .costmodel import SHAPE_MODEL_TYPES, HostTrafficMeter, ModelShapes
from .scoring import exact_match, extract_flexible, extract_strict, numeric_equal, wilson_interval
from .data.gsm8k import gold_answer

log = logging.getLogger(__name__)


def hardware_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'' if n == 1 else 's'})"


FAST_MODEL_TYPES = ("qwen3_moe",)  # the fast engine drives Qwen3-MoE's modules (q/k norms, rotary, fused experts)


def resolve_engine(requested: str, device: str, widths: set[int], dtype: str, model_type: str = "qwen3_moe") -> str:
    """'fast' or 'reference' for this cell. auto = fast on CUDA for what the fast engine serves, else reference
    (the choice is recorded in the `engine` column of every result row). The fast kernels compute in bfloat16, so
    it also needs model.dtype: bfloat16 — never a silent change of the compute dtype between cells of a sweep."""
    reason = None
    if not device.startswith("cuda"):
        reason = "it needs CUDA"
    elif model_type not in FAST_MODEL_TYPES:
        reason = f"it serves model_type {', '.join(FAST_MODEL_TYPES)}, not {model_type!r}"
    elif not widths <= set(FAST_BITS):
        reason = f"widths {sorted(widths)} include one outside {FAST_BITS}"
    elif dtype != "bfloat16":
        reason = f"model.dtype is {dtype!r} and the fast engine computes in 'bfloat16'"
    if requested == "fast" and reason:
        raise ValueError(f"evaluate.engine is 'fast' but {reason}; use evaluate.engine: auto or reference")
    if requested == "auto":
        return "reference" if reason else "fast"
    return requested


def load_quantized_tiers(paths: dict[int, str], model_id: str) -> tuple[dict[int, dict], list[dict]]:
    """(tiers by width, each file's metadata)."""
    from .quant import load_quantized

    loaded = {bits: load_quantized(path, {"model_id": str(model_id), "bits": bits}) for bits, path in paths.items()}
    return {bits: t for bits, (t, _) in loaded.items()}, [m for _, m in loaded.values()]


def read_hotness(hotness_path: str, num_experts: int) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
    """From the profile stage's table (validated): expert ids per layer hottest first, and each expert's share of
    the routed probability mass (the starting hotness of dynamic precision)."""
    hint = "rerun the profile stage (snakemake --forcerun profile)"
    try:
        df = pd.read_parquet(hotness_path, columns=["layer", "expert", "hotness_rank", "prob_share"])
    except Exception as err:  # pyarrow raises several types for truncated or foreign files
        raise io.ArtefactError(f"{hotness_path}: unreadable hotness table ({err}); {hint}") from None
    layers = dict(tuple(df.groupby("layer")))
    order = {int(l): g.sort_values("hotness_rank")["expert"].astype(int).tolist() for l, g in layers.items()}
    if not order or any(sorted(v) != list(range(num_experts)) for v in order.values()):
        raise io.ArtefactError(f"{hotness_path}: does not rank {num_experts} experts in every layer (another model?); {hint}")
    shares = {int(l): torch.tensor(g.sort_values("expert")["prob_share"].to_numpy(), dtype=torch.float64)
              for l, g in layers.items()}
    return order, shares



def fewshot_pool(ds: dict, preset, seed: int) -> list[dict]:
    """Train records that few-shot exemplars are drawn from (none needed for fixed-exemplar presets).

    A hub data set or the synthetic source supplies its own train split; a local file holds one split,
    so drawing exemplars from it would leak test problems: `dataset.fewshot_source` must name a train file.
    Per-question presets (lm-eval's protocol) draw from the whole split in file order, as lm-eval does; the
    synthetic generator has no whole split, so there (and for one fixed set) `fewshot_pool` problems are used.
    """
    if preset.n_shots == 0 or preset.fixed_exemplars is not None:
        return []
    source = ds.get("fewshot_source") or ds["source"]
    if Path(source).suffix in (".jsonl", ".json", ".parquet") and source == ds["source"]:
        raise ValueError(f"prompt preset {preset.name!r} needs train exemplars, but dataset.source {source!r} is a "
                         f"single local file; set dataset.fewshot_source to a train file (or use a hub id)")
    pool_ds = {**ds, "source": source}
    whole = preset.per_question and source != SYNTHETIC
    return load_split(pool_ds, ds.get("fewshot_split", "train"), None if whole else ds.get("fewshot_pool", 1000), seed,
                      "fewshot")


def timing_inputs(tokenizer, prompts: list[str], batch_size: int, steps: int, max_positions: int | None) -> torch.Tensor:
    """Token ids [B, L] of the fixed-shape timing pass: B = the cell's batch size (fewer when there are fewer
    problems), L = the B-th longest prompt length, each row the first L tokens of a distinct prompt (so no padding,
    and rows route as different text does), L capped so that L + steps fits the model's context."""
    ids = sorted((tokenizer(p, add_special_tokens=False).input_ids for p in prompts), key=len, reverse=True)
    B = min(batch_size, len(ids))
    L = len(ids[B - 1])
    if max_positions is not None:
        L = min(L, max_positions - steps)
    if L < 1:
        raise ValueError(f"evaluate.timing_steps {steps} leaves no room for a prompt in the model's context of "
                         f"{max_positions} positions; allowed: below {max_positions}")
    return torch.tensor([row[:L] for row in ids[:B]], dtype=torch.long)


def check_context(tokenizer, problems: list[dict], prompts: list[str], max_new_tokens: int,
                  max_positions: int | None) -> list[int]:
    """Prompt lengths in tokens (as the engines tokenize them); refuses prompt + max_new_tokens beyond the model's
    context (config.json max_position_embeddings), which would otherwise run silently past what it was trained on."""
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    if max_positions is None:
        return lengths
    over = [(p["id"], n) for p, n in zip(problems, lengths) if n + max_new_tokens > max_positions]
    if over:
        worst = max(over, key=lambda x: x[1])
        raise ValueError(f"prompt.max_new_tokens {max_new_tokens}: {len(over)} of {len(prompts)} prompts plus "
                         f"max_new_tokens exceed the model's context of {max_positions} positions (config.json "
                         f"max_position_embeddings; longest: problem {worst[0]!r}, {worst[1]} prompt tokens); allowed: "
                         f"prompt + max_new_tokens <= {max_positions} (use fewer shots or a lower max_new_tokens)")
    return lengths


def artefact_provenance(quantized_meta: list[dict], routing_stats: dict | None, hotness_path: str | None) -> dict:
    """Sources and content hashes of the data behind the artefacts this cell reads (calibration problems behind its
    quantized weights or skip thresholds, profiling problems behind its hot/cold map); null when it reads none."""
    out = {"calibration_source": None, "calibration_hash": None, "profile_source": None, "profile_hash": None}
    for meta in [*quantized_meta, *([routing_stats] if routing_stats else [])]:
        if not meta.get("calibration_hash"):
            raise io.ArtefactError("a calibration artefact of this cell records no calibration_hash (made before "
                                   "provenance was recorded); rerun the calibrate and quantize stages "
                                   "(snakemake --forcerun calibrate)")
        out["calibration_source"], out["calibration_hash"] = meta["calibration_source"], meta["calibration_hash"]
    if hotness_path:
        df = pd.read_parquet(hotness_path)
        if "profile_hash" not in df.columns:
            raise io.ArtefactError(f"{hotness_path}: records no profile_hash (made before provenance was recorded); "
                                   f"rerun the profile stage (snakemake --forcerun profile)")
        out["profile_source"], out["profile_hash"] = str(df["profile_source"].iloc[0]), str(df["profile_hash"].iloc[0])
    return out


def evaluate_cell(cell: dict, settings: dict, quantized_paths: dict[int, str], hotness_path: str | None,
                  routing_stats_path: str | None, out_cell: str, out_problems: str, out_layers: str, out_trace: str,
                  threads: int = 1, progress=None) -> dict:
    """Evaluate `cell` (a grid.Cell dict) under `settings` (model/dataset/prompt/evaluate/seed config sections)."""
    cell_rec = Cell.from_dict(cell)
    seed = settings["seed"]
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    ev, ds, pr, mcfg = settings["evaluate"], settings["dataset"], settings["prompt"], settings["model"]
    device = resolve_device(ev["device"], "evaluate.device")
    pc = cell_rec.precision
    dtype = mcfg.get("dtype", "float32")

    problems = load_split(ds, ds.get("split", "test"), ds.get("limit"), seed)
    preset = get_preset(pr["preset"])
    pool = fewshot_pool(ds, preset, seed)
    fewshots = exemplars_per_question(preset, pool, [p["index"] for p in problems], seed)
    used = {e["id"]: e for shots in fewshots for e in shots}
    assert_disjoint(problems, {"few-shot exemplars": list(used.values())})
    model, tokenizer, adapter = load_model(mcfg["id"], dtype, device, mcfg.get("revision"),
                                           mcfg.get("trust_remote_code", False))
    engine = resolve_engine(ev.get("engine", "auto"), device, {pc.bits_high, pc.bits_low}, dtype,
                            model.config.model_type)
    chat = tokenizer if pr.get("chat_template") else None
    prompts = [build_prompt(preset, p["question"], shots, chat_template=chat) for p, shots in zip(problems, fewshots)]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    prompt_lengths_in = check_context(tokenizer, problems, prompts, pr["max_new_tokens"], max_positions)

    # Precision first (it rewrites expert weights), then routing (it replaces routers).
    layers = [l.index for l in adapter.layers()]
    quantized, quantized_meta = load_quantized_tiers(quantized_paths, mcfg["id"]) if quantized_paths else ({}, [])
    bytes_by_tier = tier_bytes(quantized, layers, full_expert_bytes(adapter))
    hotness, shares = read_hotness(hotness_path, adapter.num_experts) if hotness_path else (None, None)
    pmap = build_map(pc, layers, adapter.num_experts, bytes_by_tier, hotness, shares)
    budgets = pmap.layer_budgets
    online = pc.policy in ("dynamic", "frozen", "offload")
    versions = (expert_versions(adapter, quantized, {pc.bits_high, pc.bits_low})
                if engine == "reference" and pc.policy in ("dynamic", "frozen") else None)
    if engine == "reference":
        apply_map(adapter, pmap, quantized)  # the fast engine reads the packed tiers themselves
    betas, stats = None, None
    if routing_stats_path:
        stats = io.read_json(routing_stats_path, "rerun the calibrate stage (snakemake --forcerun calibrate)")
        betas = {int(k): v for k, v in stats["skip_beta"].items()}
    provenance = artefact_provenance(quantized_meta, stats, hotness_path)
    context = RoutingContext()
    install_policy(adapter, cell_rec.routing, context, betas)
    if pc.policy == "hotcold":
        context.hot_masks = pmap.hot_masks(pc.bits_high)

    full = bytes_by_tier[FULL_BITS]
    online_device = None  # the fast engine's controller (fast/pools.py), built once and reset per repeat
    if engine == "fast" and pc.policy == "offload":
        from .fast.pools import DeviceOffload

        online_device = DeviceOffload(adapter, full, budgets)
    elif engine == "fast" and online:
        from .fast.pools import DevicePrecisionPools

        online_device = DevicePrecisionPools(adapter, quantized, pc.bits_high, pc.bits_low, pmap.hot_masks(pc.bits_high),
                                             shares, bytes_by_tier, budgets, pc.alpha, pc.update_every,
                                             pc.delta, pc.rate_limit, frozen=pc.policy == "frozen")

    def fresh_controller():
        """A controller in its starting state (re-applied before every repeat, so repeats are identical)."""
        if online_device is not None:
            online_device.reset()
            return online_device
        if pc.policy == "offload":
            return OffloadCache(full, budgets)
        experts = {l.index: l.experts for l in adapter.layers()}
        return DynamicPrecision(experts, pmap.hot_masks(pc.bits_high), shares,
                                versions, bytes_by_tier, pc.bits_high, pc.bits_low, budgets,
                                pc.alpha, pc.update_every, pc.delta, pc.rate_limit, frozen=pc.policy == "frozen")

    if engine == "fast":
        from .fast.engine import FastQwen3MoeEngine

        fast = FastQwen3MoeEngine(model, adapter, cell_rec.routing, pmap.bits, quantized, betas,
                                  pmap.hot_masks(pc.bits_high) if pc.policy == "hotcold" else None, online=online_device)

    def generate(prompts_, max_new_tokens, progress_=None):
        if engine == "reference":
            return generate_greedy(model, tokenizer, prompts_, max_new_tokens, ev["batch_size"], preset.stop, context,
                                   device, progress_)
        fast.reset_stats()
        out = fast.generate(tokenizer, prompts_, max_new_tokens, ev["batch_size"], preset.stop, progress=progress_,
                            context=context)
        if online_device is not None:
            online_device.finish()  # copies still in flight (after the clocks stopped)
        context.stats = fast.routing_stats()
        return out

    # Warm-up on a few prompts (allocator, thread pools, kernel compilation, graph capture) so the clocks measure
    # steady state.
    generate(prompts[: min(4, len(prompts))], 4)

    # Fixed-shape timing pass (issue 19): the cell's batch, one prompt length, a fixed number of steps with EOS and
    # stop strings ignored, so every cell's clock covers the same work and differs only by what a step costs under
    # its policy. Median and spread over >= 3 repeats, each from the controller's starting state. Its routing
    # counters (distinct experts per step at a constant batch) give the weight bytes read per generated token.
    timing_steps = ev.get("timing_steps", 16)
    fixed_ids = timing_inputs(tokenizer, prompts, ev["batch_size"], timing_steps, max_positions)
    fixed_runs = []
    for _ in range(ev.get("timing_repeats", 3)):
        context.reset()
        context.observers = [fresh_controller()] if online else []
        if online and pc.policy != "offload" and engine == "reference":
            context.hot_masks = context.observers[0].high
        if engine == "reference":
            t = time_decode(model, fixed_ids, timing_steps, context, device)
        else:
            fast.reset_stats()
            t = fast.time_decode(fixed_ids.to(device), timing_steps, read_tokens=True)
            if online_device is not None:
                online_device.finish()
            context.stats = fast.routing_stats()
        fixed_runs.append(t)
    fixed_stats = context.stats
    fixed_steps = fixed_runs[-1].decode_steps
    fixed_tps = [t.decode_tokens / t.decode_s[0] for t in fixed_runs]
    fixed_ms = [1e3 * t.decode_s[0] / t.decode_steps for t in fixed_runs]
    fixed_distinct = sum(s.distinct_experts_decode for s in fixed_stats.values()) / fixed_steps
    fixed_distinct_high = sum(s.distinct_high_decode for s in fixed_stats.values()) / fixed_steps
    # Repeats: null = 3 on GPU (clocks vary run to run), 1 on CPU (the sweep's time budget).
    repeats = ev.get("repeats") or (3 if device.startswith("cuda") else 1)
    runs = []
    controller = None
    meter = None  # host-link bytes by phase (online precision policies)
    for _ in range(repeats):
        context.reset()
        if online:
            controller = fresh_controller()
            context.observers = [controller]
            meter = HostTrafficMeter((lambda c=controller: c.bytes_moved) if pc.policy == "offload"
                                     else (lambda c=controller: c.stats.bytes_moved), context)
            context.observers.append(meter)  # after the controller: sees the transitions it makes at a call's end
            if pc.policy != "offload" and engine == "reference":
                context.hot_masks = controller.high  # live: updated in place by every transition
        completions, timing = generate(prompts, pr["max_new_tokens"], progress)
        runs.append((completions, timing))
    completions, timing = runs[-1]  # greedy and deterministic: every repeat yields the same text
    # Cost-model inputs (costmodel.py). KV positions attended: sequence i's decode call j (1..G_i-1) attends its
    # P_i prompt tokens and j generated ones (no padding: what a paged engine reads).
    prompt_lengths = timing.prompt_lengths  # as the engine tokenized them
    decode_positions = sum((c.generated_tokens - 1) * P + (c.generated_tokens - 1) * c.generated_tokens // 2
                           for P, c in zip(prompt_lengths, completions))
    model_cfg = model.config.to_dict()
    shapes = (ModelShapes.from_config(model_cfg, mcfg.get("name") or str(mcfg["id"]))
              if model_cfg.get("model_type") in SHAPE_MODEL_TYPES else None)
    if shapes is None:
        log.warning("cost model: no shapes for model_type %r (supported: %s); its shape columns stay null and "
                    "the cost model will refuse this cell", model_cfg.get("model_type"), ", ".join(SHAPE_MODEL_TYPES))
    steps = timing.decode_steps
    if any(s.decode_calls != steps for s in context.stats.values()):
        raise RuntimeError(f"decode calls per layer {[s.decode_calls for s in context.stats.values()]} differ from the "
                           f"engine's {steps} decode steps")

    dynamic_stats = pc.policy in ("dynamic", "frozen")  # controller.stats is a dynamic.DynamicStats
    rows = []
    for p, c, prompt, shots, n_tok in zip(problems, completions, prompts, fewshots, prompt_lengths_in):
        gold = gold_answer(p["answer"])
        strict = extract_strict(c.text, preset.strict_regex)
        flexible = extract_flexible(c.text)
        rows.append({"cell": cell_rec.id, "problem_id": p["id"], "gold": gold, "prediction_strict": strict,
                     "prediction_flexible": flexible, "correct_strict": exact_match(strict, gold),
                     "correct_flexible": exact_match(flexible, gold), "correct_numeric": numeric_equal(flexible, gold),
                     "generated_tokens": c.generated_tokens, "stop_reason": c.stopped, "completion": c.text,
                     "prompt": prompt, "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                     "prompt_tokens": n_tok, "fewshot_ids": [e["id"] for e in shots]})
    problems_df = pd.DataFrame(rows)

    layer_rows = []
    for layer, s in sorted(context.stats.items()):
        load = s.load.double()
        layer_rows.append({"cell": cell_rec.id, "layer": layer, "tokens": s.tokens, "assignments_routed": s.routed,
                           "assignments_dropped": s.dropped, "experts_per_token": (s.routed - s.dropped) / max(s.tokens, 1),
                           "load_imbalance": float(load.max() / load.mean()) if load.sum() > 0 else float("nan"),
                           "hot_hits": s.hot_hits, "load": s.load.tolist(),
                           "decode_steps": s.decode_calls, "decode_tokens": s.decode_tokens,
                           "decode_assignments": s.decode_kept, "distinct_experts_decode": s.distinct_experts_decode,
                           "distinct_high_decode": s.distinct_high_decode})
    layers_df = pd.DataFrame(layer_rows)

    n = len(rows)
    k_strict = int(problems_df["correct_strict"].sum())
    ci_low, ci_high = wilson_interval(k_strict, n)
    per_run_tps = [t.generated_tokens / (sum(t.prefill_s) + sum(t.decode_s)) for _, t in runs]
    routed = int(layers_df["assignments_routed"].sum())
    dropped = int(layers_df["assignments_dropped"].sum())
    r, pc = cell_rec.routing, cell_rec.precision
    summary = {
        "cell": cell_rec.id, "policy": cell_rec.family, "routing_policy": r.policy,
        "top_k": r.top_k if r.top_k is not None else adapter.top_k, "native_top_k": adapter.top_k,
        "capacity_factor": r.capacity_factor, "capacity_priority": r.priority if r.capacity_factor else None,
        "renormalize": adapter.norm_topk_prob if r.renormalize is None else r.renormalize, "top_p": r.top_p,
        "skip_beta_mean": statistics.fmean(betas.values()) if (betas and r.policy == "skip") else None,
        "precision_policy": pc.policy, "bits_high": pc.bits_high, "bits_low": pc.bits_low,
        "memory_budget": pmap.budget_bytes / pmap.full_bytes if pmap.budget_bytes is not None else None,
        "memory_budget_gb": pc.memory_budget_gb, "slot_allocation": pc.allocation, "n": n,
        "accuracy_strict": k_strict / n, "accuracy_flexible": float(problems_df["correct_flexible"].mean()),
        "accuracy_numeric": float(problems_df["correct_numeric"].mean()),
        "accuracy_ci_low": ci_low, "accuracy_ci_high": ci_high,
        "tokens_per_s": statistics.median(per_run_tps), "tokens_per_s_min": min(per_run_tps),
        "tokens_per_s_max": max(per_run_tps), "repeats": repeats,
        "total_tokens_per_s": statistics.median((t.generated_tokens + t.prompt_tokens) / (sum(t.prefill_s) + sum(t.decode_s))
                                                for _, t in runs),
        "decode_tokens_per_s": statistics.median(t.decode_tokens / sum(t.decode_s) for _, t in runs),
        "ttft_ms": statistics.median(1e3 * statistics.fmean(t.prefill_s) for _, t in runs),
        "tpot_ms": statistics.median(1e3 * sum(t.decode_s) / max(t.decode_steps, 1) for _, t in runs),
        "e2e_s": statistics.median(sum(t.prefill_s) + sum(t.decode_s) for _, t in runs),
        "generated_tokens": timing.generated_tokens, "prompt_tokens": timing.prompt_tokens,
        "padding_fraction": 1 - timing.prompt_tokens / max(timing.padded_prompt_tokens, 1),
        "drop_rate": dropped / routed if routed else 0.0,
        "experts_per_token": float(layers_df["experts_per_token"].mean()),
        "load_imbalance": float(layers_df["load_imbalance"].mean()),
        # one tier (full, uniform, offload's 16-bit cache): no high/low split, so no hit rate (was 0.0 or 1.0)
        "high_precision_hit_rate": (int(layers_df["hot_hits"].sum()) / max(routed - dropped, 1)
                                    if pc.policy in ("hotcold", "dynamic", "frozen") else None),
        "alpha": pc.alpha, "update_every": pc.update_every, "delta": pc.delta, "rate_limit": pc.rate_limit,
        "decisions": getattr(getattr(controller, "stats", None), "decisions", None),
        "transitions": getattr(getattr(controller, "stats", None), "transitions", None),
        "bytes_moved": (controller.bytes_moved if pc.policy == "offload"
                        else getattr(getattr(controller, "stats", None), "bytes_moved", None)),
        "swap_time_ms": (1e3 * controller.stats.swap_s if dynamic_stats else None),
        "decisions_skipped": controller.stats.decisions_skipped if dynamic_stats else None,
        "switch_lag_calls": (controller.stats.switch_lag_calls / controller.stats.transitions
                             if dynamic_stats and controller.stats.transitions else None),
        "cache_misses": controller.misses if pc.policy == "offload" else None,
        "cache_hits": controller.hits if pc.policy == "offload" else None,
        "budget_utilisation": (pmap.expert_bytes / pmap.budget_bytes if pmap.budget_bytes else None),
        "expert_weight_bytes": pmap.expert_bytes, "expert_weight_bytes_16bit": pmap.full_bytes,
        "high_precision_experts": int(sum(int((b == pc.bits_high).sum()) for b in pmap.bits.values())),
        "batch_size": ev["batch_size"], "max_new_tokens": pr["max_new_tokens"], "prompt_preset": pr["preset"],
        "n_shots": preset.n_shots, "chat_template": bool(pr.get("chat_template")),
        "extraction": "lm-eval gsm8k strict-match (preset regex) / flexible-extract; exact_match",
        "sorted_by_length": True, "engine": engine, "device": device, "threads": threads,
        "model": mcfg.get("name") or str(mcfg["id"]), "model_id": str(mcfg["id"]), "dtype": dtype,
        "dataset": ds["source"], "dataset_split": ds.get("split", "test"), "seed": seed,
        "dataset_hash": problems_hash(problems),
        "fewshot_source": (f"{ds.get('fewshot_source') or ds['source']} [{ds.get('fewshot_split', 'train')}]"
                           if pool else None),
        "fewshot_hash": problems_hash(list(used.values())) if used else None,
        "fewshot_seed": (LMEVAL_FEWSHOT_SEED if preset.per_question else seed) if pool else None,
        "fewshot_per_question": bool(pool) and preset.per_question,
        **provenance,
        "config_hash": config_hash(settings, cell), "hardware": hardware_name(device),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "mean_prompt_tokens": timing.prompt_tokens / max(n, 1),
        "mean_generated_tokens": timing.generated_tokens / max(n, 1),
        # decode traffic (cost model): last repeat, like the routing columns
        "num_layers": shapes.layers if shapes else None, "moe_layers": len(layers), "num_experts": adapter.num_experts,
        "decode_steps": steps, "decode_tokens": timing.decode_tokens,
        "distinct_experts_per_step": (sum(s.distinct_experts_decode for s in context.stats.values()) / steps
                                      if steps else None),
        "distinct_high_experts_per_step": (sum(s.distinct_high_decode for s in context.stats.values()) / steps
                                           if steps else None),
        "expert_bytes_high": statistics.fmean(float(bytes_by_tier[pc.bits_high][i].float().mean()) for i in layers),
        "expert_bytes_low": statistics.fmean(float(bytes_by_tier[pc.bits_low][i].float().mean()) for i in layers),
        "host_bytes_decode": meter.bytes["decode"] if meter else 0,
        "mean_decode_context": decode_positions / timing.decode_tokens if timing.decode_tokens else None,
        "max_prompt_tokens": max(prompt_lengths),
        "dense_weight_bytes": shapes.dense_weight_bytes if shapes else None,
        "dense_step_bytes": shapes.dense_step_bytes if shapes else None,
        "embedding_row_bytes": shapes.embedding_row_bytes if shapes else None,
        "kv_bytes_per_token": shapes.kv_bytes_per_token if shapes else None,
        # fixed-shape timing pass
        "fixed_batch": int(fixed_ids.shape[0]), "fixed_prompt_tokens": int(fixed_ids.shape[1]),
        "fixed_decode_steps": fixed_steps, "fixed_repeats": len(fixed_runs),
        "fixed_decode_tokens_per_s": statistics.median(fixed_tps), "fixed_decode_tokens_per_s_min": min(fixed_tps),
        "fixed_decode_tokens_per_s_max": max(fixed_tps), "fixed_ms_per_step": statistics.median(fixed_ms),
        "fixed_ms_per_step_min": min(fixed_ms), "fixed_ms_per_step_max": max(fixed_ms),
        "fixed_distinct_experts_per_step": fixed_distinct, "fixed_distinct_high_experts_per_step": fixed_distinct_high,
    }
    B_fixed = summary["fixed_batch"]
    expert_step = (fixed_distinct_high * summary["expert_bytes_high"]
                   + (fixed_distinct - fixed_distinct_high) * summary["expert_bytes_low"])
    summary["expert_bytes_per_token"] = expert_step / B_fixed
    # What one generated token costs in weight reads at this batch: every non-expert weight once per step (embedding
    # rows per token), the distinct experts the policy routed to at their tier's packed size; KV reads left out.
    summary["weight_bytes_per_token"] = ((shapes.dense_step_bytes + B_fixed * shapes.embedding_row_bytes + expert_step)
                                         / B_fixed if shapes else None)
    for k in ("top_k", "native_top_k", "bits_high", "bits_low"):
        summary[k] = int(summary[k])
    trace = pd.DataFrame(controller.stats.trace if dynamic_stats else [],
                         columns=["decision", "call", "layer", "high_experts", "hotness"])
    trace.insert(0, "cell", cell_rec.id)
    io.write_parquet(out_trace, trace)
    io.write_parquet(out_problems, problems_df)
    io.write_parquet(out_layers, layers_df)
    io.write_json(out_cell, summary)  # written last: its presence marks the cell complete
    log.info("cell %s: accuracy %.3f [%.3f, %.3f], %.1f tok/s", cell_rec.id, summary["accuracy_strict"], ci_low,
             ci_high, summary["tokens_per_s"])
    return summary
