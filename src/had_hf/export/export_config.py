"""The HAD export as an optimum exporter configuration: task, input names and axes, and seeded sample inputs.

`HADExportConfig` is an `optimum.exporters.base.ExporterConfig`: the model's task comes from optimum's
`TasksManager`, its config is read through optimum's normalized configs (`NormalizedConfigManager`), and the sample
inputs come from optimum's dummy input generators. Two generators refine optimum's text inputs for what the golden
vectors must cover: rows after the first are right-padded to different lengths (optimum pads every row alike) with
the model's pad token, and models with several token types get sentence-pair segment ids.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PreTrainedModel

from had_hf_cli import DEFAULT_ATOL

try:
    from optimum.exporters.base import ExporterConfig
    from optimum.exporters.tasks import TasksManager
    from optimum.utils import (
        DummyDecoderTextInputGenerator,
        DummyTextInputGenerator,
        DummyVisionInputGenerator,
        NormalizedConfigManager,
        NormalizedSeq2SeqConfig,
        NormalizedTextConfig,
        NormalizedVisionConfig,
    )
except ImportError as error:  # optimum is in the `export` extra
    raise ImportError(f"had_hf.export needs optimum ({error}): pip install 'had-hf[export]'") from error

from .errors import HADExportError

MAX_SAMPLE_LENGTH = 512
MIN_SAMPLE_LENGTH = 4


def staggered_attention_mask(batch_size: int, length: int) -> torch.Tensor:
    """Row 0 without padding, row i right-padded by `i * length // (2 * batch_size)` tokens."""
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for index in range(1, batch_size):
        padding = (index * length) // (2 * batch_size)
        if padding:
            mask[index, length - padding :] = 0
    return mask


def pair_segment_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Segment ids of sentence pairs: 0 on a first part of every row's real tokens, 1 on the rest, 0 on padding."""
    lengths = attention_mask.sum(dim=-1)
    # the second segment starts after at least one token of the first (a row of one token is a single sentence)
    starts = 1 + (torch.rand(lengths.shape) * (lengths - 1).clamp(min=1)).long()
    positions = torch.arange(attention_mask.shape[1])
    return ((positions >= starts[:, None]) & (attention_mask == 1)).long()


class HADTextInputGenerator(DummyTextInputGenerator):
    """optimum's encoder text inputs with staggered right padding, pad-token ids on padding and sentence pairs."""

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        mask = staggered_attention_mask(self.batch_size, self.sequence_length)
        if input_name == "attention_mask":
            return mask
        if input_name == "token_type_ids":
            return pair_segment_ids(mask)
        generated = super().generate(input_name, framework, int_dtype, float_dtype)
        pad_token_id = getattr(self.normalized_config, "pad_token_id", None)
        if input_name == "input_ids" and pad_token_id is not None:
            generated = generated.masked_fill(mask == 0, pad_token_id)
        return generated


