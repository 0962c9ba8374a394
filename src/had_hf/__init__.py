"""had_hf: Hamming Attention Distillation for Hugging Face transformers.

`import had_hf` registers the `"hamming_topk"` attention implementation (and its mask function) and the `"had"`
quantization method with transformers, so that

    model = AutoModel.from_pretrained(path, attn_implementation="hamming_topk", quantization_config=HADConfig())

and a plain `from_pretrained` of a saved HAD checkpoint both give HAD attention.
"""

from importlib.metadata import PackageNotFoundError, version

from .calibration import calibrate
from .capture import HADCaptureStore
from .config import HADConfig
from .integration import UnsupportedModelError, convert, register, revert
from .schedule import StageSchedule
from .state import STAGES, HADRuntimeState, set_stage

try:
    __version__ = version("had-hf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

register()


def __getattr__(name: str):
    # The trainer pulls in accelerate and the Trainer stack: import it only when asked for.
    if name in ("HADDistillationTrainer", "HADTrainingArguments", "HADStageCallback"):
        from . import callbacks, trainer, training_args

        return {
            "HADDistillationTrainer": trainer.HADDistillationTrainer,
            "HADTrainingArguments": training_args.HADTrainingArguments,
            "HADStageCallback": callbacks.HADStageCallback,
        }[name]
    raise AttributeError(f"module 'had_hf' has no attribute {name!r}")


__all__ = [
    "HADCaptureStore",
    "HADConfig",
    "HADRuntimeState",
    "HADDistillationTrainer",
    "HADStageCallback",
    "HADTrainingArguments",
    "STAGES",
    "StageSchedule",
    "UnsupportedModelError",
    "__version__",
    "calibrate",
    "convert",
    "register",
    "revert",
    "set_stage",
]
