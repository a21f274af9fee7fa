"""Checks of the config against the files it names, run when the DAG is built (no torch import: cheap).

The JSON schema catches wrong keys, types and ranges; these checks catch what needs the checkpoint's
config.json or the file system: a missing model or tokenizer, an unsupported family, k′ > k, a memory budget
no precision map can meet, a missing data file. Each raises ConfigError with one message naming the bad
value and what is allowed. A hub id's config.json is read from the Hugging Face cache (or fetched, a few kB)
when the DAG is built, so the same checks run for hub ids as for local directories.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

from .grid import Cell, GridError, expand_grid
from .quant.format import packed_expert_bytes

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
    check_model_type(cfg, model_id)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.id {model_id!r}: tokenizer missing (expected one of {', '.join(TOKENIZER_FILES)})")
    return cfg


def check_model_type(cfg: dict, model_id: str) -> dict:
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model.id {model_id!r}: model_type {cfg.get('model_type')!r} is not a supported MoE family; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_family_config(cfg, f"model.id {model_id!r}")
    return cfg


def read_hub_model_config(model_id: str, revision: str | None = None) -> dict:
    """config.json of a hub checkpoint: from the Hugging Face cache (HF_HOME / HF_HUB_CACHE) without network,
    else downloaded (one small file) unless HF_HUB_OFFLINE is set. ConfigError when neither works."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # only for hub ids: parse time stays cheap

    where = f"model.id {model_id!r}" + (f" (revision {revision!r})" if revision else "")
    path = try_to_load_from_cache(model_id, "config.json", revision=revision)
    if not isinstance(path, str):
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
        else:
            try:
                path = hf_hub_download(model_id, "config.json", revision=revision)
                reason = ""
            except Exception as err:  # network, auth, missing repo: all mean the checks cannot run
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if not isinstance(path, str):
            raise ConfigError(f"{where}: cannot read its config.json when the DAG is built ({reason}); the sweep's "
                              f"checks need it. Put the checkpoint in the Hugging Face cache first (e.g. `hf download "
                              f"{model_id}` on a node with network, HF_HOME on shared storage), or use a local "
                              f"directory, or set model.skip_hub_checks: true to build the DAG unchecked")
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: its cached config.json {path} is unreadable ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: its cached config.json {path} is not a JSON object")
    return check_model_type(cfg, model_id)


def read_model_config(model: dict) -> dict | None:
    """The checkpoint's config.json for the DAG-time checks, local or hub; None only when the config says
    model.skip_hub_checks: true and the hub config cannot be had (logged: the checks then run at load time)."""
    model_id = model["id"]
    local = read_local_model_config(model_id)
    if local is not None:
        return local
    try:
        return read_hub_model_config(model_id, model.get("revision"))
    except ConfigError as err:
        if not model.get("skip_hub_checks", False):
            raise
        logging.getLogger("moesweep").warning("model.skip_hub_checks: the DAG is built without the checkpoint's "
                                              "checks (%s)", err)
        return None


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def run_name(config: dict) -> str:
    """The run folder's name (results/<run>/): `run` from the config, else <model>_<data set>_<prompt preset>,
    from the model id's last component (not model.name: relabelling must not move the cached stages)."""
    if config.get("run"):
        return config["run"]
    ds = config["dataset"]
    source = ds["source"]
    if source == "synthetic":
        data = "synthetic"
    elif is_local(source):
        data = Path(source).stem
    else:
        data = f"{source.rsplit('/', 1)[-1]}-{ds.get('config_name', 'main')}"
    model = Path(config["model"]["id"].rstrip("/")).name
    return "_".join(_label(x) for x in (model, data, config["prompt"].get("preset", "zeroshot")))


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
    method = quant.get("method", "gptq")
    low = packed_expert_bytes(2 * I, H, bits_low, gs, sym, method) + packed_expert_bytes(H, I, bits_low, gs, sym, method)
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


