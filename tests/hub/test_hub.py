"""Pushing HAD checkpoints to a Hub and loading them back, with the real `huggingface_hub` client over HTTP.

The Hub is `fake_hub.FakeHub` on 127.0.0.1. Pushes run in this process (its client is pointed at the server with
`FakeHub.patch_client`); downloads run in fresh processes configured only through the environment (`HF_ENDPOINT`
and friends), as a user's would be.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, hash_tree, save_output_dir, tiny_bert

import had_hf
from had_hf import cli, hub

REPO_ID = "had-org/tiny-had"
EXPECTED_FILES = {
    ".gitattributes",
    "README.md",
    "config.json",
    "model.safetensors",
    "results.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_curves.png",
    "vocab.txt",
}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running fake Hub, with this process's client pointed at it (HF_ENDPOINT, dummy HF_TOKEN, no Xet)."""
    with FakeHub(tmp_path / "hub-storage") as server:
        server.patch_client(monkeypatch, hf_home=tmp_path / "hf-home-pusher")
        yield server


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """A tiny distillation output folder (plain BERT weights with a fabricated HADConfig)."""
    return save_output_dir(tmp_path / "run")


def run_client(server: FakeHub, home: Path, script: str, *args: str, timeout: int = 120) -> str:
    """Runs `script` in a fresh Python process whose Hub client is configured by the environment only."""
    env = server.client_env(home)
    env["PYTHONPATH"] = str(Path(had_hf.__file__).parents[1])
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, f"client failed:\n{completed.stderr[-4000:]}\nrequests: {server.requests[-10:]}"
    return completed.stdout


def push_cli(*argv: str) -> int:
    return cli.main(["push", *argv])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_uploads_everything_in_one_commit_and_downloads_in_a_fresh_process(fake_hub, output_dir, tmp_path):
    (output_dir / "training_args.bin").write_bytes(b"pickled TrainingArguments")  # tolerated, never uploaded
    before = hash_tree(output_dir)

    url = hub.push_to_hub(output_dir, REPO_ID)

    assert hash_tree(output_dir) == before, "the push wrote into the output folder"
    remote = fake_hub.files(REPO_ID)
    assert set(remote) == EXPECTED_FILES
    assert fake_hub.commit_count(REPO_ID) == 2, "expected the repo's initial commit plus exactly one upload commit"
    head = fake_hub.head(REPO_ID)
    assert url == f"{fake_hub.url}/{REPO_ID}/commit/{head}"
    assert remote["README.md"].decode() == str(hub.render_model_card(output_dir, REPO_ID))
    assert remote["training_curves.png"].startswith(b"\x89PNG\r\n\x1a\n")

    stdout = run_client(
        fake_hub,
        tmp_path / "hf-home-downloader",
        """
        import hashlib, json, os, sys
        from huggingface_hub import hf_hub_download, snapshot_download
        folder = snapshot_download(sys.argv[1])
        digests = {}
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                digests[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        config = json.load(open(hf_hub_download(sys.argv[1], "config.json")))
        print(json.dumps({"digests": digests, "quant_method": config["quantization_config"]["quant_method"]}))
        """,
        REPO_ID,
    )
    downloaded = json.loads(stdout.strip().splitlines()[-1])
    assert set(downloaded["digests"]) == EXPECTED_FILES
    for name in EXPECTED_FILES - {".gitattributes", "README.md", "training_curves.png"}:
        assert downloaded["digests"][name] == sha256(output_dir / name), name
    assert downloaded["quant_method"] == "had"


def test_push_to_a_branch_keeps_main_untouched(fake_hub, output_dir):
    hub.push_to_hub(output_dir, REPO_ID, revision="v1", private=True, commit_message="Distilled on SST-2")

    assert set(fake_hub.files(REPO_ID, "main")) == {".gitattributes"}
    assert set(fake_hub.files(REPO_ID, "v1")) == EXPECTED_FILES
    assert fake_hub.is_private(REPO_ID)


