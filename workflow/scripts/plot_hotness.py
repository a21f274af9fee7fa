"""Rule plot_hotness → moesweep.plots.hotness."""
import pandas as pd

from moesweep import plots
from moesweep.logs import log_to

with log_to(snakemake.log[0]):
    plots.hotness(pd.read_parquet(snakemake.input[0]), snakemake.output[0])
