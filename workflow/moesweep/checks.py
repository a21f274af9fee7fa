"""Checks of the config against the files it names, run when the DAG is built (no torch import: cheap).

The JSON schema catches wrong keys, types and ranges; these checks catch what needs the checkpoint's
config.json or the file system: a missing model or tokenizer, an unsupported family, k′ > k, a memory budget
no precision map can meet, a missing data file. Each raises ConfigError with one message naming the bad
value and what is allowed. Hub ids are checked when their files are first loaded.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .grid import FULL_BITS, Cell

# Per supported family (model_type), the config.json keys transformers 5.17 reads for the number of routed
# experts (first key present wins; several where the config class maps an alias onto it, e.g. Qwen3-MoE files
# written by transformers 4 say num_experts), for k and for the routed experts' intermediate size. The default
# family first: it is the one named first in every "supported:" message.
FAMILIES = {
    "qwen3_moe": {"experts": ("num_local_experts", "num_experts"), "top_k": "num_experts_per_tok",
                  "intermediate": "moe_intermediate_size"},
    "qwen2_moe": {"experts": ("num_experts",), "top_k": "num_experts_per_tok", "intermediate": "moe_intermediate_size"},
    "olmoe": {"experts": ("num_experts", "num_local_experts"), "top_k": "num_experts_per_tok",
              "intermediate": "intermediate_size"},
    "mixtral": {"experts": ("num_local_experts", "num_experts"), "top_k": "num_experts_per_tok",
                "intermediate": "intermediate_size"},
    "phimoe": {"experts": ("num_local_experts",), "top_k": "num_experts_per_tok", "intermediate": "intermediate_size"},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# transformers 5.17's sparsemixer (Phi-3.5-MoE's router) selects exactly two experts whatever
# num_experts_per_tok says; any other value would make the sweep's k disagree with what the model computes.
PHIMOE_TOP_K = 2
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ConfigError(ValueError):
    pass


def is_local(path_or_id: str) -> bool:
    p = Path(path_or_id)
    return p.exists() or path_or_id.startswith((".", "/", "~")) or not HUB_ID.fullmatch(path_or_id)


def packed_expert_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                        zero_bytes: int = 1) -> int:
    """Bytes of one expert projection in the quantize stage's packed format (must equal quant.expert_nbytes):
    row-packed codes + float16 scales + uint8 zero points (asymmetric only), per output row and group."""
    if bits == FULL_BITS:
        return out_features * in_features * 2
    groups = 1 if group_size <= 0 else math.ceil(in_features / group_size)
    codes = out_features * math.ceil(in_features * bits / 8)
    return codes + out_features * groups * (2 + (0 if symmetric else zero_bytes))  # hqq: float16 zeros, 2 bytes


def read_local_model_config(model_id: str) -> dict | None:
    """config.json of a local checkpoint; None for a hub id. Raises ConfigError for a broken local path."""
    if not is_local(model_id):
        return None
    root = Path(model_id).expanduser()
    if not root.is_dir():
        raise ConfigError(f"model.id {model_id!r}: no such directory (use a local checkpoint directory or a hub id "
                          f"such as 'Qwen/Qwen3-30B-A3B')")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"model.id {model_id!r}: no config.json in that directory")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model.id {model_id!r}: model_type {cfg.get('model_type')!r} is not a supported MoE family; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_family_config(cfg, f"model.id {model_id!r}")
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.id {model_id!r}: tokenizer missing (expected one of {', '.join(TOKENIZER_FILES)})")
    return cfg


def num_experts(cfg: dict) -> int | None:
    """Routed experts per MoE layer from a config.json dict of a supported family (None when no key is set)."""
    keys = FAMILIES[cfg["model_type"]]["experts"]
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def expert_intermediate_size(cfg: dict) -> int:
    """Intermediate size of one routed expert (Qwen: moe_intermediate_size; OLMoE, Mixtral, Phi-MoE: intermediate_size)."""
    return cfg[FAMILIES[cfg["model_type"]]["intermediate"]]


def check_family_config(cfg: dict, where: str) -> None:
    """The keys the sweep reads from a supported family's config.json are there and make an MoE."""
    fam = FAMILIES[cfg["model_type"]]
    E = num_experts(cfg)
    if not isinstance(E, int) or E < 1:
        raise ConfigError(f"{where}: model_type {cfg['model_type']!r} needs a positive integer expert count in "
                          f"config.json key {' or '.join(fam['experts'])} (got {E!r}); without experts it is no MoE")
    for key in (fam["top_k"], fam["intermediate"], "hidden_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ConfigError(f"{where}: config.json of model_type {cfg['model_type']!r} needs a positive integer "
                              f"{key!r} (got {cfg.get(key)!r})")
    if cfg[fam["top_k"]] > E:
        raise ConfigError(f"{where}: num_experts_per_tok={cfg[fam['top_k']]} exceeds the {E} experts")
    if cfg["model_type"] == "phimoe" and cfg[fam["top_k"]] != PHIMOE_TOP_K:
        raise ConfigError(f"{where}: phimoe with num_experts_per_tok={cfg[fam['top_k']]}: transformers' sparsemixer "
                          f"router always selects exactly {PHIMOE_TOP_K} experts; allowed: {PHIMOE_TOP_K}")


