"""Rule quantization_report → moesweep.results.aggregate_quant_errors + moesweep.plots.quant_error."""
from moesweep import plots
from moesweep.logs import log_to
from moesweep.results import aggregate_quant_errors

with log_to(snakemake.log[0]):
    errors = aggregate_quant_errors(list(snakemake.input), snakemake.output.table)
    plots.quant_error(errors, snakemake.output.figure)