def check_fewshot_source(dataset: dict, prompt: dict) -> None:
    """A preset that draws exemplars from a train split needs one: a local file is a single split."""
    from .data.prompts import get_preset  # torch-free

    try:
        preset = get_preset(prompt.get("preset", "zeroshot"))
    except ValueError as err:
        raise ConfigError(f"prompt.preset: {err}") from None
    if preset.n_shots == 0 or preset.fixed_exemplars is not None:
        return
    source = dataset["source"]
    if is_local(source) and source != "synthetic" and not dataset.get("fewshot_source"):
        raise ConfigError(f"prompt.preset {preset.name!r} draws {preset.n_shots} exemplars from a train split, but "
                          f"dataset.source {source!r} is a local file (one split) and dataset.fewshot_source is not "
                          f"set; set dataset.fewshot_source to a train file (or use a hub id / synthetic)")
    # A preset drawing one pool (not lm-eval's per-question draw from the whole split) subsamples fewshot_pool
    # records: a local train file must hold that many, or the evaluate jobs would fail after the expensive stages.
    pool_source = dataset.get("fewshot_source") or source
    pool = dataset.get("fewshot_pool", 1000)
    if not preset.per_question and pool_source != "synthetic" and is_local(pool_source) and Path(pool_source).is_file():
        from .data.gsm8k import load_gsm8k  # torch-free; only for a local pool file

        try:
            available = len(load_gsm8k(pool_source, dataset.get("config_name", "main"), dataset.get("fewshot_split", "train")))
        except ValueError as err:
            raise ConfigError(f"dataset.fewshot_source {pool_source!r}: {err}") from None
        if available < pool:
            raise ConfigError(f"dataset.fewshot_pool {pool}: prompt.preset {preset.name!r} draws its exemplars from "
                              f"{pool} train problems but dataset.fewshot_source {pool_source!r} has {available}; "
                              f"allowed: 1..{available}")


def check_data_leakage(config: dict) -> None:
    """No evaluated problem reaches calibration or profiling (issue 19): a local evaluation file needs its own
    calibration.source and profile.source, and the problems those stages will read are compared with the evaluated
    ones by content hash (data/sources.question_key). Local files and the synthetic source are loaded here; a hub
    id is not fetched at DAG time: the calibrate and profile stages repeat the comparison before reading weights."""
    from .data.sources import (SYNTHETIC, assert_disjoint, calibration_problems, evaluated_problems, evaluation_split,
                               is_local_file,
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
        # the whole evaluated split of a local file; the synthetic source's evaluated subsample (no whole split)
        evaluated = evaluation_split(ds, config["seed"]) or evaluated_problems(ds, config["seed"])
        assert_disjoint(evaluated, {name: load() for name, load in stages.items()})
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_config(config: dict, cells: list[Cell], local_exec: bool = True) -> None:
    check_model_config_json(config["model"]["id"])  # before read_local_model_config parses it
    check_data_source(config["dataset"])
    check_data_source(config["dataset"], "fewshot_source")
    check_fewshot_source(config["dataset"], config.get("prompt", {}))
    check_calibration_source(config.get("calibration", {}))
    check_data_leakage(config)
    cfg = read_model_config(config["model"])
    check_model_weights(config["model"]["id"])
    check_engine(config, cells, cfg, local_exec)
    check_group_size(config, cfg)
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


# ---- Inputs refused before the first job (issue 22): each check raises ConfigError in one line naming the key,
# the value and what is allowed. check_values runs before the schema (whose messages read badly for nan and inf).

PATH_KEYS = (("model", "id"), ("dataset", "source"), ("dataset", "fewshot_source"), ("calibration", "source"),
             ("cost_model", "target_model"))
DEFAULT_MAX_CELLS = 1000
# The fast engine's widths (= moesweep.fast.FAST_BITS; repeated here because importing the engine imports
# torch, and these checks run on every DAG build; tests/unit/test_catalogue.py asserts they agree).
FAST_WIDTHS = (16, 8, 4, 2)
FAST_MODEL_TYPES = ("qwen3_moe",)


def key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def check_values(config: dict) -> None:
    """Every number finite (`.inf`, `.nan` pass a schema's bounds or read as nonsense there), and no path that
    starts with `~`: the stages open paths as given, so `~/x` would pass a check that expanded it and then fail
    to open inside a job."""
    def walk(value, parts):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key_path(parts)}: {value} is not a finite number; allowed: finite numbers")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, [*parts, k])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, [*parts, i])

    walk(config, [])
    for section, key in PATH_KEYS:
        sec = config.get(section)
        value = sec.get(key) if isinstance(sec, dict) else None  # a section of the wrong type: the schema's line
        if isinstance(value, str) and value.startswith("~"):
            raise ConfigError(f"{section}.{key} {value!r}: '~' is not expanded (files are opened as written); "
                              f"allowed: an absolute or relative path, e.g. {str(Path(value).expanduser())!r}")


