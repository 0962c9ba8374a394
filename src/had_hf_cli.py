"""The `had-hf` command line: one entry point, one subcommand per feature.

This module sits beside the `had_hf` package, not in it: `import had_hf` registers HAD with transformers, which
imports torch and transformers (seconds), and importing any `had_hf.*` module runs that first. Parsing, `--help`
and usage errors need neither, so the subcommands' arguments are declared here, and each subcommand's work
(`had_hf.hub.run_push_command`, `had_hf.export.command.run_export_command`) is imported only once it runs.
Arguments are grouped as required / optional, as in optimum-quanto's `quantize` command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_SAMPLES = 2
DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="had-hf", description="Hamming Attention Distillation tools for Hugging Face models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_push_command(subparsers)
    _add_export_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    module_name, function_name = args.run
    try:
        run = getattr(importlib.import_module(module_name), function_name)
    except ImportError as error:  # an optional extra is missing
        print(f"had-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    return int(run(args) or 0)


def _add_push_command(subparsers: argparse._SubParsersAction) -> None:
    """`had-hf push OUTPUT_DIR --repo-id ORG/NAME [--private] [--token] [--commit-message] [--revision]`."""
    parser = subparsers.add_parser(
        "push",
        help="push a distillation output folder to the Hugging Face Hub, with its model card",
        description=(
            "Push a HAD distillation output folder (safetensors weights, config with HADConfig, tokenizer or image "
            "processor, results.json) to the Hub in one commit, with a generated model card and training curves. "
            "The folder itself is never modified."
        ),
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output folder of a distillation run")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or login)")
    parser.add_argument("--commit-message", default=None, help="title of the commit")
    parser.add_argument("--revision", default=None, help="branch to commit to, created if missing (default: main)")
    parser.add_argument(
        "--license",
        default=None,
        help="license of the model for the card (default: results.json's, else the teacher's)",
    )
    parser.set_defaults(run=("had_hf.hub", "run_push_command"))


def _add_export_command(subparsers: argparse._SubParsersAction) -> None:
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
    parser.set_defaults(run=("had_hf.export.command", "run_export_command"))


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
        "--generation-lengths",
        type=_integer_list,
        default=None,
        metavar="n,n,...",
        help="decoder-only models: context lengths of the CAM report's cost per generated token, comma-separated "
        "(default: 1024,2048,4096,8192)",
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


def _integer_list(text: str) -> list[int]:
    """Comma-separated integers (the exporter checks their range and says what is allowed)."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1024,2048, got {text!r}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
