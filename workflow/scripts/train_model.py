"""Snakemake script for rule train_model: train the embedded tiny Qwen3-MoE into the output directory."""
import logging

from moesweep.train import train_embedded_model

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821 - injected by Snakemake
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.captureWarnings(True)
try:
    train_embedded_model(snakemake.output[0], dict(snakemake.params.settings),  # noqa: F821
                         seed=int(snakemake.params.seed))  # noqa: F821
except Exception:
    logging.exception("training failed")
    raise