def moe_layer_indices(cfg: dict) -> tuple[int, ...]:
    """Decoder layers with routed experts (Qwen-MoE's decoder_sparse_step / mlp_only_layers; else every layer)."""
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)


def full_expert_bytes_total(cfg: dict) -> int:
    """16-bit bytes of every routed expert of the checkpoint (gate, up, down), the scale of memory budgets."""
    return 3 * cfg["hidden_size"] * expert_intermediate_size(cfg) * 2 * num_experts(cfg) * len(moe_layer_indices(cfg))


def smallest_budget(cfg: dict, bits_low: int, quant: dict) -> float:
    """Fraction of the 16-bit expert bytes needed with every expert at bits_low."""
    H, I = cfg["hidden_size"], expert_intermediate_size(cfg)
    gs, sym = quant["group_size"], quant.get("symmetric", False)
    zb = 2 if quant.get("method") == "hqq" else 1
    low = packed_expert_bytes(2 * I, H, bits_low, gs, sym, zb) + packed_expert_bytes(H, I, bits_low, gs, sym, zb)
    return low / (3 * H * I * 2)


def check_data_source(dataset: dict, key: str = "source", section: str = "dataset") -> None:
    source = dataset.get(key)
    if not source or source == "synthetic" or not is_local(source):
        return
    p = Path(source).expanduser()
    if p.suffix not in DATA_SUFFIXES:
        raise ConfigError(f"{section}.{key} {source!r}: a local file must end in {', '.join(DATA_SUFFIXES)} "
                          f"(or use 'synthetic' or a hub id such as 'openai/gsm8k')")
    if not p.is_file():
        raise ConfigError(f"{section}.{key} {source!r}: no such file")
    if p.stat().st_size == 0:
        raise ConfigError(f"{section}.{key} {source!r}: the file is empty")


TEXT_SUFFIXES = (".txt", *DATA_SUFFIXES)


def check_calibration_source(calib: dict) -> None:
    """calibration.source: GSM-style problems as dataset.source; with format: text a hub id or a local
    .txt/.jsonl/.json/.parquet file whose records have `text_field` (checked here for jsonl and parquet)."""
    if calib.get("format", "problems") != "text":
        check_data_source(calib, "source", "calibration")
        return
    source, field = calib.get("source"), calib.get("text_field", "text")
    if not source or source == "synthetic":
        raise ConfigError("calibration.format 'text' needs calibration.source: a hub id or a local "
                          f"{'/'.join(TEXT_SUFFIXES)} file (the synthetic source has no plain text)")
    if not is_local(source):
        return
    p = Path(source).expanduser()
    if p.suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"calibration.source {source!r}: a local text file must end in {', '.join(TEXT_SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(f"calibration.source {source!r}: no such file")
    if p.stat().st_size == 0:
        raise ConfigError(f"calibration.source {source!r}: the file is empty")
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError as err:
            raise ConfigError(f"calibration.source {source!r}: first line is not JSON ({err})") from None
        if not isinstance(record, dict) or field not in record:
            raise ConfigError(f"calibration.source {source!r}: records have no {field!r} field "
                              f"(set calibration.text_field)")
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq  # only when a parquet text source is configured

        names = pq.read_schema(p).names
        if field not in names:
            raise ConfigError(f"calibration.source {source!r}: no column {field!r} (columns: {', '.join(names)}; "
                              f"set calibration.text_field)")