def test_server_error_at_commit_fails_cleanly(fake_hub, output_dir, capsys):
    """A 500 while the files are being committed: non-zero exit, the reason and the retry command, folder intact."""
    before = hash_tree(output_dir)
    fake_hub.fail_on["commit"] = 500

    exit_code = push_cli(str(output_dir), "--repo-id", REPO_ID)

    stderr = capsys.readouterr().err
    assert exit_code != 0
    assert "HTTP 500" in stderr and "uploading the files" in stderr
    assert f"had-hf push {output_dir} --repo-id {REPO_ID}" in stderr
    assert hash_tree(output_dir) == before
    assert set(fake_hub.files(REPO_ID)) == {".gitattributes"}, "a failed commit must not leave files on the Hub"

    # The printed command really retries: once the server recovers, the same push succeeds.
    fake_hub.fail_on.clear()
    assert push_cli(str(output_dir), "--repo-id", REPO_ID) == 0
    assert set(fake_hub.files(REPO_ID)) == EXPECTED_FILES
    assert hash_tree(output_dir) == before


def test_rejected_token_fails_cleanly(fake_hub, output_dir, capsys):
    before = hash_tree(output_dir)

    exit_code = push_cli(str(output_dir), "--repo-id", REPO_ID, "--token", "hf_revoked", "--private")

    stderr = capsys.readouterr().err
    assert exit_code != 0
    assert "HTTP 401" in stderr and "token" in stderr
    assert f"had-hf push {output_dir} --repo-id {REPO_ID} --private" in stderr
    assert "hf_revoked" not in stderr, "the retry command must not leak the token"
    assert hash_tree(output_dir) == before
    assert not fake_hub.repo_exists(REPO_ID)


def test_partial_commit_is_not_reported_as_success(fake_hub, output_dir):
    """The Hub acknowledges a commit that lacks the weights: the push must fail, and a retry must complete it."""
    fake_hub.drop_from_next_commit = "model.safetensors"

    with pytest.raises(hub.HubPushError, match=r"incomplete: missing \['model.safetensors'\]") as failure:
        hub.push_to_hub(output_dir, REPO_ID)

    assert failure.value.retry_command == f"had-hf push {output_dir} --repo-id {REPO_ID}"
    hub.push_to_hub(output_dir, REPO_ID)
    # the retry command repeats every option of the push (the token excepted)
    retry = hub.retry_command(output_dir, REPO_ID, private=True, revision="dev", license="mit", commit_message="v 2")
    assert (
        retry
        == f"had-hf push {output_dir} --repo-id {REPO_ID} --private --revision dev --license mit --commit-message 'v 2'"
    )
    assert set(fake_hub.files(REPO_ID)) == EXPECTED_FILES


def test_folders_that_cannot_be_pushed_are_refused_before_any_request(fake_hub, output_dir, tmp_path, capsys):
    torch.save({"weight": torch.zeros(1)}, output_dir / "pytorch_model.bin")
    (output_dir / "tokenizer.json").unlink()
    (output_dir / "tokenizer_config.json").unlink()
    (output_dir / "vocab.txt").unlink()
    config = json.loads((output_dir / "config.json").read_text())
    del config["quantization_config"]
    (output_dir / "config.json").write_text(json.dumps(config))
    before = hash_tree(output_dir)

    exit_code = push_cli(str(output_dir), "--repo-id", REPO_ID)

    stderr = capsys.readouterr().err
    assert exit_code != 0
    assert "['pytorch_model.bin']" in stderr and "safetensors only" in stderr
    assert "no tokenizer or image processor" in stderr
    assert "no HADConfig" in stderr
    assert fake_hub.requests == [], "nothing may be sent for a folder that cannot be pushed"
    assert hash_tree(output_dir) == before

    with pytest.raises(hub.OutputDirError, match="ORG/NAME"):
        hub.push_to_hub(save_output_dir(tmp_path / "other"), "no-namespace")


