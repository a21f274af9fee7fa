"""Shared fixtures: a random-weight tiny Qwen3-MoE checkpoint with its own tokenizer, built offline."""
from __future__ import annotations

import os

import torch

# Without a GPU (CI) the fast engine's Triton kernels run in Triton's CPU interpreter; the switch is read when
# triton is imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = REPO / "resources" / "models" / "tiny-qwen3-moe"


def build_random_checkpoint(out: Path, num_experts=8, top_k=4, hidden=64, inter=32, layers=2, seed=0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Question: Tom has 3 apples and buys 4 more. How many?\nAnswer: 3+4=<<3+4=7>>7\n#### 7"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else len(fast),
                         hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden // 4, num_experts=num_experts, num_experts_per_tok=top_k,
                         norm_topk_prob=True, max_position_embeddings=512,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # spread router logits so routing is not degenerate
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random-qwen3-moe")


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    if not (EMBEDDED_MODEL / "model.safetensors").exists():
        pytest.fail(f"embedded model missing at {EMBEDDED_MODEL}")
    return EMBEDDED_MODEL


def read_json(p):
    return json.loads(Path(p).read_text())
