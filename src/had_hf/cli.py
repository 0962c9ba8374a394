"""`python -m had_hf.cli`: the `had-hf` command line, which lives in the top-level module `had_hf_cli`.

`had_hf_cli` sits outside this package so that `had-hf --help` and argument errors never import torch and
transformers (`import had_hf` does); this module is kept for `python -m had_hf.cli` and `from had_hf.cli import main`.
"""

from __future__ import annotations

import sys

from had_hf_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
