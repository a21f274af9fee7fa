"""Rule calibrate → moesweep.stages.calibrate_stage."""
from moesweep.logs import log_to, progress
from moesweep.stages import calibrate_stage

with log_to(snakemake.log[0]):
    p = snakemake.params
    calibrate_stage(p.model, p.dataset, p.calibration, p.seed, snakemake.output.hessians,
                    snakemake.output.heldout, snakemake.output.stats, progress=progress)
