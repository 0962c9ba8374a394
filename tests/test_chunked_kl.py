"""The chunked attention KL (computed in the student's attention calls against the teacher's queries and keys):
equal to the materialized loss of `had_hf.losses.attention_kl`, and without the layers x n^2 logits it needs."""

import contextlib
import copy

import pytest
import torch

import had_hf
from had_hf import HADCaptureStore, HADConfig
from had_hf.capture import RECORD_ATTRIBUTE
from had_hf.integration import use_dense_capture
from had_hf.losses import attention_kl, attention_kl_terms, chunked_attention_kl_terms
from tests.conftest import build_model, model_inputs


def _pair(family: str, dtype=torch.float64, stage="sign", seed=0):
    base = build_model(family, seed=seed).to(dtype)
    teacher = use_dense_capture(copy.deepcopy(base))
    student = had_hf.convert(copy.deepcopy(base), HADConfig(top_n=2)).train()
    had_hf.set_stage(student, stage, c=0.5)
    return teacher, student


def _query_masks(inputs):
    return lambda name: inputs["attention_mask"]


def _materialized(teacher, student, inputs):
    """The loss and gradients of the materialized path: every layer's full logits, compared afterwards."""
    teacher_store, student_store = HADCaptureStore(), HADCaptureStore()
    with torch.no_grad():
        teacher(**inputs, had_store=teacher_store)
    student(**inputs, had_store=student_store)
    mask = inputs["attention_mask"]
    masks = {
        name: mask if mask.shape[-1] == logits.shape[-2] else None for name, logits in student_store.logits.items()
    }
    loss = attention_kl(teacher_store.logits, student_store.logits, student_store.valid, masks)
    return loss, _grads(student, loss)


def _chunked(teacher, student, inputs, chunk_rows):
    teacher_store = HADCaptureStore(capture_logits=False, capture_scores=True)
    student_store = HADCaptureStore(
        capture_logits=False, distill_from=teacher_store, query_mask=_query_masks(inputs), kl_chunk_rows=chunk_rows
    )
    with torch.no_grad():
        teacher(**inputs, had_store=teacher_store)
    student(**inputs, had_store=student_store)
    loss = student_store.attention_kl()
    return loss, _grads(student, loss)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
@pytest.mark.parametrize("stage", ["tanh", "ste"])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_chunked_equals_materialized_in_float64(family, stage, chunk_rows):
    teacher, student = _pair(family, stage=stage)
    inputs = model_inputs(family)  # with padding: masked keys and padded query rows
    loss, grads = _materialized(teacher, student, inputs)
    chunked_loss, chunked_grads = _chunked(teacher, student, inputs, chunk_rows)
    assert chunked_loss.dtype == torch.float64 and loss > 0
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-10, atol=1e-16)
    assert chunked_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-9, atol=1e-15)


def test_chunked_terms_equal_unchunked_terms_on_random_maps():
    """The pure function: any split of the rows gives the same sum and count (float64), with masks."""
    generator = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(2, 3, 7, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    valid = torch.rand(2, 1, 7, 5, generator=generator) > 0.3
    query_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    expected = attention_kl_terms(teacher, student, valid, query_mask)
    for chunk_rows in (1, 2, 3, 7, 100):
        got = chunked_attention_kl_terms(
            lambda rows: teacher[..., rows, :], lambda rows: student[..., rows, :], valid, 7, query_mask, chunk_rows
        )
        torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=0)
        assert int(got[1]) == int(expected[1])


def test_chunked_kl_under_gradient_checkpointing_matches():
    """Layer checkpointing re-runs the attention (and the KL's chunks) in the backward pass: same gradients."""
    inputs = model_inputs("llama")
    teacher, student = _pair("llama")
    loss, grads = _chunked(teacher, student, inputs, 3)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_loss, checkpointed_grads = _chunked(teacher, student, inputs, 3)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-10, atol=1e-16)
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-9, atol=1e-15)


