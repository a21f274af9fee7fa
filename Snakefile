# moesweep: GSM8K accuracy vs tokens/s of Qwen3-MoE models under routing and expert-precision policies.
# Stages: calibrate → quantize (per width) → profile → evaluate (per grid cell) → aggregate.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# Config files are data (workflow/moesweep/configfile.py): checked before `configfile:` below loads
# config/config.yaml, whose YTE template code Snakemake would otherwise run at that load. Files given with
# --configfile were loaded by Snakemake before this line; they are refused here all the same (see README).
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(workflow.basedir) / "workflow"))
from moesweep.configfile import ConfigFileError as _ConfigFileError, check_config_files as _check_config_files

# `--configfile a.yaml results/x` makes argparse read the target as a second config file (nargs="+"); say so
# instead of failing on its contents. `--configfile=a.yaml` cannot swallow a target.
for _f in workflow.configfiles:
    _rel = _Path(_f).resolve().relative_to(_Path.cwd()).parts if _Path(_f).resolve().is_relative_to(_Path.cwd()) else ()
    if _Path(_f).suffix.lower() not in (".yaml", ".yml", ".json") or _rel[:1] in (("results",), ("logs",)):
        raise WorkflowError(f"invalid config: config file {str(_f)!r} is an output or not a .yaml/.yml/.json file; "
                            f"did --configfile swallow a target? Write --configfile=PATH, or put targets before it")
try:
    _check_config_files([*workflow.configfiles, _Path(workflow.basedir) / "config" / "config.yaml"])
except _ConfigFileError as _err:
    raise WorkflowError(f"invalid config: {_err}")


# The shipped default, found from the Snakefile's folder so that --directory works; files given with
# --configfile=PATH are merged over it (mappings merge key by key, lists such as grid are replaced).
configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


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
