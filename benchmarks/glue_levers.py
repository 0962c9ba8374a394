"""The levers of the GLUE rounds (`glue_gpu.py --levers`): named options of the recipe, one name each, and how they
combine.

A lever is a list of recipe flags (or a function of the task giving them); "+" joins levers that set different flags
("h64+extra_pairs"). A teacher lever ("h64") also brings its own teacher, made by the function `TEACHER_LEVERS` names.
The seed levers ("seed43") repeat a recipe with another student seed: `recipe_of` folds them into the recipe.
`glue_defaults.py` combines its own levers with the same `lever_flags`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def head64_teacher(teacher: str | Path, dest: Path) -> Path:
    """A copy of `teacher` whose attention reads the same weights as heads of 64: the "h64" lever's starting point.
    Only `num_attention_heads` changes (12 of 32 -> 6 of 64 for MiniLM); the copy is made where the runs go, since
    at most 64 MiB travel to the GPU machine."""
    config = json.loads((Path(teacher) / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    if head_dim * 2 != 64:
        raise SystemExit(f"The h64 lever halves the heads of a teacher with head dim 32; {teacher} has {head_dim}.")
    shutil.copytree(teacher, dest, dirs_exist_ok=True)
    config["num_attention_heads"] = heads // 2
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


# levers the paper leaves open (issue 7), each one option of the recipe; the paper's behaviour stays the default.
# A callable gives the flags of a task.
PAIR_TASKS = ("mrpc", "stsb", "rte")
LEVERS = {
    "refine_attn": ["--refinement_attention_loss_weight", "1.0"],  # keep the attention loss in stage 4
    "clip2": ["--ste_clip", "2.0"],  # STE passes gradient on |x / sigma| <= 2 instead of 1
    "lr1e-4": ["--learning_rate", "1e-4", "--refinement_learning_rate", "1e-5"],
    "lr2e-5": ["--learning_rate", "2e-5", "--refinement_learning_rate", "2e-6"],  # the paper's learning rates
    "sigma_head": ["--sigma_per_head", "true"],  # one sigma (softmax temperature factor) per head, not per layer
    "no_refine": ["--refinement_steps", "0"],  # stop after the STE stage
    "n64": ["--top_n", "64"],
    # the decay factor of c (the paper's 0.9995): with --max_steps fixed, a faster decay shortens the tanh and sign
    # stages and leaves more of the steps to the STE and refinement stages, a slower one the reverse
    "decay0.999": ["--c_decay", "0.999"],
    "decay0.9998": ["--c_decay", "0.9998"],
    # the same recipe, another student seed (same teacher): the run-to-run spread
    **{f"seed{seed}": ["--seed", str(seed)] for seed in range(43, 47)},
    # not in the paper: the other sentence-pair tasks' training texts as extra, unlabeled distillation inputs
    "extra_pairs": lambda task: ["--distill_extra_tasks", ",".join(t for t in PAIR_TASKS if t != task)],
    "no_dropout": ["--student_dropout", "0"],  # the student trains without dropout (the teacher's targets have none)
    "attn_w10": ["--attention_loss_weight", "10"],  # attention loss x10 against the output loss
    # not in the paper: augmented copies of the distillation inputs (pairs swapped; unrelated pairs; words dropped)
    "aug_swap": ["--distill_augment", "swap"],
    "aug_swap_cross": ["--distill_augment", "swap,cross"],
    "aug_all": ["--distill_augment", "swap,cross,word_drop"],
    "aug_drop": ["--distill_augment", "word_drop"],  # the one kind a single-sentence task takes
    # a teacher with head dim 64: the same pretrained MiniLM read as 6 heads of 64, fine-tuned on the task itself
    # (its own teacher, so its drop is against that teacher)
    "h64": [],
}
TEACHER_LEVERS = {"h64": head64_teacher}


def lever_flags(lever: str, task: str, levers: dict | None = None) -> list[str]:
    """The recipe flags of a lever, or of levers joined by "+" (e.g. "h64+extra_pairs"), from `levers` (default:
    `LEVERS`)."""
    levers = LEVERS if levers is None else levers
    flags = []
    for part in lever.split("+"):
        part_flags = levers[part]
        part_flags = part_flags(task) if callable(part_flags) else part_flags
        repeated = set(flags[::2]) & set(part_flags[::2])  # flags come as (name, value) pairs
        if repeated:
            raise SystemExit(
                f"Lever {lever!r} sets {sorted(repeated)} twice: combine levers that set different flags."
            )
        flags += part_flags
    return flags


def teacher_lever(lever: str) -> str | None:
    """The part of `lever` that brings its own teacher, if any."""
    own = [part for part in lever.split("+") if part in TEACHER_LEVERS]
    if len(own) > 1:
        raise SystemExit(f"Lever {lever!r} combines {len(own)} teacher levers; at most one can choose the teacher.")
    return own[0] if own else None


def is_lever(variant: str) -> bool:
    return all(part in LEVERS for part in variant.split("+"))


def recipe_of(variant: str) -> str:
    """A run's recipe: its variant without the seed levers ("extra_pairs+seed43" -> "extra_pairs", "seed43" -> "had")."""
    parts = [part for part in variant.split("+") if not (part.startswith("seed") and part[4:].isdigit())]
    return "+".join(parts) or "had"