def schema_errors(config: dict, schema_file: str | Path) -> list[str]:
    """One line per schema violation: the key, the value's error and what is allowed (jsonschema's own message
    of the failing alternative that says what is allowed, cut to 200 characters: a rejected mapping is not
    repeated whole)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for err in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        while err.context:  # oneOf/anyOf: the alternative that failed on more than the value's type
            err = min(err.context, key=lambda e: (e.validator == "type", -len(e.absolute_path)))
        where = key_path(err.absolute_path) or "top level"
        message = " ".join(err.message.split())
        lines.append(f"{where}: {message[:200]}{'…' if len(message) > 200 else ''}")
    return lines


def count_cells(grid: list) -> int:
    """Cells a grid expands to (grid.expand_grid's cartesian products), counted without building them."""
    total = 0
    for entry in grid:
        n = 1
        for section in ("routing", "precision"):
            for v in (entry.get(section) or {}).values():
                n *= len(v) if isinstance(v, list) else 1
        total += n
    return total


def check_grid_size(config: dict) -> None:
    cap = config.get("max_cells", DEFAULT_MAX_CELLS)
    n = count_cells(config["grid"])
    if n > cap:
        raise ConfigError(f"grid: expands to {n:,} cells, above max_cells {cap:,}; allowed: at most max_cells cells "
                          f"(raise max_cells to run a grid this large: one evaluate job per cell)")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, bad header), from its header alone; None when it is whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            return f"header length {n} does not fit the file's {size:,} bytes"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "header is not valid JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    data = size - 8 - n
    if max(ends, default=0) != data:
        return f"tensors need {max(ends, default=0):,} bytes of data, the file holds {data:,} (truncated?)"
    return None


def check_model_config_json(model_id: str) -> None:
    """A local checkpoint's config.json, when there, is a JSON object (read_local_model_config, which names a
    missing directory or file, then reads it). Hub ids are checked when their files are first loaded."""
    if not is_local(model_id) or not Path(model_id).is_dir():
        return
    root = Path(model_id)
    cfg_path = root / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"model.id {model_id!r}: {cfg_path} is not valid JSON ({err}); allowed: the "
                              f"checkpoint's config.json, a JSON object") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"model.id {model_id!r}: {cfg_path} holds a JSON {type(cfg).__name__}; allowed: the "
                              f"checkpoint's config.json, a JSON object")


def check_model_weights(model_id: str) -> None:
    """A local checkpoint's safetensors weights are there and whole (headers only: cheap at any size)."""
    if not is_local(model_id) or not Path(model_id).is_dir():
        return
    root = Path(model_id)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"model.id {model_id!r}: {index} is not a safetensors index with a weight_map "
                              f"({type(err).__name__}: {err})") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ConfigError(f"model.id {model_id!r}: {root / missing[0]} (named in {index.name}) is missing"
                              f"{f' with {len(missing) - 1} more' if len(missing) > 1 else ''}; download the "
                              f"checkpoint's weights again")
        files = [root / s for s in shards]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in root.glob("*.bin"))
        raise ConfigError(f"model.id {model_id!r}: no weights in that directory; allowed: *.safetensors files"
                          f"{f' (found {pickled[0]}: pickle weights are never loaded)' if pickled else ''}")
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            raise ConfigError(f"model.id {model_id!r}: weights file {f} is unusable ({problem}); download it again")


