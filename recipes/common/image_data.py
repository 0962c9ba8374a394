"""Image classification data for the recipes: a `datasets` dataset (Hub name or `imagefolder`) with its splits, the
image processor's transforms, top-1 / top-5 accuracy, and the small synthetic image folder of the embedded default
(no real images ship offline).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

SYNTHETIC_CLASSES = 10
"""Classes of the synthetic folder: one hue each, so that top-5 accuracy means something."""


def write_synthetic_image_folder(
    folder: str | Path, image_size: int = 56, train_per_class: int = 24, eval_per_class: int = 8, seed: int = 0
) -> Path:
    """Writes an `imagefolder` layout (`train/<class>/*.png`, `validation/<class>/*.png`) of noisy single-hue
    images: class k has a hue within 0.05 of k / 10 (neighbouring classes touch), with random brightness,
    saturation, a darker square at a random place and pixel
    noise. Learnable by a tiny ViT in a few hundred steps; it stands in for real data, it is not a benchmark."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("validation", eval_per_class)):
        for label in range(SYNTHETIC_CLASSES):
            class_dir = folder / split / f"hue{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                hue = (label + rng.uniform(-0.5, 0.5)) / SYNTHETIC_CLASSES
                rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.1, 0.6), rng.uniform(0.4, 1.0))
                image = np.broadcast_to(np.array(rgb) * 255, (image_size, image_size, 3)).copy()
                size = image_size // 3
                top, left = rng.integers(0, image_size - size, size=2)
                image[top : top + size, left : left + size] *= 0.4
                image += rng.normal(0, 40, image.shape)
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(class_dir / f"{index}.png")
    return folder


def load_image_splits(
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.15,
    seed: int = 42,
    cache_dir: str | None = None,
):
    """(train, evaluation split, its name) of a Hub dataset or an `imagefolder`.

    The evaluation split is the dataset's `validation` split, else its `test` split, else `train_val_split` of the
    training split (seeded), as transformers' `run_image_classification.py` does.
    """
    import datasets

    if train_dir is not None or validation_dir is not None:
        data_files = {}
        if train_dir is not None:
            data_files["train"] = str(Path(train_dir) / "**")
        if validation_dir is not None:
            data_files["validation"] = str(Path(validation_dir) / "**")
        splits = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    else:
        splits = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if "train" not in splits:
        raise ValueError(f"The dataset has no train split (it has {sorted(splits)}).")
    for name in ("validation", "test"):
        if name in splits:
            return splits["train"], splits[name], name
    divided = splits["train"].train_test_split(test_size=train_val_split, seed=seed)
    return divided["train"], divided["test"], f"{train_val_split:g} of train"


def class_names(dataset, label_column: str) -> list[str]:
    """The class names of the label column (a `ClassLabel`), or the sorted distinct labels as text."""
    feature = dataset.features[label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(label) for label in sorted(set(dataset[label_column]))]


def limit(dataset, count: int | None, seed: int):
    """A seeded random subset of `count` rows (all rows when `count` is None or larger)."""
    if count is None or count >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))


def with_processor_transform(dataset, image_processor, image_column: str, label_column: str):
    """`dataset` whose rows are the model's inputs (`pixel_values` from the image processor, `labels`), computed
    when read (`datasets.Dataset.with_transform`)."""

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch[label_column]}

    return dataset.with_transform(transform)


def top_k_accuracies(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy (`accuracy`) and, with more than five classes, top-5 accuracy (`top5_accuracy`)."""
    from sklearn.metrics import top_k_accuracy_score

    num_classes = logits.shape[-1]
    metrics = {"accuracy": float((logits.argmax(-1) == labels).mean())}
    if num_classes > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(labels, logits, k=5, labels=np.arange(num_classes)))
    return metrics
