"""ONNX export of a HAD model through `torch.onnx.export`, and its validation in ONNX Runtime.

The model is traced in the `hamming_topk_onnx` attention mode (`had_hf.modes.ONNX`): the binary attention in plain
operations (the custom op would be an unknown node), with the one selection function of `had_hf.selection`, which
traces to a graph independent of the number of keys, and an A.V that gathers the N kept rows of V as the hardware
does. The exporter checks the result against PyTorch on sample inputs.

The legacy exporter is used because the dynamo exporter needs `onnxscript`, which the `export` extra does not pull in,
and because the traced graph is plain opset-17 ONNX that any runtime reads.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modes import ONNX

logger = logging.getLogger(__name__)

ONNX_ATTENTION_NAME = ONNX.name
ONNX_FILENAME = "model.onnx"


class OnnxValidationError(ValueError):
    """ONNX Runtime and PyTorch disagree on the exported model by more than the tolerance."""


class OnnxShapeError(OnnxValidationError):
    """An ONNX output has another shape than PyTorch's: a conversion error that no input draw can excuse."""


@dataclass
class OnnxExportInfo:
    """What was exported: names, dynamic axes and the validation figures (filled by `validate_onnx`)."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    atol: float | None = None

    def to_dict(self) -> dict:
        return {
            "file": self.path.name,
            "opset": self.opset,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "dynamic_axes": {name: {str(k): v for k, v in axes.items()} for name, axes in self.dynamic_axes.items()},
            "validation": {"atol": self.atol, "max_abs_diff": self.max_abs_diff},
        }


class _ExportWrapper(torch.nn.Module):
    """Positional inputs in, a tuple of named output tensors out: the calling convention of `torch.onnx.export`."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.forward_kwargs = export_forward_kwargs(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, inputs)), **self.forward_kwargs)
        return tuple(outputs[name] for name in self.output_names)


def export_forward_kwargs(model: torch.nn.Module) -> dict:
    """Keyword arguments of every exported forward: named outputs, and no KV cache."""
    # no KV cache in the graph: it would add past_key_values outputs that depend on the cache class
    parameters = inspect.signature(model.forward).parameters
    kwargs = {"return_dict": True}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    return kwargs


