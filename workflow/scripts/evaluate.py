"""Rule evaluate → moesweep.evaluate.evaluate_cell (one grid cell)."""
from moesweep import io
from moesweep.evaluate import evaluate_cell
from moesweep.logs import log_to, progress

with log_to(snakemake.log[0]):
    inp = snakemake.input
    if inp.get("hotness"):  # the quantized files and routing stats are verified by their readers
        io.verify(inp.hotness, "rerun the profile stage (snakemake --forcerun profile)")
    quantized = {int(k[1:]): inp[k] for k in inp.keys() if k.startswith("w") and k[1:].isdigit()}
    evaluate_cell(snakemake.params.cell, snakemake.params.settings, quantized,
                  inp.get("hotness"), inp.get("routing_stats"), snakemake.output.cell,
                  snakemake.output.problems, snakemake.output.layers, snakemake.output.trace, threads=snakemake.threads, progress=progress)
