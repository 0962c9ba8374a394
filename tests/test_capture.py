"""The logit store: teacher (dense) and student logits per layer, and gradient checkpointing."""

import copy

import torch

import had_hf
from had_hf import HADCaptureStore, HADConfig
from had_hf.integration import use_dense_capture
from tests.conftest import build_model, model_inputs


def _bert_qk(model, inputs, layer):
    """Queries and keys of BERT layer `layer`, recomputed from the hidden states (B, H, q, d)."""
    with torch.no_grad():
        hidden = model.bert(**inputs, output_hidden_states=True).hidden_states[layer]
    attn = model.bert.encoder.layer[layer].attention.self
    heads = model.config.num_attention_heads

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    return split(attn.query(hidden)), split(attn.key(hidden))


def test_teacher_store_holds_scaled_dense_logits_and_valid_mask():
    teacher = use_dense_capture(build_model("bert"))
    inputs = model_inputs("bert")
    store = HADCaptureStore()
    with torch.no_grad():
        teacher(**inputs, had_store=store)
    names = sorted(store.logits)
    assert names == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    query, key = _bert_qk(teacher, inputs, 1)
    expected = query @ key.transpose(-1, -2) / 8**0.5
    torch.testing.assert_close(store.logits[names[1]], expected, atol=1e-5, rtol=1e-5)
    valid = store.valid[names[1]]
    assert valid.dtype == torch.bool
    assert valid[1, 0, 0].tolist() == inputs["attention_mask"][1].bool().tolist()


def test_student_store_holds_stage_transformed_logits():
    teacher = use_dense_capture(build_model("bert"))
    student = had_hf.convert(copy.deepcopy(build_model("bert")), HADConfig(top_n=3))
    inputs = model_inputs("bert")
    store = HADCaptureStore()
    with torch.no_grad():
        student(**inputs, had_store=store)
    query, key = _bert_qk(teacher, inputs, 0)
    sign = lambda x: torch.where(x >= 0, 1.0, -1.0)  # noqa: E731
    expected = sign(query) @ sign(key).transpose(-1, -2) / 8**0.5
    torch.testing.assert_close(store.logits["encoder.layer.0.attention.self"], expected)


def test_gradient_checkpointing_neither_duplicates_entries_nor_changes_gradients():
    inputs = model_inputs("bert")

    def attention_loss_grads(checkpointing: bool):
        model = had_hf.convert(build_model("bert", seed=3), HADConfig(top_n=3)).train()
        had_hf.set_stage(model, "sign", c=0.5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        store = HADCaptureStore()
        records = []
        original = store.record_logits

        def counting(name, logits, valid):
            records.append(name)
            original(name, logits, valid)

        store.record_logits = counting
        model(**inputs, had_store=store)
        loss = sum(logits.square().mean() for logits in store.logits.values())
        loss.backward()
        return (
            len(store.logits),
            records,
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    entries_plain, records_plain, grads_plain = attention_loss_grads(False)
    entries_ckpt, records_ckpt, grads_ckpt = attention_loss_grads(True)
    assert entries_plain == entries_ckpt == 2
    assert len(records_ckpt) > len(records_plain)  # the layers really ran twice under checkpointing
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5)
