"""The attention function against an independent float64 per-row loop (METHOD.md section 1)."""

import math

import pytest
import torch

from had_hf import HADConfig, HADRuntimeState
from had_hf.attention import had_attention, masked_softmax
from had_hf.capture import STORE_KWARG, HADCaptureStore
from had_hf.modes import HAD
from had_hf.selection import select_top_n


class _Module(torch.nn.Module):
    def __init__(self, config: HADConfig, name: str = "layer", is_causal: bool = False, stage="inference", c=1.0):
        super().__init__()
        self._had_config = config
        self._had_name = name
        self._had_is_cross = False
        self._had_state = HADRuntimeState(stage, c)
        self.is_causal = is_causal
        self.eval()


def hamming_topk_attention_forward(module, *args, **kwargs):
    """The `hamming_topk` attention function on its differentiable PyTorch path (a capture store forces it): returns
    the attention weights, which the op path does not."""
    return had_attention(module, *args, mode=HAD, **kwargs, **{STORE_KWARG: HADCaptureStore(capture_logits=False)})


def hamming_topk_op_forward(module, *args, **kwargs):
    """The `hamming_topk` attention function as inference runs it (the `had::hamming_topk_attention` op)."""
    output, weights = had_attention(module, *args, mode=HAD, **kwargs)
    assert weights is None, "the inference stage should have run the op"
    return output


