# Config validation and grid expansion. Parse-time cheap on purpose: no torch import here (the slurm
# executor re-parses the Snakefile inside every job).
import json
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from moesweep.checks import ConfigError, check_all, run_name  # noqa: E402
from moesweep.grid import config_hash  # noqa: E402
from moesweep.costmodel import HARDWARE_FILE as SHIPPED_HARDWARE_FILE, CostModelError, load_cost_model  # noqa: E402

# A relative path in the config is looked up in the working directory, then in this repository (the embedded
# model, config/models/), so the shipped config also runs under --directory DIR. A path found in neither place is
# left as written, and the checks below name it.
REPO_PATH_KEYS = (("model", "id"), ("dataset", "source"), ("dataset", "fewshot_source"), ("calibration", "source"),
                  ("profile", "source"), ("cost_model", "target_model"))
for _section, _key in REPO_PATH_KEYS:
    _value = (config.get(_section) or {}).get(_key)
    if isinstance(_value, str) and _value and not _value.startswith(("/", "~")) and not Path(_value).exists():
        if (Path(workflow.basedir) / _value).exists():
            config[_section][_key] = str(Path(workflow.basedir) / _value)

# Every bad input is refused here, before any job, in one line each (checks.check_all: values, schema, the
# grid's size before expanding it, then the config against the files it names). snakemake's validate then
# passes; it stays for the schema defaults it would fill in. CUDA's presence (engine: fast) is asked only of the
# machine that runs the jobs: not of a login node submitting to a cluster, nor inside a cluster job, which may
# be another stage's on a CPU node.
try:
    CELLS = check_all(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml",
                      local_exec=workflow.local_exec and not workflow.remote_exec)
    RUN = run_name(config)
except ConfigError as err:
    raise WorkflowError("\n".join(f"invalid config: {line}" for line in str(err).splitlines()))
validate(config, schema="../schemas/config.schema.yaml")
if config["model"].get("trust_remote_code"):  # on the terminal at DAG time, not only inside the jobs' logs
    from snakemake.logging import logger

    logger.warning(f"WARNING: model.trust_remote_code is true: the jobs will run Python code shipped with "
                   f"{config['model']['id']!r}; set it to false unless you trust that checkpoint's code")
# Every output of this config lives under its run folder, so two configs never overwrite each other's cells.
OUT = f"results/{RUN}"
LOGS = f"logs/{RUN}"
BENCH = f"benchmarks/rules/{RUN}"
CELL_BY_ID = {c.id: c for c in CELLS}
# Cost model: shipped hardware profiles + the config's extra ones, checked now so a bad profile stops the DAG.
HARDWARE_FILE = str(SHIPPED_HARDWARE_FILE)
try:
    COST_MODEL = load_cost_model(config["cost_model"], HARDWARE_FILE) if config.get("cost_model") else None
except CostModelError as err:
    raise WorkflowError(f"invalid config: {err}")
METHOD = config["quantization"]["method"]
# Widths the quantize stage produces: those listed in the config and those any cell needs.
WIDTHS = sorted(set(config["quantization"]["bits"]) | {b for c in CELLS for b in c.precision.widths})


def cached_artefacts():
    """{artefact: the rule that writes it} of every cached, content-hashed file this config uses."""
    fused = config["quantization"].get("fused", False)
    calibrate = "quantize" if fused else "calibrate"
    out = {f"{OUT}/calibration/routing_stats.json": calibrate, f"{OUT}/profile/hotness.parquet": "profile"}
    if not fused:
        out.update({f"{OUT}/calibration/{n}.safetensors": "calibrate" for n in ("hessians", "heldout_hessians")})
    for bits in WIDTHS:
        out.update({f"{OUT}/quantization/{METHOD}-w{bits}{s}": "quantize" for s in (".safetensors", ".error.parquet")})
    for cell in CELL_BY_ID:
        out.update({f"{OUT}/cells/{cell}/{n}": "evaluate" for n in ("cell.json", "problems.parquet", "layers.parquet", "trace.parquet")})
    out.update({f"{OUT}/summary/{n}.parquet": "aggregate" for n in ("cells", "problems", "layers", "trace")})
    out[f"{OUT}/quantization/error.parquet"] = "quantization_report"
    return out


