"""Dynamic, frozen and offload precision end to end in one cell, against the static extremes."""
import json

import pandas as pd
import pytest

from moesweep.checks import smallest_budget
from moesweep.evaluate import evaluate_cell
from moesweep.grid import expand_grid
from moesweep.stages import calibrate_stage, profile_stage, quantize_stage

DATASET = {"source": "synthetic", "split": "test", "limit": 6}
QUANT = {"group_size": 32, "min_tokens": 1}


@pytest.fixture(scope="module")
def stages(random_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    model = {"id": str(random_checkpoint)}
    calibrate_stage(model, DATASET, {"n_samples": 6, "n_heldout": 2, "max_length": 64, "batch_size": 4}, 0,
                    d / "h.safetensors", d / "ho.safetensors", d / "stats.json")
    for bits in (8, 2):
        quantize_stage(model, QUANT, bits, "gptq", str(d / "h.safetensors"), str(d / "ho.safetensors"),
                       str(d / f"w{bits}.safetensors"), str(d / f"e{bits}.parquet"))
    profile_stage(model, DATASET, {"n_samples": 6, "max_length": 64, "batch_size": 4}, 0, str(d / "hot.parquet"))
    return d


def run(random_checkpoint, stages, tmp_path, precision):
    cell = expand_grid([{"routing": {"policy": "native"}, "precision": precision}])[0]
    settings = {"seed": 0, "model": {"id": str(random_checkpoint)}, "dataset": DATASET,
                "prompt": {"preset": "zeroshot", "max_new_tokens": 10}, "evaluate": {"batch_size": 3, "device": "cpu"}}
    widths = [b for b in (precision.get("bits"), precision.get("bits_high"), precision.get("bits_low")) if b in (8, 2)]
    out = tmp_path / cell.id
    out.mkdir()
    evaluate_cell(cell.to_dict(), settings, {b: str(stages / f"w{b}.safetensors") for b in widths},
                  str(stages / "hot.parquet"), None, out / "cell.json", out / "p.parquet", out / "l.parquet",
                  out / "t.parquet")
    return json.loads((out / "cell.json").read_text()), pd.read_parquet(out / "p.parquet"), pd.read_parquet(out / "t.parquet")


def test_budget_everything_equals_full_precision(random_checkpoint, stages, tmp_path):
    _, full, _ = run(random_checkpoint, stages, tmp_path, {"policy": "full"})
    summary, dyn, trace = run(random_checkpoint, stages, tmp_path,
                              {"policy": "dynamic", "bits_high": 16, "bits_low": 2, "memory_budget": 2.0, "update_every": 2})
    assert dyn["completion"].tolist() == full["completion"].tolist()
    assert summary["high_precision_hit_rate"] == 1.0 and summary["transitions"] == 0
    assert summary["decisions"] >= 1 and len(trace) == 2 * (summary["decisions"] + 1)


def test_budget_nothing_equals_static_low_precision(random_checkpoint, stages, tmp_path):
    _, low, _ = run(random_checkpoint, stages, tmp_path, {"policy": "uniform", "bits": 2})
    cfg = json.loads((random_checkpoint / "config.json").read_text())
    budget = smallest_budget(cfg, 2, QUANT) + 1e-6
    summary, dyn, _ = run(random_checkpoint, stages, tmp_path,
                          {"policy": "dynamic", "bits_high": 16, "bits_low": 2, "memory_budget": budget, "update_every": 2})
    assert dyn["completion"].tolist() == low["completion"].tolist()
    assert summary["high_precision_experts"] == 0 and summary["transitions"] == 0


def test_dynamic_moves_experts_and_frozen_does_not(random_checkpoint, stages, tmp_path):
    precision = {"bits_high": 8, "bits_low": 2, "memory_budget": 0.3, "update_every": 3, "delta": 0.0}
    dyn, _, trace = run(random_checkpoint, stages, tmp_path, {"policy": "dynamic", **precision})
    frozen, _, _ = run(random_checkpoint, stages, tmp_path, {"policy": "frozen", **precision})
    assert dyn["decisions"] >= 3 and dyn["transitions"] > 0 and dyn["bytes_moved"] > 0
    assert frozen["transitions"] == 0 and frozen["decisions"] == 0
    assert dyn["budget_utilisation"] <= 1 and set(trace["layer"]) == {0, 1}


def test_offload_is_lossless_and_counts_misses(random_checkpoint, stages, tmp_path):
    _, full, _ = run(random_checkpoint, stages, tmp_path, {"policy": "full"})
    summary, off, _ = run(random_checkpoint, stages, tmp_path, {"policy": "offload", "memory_budget": 0.25})
    assert off["completion"].tolist() == full["completion"].tolist()
    assert summary["cache_misses"] > 0 and summary["bytes_moved"] == summary["cache_misses"] * 2 * 3 * 64 * 32


def test_budget_in_gb_and_hotness_allocation(random_checkpoint, stages, tmp_path):
    cfg = json.loads((random_checkpoint / "config.json").read_text())
    from moesweep.checks import full_expert_bytes_total

    total = full_expert_bytes_total(cfg)
    frac, _, _ = run(random_checkpoint, stages, tmp_path, {"policy": "hotcold", "bits_high": 8, "bits_low": 2,
                                                           "memory_budget": 0.5})
    gb, p_gb, _ = run(random_checkpoint, stages, tmp_path, {"policy": "hotcold", "bits_high": 8, "bits_low": 2,
                                                            "memory_budget_gb": 0.5 * total / 1e9})
    assert gb["memory_budget"] == pytest.approx(0.5) and gb["memory_budget_gb"] == pytest.approx(0.5 * total / 1e9)
    assert gb["high_precision_experts"] == frac["high_precision_experts"]
    hot, _, _ = run(random_checkpoint, stages, tmp_path, {"policy": "dynamic", "bits_high": 8, "bits_low": 2,
                                                          "memory_budget": 0.5, "allocation": "hotness"})
    assert hot["slot_allocation"] == "hotness" and hot["budget_utilisation"] <= 1
