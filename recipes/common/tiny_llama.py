"""A tiny random Llama and a character-level tokenizer: the causal-LM recipe's embedded default, which runs the whole
pipeline on a CPU in minutes. Its weights are random (`from_config`), so its figures say nothing about HAD."""

from __future__ import annotations

import torch


def char_tokenizer():
    """A character-level tokenizer of 99 ids that puts <s> before a text: ids 0-3 are <pad>, <s>, </s>, <unk>, then
    newline and the printable ASCII characters but '~' (any other character is <unk>)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in ["\n"] + [chr(code) for code in range(32, 126)]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int = 99, max_position_embeddings: int = 1024, seed: int = 0, **overrides):
    """A randomly initialised `LlamaForCausalLM` (hidden 128, 2 layers, 4 query / 2 key-value heads of width 32, the narrowest the packed key cache takes),
    with sdpa attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kwargs), attn_implementation="sdpa")
