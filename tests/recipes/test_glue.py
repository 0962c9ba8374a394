"""GLUE readers against independent references."""

import pytest

from recipes.common.glue import (
    TASKS,
    augmented_distillation_inputs,
    extra_distillation_inputs,
    get_task,
    read_glue_tsv,
)
from tests.conftest import GLUE_DIR, plain_normalized, requires_glue


def test_unknown_task_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="choose one of"):
        get_task("squad")
    assert get_task("SST-2") is TASKS["sst2"]


def test_every_task_reads_its_official_layout(tmp_path):
    rows = {
        "CoLA/dev.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n",
        "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming journey .\t1\n",
        "MRPC/dev.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b.\tA c.\n",
        "STS-B/dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA guy.\t4.2\n",
        "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\tWhy?\tHow?\t0\nbroken\n",
        "MNLI/dev_matched.tsv": "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t1\t1\tg\tx\tx\tx\tx\tP.\tH.\tneutral\tneutral\n",
        "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tQ?\tS.\tnot_entailment\n",
        "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n",
        "WNLI/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t1\n",
    }
    for relative, text in rows.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    expected = {
        "cola": ("sentence", 1),
        "sst2": ("sentence", 1),
        "mrpc": ("sentence1", 1),
        "stsb": ("sentence1", 4.2),
        "qqp": ("question1", 0),
        "mnli": ("premise", 1),
        "qnli": ("question", 1),
        "rte": ("sentence1", 0),
        "wnli": ("sentence1", 1),
    }
    for name, (field, label) in expected.items():
        task = get_task(name)
        examples = read_glue_tsv(tmp_path, task, task.eval_splits[0])
        assert len(examples) == 1 and examples[0]["label"] == label and examples[0][field]


@requires_glue
@pytest.mark.parametrize("name, dev_rows", [("sst2", 872), ("mrpc", 408), ("rte", 277), ("stsb", 1500)])
def test_shared_glue_files_have_the_official_dev_sizes(name, dev_rows):
    task = get_task(name)
    examples = read_glue_tsv(GLUE_DIR, task, "dev")
    assert len(examples) == dev_rows
    if task.labels is not None:
        assert {e["label"] for e in examples} == set(range(task.num_labels))


def test_missing_file_says_which_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="official GLUE layout"):
        read_glue_tsv(tmp_path, get_task("rte"), "dev")
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        read_glue_tsv(tmp_path, get_task("rte"), "dev", max_rows=0)


# the dev files the extra inputs are checked against (no shared sentence with the sources above)
HELD_OUT_FILES = {
    "STS-B/dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA guy.\t4.2\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tX.\tY.\tentailment\n",
}


def _write(root, files):
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, encoding="utf-8")


def test_extra_distillation_inputs_take_other_tasks_texts_under_the_tasks_field_names(tmp_path):
    files = {
        "MRPC/train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b.\tA c.\n0\t3\t4\tD e.\tF g.\n",
        "QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n0\tQ?\tS.\tnot_entailment\n",
        "SST-2/train.tsv": "sentence\tlabel\nfine .\t1\n",
        **HELD_OUT_FILES,
    }
    _write(tmp_path, files)
    stsb, rte = get_task("stsb"), get_task("rte")
    extra = extra_distillation_inputs(stsb, "mrpc, qnli", tmp_path)
    # in order, renamed to STS-B's fields, with a placeholder of STS-B's label type (regression: a float)
    assert extra == [
        {"sentence1": "A b.", "sentence2": "A c.", "label": 0.0},
        {"sentence1": "D e.", "sentence2": "F g.", "label": 0.0},
        {"sentence1": "Q?", "sentence2": "S.", "label": 0.0},
    ]
    assert all(type(e["label"]) is float for e in extra)
    extra = extra_distillation_inputs(rte, ["mrpc"], tmp_path, max_rows=1)
    assert extra == [{"sentence1": "A b.", "sentence2": "A c.", "label": 0}] and type(extra[0]["label"]) is int
    with pytest.raises(ValueError, match="the task itself"):
        extra_distillation_inputs(stsb, "mrpc,stsb", tmp_path)
    with pytest.raises(ValueError, match=r"repeat in \['mrpc', 'qnli', 'mrpc'\] \(\['mrpc'\]\): name each task once"):
        extra_distillation_inputs(stsb, "mrpc,qnli,mrpc", tmp_path)
    with pytest.raises(ValueError, match=r"\(\['mrpc'\]\): name each task once"):
        extra_distillation_inputs(stsb, "MRPC,mrpc", tmp_path)
    with pytest.raises(ValueError, match=r"1 text field\(s\).*Allowed sources: \['mnli', 'mrpc'"):
        extra_distillation_inputs(stsb, "sst2", tmp_path)
    with pytest.raises(ValueError, match="choose one of"):
        extra_distillation_inputs(stsb, "squad", tmp_path)


