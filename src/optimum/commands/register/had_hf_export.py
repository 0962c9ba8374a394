"""`optimum-cli export had`: the had_hf exporter in optimum's command line.

optimum-cli imports every module of the `optimum.commands.register` namespace package and registers the commands in
its `REGISTER_COMMANDS` (optimum >= 2.x; see `optimum/commands/register/README.md` in optimum). This file is that
module for had_hf; the exporter itself is configured through optimum (`had_hf.export.export_config`, the `export`
extra). The arguments and behaviour are those of `had-hf export`.

No `__init__.py` may sit beside this file or in `optimum/` and `optimum/commands/`: they are namespace packages
shared with optimum and its subpackages (PEP 420).
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand


class HADExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="had",
        help="Export a HAD model: safetensors, ONNX, bit-packed golden vectors and a CAM hardware cost report.",
    )

    @staticmethod
    def parse_args(parser):
        from had_hf_cli import add_export_arguments

        parser.description = "Export a distilled HAD (Hamming Attention Distillation) model; same as `had-hf export`."
        add_export_arguments(parser)

    def run(self):
        from had_hf.export.command import run_export_command

        exit_code = run_export_command(self.args)
        if exit_code:  # optimum-cli ignores run()'s return value
            sys.exit(exit_code)


REGISTER_COMMANDS = [(HADExportCommand, ExportCommand)]
