"""One cell end to end on a local GSM8K-format file (the real-data path, offline)."""
import json

import pandas as pd
import torch
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


def run_cell(tmp_path, model, grid_entry, **over):
    write_gsm8k(tmp_path / "test.jsonl", 10)
    write_gsm8k(tmp_path / "train.jsonl", 20, offset=100)
    s = settings(model, tmp_path / "test.jsonl", tmp_path / "train.jsonl")
    for section, values in over.items():
        s[section] = {**s[section], **values}
    cell = expand_grid([grid_entry])[0]
    out = {k: tmp_path / k for k in ("cell.json", "problems.parquet", "layers.parquet", "trace.parquet")}
    summary = evaluate_cell(cell.to_dict(), s, {}, None, None, *(out[k] for k in out))
    return summary, pd.read_parquet(out["problems.parquet"])


NATIVE_FULL = {"routing": {"policy": "native"}, "precision": {"policy": "full"}}


def test_problem_rows_record_the_prompt_its_length_and_per_question_exemplars(random_checkpoint, tmp_path):
    """lm-eval's protocol: question j (its index in the test file) gets the j-th draw of one Random(1234) stream
    over the whole train file; the rows say what the model saw."""
    from transformers import AutoTokenizer

    from moesweep.data.gsm8k import load_gsm8k
    from moesweep.data.prompts import build_prompt, get_preset, lmeval_fewshot_sets

    summary, problems = run_cell(tmp_path, random_checkpoint, NATIVE_FULL)
    preset = get_preset("lmeval_gsm8k")
    train = load_gsm8k(str(tmp_path / "train.jsonl"), split="train")
    test = {r["id"]: r for r in load_gsm8k(str(tmp_path / "test.jsonl"))}
    sets = lmeval_fewshot_sets(preset, train, 10, seed=1234)
    tok = AutoTokenizer.from_pretrained(random_checkpoint)
    for row in problems.itertuples():
        record = test[row.problem_id]
        shots = sets[record["index"]]
        assert list(row.fewshot_ids) == [e["id"] for e in shots]
        assert row.prompt == build_prompt(preset, record["question"], shots)
        assert row.prompt_tokens == len(tok(row.prompt, add_special_tokens=False).input_ids)
        assert len(row.prompt_sha256) == 64
    assert problems["fewshot_ids"].map(tuple).nunique() > 1  # not one set for all
    assert summary["fewshot_per_question"] and summary["fewshot_seed"] == 1234
    assert summary["fewshot_source"].endswith("train.jsonl [train]") and len(summary["dataset_hash"]) == 16
    assert summary["calibration_hash"] is None and summary["profile_hash"] is None  # this cell reads neither


def test_fixed_variant_uses_one_exemplar_set(random_checkpoint, tmp_path):
    summary, problems = run_cell(tmp_path, random_checkpoint, NATIVE_FULL, prompt={"preset": "lmeval_gsm8k_fixed"})
    assert problems["fewshot_ids"].map(tuple).nunique() == 1 and not summary["fewshot_per_question"]


def test_prompt_beyond_the_context_is_refused(random_checkpoint, tmp_path):
    # the random checkpoint has 512 positions; 5-shot prompts + 500 new tokens do not fit
    with pytest.raises(ValueError, match=r"prompt\.max_new_tokens 500: 6 of 6 prompts plus max_new_tokens exceed the "
                                         r"model's context of 512 positions .* longest: problem 'test-000\d\d'"):
        run_cell(tmp_path, random_checkpoint, NATIVE_FULL, prompt={"max_new_tokens": 500})
    assert not (tmp_path / "cell.json").exists()


def test_fixed_shape_timing_pass(random_checkpoint, tmp_path):
    summary, _ = run_cell(tmp_path, random_checkpoint, NATIVE_FULL, evaluate={"timing_steps": 5, "timing_repeats": 3})
    assert summary["fixed_batch"] == 4 and summary["fixed_decode_steps"] == 4 and summary["fixed_repeats"] == 3
    assert summary["fixed_prompt_tokens"] > 0
    for col in ("fixed_decode_tokens_per_s", "fixed_ms_per_step"):
        assert 0 < summary[f"{col}_min"] <= summary[col] <= summary[f"{col}_max"]
    # one tier: no hit rate (was 1.0 for full precision)
    assert summary["high_precision_hit_rate"] is None
    # weight bytes per token: dense weights once per step shared by the batch, plus the distinct experts read
    E, layers = summary["num_experts"], summary["moe_layers"]
    assert 0 < summary["fixed_distinct_experts_per_step"] <= E * layers
    assert summary["expert_bytes_per_token"] == pytest.approx(
        summary["fixed_distinct_experts_per_step"] * summary["expert_bytes_low"] / 4)
    assert summary["weight_bytes_per_token"] == pytest.approx(
        (summary["dense_step_bytes"] + 4 * summary["embedding_row_bytes"]) / 4 + summary["expert_bytes_per_token"])


def test_fixed_shape_pass_ignores_eos_and_reads_fewer_experts_under_top1(random_checkpoint, tmp_path):
    from moesweep.engine import time_decode
    from moesweep.model import install_policy, load_model
    from moesweep.routing import RoutingContext
    from moesweep.grid import expand_grid as grid

    model, tok, adapter = load_model(str(random_checkpoint))
    ids = torch.randint(1, 200, (4, 12))
    reads = {}
    for k in (4, 1):
        context = RoutingContext()
        install_policy(adapter, grid([{"routing": {"policy": "topk", "top_k": k}, "precision": {"policy": "full"}}])[0].routing,
                       context, None)
        t = time_decode(model, ids, 6, context)
        assert t.decode_steps == 5 and t.generated_tokens == 24  # every row decodes every step
        reads[k] = sum(s.distinct_experts_decode for s in context.stats.values())
    assert reads[1] < reads[4]