class HADDecoderInputGenerator(DummyDecoderTextInputGenerator):
    """Decoder ids of an encoder-decoder model: half the encoder length (at least 2), no padding."""

    def __init__(self, task: str, normalized_config, sequence_length: int = 16, **kwargs):
        super().__init__(task, normalized_config, sequence_length=max(2, sequence_length // 2), **kwargs)


class HADExportConfig(ExporterConfig):
    """How a HAD model is exported: its inputs and their dynamic axes, its sample inputs and the validation tolerance.

    Args:
        config (`PretrainedConfig`): the model's config.
        task (`str`): the optimum task (`TasksManager.infer_task_from_model`).
        main_input_name (`str`): `input_ids` (text) or `pixel_values` (images).
        token_type_ids (`bool`): whether the model reads segment ids (`takes_token_type_ids`).
    """

    ATOL_FOR_VALIDATION = DEFAULT_ATOL

    def __init__(self, config, task: str, main_input_name: str, token_type_ids: bool = False):
        # optimum builds every generator of the tuple: only those whose config attributes the model has
        if main_input_name == "pixel_values":
            self.DUMMY_INPUT_GENERATOR_CLASSES = (DummyVisionInputGenerator,)
        elif config.is_encoder_decoder:
            self.DUMMY_INPUT_GENERATOR_CLASSES = (HADTextInputGenerator, HADDecoderInputGenerator)
        else:
            self.DUMMY_INPUT_GENERATOR_CLASSES = (HADTextInputGenerator,)
        self.NORMALIZED_CONFIG_CLASS = _normalized_config_class(config, main_input_name)
        super().__init__(config, task)
        self.main_input_name = main_input_name
        self.token_type_ids = token_type_ids

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> HADExportConfig:
        if model.main_input_name not in ("input_ids", "pixel_values"):
            raise HADExportError(
                f"Cannot build sample inputs for {type(model).__name__}: its main input is {model.main_input_name!r} "
                "(supported: input_ids, pixel_values)."
            )
        task = TasksManager.infer_task_from_model(model)
        return cls(model.config, task, model.main_input_name, takes_token_type_ids(model))

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        if self.main_input_name == "pixel_values":
            return {"pixel_values": {0: "batch_size"}}
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
        axes["attention_mask"] = dict(axes["input_ids"])
        if self.token_type_ids:
            axes["token_type_ids"] = dict(axes["input_ids"])
        if self._config.is_encoder_decoder:
            axes["decoder_input_ids"] = {0: "batch_size", 1: "decoder_sequence_length"}
        return axes

    def sample_inputs(self, batch_size: int, sequence_length: int | None, seed: int) -> dict[str, torch.Tensor]:
        """`generate_dummy_inputs` seeded with `seed`, leaving the caller's random state as it was."""
        if self.main_input_name == "pixel_values" and not self._normalized_config.has_attribute("image_size"):
            raise HADExportError(f"{type(self._config).__name__} has no image_size to build sample images from.")
        shapes: dict[str, Any] = {"batch_size": batch_size}
        if sequence_length is not None:
            shapes["sequence_length"] = sequence_length
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.generate_dummy_inputs(framework="pt", **shapes)


def _normalized_config_class(config, main_input_name: str):
    """optimum's normalized config of the model type, or the generic text / vision / seq2seq one."""
    try:
        return NormalizedConfigManager.get_normalized_config_class(config.model_type)
    except KeyError:
        if main_input_name == "pixel_values":
            return NormalizedVisionConfig
        return NormalizedSeq2SeqConfig if config.is_encoder_decoder else NormalizedTextConfig


def takes_token_type_ids(model: PreTrainedModel) -> bool:
    """Whether the model reads segment ids: its forward takes `token_type_ids` and its type vocabulary has more
    than one entry (BERT-style sentence pairs). A tokenizer gives them for such models, so the ONNX graph takes them
    too; models with one type (RoBERTa) get only zeros from any caller and leave the input out."""
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    return (getattr(model.config.get_text_config(), "type_vocab_size", None) or 0) > 1


def sample_length(model: PreTrainedModel, context_length: int | None) -> int | None:
    """Tokens per text sample: min(n, 512, maximum positions), at least 4; None for image inputs."""
    if model.main_input_name != "input_ids":
        return None
    text_config = model.config.get_text_config()
    maximum = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    length = min(context_length or MAX_SAMPLE_LENGTH, MAX_SAMPLE_LENGTH, maximum or MAX_SAMPLE_LENGTH)
    return max(length, min(MIN_SAMPLE_LENGTH, maximum or MIN_SAMPLE_LENGTH))


def make_sample_inputs(model: PreTrainedModel, samples: int, length: int | None, seed: int) -> dict[str, torch.Tensor]:
    """Seeded sample inputs of `samples` examples from the model's `HADExportConfig`: token ids (rows after the
    first right-padded to varying lengths), segment ids of sentence pairs for models that read them, decoder ids for
    encoder-decoder models; or images."""
    return HADExportConfig.from_model(model).sample_inputs(samples, length, seed)


def make_probe_inputs(model: PreTrainedModel, inputs: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Inputs of another batch size and other lengths: they reveal the dynamic axes and validate them in ONNX."""
    batch = next(iter(inputs.values())).shape[0] + 1
    if "pixel_values" in inputs:
        return make_sample_inputs(model, batch, None, seed)
    length = inputs["input_ids"].shape[1]
    probe = make_sample_inputs(model, batch, length // 2 if length >= 2 else length + 1, seed)
    if "decoder_input_ids" in inputs:
        probe["decoder_input_ids"] = probe["decoder_input_ids"][:, : inputs["decoder_input_ids"].shape[1] - 1]
    return probe