def naive_hamming_attention(query, key, value, valid, top_n, sigma_q, sigma_k, scaling, sink_keys=0):
    """Per-row loop in float64: sign, Hamming score, sort by (-score, index), the first N kept and the row's first
    `sink_keys` valid keys besides, softmax over the kept keys."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    output = torch.zeros(batch, heads, q_len, value.shape[-1], dtype=torch.float64)
    kept_sets = {}
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                q_sign = [1 if float(v) >= 0 else -1 for v in query[b, h, i]]
                scores = []
                for j in range(k_len):
                    if not bool(valid[b, 0, i, j]):
                        continue
                    k_sign = [1 if float(v) >= 0 else -1 for v in key[b, h // group, j]]
                    hamming = sum(1 for a, c in zip(q_sign, k_sign) if a != c)
                    scores.append((dim - 2 * hamming, j))
                sinks = [item for item in scores[:sink_keys]]  # `scores` is in key order here
                scores.sort(key=lambda item: (-item[0], item[1]))
                kept = scores[:top_n]
                kept += [item for item in sinks if item not in kept]
                kept_sets[(b, h, i)] = sorted(j for _, j in kept)
                if not kept:
                    continue
                # per-head sigma: sigma_q one value per query head, sigma_k one per key/value head
                s_q = sigma_q[h] if isinstance(sigma_q, (list, tuple)) else sigma_q
                s_k = sigma_k[h // group] if isinstance(sigma_k, (list, tuple)) else sigma_k
                alpha = s_q * s_k * scaling
                exps = [math.exp(alpha * (s - kept[0][0])) for s, _ in kept]
                total = sum(exps)
                for (_, j), e in zip(kept, exps):
                    output[b, h, i] += (e / total) * value[b, h // group, j].double()
    return output, kept_sets


def _heavy_tie_inputs(seed, batch=2, heads=4, kv_heads=2, q_len=6, k_len=11, dim=8):
    generator = torch.Generator().manual_seed(seed)
    # few distinct sign patterns and small d: many equal Hamming scores, and exact zeros (sign(0) = +1)
    patterns = torch.randint(-1, 2, (3, dim), generator=generator).float()
    key = patterns[torch.randint(0, 3, (batch, kv_heads, k_len), generator=generator)]
    query = torch.randint(-1, 2, (batch, heads, q_len, dim), generator=generator).float()
    value = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    valid = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
    valid[1, :, :, 7:] = False  # padding
    valid[0, :, 2, :] = False  # a fully masked row
    valid[0, :, 3, 2:] = False  # fewer valid keys than N
    return query, key, value, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_n", [1, 4, 30])
def test_binary_stage_matches_naive_loop(seed, top_n):
    query, key, value, valid = _heavy_tie_inputs(seed)
    config = HADConfig(top_n=top_n, sigma_q={"layer": 1.3}, sigma_k={"layer": 0.7})
    scaling = 8**-0.5
    output, weights = hamming_topk_attention_forward(_Module(config), query, key, value, valid, scaling=scaling)
    expected, kept_sets = naive_hamming_attention(query, key, value, valid, top_n, 1.3, 0.7, scaling)
    for (b, h, i), kept in kept_sets.items():
        assert torch.nonzero(weights[b, h, i]).flatten().tolist() == kept, (b, h, i)
    torch.testing.assert_close(output.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(output).all()
    assert (output[0, 2] == 0).all()  # the fully masked row gives zeros
    op_output = hamming_topk_op_forward(_Module(config), query, key, value, valid, scaling=scaling)
    torch.testing.assert_close(op_output.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("top_n, sink_keys", [(1, 1), (3, 2), (30, 1)])
def test_attention_sinks_match_naive_loop(seed, top_n, sink_keys):
    """HADConfig(sink_keys=k): each row keeps its top N and its first k valid keys (padding and a fully masked row
    included), on the PyTorch path and through the op."""
    query, key, value, valid = _heavy_tie_inputs(seed)
    config = HADConfig(top_n=top_n, sink_keys=sink_keys, sigma_q={"layer": 1.3}, sigma_k={"layer": 0.7})
    scaling = 8**-0.5
    output, weights = hamming_topk_attention_forward(_Module(config), query, key, value, valid, scaling=scaling)
    expected, kept_sets = naive_hamming_attention(query, key, value, valid, top_n, 1.3, 0.7, scaling, sink_keys)
    if top_n < key.shape[2]:
        assert any(len(kept) > top_n for kept in kept_sets.values())  # some row keeps a sink beside its top N
    for (b, h, i), kept in kept_sets.items():
        assert torch.nonzero(weights[b, h, i]).flatten().tolist() == kept, (b, h, i)
    torch.testing.assert_close(output.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    op_output = hamming_topk_op_forward(_Module(config), query, key, value, valid, scaling=scaling)
    torch.testing.assert_close(op_output.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)


def test_exactly_n_kept_lower_index_wins_ties():
    scores = torch.tensor([[[[3.0, 5.0, 3.0, 3.0, 5.0, 1.0, 3.0]]]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    keep = select_top_n(scores, valid, top_n=4)
    assert keep.flatten().tolist() == [True, True, True, False, True, False, False]
    valid[..., 0] = False
    keep = select_top_n(scores, valid, top_n=4)
    assert keep.flatten().tolist() == [False, True, True, True, True, False, False]


def test_masked_keys_never_selected_even_with_the_best_score():
    scores = torch.tensor([[[[9.0, 1.0, 2.0]]]])
    valid = torch.tensor([[[[False, True, True]]]])
    assert select_top_n(scores, valid, 1).flatten().tolist() == [False, False, True]
    assert select_top_n(scores, valid, 5).flatten().tolist() == [False, True, True]


def test_causal_flag_without_mask_masks_the_future():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    module = _Module(HADConfig(top_n=30), is_causal=True)
    _, weights = hamming_topk_attention_forward(module, query, key, value, None)
    assert (torch.triu(weights[0, 0], diagonal=1) == 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 5))


def test_float_additive_masks_are_understood():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    module = _Module(HADConfig(top_n=3))
    bool_mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    bool_mask[1, ..., 2:] = False
    float_mask = torch.zeros(2, 1, 4, 4).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    out_bool, _ = hamming_topk_attention_forward(module, query, key, value, bool_mask)
    out_float, _ = hamming_topk_attention_forward(module, query, key, value, float_mask)
    torch.testing.assert_close(out_bool, out_float)
    torch.testing.assert_close(hamming_topk_op_forward(module, query, key, value, float_mask), out_bool)


def test_position_bias_ranks_and_normalizes_biased_logits():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    bias = torch.tensor([[[[0.0, 100.0, 0.0, 0.0, 0.0, 50.0]]]])
    module = _Module(HADConfig(top_n=2))
    output, weights = hamming_topk_attention_forward(module, query, key, value, None, scaling=1.0, position_bias=bias)
    assert torch.nonzero(weights.flatten()).flatten().tolist() == [1, 5]
    op_output = hamming_topk_op_forward(module, query, key, value, None, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(op_output, output)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    module = _Module(HADConfig(top_n=6)).eval()
    out_eval = hamming_topk_op_forward(module, query, key, value, None, dropout=0.5)
    out_eval2 = hamming_topk_op_forward(module, query, key, value, None, dropout=0.5)
    assert torch.equal(out_eval, out_eval2)
    module.train()
    out_train, _ = had_attention(module, query, key, value, None, dropout=0.5, mode=HAD)
    assert not torch.allclose(out_train, out_eval)


@pytest.mark.parametrize("stage", ["tanh", "sign", "ste"])
def test_training_stages_give_finite_gradients_without_nan_on_masked_rows(stage):
    torch.manual_seed(0)
    query = torch.randn(2, 2, 4, 8, requires_grad=True)
    key = torch.randn(2, 2, 4, 8, requires_grad=True)
    value = torch.randn(2, 2, 4, 8, requires_grad=True)
    valid = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    valid[1, :, 0, :] = False
    module = _Module(HADConfig(top_n=2), stage=stage, c=0.5).train()
    output, _ = hamming_topk_attention_forward(module, query, key, value, valid)
    output.square().sum().backward()
    for tensor in (query, key, value):
        assert torch.isfinite(tensor.grad).all()
    assert query.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_per_head_sigma_matches_naive_loop(seed):
    query, key, value, valid = _heavy_tie_inputs(seed)  # 4 query heads sharing 2 key/value heads
    sigma_q, sigma_k = [0.5, 1.3, 2.0, 0.9], [0.7, 1.9]
    config = HADConfig(top_n=4, sigma_q={"layer": sigma_q}, sigma_k={"layer": sigma_k})
    scaling = 8**-0.5
    output, weights = hamming_topk_attention_forward(_Module(config), query, key, value, valid, scaling=scaling)
    expected, kept_sets = naive_hamming_attention(query, key, value, valid, 4, sigma_q, sigma_k, scaling)
    for (b, h, i), kept in kept_sets.items():
        assert torch.nonzero(weights[b, h, i]).flatten().tolist() == kept, (b, h, i)
    torch.testing.assert_close(output.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["tanh", "sign", "ste"])
def test_per_head_sigma_gives_each_head_its_per_layer_result(stage):
    """Head h with per-head sigma equals head h of a run whose per-layer sigma is head h's (forward and gradient)."""
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 5, 8, generator=generator)
    key = torch.randn(2, 2, 7, 8, generator=generator)
    value = torch.randn(2, 2, 7, 8, generator=generator)
    valid = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    sigma_q, sigma_k = [0.5, 1.3, 2.0, 0.9], [0.7, 1.9]

    def run(sq, sk):
        q = query.clone().requires_grad_(True)
        config = HADConfig(top_n=5, sigma_q={"layer": sq}, sigma_k={"layer": sk})
        module = _Module(config, stage=stage, c=0.7)
        module.train()
        output, _ = hamming_topk_attention_forward(module, q, key, value, valid, scaling=0.35)
        output.square().sum().backward()
        return output.transpose(1, 2), q.grad

    output, grad = run(sigma_q, sigma_k)
    for head in range(4):
        expected, expected_grad = run(sigma_q[head], sigma_k[head // 2])
        torch.testing.assert_close(output[:, head], expected[:, head])
        torch.testing.assert_close(grad[:, head], expected_grad[:, head])


def test_per_head_sigma_with_the_wrong_number_of_heads_is_refused():
    query, key, value, valid = _heavy_tie_inputs(0)
    config = HADConfig(top_n=4, sigma_q={"layer": [1.0, 2.0]}, sigma_k={"layer": [1.0, 1.0]})
    with pytest.raises(ValueError, match="2 per-head sigma_q values but 4 query heads"):
        hamming_topk_attention_forward(_Module(config), query, key, value, valid)
    packed = torch.zeros(2, 2, 11, 1, dtype=torch.int32)
    config = HADConfig(top_n=4, sigma_q={"layer": [1.0] * 4}, sigma_k={"layer": [1.0] * 2})
    with pytest.raises(ValueError, match="one sigma per head"):
        hamming_topk_op_forward(_Module(config), query, packed, value, valid)


@pytest.mark.parametrize("broadcast_keep", [False, True])
def test_masked_softmax_values_and_gradient_against_a_per_row_softmax(broadcast_keep):
    """Softmax over the kept entries only, zeros elsewhere and for a row keeping nothing; the gradient reaches only the
    kept logits. `keep` may broadcast over heads (the dense teacher's mask)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 1 if broadcast_keep else 3, 4, 6, generator=generator) > 0.4
    keep[0, 0, 1] = False  # a row that keeps nothing
    upstream = torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64)
    weights = masked_softmax(logits, keep)
    (weights * upstream).sum().backward()
    expected, expected_grad = torch.zeros_like(weights), torch.zeros_like(weights)
    full_keep = keep.expand_as(logits)
    for index in torch.cartesian_prod(*[torch.arange(size) for size in logits.shape[:-1]]).tolist():
        kept = full_keep[tuple(index)]
        if kept.any():
            row = logits.detach()[tuple(index)][kept]
            probabilities = torch.softmax(row, dim=-1)
            expected[tuple(index)][kept] = probabilities
            g = upstream[tuple(index)][kept]
            expected_grad[tuple(index)][kept] = probabilities * (g - (probabilities * g).sum())
    torch.testing.assert_close(weights.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-12, atol=1e-12)
