"""The distillation in the compile modes that run in CUDA graphs (`torch_compile_mode` "reduce-overhead" and
"max-autotune"): the teacher's outputs are copied out of its graph's memory before the student's graph runs, and the
evaluation's logits before the next batch's. On the CPU the copies are checked with dynamo alone (which ignores the
mode, so the losses must equal the eager run's); on a GPU the losses of a run in CUDA graphs are compared with those
of the same run compiled without graphs."""

import pytest
import torch

from had_hf import HADCaptureStore, HADTrainingArguments
from had_hf.capture import DenseScores
from tests.test_compile import (
    TOLERANCES,
    _assert_same_llama_losses,
    _fresh_dynamo,
    _llama_trainer,
    _losses,
    _trainer,
)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_the_cuda_graph_compile_modes_are_accepted(mode):
    args = HADTrainingArguments(output_dir="x", torch_compile_mode=mode, report_to="none")
    assert args.torch_compile and args.torch_compile_mode == mode


def test_copied_scores_equal_the_recorded_ones_in_memory_of_their_own():
    store = HADCaptureStore(capture_logits=False, capture_scores=True)
    query, key, bias = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(1, 4, 5, 5)
    store.record("a").scores = DenseScores(query, key, 0.125, bias)
    store.record("b").scores = DenseScores(query, key, 0.5, None)
    store.record("c")  # a layer that recorded no scores
    recorded = store.scores
    store.copy_scores()
    assert list(store.scores) == ["a", "b"]
    for name, scores in store.scores.items():
        before = recorded[name]
        assert scores.scaling == before.scaling
        for copied, original in [(scores.query, query), (scores.key, key)]:
            assert torch.equal(copied, original) and copied.data_ptr() != original.data_ptr()
    assert torch.equal(store.scores["a"].position_bias, bias)
    assert store.scores["a"].position_bias.data_ptr() != bias.data_ptr()
    assert store.scores["b"].position_bias is None


def test_copies_into_kept_buffers_keep_their_address_until_they_need_more_room():
    """...and the strides that `clone` gives (the source's where they are dense: kernels reading the copy round as they
    would read the source; a contiguous copy of a transposed query changed the attention KL's last bits on the CPU)."""
    buffers = {}
    addresses = []
    for length in [6, 4, 6, 9, 5]:
        store = HADCaptureStore(capture_logits=False, capture_scores=True)
        query = torch.randn(2, length, 4, 8).transpose(1, 2)  # not contiguous, as a query after its head split
        key = torch.randn(2, 2, length, 16)[..., ::2]  # not dense: its clone is contiguous
        bias = torch.randn(1, 4, length, length)
        store.record("a").scores = DenseScores(query, key, 0.125, bias)
        store.copy_scores(buffers)
        copied = store.scores["a"]
        for copy, original in [(copied.query, query), (copied.key, key), (copied.position_bias, bias)]:
            assert torch.equal(copy, original) and copy.data_ptr() != original.data_ptr()
            assert copy.stride() == original.clone().stride()
        assert not copied.query.is_contiguous() and copied.key.is_contiguous()
        addresses.append((copied.query.data_ptr(), copied.key.data_ptr(), copied.position_bias.data_ptr()))
    assert sorted(buffers) == [("a", "key"), ("a", "position_bias"), ("a", "query")]
    assert addresses[0] == addresses[1] == addresses[2]  # 4 and 6 fit the room the first 6 made
    assert addresses[3] == addresses[4]  # 9 needed a larger buffer, which 5 then reuses
    assert buffers["a", "query"].numel() == 2 * 4 * 9 * 8
    store = HADCaptureStore(capture_logits=False, capture_scores=True)
    store.record("a").scores = DenseScores(*(t.half() for t in (query, key)), 0.125, None)
    store.copy_scores(buffers)  # another dtype: a buffer of its own
    assert store.scores["a"].query.dtype == torch.half == buffers["a", "query"].dtype


