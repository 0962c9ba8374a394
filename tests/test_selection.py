"""`had_hf.selection.select_top_n` against a per-row reference of the rule (METHOD.md section 1), for both rules of N,
with ties, masks of every shape transformers passes, half precision, and as traced (ONNX) and compiled code."""

import math

import pytest
import torch

from had_hf.selection import causal_valid, most_kept, select_top_n


def reference_keep(
    scores: torch.Tensor, valid: torch.Tensor, top_n=None, top_n_ratio=None, sink_keys=0
) -> torch.Tensor:
    """Row by row in Python: N from the row's valid keys, then its valid keys ordered by (larger logit, lower
    index) and the first N kept, and the row's first `sink_keys` valid keys besides."""
    valid = valid.expand_as(scores)
    keep = torch.zeros_like(valid)
    for row in torch.cartesian_prod(*[torch.arange(size) for size in scores.shape[:-1]]).reshape(-1, scores.dim() - 1):
        index = tuple(row.tolist())
        keys = [j for j in range(scores.shape[-1]) if valid[index][j]]
        v = len(keys)
        n = min(top_n, v) if top_n is not None else min(max(1, math.ceil(top_n_ratio * v)), v)
        ranked = sorted(keys, key=lambda j: (-float(scores[index][j]), j))
        keep[index][ranked[:n] + keys[:sink_keys]] = True
    return keep


def _cases(seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, q, k = 2, 3, 6, 13
    continuous = torch.randn(batch, heads, q, k, generator=generator)
    tied = torch.randint(-2, 3, (batch, heads, q, k), generator=generator).float()  # Hamming-like: many ties
    padding = torch.ones(batch, 1, q, k, dtype=torch.bool)
    padding[1, ..., 9:] = False
    padding[1, :, 2] = False  # a row with no valid key
    causal = causal_valid(q, k, torch.device("cpu"))
    masks = {"none": torch.ones(1, 1, 1, 1, dtype=torch.bool), "padding": padding, "causal": causal}
    masks["causal_padding"] = causal & padding
    with_inf = continuous.clone()
    with_inf[0, 0, 0, :4] = float("-inf")  # valid keys a bias set to -inf
    return {"continuous": continuous, "tied": tied, "with_inf": with_inf}, masks


@pytest.mark.parametrize("rule", [{"top_n": 1}, {"top_n": 4}, {"top_n": 20}, {"top_n_ratio": 0.117},
                                  {"top_n_ratio": 0.3}, {"top_n_ratio": 1.0}])  # fmt: skip
def test_select_top_n_keeps_the_rule_for_every_mask_and_tie(rule):
    scores, masks = _cases()
    for score_name, score in scores.items():
        for mask_name, valid in masks.items():
            expected = reference_keep(score, valid, **rule)
            assert torch.equal(select_top_n(score, valid, **rule), expected), (score_name, mask_name)


@pytest.mark.parametrize("rule", [{"top_n": 1}, {"top_n": 4}, {"top_n_ratio": 0.117}, {"top_n_ratio": 1.0}])
@pytest.mark.parametrize("sink_keys", [1, 3])
def test_attention_sinks_are_each_rows_first_valid_keys_beside_its_top_n(rule, sink_keys):
    scores, masks = _cases(seed=2)
    for score_name, score in scores.items():
        for mask_name, valid in masks.items():
            expected = reference_keep(score, valid, **rule, sink_keys=sink_keys)
            kept = select_top_n(score, valid, **rule, sink_keys=sink_keys)
            assert torch.equal(kept, expected), (score_name, mask_name)
            assert torch.equal(kept & select_top_n(score, valid, **rule), select_top_n(score, valid, **rule))


@pytest.mark.parametrize("sink_keys", [1, 2, 5, 20])
def test_sink_ends_give_the_same_keys_as_first_valid_keys(sink_keys):
    """The kernels' form of the sinks, one end per row (`sink_ends`): the valid keys before it are the row's first
    `sink_keys` valid keys, under every mask, rows with no valid key and fewer valid keys than `sink_keys` included."""
    from had_hf.selection import first_valid_keys, sink_ends

    _, masks = _cases()
    masks["random"] = torch.rand(2, 3, 6, 13, generator=torch.Generator().manual_seed(4)) > 0.6
    for name, valid in masks.items():
        valid = valid.expand(2, 3, 6, 13)
        ends = sink_ends(valid, sink_keys)
        assert ends.shape == valid.shape[:-1] and ends.dtype == torch.int32
        by_end = valid & (torch.arange(13) < ends[..., None])
        expected = torch.zeros(valid.numel() // 13, 13, dtype=torch.bool)
        for index, row in enumerate(valid.reshape(-1, 13).tolist()):
            expected[index, [j for j, ok in enumerate(row) if ok][:sink_keys]] = True
        expected = expected.reshape(valid.shape)
        assert torch.equal(by_end, expected) and torch.equal(first_valid_keys(valid, sink_keys), expected), name


@pytest.mark.parametrize("sink_keys", [-1, 1.0, True, "1"])
def test_sink_keys_other_than_a_count_are_refused(sink_keys):
    from had_hf import HADConfig

    with pytest.raises(ValueError, match="sink_keys must be an integer >= 0"):
        HADConfig(sink_keys=sink_keys)


def test_select_top_n_in_bfloat16_equals_the_rule_on_the_rounded_logits():
    scores, masks = _cases(seed=1)
    logits = scores["continuous"].to(torch.bfloat16)  # rounding makes ties
    for valid in masks.values():
        expected = reference_keep(logits.float(), valid, top_n_ratio=0.3)
        assert torch.equal(select_top_n(logits, valid, top_n_ratio=0.3), expected)


def test_most_kept_bounds_every_row_of_the_ratio_rule():
    from had_hf.selection import kept_counts

    for num_keys in (1, 2, 7, 100, 2048, 8192):
        for ratio in (0.001, 0.117, 0.5, 1.0):
            counts = kept_counts(torch.arange(num_keys + 1), None, ratio)
            assert int(counts.max()) == most_kept(num_keys, ratio)


def test_traced_ratio_rule_serves_other_lengths():
    """Traced (as for ONNX) the ratio rule sorts instead of a TopK of a constant K: the graph serves any number of
    keys."""
    scores, masks = _cases(seed=2)
    traced = torch.jit.trace(lambda s, v: select_top_n(s, v, top_n_ratio=0.3), (scores["tied"], masks["padding"]))
    generator = torch.Generator().manual_seed(3)
    for length in (5, 13, 40):
        logits = torch.randint(-3, 4, (2, 3, 4, length), generator=generator).float()
        valid = torch.rand(2, 1, 4, length, generator=generator) > 0.2
        assert torch.equal(traced(logits, valid), reference_keep(logits, valid, top_n_ratio=0.3)), length


def test_compiled_ratio_rule_has_no_graph_break_and_serves_other_lengths():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(
        lambda s, v: select_top_n(s, v, top_n_ratio=0.117), backend="eager", dynamic=True, fullgraph=True
    )
    generator = torch.Generator().manual_seed(4)
    for length in (9, 17, 33):
        logits = torch.randn(2, 3, length, length, generator=generator)
        valid = causal_valid(length, length, torch.device("cpu"))
        assert torch.equal(compiled(logits, valid), reference_keep(logits, valid, top_n_ratio=0.117)), length
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
