"""Bad input refused at DAG construction: one clear message naming the value and what is allowed."""
import json

import pytest
import torch

from moesweep.checks import ConfigError, check_config, full_expert_bytes_total, packed_expert_bytes, smallest_budget
from moesweep.grid import expand_grid


def config(model_id, **over):
    cfg = {"model": {"id": str(model_id)}, "dataset": {"source": "synthetic"},
           "quantization": {"method": "gptq", "bits": [8, 2], "group_size": 32}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


NATIVE = expand_grid([{"routing": {"policy": "native"}, "precision": {"policy": "full"}}])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_byte_formula_equals_the_packed_format(bits, group_size, symmetric):
    from moesweep.quant import QuantSpec, expert_nbytes, quantize_experts

    q = quantize_experts(torch.randn(2, 48, 192), None, None, QuantSpec(bits, group_size, symmetric, "rtn"))
    assert int(expert_nbytes(q)[0]) == packed_expert_bytes(48, 192, bits, group_size, symmetric)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        check_config(config(tmp_path / "nope"), NATIVE)


def test_model_that_is_not_a_moe(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type 'qwen3' is not a supported MoE family; supported: qwen3_moe"):
        check_config(config(tmp_path), NATIVE)


def test_tokenizer_missing(random_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((random_checkpoint / "config.json").read_text())
    with pytest.raises(ConfigError, match="tokenizer missing"):
        check_config(config(tmp_path), NATIVE)


def test_top_k_larger_than_the_checkpoint(random_checkpoint):
    cells = expand_grid([{"routing": {"policy": "topk", "top_k": 5}, "precision": {"policy": "full"}}])
    with pytest.raises(ConfigError, match=r"top_k=5 exceeds .* allowed: 1..4"):
        check_config(config(random_checkpoint), cells)


def test_budget_below_the_smallest_feasible(random_checkpoint):
    cfg = json.loads((random_checkpoint / "config.json").read_text())
    need = smallest_budget(cfg, 2, {"group_size": 32})
    ok = expand_grid([{"routing": {"policy": "native"},
                       "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2, "memory_budget": need + 0.01}}])
    check_config(config(random_checkpoint), ok)
    bad = expand_grid([{"routing": {"policy": "native"},
                        "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2, "memory_budget": need / 2}}])
    with pytest.raises(ConfigError, match="below the smallest feasible"):
        check_config(config(random_checkpoint), bad)


def test_budget_in_gb_is_checked_against_the_checkpoint(random_checkpoint):
    cfg = json.loads((random_checkpoint / "config.json").read_text())
    total = full_expert_bytes_total(cfg)  # 2 layers x 8 experts x 3 x 64 x 32 x 2 bytes
    assert total == 2 * 8 * 3 * 64 * 32 * 2
    need = smallest_budget(cfg, 2, {"group_size": 32})
    ok = expand_grid([{"routing": {"policy": "native"}, "precision": {
        "policy": "dynamic", "bits_high": 8, "bits_low": 2, "memory_budget_gb": (need + 0.01) * total / 1e9}}])
    check_config(config(random_checkpoint), ok)
    bad = expand_grid([{"routing": {"policy": "native"}, "precision": {
        "policy": "dynamic", "bits_high": 8, "bits_low": 2, "memory_budget_gb": need / 2 * total / 1e9}}])
    with pytest.raises(ConfigError, match=r"memory_budget_gb .* \(= 0\.\d+ of the 16-bit expert bytes\) is below"):
        check_config(config(random_checkpoint), bad)


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "no such file"),
    ("empty.jsonl", "", "the file is empty"),
    ("data.csv", "question,answer\n", "must end in .jsonl, .json, .parquet"),
])
def test_bad_data_files(random_checkpoint, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        check_config(config(random_checkpoint, dataset={"source": str(path)}), NATIVE)


def test_hub_ids_pass_through(random_checkpoint):
    check_config(config("Qwen/Qwen3-30B-A3B", dataset={"source": "openai/gsm8k"}), NATIVE)
