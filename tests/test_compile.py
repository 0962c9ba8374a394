"""The distillation under `torch.compile` (`TrainingArguments(torch_compile=True)`): the compiled trainer's losses
equal the eager trainer's in every stage, a run through the four stages compiles a bounded number of graphs with no
graph break, and what keeps it so (c as a tensor, the chunked KL over changing lengths, the losses' sums on one side of
inductor's CPU threshold, the run's own compile settings, one teacher graph, an uncompiled teacher evaluation, no
per-step read of the losses)."""

import argparse
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import had_hf
from had_hf import HADCaptureStore, HADConfig, HADDistillationTrainer
from had_hf.compilation import mark_shapes_dynamic
from had_hf.losses import attention_kl_terms, chunked_attention_kl_terms, output_kl
from had_hf.state import TRAINING_STAGES
from tests.conftest import build_model, model_inputs, tiny_bert_config
from tests.test_trainer import TinyDataset, _args


class VariableLengthDataset(torch.utils.data.Dataset):
    """Examples of 5 to 12 tokens, so that batches padded to their longest change length (as the recipes' are)."""

    def __init__(self, size=48, seed=0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(5, 13, (size,), generator=generator).tolist()
        self.ids = [torch.randint(3, 99, (length,), generator=generator) for length in lengths]
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Eager and compiled runs compared on one CPU thread: split over threads, a reduction may sum in another order
    where dynamo hands a tensor of another layout, and the sign stages amplify a last-bit difference in the weights
    into another binary code within a few steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pad_to_longest(examples):
    length = max(len(example["input_ids"]) for example in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = example["input_ids"]
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([e["labels"] for e in examples])}


def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    """The graphs dynamo compiled since the last `_fresh_dynamo`."""
    return counters["stats"]["unique_graphs"]


def _bert(seed):
    """A tiny BERT whose weights are large enough for logits, and so losses, well above float rounding."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(initializer_range=0.2))
    model.set_attn_implementation("eager")
    return model.eval()


def _trainer(tmp_path, compile_backend=None, **overrides):
    """A tiny BERT distilled over 16 steps (stages of 2, 4, 5 and 5 steps) from a teacher of other weights, on
    batches of changing length."""
    compile_args = {"torch_compile": True, "torch_compile_backend": compile_backend} if compile_backend else {}
    return HADDistillationTrainer(
        model=_bert(seed=1),
        teacher_model=_bert(seed=0),
        args=_args(tmp_path, **compile_args, **overrides),
        had_config=HADConfig(top_n=3),
        train_dataset=VariableLengthDataset(),
        eval_dataset=VariableLengthDataset(size=8, seed=1),
        data_collator=pad_to_longest,
    )


def _losses(trainer):
    return [(e["stage"], e["loss_out"], e["loss_attn"]) for e in trainer.state.log_history if "loss_out" in e]


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    trainer = _trainer(tmp_path_factory.mktemp("eager"))
    trainer.train()
    return trainer


# the relative tolerance of each backend's losses. Dynamo alone runs the eager kernels on the same inputs (c is the
# same float32 tensor in both, so `c * sigma` rounds alike: a last-bit difference there flips near-ties of the sign
# stage's top N and the losses drift by about a percent); inductor fuses the float math, and once c is small the
# transformed logits have near-ties that it can order differently, so a few top-N selections differ and the weights
# drift apart by about a percent
TOLERANCES = {"eager": 1e-4, "inductor": 5e-2}


@pytest.fixture(scope="module", params=["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compiled_run(request, tmp_path_factory):
    """The run compiled with dynamo alone (`eager` backend: the graphs, guards and recompilations) or with inductor,
    with its dynamo counters: graphs, graph breaks, and the graphs after the teacher's evaluation."""
    _fresh_dynamo()
    trainer = _trainer(tmp_path_factory.mktemp(request.param), compile_backend=request.param)
    trainer.train()
    graphs, breaks = _graphs(), dict(counters["graph_break"])
    trainer.evaluate_teacher()
    graphs_after_teacher_evaluation = _graphs()
    _fresh_dynamo()
    return trainer, graphs, breaks, graphs_after_teacher_evaluation


def test_compiled_trainer_matches_the_eager_one_in_every_stage(eager_run, compiled_run):
    eager, (compiled, *_) = eager_run, compiled_run
    tolerance = TOLERANCES[compiled.args.torch_compile_backend]
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    assert type(compiled.teacher).__name__ == "OptimizedModule"
    eager_losses, compiled_losses = _losses(eager), _losses(compiled)
    assert [stage for stage, *_ in eager_losses] == [1] * 2 + [2] * 4 + [3] * 5 + [4] * 5
    assert [stage for stage, *_ in compiled_losses] == [stage for stage, *_ in eager_losses]
    assert all(attn > 0.1 for stage, _, attn in eager_losses if stage <= 3)  # well above float rounding
    for (stage, eager_out, eager_attn), (_, compiled_out, compiled_attn) in zip(eager_losses, compiled_losses):
        assert compiled_out == pytest.approx(eager_out, rel=tolerance), stage
        assert compiled_attn == pytest.approx(eager_attn, rel=tolerance), stage
    compiled_weights = compiled.accelerator.unwrap_model(compiled.model).state_dict()
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=tolerance, atol=tolerance / 10)


