"""GLUE's metrics as transformers' `run_glue` example computes them: `evaluate.load("glue", task)`.

Where that module cannot be loaded (no network and no cached copy: the Hub is the only place `evaluate` finds it),
`OfflineGlueMetric` gives the same definitions from scikit-learn and scipy: accuracy, F1 of the positive class
(MRPC, QQP), Matthews correlation (CoLA), Pearson and Spearman correlations (STS-B), under the same names.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

GLUE_METRIC = "glue"  # the `evaluate` module's Hub name
CONFIG_NAMES = (
    "sst2",
    "mnli",
    "mnli_mismatched",
    "mnli_matched",
    "cola",
    "stsb",
    "mrpc",
    "qqp",
    "qnli",
    "rte",
    "wnli",
)


class Metric(Protocol):
    def compute(self, *, predictions: Any, references: Any) -> dict[str, float]: ...


class OfflineGlueMetric:
    """The `evaluate` GLUE metric of one task (`config_name`), computed with scikit-learn and scipy."""

    def __init__(self, config_name: str):
        if config_name not in CONFIG_NAMES:
            raise KeyError(f"GLUE has no metric for {config_name!r}; choose one of {list(CONFIG_NAMES)}.")
        self.config_name = config_name

    def compute(self, *, predictions: Any, references: Any) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import f1_score, matthews_corrcoef

        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        metrics = {"accuracy": float((predictions == references).mean())}
        if self.config_name in ("mrpc", "qqp"):
            metrics["f1"] = float(f1_score(y_true=references, y_pred=predictions))
        return metrics


@functools.cache
def load_glue_metric(config_name: str, path: str = GLUE_METRIC) -> Metric:
    """`evaluate.load(path, config_name)`, or `OfflineGlueMetric(config_name)` where `evaluate` is not installed
    or cannot find the module (loaded once per process)."""
    try:
        import evaluate

        return evaluate.load(path, config_name)
    except (ImportError, OSError, ConnectionError) as error:  # evaluate reports a module it cannot find as OSError
        logger.info("GLUE metric %r from scikit-learn/scipy (evaluate.load failed: %s)", config_name, error)
        return OfflineGlueMetric(config_name)


def glue_metrics(task, logits: np.ndarray, labels: np.ndarray, metric: Metric | None = None) -> dict[str, float]:
    """GLUE's metrics of `task` (a `recipes.common.glue.GlueTask`) from model outputs: the regression score of
    STS-B, the arg-max class of the others."""
    logits = np.asarray(logits)
    predictions = logits.reshape(-1) if task.is_regression else logits.argmax(axis=-1)
    metric = metric or load_glue_metric(task.name)
    return {name: float(value) for name, value in metric.compute(predictions=predictions, references=labels).items()}
