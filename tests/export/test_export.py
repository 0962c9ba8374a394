"""The exporter: ONNX parity, golden bits against the model's own selection, bad inputs, and both command lines."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import had_hf
from had_hf import HADCaptureStore, HADConfig
from had_hf.export import HADExportError, OnnxValidationError, export_config, export_had, load_golden
from had_hf.export import exporter as exporter_module
from had_hf.export.cam import CoefficientError
from had_hf.export.onnx import export_onnx, validate_onnx
from tests.conftest import VOCAB, build_model, model_inputs

requires_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime (the `export` extra)"
)
pytestmark = requires_onnxruntime

REPO_ROOT = Path(__file__).resolve().parents[2]
TOP_N = 5  # of 16 tokens (17 for the ViT): ties at the N-th Hamming score are frequent with head_dim 8


def had_model(family: str, top_n: int = TOP_N, calibrate: bool = True, seed: int = 0):
    model = had_hf.convert(build_model(family, seed=seed), HADConfig(top_n=top_n))
    if calibrate:
        had_hf.calibrate(model, [model_inputs(family, batch=4, length=16)], num_batches=1)
    return model


@pytest.fixture(scope="module", params=["bert", "vit"])
def exported(request, tmp_path_factory):
    """(family, in-memory HAD model, export folder, ExportResult) of a tiny calibrated model."""
    model = had_model(request.param)
    output_dir = tmp_path_factory.mktemp(f"export_{request.param}") / "bundle"
    result = export_had(model, output_dir, samples=3, context_length=16)
    return request.param, model, output_dir, result


def tiny_bert_tokenizer():
    """A WordPiece tokenizer over the tiny models' vocabulary: special tokens, then the words w0, w1, ..."""
    import transformers

    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    vocab.update({f"w{index}": len(vocab) for index in range(VOCAB - len(vocab))})
    return transformers.BertTokenizer(vocab=vocab)


def _onnx_session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- bundle and ONNX


def test_bundle_files_and_reload_as_had(exported):
    family, model, output_dir, result = exported
    expected = {"config.json", "model.safetensors", "model.onnx", "had_export.json", "cam_report.json"}
    expected |= {"cam_report.md", "cam_report.png", "golden/golden.safetensors", "golden/manifest.json"}
    assert expected <= set(result.files)
    assert not [p for p in output_dir.parent.iterdir() if p.name.startswith(".")]  # no staging folder left over

    import transformers

    reloaded = getattr(transformers, type(model).__name__).from_pretrained(output_dir).eval()
    assert reloaded.config._attn_implementation == "hamming_topk"
    assert reloaded.config.quantization_config.sigma_q == model.config.quantization_config.sigma_q
    golden = load_golden(output_dir)
    first = {name: torch.from_numpy(value[:1]) for name, value in golden.inputs.items()}
    with torch.no_grad():
        logits = reloaded(**first).logits
    np.testing.assert_allclose(logits.numpy()[0], golden.outputs["logits"][0], atol=1e-6)


def test_onnx_matches_pytorch_on_new_shapes(exported):
    family, model, output_dir, result = exported
    assert result.onnx_max_abs_diff < 1e-5
    validation = result.manifest["onnx"]["validation"]
    assert validation["draws"] == 1 and validation["full_length_samples_max_abs_diff"] < 1e-5
    session = _onnx_session(output_dir / "model.onnx")
    # shapes never seen in the export: one row, and (text) a length below N, so that rows keep fewer than N keys
    shapes = [(1, 16), (4, 3)] if family == "bert" else [(1, None), (5, None)]
    for batch, length in shapes:
        inputs = model_inputs(family, batch=batch, length=length or 16, seed=batch + 10)
        if family == "bert":  # a single sentence: segment 0 everywhere, as BERT's tokenizer gives
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        received = session.run(["logits"], {name: value.numpy() for name, value in inputs.items()})[0]
        assert received.shape == expected.shape
        assert np.abs(received - expected).max() < 1e-5, (batch, length)
    import onnx

    operators = {node.op_type for node in onnx.load(str(output_dir / "model.onnx")).graph.node}
    assert {"TopK", "CumSum", "GatherElements", "Softmax"} <= operators  # tie rule and sparse A.V in the graph


