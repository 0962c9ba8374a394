"""Distill an image classifier (ViT, DeiT: any `AutoModelForImageClassification` whose attention goes through the
attention interface) into a HAD student, top-1 / top-5 accuracy.

Launch commands (run from the repository root):

    # the embedded default: no arguments. No images and no ViT weights ship offline, so it writes a small synthetic
    # image folder (10 classes, 56x56 pixels) to a temporary folder, builds a tiny ViT from a config (random init,
    # 197 tokens per image as in ViT-B/16 at 224 pixels), trains it as the teacher, then distills it with N = 30
    # and a shortened schedule: minutes on a CPU. It shows the pipeline end to end, not the accuracy of a real ViT.
    python recipes/distill_image_classification.py

    # a real teacher on an image folder (<dir>/<class>/*.jpg) or a Hub dataset, on a GPU. The paper's setting: DeiT-B
    # on ImageNet, here as folders of its 1000 synsets (sorted, they are the checkpoint's class order: its head is kept)
    python recipes/distill_image_classification.py --model_name_or_path facebook/deit-base-patch16-224 \
        --train_dir imagenet/train --validation_dir imagenet/val --output_dir out/deit-had --bf16 true
    python recipes/distill_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name cifar10 --image_column_name img --finetune_teacher_epochs 3 --output_dir out/vit-cifar10-had

    # a YAML config (any flag below), flags after it override it; under Accelerate, as the GLUE recipe
    python recipes/distill_image_classification.py recipes/configs/image_tiny_vit_cpu.yaml --max_steps 60
    accelerate launch --config_file recipes/accelerate_configs/ddp_2proc.yaml recipes/distill_image_classification.py ...

Flag names follow transformers' `run_image_classification.py` (`--dataset_name`, `--train_dir`, `--validation_dir`,
`--image_column_name`, `--label_column_name`, `--train_val_split`) plus every `TrainingArguments` and HAD schedule
flag, and the teacher, student and LoRA flags of the GLUE recipe. As there, flags alone apply to the embedded default
unless one names the data or the teacher; then the library defaults apply (the paper's full schedule, N = 30).
`--remove_unused_columns` defaults to false here: the rows are built by the image processor when read, from the
image column that the Trainer would otherwise drop. The evaluation split is `validation`, else `test`, else
`--train_val_split` of the training split. The output folder is laid out as the GLUE recipe's (student, image
processor, `results.json`, `teacher/` when the teacher was fine-tuned).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTImageProcessor,
    default_data_collator,
)

from had_hf import HADTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: recipes.common
from recipes.common.arguments import DistillationArguments, parse_recipe_arguments  # noqa: E402
from recipes.common.distillation import distill  # noqa: E402
from recipes.common.image_data import (  # noqa: E402
    class_names,
    limit,
    load_image_splits,
    top_k_accuracies,
    with_processor_transform,
    write_synthetic_image_folder,
)
from recipes.common.run_paths import (  # noqa: E402
    check_output_paths,
    check_teacher_or_tiny,
    model_location,
    resolve_path,
)
from recipes.common.run_record import begin_run, run_record, save_run, strip_metrics  # noqa: E402
from recipes.common.student import (  # noqa: E402
    check_task_head,
)

logger = logging.getLogger("distill_image_classification")

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "image_tiny_vit_cpu.yaml"
SELECTION_FLAGS = ("model_name_or_path", "dataset_name", "train_dir", "validation_dir")
TINY_TEACHER = "tiny ViT from config (random init)"
TINY_IMAGE_SIZE, TINY_PATCH_SIZE = 56, 4  # (56 / 4)^2 patches + [CLS] = 197 tokens, as ViT-B/16 at 224 pixels


@dataclass
class ScriptArguments(DistillationArguments):
    """Arguments of the recipe beyond the training arguments: the shared teacher, student and run flags
    (`recipes.common.arguments.DistillationArguments`) and the image data's."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local path or Hub id of an image classifier (ViT, DeiT). Default: a tiny ViT built "
            "from a config (random init; needs --finetune_teacher_epochs), as no ViT weights ship offline."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset of `datasets` (Hub name or a loading script). Default, with no --train_dir either: "
            "a synthetic image folder written to a temporary folder."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_dir: str | None = field(
        default=None, metadata={"help": "An image folder (<class>/<image>) of training images (`imagefolder`)."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "An image folder (<class>/<image>) of evaluation images."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The dataset's image column."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset's label column."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Part of the training split held out for evaluation when there is none."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"train_val_split must be in (0, 1), got {self.train_val_split}.")
        if self.dataset_name is not None and (self.train_dir or self.validation_dir):
            raise ValueError("Give --dataset_name or --train_dir/--validation_dir (an image folder), not both.")
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir needs --train_dir (the training images).")


def parse_arguments(argv: list[str], check_paths: bool = True) -> tuple[ScriptArguments, HADTrainingArguments, str]:
    """The recipe's arguments (see `recipes.common.arguments.parse_recipe_arguments`)."""
    return parse_recipe_arguments(
        ScriptArguments,
        argv,
        script="recipes/distill_image_classification.py",
        description=__doc__,
        default_config=DEFAULT_CONFIG,
        selection_flags=SELECTION_FLAGS,
        check_paths=check_run_paths if check_paths else None,
        defaults={"remove_unused_columns": False},
    )


def check_run_paths(script_args: ScriptArguments, training_args: HADTrainingArguments) -> None:
    """Fails on a folder the run would read and cannot, or would write over, and on settings that cannot run,
    before any model is loaded."""
    check_teacher_or_tiny(script_args, TINY_TEACHER)
    for flag in ("train_dir", "validation_dir"):
        value = getattr(script_args, flag)
        if value is not None and not os.path.isdir(resolve_path(value)):
            raise ValueError(f"--{flag} {value}: no such folder.")
    if training_args.remove_unused_columns:
        raise ValueError(
            "--remove_unused_columns must be false here: the image processor builds each row from the image column "
            "when it is read, and the Trainer would drop that column first."
        )
    check_output_paths(script_args, training_args)


def tiny_vit(num_labels: int, id2label: dict[int, str]) -> tuple[PreTrainedModel, ViTImageProcessor]:
    """The embedded default's teacher: a 2-layer ViT of width 32 over 56x56 images in 4x4 patches (197 tokens)."""
    config = ViTConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    processor = ViTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return AutoModelForImageClassification.from_config(config, attn_implementation="eager"), processor


def load_teacher(script_args: ScriptArguments, names: list[str]):
    """(teacher, image processor, its location): the given classifier with a head for `names` (a new head where the
    number of classes differs), or the tiny ViT."""
    id2label = dict(enumerate(names))
    if script_args.model_name_or_path is None:
        model, processor = tiny_vit(len(names), id2label)
        return model, processor, TINY_TEACHER
    path = model_location(script_args.model_name_or_path)
    model, loading_info = AutoModelForImageClassification.from_pretrained(
        path,
        num_labels=len(names),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        ignore_mismatched_sizes=True,
        attn_implementation="eager",
        dtype=torch.float32,
        output_loading_info=True,
    )
    check_task_head(loading_info, path, script_args, "these images")
    return model, AutoImageProcessor.from_pretrained(path), path


def main(argv: list[str]) -> dict:
    script_args, training_args, command = parse_arguments(argv)
    start = begin_run(script_args, training_args, logger)
    with tempfile.TemporaryDirectory(prefix="had-images-") as scratch:
        return _run(script_args, training_args, command, start, scratch)


def _run(script_args, training_args, command: str, start: float, scratch: str) -> dict:
    train_dir, validation_dir = resolve_path(script_args.train_dir), resolve_path(script_args.validation_dir)
    synthetic = script_args.dataset_name is None and train_dir is None
    if synthetic:
        folder = write_synthetic_image_folder(Path(scratch) / "images", TINY_IMAGE_SIZE, seed=training_args.seed)
        print(
            f"No images ship offline: using a synthetic image folder written to {folder} (10 classes of noisy "
            "single-hue images). Its accuracies show that the pipeline works, not what HAD keeps on real images."
        )
        train_dir, validation_dir = str(folder / "train"), str(folder / "validation")
    if script_args.model_name_or_path is None:
        print(
            f"No ViT weights ship offline: the teacher is a {TINY_TEACHER}, trained here first. Pass "
            "--model_name_or_path (e.g. a DeiT or ViT checkpoint) for a real one."
        )
    train, evaluation, eval_split = load_image_splits(
        script_args.dataset_name,
        script_args.dataset_config_name,
        train_dir,
        validation_dir,
        script_args.train_val_split,
        training_args.seed,
        cache_dir=str(Path(scratch) / "cache") if synthetic else None,
    )
    train = limit(train, script_args.max_train_samples, training_args.seed)
    evaluation = limit(evaluation, script_args.max_eval_samples, training_args.seed)
    names = class_names(train, script_args.label_column_name)
    teacher, processor, teacher_path = load_teacher(script_args, names)
    data = {
        split: with_processor_transform(
            dataset, processor, script_args.image_column_name, script_args.label_column_name
        )
        for split, dataset in (("train", train), ("eval", evaluation))
    }

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return top_k_accuracies(logits, prediction.label_ids)

    run = distill(
        teacher,
        script_args,
        training_args,
        task="the images",
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        teacher_overrides={"remove_unused_columns": False},
        data_collator=default_data_collator,
        processing_class=processor,
        compute_metrics=compute_metrics,
    )
    trainer = run.trainer
    student_metrics = strip_metrics(trainer.evaluate())

    config = trainer.accelerator.unwrap_model(trainer.model).config
    source = (
        "synthetic image folder" if synthetic else script_args.dataset_name or f"image folder {script_args.train_dir}"
    )
    results = {
        "task": "image-classification",
        "main_metric": "accuracy",
        "teacher": run.teacher_record(script_args, teacher_path, TINY_TEACHER),
        "license": script_args.license,
        "student": {"metrics": student_metrics},
        "dataset": {
            "name": script_args.dataset_name or source,
            "config": script_args.dataset_config_name,
            "source": source,
            "split": eval_split,
            "num_labels": len(names),
            "train_examples": len(train),
            "eval_examples": len(evaluation),
        },
        "image_size": getattr(config, "image_size", None),
        "tokens_per_image": _tokens_per_image(config),
        **run_record(run, script_args, training_args, command=command, start_time=start),
    }
    save_run(trainer, results, f"Image classification ({source}, {eval_split}: {len(evaluation)} images)")
    return results


def _tokens_per_image(config) -> int | None:
    """Patches plus the [CLS] token (and DeiT's distillation token): the keys each query sees."""
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        return None
    return (image_size // patch_size) ** 2 + (2 if config.model_type == "deit" else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
