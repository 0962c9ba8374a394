"""Shared fixtures: tiny models of every supported family, built with `from_config` (never from a Hub name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import had_hf  # noqa: E402,F401  (registers hamming_topk)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLUE_DIR = SHARED_DATA / "glue"
requires_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR} (the ../shared folder beside the checkout)"
)

VOCAB = 99


def plain_normalized(text: str) -> str:
    """An independent reference for `recipes.common.glue.normalized_text` (a loop, no regex): lowercase ASCII letters and
    digits alone."""
    return "".join(ch for ch in text.lower() if ch.isascii() and ch.isalnum())


def markdown_table(markdown: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the body rows (lists of cells) of the first markdown table whose header row starts with
    `header_start` (e.g. "| Metric")."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def load_script(path: Path, name: str):
    """A script of the repository (a recipe, a benchmark) imported as a module, so that tests can call its functions."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of `family`, in eval mode, with eager attention."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "bert":
        model = tf.BertForSequenceClassification(tiny_bert_config())
    elif family == "roberta":
        config = tf.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=80,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = tf.RobertaForSequenceClassification(config)
    elif family == "vit":
        config = tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = tf.ViTForImageClassification(config)
    elif family == "t5":
        config = tf.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = tf.T5ForConditionalGeneration(config)
    elif family == "llama":
        config = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = tf.LlamaForCausalLM(config)
    else:
        raise ValueError(family)
    had_hf.integration.set_attention(model, "eager")  # into T5's stacks too (transformers 5.17)
    return model.eval()


def model_inputs(family: str, batch: int = 3, length: int = 9, seed: int = 1, padding: bool = True) -> dict:
    """Inputs for `family` with some right padding (left padding for the causal LM)."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padding:
        for row in range(1, batch):
            pad = min(2 * row, length - 2)
            if family == "llama":
                attention_mask[row, :pad] = 0
            else:
                attention_mask[row, length - pad :] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=generator)
    return inputs


FAMILIES = ("bert", "roberta", "vit", "t5", "llama")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
