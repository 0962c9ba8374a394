"""GLUE metrics: `evaluate`'s module path and the scikit-learn/scipy fallback give the same numbers."""

import textwrap

import numpy as np
import pytest
from scipy import stats

from recipes.common.glue import get_task
from recipes.common.glue_metrics import OfflineGlueMetric, glue_metrics, load_glue_metric

evaluate = pytest.importorskip("evaluate")

# A GLUE metric module in evaluate's format, written from the definitions with numpy alone (counts and moments),
# independent of the scikit-learn and scipy functions of the fallback.
REFERENCE_MODULE = """
import datasets
import evaluate
import numpy as np


def _ranks(values):
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # ties share their average rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


class GlueReference(evaluate.Metric):
    def _info(self):
        kind = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description="GLUE metrics from their definitions",
            citation="",
            features=datasets.Features({"predictions": datasets.Value(kind), "references": datasets.Value(kind)}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        p, r = predictions, references
        if self.config_name == "stsb":
            p, r = p.astype(np.float64), r.astype(np.float64)
            return {"pearson": _pearson(p, r), "spearmanr": _pearson(_ranks(p), _ranks(r))}
        tp, tn = float(((p == 1) & (r == 1)).sum()), float(((p == 0) & (r == 0)).sum())
        fp, fn = float(((p == 1) & (r == 0)).sum()), float(((p == 0) & (r == 1)).sum())
        if self.config_name == "cola":
            denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            return {"matthews_correlation": 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator}
        metrics = {"accuracy": float((p == r).mean())}
        if self.config_name in ("mrpc", "qqp"):
            metrics["f1"] = 2 * tp / (2 * tp + fp + fn)
        return metrics
"""


@pytest.fixture(scope="module")
def reference_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics") / "glue_reference"
    folder.mkdir()
    (folder / "glue_reference.py").write_text(textwrap.dedent(REFERENCE_MODULE))
    return str(folder)


def outputs(task_name: str, seed: int = 0, size: int = 64):
    rng = np.random.default_rng(seed)
    if task_name == "stsb":
        labels = rng.integers(0, 11, size) / 2.0  # ties, as in STS-B's 0-5 scores
        scores = labels + rng.normal(scale=1.0, size=size)
        scores[:8] = scores[0]
        return scores[:, None].astype(np.float32), labels.astype(np.float32)
    labels = rng.integers(0, 2, size)
    return rng.normal(size=(size, 2)), labels


@pytest.mark.parametrize("task_name", ["sst2", "mrpc", "cola", "stsb"])
def test_evaluate_module_loaded_from_a_path_agrees_with_the_offline_fallback(reference_module, task_name):
    task = get_task(task_name)
    logits, labels = outputs(task_name)
    loaded = load_glue_metric(task_name, path=reference_module)
    assert isinstance(loaded, evaluate.EvaluationModule), "the module at the path must load through evaluate"
    through_evaluate = glue_metrics(task, logits, labels, metric=loaded)
    offline = glue_metrics(task, logits, labels, metric=OfflineGlueMetric(task_name))
    assert set(through_evaluate) == set(offline)
    for name, value in offline.items():
        assert value == pytest.approx(through_evaluate[name], rel=1e-5, abs=1e-7), name


def test_offline_metrics_against_scipy_and_hand_counts():
    x, y = outputs("stsb", seed=3)
    metrics = glue_metrics(get_task("stsb"), x, y, metric=OfflineGlueMetric("stsb"))
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(x[:, 0], y)[0], rel=1e-6)
    assert metrics["spearmanr"] == pytest.approx(stats.spearmanr(x[:, 0], y)[0], rel=1e-6)

    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    logits = np.eye(2)[[1, 0, 1, 0, 1, 0, 1, 1]]  # tp=3 fn=1 fp=2 tn=2
    mrpc = glue_metrics(get_task("mrpc"), logits, labels, metric=OfflineGlueMetric("mrpc"))
    assert mrpc == pytest.approx({"accuracy": 5 / 8, "f1": 2 * 3 / (2 * 3 + 2 + 1)})
    cola = glue_metrics(get_task("cola"), logits, labels, metric=OfflineGlueMetric("cola"))
    assert cola["matthews_correlation"] == pytest.approx((3 * 2 - 2 * 1) / np.sqrt(5 * 4 * 4 * 3))
    assert set(glue_metrics(get_task("qnli"), logits, labels, metric=OfflineGlueMetric("qnli"))) == {"accuracy"}


def test_the_glue_module_falls_back_offline_where_evaluate_cannot_find_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    metric = load_glue_metric.__wrapped__("rte", path=str(tmp_path / "no-such-metric"))
    assert isinstance(metric, OfflineGlueMetric) and metric.config_name == "rte"
    with pytest.raises(KeyError, match="choose one of"):
        OfflineGlueMetric("squad")