def test_had_checkpoint_round_trip_through_the_hub(fake_hub, tmp_path):
    """A converted model, pushed and loaded by repo id in a fresh process: HAD attention and identical outputs."""
    model = tiny_bert(seed=3)
    dense = tiny_bert(seed=3)
    names = [name for name, _ in model.named_modules() if name.endswith("attention.self")]
    had_config = had_hf.HADConfig(
        top_n=4, sigma_q={n: 0.9 + 0.1 * i for i, n in enumerate(names)}, sigma_k={n: 1.2 for n in names}
    )
    had_hf.convert(model, had_config)
    input_ids = torch.randint(5, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        dense_logits = dense(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(expected, dense_logits), "top-4 Hamming attention should differ from dense attention"
    output_dir = save_output_dir(tmp_path / "had-run", model=model)
    hub.push_to_hub(output_dir, REPO_ID)

    stdout = run_client(
        fake_hub,
        tmp_path / "hf-home-loader",
        """
        import json, sys
        import torch
        import had_hf
        from transformers import AutoModelForSequenceClassification

        def refuse_unpickling(*args, **kwargs):
            raise AssertionError("loading a HAD checkpoint must not unpickle anything")

        torch.load = refuse_unpickling
        inputs = json.loads(sys.argv[2])
        model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
        with torch.no_grad():
            logits = model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits
        config = model.config.quantization_config
        print(json.dumps({
            "attn_implementation": model.config._attn_implementation,
            "had_config": config.to_dict() if isinstance(config, had_hf.HADConfig) else None,
            "logits": logits.tolist(),
        }))
        """,
        REPO_ID,
        json.dumps({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}),
    )
    loaded = json.loads(stdout.strip().splitlines()[-1])
    assert loaded["attn_implementation"] == "hamming_topk"
    assert loaded["had_config"] == had_config.to_dict()
    # float32 -> Python float -> JSON is exact, so "identical" means bit-identical here.
    assert torch.equal(torch.tensor(loaded["logits"], dtype=torch.float32), expected)


def test_a_trainer_run_without_a_recipe_pushes_a_full_card(fake_hub, tmp_path):
    """`HADDistillationTrainer.push_to_hub` alone: the run record, the card with teacher and student metrics and
    the stage schedule, and the curves, in one commit; no recipe or hand-written results.json involved."""
    from fake_hub import save_tiny_tokenizer, validate_card_metadata
    from transformers import BertTokenizer

    from tests.test_trainer import TinyDataset, _args

    output_dir = tmp_path / "trainer-run"
    (tmp_path / "tokenizer").mkdir()
    save_tiny_tokenizer(tmp_path / "tokenizer")
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=0)
    eval_set = TinyDataset(size=16, seed=1)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = had_hf.HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(output_dir, eval_strategy="no", push_to_hub=True, hub_model_id=REPO_ID),
        had_config=had_hf.HADConfig(top_n=3),
        train_dataset=TinyDataset(),
        eval_dataset=eval_set,
        processing_class=BertTokenizer.from_pretrained(tmp_path / "tokenizer"),
        compute_metrics=accuracy,
    )
    trainer.train()
    student_metrics = trainer.evaluate()
    url = trainer.push_to_hub()  # with args.push_to_hub, as the Trainer's own: one commit, no push from save_model

    assert url == f"{fake_hub.url}/{REPO_ID}/commit/{fake_hub.head(REPO_ID)}"
    assert fake_hub.commit_count(REPO_ID) == 2, "the repo's initial commit plus exactly one upload commit"
    remote = fake_hub.files(REPO_ID)
    assert {"README.md", "results.json", "training_curves.png", "model.safetensors"} <= set(remote)
    record = json.loads(remote["results.json"])
    assert record["recorded_by"] == "HADDistillationTrainer" and record["main_metric"] == "accuracy"
    assert record["student"]["metrics"]["accuracy"] == student_metrics["eval_accuracy"]
    assert [stage["stage"] for stage in record["stage_timeline"]] == ["tanh", "sign", "ste", "refinement"]
    # the teacher's metric, computed independently of the trainer
    with torch.no_grad():
        logits = teacher(input_ids=eval_set.ids, attention_mask=eval_set.mask).logits
    teacher_accuracy = float((logits.argmax(-1) == eval_set.labels).float().mean())
    assert record["teacher"]["metrics"]["accuracy"] == pytest.approx(teacher_accuracy)

    card = remote["README.md"].decode()
    assert validate_card_metadata(card) == ([], [])
    assert card == str(hub.render_model_card(output_dir, REPO_ID))
    assert f"| accuracy | {teacher_accuracy:.4f} | {student_metrics['eval_accuracy']:.4f} |" in card
    assert "against steps, stage boundaries marked](training_curves.png)" in card
