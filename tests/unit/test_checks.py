"""Bad input refused at DAG construction: one clear message naming the value and what is allowed."""
import json
from pathlib import Path

import pytest
import torch

from moesweep.checks import ConfigError, check_config, full_expert_bytes_total, smallest_budget
from moesweep.grid import expand_grid
from moesweep.quant.format import packed_expert_bytes


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
    """The one byte formula (DAG-time budgets and run time alike) against the tensors the quantize stage stores."""
    from moesweep.quant import QuantSpec, expert_nbytes, quantize_experts

    q = quantize_experts(torch.randn(2, 48, 192), None, None, QuantSpec(bits, group_size, symmetric, "rtn"))
    stored = sum(t[0].nbytes for t in (q.codes, q.scales, q.zeros) if t.numel())
    assert packed_expert_bytes(48, 192, bits, group_size, symmetric, "rtn") == stored == int(expert_nbytes(q)[0])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_byte_formula_counts_hqqs_float16_zeros(bits, group_size):
    from moesweep.quant import QuantSpec, expert_nbytes, quantize_experts

    q = quantize_experts(torch.randn(2, 48, 192), None, None, QuantSpec(bits, group_size, False, "hqq"))
    assert q.zeros.dtype == torch.float16
    stored = sum(t[0].nbytes for t in (q.codes, q.scales, q.zeros))
    assert packed_expert_bytes(48, 192, bits, group_size, False, "hqq") == stored == int(expert_nbytes(q)[0])


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


REPO = Path(__file__).resolve().parents[2]
HUB_ID = "Qwen/Qwen3-30B-A3B"


def write_hub_cache(root: Path, model_id: str = HUB_ID) -> Path:
    """A Hugging Face hub cache holding only `model_id`'s config.json (Qwen3-30B-A3B's shapes), as
    `hf download` leaves it: refs/main names a snapshot folder."""
    repo = root / f"models--{model_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    shapes = json.loads((REPO / "config/models/qwen3-30b-a3b.json").read_text())
    (snap / "config.json").write_text(json.dumps({k: v for k, v in shapes.items() if not k.startswith("_")}))
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = write_hub_cache(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_checked_from_the_cache_like_a_local_checkpoint(hub_cache):
    check_config(config(HUB_ID, dataset={"source": "openai/gsm8k"}), NATIVE)
    top64 = expand_grid([{"routing": {"policy": "topk", "top_k": 64}, "precision": {"policy": "full"}}])
    with pytest.raises(ConfigError, match="top_k=64 exceeds the checkpoint's num_experts_per_tok=8; allowed: 1..8"):
        check_config(config(HUB_ID), top64)
    tiny_budget = expand_grid([{"routing": {"policy": "native"},
                                "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 4,
                                              "memory_budget": 0.01}}])
    with pytest.raises(ConfigError, match="below the smallest feasible"):
        check_config(config(HUB_ID, quantization={"group_size": 128}), tiny_budget)


def test_hub_id_without_its_config_is_one_clear_error(hub_cache):
    with pytest.raises(ConfigError, match=r"model.id 'Qwen/Qwen3-235B-A22B': cannot read its config.json when the "
                                          r"DAG is built \(HF_HUB_OFFLINE is set.*model.skip_hub_checks: true"):
        check_config(config("Qwen/Qwen3-235B-A22B"), NATIVE)


def test_skip_hub_checks_is_explicit_and_logged(hub_cache, caplog):
    check_config(config("Qwen/Qwen3-235B-A22B", model={"skip_hub_checks": True}), NATIVE)
    assert "built without the checkpoint's checks" in caplog.text


def test_local_test_file_with_a_sampling_preset_needs_a_fewshot_source(tmp_path, random_checkpoint):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "#### 1"}) + "\n")
    with pytest.raises(ConfigError, match="dataset.fewshot_source is not set"):
        check_config(config(random_checkpoint, dataset={"source": str(data)}, prompt={"preset": "lmeval_gsm8k"}),
                     NATIVE)
    # zero-shot needs no exemplars; the file still needs train sources for calibration and profiling
    with pytest.raises(ConfigError, match="set calibration.source and profile.source to a train file"):
        check_config(config(random_checkpoint, dataset={"source": str(data)}, prompt={"preset": "zeroshot"}), NATIVE)


@pytest.mark.parametrize("cfg,name", [
    ({"model": {"id": "Qwen/Qwen3-30B-A3B"}, "dataset": {"source": "openai/gsm8k", "config_name": "main"},
      "prompt": {"preset": "lmeval_gsm8k"}}, "Qwen3-30B-A3B_gsm8k-main_lmeval_gsm8k"),
    ({"model": {"id": "resources/models/tiny-qwen3-moe/"}, "dataset": {"source": "synthetic"},
      "prompt": {"preset": "zeroshot"}}, "tiny-qwen3-moe_synthetic_zeroshot"),
    ({"model": {"id": "/m/x"}, "dataset": {"source": "/d/gsm8k test.jsonl"}, "prompt": {}}, "x_gsm8k-test_zeroshot"),
    ({"run": "mine", "model": {"id": "/m/x"}, "dataset": {"source": "synthetic"}, "prompt": {}}, "mine"),
])
def test_run_name(cfg, name):
    from moesweep.checks import run_name

    assert run_name(cfg) == name


def test_fixed_pool_larger_than_a_local_train_file_is_refused_at_dag_time(tmp_path, random_checkpoint):
    test, train = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    test.write_text(json.dumps({"question": "q0?", "answer": "#### 1"}) + "\n")
    train.write_text("".join(json.dumps({"question": f"t{i}?", "answer": f"#### {i}"}) + "\n" for i in range(12)))
    data = {"source": str(test), "fewshot_source": str(train)}
    with pytest.raises(ConfigError, match=r"dataset.fewshot_pool 1000: .* has 12; allowed: 1..12"):
        check_config(config(random_checkpoint, dataset=data, prompt={"preset": "lmeval_gsm8k_fixed"}), NATIVE)
    # lm-eval's per-question draw uses the whole split: no pool to fill (the leakage check is what stops it next)
    with pytest.raises(ConfigError, match="set calibration.source and profile.source"):
        check_config(config(random_checkpoint, dataset=data, prompt={"preset": "lmeval_gsm8k"}), NATIVE)
