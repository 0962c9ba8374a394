"""Which modules HAD replaces: the per-model-type table, `HADConfig.target_modules`, and loud refusals."""

import pytest
import torch
import transformers as tf

import had_hf
from had_hf import HADConfig
from had_hf.attention import CALL_PROBE
from had_hf.integration import attention_module_names
from tests.conftest import VOCAB, build_model

_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
_TEXT = {"input_ids": torch.arange(3, 9)[None]}
FAMILIES = {
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_SMALL, num_key_value_heads=2)), _TEXT, 2),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_SMALL, num_key_value_heads=2)), _TEXT, 2),
    "opt": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=32,
            )
        ),  # fmt: skip
        _TEXT,
        2,
    ),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)), _TEXT, 2),
    "bart": (
        lambda: tf.BartForConditionalGeneration(
            tf.BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=37,
                decoder_ffn_dim=37,
            )
        ),  # fmt: skip
        {**_TEXT, "decoder_input_ids": torch.arange(3, 7)[None]},
        6,  # 2 encoder self, 2 decoder self, 2 cross
    ),
    "deit": (
        lambda: tf.DeiTForImageClassification(
            tf.DeiTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
            )
        ),  # fmt: skip
        {"pixel_values": torch.randn(1, 3, 16, 16)},
        2,
    ),
    "distilbert": (
        lambda: tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
        ),  # fmt: skip
        _TEXT,
        2,
    ),
}


def _calls(model, inputs) -> int:
    CALL_PROBE.active, before = True, CALL_PROBE.calls
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        CALL_PROBE.active = False
    return CALL_PROBE.calls - before


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_table_names_exactly_the_modules_that_call_the_attention(name):
    build, inputs, expected = FAMILIES[name]
    model = had_hf.convert(build().eval(), HADConfig(top_n=3))
    assert len(attention_module_names(model)) == expected
    assert _calls(model, inputs) == expected  # each target called once, and no other module called HAD attention


def test_cross_attention_is_told_apart_and_can_stay_dense():
    model = had_hf.convert(build_model("t5"), HADConfig(top_n=3, binarize_cross_attention=False))
    cross = {m._had_name for m in model.modules() if getattr(m, "_had_is_cross", False)}
    assert cross == {"decoder.block.0.layer.1.EncDecAttention", "decoder.block.1.layer.1.EncDecAttention"}


def test_target_modules_override_the_table():
    model = had_hf.convert(build_model("llama"), HADConfig(top_n=3, target_modules=[r"layers\.0\.self_attn"]))
    assert attention_module_names(model) == ["model.layers.0.self_attn"]
    assert model.model.layers[1].self_attn._had_dense  # the other layer calls the interface and stays dense
    inputs = {"input_ids": torch.arange(3, 12)[None]}
    with torch.no_grad():
        had = model(**inputs).logits
        had_hf.integration.set_attention(model, "had_eager")
        dense = model(**inputs).logits
        had_hf.integration.set_attention(model, "hamming_topk")
        had_hf.convert(model, HADConfig(top_n=3))  # both layers
        assert not torch.allclose(model(**inputs).logits, had)
    assert not torch.allclose(had, dense)


def test_unknown_model_type_is_refused_with_the_fix():
    class Unknown(tf.PreTrainedModel):
        config_class = tf.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.mixer = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"no table of attention modules for model type .*target_modules"):
        had_hf.convert(Unknown(tf.PretrainedConfig()), HADConfig(top_n=3))
    with pytest.raises(ValueError, match="No module of Unknown matches"):
        had_hf.convert(Unknown(tf.PretrainedConfig()), HADConfig(top_n=3, target_modules=["attention"]))
