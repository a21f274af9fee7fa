"""An end-to-end micro sweep through Snakemake for each non-default MoE family (tiny random-weight checkpoints):
calibrate → quantize (2 widths) → profile → evaluate (native, top-1 CF 1.0, hot/cold 8/2) → aggregate.

Random weights solve nothing, so this checks the plumbing per family (every stage runs, every table names the
family's MoE layers only, routing and precision do what the cell says), not accuracy. Kept small: 4 problems,
16 new tokens, and only the summary and quantization-error tables as targets (the figures do not depend on the family).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from family_models import EXPERTS, FAMILIES, build_family_checkpoint
from test_workflow import MICRO, snakemake, write_config

MOE_LAYERS = {"qwen2_moe": [0, 2], "olmoe": [0, 1], "mixtral": [0, 1], "phimoe": [0, 1]}
CELLS = ["native-w16", "top1-cf1-w16", "native-hot8-cold2-b0.3"]
LIMIT = 4


def family_config(checkpoint, family: str) -> dict:
    cfg = json.loads(json.dumps(MICRO))
    cfg["model"] = {"id": str(checkpoint), "name": f"tiny-random-{family}", "dtype": "float32"}
    cfg["dataset"]["limit"] = LIMIT
    cfg["prompt"]["max_new_tokens"] = 16
    cfg["evaluate"]["batch_size"] = LIMIT
    cfg["calibration"] = {**cfg["calibration"], "n_samples": 8, "n_heldout": 4, "max_length": 64}
    cfg["profile"] = {**cfg["profile"], "n_samples": 8, "max_length": 64}
    cfg["grid"] = [
        {"family": "native", "routing": {"policy": "native"}, "precision": {"policy": "full"}},
        {"family": "top1-capacity", "routing": {"policy": "topk", "top_k": 1, "capacity_factor": 1.0},
         "precision": {"policy": "full"}},
        {"family": "static-hotcold", "routing": {"policy": "native"},
         "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2, "memory_budget": 0.3}},
    ]
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_micro_sweep_runs_on_every_family(tmp_path, family):
    checkpoint = build_family_checkpoint(family, tmp_path / "model")
    workdir = tmp_path / "run"
    write_config(workdir, family_config(checkpoint, family))
    snakemake(workdir, "results/micro/summary/cells.parquet", "results/micro/quantization/error.parquet")

    layers = MOE_LAYERS[family]
    errors = pd.read_parquet(workdir / "results/micro/quantization/error.parquet")
    assert sorted(errors["layer"].unique()) == layers and sorted(errors["bits"].unique()) == [2, 8]
    assert len(errors) == len(layers) * EXPERTS * 2 * 2  # layer × expert × projection × width
    hotness = pd.read_parquet(workdir / "results/micro/profile/hotness.parquet")
    assert sorted(hotness["layer"].unique()) == layers and len(hotness) == len(layers) * EXPERTS

    cells = pd.read_parquet(workdir / "results/micro/summary/cells.parquet").set_index("cell")
    assert sorted(cells.index) == sorted(CELLS)
    assert (cells["n"] == LIMIT).all()
    assert cells.loc["native-w16", "drop_rate"] == 0
    assert cells.loc["top1-cf1-w16", "drop_rate"] > 0  # random routers overflow a capacity of ceil(T / 8)
    assert cells.loc["native-w16", "top_k"] == cells.loc["native-w16", "native_top_k"] == 2
    assert cells.loc["top1-cf1-w16", "top_k"] == 1
    # hot/cold at 30 % of the 16-bit expert bytes (routed experts only; a shared expert is outside the budget)
    assert cells.loc["native-hot8-cold2-b0.3", "expert_weight_bytes"] <= 0.3 * cells.loc["native-w16", "expert_weight_bytes"]

    routed = pd.read_parquet(workdir / "results/micro/summary/layers.parquet")
    assert sorted(routed["layer"].unique()) == layers
    problems = pd.read_parquet(workdir / "results/micro/summary/problems.parquet")
    assert len(problems) == len(CELLS) * LIMIT and (problems["generated_tokens"] > 0).all()