def _run_counting_copies(trainer, monkeypatch):
    """Trains (and evaluates) `trainer`; the number of `copy_scores` calls. At each call, the copies keep the address
    of the last step's (CUDA graphs replay only while their static inputs do) unless they need more room."""
    copies = []
    copy_scores = HADCaptureStore.copy_scores

    def copy_and_check(self, buffers=None):
        copy_scores(self, buffers)
        copied = {(name, "query"): scores.query for name, scores in self.scores.items()}
        copied.update({(name, "key"): scores.key for name, scores in self.scores.items()})
        if copies:
            for key, tensor in copied.items():
                before = copies[-1][key]
                if tensor.numel() <= before["room"]:
                    assert tensor.data_ptr() == before["address"], key
        copies.append(
            {
                key: {
                    "address": tensor.data_ptr(),
                    "room": max(tensor.numel(), copies[-1][key]["room"] if copies else 0),
                }
                for key, tensor in copied.items()
            }
        )

    monkeypatch.setattr(HADCaptureStore, "copy_scores", copy_and_check)
    _fresh_dynamo()
    trainer.train()
    if trainer.eval_dataset is not None:  # no copies of the teacher's scores: the evaluation runs the student alone
        trainer.evaluate()
    _fresh_dynamo()
    return len(copies)


def test_a_cuda_graph_mode_copies_the_teachers_outputs_at_every_step_and_changes_no_loss(tmp_path, monkeypatch):
    """With dynamo alone (the mode is ignored on the CPU), the run with the copies gives the eager run's losses; the
    teacher's scores are copied once per training step, and not at all in a run compiled without CUDA graphs."""
    eager = _trainer(tmp_path / "eager")
    eager.train()
    graphs = _trainer(tmp_path / "graphs", compile_backend="eager", torch_compile_mode="reduce-overhead")
    assert graphs.runs_in_cuda_graphs and not eager.runs_in_cuda_graphs
    assert _run_counting_copies(graphs, monkeypatch) == graphs.state.global_step == 16
    for (stage, eager_out, eager_attn), (_, out, attn) in zip(_losses(eager), _losses(graphs), strict=True):
        assert out == pytest.approx(eager_out, rel=TOLERANCES["eager"]), stage
        assert attn == pytest.approx(eager_attn, rel=TOLERANCES["eager"]), stage
    plain = _trainer(tmp_path / "plain", compile_backend="eager")
    assert not plain.runs_in_cuda_graphs and _run_counting_copies(plain, monkeypatch) == 0


def test_the_causal_lm_distillation_in_a_cuda_graph_mode_copies_at_every_step_and_changes_no_loss(
    tmp_path, monkeypatch
):
    """The causal-LM recipe's trainer (grouped-query keys, rotary positions), dynamo alone: the same copies and the
    eager run's losses."""
    eager = _llama_trainer(tmp_path / "eager")
    eager.train()
    graphs = _llama_trainer(tmp_path / "graphs", "eager", torch_compile_mode="reduce-overhead")
    assert _run_counting_copies(graphs, monkeypatch) == graphs.state.global_step == 16
    _assert_same_llama_losses(eager, graphs, TOLERANCES["eager"])


@pytest.mark.gpu
def test_distillation_in_cuda_graphs_matches_the_compiled_run_on_the_gpu(tmp_path):
    """On a GPU, inductor in CUDA graphs ("reduce-overhead") through the four stages and an evaluation: no output of a
    graph is read after a later run reused its memory, and the losses are those of inductor without graphs (the same
    kernels, replayed). The students' embeddings are frozen: their backward adds many rows into the same few (every
    position's token type is 0) with atomic adds, whose order changes the last bits from run to run, and the near-sign
    tanh of stage 2 (slope 1/c, ~20 at its end) grows those into percents within a few steps."""
    runs = {}
    for mode in ["default", "reduce-overhead"]:
        _fresh_dynamo()
        trainer = _trainer(tmp_path / mode, compile_backend="inductor", torch_compile_mode=mode, use_cpu=False)
        trainer.model.bert.embeddings.requires_grad_(False)
        trainer.train()
        runs[mode] = (trainer, trainer.evaluate())
    _fresh_dynamo()
    (compiled, _), (graphs, metrics) = runs["default"], runs["reduce-overhead"]
    assert graphs.runs_in_cuda_graphs and not compiled.runs_in_cuda_graphs
    assert next(graphs.model.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values() if isinstance(value, float))
    for (stage, compiled_out, compiled_attn), (_, out, attn) in zip(_losses(compiled), _losses(graphs), strict=True):
        assert out == pytest.approx(compiled_out, rel=1e-3), stage
        assert attn == pytest.approx(compiled_attn, rel=1e-3), stage
