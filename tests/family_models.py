"""Tiny random-weight checkpoints of every supported MoE family, built offline from transformers' config classes.

Shared by tests/unit/test_families.py and tests/integration/test_families_sweep.py (the tests directory is on
sys.path through its conftest.py). Each checkpoint reuses the embedded model's tokenizer (vocab 512), so the
synthetic GSM-style data and the prompt presets work unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "resources" / "models" / "tiny-qwen3-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Shapes shared by every family: 64 hidden, 8 experts, top-2, expert intermediate 32 (divisible by the
# micro sweep's quantization group size 32; 32 × 4 bytes a multiple of 16, so CPU grouped_mm also works).
COMMON = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, num_experts_per_tok=2, eos_token_id=0, pad_token_id=0,
              bos_token_id=None, tie_word_embeddings=False)
EXPERTS, INTER = 8, 32

FAMILIES = ("qwen2_moe", "olmoe", "mixtral", "phimoe")


def family_config(family: str, **over):
    """The transformers config of a tiny model of `family` (keys as each config class names them)."""
    from transformers import MixtralConfig, OlmoeConfig, PhimoeConfig, Qwen2MoeConfig

    if family == "qwen2_moe":
        # 3 layers with layer 1 dense (mlp_only_layers): the adapter must find layers 0 and 2 only.
        kw = dict(num_hidden_layers=3, num_experts=EXPERTS, moe_intermediate_size=INTER, intermediate_size=128,
                  shared_expert_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1)
        cls = Qwen2MoeConfig
    elif family == "olmoe":
        kw = dict(num_hidden_layers=2, num_experts=EXPERTS, intermediate_size=INTER, norm_topk_prob=False)
        cls = OlmoeConfig
    elif family == "mixtral":
        kw = dict(num_hidden_layers=2, num_local_experts=EXPERTS, intermediate_size=INTER, head_dim=16)
        cls = MixtralConfig
    elif family == "phimoe":
        # Phi-3.5-MoE's own router_jitter_noise (0.01) is sparsemixer's eval-time threshold too.
        kw = dict(num_hidden_layers=2, num_local_experts=EXPERTS, intermediate_size=INTER, router_jitter_noise=0.01)
        cls = PhimoeConfig
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return cls(**{**COMMON, **kw, **over})


def build_family_model(family: str, seed: int = 0, router_std: float = 0.5, **over):
    """A random-weight causal LM of `family` in eval mode. Router weights get a larger spread than the
    initializer's 0.02 so that routing is not degenerate (all probabilities ≈ 1/E)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **over), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            router = getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
            if router is not None:
                router.weight.normal_(0, router_std)
    return model.eval()


def build_family_checkpoint(family: str, out: Path, seed: int = 0, **over) -> Path:
    """Save a tiny random `family` checkpoint plus the embedded tokenizer to `out`."""
    model = build_family_model(family, seed, **over)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return out
