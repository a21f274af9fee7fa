# moesweep: GSM8K accuracy vs tokens/s of Qwen3-MoE models under routing and expert-precision policies.
# Stages: calibrate → quantize (per width) → profile → evaluate (per grid cell) → aggregate.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


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