def _retained_bytes(teacher, student, inputs, path: str) -> int:
    """Bytes kept from the student's forward until the backward pass: the distinct storages that autograd saved,
    plus the tensors the two stores hold (the teacher's side included). Every saved tensor is held until the end of
    the count, so that no storage is freed and its address reused by another."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    if path == "materialized":
        teacher_store, student_store = HADCaptureStore(), HADCaptureStore()
    elif path == "chunked":
        teacher_store = HADCaptureStore(capture_logits=False, capture_scores=True)
        student_store = HADCaptureStore(capture_logits=False, distill_from=teacher_store)
    else:  # the student's forward alone, no attention loss
        teacher_store = student_store = HADCaptureStore(capture_logits=False)
    with torch.no_grad():
        teacher(**inputs, had_store=teacher_store)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        student(**inputs, had_store=student_store)
    held = [*saved, *teacher_store.logits.values(), *student_store.logits.values()]
    for scores in teacher_store.scores.values():
        held += [scores.query, scores.key]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in held}
    return sum(storages.values())


def test_retained_memory_does_not_scale_with_layers_times_length_squared():
    """What the attention loss adds to a training step's retained memory: the materialized path grows as
    layers x heads x n^2 (at least both sides' maps); the chunked path adds only the teacher's queries and keys,
    linear in n."""
    teacher, student = _pair("llama", dtype=torch.float32)
    config = student.config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    extra = {}
    for length in (32, 64):
        inputs = model_inputs("llama", batch=1, length=length, padding=False)
        alone = _retained_bytes(teacher, student, inputs, "none")
        extra[length] = {
            path: _retained_bytes(teacher, student, inputs, path) - alone for path in ("materialized", "chunked")
        }
        one_map = heads * length * length * 4  # one layer's float32 (H, n, n) logits
        assert extra[length]["materialized"] >= 2 * layers * one_map
        teacher_queries_and_keys = layers * (heads + kv_heads) * length * head_dim * 4
        assert 0 < extra[length]["chunked"] <= teacher_queries_and_keys
    assert extra[64]["materialized"] > 3.5 * extra[32]["materialized"]  # quadratic
    assert extra[64]["chunked"] <= 2 * extra[32]["chunked"]  # linear


def test_missing_teacher_layer_is_an_error():
    teacher, student = _pair("llama")
    inputs = model_inputs("llama")
    teacher_store = HADCaptureStore(capture_logits=False, capture_scores=True)
    with torch.no_grad():
        teacher(**inputs, had_store=teacher_store)
    teacher_store.records.pop("layers.1.self_attn")
    student_store = HADCaptureStore(capture_logits=False, distill_from=teacher_store)
    with pytest.raises(ValueError, match="layers.1.self_attn"):
        student(**inputs, had_store=student_store)


def test_capture_scores_refuses_a_had_teacher():
    _, student = _pair("llama")
    with pytest.raises(ValueError, match="dense teacher"):
        student(**model_inputs("llama"), had_store=HADCaptureStore(capture_logits=False, capture_scores=True))


def test_a_bound_store_gives_the_same_losses_and_gradients_bit_for_bit():
    """Bound to the modules (`HADCaptureStore.bound`: records found through the modules, sigmas also as tensors),
    the eager forward computes exactly what the store found by name computes."""
    teacher, student = _pair("llama", dtype=torch.float32)
    inputs = model_inputs("llama")
    results = []
    for bind in (False, True):
        teacher_store = HADCaptureStore(capture_logits=False, capture_scores=True)
        student_store = HADCaptureStore(
            capture_logits=False, distill_from=teacher_store, query_mask=_query_masks(inputs)
        )
        with torch.no_grad(), teacher_store.bound(teacher) if bind else contextlib.nullcontext():
            teacher(**inputs, had_store=teacher_store)
        with student_store.bound(student) if bind else contextlib.nullcontext():
            student(**inputs, had_store=student_store)
        loss = student_store.attention_kl()
        results.append((loss.detach(), _grads(student, loss), sorted(student_store.kl_terms)))
    assert not any(hasattr(module, RECORD_ATTRIBUTE) for module in student.modules())  # unbound after the context
    (loss, grads, layers), (bound_loss, bound_grads, bound_layers) = results
    assert layers == bound_layers == ["layers.0.self_attn", "layers.1.self_attn"]
    assert torch.equal(loss, bound_loss) and loss > 0
    for name, grad in grads.items():
        assert torch.equal(grad, bound_grads[name]), name