def check_data_leakage(config: dict) -> None:
    """No evaluated problem reaches calibration or profiling (issue 19): a local evaluation file needs its own
    calibration.source and profile.source, and the problems those stages will read are compared with the evaluated
    ones by content hash (data/sources.question_key). Local files and the synthetic source are loaded here; a hub
    id is not fetched at DAG time: the calibrate and profile stages repeat the comparison before reading weights."""
    from .data.sources import (SYNTHETIC, assert_disjoint, calibration_problems, evaluated_problems, is_local_file,
                               leakage_error, profile_problems, stage_dataset)

    ds, calib, prof = config["dataset"], config.get("calibration", {}), config.get("profile", {})
    check_data_source(prof, "source", "profile")
    why = leakage_error(ds, calib, prof)
    if why:
        raise ConfigError(why)

    def loadable(source):
        return source == SYNTHETIC or is_local_file(source)

    stages = {}
    if calib and calib.get("format", "problems") == "problems" and loadable(stage_dataset(ds, calib)["source"]):
        stages["calibration (incl. held-out)"] = lambda: calibration_problems(ds, calib, config["seed"])
    if prof and loadable(stage_dataset(ds, prof)["source"]):
        stages["profile"] = lambda: profile_problems(ds, prof, config["seed"])
    if not stages or not loadable(ds["source"]):
        return
    try:
        evaluated = evaluated_problems(ds, config["seed"])
        assert_disjoint(evaluated, {name: load() for name, load in stages.items()})
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_config(config: dict, cells: list[Cell]) -> None:
    check_data_source(config["dataset"])
    check_data_source(config["dataset"], "fewshot_source")
    check_calibration_source(config.get("calibration", {}))
    check_data_leakage(config)
    cfg = read_local_model_config(config["model"]["id"])
    if cfg is None:
        return
    native_k = cfg[FAMILIES[cfg["model_type"]]["top_k"]]
    for c in cells:
        if c.routing.top_k is not None and c.routing.top_k > native_k:
            raise ConfigError(f"cell {c.id}: top_k={c.routing.top_k} exceeds the checkpoint's num_experts_per_tok="
                              f"{native_k}; allowed: 1..{native_k}")
        p = c.precision
        if p.policy not in ("offload", "hotcold", "dynamic", "frozen"):
            continue
        fraction, text = p.memory_budget, f"memory_budget {p.memory_budget}"
        if p.memory_budget_gb is not None:  # as a fraction of this checkpoint's 16-bit expert bytes
            fraction = p.memory_budget_gb * 1e9 / full_expert_bytes_total(cfg)
            text = f"memory_budget_gb {p.memory_budget_gb:g} (= {fraction:.4f} of the 16-bit expert bytes)"
        if p.policy == "offload":
            need = 1 / num_experts(cfg)
            if fraction < need:
                raise ConfigError(f"cell {c.id}: {text} holds no full-precision expert per layer; allowed: "
                                  f"{need:.4f}..1")
        else:
            need = smallest_budget(cfg, p.bits_low, config["quantization"])
            if fraction < need:
                raise ConfigError(f"cell {c.id}: {text} is below the smallest feasible {need:.4f} (all experts at "
                                  f"{p.bits_low} bit, group size {config['quantization']['group_size']}); allowed: "
                                  f"{need:.4f}..{1 if p.policy == 'hotcold' else 2}")
