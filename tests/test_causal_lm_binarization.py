"""`benchmarks/causal_lm_binarization.py`: its attention variants against per-row loops, and its `had` variant
against had_hf's own `hamming_topk` attention in every layer of a tiny Llama."""

import math
from pathlib import Path

import pytest
import torch

import had_hf
from had_hf import HADConfig
from had_hf.selection import select_top_n
from recipes.common.tiny_llama import tiny_llama
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]

binarization = load_script(REPO / "benchmarks" / "causal_lm_binarization.py", "causal_lm_binarization")


def _top_n_loop(scores: list[float], valid: list[bool], ratio: float) -> set[int]:
    """The rule of METHOD.md, one row: N = min(max(1, ceil(ratio * v)), v) of the v valid keys, the largest scores,
    the lower index first among equal ones."""
    keys = [j for j, ok in enumerate(valid) if ok]
    n = min(max(1, math.ceil(ratio * len(keys))), len(keys))
    return set(sorted(keys, key=lambda j: (-scores[j], j))[:n])


def _softmax_loop(logits: list[float], kept: set[int]) -> list[float]:
    top = max(logits[j] for j in kept)
    exps = {j: math.exp(logits[j] - top) for j in kept}
    total = sum(exps.values())
    return [exps[j] / total if j in kept else 0.0 for j in range(len(logits))]


def _expected_row(variant, logits, binary, valid, ratio):
    had_kept = _top_n_loop(binary, valid, ratio)
    teacher_kept = _top_n_loop(logits, valid, ratio)
    all_valid = {j for j, ok in enumerate(valid) if ok}
    with_first = had_kept | {0}
    if variant == "had_first_key_teacher_share":
        share = _softmax_loop(logits, with_first)[0]
        rest = with_first - {0}
        weights = [w * (1 - share) for w in _softmax_loop(binary, rest)] if rest else [0.0] * len(logits)
        weights[0] = share
        return weights
    logits_of, kept = {
        "dense": (logits, all_valid),
        "dense_top_n": (logits, teacher_kept),
        "binary_all_keys": (binary, all_valid),
        "had": (binary, had_kept),
        "had_selection_teacher_weights": (logits, had_kept),
        "teacher_selection_had_weights": (binary, teacher_kept),
        "had_selection_first_key_teacher_weights": (logits, with_first),
    }[variant]
    return _softmax_loop(logits_of, kept)


@pytest.mark.parametrize("variant", binarization.VARIANTS)
def test_probe_weights_match_row_loops(variant):
    generator = torch.Generator().manual_seed(0)
    rows, keys, dim, ratio = 12, 12, 8, 0.3
    logits = torch.randn(1, 2, rows, keys, generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, (2, 2, rows, dim), generator=generator).double() * 2 - 1
    binary = 0.4 * signs[0] @ signs[1].transpose(-1, -2)  # few distinct values: ties at the threshold
    valid = torch.ones(keys, keys, dtype=torch.bool).tril()[None, None]
    weights = binarization.probe_weights(variant, logits, binary[None], valid, ratio)
    for head in range(2):
        for row in range(rows):
            expected = _expected_row(
                variant, logits[0, head, row].tolist(), binary[head, row].tolist(), valid[0, 0, row].tolist(), ratio
            )
            torch.testing.assert_close(weights[0, head, row], torch.tensor(expected, dtype=torch.float64))


def test_probe_had_equals_hamming_topk_in_every_layer():
    model = tiny_llama(num_hidden_layers=3).eval()
    had = had_hf.convert(model, HADConfig(top_n=None, top_n_ratio=0.117))
    window = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    check = binarization.probe_check(had, window)
    assert check["largest_layer_output_difference"] <= 1e-4 and math.isfinite(check["hamming_topk_perplexity"])


def test_probe_check_fails_on_a_different_rule(monkeypatch):
    """The check compares something: a probe that keeps one key more than the rule is refused."""
    model = tiny_llama(num_hidden_layers=2).eval()
    had = had_hf.convert(model, HADConfig(top_n=None, top_n_ratio=0.117))
    window = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    original = binarization.select_top_n
    monkeypatch.setattr(
        binarization, "select_top_n", lambda s, v, top_n_ratio: original(s, v, None, top_n_ratio + 0.1)
    )
    with pytest.raises(RuntimeError, match="differs from hamming_topk"):
        binarization.probe_check(had, window)