def test_a_run_compiled_with_dynamic_shapes_from_the_start_traces_each_graph_once(eager_run, tmp_path, monkeypatch):
    """`dynamic=True` (Accelerate's `ACCELERATE_DYNAMO_USE_DYNAMIC=1`): every graph is traced with a dynamic length
    at once, so the run compiles exactly one graph for the teacher and one per stage, with the eager run's losses;
    the STE stage's symbolic clip stays outside its autograd function's traced graphs (dynamo cannot lift it there)."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_DYNAMIC", "1")
    _fresh_dynamo()
    trainer = _trainer(tmp_path, compile_backend="eager")
    trainer.train()
    graphs, breaks = _graphs(), dict(counters["graph_break"])
    _fresh_dynamo()
    assert trainer.accelerator.state.dynamo_plugin.dynamic is True
    assert graphs == len(TRAINING_STAGES) + 1 and breaks == {}
    for (stage, eager_out, eager_attn), (_, out, attn) in zip(_losses(eager_run), _losses(trainer), strict=True):
        assert out == pytest.approx(eager_out, rel=TOLERANCES["eager"]), stage
        assert attn == pytest.approx(eager_attn, rel=TOLERANCES["eager"]), stage


def test_a_compiled_run_through_the_four_stages_compiles_one_graph_per_stage_and_one_for_the_teacher(compiled_run):
    """c changes at every step of stages 1-2 and the batch length at almost every step: with the batch and token
    dimensions traced as dynamic from the first step (`compile_dynamic_lengths`, the default), the run compiles one
    graph per stage for the student and one for the teacher, and none for the teacher's evaluation (uncompiled)."""
    _, graphs, breaks, graphs_after_teacher_evaluation = compiled_run
    assert graphs == len(TRAINING_STAGES) + 1
    assert breaks == {}
    assert graphs_after_teacher_evaluation == graphs


def test_without_dynamic_lengths_the_first_graphs_are_traced_again_when_the_length_first_changes(eager_run, tmp_path):
    """`compile_dynamic_lengths=False` (for data of one length): the teacher's graph and the first stage's are traced
    for the first batch's length, then again with a dynamic length at the first batch of another: two graphs more,
    with the same losses."""
    _fresh_dynamo()
    trainer = _trainer(tmp_path, compile_backend="eager", compile_dynamic_lengths=False)
    trainer.train()
    graphs, breaks = _graphs(), dict(counters["graph_break"])
    _fresh_dynamo()
    assert graphs == len(TRAINING_STAGES) + 1 + 2 and breaks == {}
    for (stage, eager_out, eager_attn), (_, out, attn) in zip(_losses(eager_run), _losses(trainer), strict=True):
        assert out == pytest.approx(eager_out, rel=TOLERANCES["eager"]), stage
        assert attn == pytest.approx(eager_attn, rel=TOLERANCES["eager"]), stage


def test_inputs_are_marked_dynamic_in_their_batch_dimension_and_token_dimension():
    inputs = {
        "input_ids": torch.ones(4, 9, dtype=torch.long),
        "labels": torch.ones(4),
        "pixels": torch.ones(4, 3, 8, 8),
    }
    mark_shapes_dynamic(inputs)
    assert inputs["input_ids"]._dynamo_weak_dynamic_indices == {0, 1}
    assert inputs["labels"]._dynamo_weak_dynamic_indices == {0}
    assert inputs["pixels"]._dynamo_weak_dynamic_indices == {0}  # an image's channels and sides stay static
    fixed = {"input_ids": torch.ones(4, 9, dtype=torch.long)}
    mark_shapes_dynamic(fixed, lengths=False)
    assert fixed["input_ids"]._dynamo_weak_dynamic_indices == {0}


