"""Rule quantize with quantization.fused → moesweep.stages.fused_quantize_stage (calibration + all widths)."""
from moesweep.logs import log_to, progress
from moesweep.stages import fused_quantize_stage

with log_to(snakemake.log[0]):
    p = snakemake.params
    n = len(p.widths)
    fused_quantize_stage(p.model, p.dataset, p.calibration, p.quantization, p.seed, list(p.widths), p.method,
                         dict(zip(p.widths, snakemake.output.weights[:n])), dict(zip(p.widths, snakemake.output.errors[:n])),
                         snakemake.output.stats, progress=progress)
