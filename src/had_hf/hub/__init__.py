"""Model cards for HAD checkpoints and pushing distillation output folders to the Hugging Face Hub.

- `output_dir`: what a distillation output folder holds (the run record `results.json`, the HADConfig in
  `config.json`) and which of its files go to the Hub.
- `record`: the run record of a `HADDistillationTrainer` run, taken from the trainer alone.
- `card`: the model card (`huggingface_hub.ModelCard` from the `hub_cards/model_card.md` template), with its
  tables in `card_rows`.
- `push`: the one-commit push and the `had-hf push` command.

Loading needs nothing from this package: a pushed checkpoint carries its HADConfig as `quantization_config`, which
`import had_hf` teaches transformers to restore (see `had_hf.integration`).
"""

from .card import TEMPLATE_FILENAME, card_template, render_model_card, write_card_files
from .output_dir import (
    CARD_FILENAME,
    RESULTS_FILENAME,
    UPLOAD_PATTERNS,
    HubError,
    OutputDirError,
    check_output_dir,
    check_results,
    load_had_config,
    load_results,
)
from .push import HubPushError, check_repo_id, push_to_hub, retry_command, run_push_command
from .record import metrics_per_stage, model_metrics, run_record

__all__ = [
    "CARD_FILENAME",
    "RESULTS_FILENAME",
    "TEMPLATE_FILENAME",
    "UPLOAD_PATTERNS",
    "HubError",
    "HubPushError",
    "OutputDirError",
    "card_template",
    "check_output_dir",
    "check_repo_id",
    "check_results",
    "load_had_config",
    "load_results",
    "metrics_per_stage",
    "model_metrics",
    "push_to_hub",
    "render_model_card",
    "retry_command",
    "run_push_command",
    "run_record",
    "write_card_files",
]
