"""One cell end to end on a local GSM8K-format file (the real-data path, offline)."""
import json

import pandas as pd
import pytest

from moesweep.evaluate import evaluate_cell
from moesweep.grid import expand_grid


def write_gsm8k(path, n, offset=0):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i + offset, 2 * i + 1
            f.write(json.dumps({"question": f"Tom has {a} apples and gets {b} more. How many?",
                                "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}) + "\n")


def settings(model, test_file, train_file, preset="lmeval_gsm8k"):
    return {"seed": 3, "model": {"id": str(model), "dtype": "float32"},
            "dataset": {"source": str(test_file), "split": "test", "limit": 6, "fewshot_source": str(train_file),
                        "fewshot_pool": 20},
            "prompt": {"preset": preset, "max_new_tokens": 8}, "evaluate": {"batch_size": 4, "device": "cpu"}}


def test_cell_on_local_gsm8k_file(random_checkpoint, tmp_path):
    write_gsm8k(tmp_path / "test.jsonl", 10)
    write_gsm8k(tmp_path / "train.jsonl", 20, offset=100)
    cell = expand_grid([{"routing": {"policy": "topk", "top_k": 1, "capacity_factor": 1.0}, "precision": {"policy": "full"}}])[0]
    out = {k: tmp_path / f"{k}" for k in ("cell.json", "problems.parquet", "layers.parquet")}
    summary = evaluate_cell(cell.to_dict(), settings(random_checkpoint, tmp_path / "test.jsonl", tmp_path / "train.jsonl"),
                            {}, None, None, out["cell.json"], out["problems.parquet"], out["layers.parquet"], tmp_path / "trace.parquet")
    assert summary["n"] == 6 and summary["n_shots"] == 5 and summary["top_k"] == 1
    assert 0 <= summary["accuracy_ci_low"] <= summary["accuracy_strict"] <= summary["accuracy_ci_high"] <= 1
    assert summary["tokens_per_s"] > 0 and summary["drop_rate"] > 0
    problems = pd.read_parquet(out["problems.parquet"])
    assert len(problems) == 6 and problems["problem_id"].is_unique
    assert (problems["generated_tokens"] <= 8).all()
    layers = pd.read_parquet(out["layers.parquet"])
    assert (layers["assignments_dropped"] <= layers["assignments_routed"]).all()
    assert json.loads(out["cell.json"].read_text())["cell"] == cell.id


def test_local_file_without_fewshot_source_is_refused(random_checkpoint, tmp_path):
    write_gsm8k(tmp_path / "test.jsonl", 10)
    s = settings(random_checkpoint, tmp_path / "test.jsonl", tmp_path / "train.jsonl")
    del s["dataset"]["fewshot_source"]
    cell = expand_grid([{"routing": {"policy": "native"}, "precision": {"policy": "full"}}])[0]
    with pytest.raises(ValueError, match="fewshot_source"):
        evaluate_cell(cell.to_dict(), s, {}, None, None, tmp_path / "c.json", tmp_path / "p.parquet", tmp_path / "l.parquet", tmp_path / "t.parquet")
    assert not (tmp_path / "c.json").exists()


def test_resolve_engine_auto_and_explicit_choices():
    from moesweep.evaluate import resolve_engine

    assert resolve_engine("auto", "cuda", {8, 2}, "bfloat16") == "fast"
    assert resolve_engine("auto", "cpu", {16}, "float32") == "reference"
    assert resolve_engine("auto", "cuda", {3}, "bfloat16") == "reference"  # 3-bit codes
    assert resolve_engine("auto", "cuda", {16}, "float32") == "reference"  # no silent dtype change
    assert resolve_engine("reference", "cuda", {16}, "bfloat16") == "reference"
    assert resolve_engine("auto", "cuda", {16}, "bfloat16", "mixtral") == "reference"  # Qwen3-MoE only
    for args, why in [(("cpu", {16}, "bfloat16"), "needs CUDA"),
                      (("cuda", {8, 3}, "bfloat16"), "include one outside"),
                      (("cuda", {16}, "float32"), "bfloat16"),
                      (("cuda", {16}, "bfloat16", "olmoe"), "serves model_type qwen3_moe, not 'olmoe'")]:
        with pytest.raises(ValueError, match=why):
            resolve_engine("fast", *args)
