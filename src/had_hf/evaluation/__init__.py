"""Evaluation of causal language models, dense or HAD: perplexity, top-1 agreement with a teacher, pass-key
retrieval, multiple-choice accuracy, and a dense top-N attention reference (sparsity without binarization)."""

from .causal_lm import (
    MultipleChoiceQuestion,
    MultipleChoiceResult,
    PerplexityResult,
    multiple_choice_accuracy,
    multiple_choice_prompt,
    perplexity,
    top1_agreement,
)
from .dense_topn import DENSE_TOPN_NAME, topn_dense_reference
from .passkey import PasskeyPrompt, PasskeyRecord, PasskeyResult, passkey_accuracy, passkey_prompt

__all__ = [
    "DENSE_TOPN_NAME",
    "MultipleChoiceQuestion",
    "MultipleChoiceResult",
    "PasskeyPrompt",
    "PasskeyRecord",
    "PasskeyResult",
    "PerplexityResult",
    "multiple_choice_accuracy",
    "multiple_choice_prompt",
    "passkey_accuracy",
    "passkey_prompt",
    "perplexity",
    "top1_agreement",
    "topn_dense_reference",
]
