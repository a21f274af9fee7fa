"""Rule aggregate → moesweep.results.aggregate."""
from moesweep.costmodel import load_cost_model
from moesweep.logs import log_to
from moesweep.results import aggregate

with log_to(snakemake.log[0]):
    o = snakemake.output
    cm = snakemake.params.cost_model
    aggregate(list(snakemake.input.cells), list(snakemake.input.problems), list(snakemake.input.layers),
              o.cells, o.problems, o.layers, o.csv, list(snakemake.input.traces), o.trace,
              load_cost_model(cm, snakemake.input.hardware) if cm else None, snakemake.params.cell_hashes)
