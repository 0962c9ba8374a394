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

try:
    __version__ = version("had-hf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

register()

__all__ = [
    "HADCaptureStore",
    "HADConfig",
    "UnsupportedModelError",
    "__version__",
    "calibrate",
    "convert",
    "register",
    "revert",
]
