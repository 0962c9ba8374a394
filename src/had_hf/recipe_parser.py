"""`RecipeArgumentParser`: the command line of the training recipes.

An `HfArgumentParser` (every field of the recipe's dataclasses is a flag) that starts from an embedded default
config, so that the command that worked keeps working with one flag added:

- no arguments: the embedded default;
- a YAML file first: its values, with any flags after it applied on top;
- flags alone: the embedded default with the flags applied, unless a flag names the data or the model
  (`selection_flags`, e.g. `--task_name`): a run on other data starts from the library defaults.

A value that the dataclasses' validation refuses is a usage error (exit code 2, the message, no traceback), found
before any model is loaded.

`--help` shows the description (the launch commands) and the flags of `help_groups` alone (the recipe's own and the
common training ones); `--help_all` shows every flag (`TrainingArguments` has more than a hundred).
"""

from __future__ import annotations

import argparse
import copy
import os
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser


def comma_separated(value: str | list[str] | None) -> list[str]:
    """The names of a comma-separated option ("mrpc, rte" -> ["mrpc", "rte"]; a list passes through), blanks dropped."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    return [name.strip() for name in names if name.strip()]


class RecipeArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with an embedded default config and YAML config files.

    Args:
        dataclass_types: the dataclasses whose fields are the flags (as for `HfArgumentParser`).
        default_config (`Path`): the YAML file run when no config file is given (see the module docstring).
        selection_flags (`Iterable[str]`): field names that choose the data or the model; flags alone that include
            one of them start from the library defaults instead of `default_config`.
        help_groups (`dict[str, list[str]]`, *optional*): the sections of `--help` (title: field names); without
            it, `--help` shows every flag.
        **kwargs: passed to `argparse.ArgumentParser` (`description`, `usage`, ...); the description is printed as
            written.
    """

    def __init__(
        self,
        dataclass_types,
        *,
        default_config: str | os.PathLike,
        selection_flags: Iterable[str] = (),
        help_groups: dict[str, list[str]] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        self.default_config = Path(default_config)
        self.selection_flags = frozenset(selection_flags)
        self.help_groups = help_groups
        if help_groups is not None:
            self.add_argument(
                "--help_all", action=_FullHelpAction, help="show every flag (all of TrainingArguments) and exit"
            )

    def format_help(self) -> str:
        """The help of the flags in `help_groups`, with a pointer to `--help_all` (every flag)."""
        if self.help_groups is None:
            return super().format_help()
        flags = [action for action in self._actions if not isinstance(action, _HELP_ACTIONS)]
        actions = {}
        for action in flags:
            actions.setdefault(action.dest, action)  # a bool field's `--no_<name>` comes second
        shown = {name for names in self.help_groups.values() for name in names}
        hidden = len(set(actions) - shown)
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, [])
        formatter.add_text(self.description)
        sections = {"help": [action for action in self._actions if isinstance(action, _HELP_ACTIONS)]}
        sections.update({title: [actions[name] for name in names] for title, names in self.help_groups.items()})
        for title, section_actions in sections.items():
            formatter.start_section(title)
            formatter.add_arguments(section_actions)
            formatter.end_section()
        formatter.add_text(f"{hidden} more flags (every TrainingArguments field) are accepted: see --help_all.")
        formatter.add_text(textwrap.fill(self._default_config_text(), width=100))
        return formatter.format_help()

    def _default_config_text(self) -> str:
        """What the embedded default sets: the values that flags alone start from, where (default: ...) is the
        library's."""
        import yaml

        values = yaml.safe_load(self.default_config.read_text()) or {}
        settings = ", ".join(f"{name} {value}" for name, value in values.items())
        return (
            f"The (default: ...) values are the library's. Flags alone start from the embedded default "
            f"{_shown(self.default_config)} instead, which sets {settings}."
        )

    def format_full_help(self) -> str:
        """The help of every flag."""
        return super().format_help()

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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (it holds commands); each flag once (not its `--dash-spelled` alias), with its
    default where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

    def _format_action_invocation(self, action):
        spellings = {}
        for option in action.option_strings:
            spellings.setdefault(option.replace("-", "_"), option)
        if len(spellings) < len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = list(spellings.values())
        return super()._format_action_invocation(action)


class _FullHelpAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(parser.format_full_help())
        parser.exit()


_HELP_ACTIONS = (argparse._HelpAction, _FullHelpAction)
