"""`python -m moesweep.runfolder [CONFIG]`: the run folder (results/<run>) of the shipped config with CONFIG merged
over it as Snakemake merges `--configfile` (mappings key by key, everything else replaced), for `make run`'s
report path. Loads YAML with safe_load only."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .checks import run_name

DEFAULT = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_folder(*config_files: str) -> str:
    config = yaml.safe_load(DEFAULT.read_text())
    for path in config_files:
        config = merged(config, yaml.safe_load(Path(path).read_text()) or {})
    return f"results/{run_name(config)}"


if __name__ == "__main__":
    print(run_folder(*sys.argv[1:]))