def _llama_trainer(tmp_path, compile_backend=None, layers=2, regional=False, **overrides):
    """The causal-LM recipe's trainer (`recipes.common.lm_distillation`: the student a HAD copy of the teacher, N =
    ceil(0.3 x keys)) on a tiny random Llama with grouped-query attention and `layers` layers, over 16 steps of 2
    windows of 24 tokens (padded at the end in one window), distilled from itself as the recipe's student is; with
    `regional`, compiled layer by layer (`use_regional_compilation`); `overrides` go to the training arguments."""
    from recipes.common import lm_distillation
    from recipes.common.tiny_llama import tiny_llama

    teacher = tiny_llama(initializer_range=0.2, seed=0, num_hidden_layers=layers)
    generator = torch.Generator().manual_seed(0)
    windows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in
               torch.randint(3, 99, (32, 24), generator=generator)]  # fmt: skip
    windows[5]["attention_mask"][18:] = 0
    compile_args = {"torch_compile": True, "torch_compile_backend": compile_backend} if compile_backend else {}
    if regional:
        compile_args["use_regional_compilation"] = True
    args = _args(tmp_path, per_device_train_batch_size=2, calibration_batch_size=2, **compile_args, **overrides)
    student, teacher_model, _ = lm_distillation.build_student(
        teacher, HADConfig(top_n_ratio=0.3), argparse.Namespace(use_peft=False)
    )
    return lm_distillation.build_trainer(student, teacher_model, args, windows, [], None)


@pytest.fixture(scope="module")
def eager_llama_run(tmp_path_factory):
    trainer = _llama_trainer(tmp_path_factory.mktemp("llama_eager"))
    trainer.train()
    return trainer


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_causal_lm_distillation_matches_the_eager_one_without_graph_breaks(
    eager_llama_run, backend, tmp_path
):
    """The causal-LM recipe's distillation (rotary positions, causal mask, grouped-query attention, the ratio rule of
    N, the logits KL over the vocabulary) compiled: the same losses in every stage, one graph per stage and one for the
    teacher, no graph break."""
    _fresh_dynamo()
    compiled = _llama_trainer(tmp_path, compile_backend=backend)
    compiled.train()
    graphs, breaks = _graphs(), dict(counters["graph_break"])
    _fresh_dynamo()
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    assert breaks == {} and graphs <= len(TRAINING_STAGES) + 1
    _assert_same_llama_losses(eager_llama_run, compiled, TOLERANCES[backend])


def _assert_same_llama_losses(eager, compiled, tolerance):
    eager_losses, compiled_losses = _losses(eager), _losses(compiled)
    assert (
        [stage for stage, *_ in compiled_losses]
        == [stage for stage, *_ in eager_losses]
        == [1] * 2 + [2] * 4 + [3] * 5 + [4] * 5
    )
    assert all(attn > 1e-3 for stage, _, attn in eager_losses if stage <= 3)  # well above float rounding
    for (stage, eager_out, eager_attn), (_, compiled_out, compiled_attn) in zip(eager_losses, compiled_losses):
        assert compiled_out == pytest.approx(eager_out, rel=tolerance), stage
        assert compiled_attn == pytest.approx(eager_attn, rel=tolerance, abs=1e-9), stage


@pytest.fixture(scope="module")
def regional_llama_runs(tmp_path_factory):
    """The causal-LM distillation compiled regionally (dynamo alone) with 2 and with 4 layers: per number of layers,
    the trainer, its graphs and its graph breaks."""
    runs = {}
    for layers in (2, 4):
        _fresh_dynamo()
        trainer = _llama_trainer(tmp_path_factory.mktemp(f"regional{layers}"), "eager", layers, regional=True)
        trainer.train()
        runs[layers] = trainer, _graphs(), dict(counters["graph_break"])
    _fresh_dynamo()
    return runs


def test_regionally_compiled_causal_lm_distillation_matches_the_eager_one(eager_llama_run, regional_llama_runs):
    """Each decoder layer compiled on its own (`use_regional_compilation`): the same losses as eager in every stage."""
    compiled, _, breaks = regional_llama_runs[2]
    assert [type(layer).__name__ for layer in compiled.model_wrapped.model.layers] == ["OptimizedModule"] * 2
    assert [type(layer).__name__ for layer in compiled.model.model.layers] == ["LlamaDecoderLayer"] * 2  # saved as is
    assert type(compiled.teacher.model.layers[0]).__name__ == "OptimizedModule"
    assert breaks == {}
    _assert_same_llama_losses(eager_llama_run, compiled, TOLERANCES["eager"])


