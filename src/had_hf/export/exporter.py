"""`export_had`: the hardware bundle of a distilled HAD model, written atomically.

OUTPUT_DIR receives

- `model.safetensors`, `config.json` (with its HADConfig) and the tokenizer or processor: `from_pretrained`-loadable;
- `model.onnx`: the HAD model in standard ONNX operations, checked in ONNX Runtime against PyTorch;
- `golden/`: bit-packed binary queries and keys, kept indices, weights, values and outputs of sample inputs;
- `cam_report.json`, `cam_report.md`, `cam_report.png`: the CAM cost estimate against BF16 attention (for a
  decoder-only model also per generated token at several context lengths);
- `had_export.json`: what was exported, with which versions, and the validation figures.

Everything is written into a hidden sibling folder that is renamed to OUTPUT_DIR only once every step has succeeded,
so a failed or interrupted export never leaves a folder that looks complete, and never touches existing files.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from had_hf_cli import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_SAMPLES  # the command line's defaults are the API's

from .cam import AttentionGeometry, CAMCoefficients, cam_cost_report, load_coefficients
from .cam_generation import DEFAULT_GENERATION_LENGTHS, check_generation_lengths, generation_costs
from .cam_report import write_cam_report
from .errors import HADExportError
from .export_config import HADExportConfig, make_probe_inputs, make_sample_inputs, sample_length
from .golden import GOLDEN_DIRNAME, collect_golden, write_golden
from .onnx import ONNX_FILENAME, export_forward_kwargs, export_onnx
from .onnx_check import check_onnx
from .source_model import as_float32_cpu, check_every_layer_calibrated, check_had_model, load_source_model, top_n_rule

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "had_export.json"
EXPORT_FORMAT = "had_hf.export"
MIN_OPSET = 11  # CumSum and TopK with a K input


@dataclass
class ExportResult:
    """What `export_had` wrote.

    Args:
        output_dir (`Path`): the export folder.
        files (`list[str]`): every file in it, relative.
        manifest (`dict`): the content of `had_export.json`.
        cam_report (`dict`): the CAM cost report.
    """

    output_dir: Path
    files: list[str]
    manifest: dict[str, Any] = field(repr=False)
    cam_report: dict[str, Any] = field(repr=False)

    @property
    def onnx_max_abs_diff(self) -> float:
        return max(self.manifest["onnx"]["validation"]["max_abs_diff"].values())

    def summary(self) -> str:
        onnx_info, golden = self.manifest["onnx"], self.manifest["golden"]
        validation = onnx_info["validation"]
        diffs = ", ".join(f"{v:.2g} ({k})" for k, v in validation["max_abs_diff"].items())
        diffs += f"; {validation['full_length_samples_max_abs_diff']:.2g} on the full-length samples"
        point = self.cam_report["operating_point"]
        reduction = self.cam_report["model_total"]["reduction_percent"]["total"]
        return "\n".join(
            [
                f"Exported the HAD model to {self.output_dir}",
                "  model.safetensors + config.json" + (" + tokenizer/processor" if self.manifest["processor"] else ""),
                f"  {ONNX_FILENAME}: inputs {', '.join(onnx_info['inputs'])}; opset {onnx_info['opset']}, "
                f"ONNX Runtime vs PyTorch max abs diff {diffs}, "
                f"atol {onnx_info['validation']['atol']:g}",
                f"  {GOLDEN_DIRNAME}/: {golden['samples']} sample(s), {golden['layers']} attention layer(s)",
                f"  cam_report.*: n = {point['context_length']}, N = {point['top_n']}: HAD-CAM uses "
                f"{reduction['area_mm2']:.1f}% less area and {reduction['energy_per_token_nj']:.1f}% less energy "
                "per token than BF16 attention",
                *self._generation_summary(),
            ]
        )

    def _generation_summary(self) -> list[str]:
        rows = self.cam_report.get("per_generated_token")
        if not rows:
            return []
        ratios = ", ".join(
            f"{row['ratio_had_over_bf16']['energy_per_token_nj']:.3f} at n = {row['context_length']}" for row in rows
        )
        return [f"    per generated token (decoder), HAD / BF16 energy: {ratios}"]


def export_had(
    model_or_path: PreTrainedModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    samples: int = DEFAULT_SAMPLES,
    context_length: int | None = None,
    top_n: int | None = None,
    generation_lengths: Sequence[int] | None = None,
    coefficients: str | os.PathLike | CAMCoefficients | None = None,
    overwrite: bool = False,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    processor: Any = None,
    seed: int = 0,
) -> ExportResult:
    """Exports a calibrated HAD model: checkpoint, ONNX, golden vectors and CAM cost report.

    Args:
        model_or_path (`PreTrainedModel`, `str` or `os.PathLike`):
            A HAD model (converted with `had_hf.convert` and calibrated), or the folder / Hub id of a saved one.
            A model passed in is left as it was (a float32 CPU copy is made if it is in another dtype or device).
        output_dir (`str` or `os.PathLike`): the folder to create.
        samples (`int`, *optional*, defaults to 2): number of sample inputs (random, seeded) for the golden data and
            the ONNX check; text samples after the first are partly padded so that masking is covered.
        context_length (`int`, *optional*): n of the CAM report. Text samples use `min(n, 512, the model's maximum
            positions)` tokens. Defaults to the samples' number of keys (the model's maximum positions capped at 512,
            or the image patches + 1 of a vision model).
        top_n (`int`, *optional*): N for the exported model, golden data and report, replacing the model's HADConfig
            rule in the export (the model passed in keeps its own). Defaults to the model's HADConfig.
        generation_lengths (`Sequence[int]`, *optional*): for a decoder-only model (a text-generation task), the
            context lengths n of the report's cost per generated token (one new query per head against n cached
            keys in every layer). Defaults to 1024, 2048, 4096 and 8192 for such models; refused for others.
        coefficients (`str`, `os.PathLike` or `CAMCoefficients`, *optional*): CAM cost coefficients; defaults to
            the packaged ones.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir` (only after the new
            export has succeeded).
        opset (`int`, *optional*, defaults to 17): ONNX opset version.
        atol (`float`, *optional*, defaults to 1e-3): largest absolute difference allowed between ONNX Runtime and
            PyTorch outputs.
        processor (*optional*): tokenizer or processor to save with a model passed in (loaded automatically from a
            path).
        seed (`int`, *optional*, defaults to 0): seed of the sample inputs.

    Raises:
        `HADExportError`: not a HAD model, not calibrated, a training stage, bad arguments, or `output_dir` exists and
            is not empty without `overwrite`.
        `OnnxValidationError`: ONNX Runtime and PyTorch differ by more than `atol`.
        `CoefficientError`: a bad coefficient file.
    """
    _check_export_extra()
    _check_arguments(samples, context_length, top_n, opset, atol)
    if generation_lengths is not None:
        try:
            generation_lengths = check_generation_lengths(generation_lengths)
        except ValueError as error:
            raise HADExportError(str(error)) from error
    if not isinstance(coefficients, CAMCoefficients):
        coefficients = load_coefficients(coefficients)  # fail on a bad file before any heavy work
    output_dir = Path(output_dir).absolute()
    source_dir = Path(model_or_path).resolve() if _is_local_path(model_or_path) else None
    _check_output_dir(output_dir, overwrite, source_dir)

    model, processor, source = load_source_model(model_or_path, processor)
    had_config = check_had_model(model)
    generation_lengths = _generation_lengths(model, generation_lengths)
    model = as_float32_cpu(model)
    was_training = model.training

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # a hidden sibling on the same filesystem, so that publishing is one rename (mkdir, not mkdtemp: keep the umask)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        with top_n_rule(had_config, top_n), torch.no_grad():
            model.eval()
            inputs = make_sample_inputs(model, samples, sample_length(model, context_length), seed)
            check_every_layer_calibrated(model, had_config, {name: tensor[:1] for name, tensor in inputs.items()})
            manifest, report = _write_bundle(
                model, processor, had_config, staging, inputs, context_length, generation_lengths, coefficients, opset,
                atol, seed,
            )  # fmt: skip
            manifest["source"] = source
            (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    files = sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file())
    logger.info("Exported the HAD model to %s", output_dir)
    return ExportResult(output_dir=output_dir, files=files, manifest=manifest, cam_report=report)


def _write_bundle(
    model, processor, had_config, staging, inputs, context_length, generation_lengths, coefficients, opset, atol, seed
):
    """Every file of the bundle, written into `staging`; returns the export manifest and the CAM report."""
    samples = next(iter(inputs.values())).shape[0]
    model.save_pretrained(staging)
    if processor is not None:
        processor.save_pretrained(staging)

    probe = make_probe_inputs(model, inputs, seed + 1)

    logger.info("Recording golden vectors of %d sample(s)", samples)
    per_sample = [{name: tensor[index : index + 1] for name, tensor in inputs.items()} for index in range(samples)]
    layers, outputs = collect_golden(model, per_sample, export_forward_kwargs(model))
    write_golden(
        staging / GOLDEN_DIRNAME,
        layers,
        {name: tensor.numpy() for name, tensor in inputs.items()},
        outputs,
        extra_manifest={"had_config": had_config.to_dict()},
    )

    logger.info("Exporting and validating %s", ONNX_FILENAME)
    info = export_onnx(model, inputs, probe, staging / ONNX_FILENAME, opset=opset)
    validation = check_onnx(info, model, inputs, atol, seed)

    num_keys = int(layers[0].key_bits.shape[2])
    report_length = context_length if context_length is not None else num_keys
    rule = {"top_n": had_config.top_n} if had_config.top_n is not None else {"top_n_ratio": had_config.top_n_ratio}
    rule["sink_keys"] = had_config.sink_keys
    geometry = AttentionGeometry.from_config(model.config)
    report = cam_cost_report(geometry, report_length, coefficients=coefficients, **rule)
    if generation_lengths is not None:
        report["per_generated_token"] = generation_costs(
            geometry, generation_lengths, coefficients=coefficients, **rule
        )
    write_cam_report(report, staging)

    manifest = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "versions": {name: _version(name) for name in ("had-hf", "torch", "transformers", "onnx", "onnxruntime")},
        "model_class": type(model).__name__,
        "task": HADExportConfig.from_model(model).task,
        "had_config": had_config.to_dict(),
        "processor": type(processor).__name__ if processor is not None else None,
        "onnx": {**info.to_dict(), "validation": {**info.to_dict()["validation"], **validation}},
        "golden": {"dir": GOLDEN_DIRNAME, "samples": samples, "layers": len(layers), "seed": seed},
        "cam_report": {
            "context_length": report["operating_point"]["context_length"],
            "top_n": report["operating_point"]["top_n"],
            "coefficients_file": report["coefficients_file"],
            "reduction_percent_model_total": report["model_total"]["reduction_percent"]["total"],
            "generation_lengths": generation_lengths,
        },
    }
    return manifest, report


# ------------------------------------------------------------------------------------------------ checks


def _check_export_extra() -> None:
    """Fails before any work when a package of the `export` extra is missing (they are imported where used)."""
    missing = [
        name for name in ("onnx", "onnxruntime", "matplotlib", "optimum") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ImportError(f"had_hf export needs {', '.join(missing)}: pip install 'had-hf[export]'")


def _check_arguments(samples, context_length, top_n, opset, atol) -> None:
    for name, value, allow_none in (
        ("samples", samples, False),
        ("context_length", context_length, True),
        ("top_n", top_n, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HADExportError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise HADExportError(f"opset must be an integer >= {MIN_OPSET} (CumSum, TopK with a K input), got {opset!r}.")
    if not isinstance(atol, (int, float)) or not atol > 0:
        raise HADExportError(f"atol must be a number > 0, got {atol!r}.")


def _generation_lengths(model: PreTrainedModel, generation_lengths: list[int] | None) -> list[int] | None:
    """The context lengths of the per-generated-token costs: the given or default ones for a decoder-only model."""
    task = HADExportConfig.from_model(model).task
    if task.startswith("text-generation"):
        lengths = generation_lengths if generation_lengths is not None else list(DEFAULT_GENERATION_LENGTHS)
        maximum = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if maximum and lengths[-1] > maximum:
            logger.warning(
                "Per-generated-token costs up to n = %d, beyond the model's %d positions: those rows extrapolate its "
                "attention geometry.",
                lengths[-1],
                maximum,
            )
        return lengths
    if generation_lengths is not None:
        raise HADExportError(
            f"generation_lengths (--generation-lengths) applies to decoder-only models (a text-generation task); "
            f"{type(model).__name__} has the task {task!r}."
        )
    return None


def _is_local_path(model_or_path: Any) -> bool:
    return isinstance(model_or_path, (str, os.PathLike)) and Path(model_or_path).exists()


def _check_output_dir(output_dir: Path, overwrite: bool, source_dir: Path | None) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise HADExportError(f"Output path {output_dir} exists and is not a directory.")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise HADExportError(
            f"Output directory {output_dir} exists and is not empty. Choose another one, or pass --overwrite "
            "(overwrite=True) to replace it once the new export has succeeded."
        )
    resolved, cwd = output_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise HADExportError(f"Refusing to replace {output_dir}: it is the current directory or one of its parents.")
    if source_dir is not None and (resolved == source_dir or resolved in source_dir.parents):
        raise HADExportError(f"Refusing to replace {output_dir}: it holds the model being exported ({source_dir}).")


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Moves the finished `staging` folder to `output_dir`; an existing folder is set aside until the move worked."""
    if output_dir.is_dir():
        if any(output_dir.iterdir()):
            if not overwrite:  # files appeared while exporting
                raise HADExportError(f"Output directory {output_dir} is no longer empty; nothing was written to it.")
            backup = output_dir.with_name(f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
            output_dir.rename(backup)
            try:
                staging.rename(output_dir)
            except BaseException:
                backup.rename(output_dir)
                raise
            shutil.rmtree(backup, ignore_errors=True)
            return
        output_dir.rmdir()
    staging.rename(output_dir)


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