def model_outputs(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensor outputs of `model(**inputs)` by name (tuples such as hidden states and caches left out)."""
    with torch.no_grad():
        outputs = model(**inputs, **export_forward_kwargs(model))
    return {name: value for name, value in outputs.items() if isinstance(value, torch.Tensor)}


def dynamic_axes_from_probe(
    inputs: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
    probe_inputs: Mapping[str, torch.Tensor],
    probe_outputs: Mapping[str, torch.Tensor],
) -> dict[str, dict[int, str]]:
    """Names the axes that change between two input shapes: batch, and the sequence axes of inputs and outputs.

    The probe has a different batch size and (for text) different lengths, so every output axis that depends on
    either shows up as a changed size instead of being guessed from the model type. A changed output axis is named
    after the input length it equals (`sequence_length`, or `decoder_sequence_length` for decoder inputs).
    """
    batch, probe_batch = next(iter(inputs.values())).shape[0], next(iter(probe_inputs.values())).shape[0]
    length_names: dict[tuple[int, int], str] = {}
    for name, tensor in inputs.items():
        if tensor.dim() == 2 and tensor.shape[1] != probe_inputs[name].shape[1]:
            prefix = "decoder_" if name.startswith("decoder_") else ""
            length_names.setdefault((tensor.shape[1], probe_inputs[name].shape[1]), f"{prefix}sequence_length")
    axes: dict[str, dict[int, str]] = {}
    for group, probe_group in ((inputs, probe_inputs), (outputs, probe_outputs)):
        for name, tensor in group.items():
            changed = {}
            for axis, sizes in enumerate(zip(tensor.shape, probe_group[name].shape)):
                if sizes[0] == sizes[1]:
                    continue
                if axis == 0 and sizes == (batch, probe_batch):
                    changed[axis] = "batch_size"
                else:
                    changed[axis] = length_names.get(sizes, f"{name}_dim_{axis}")
            axes[name] = changed
    return axes


def export_onnx(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    probe_inputs: Mapping[str, torch.Tensor],
    path: str | Path,
    opset: int = 17,
) -> OnnxExportInfo:
    """Traces `model` with HAD attention to ONNX at `path`, with dynamic batch and sequence axes.

    Args:
        model (`PreTrainedModel`): a HAD model (attention `hamming_topk`), in eval mode, float32, on CPU.
        inputs (`dict[str, torch.Tensor]`): sample inputs the graph is traced with (their names become the
            graph's input names).
        probe_inputs (`dict[str, torch.Tensor]`): the same inputs with another batch size and length; the axes
            that differ are made dynamic.
        path (`str` or `Path`): the `.onnx` file to write.
        opset (`int`, *optional*, defaults to 17): ONNX opset version.
    """
    path = Path(path)
    outputs = model_outputs(model, inputs)
    probe_outputs = model_outputs(model, probe_inputs)
    dynamic_axes = dynamic_axes_from_probe(inputs, outputs, probe_inputs, probe_outputs)
    input_names, output_names = list(inputs), list(outputs)
    previous, was_training = model.config._attn_implementation, model.training
    # the exporter restores the *wrapper's* mode afterwards, recursively: a fresh nn.Module is in training mode,
    # which would leave the model with dropout on for the validation that follows
    wrapper = _ExportWrapper(model, input_names, output_names).train(was_training)
    model.set_attn_implementation(ONNX_ATTENTION_NAME)
    try:
        with warnings.catch_warnings():
            # the legacy exporter's deprecation notice and the tracer's notes on Python-side shape arithmetic
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            torch.onnx.export(
                wrapper,
                tuple(inputs.values()),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={name: axes for name, axes in dynamic_axes.items() if axes},
                do_constant_folding=True,
            )
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)
    return OnnxExportInfo(path, opset, input_names, output_names, dynamic_axes)


class OnnxComparison:
    """An ONNX Runtime session of an exported model, compared output by output with the PyTorch model."""

    def __init__(self, info: OnnxExportInfo, model: torch.nn.Module):
        import onnx
        import onnxruntime

        onnx.checker.check_model(str(info.path))
        self.info, self.model = info, model
        self.session = onnxruntime.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])

    def max_abs_diff(self, inputs: Mapping[str, torch.Tensor], set_name: str = "sample") -> tuple[float, str]:
        """The largest absolute difference over all outputs on `inputs`, and the output where it occurs."""
        expected = model_outputs(self.model, inputs)
        feed = {name: tensor.cpu().numpy() for name, tensor in inputs.items()}
        received = dict(zip(self.info.output_names, self.session.run(self.info.output_names, feed)))
        worst, worst_output = 0.0, self.info.output_names[0]
        for name in self.info.output_names:
            reference = expected[name].float().cpu().numpy()
            if received[name].shape != reference.shape:
                raise OnnxShapeError(
                    f"ONNX output {name!r} has shape {received[name].shape} on the {set_name} inputs, PyTorch "
                    f"{reference.shape}: the graph's dynamic axes are wrong."
                )
            difference = float(abs(received[name].astype("float64") - reference).max()) if reference.size else 0.0
            if difference >= worst:
                worst, worst_output = difference, name
        return worst, worst_output


def validate_onnx(
    info: OnnxExportInfo,
    model: torch.nn.Module,
    input_sets: Mapping[str, Mapping[str, torch.Tensor]],
    atol: float,
    comparison: OnnxComparison | None = None,
) -> OnnxExportInfo:
    """Runs the ONNX file in ONNX Runtime on every input set and compares each output with PyTorch.

    Records the largest absolute difference per input set in `info.max_abs_diff`, and raises
    `OnnxValidationError` (with the figure, the output and the input set) when one exceeds `atol`.
    """
    comparison = comparison if comparison is not None else OnnxComparison(info, model)
    info.atol = atol
    for set_name, inputs in input_sets.items():
        worst, worst_output = comparison.max_abs_diff(inputs, set_name)
        info.max_abs_diff[set_name] = worst
        if worst > atol:
            raise OnnxValidationError(
                f"ONNX Runtime and PyTorch differ by up to {worst:.3g} on output {worst_output!r} for the {set_name} "
                f"inputs, above the tolerance atol={atol:g}."
            )
        logger.info("ONNX validation on %s inputs: max abs diff %.3g (atol %g)", set_name, worst, atol)
    return info
