"""The A/B runs of the first key: `recipes/distill_causal_lm.py` with and without every row's first valid key kept.

`causal_lm_binarization.py` found that SmolLM2's attention puts 40-70% of its weight on the first key in most
layers, and that HAD's top-N selection keeps that key in only a few rows. This script runs the recipe unchanged
except for the selection rule: each row keeps its top N by HAD's rule and, besides them, its first valid key
(`had_hf.selection.select_top_n` replaced for the run, in every module that calls it, so that training, the stage-end
evaluations and the final columns all see the same rule). With `--baseline` it runs the recipe as it is, through
the same entry point, so that two runs differ only in the rule. Every other argument goes to the recipe. The rule
is the library's `HADConfig(sink_keys=1)` (`--sink_keys 1` of the recipe), which the script calls; replacing the
function keeps the runs' HADConfig, and so their configs and cards, as the recipe's defaults write them.

    python benchmarks/causal_lm_first_key.py [--baseline] --teacher_gguf_file ... --output_dir ... [recipe flags]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import had_hf.attention
import had_hf.kernels.reference
import had_hf.selection

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "distill_causal_lm.py"
_select_top_n = had_hf.selection.select_top_n


def select_top_n_and_first_key(scores, valid, top_n=None, top_n_ratio=None):
    """HAD's kept keys and each row's first valid key: `had_hf.selection.select_top_n` with one attention sink."""
    return _select_top_n(scores, valid, top_n, top_n_ratio, sink_keys=1)


def main(argv: list[str]) -> None:
    baseline = "--baseline" in argv
    argv = [arg for arg in argv if arg != "--baseline"]
    if not baseline:
        for module in (had_hf.selection, had_hf.attention, had_hf.kernels.reference):
            module.select_top_n = select_top_n_and_first_key
    sys.argv = [str(RECIPE), *argv]
    runpy.run_path(str(RECIPE), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
