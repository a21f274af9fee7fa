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

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ConfigError(ValueError):
    pass


def is_local(path_or_id: str) -> bool:
    p = Path(path_or_id)
    return p.exists() or path_or_id.startswith((".", "/", "~")) or not HUB_ID.fullmatch(path_or_id)


def packed_expert_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of one expert projection in the quantize stage's packed format (must equal quant.expert_nbytes):
    row-packed codes + float16 scales + uint8 zero points (asymmetric only), per output row and group."""
    if bits == FULL_BITS:
        return out_features * in_features * 2
    groups = 1 if group_size <= 0 else math.ceil(in_features / group_size)
    codes = out_features * math.ceil(in_features * bits / 8)
    return codes + out_features * groups * (2 + (0 if symmetric else 1))


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
    # transformers 5 writes the expert count as num_local_experts (older files: num_experts).
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES or not (cfg.get("num_experts") or cfg.get("num_local_experts")):
        raise ConfigError(f"model.id {model_id!r}: model_type {cfg.get('model_type')!r} is not a supported MoE family; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.id {model_id!r}: tokenizer missing (expected one of {', '.join(TOKENIZER_FILES)})")
    return cfg


def smallest_budget(cfg: dict, bits_low: int, quant: dict) -> float:
    """Fraction of the 16-bit expert bytes needed with every expert at bits_low."""
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    gs, sym = quant["group_size"], quant.get("symmetric", False)
    low = packed_expert_bytes(2 * I, H, bits_low, gs, sym) + packed_expert_bytes(H, I, bits_low, gs, sym)
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


def check_config(config: dict, cells: list[Cell]) -> None:
    check_data_source(config["dataset"])
    check_data_source(config["dataset"], "fewshot_source")
    check_data_source(config.get("calibration", {}), "source", "calibration")
    cfg = read_local_model_config(config["model"]["id"])
    if cfg is None:
        return
    native_k = cfg.get("num_experts_per_tok")
    for c in cells:
        if c.routing.top_k is not None and c.routing.top_k > native_k:
            raise ConfigError(f"cell {c.id}: top_k={c.routing.top_k} exceeds the checkpoint's num_experts_per_tok="
                              f"{native_k}; allowed: 1..{native_k}")
        p = c.precision
        if p.policy == "offload":
            need = 1 / (cfg.get("num_experts") or cfg.get("num_local_experts"))
            if p.memory_budget < need:
                raise ConfigError(f"cell {c.id}: memory_budget {p.memory_budget:g} holds no full-precision expert per "
                                  f"layer; allowed: {need:.4f}..1")
        if p.policy in ("hotcold", "dynamic", "frozen"):
            need = smallest_budget(cfg, p.bits_low, config["quantization"])
            if p.memory_budget < need:
                raise ConfigError(f"cell {c.id}: memory_budget {p.memory_budget:g} is below the smallest feasible "
                                  f"{need:.4f} (all experts at {p.bits_low} bit, group size "
                                  f"{config['quantization']['group_size']}); allowed: {need:.4f}..1")
