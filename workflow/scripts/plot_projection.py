"""Rule plot_projection → moesweep.plots.projection."""
import pandas as pd

from moesweep import plots
from moesweep.logs import log_to

with log_to(snakemake.log[0]):
    plots.projection(pd.read_parquet(snakemake.input.cells), snakemake.output[0])
