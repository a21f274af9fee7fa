"""A few CPU training steps end to end: the saved model dir reloads offline with its tokenizer."""
import json

import pytest
import torch
from safetensors import safe_open

from moesweep.data.synthetic import generate_problems
from moesweep.train import TrainSettings, completion_text, prompt_text, train_embedded_model

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            moe_intermediate_size=32, vocab_size=300, steps=3, batch_size=8, warmup_steps=1, n_train=300,
            n_eval=8, eval_batch_size=8, max_new_tokens=8, eval_every=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny-qwen3-moe"
    summary = train_embedded_model(str(out), TINY, seed=0)
    return out, summary


def test_model_dir_holds_the_expected_files_and_summary(model_dir):
    out, summary = model_dir
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "training_summary.json"} <= names
    saved = json.loads((out / "training_summary.json").read_text())
    assert saved["steps"] == 3 and saved["seed"] == 0 and 0.0 <= saved["accuracy"] <= 1.0
    assert saved["evaluation"]["n"] == 8 and saved["versions"]["transformers"]
    assert summary["accuracy"] == saved["accuracy"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_reloads_offline_as_a_sparse_qwen3_moe(model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = model_dir
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cfg = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (16, 4, True)
    assert cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    enc = tok([prompt_text("Tom has 3 cards. How many cards does Tom have now?"), prompt_text("Hi")],
              return_tensors="pt", padding=True)
    generated = model.generate(**enc, do_sample=False, max_new_tokens=4)
    assert generated.shape[0] == 2 and next(model.parameters()).dtype == torch.float32


def test_prompt_and_completion_tokenize_separately(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir[0])
    for p in generate_problems("test", 100, seed=5):
        prompt, completion = prompt_text(p["question"]), completion_text(p["answer"])
        whole = tok(prompt + completion)["input_ids"]
        assert whole == tok(prompt)["input_ids"] + tok(completion)["input_ids"]
        assert whole[-1] == tok.eos_token_id
        assert tok.decode(whole) == prompt + completion
    digits = tok.convert_ids_to_tokens(tok(" 12345")["input_ids"])
    assert digits[-5:] == ["1", "2", "3", "4", "5"]


def test_default_settings_meet_the_model_constraints():
    s = TrainSettings()
    assert s.num_experts >= 16 and s.num_experts_per_tok >= 4
    assert s.hidden_size % 32 == 0 and s.moe_intermediate_size % 32 == 0 and (s.moe_intermediate_size * 4) % 16 == 0


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown train settings"):
        TrainSettings.from_dict({"hidden": 64})
