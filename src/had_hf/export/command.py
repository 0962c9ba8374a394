"""What `had-hf export` (and `optimum-cli export had`) runs once its arguments are parsed.

    had-hf export --model PATH_OR_ID OUTPUT_DIR [--samples N] [--context-length n] [--top-n N]
                  [--generation-lengths n,n,...] [--coefficients FILE] [--overwrite] [--opset OPSET] [--atol ATOL]

The arguments are declared in `had_hf_cli.add_export_arguments`, outside this package, so that parsing them imports
neither torch nor transformers. The exporter (onnx, onnxruntime, matplotlib) is imported only when the command
runs, so that the command reports a missing `export` extra as an error.
"""

from __future__ import annotations

import argparse
import sys


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
            generation_lengths=args.generation_lengths,
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
