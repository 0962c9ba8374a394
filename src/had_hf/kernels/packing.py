"""The import path `had_hf.cache` uses for the int32 sign words; the module is `had_hf.kernels.int32_words`."""

from .int32_words import WORD_BITS, pack_sign_bits

__all__ = ["WORD_BITS", "pack_sign_bits"]
