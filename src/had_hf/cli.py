"""The `had-hf` command line: one entry point, one subcommand per feature.

Each feature module owns its subcommand and exposes `register_subcommand(subparsers)`, which adds a parser whose
`func` attribute runs the command and returns an exit code. Feature modules are imported lazily so that
`had-hf --help` works without the optional extras installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) of every subcommand provider; a module missing its extra is reported, not fatal.
_SUBCOMMAND_MODULES = (
    "had_hf.hub",
    "had_hf.export.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="had-hf", description="Hamming Attention Distillation tools for Hugging Face models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # an optional extra is missing: keep the other commands usable
            parser.epilog = (parser.epilog or "") + f"\n(commands of {module_name} unavailable: {error})"
            continue
        register = getattr(module, "register_subcommand", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
