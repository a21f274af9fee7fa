"""Rule quantize → moesweep.stages.quantize_stage (one method, one width)."""
from moesweep.logs import log_to
from moesweep.stages import quantize_stage

with log_to(snakemake.log[0]):
    p = snakemake.params
    quantize_stage(p.model, p.quantization, int(snakemake.wildcards.bits), snakemake.wildcards.method,
                   snakemake.input.hessians, snakemake.input.heldout, snakemake.output.weights, snakemake.output.error)