def test_first_key_experiment_keeps_each_rows_first_valid_key():
    """`benchmarks/causal_lm_first_key.py`'s rule: the top N of the rule plus the first valid key (left padding moves
    it), against per-row loops."""
    first_key = load_script(REPO / "benchmarks" / "causal_lm_first_key.py", "causal_lm_first_key")
    generator = torch.Generator().manual_seed(2)
    keys, ratio = 10, 0.2
    scores = torch.randn(2, 1, keys, keys, generator=generator)
    valid = torch.ones(2, 1, keys, keys, dtype=torch.bool).tril()
    valid[1, :, :, :3] = False  # the second sequence is left-padded by 3 keys
    keep = first_key.select_top_n_and_first_key(scores, valid, top_n_ratio=ratio)
    for batch in range(2):
        for row in range(keys):
            row_valid = valid[batch, 0, row].tolist()
            expected = _top_n_loop(scores[batch, 0, row].tolist(), row_valid, ratio) if any(row_valid) else set()
            if any(row_valid):
                expected.add(row_valid.index(True))
            assert set(keep[batch, 0, row].nonzero().flatten().tolist()) == expected
    # the script runs the library's rule with one attention sink
    assert torch.equal(keep, select_top_n(scores, valid, top_n_ratio=ratio, sink_keys=1))


temperature = load_script(REPO / "benchmarks" / "causal_lm_temperature.py", "causal_lm_temperature")


def test_temperature_grid_cross_entropy_matches_a_row_loop():
    """`causal_lm_temperature.grid_cross_entropy`: per grid factor m, the cross-entropy of softmax(m * binary) over the
    kept keys against the teacher's softmax over the same keys, summed over rows, against a float64 row loop."""
    generator = torch.Generator().manual_seed(3)
    rows, keys, dim, ratio = 9, 9, 8, 0.3
    logits = torch.randn(1, 1, rows, keys, generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, (2, rows, dim), generator=generator).double() * 2 - 1
    binary = (0.3 * signs[0] @ signs[1].T)[None, None]
    valid = torch.ones(keys, keys, dtype=torch.bool).tril()[None, None]
    for first_key in (False, True):
        keep = temperature.kept_keys(binary, valid, ratio, first_key)
        losses = temperature.grid_cross_entropy(logits, binary, keep)
        for index in (0, 20, len(temperature.GRID) - 1):
            factor = temperature.GRID[index].item()
            expected = 0.0
            for row in range(rows):
                kept = _top_n_loop(binary[0, 0, row].tolist(), valid[0, 0, row].tolist(), ratio)
                kept |= {0} if first_key else set()
                target = _softmax_loop(logits[0, 0, row].tolist(), kept)
                model = _softmax_loop([factor * x for x in binary[0, 0, row].tolist()], kept)
                expected -= sum(target[j] * math.log(model[j]) for j in kept)
            assert losses[index].item() == pytest.approx(expected, rel=1e-9)


def test_temperature_fit_recovers_a_known_factor():
    """Teacher weights that are exactly softmax(m0 * binary) over HAD's kept keys: the grid's best factor is the grid
    point nearest m0 (the cross-entropy is convex in m, least at m0)."""
    generator = torch.Generator().manual_seed(4)
    rows, dim, ratio = 64, 16, 0.25
    signs = torch.randint(0, 2, (2, rows, dim), generator=generator).double() * 2 - 1
    binary = (0.2 * signs[0] @ signs[1].T)[None, None]
    valid = torch.ones(rows, rows, dtype=torch.bool).tril()[None, None]
    keep = temperature.kept_keys(binary, valid, ratio, False)
    for true_factor in (0.05, 0.3, 1.7):
        losses = temperature.grid_cross_entropy(true_factor * binary, binary, keep)
        nearest = (temperature.GRID.log() - math.log(true_factor)).abs().argmin()
        assert int(losses.argmin()) == int(nearest)
