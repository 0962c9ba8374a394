import math

import pytest
import torch

from had_hf.losses import attention_kl, attention_kl_terms, output_kl, output_mse


def test_zero_for_identical_inputs():
    logits = torch.randn(2, 3, 4, 5)
    valid = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    assert attention_kl({"a": logits}, {"a": logits.clone()}, {"a": valid}).item() == pytest.approx(0.0, abs=1e-7)
    z = torch.randn(4, 3)
    assert output_kl(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert output_mse(z, z.clone()).item() == 0.0


def test_hand_computed_example():
    # one row: teacher logits [0, log 3] -> p = [1/4, 3/4]; student logits [0, 0] -> q = [1/2, 1/2]
    teacher = torch.tensor([[[[0.0, math.log(3.0)]]]])
    student = torch.zeros(1, 1, 1, 2)
    valid = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert attention_kl({"l": teacher}, {"l": student}, {"l": valid}).item() == pytest.approx(expected, rel=1e-6)
    assert output_kl(teacher[0, 0], student[0, 0]).item() == pytest.approx(expected, rel=1e-6)
    assert output_mse(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])).item() == pytest.approx(2.5)


def test_masked_keys_and_padded_query_rows_are_ignored():
    torch.manual_seed(0)
    teacher, student = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    valid = torch.tensor([True, True, False, False]).expand(1, 1, 3, 4)
    base = attention_kl_terms(teacher, student, valid)
    # whatever sits in masked keys changes nothing
    teacher2, student2 = teacher.clone(), student.clone()
    teacher2[..., 2:] = 100.0
    student2[..., 2:] = -100.0
    changed = attention_kl_terms(teacher2, student2, valid)
    assert torch.allclose(base[0], changed[0]) and base[1] == changed[1] == 3
    # a padded query row is excluded from the mean
    query_mask = torch.tensor([[1, 1, 0]])
    summed, count = attention_kl_terms(teacher, student, valid, query_mask)
    assert count == 2
    full, _ = attention_kl_terms(teacher, student, valid)
    row2 = attention_kl_terms(teacher[:, :, 2:], student[:, :, 2:], valid[:, :, 2:])[0]
    assert torch.allclose(summed, full - row2)
    # the mean is over counted rows of all layers
    mean = attention_kl({"x": teacher}, {"x": student}, {"x": valid}, {"x": query_mask})
    assert torch.allclose(mean, summed / 2)


def test_rows_without_valid_keys_are_finite_and_not_counted():
    teacher, student = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3, requires_grad=True)
    valid = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    valid[0, 0, 1] = False
    loss = attention_kl({"x": teacher}, {"x": student}, {"x": valid})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert (student.grad[0, :, 1] == 0).all()


@pytest.mark.parametrize("stage", ["tanh", "sign", "ste", "binary"])
def test_finite_in_every_stage(stage):
    import had_hf
    from had_hf import HADCaptureStore, HADConfig
    from had_hf.integration import use_dense_capture
    from tests.conftest import build_model, model_inputs

    teacher = use_dense_capture(build_model("bert"))
    student = had_hf.convert(build_model("bert"), HADConfig(top_n=2)).train()
    had_hf.set_stage(student, "inference" if stage == "binary" else stage, c=0.05)
    inputs = model_inputs("bert")
    t_store, s_store = HADCaptureStore(), HADCaptureStore()
    with torch.no_grad():
        teacher(**inputs, had_store=t_store)
    student(**inputs, had_store=s_store)
    loss = attention_kl(t_store.logits, s_store.logits, s_store.valid)
    assert torch.isfinite(loss) and loss > 0
    if stage != "binary":
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("valid_shape", [(1, 1, 1, 5), (1, 1, 4, 5), (2, 1, 4, 5), (2, 3, 4, 5)])
def test_attention_kl_terms_against_a_per_row_reference_for_every_mask_shape(valid_shape):
    """A mask that broadcasts over the batch, the heads or the query rows gives what its materialized copy gives, and
    both the float64 per-row KL, with its gradient; rows without a valid key and padded queries are not counted."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    student = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(valid_shape, generator=generator) > 0.3
    valid[..., 0, :] = False  # a row (or, for one broadcast row, every row) without a valid key
    valid[..., -1, 1] = True
    query_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]])
    total, count = attention_kl_terms(teacher, student, valid, query_mask)
    total.backward()
    full_valid = valid.expand_as(teacher)
    expected, rows = torch.zeros((), dtype=torch.float64), 0
    expected_grad = torch.zeros_like(teacher)
    for b, h, i in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        kept = full_valid[b, h, i]
        if not kept.any() or not query_mask[b, i]:
            continue
        p = torch.softmax(teacher[b, h, i][kept], dim=-1)
        q = torch.softmax(student.detach()[b, h, i][kept], dim=-1)
        expected += (p * (p.log() - q.log())).sum()
        expected_grad[b, h, i][kept] = q - p
        rows += 1
    assert int(count) == rows
    torch.testing.assert_close(total.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-12, atol=1e-12)
    student.grad = None
    materialized = attention_kl_terms(teacher, student, full_valid.contiguous(), query_mask)
    assert torch.equal(materialized[0], total) and torch.equal(materialized[1], count)
