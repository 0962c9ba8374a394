"""Whether the calibrated softmax scale of a binarized causal LM is the right one: a per-layer scale fitted to the
teacher's weights against the calibrated one.

In HAD's binary stages the logits are alpha * Sb with alpha = sigma_Q * sigma_K * s: the signs of the queries and keys
do not depend on their size, so training cannot change a layer's softmax temperature; only the calibration sets it
(`causal_lm_binarization.py` found that HAD's weights, not its selection, break the converted SmolLM2). This probe
fits, for each layer of the converted SmolLM2-135M-Instruct, one factor m on alpha: the m that minimizes the
cross-entropy of softmax(m alpha Sb) over HAD's kept keys against the teacher's softmax over the same keys (the best
weights that selection allows), summed over the rows, heads and windows of the recipe's *training* documents (the
teacher's queries and keys, a grid of log-spaced m; the cross-entropy is convex in m). Then the perplexity, on other
training windows, of:

- `had`: the converted model as calibrated (m = 1);
- `had_fitted`: each layer's alpha times its fitted m;
- `had_first_key` / `had_first_key_fitted`: the same with the first key kept besides the top N (`sink_keys=1`, as
  the recipe's SmolLM2 config distills), m fitted with the first key in the set.

    PYTHONPATH=src:. python benchmarks/causal_lm_temperature.py --out benchmarks/results/causal_lm_temperature_cpu.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.causal_lm_binarization import (  # noqa: E402
    _softmax_over,
    causal_logits,
    converted_smollm2,
    perplexity,
    probe_arguments,
    register_probe,
    result_header,
    training_windows,
    variant_perplexities,
)
from had_hf.selection import select_top_n  # noqa: E402

PROBE = "had_temperature_probe"
VARIANTS = ("dense", "had", "had_fitted", "had_first_key", "had_first_key_fitted")
GRID = torch.logspace(-3.0, math.log10(3.0), 71, dtype=torch.float64)


class ProbeState:
    """The variant the probe attention runs, the fitted factors per (layer, first key kept), and, while `fitting`,
    the summed cross-entropy of every grid factor per (layer, first key kept)."""

    def __init__(self):
        self.variant = "dense"
        self.fitting = False
        self.losses: dict[tuple[int, bool], torch.Tensor] = {}
        self.factors: dict[tuple[int, bool], float] = {}


STATE = ProbeState()


def kept_keys(binary_logits: torch.Tensor, valid: torch.Tensor, ratio: float, first_key: bool) -> torch.Tensor:
    """HAD's kept keys: the top N of the binary logits, plus each row's first valid key if `first_key` (the rule of
    `HADConfig(sink_keys=1)`)."""
    return select_top_n(binary_logits, valid, top_n_ratio=ratio, sink_keys=int(first_key))


def grid_cross_entropy(logits: torch.Tensor, binary_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per factor m of GRID: the cross-entropy of softmax(m * binary_logits) over `keep` against the teacher's softmax
    over `keep`, summed over all rows."""
    target = _softmax_over(logits, keep)
    masked = binary_logits.masked_fill(~keep, float("-inf"))
    losses = []
    for factor in GRID.tolist():
        log_weights = torch.log_softmax(masked * factor, dim=-1).masked_fill(~keep, 0.0)
        losses.append(-(target * log_weights).sum())
    return torch.stack(losses)


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention of the converted model under `STATE.variant` (float64 weights, no padding)."""
    logits, binary_logits, value, valid, ratio = causal_logits(module, query, key, value, scaling)
    layer = module.layer_idx
    if STATE.fitting:
        for first_key in (False, True):
            losses = grid_cross_entropy(logits, binary_logits, kept_keys(binary_logits, valid, ratio, first_key))
            STATE.losses[(layer, first_key)] = STATE.losses.get((layer, first_key), 0) + losses
    if STATE.variant == "dense":
        weights = _softmax_over(logits, valid)
    else:
        first_key = STATE.variant.startswith("had_first_key")
        factor = STATE.factors[(layer, first_key)] if STATE.variant.endswith("_fitted") else 1.0
        weights = _softmax_over(binary_logits * factor, kept_keys(binary_logits, valid, ratio, first_key))
    return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


def main(argv=None) -> dict:
    parser = probe_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--fit_windows", type=int, default=8, help="windows of 256 tokens the factors are fitted on")
    args = parser.parse_args(argv)
    teacher, had, token_ids, name = converted_smollm2(args)
    register_probe(PROBE, probe_attention)
    had.set_attn_implementation(PROBE)

    # the fit: the teacher's queries and keys in every layer (dense forward), on the windows of 256 tokens that follow
    # the evaluation's in the same seeded order (none of them evaluated)
    start = time.perf_counter()
    STATE.variant, STATE.fitting = "dense", True
    fit_windows = training_windows(token_ids, 256, args.windows + args.fit_windows, args.seed)[args.windows :]
    perplexity(had, fit_windows)
    STATE.fitting = False
    best = {key: int(losses.argmin()) for key, losses in STATE.losses.items()}
    STATE.factors = {key: GRID[index].item() for key, index in best.items()}
    at_edge = {key for key, index in best.items() if index in (0, len(GRID) - 1)}
    factors = [
        {
            "layer": layer,
            "factor": STATE.factors[(layer, False)],
            "factor_first_key": STATE.factors[(layer, True)],
            "at_grid_edge": [first for first in (False, True) if (layer, first) in at_edge],
        }
        for layer in range(teacher.config.num_hidden_layers)
    ]
    for row in factors:
        print(f"layer {row['layer']:2d}: m = {row['factor']:.3f}, with the first key {row['factor_first_key']:.3f}")
    print(f"fitted in {time.perf_counter() - start:.0f} s")

    rows = variant_perplexities(had, token_ids, args, VARIANTS, lambda variant: setattr(STATE, "variant", variant))

    result = {
        **result_header(argv, name, args),
        "grid": {"low": GRID[0].item(), "high": GRID[-1].item(), "points": len(GRID), "spacing": "log"},
        "windows": {
            "documents": "the recipe's training documents",
            "fit": {"length": 256, "count": args.fit_windows, "note": "after the 256-token evaluation windows"},
            "evaluation": {"per_length": args.windows, "seed": args.seed},
        },
        "factors": factors,
        "variants": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
