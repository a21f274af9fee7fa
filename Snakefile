# moesweep: GSM8K accuracy vs tokens/s of Qwen3-MoE models under routing and expert-precision policies.
# Stages: calibrate → quantize (per width) → profile → evaluate (per grid cell) → aggregate.
from snakemake.utils import min_version

min_version("9.0")

# Config files are data (workflow/moesweep/configfile.py): checked before `configfile:` below loads
# config/config.yaml, whose YTE template code Snakemake would otherwise run at that load. Files given with
# --configfile were loaded by Snakemake before this line; they are refused here all the same (see README).
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(workflow.basedir) / "workflow"))
from moesweep.configfile import ConfigFileError as _ConfigFileError, check_config_files as _check_config_files

try:
    _check_config_files([*workflow.configfiles, *[f for f in ["config/config.yaml"] if _Path(f).exists()]])
except _ConfigFileError as _err:
    raise WorkflowError(f"invalid config: {_err}")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
