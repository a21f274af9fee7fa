"""Rule plot_trade_off → moesweep.plots (pareto, capacity_factor, precision_budget)."""
import pandas as pd

from moesweep import plots
from moesweep.logs import log_to

with log_to(snakemake.log[0]):
    cells = pd.read_parquet(snakemake.input[0])
    plots.pareto(cells, snakemake.output.pareto)
    plots.capacity_factor(cells, snakemake.output.capacity)
    plots.precision_budget(cells, snakemake.output.budget)