def test_regional_compilation_compiles_as_many_graphs_for_any_number_of_layers(regional_llama_runs):
    """All the decoder layers of a model share their graphs: a run through the four stages compiles as many graphs
    with 4 layers as with 2 (a layer's name, sigmas or records in the graph would add graphs for every layer), no
    more than one per stage and compiled region (the student's layers, embedding, norm, rotary embedding and head,
    the teacher's the same) with room for a retrace, and no graph break."""
    (_, graphs_2, breaks_2), (_, graphs_4, breaks_4) = regional_llama_runs[2], regional_llama_runs[4]
    assert graphs_4 == graphs_2
    assert graphs_2 <= 2 * 5 * (len(TRAINING_STAGES) + 1)
    assert breaks_2 == breaks_4 == {}


@pytest.mark.parametrize("per_head", [False, True])
def test_decoder_layers_compiled_one_by_one_share_their_graphs(per_head):
    """Each decoder layer of a 3-layer Llama compiled on its own (`nn.Module.compile`), every layer with other sigmas
    (one per layer, or one per head): with the stores bound to the modules, the layers of a model share one graph per
    stage (the teacher's one, the student's one per transform), and the KL and its gradients are the eager ones."""
    from recipes.common.tiny_llama import tiny_llama

    teacher = had_hf.integration.use_dense_capture(tiny_llama(initializer_range=0.2, num_hidden_layers=3))
    student = had_hf.convert(copy.deepcopy(teacher), HADConfig(top_n_ratio=0.3)).train()
    config = student.config.quantization_config
    names = [module._had_name for module in student.modules() if getattr(module, "_had_name", None)]
    assert len(names) == 3
    config.sigma_q = {
        name: [0.5 + i + 0.1 * h for h in range(4)] if per_head else 0.5 + i for i, name in enumerate(names)
    }
    config.sigma_k = {name: [1.5 - 0.2 * i, 0.7 + i] if per_head else 1.5 - 0.2 * i for i, name in enumerate(names)}
    inputs = {**model_inputs("llama", length=12), "use_cache": False}
    inputs["input_ids"] = inputs["input_ids"] % student.config.vocab_size

    def kl_and_gradient(stage, c):
        had_hf.set_stage(student, stage, c=c)
        teacher_store = HADCaptureStore(capture_logits=False, capture_scores=True)
        student_store = HADCaptureStore(capture_logits=False, distill_from=teacher_store)
        with torch.no_grad(), teacher_store.bound(teacher):
            teacher(**inputs, had_store=teacher_store)
        with student_store.bound(student):
            student(**inputs, had_store=student_store)
        kl = student_store.attention_kl()
        kl.backward()
        gradient = student.model.layers[2].self_attn.q_proj.weight.grad.clone()
        student.zero_grad(set_to_none=True)
        return kl.detach(), gradient

    steps = [("tanh", 3.0), ("tanh", 1.5), ("sign", 0.5), ("ste", 1.0)]
    eager = [kl_and_gradient(*step) for step in steps]
    for layer in (*teacher.model.layers, *student.model.layers):
        layer.compile(backend="eager")
    _fresh_dynamo()
    compiled = [kl_and_gradient(*step) for step in steps]
    graphs, breaks = _graphs(), dict(counters["graph_break"])
    _fresh_dynamo()
    assert graphs == 1 + 3 and breaks == {}  # the teacher's, and one per stage for all 3 student layers
    for step, (eager_kl, eager_gradient), (kl, gradient) in zip(steps, eager, compiled):
        assert eager_kl > 1e-3
        torch.testing.assert_close(kl, eager_kl, rtol=1e-5, atol=0, msg=str(step))
        torch.testing.assert_close(gradient, eager_gradient, rtol=1e-4, atol=1e-6, msg=str(step))


