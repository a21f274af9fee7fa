"""Rule plot_trade_off → moesweep.plots (pareto, throughput, capacity_factor, precision_budget, dynamic_precision,
load_imbalance)."""
import pandas as pd

from moesweep import plots
from moesweep.logs import log_to

with log_to(snakemake.log[0]):
    cells = pd.read_parquet(snakemake.input.cells)
    plots.pareto(cells, snakemake.output.pareto)
    plots.throughput(cells, snakemake.output.throughput)
    plots.capacity_factor(cells, snakemake.output.capacity)
    plots.precision_budget(cells, snakemake.output.budget)
    plots.dynamic_precision(cells, snakemake.output.dynamic)
    plots.load_imbalance(pd.read_parquet(snakemake.input.layers), snakemake.output.imbalance, cells)
