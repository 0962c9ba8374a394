"""Export of HAD models for hardware work: ONNX, bit-packed golden vectors and a CAM hardware cost report.

    from had_hf.export import export_had, load_golden

    export_had("path/to/had-model", "had-export")   # or: had-hf export --model path/to/had-model had-export
    golden = load_golden("had-export")

The modules, one idea each: `uint64_words` (the uint64 sign-bit layout), `cam` (the CAM cost model), `cam_coefficients`
(its coefficient files), `cam_generation` (a decoder's cost per generated token at several context lengths),
`cam_report` (the report files), `golden` (golden vectors), `onnx` (the traceable attention and ONNX Runtime
validation), `onnx_check` (the export's enforced ONNX check), `export_config` (the optimum exporter configuration and
sample inputs), `source_model` (the model an export starts from, loaded and checked), `errors` (the export's error),
`exporter` (the bundle) and `command` (the `had-hf export` subcommand). onnx, onnxruntime and
matplotlib (the `export` extra) are imported only where they are used.
"""

from .cam import (
    AttentionGeometry,
    CAMCoefficients,
    CoefficientError,
    cam_cost_report,
    load_coefficients,
)
from .cam_generation import DEFAULT_GENERATION_LENGTHS, generation_costs
from .cam_report import write_cam_report
from .exporter import ExportResult, HADExportError, export_had
from .golden import GoldenData, GoldenLayer, load_golden
from .onnx import OnnxValidationError
from .uint64_words import binary_scores, hamming_distance, pack_signs, unpack_signs

__all__ = [
    "DEFAULT_GENERATION_LENGTHS",
    "AttentionGeometry",
    "CAMCoefficients",
    "CoefficientError",
    "ExportResult",
    "GoldenData",
    "GoldenLayer",
    "HADExportError",
    "OnnxValidationError",
    "binary_scores",
    "cam_cost_report",
    "export_had",
    "generation_costs",
    "hamming_distance",
    "load_coefficients",
    "load_golden",
    "pack_signs",
    "unpack_signs",
    "write_cam_report",
]
