"""`RecipeArgumentParser`: the command line of the training recipes.

An `HfArgumentParser` (every field of the recipe's dataclasses is a flag) that starts from an embedded default
config, so that the command that worked keeps working with one flag added:

- no arguments: the embedded default;
- a YAML file first: its values, with any flags after it applied on top;
- flags alone: the embedded default with the flags applied, unless a flag names the data or the model
  (`selection_flags`, e.g. `--task_name`): a run on other data starts from the library defaults.

A value that the dataclasses' validation refuses is a usage error (exit code 2, the message, no traceback), found
before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser


class RecipeArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with an embedded default config and YAML config files.

    Args:
        dataclass_types: the dataclasses whose fields are the flags (as for `HfArgumentParser`).
        default_config (`Path`): the YAML file run when no config file is given (see the module docstring).
        selection_flags (`Iterable[str]`): field names that choose the data or the model; flags alone that include
            one of them start from the library defaults instead of `default_config`.
        **kwargs: passed to `argparse.ArgumentParser` (`description`, `epilog`, ...).
    """

    def __init__(
        self, dataclass_types, *, default_config: str | os.PathLike, selection_flags: Iterable[str] = (), **kwargs
    ):
        super().__init__(dataclass_types, **kwargs)
        self.default_config = Path(default_config)
        self.selection_flags = frozenset(selection_flags)

    def parse(self, argv: list[str]) -> tuple[Any, ...]:
        """The dataclass instances for `argv` (the command line without the program name)."""
        config, argv = self._base_config(list(argv))
        if config is not None:
            argv = self._apply_config(config, argv)
        try:
            return self.parse_args_into_dataclasses(argv, look_for_args_file=False)
        except ValueError as error:  # a dataclass's validation: a usage error, reported before any work starts
            self.error(str(error))

    def given_flags(self, argv: list[str]) -> set[str]:
        """The fields that `argv` sets, however spelled (`--max_steps 60`, `--max-steps=60`, an abbreviation)."""
        unset = object()
        namespace = argparse.Namespace(
            **{action.dest: unset for action in self._actions if action.dest != argparse.SUPPRESS}
        )
        parsed, _ = self.parse_known_args(argv, namespace)
        return {name for name, value in vars(parsed).items() if value is not unset}

    def _base_config(self, argv: list[str]) -> tuple[Path | None, list[str]]:
        """The YAML file the run starts from (None: the library defaults) and the flags that remain."""
        if argv and argv[0].endswith((".yaml", ".yml")):
            return Path(argv[0]), argv[1:]
        default = _shown(self.default_config)
        if not argv:
            print(f"No arguments: running the embedded default {default}.")
            return self.default_config, argv
        chosen = sorted(self.given_flags(argv) & self.selection_flags)
        if chosen:
            flags = ", ".join(f"--{name}" for name in chosen)
            print(
                f"{flags} given: starting from the library defaults, not from the embedded default {default} "
                f"(to start from it, name it first: {default} {' '.join(argv)})."
            )
            return None, argv
        print(f"Running the embedded default {default} with {' '.join(argv)}.")
        return self.default_config, argv

    def _apply_config(self, config_path: Path, argv: list[str]) -> list[str]:
        """Makes the values of the YAML file `config_path` the defaults; returns the flags to parse on top."""
        import yaml

        if not config_path.is_file():
            self.error(f"config file {config_path} not found.")
        values = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(values, dict):
            self.error(
                f"{config_path} must hold a mapping of flag names to values (e.g. `task_name: stsb`), "
                f"not a {type(values).__name__}."
            )
        known = {action.dest for action in self._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            self.error(f"Unknown keys in {config_path}: {unknown}. Allowed: the flags of --help.")
        self.set_defaults(**values)
        if "output_dir" in values and "output_dir" not in self.given_flags(argv):
            argv = ["--output_dir", str(values["output_dir"]), *argv]
        return argv


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it (as a user would type it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
