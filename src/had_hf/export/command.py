"""The `had-hf export` subcommand (and the argument set that `optimum-cli export had` shares).

    had-hf export --model PATH_OR_ID OUTPUT_DIR [--samples N] [--context-length n] [--top-n N]
                  [--coefficients FILE] [--overwrite] [--opset OPSET] [--atol ATOL]

Arguments are grouped as required / optional, as in optimum-quanto's `quantize` command. The exporter (torch,
onnx, onnxruntime, matplotlib) is imported only when the command runs, so that `had-hf --help` stays fast and works
without the `export` extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SAMPLES = 2
DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-3


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the export arguments to `parser` (used by `had-hf export` and `optimum-cli export had`)."""
    required = parser.add_argument_group("Required arguments")
    required.add_argument(
        "-m",
        "--model",
        required=True,
        metavar="PATH_OR_ID",
        help="a HAD checkpoint: local folder or Hub id, saved after `had_hf.convert` and `had_hf.calibrate`",
    )
    required.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        type=Path,
        help="folder to create with model.safetensors, model.onnx, golden/ and cam_report.*",
    )
    optional = parser.add_argument_group("Optional arguments")
    optional.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=f"number of sample inputs for the golden vectors and the ONNX check (default: {DEFAULT_SAMPLES})",
    )
    optional.add_argument(
        "--context-length",
        type=int,
        default=None,
        metavar="n",
        help="context length of the CAM report; the samples use min(n, the model's maximum, 512) tokens "
        "(default: the model's maximum positions capped at 512, or its number of image patches + 1)",
    )
    optional.add_argument(
        "--top-n",
        type=int,
        default=None,
        metavar="N",
        help="keys kept per query in the exported model, golden data and report (default: the model's HADConfig)",
    )
    optional.add_argument(
        "--coefficients",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON file of CAM cost coefficients replacing the packaged defaults (same keys as "
        "had_hf/export/coefficients/default.json)",
    )
    optional.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT_DIR if it exists and is not empty (only once the new export has succeeded)",
    )
    optional.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset version (default: {DEFAULT_OPSET})"
    )
    optional.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help=f"largest absolute difference allowed between ONNX Runtime and PyTorch outputs (default: {DEFAULT_ATOL})",
    )


def register_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `had-hf export` to the `had-hf` command line."""
    parser = subparsers.add_parser(
        "export",
        help="export a HAD model: safetensors, ONNX, bit-packed golden vectors and a CAM hardware cost report",
        description=(
            "Export a distilled HAD model for hardware work: the checkpoint (safetensors + config + tokenizer or "
            "processor), model.onnx validated against PyTorch in ONNX Runtime, golden/ with the bit-packed binary "
            "queries and keys, kept indices, attention weights and outputs of sample inputs, and cam_report.json/"
            ".md/.png estimating HAD-CAM against BF16 attention."
        ),
    )
    add_export_arguments(parser)
    parser.set_defaults(func=run_export_command)
    return parser


def run_export_command(args: argparse.Namespace) -> int:
    """Runs the export described by parsed arguments; prints a summary and returns 0, or the error and returns 1."""
    try:
        from ..paths import local_folder_or_hub_id
        from .exporter import export_had

        result = export_had(
            local_folder_or_hub_id(str(args.model), "--model"),
            args.output_dir,
            samples=args.samples,
            context_length=args.context_length,
            top_n=args.top_n,
            coefficients=args.coefficients,
            overwrite=args.overwrite,
            opset=args.opset,
            atol=args.atol,
        )
    except (ValueError, OSError, ImportError) as error:  # bad input, no checkpoint, failed check, missing extra
        print(f"had-hf export: error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