@pytest.mark.parametrize("stage", ["tanh", "sign"])
def test_c_changes_without_recompiling(stage):
    base = build_model("bert", seed=0)
    student = had_hf.convert(copy.deepcopy(base), HADConfig(top_n=3)).train()
    inputs = model_inputs("bert")
    compiled = torch.compile(student, backend="eager", fullgraph=True)
    _fresh_dynamo()
    for c in (5.0, 3.1, 0.7):
        had_hf.set_stage(student, stage, c=c)
        expected = student(**inputs).logits
        torch.testing.assert_close(compiled(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
    assert _graphs() == 1
    _fresh_dynamo()


def test_chunked_kl_compiles_once_for_every_length():
    """The chunk loop guards on the number of chunks, not on the sequence length (a length-specialized loop would
    recompile for every length)."""

    def kl(teacher, student, valid):
        length = teacher.shape[-2]
        return chunked_attention_kl_terms(
            lambda rows: teacher[..., rows, :], lambda rows: student[..., rows, :], valid, length
        )

    compiled = torch.compile(kl, backend="eager", dynamic=True, fullgraph=True)
    _fresh_dynamo()
    generator = torch.Generator().manual_seed(0)
    for length in (7, 10, 13):
        teacher, student = torch.randn(2, 2, 2, length, length, generator=generator).unbind(0)
        valid = torch.rand(2, 1, 1, length, generator=generator) > 0.2
        total, count = compiled(teacher, student, valid)
        expected_total, expected_count = attention_kl_terms(teacher, student, valid)
        torch.testing.assert_close(total, expected_total)
        assert int(count) == int(expected_count)
    assert _graphs() == 1
    _fresh_dynamo()


def test_attention_kl_compiles_once_for_sizes_on_either_side_of_inductors_cpu_sum_threshold():
    """Inductor's CPU code guards the length of each float sum against 4,096: the KL sums stay below it for batches
    of any length (batch x heads x rows crosses it here), so changing lengths do not recompile it."""
    compiled = torch.compile(attention_kl_terms, dynamic=True, fullgraph=True)
    _fresh_dynamo()
    generator = torch.Generator().manual_seed(0)
    for batch, length in ((2, 16), (8, 200), (2, 24)):  # 4 heads: 128, 6,400 and 192 query rows in all
        teacher = torch.randn(batch, 4, length, length, generator=generator)
        student = torch.randn(batch, 4, length, length, generator=generator, requires_grad=True)
        valid = torch.rand(batch, 1, 1, length, generator=generator) > 0.2
        query_mask = torch.rand(batch, length, generator=generator) > 0.1
        total, count = compiled(teacher, student, valid, query_mask)
        (gradient,) = torch.autograd.grad(total, student)
        expected_total, expected_count = attention_kl_terms(teacher, student, valid, query_mask)
        (expected_gradient,) = torch.autograd.grad(expected_total, student)
        torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)
        assert int(count) == int(expected_count)
    assert _graphs() == 1
    _fresh_dynamo()


def test_token_level_output_kl_compiles_once_for_sizes_on_either_side_of_inductors_cpu_sum_threshold():
    """The same for the output KL over a batch's tokens (seq2seq and token-level heads): batch x tokens crosses 4,096
    here."""
    compiled = torch.compile(output_kl, dynamic=True, fullgraph=True)
    _fresh_dynamo()
    generator = torch.Generator().manual_seed(0)
    for batch, length in ((2, 16), (40, 200), (2, 24)):  # 32, 8,000 and 48 tokens in all
        teacher = torch.randn(batch, length, 5, generator=generator)
        student = torch.randn(batch, length, 5, generator=generator, requires_grad=True)
        mask = torch.rand(batch, length, generator=generator) > 0.1
        loss = compiled(teacher, student, mask)
        (gradient,) = torch.autograd.grad(loss, student)
        expected = output_kl(teacher, student, mask)
        (expected_gradient,) = torch.autograd.grad(expected, student)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-7)
    assert _graphs() == 1
    _fresh_dynamo()


def test_torch_compile_applies_after_another_trainer_was_created(tmp_path):
    """A recipe fine-tunes its teacher with a plain Trainer after the distillation's arguments were parsed: the
    distillation still compiles, from its own arguments."""
    args = _args(tmp_path / "had", max_steps=4, torch_compile=True, torch_compile_backend="eager")
    Trainer(model=build_model("bert"), args=TrainingArguments(output_dir=str(tmp_path / "teacher"), use_cpu=True))
    trainer = HADDistillationTrainer(
        model=build_model("bert", seed=0),
        teacher_model=build_model("bert", seed=0),
        args=args,
        had_config=HADConfig(top_n=3),
        train_dataset=TinyDataset(),
    )
    _fresh_dynamo()
    trainer.train()
    assert _graphs() >= 2  # teacher and student
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    _fresh_dynamo()


def test_computing_the_loss_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """The per-step losses are logged from device tensors: a read (`.item()`) at every step would make the host wait
    for the device before the backward pass."""
    trainer = _trainer(tmp_path)
    had_hf.set_stage(trainer.model, "sign", c=0.5)
    trainer.model.train()
    batch = pad_to_longest([trainer.train_dataset[i] for i in range(4)])
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))
    loss = trainer.compute_loss(trainer.model, batch)
    assert reads == [] and loss.requires_grad
    monkeypatch.undo()
    expected = {name: float(values[0]) for name, values in trainer._had_metrics.items()}
    assert expected["loss_attn"] > 0
    assert float(loss.detach()) == pytest.approx(expected["loss_out"] + expected["loss_attn"])
    logs = {}
    trainer.log(logs)
    assert logs["loss_out"] == pytest.approx(expected["loss_out"])
    assert logs["loss_attn"] == pytest.approx(expected["loss_attn"])