def test_onnx_takes_the_tokenizers_segment_ids_of_sentence_pairs(tmp_path):
    model = had_model("bert")
    result = export_had(model, tmp_path / "out", context_length=16)
    assert result.manifest["onnx"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    golden = load_golden(tmp_path / "out")  # the golden samples are pairs: both segments occur
    assert set(np.unique(golden.inputs["token_type_ids"])) == {0, 1}
    session = _onnx_session(tmp_path / "out" / "model.onnx")
    tokenizer = tiny_bert_tokenizer()

    pairs = tokenizer(["w1 w2 w3", "w4 w5"], ["w6 w7 w8 w9 w10", "w11"], padding=True, return_tensors="pt")
    assert {node.name for node in session.get_inputs()} == set(pairs)  # the tokenizer's full output feeds the graph
    with torch.no_grad():
        expected = model(**pairs).logits.numpy()
        as_one_segment = model(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"]).logits.numpy()
    assert np.abs(expected - as_one_segment).max() > 1e-4  # the segments change the output, visibly above atol
    received = session.run(["logits"], {name: value.numpy() for name, value in pairs.items()})[0]
    assert np.abs(received - expected).max() < 1e-5

    # no segment ids given to PyTorch: its default, segment 0, is the tokenizer's output for single sentences
    single = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert not single["token_type_ids"].any()
    with torch.no_grad():
        expected = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits.numpy()
    received = session.run(["logits"], {name: value.numpy() for name, value in single.items()})[0]
    assert np.abs(received - expected).max() < 1e-5


def test_the_export_config_is_an_optimum_exporter_config_with_optimums_task_and_inputs():
    from optimum.exporters.base import ExporterConfig
    from optimum.exporters.tasks import TasksManager

    from had_hf.export.export_config import HADExportConfig

    for family in ("bert", "t5", "vit", "llama"):
        model = build_model(family)
        config = HADExportConfig.from_model(model)
        assert isinstance(config, ExporterConfig)
        assert config.task == TasksManager.infer_task_from_model(type(model))
        torch.manual_seed(123)
        before = torch.rand(3)
        torch.manual_seed(123)
        inputs = config.sample_inputs(3, None if family == "vit" else 10, seed=5)
        assert torch.equal(torch.rand(3), before), "sample inputs must leave the caller's random state alone"
        assert list(inputs) == list(config.inputs)
        again = config.sample_inputs(3, None if family == "vit" else 10, seed=5)
        assert all(torch.equal(inputs[name], again[name]) for name in inputs), "same seed, same inputs"
        if family != "vit":
            mask = inputs["attention_mask"]
            assert mask[0].all() and (mask.sum(dim=1).diff() <= 0).all() and not mask[-1].all()
            assert int(inputs["input_ids"].max()) < model.config.vocab_size
    assert HADExportConfig.from_model(build_model("llama")).outputs == ["logits"]


def test_the_projects_optimum_namespace_folder_does_not_shadow_optimum():
    """`src/optimum/` holds only the command registration (PEP 420 namespace portions): no `__init__.py` may make
    it a regular package that hides the installed optimum."""
    import optimum.exporters.tasks

    assert not list((REPO_ROOT / "src" / "optimum").rglob("__init__.py"))
    assert Path(optimum.exporters.tasks.__file__).resolve().parents[2] != (REPO_ROOT / "src").resolve()
    assert str(REPO_ROOT / "src" / "optimum" / "commands" / "register") in [
        str(Path(p)) for p in importlib.import_module("optimum.commands.register").__path__
    ]


def test_sample_inputs_have_segment_ids_only_for_models_with_several_types():
    from tests.conftest import tiny_bert_config

    bert = export_config.make_sample_inputs(build_model("bert"), 3, 10, seed=0)
    assert list(bert) == ["input_ids", "attention_mask", "token_type_ids"]
    segments, mask = bert["token_type_ids"], bert["attention_mask"]
    assert (segments[:, 0] == 0).all() and (segments.amax(dim=1) == 1).all()  # every row a pair
    assert not segments[mask == 0].any()  # padding stays segment 0
    assert (segments.diff(dim=1) >= 0)[mask[:, 1:] == 1].all()  # one switch, from the first segment to the second
    import transformers

    one_type = transformers.BertForSequenceClassification(tiny_bert_config(type_vocab_size=1)).eval()
    assert "token_type_ids" not in export_config.make_sample_inputs(one_type, 2, 10, seed=0)
    assert "token_type_ids" not in export_config.make_sample_inputs(build_model("llama"), 2, 10, seed=0)


def test_export_keeps_eval_mode_with_dropout_and_restores_the_callers_mode(tmp_path):
    import transformers

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    config = tiny_bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = had_hf.convert(transformers.BertForSequenceClassification(config), HADConfig(top_n=TOP_N))
    had_hf.calibrate(model, [model_inputs("bert")], num_batches=1)
    model.train()  # as left by a training loop; dropout must be off in everything the export compares
    result = export_had(model, tmp_path / "out", context_length=16, atol=1e-5)
    assert result.onnx_max_abs_diff < 1e-5
    assert model.training


def test_export_fails_when_the_graph_breaks_the_tie_rule(tmp_path, monkeypatch):
    # the traced attention (had_hf.attention's binding of the selection) breaks the rule; the PyTorch model it is
    # validated against runs the op, whose reference keeps the correct rule
    from had_hf import attention as attention_module

    correct = attention_module.select_top_n

    def higher_index_wins(scores, valid, **num_kept):
        return correct(scores.flip(-1), valid.expand_as(scores).flip(-1), **num_kept).flip(-1)

    monkeypatch.setattr(attention_module, "select_top_n", higher_index_wins)
    with pytest.raises(OnnxValidationError, match=r"differ by up to \d.*all 5 independent draws"):
        # tiny random models have tiny logits: a tolerance far above their parity (~1e-8) still sees the tie rule
        export_had(had_model("bert"), tmp_path / "out", context_length=16, atol=1e-6)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_onnx_ratio_rule_matches_pytorch_at_other_lengths(tmp_path):
    model = had_hf.convert(build_model("bert"), HADConfig(top_n_ratio=0.3))
    had_hf.calibrate(model, [model_inputs("bert")], num_batches=1)
    inputs, probe = model_inputs("bert", batch=2, length=16), model_inputs("bert", batch=3, length=7, seed=4)
    info = export_onnx(model, inputs, probe, tmp_path / "model.onnx")
    longer = model_inputs("bert", batch=1, length=30, seed=5)  # N = ceil(0.3 * 30) = 9, never traced
    validate_onnx(info, model, {"sample": inputs, "probe": probe, "longer": longer}, atol=1e-5)
    assert max(info.max_abs_diff.values()) < 1e-5


def test_onnx_validation_fails_above_tolerance_with_the_figure(tmp_path):
    model, other = had_model("bert"), had_model("bert", seed=7)
    inputs, probe = model_inputs("bert", batch=2, length=8), model_inputs("bert", batch=3, length=4)
    info = export_onnx(model, inputs, probe, tmp_path / "model.onnx")
    with pytest.raises(OnnxValidationError, match=r"differ by up to \d.*'logits'.*atol=0\.001"):
        validate_onnx(info, other, {"sample": inputs}, atol=1e-3)


# ---------------------------------------------------------------------------------------------- golden data


def _popcount(words: np.ndarray) -> np.ndarray:
    bytes_ = words.view(np.uint8).reshape(*words.shape, 8)
    return np.unpackbits(bytes_, axis=-1).sum(axis=-1)


def test_golden_bits_alone_reproduce_the_models_selection(exported):
    family, model, output_dir, _ = exported
    golden = load_golden(output_dir)
    assert len(golden.layers) == 2
    check_golden_selection(model, golden)
    ties = sum(_boundary_ties(layer) for layer in golden.layers)
    assert ties > 0, "the samples never tie at the N-th score: the tie rule was not exercised"


def check_golden_selection(model, golden) -> None:
    """Every layer and sample of `golden`: the kept keys ranked by hand from the bits, and equal to the model's own
    selection on the golden inputs (recorded independently of the exporter); weights and outputs recomputed."""
    store = HADCaptureStore(capture_logits=False, capture_details=True)
    with torch.no_grad():
        for index in range(golden.manifest["samples"]):
            sample = {name: torch.from_numpy(value[index : index + 1]) for name, value in golden.inputs.items()}
            store.details.clear()
            model(**sample, had_store=store)
            for layer in golden.layers:
                _check_layer_sample(layer, index, store.details[layer.name]["keep"][0].numpy())


def _check_layer_sample(layer, index, model_keep):
    d = layer.head_dim
    queries, keys = layer.query_bits[index], layer.key_bits[index]  # (H, q, W), (H, k, W) uint64
    distance = _popcount(np.bitwise_xor(queries[:, :, None, :], keys[:, None, :, :])).sum(axis=-1)
    scores = d - 2 * distance.astype(np.int64)  # (H, q, k)
    valid = np.broadcast_to(layer.valid[index].astype(bool), scores.shape)
    heads, queries_len, keys_len = scores.shape
    recomputed = np.full(layer.kept_indices.shape[1:], -1, dtype=np.int64)
    for h in range(heads):
        for q in range(queries_len):
            candidates = [k for k in range(keys_len) if valid[h, q, k]]
            ranked = sorted(candidates, key=lambda k: (-scores[h, q, k], k))[: layer.top_n]  # lower index wins ties
            kept = sorted(set(ranked) | set(candidates[: layer.sink_keys]))  # and the first valid keys (sinks)
            recomputed[h, q, : len(kept)] = kept
    np.testing.assert_array_equal(recomputed, layer.kept_indices[index])
    model_indices = np.full_like(recomputed, -1)
    for h, q in np.ndindex(heads, queries_len):
        kept = np.flatnonzero(model_keep[h, q])
        model_indices[h, q, : len(kept)] = kept
    np.testing.assert_array_equal(recomputed, model_indices)
    # weights: softmax of alpha * Sb over the kept keys; output: their weighted sum of value rows
    present = recomputed >= 0
    kept_scores = np.take_along_axis(scores, np.maximum(recomputed, 0), axis=-1)
    logits = np.where(present, layer.alpha * kept_scores, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(layer.kept_weights[index], weights, atol=1e-6)
    rows = np.take_along_axis(layer.value[index][:, None], np.maximum(recomputed, 0)[..., None], axis=2)
    output = (layer.kept_weights[index][..., None] * rows).sum(axis=2)
    np.testing.assert_allclose(layer.attention_output[index], output, atol=1e-5)


def _boundary_ties(layer) -> int:
    """Rows where the N-th and (N+1)-th best valid scores are equal (where the lower-index rule decides)."""
    from had_hf.export.uint64_words import binary_scores

    scores = binary_scores(layer.query_bits, layer.key_bits, layer.head_dim)
    scores = np.where(np.broadcast_to(layer.valid.astype(bool), scores.shape), scores, -layer.head_dim - 1)
    ordered = -np.sort(-scores, axis=-1)
    return int((ordered[..., layer.top_n - 1] == ordered[..., layer.top_n]).sum())


def test_golden_manifest_and_readme(exported):
    family, model, output_dir, _ = exported
    golden = load_golden(output_dir / "golden")
    config = model.config.quantization_config
    for layer in golden.layers:
        assert layer.sigma_q == pytest.approx(config.sigma_q[layer.name])
        assert layer.scaling == pytest.approx(8**-0.5)
        assert layer.query_bits.dtype == np.uint64 and layer.query_bits.shape[-1] == 1  # head_dim 8 -> one word
    if family == "bert":  # padded samples: the mask reached the golden valid keys
        assert golden.inputs["attention_mask"][1:].min() == 0
        assert not golden.layers[0].valid[2].all()
    readme = (output_dir / "golden" / "README.md").read_text()
    assert "bit `i` (bit 0 = least significant) of word `j` holds dimension `64*j + i`" in readme
    # the README's numpy check runs as written
    code = readme.split("```python\n")[1].split("```")[0]
    cwd = os.getcwd()
    try:
        os.chdir(output_dir)
        exec(compile(code, "golden/README.md", "exec"), {})
    finally:
        os.chdir(cwd)


def test_cam_report_uses_model_geometry(exported):
    family, model, output_dir, result = exported
    report = json.loads((output_dir / "cam_report.json").read_text())
    assert report["model"]["num_layers"] == 2 and report["model"]["head_dim"] == 8
    assert report["operating_point"] == result.cam_report["operating_point"]
    assert report["operating_point"]["context_length"] == 16 and report["operating_point"]["top_n"] == TOP_N
    assert report["cam_bits"]["per_layer"] == 16 * 4 * 8


# ---------------------------------------------------------------------------------------------- bad input


def _no_leftovers(parent: Path):
    return not [p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def test_refuses_models_that_are_not_had(tmp_path):
    with pytest.raises(HADExportError, match="not a HAD model"):
        export_had(build_model("bert"), tmp_path / "out")
    with pytest.raises(HADExportError, match="PreTrainedModel"):
        export_had(torch.nn.Linear(2, 2), tmp_path / "out")
    plain_dir = tmp_path / "plain"
    build_model("bert").save_pretrained(plain_dir)
    with pytest.raises(HADExportError, match="not a HAD checkpoint"):
        export_had(plain_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_refuses_a_model_whose_attention_is_not_had_capable(tmp_path):
    import transformers

    class LegacyAttentionBert(transformers.BertForSequenceClassification):
        _can_set_attn_implementation_cached_value = False  # as if its attention bypassed the interface

    model = LegacyAttentionBert(build_model("bert").config)
    model.config.quantization_config = HADConfig(top_n=3, sigma_q={"x": 1.0}, sigma_k={"x": 1.0})
    with pytest.raises(HADExportError, match="not HAD-capable"):
        export_had(model, tmp_path / "out")


def test_refuses_uncalibrated_and_training_stage_models(tmp_path):
    with pytest.raises(HADExportError, match="not calibrated"):
        export_had(had_model("bert", calibrate=False), tmp_path / "out")
    partial = had_model("bert")
    partial.config.quantization_config.sigma_k.pop("encoder.layer.1.attention.self")
    with pytest.raises(HADExportError, match=r"missing for 1 of 2 layers: encoder.layer.1.attention.self"):
        export_had(partial, tmp_path / "out")
    training = had_model("bert")
    had_hf.set_stage(training, "tanh", c=2.0)
    with pytest.raises(HADExportError, match="training stage 'tanh'"):
        export_had(training, tmp_path / "out")
    per_head = had_model("bert")
    config = per_head.config.quantization_config
    config.sigma_q = {name: [value] * per_head.config.num_attention_heads for name, value in config.sigma_q.items()}
    with pytest.raises(HADExportError, match="one sigma per head"):
        export_had(per_head, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_refuses_bad_arguments_and_coefficients(tmp_path):
    model = had_model("bert")
    with pytest.raises(HADExportError, match="samples must be a positive integer"):
        export_had(model, tmp_path / "out", samples=0)
    with pytest.raises(HADExportError, match="opset"):
        export_had(model, tmp_path / "out", opset=9)
    bad = tmp_path / "coefficients.json"
    bad.write_text(json.dumps({"coefficients": {"clock_mhz": {"value": 1, "unit": "MHz", "source": "x"}}}))
    with pytest.raises(CoefficientError, match="missing the coefficient"):
        export_had(model, tmp_path / "out", coefficients=bad)


def test_output_dir_is_never_half_written_nor_lost(tmp_path, monkeypatch):
    model = had_model("bert")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "mine.txt").write_text("keep me")
    with pytest.raises(HADExportError, match="exists and is not empty.*--overwrite"):
        export_had(model, output_dir)

    def broken_report(*args, **kwargs):
        raise RuntimeError("disk full")

    # a failure late in the export, with --overwrite: the user's folder is untouched and no partial folder remains
    monkeypatch.setattr(exporter_module, "write_cam_report", broken_report)
    with pytest.raises(RuntimeError, match="disk full"):
        export_had(model, output_dir, overwrite=True, context_length=8)
    assert sorted(p.name for p in output_dir.iterdir()) == ["mine.txt"]
    assert _no_leftovers(tmp_path)

    monkeypatch.undo()
    export_had(model, output_dir, overwrite=True, context_length=8, top_n=3)
    assert not (output_dir / "mine.txt").exists() and (output_dir / "had_export.json").is_file()
    assert _no_leftovers(tmp_path)
    # --top-n went into the bundle, and the caller's model kept its own N
    assert json.loads((output_dir / "config.json").read_text())["quantization_config"]["top_n"] == 3
    assert model.config.quantization_config.top_n == TOP_N


def test_refuses_to_replace_the_model_being_exported(tmp_path):
    source = tmp_path / "model"
    had_model("bert").save_pretrained(source)
    with pytest.raises(HADExportError, match="holds the model being exported"):
        export_had(source, tmp_path, overwrite=True)
    assert (source / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def saved_had_checkpoint(tmp_path_factory):
    """A calibrated tiny HAD BERT saved with a tokenizer, as a user would have it after distillation."""
    path = tmp_path_factory.mktemp("checkpoint") / "had-bert"
    had_model("bert").save_pretrained(path)
    tiny_bert_tokenizer().save_pretrained(path)
    return path


def _run(*args: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    pythonpath = [str(REPO_ROOT / "src")] + ([env_path] if env_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in pythonpath if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_had_hf_cli_end_to_end(saved_had_checkpoint, tmp_path):
    output_dir = tmp_path / "bundle"
    done = _run(
        "-m", "had_hf.cli", "export", "--model", str(saved_had_checkpoint), str(output_dir),
        "--samples", "2", "--context-length", "12", "--top-n", "4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Exported the HAD model" in done.stdout and "max abs diff" in done.stdout
    for name in ("model.safetensors", "model.onnx", "tokenizer_config.json", "golden/golden.safetensors"):
        assert (output_dir / name).is_file(), name
    manifest = json.loads((output_dir / "had_export.json").read_text())
    assert manifest["had_config"]["top_n"] == 4 and manifest["processor"] == "BertTokenizer"
    assert load_golden(output_dir).layers[0].kept_indices.shape[-1] == 4

    again = _run("-m", "had_hf.cli", "export", "--model", str(saved_had_checkpoint), str(output_dir))
    assert again.returncode == 1
    assert "exists and is not empty" in again.stderr and "Traceback" not in again.stderr


def test_cli_parser_and_error_exit_codes(saved_had_checkpoint, tmp_path, capsys):
    from had_hf.cli import build_parser, main

    args = build_parser().parse_args(["export", "-m", "some/model", "out", "--top-n", "7"])
    assert (args.model, args.output_dir, args.top_n, args.samples, args.opset) == ("some/model", Path("out"), 7, 2, 17)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = capsys.readouterr().out
    assert "Required arguments" in help_text and "Optional arguments" in help_text and "--coefficients" in help_text
    bad = tmp_path / "coefficients.json"
    bad.write_text("{}")
    code = main(["export", "--model", str(saved_had_checkpoint), str(tmp_path / "out"), "--coefficients", str(bad)])
    assert code == 1
    assert "'coefficients' object" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1


@pytest.mark.parametrize("model", ["./missing-model", "outputs/missing-model", "not a model!"])
def test_export_command_says_a_missing_model_folder_does_not_exist(model, tmp_path, monkeypatch, capsys):
    from had_hf.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # "outputs/missing-model" is a typo of a local path, not a Hub repo id
    assert main(["export", "--model", model, str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"had-hf export: error: --model {model}: no such local folder" in error
    assert "Repo id" not in error and not (tmp_path / "out").exists()


def _optimum_cli(*args: str) -> subprocess.CompletedProcess:
    """`optimum-cli ARGS` with this checkout's registration only: the editable install of another checkout (a git
    worktree) would put a second `optimum/commands/register/had_hf_export.py` on the path, registering `had` twice."""
    source = str(REPO_ROOT / "src")
    script = (
        "import runpy, sys; "
        f"sys.path[:] = [p for p in sys.path if p == {source!r} or not p.rstrip('/').endswith('/src')]; "
        "sys.argv[0] = 'optimum-cli'; "
        "runpy.run_module('optimum.commands.optimum_cli', run_name='__main__')"
    )
    return _run("-c", script, *args)


def test_optimum_cli_export_had(saved_had_checkpoint, tmp_path):
    output_dir = tmp_path / "bundle"
    done = _optimum_cli(
        "export", "had", "--model", str(saved_had_checkpoint), str(output_dir), "--context-length", "12"
    )
    assert done.returncode == 0, done.stderr
    assert (output_dir / "model.onnx").is_file() and (output_dir / "cam_report.md").is_file()
    manifest = json.loads((output_dir / "had_export.json").read_text())
    assert manifest["task"] == "text-classification"
    refused = _optimum_cli("export", "had", "--model", str(saved_had_checkpoint), str(output_dir))
    assert refused.returncode == 1 and "exists and is not empty" in refused.stderr