def verify_cache(wildcards):
    """An input function of rule all that adds no input: it checks the content hashes of the cached artefacts
    when the DAG is built (moesweep/io.py verify_cached; a file is hashed again only when its stat changed), so
    a corrupt artefact stops the next run even when no job would read it. An input function because only then
    are the DAG settings known, and files this run is told to rebuild (--forcerun, -F, --force) are not checked.
    Runs with other targets than all rely on the readers, which verify every artefact they open."""
    from moesweep.io import ArtefactError, verify_cached

    ds = workflow.dag_settings
    if ds.forceall:
        return []
    forced = {os.path.normpath(t) for t in ds.forcerun}
    forced |= {os.path.normpath(t) for t in ds.targets} if ds.forcetargets else set()
    try:
        verify_cached({path: f"rebuild it and what used it: snakemake --forcerun {path}"
                       for path, rule in cached_artefacts().items() if path not in forced and rule not in forced},
                      Path(".snakemake") / "moesweep-verified.json")
    except ArtefactError as err:
        raise WorkflowError(f"invalid cache: {err}")
    return []


wildcard_constraints:
    cell="|".join(map(re.escape, CELL_BY_ID)) if CELL_BY_ID else "NONE",
    bits="2|3|4|8",
    method="gptq|rtn|hqq",


def model_files():
    """The checkpoint's files as inputs (local directories only), so a changed model reruns every stage."""
    root = Path(config["model"]["id"]).expanduser()
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if p.suffix in (".json", ".safetensors"))


def data_files(*keys):
    """Local data files the stage reads, as inputs: editing one reruns its stages (hub ids and synthetic
    data have no file). `keys` are (section, key) pairs; calibration and profile fall back to dataset.source."""
    files = []
    for section, key in keys:
        source = (config.get(section) or {}).get(key)
        if section in ("calibration", "profile") and key == "source" and not source:
            source = config["dataset"]["source"]
        if source and source != "synthetic" and Path(source).expanduser().is_file():
            files.append(str(Path(source).expanduser()))
    return sorted(set(files))


EVALUATE_DATA = (("dataset", "source"), ("dataset", "fewshot_source"))
CALIBRATION_DATA = (("calibration", "source"),)
PROFILE_DATA = (("profile", "source"),)


# Per-stage cache keys. Snakemake reruns a job when its params change, so each stage's params hold only the
# config keys that change its output: a label (model.name), the evaluation subset (dataset.limit), the prompt or
# the evaluate section never replan calibration, quantization or profiling (tests/integration/test_cache_keys.py).
MODEL_KEYS = ("id", "dtype", "revision", "trust_remote_code")
# What calibration and profiling read of the dataset section: its train split (when they have no source of their
# own) and the evaluated split's name, whose every problem they must not use (not `limit`: see
# data/sources.evaluation_split).
TRAIN_DATA_KEYS = ("source", "config_name", "split", "synthetic", "synthetic_seed")


def model_settings():
    return {k: config["model"][k] for k in MODEL_KEYS if k in config["model"]}


def train_data_settings():
    return {k: config["dataset"][k] for k in TRAIN_DATA_KEYS if k in config["dataset"]}


def stage_settings():
    """The config sections an evaluation depends on (params: changing one reruns the cells)."""
    return {k: config[k] for k in ("seed", "model", "dataset", "prompt", "evaluate")}


def quantized_file(bits):
    return f"{OUT}/quantization/{METHOD}-w{bits}.safetensors"


def evaluate_inputs(wildcards):
    cell = CELL_BY_ID[wildcards.cell]
    inputs = {"model": model_files(), "data": data_files(*EVALUATE_DATA)}
    for bits in cell.precision.widths:
        inputs[f"w{bits}"] = quantized_file(bits)
    if cell.precision.policy in ("hotcold", "dynamic", "frozen"):
        inputs["hotness"] = f"{OUT}/profile/hotness.parquet"
    if cell.routing.policy == "skip":
        inputs["routing_stats"] = f"{OUT}/calibration/routing_stats.json"
    return inputs


def cell_outputs(name):
    return expand(f"{OUT}/cells/{{cell}}/{name}", cell=list(CELL_BY_ID))


def all_outputs():
    # Every cell's outputs are targets of their own: Snakemake reruns a job whose outputs are missing only when
    # a job that needs it must run, and a present, newer summary does not, so a deleted (or failed and cleaned)
    # cell folder would otherwise never be recomputed ("Nothing to be done" over a stale summary).
    return [
        *(f for name in ("cell.json", "problems.parquet", "layers.parquet", "trace.parquet") for f in cell_outputs(name)),
        *(
            f"{OUT}/{path}"
            for path in (
                "summary/cells.parquet",
                "summary/problems.parquet",
                "summary/layers.parquet",
                "summary/cells.csv",
                "quantization/error.parquet",
                "figures/pareto.png",
                "figures/capacity_factor.png",
                "figures/precision_budget.png",
                "figures/load_imbalance.png",
                "figures/dynamic_precision.png",
                "summary/trace.parquet",
                "figures/hotness.png",
                "figures/quant_error.png",
                *(["figures/projection.png"] if COST_MODEL else []),
            )
        ),
        verify_cache,
    ]
