"""Rule profile → moesweep.stages.profile_stage."""
from moesweep.logs import log_to, progress
from moesweep.stages import profile_stage

with log_to(snakemake.log[0]):
    p = snakemake.params
    profile_stage(p.model, p.dataset, p.profile, p.seed, snakemake.output[0], progress=progress)
