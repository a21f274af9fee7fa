"""The reference path on CUDA (skipped without it): same completions and accounting as on the CPU."""
import json

import pandas as pd
import pytest
import torch

from moesweep.evaluate import evaluate_cell
from moesweep.grid import expand_grid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GRID = [{"routing": {"policy": "native"}, "precision": {"policy": "full"}},
        {"routing": {"policy": "topk", "top_k": 1, "capacity_factor": 1.0}, "precision": {"policy": "full"}},
        {"routing": {"policy": "native"}, "precision": {"policy": "offload", "memory_budget": 0.25}}]


@pytest.mark.parametrize("cell", expand_grid(GRID), ids=lambda c: c.id)
def test_cuda_matches_cpu(embedded_model, tmp_path, cell):
    results = {}
    for device in ("cpu", "cuda"):
        settings = {"seed": 0, "model": {"id": str(embedded_model), "dtype": "float32"},
                    "dataset": {"source": "synthetic", "synthetic_seed": 1, "split": "test", "limit": 16},
                    "prompt": {"preset": "zeroshot", "max_new_tokens": 128},
                    "evaluate": {"batch_size": 8, "device": device, "repeats": 1}}
        d = tmp_path / device
        d.mkdir()
        evaluate_cell(cell.to_dict(), settings, {}, None, None, d / "c.json", d / "p.parquet", d / "l.parquet", d / "t.parquet")
        results[device] = (json.loads((d / "c.json").read_text()), pd.read_parquet(d / "p.parquet"))
    (cpu, p_cpu), (gpu, p_gpu) = results["cpu"], results["cuda"]
    assert gpu["device"] == "cuda" and gpu["tokens_per_s"] > 0
    same = (p_cpu["completion"] == p_gpu["completion"]).mean()
    assert same >= 0.9, f"only {same:.0%} of completions equal between CPU and CUDA (fp32)"
    assert abs(cpu["drop_rate"] - gpu["drop_rate"]) < 0.02