def test_extra_distillation_inputs_drop_what_shares_a_sentence_with_the_tasks_dev_or_test(tmp_path, caplog):
    # MRPC's training set holds STS-B dev and test sentences, spaced differently ("Mr So ." / "Mr. So.")
    files = {
        "MRPC/train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1\t2\tThe man , who ran .\tOther text .\n"  # first sentence: an STS-B dev sentence
        "0\t3\t4\tUnrelated one .\tUnrelated two .\n"
        "1\t5\t6\tSomething else .\tA TEST sentence !\n",  # second sentence: an STS-B test sentence
        "STS-B/dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tnews\tf\t2012\t1\tnone\tnone\tThe man, who ran.\tA guy.\t4.2\n",
        "STS-B/test.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n"
        "0\tnews\tf\t2012\t1\tnone\tnone\tSome other.\ta test sentence\n",
    }
    _write(tmp_path, files)
    stsb = get_task("stsb")
    with caplog.at_level("INFO", logger="recipes.common.glue"):
        extra = extra_distillation_inputs(stsb, "mrpc", tmp_path)
    assert extra == [{"sentence1": "Unrelated one .", "sentence2": "Unrelated two .", "label": 0.0}]
    assert "1 kept, 2 dropped" in caplog.text
    # without a test file, only the dev split is checked (with a warning); without a dev file, an error
    (tmp_path / "STS-B" / "test.tsv").unlink()
    with caplog.at_level("WARNING", logger="recipes.common.glue"):
        assert len(extra_distillation_inputs(stsb, "mrpc", tmp_path)) == 2
    assert "checked against the dev split only" in caplog.text
    (tmp_path / "STS-B" / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="checked against the task's dev sentences"):
        extra_distillation_inputs(stsb, "mrpc", tmp_path)


@requires_glue
@pytest.mark.parametrize("name, sources", [("stsb", "mrpc,rte"), ("mrpc", "stsb,rte")])
def test_extra_inputs_from_the_shared_glue_files_never_hold_a_dev_or_test_sentence(name, sources):
    task = get_task(name)
    held_out = set()
    for split in ("dev", "test"):
        with open(GLUE_DIR / task.folder / f"{split}.tsv", encoding="utf-8-sig") as file:
            header = file.readline().rstrip("\n").split("\t")
            columns = [
                header.index(c) for c in (("#1 String", "#2 String") if name == "mrpc" else ("sentence1", "sentence2"))
            ]
            for line in file:
                fields = line.rstrip("\n").split("\t")
                held_out.update(plain_normalized(fields[c]) for c in columns if c < len(fields))
    sources_rows = []
    for source in sources.split(","):
        source_task = get_task(source)
        sources_rows += [
            [r[f] for f in source_task.text_fields] for r in read_glue_tsv(GLUE_DIR, source_task, "train")
        ]
    shared = [texts for texts in sources_rows if any(plain_normalized(t) in held_out for t in texts)]
    extra = extra_distillation_inputs(task, sources, GLUE_DIR)
    assert len(shared) > 0  # the overlap is real: MRPC and STS-B share sentences
    assert len(extra) == len(sources_rows) - len(shared)
    assert not any(plain_normalized(e[f]) in held_out for e in extra for f in task.text_fields)


def test_augmented_distillation_inputs_swap_cross_and_drop_words():
    stsb, sst2 = get_task("stsb"), get_task("sst2")
    rows = [{"sentence1": f"a{i} b{i} c{i}", "sentence2": f"x{i} y{i}", "label": float(i)} for i in range(7)]
    copies = augmented_distillation_inputs(stsb, rows, "swap, cross,word_drop", seed=3)
    assert len(copies) == 3 * len(rows) and all(c["label"] == 0.0 and type(c["label"]) is float for c in copies)
    swap, cross, drop = copies[:7], copies[7:14], copies[14:]
    assert swap == [{"sentence1": r["sentence2"], "sentence2": r["sentence1"], "label": 0.0} for r in rows]
    # cross: first texts in place; the second texts are a permutation of the originals, none left with its own
    assert [c["sentence1"] for c in cross] == [r["sentence1"] for r in rows]
    partners = [int(c["sentence2"].split()[0][1:]) for c in cross]
    assert sorted(partners) == list(range(7)) and all(p != i for i, p in enumerate(partners))
    # word_drop: every text keeps its words in order, a non-empty subset of them
    for row, copy in zip(rows, drop):
        for field in ("sentence1", "sentence2"):
            words, kept = row[field].split(), copy[field].split()
            assert kept and all(w in words for w in kept)
            assert [words.index(w) for w in kept] == sorted(words.index(w) for w in kept)
    assert augmented_distillation_inputs(stsb, rows, "cross,word_drop", seed=3) == cross + drop  # seeded
    assert augmented_distillation_inputs(stsb, rows, "cross", seed=4) != cross
    many = [{"sentence": " ".join(f"w{j}" for j in range(40)), "label": 1}] * 50
    dropped = augmented_distillation_inputs(sst2, many, ["word_drop"], seed=0)
    share = sum(len(c["sentence"].split()) for c in dropped) / (40 * 50)
    assert 0.8 < share < 0.9 and dropped[0]["label"] == 0  # 15% dropped on average; classification placeholder 0
    with pytest.raises(ValueError, match=r"'swap' needs sentence pairs.*allowed: \['word_drop'\]"):
        augmented_distillation_inputs(sst2, many, "swap")
    with pytest.raises(ValueError, match=r"Unknown augmentation 'flip'; choose from \['cross', 'swap', 'word_drop'\]"):
        augmented_distillation_inputs(stsb, rows, "flip")
    with pytest.raises(ValueError, match="name each kind once"):
        augmented_distillation_inputs(stsb, rows, "swap,swap")
    with pytest.raises(ValueError, match="'cross' pairs each example with another one: it needs at least 2 examples"):
        augmented_distillation_inputs(stsb, rows[:1], "cross")
    # the other kinds take a single example
    assert augmented_distillation_inputs(stsb, rows[:1], "swap") == [
        {"sentence1": rows[0]["sentence2"], "sentence2": rows[0]["sentence1"], "label": 0.0}
    ]