def cuda_device_count() -> int:
    """CUDA devices visible to this process, from the driver library (no torch import; 0 without a driver)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def check_engine(config: dict, cells: list[Cell], model_cfg: dict | None, local_exec: bool = True) -> None:
    """evaluate.engine: fast where the fast engine cannot run (evaluate.resolve_engine's conditions, known now).
    CUDA's presence is checked only when jobs run on this machine: a DAG built on a cluster's login node for
    GPU nodes (--executor slurm) is not refused for the login node's lack of a GPU."""
    ev = config.get("evaluate", {})
    if ev.get("engine", "auto") != "fast":
        return
    device = ev.get("device", "auto")
    where = f"evaluate.engine 'fast' with evaluate.device {device!r}"
    if device == "cpu":
        raise ConfigError(f"{where}: the fast engine runs on CUDA only; allowed: device auto/cuda/cuda:N, or "
                          f"engine auto/reference")
    if config["model"].get("dtype", "float32") != "bfloat16":
        raise ConfigError(f"evaluate.engine 'fast' with model.dtype {config['model'].get('dtype', 'float32')!r}: the "
                          f"fast engine computes in bfloat16; allowed: model.dtype bfloat16, or engine auto/reference")
    if model_cfg is not None and model_cfg.get("model_type") not in FAST_MODEL_TYPES:
        raise ConfigError(f"evaluate.engine 'fast' with model_type {model_cfg.get('model_type')!r}: allowed: "
                          f"{', '.join(FAST_MODEL_TYPES)}, or engine auto/reference")
    for c in cells:
        odd = sorted(set(c.precision.widths) - set(FAST_WIDTHS))
        if odd:
            raise ConfigError(f"evaluate.engine 'fast' with cell {c.id}: width {odd[0]} bit; the fast engine serves "
                              f"{'/'.join(map(str, FAST_WIDTHS))} bit; allowed: those widths, or engine auto")
    if local_exec and cuda_device_count() == 0:
        raise ConfigError(f"{where}: no CUDA device is visible on this machine, where the jobs would run; allowed: "
                          f"engine auto/reference here, or a cluster executor (--executor slurm) with GPU nodes")


def check_group_size(config: dict, model_cfg: dict | None) -> None:
    """hqq groups the flattened weight, so group_size must divide both expert input widths (hidden size for
    gate/up, the expert intermediate size for down); gptq and rtn take a shorter last group."""
    quant = config.get("quantization", {})
    gs = quant.get("group_size", -1)
    if model_cfg is None or quant.get("method") != "hqq" or gs <= 0:
        return
    widths = {"hidden_size": model_cfg["hidden_size"],
              FAMILIES[model_cfg["model_type"]]["intermediate"]: expert_intermediate_size(model_cfg)}
    for key, width in widths.items():
        if width % gs:
            ok = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
            raise ConfigError(f"quantization.group_size {gs} with method 'hqq': does not divide the checkpoint's "
                              f"{key} {width}; allowed: a divisor of {' and '.join(map(str, widths.values()))}"
                              f" ({', '.join(map(str, ok)) or 'none of 16..256'}), or -1 (per channel)")


def check_all(config: dict, schema_file: str | Path, local_exec: bool = True) -> list[Cell]:
    """Every DAG-time check, in the order common.smk runs them; returns the grid's cells. Raises ConfigError:
    one line, or one line per schema violation."""
    check_values(config)
    errors = schema_errors(config, schema_file)
    if errors:
        raise ConfigError("\n".join(errors))
    check_grid_size(config)
    try:
        cells = expand_grid(config["grid"])
    except GridError as err:
        raise ConfigError(str(err)) from None
    check_config(config, cells, local_exec)
    return cells
