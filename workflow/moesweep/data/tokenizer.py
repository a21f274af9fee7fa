"""A small byte-level BPE tokenizer for the embedded model, trained on synthetic problem text.

Pre-tokenization splits every digit on its own (so arithmetic is learnable digit by digit) and then applies
GPT-2's byte-level regex, which keeps `Answer:` and a following ` Tom` in separate pre-tokens. BPE never merges
across pre-tokens, so the tokens of prompt + completion are the prompt's tokens followed by the completion's:
the evaluation prompt ends at `Answer:` and generation continues from there.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A transformers fast tokenizer with `<|endoftext|>` as eos and pad, padding on the left."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   padding_side="left", clean_up_tokenization_spaces=False)
