"""Golden vectors: what HAD attention computes on sample inputs, in the bit layout a CAM stores.

For every binarized attention layer and every sample, the exporter records the signs of the queries and keys packed
into uint64 words (see `uint64_words.py`), the mask of valid keys, the kept key indices and their attention weights, the
value rows and the attention output; plus the model inputs and outputs. `write_golden` stores them in
`golden/golden.safetensors` with a `manifest.json` and a `README.md`; `load_golden` reads them back as numpy arrays.

The recording runs the attention function in the `hamming_topk_golden` mode (`had_hf.modes.GOLDEN`): the binary
attention with the one selection rule, recording its signs, kept keys, weights and value rows in the capture store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attention import layer_settings
from ..capture import STORE_KWARG, HADCaptureStore
from ..integration import attention_module_names
from ..modes import GOLDEN
from ..selection import kept_indices, kept_slots
from .uint64_words import WORD_BITS, num_words, pack_signs

GOLDEN_ATTENTION_NAME = GOLDEN.name
GOLDEN_DIRNAME = "golden"
GOLDEN_FILENAME = "golden.safetensors"
MANIFEST_FILENAME = "manifest.json"
README_FILENAME = "README.md"
GOLDEN_FORMAT = "had_hf.golden"

LAYER_ARRAYS = ("query_bits", "key_bits", "valid", "kept_indices", "kept_weights", "value", "attention_output")


@dataclass
class GoldenLayer:
    """The golden data of one attention layer. Arrays have a leading sample axis S; H heads, q queries, k keys.

    Args:
        index (`int`): position of the layer among the recorded layers.
        name (`str`): the attention module's name in the model.
        num_heads (`int`): H (query heads; keys and values are expanded to them for grouped-query attention).
        head_dim (`int`): d, the number of sign bits per query or key.
        top_n (`int`): N at this layer's number of keys.
        sink_keys (`int`, *optional*, defaults to 0): attention sinks: each query also keeps its first `sink_keys`
            valid keys, so the kept-key arrays have `min(top_n + sink_keys, keys)` slots.
        sigma_q (`float`), sigma_k (`float`): the layer's standardization coefficients.
        scaling (`float`): the model's logit scale s; alpha = sigma_q * sigma_k * s.
        num_kv_heads (`int`, *optional*): key/value heads; query head h reads key/value head
            `h // (num_heads // num_kv_heads)` (grouped-query attention). Defaults to `num_heads`.
        arrays (`dict[str, np.ndarray]`): `query_bits` (S, H, q, W) uint64, `key_bits` (S, H, k, W) uint64,
            `valid` (S, 1, q, k) uint8 (broadcast over heads), `kept_indices` (S, H, q, M) int32 (-1 = empty slot;
            M = N, or min(N + sink_keys, k) with sinks), `kept_weights` (S, H, q, M) float32, `value` (S, H, k, d)
            float32, `attention_output` (S, H, q, d) float32.
    """

    index: int
    name: str
    num_heads: int
    head_dim: int
    top_n: int
    sigma_q: float
    sigma_k: float
    scaling: float
    num_kv_heads: int | None = None
    sink_keys: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads

    @property
    def alpha(self) -> float:
        return self.sigma_q * self.sigma_k * self.scaling

    def __getattr__(self, name: str) -> np.ndarray:
        # arrays read as attributes: layer.query_bits, layer.kept_indices, ...
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"GoldenLayer has no attribute {name!r}")

    def metadata(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "words_per_vector": num_words(self.head_dim),
            "top_n": self.top_n,
            "sink_keys": self.sink_keys,
            "sigma_q": self.sigma_q,
            "sigma_k": self.sigma_k,
            "scaling": self.scaling,
            "alpha": self.alpha,
            "arrays": {
                key: {"shape": list(value.shape), "dtype": str(value.dtype)} for key, value in self.arrays.items()
            },
        }


@dataclass
class GoldenData:
    """Everything in a `golden/` folder: model inputs and outputs, the layers, and the manifest."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    layers: list[GoldenLayer]
    manifest: dict[str, Any]

    def layer(self, name: str) -> GoldenLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"No golden data for layer {name!r}; recorded: {[layer.name for layer in self.layers]}.")


def kept_indices_and_weights(keep: torch.Tensor, weights: torch.Tensor, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept key indices of every row in increasing order, in `slots` columns (-1 where a row keeps fewer), and
    their weights."""
    if int(keep.sum(dim=-1).max()) > slots:
        raise ValueError(f"A row keeps more than {slots} keys; the attention selection is inconsistent.")
    indices, present = kept_indices(keep, slots)
    kept_weights = weights.gather(-1, indices) * present.to(weights.dtype)
    indices = torch.where(present, indices, torch.full_like(indices, -1))
    return indices.to(torch.int32).cpu().numpy(), kept_weights.float().cpu().numpy()


@torch.no_grad()
def collect_golden(
    model: torch.nn.Module, samples: Sequence[Mapping[str, torch.Tensor]], forward_kwargs: Mapping[str, Any]
) -> tuple[list[GoldenLayer], dict[str, np.ndarray]]:
    """Runs `model` on each sample (a batch of one) and records the golden data of every binarized layer.

    Args:
        model (`PreTrainedModel`): a HAD model with attention `hamming_topk`, in eval mode.
        samples (`list[dict[str, torch.Tensor]]`): model inputs, each with batch size 1 and the same shapes.
        forward_kwargs (`dict`): extra arguments of every forward (e.g. `use_cache=False`).

    Returns:
        `(layers, outputs)`: the `GoldenLayer`s in module order, and the model's tensor outputs stacked over samples.
    """
    modules = {model.get_submodule(n)._had_name: model.get_submodule(n) for n in attention_module_names(model)}
    names = list(modules)
    per_layer: dict[str, dict[str, list[np.ndarray]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    previous = model.config._attn_implementation
    model.set_attn_implementation(GOLDEN_ATTENTION_NAME)
    try:
        for sample in samples:
            store = HADCaptureStore(capture_logits=True, capture_details=True)
            result = model(**sample, **forward_kwargs, **{STORE_KWARG: store})
            for key, value in result.items():
                if isinstance(value, torch.Tensor):
                    outputs.setdefault(key, []).append(value[0].float().cpu().numpy())
            for name in names:
                if name not in store.details:
                    continue  # a layer that HAD leaves dense (cross-attention with binarize_cross_attention=False)
                details = store.details[name]
                settings = layer_settings(modules[name])
                num_keys = details["key_sign"].shape[-2]
                top_n, sink_keys = settings.config.num_kept(num_keys), settings.config.sink_keys
                slots = kept_slots(num_keys, **settings.config.num_kept_args)
                indices, kept_weights = kept_indices_and_weights(details["keep"], details["weights"], slots)
                sigma_q, sigma_k = settings.config.sigmas(name, settings.aliases)
                meta[name] = {
                    "num_heads": details["query_sign"].shape[1],
                    "num_kv_heads": details["query_sign"].shape[1]
                    // getattr(modules[name], "num_key_value_groups", 1),
                    "head_dim": details["query_sign"].shape[-1],
                    "top_n": top_n,
                    "sink_keys": sink_keys,
                    "sigma_q": sigma_q,
                    "sigma_k": sigma_k,
                    "scaling": float(details["alpha"]) / (sigma_q * sigma_k),
                }
                valid = store.valid[name].expand(1, -1, *details["keep"].shape[-2:])
                arrays = per_layer.setdefault(name, {key: [] for key in LAYER_ARRAYS})
                arrays["query_bits"].append(pack_signs(details["query_sign"][0]))
                arrays["key_bits"].append(pack_signs(details["key_sign"][0]))
                arrays["valid"].append(valid[0].to(torch.uint8).cpu().numpy())
                arrays["kept_indices"].append(indices[0])
                arrays["kept_weights"].append(kept_weights[0])
                arrays["value"].append(details["value"][0].float().cpu().numpy())
                arrays["attention_output"].append(details["output"][0].float().cpu().numpy())
    finally:
        model.set_attn_implementation(previous)
    if not per_layer:
        raise ValueError("No attention layer recorded golden data: the model has no binarized (HAD) attention layer.")
    layers = [
        GoldenLayer(index=index, name=name, **meta[name], arrays={k: np.stack(v) for k, v in per_layer[name].items()})
        for index, name in enumerate(name for name in names if name in per_layer)
    ]
    return layers, {key: np.stack(values) for key, values in outputs.items()}


def write_golden(
    directory: str | Path,
    layers: Sequence[GoldenLayer],
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    extra_manifest: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Writes `golden.safetensors`, `manifest.json` and `README.md` into `directory` (created)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"inputs.{name}": np.ascontiguousarray(value) for name, value in inputs.items()}
    tensors.update({f"outputs.{name}": np.ascontiguousarray(value) for name, value in outputs.items()})
    for layer in layers:
        tensors.update({f"layers.{layer.index}.{key}": np.ascontiguousarray(v) for key, v in layer.arrays.items()})
    manifest = {
        "format": GOLDEN_FORMAT,
        "version": 1,
        "file": GOLDEN_FILENAME,
        "bit_layout": (
            f"uint64 words; bit i (least significant = 0) of word j is dimension {WORD_BITS}*j + i; a set bit is +1 "
            "(the value was >= 0), a clear bit -1; bits at and beyond head_dim are 0"
        ),
        "samples": int(next(iter(inputs.values())).shape[0]),
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        "outputs": {name: list(value.shape) for name, value in outputs.items()},
        "layers": [layer.metadata() for layer in layers],
        **(extra_manifest or {}),
    }
    paths = [directory / GOLDEN_FILENAME, directory / MANIFEST_FILENAME, directory / README_FILENAME]
    save_file(tensors, str(paths[0]), metadata={"format": GOLDEN_FORMAT, "version": "1"})
    paths[1].write_text(json.dumps(manifest, indent=2) + "\n")
    paths[2].write_text(render_readme(manifest))
    return paths


def load_golden(path: str | Path) -> GoldenData:
    """Reads golden data written by the exporter.

    Args:
        path (`str` or `Path`): the `golden/` folder, or the export folder that contains it.

    Returns:
        `GoldenData`: `inputs`, `outputs` (dicts of numpy arrays), `layers` (`GoldenLayer`s with their arrays) and
        the `manifest`.
    """
    from safetensors.numpy import load_file

    directory = Path(path)
    if not (directory / MANIFEST_FILENAME).is_file() and (directory / GOLDEN_DIRNAME / MANIFEST_FILENAME).is_file():
        directory = directory / GOLDEN_DIRNAME
    manifest_path = directory / MANIFEST_FILENAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"No golden data at {path}: {MANIFEST_FILENAME} not found (looked in {directory}).")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{manifest_path} is not a had_hf golden manifest (format {manifest.get('format')!r}).")
    tensors = load_file(str(directory / manifest["file"]))
    inputs = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith("inputs.")}
    outputs = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith("outputs.")}
    layers = []
    for entry in manifest["layers"]:
        prefix = f"layers.{entry['index']}."
        arrays = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        fields = {
            k: entry[k] for k in ("index", "name", "num_heads", "head_dim", "top_n", "sigma_q", "sigma_k", "scaling")
        }
        fields["num_kv_heads"] = entry.get("num_kv_heads")
        fields["sink_keys"] = entry.get("sink_keys", 0)
        layers.append(GoldenLayer(**fields, arrays=arrays))
    return GoldenData(inputs=inputs, outputs=outputs, layers=layers, manifest=manifest)


def render_readme(manifest: Mapping[str, Any]) -> str:
    """The README of a golden folder: bit layout, arrays, formulas, and how to check a design against them."""
    first = manifest["layers"][0]
    layer_rows = "\n".join(
        f"| {entry['index']} | `{entry['name']}` | {entry['num_heads']} | {entry.get('num_kv_heads', entry['num_heads'])} | {entry['head_dim']} | {entry['top_n']} | "
        f"{entry.get('sink_keys', 0)} | "
        f"{entry['sigma_q']:.6g} | {entry['sigma_k']:.6g} | {entry['alpha']:.6g} |"
        for entry in manifest["layers"]
    )
    return f"""# HAD golden vectors

Reference data for checking a hardware design (RTL, simulator, CAM model) of HAD attention against the model:
{manifest["samples"]} sample input(s), every binarized attention layer, every head. Written by `had-hf export`;
read with `had_hf.export.load_golden("{GOLDEN_DIRNAME}")` or any safetensors reader.

## Files

- `{manifest["file"]}`: all arrays (safetensors, little-endian).
- `{MANIFEST_FILENAME}`: shapes, dtypes and per-layer scalars (sigma_q, sigma_k, the logit scale s, alpha, N).

## Bit layout of the binarized queries and keys

Each query or key vector of one head (head_dim = d bits) is `W = ceil(d / 64)` **uint64** words:

- bit `i` (bit 0 = least significant) of word `j` holds dimension `64*j + i`;
- a set bit is **+1** (the value was >= 0, so sign(0) = +1), a clear bit is **-1**;
- bits at and beyond `d` in the last word are 0 in queries and keys alike, so they never count in a XOR.

For this model d = {first["head_dim"]}, so W = {first["words_per_vector"]}.

## Arrays (S samples, H heads, q queries, k keys, N kept keys, d head_dim)

| key | shape | dtype | meaning |
|---|---|---|---|
| `inputs.<name>` | (S, ...) | model input | the sample inputs (`attention_mask`: 1 = real token, 0 = padding; `token_type_ids`, for models that read segments: 0 = first sentence, 1 = second) |
| `outputs.<name>` | (S, ...) | float32 | the model's outputs on them (e.g. `logits`) |
| `layers.<l>.query_bits` | (S, H, q, W) | uint64 | packed signs of the queries |
| `layers.<l>.key_bits` | (S, H, k, W) | uint64 | packed signs of the keys (key/value heads repeated per query head: query head h reads key/value head h // (H / H_kv), H_kv in the table below) |
| `layers.<l>.valid` | (S, 1, q, k) | uint8 | 1 where query q may attend key k (padding, causality); broadcast over heads |
| `layers.<l>.kept_indices` | (S, H, q, M) | int32 | the kept keys of each query, increasing; -1 = empty slot (M = N; min(N + k, keys) with k sinks) |
| `layers.<l>.kept_weights` | (S, H, q, M) | float32 | their attention weights (0 in empty slots; each row sums to 1) |
| `layers.<l>.value` | (S, H, k, d) | float32 | the value rows the weights multiply (repeated per query head like the keys) |
| `layers.<l>.attention_output` | (S, H, q, d) | float32 | A.V, the attention output of each head |

## What the hardware computes

    Sb[q, k]   = d - 2 * popcount(query_bits[q] XOR key_bits[k])          (integer in [-d, d])
    kept       = the N largest Sb[q, k] over valid keys; among equal scores the lower key index wins;
                 a row with fewer than N valid keys keeps all of them;
                 with attention sinks (column "sinks" below, k > 0) a row also keeps its first k valid keys
    weights    = softmax(alpha * Sb[q, kept]),  alpha = sigma_q * sigma_k * s
    output[q]  = sum over kept k of weights[k] * value[k]

Models with an additive position bias (T5) rank and normalize `alpha * Sb + bias`; the bias is not stored here, so
for them the kept set cannot be recomputed from the bits alone.

## Layers

| l | module | H | H_kv | d | N | sinks | sigma_q | sigma_k | alpha |
|---|---|---|---|---|---|---|---|---|---|
{layer_rows}

## Check in numpy

```python
import numpy as np
from had_hf.export import load_golden
from had_hf.export.uint64_words import binary_scores

golden = load_golden("{GOLDEN_DIRNAME}")
layer = golden.layers[0]
scores = binary_scores(layer.query_bits, layer.key_bits, layer.head_dim)  # (S, H, q, k) = d - 2 * hamming
valid = np.broadcast_to(layer.valid.astype(bool), scores.shape)
scores = np.where(valid, scores, -layer.head_dim - 1)  # below every score
order = np.argsort(-scores, axis=-1, kind="stable")[..., : layer.top_n]  # stable: lower index first among ties
kept = np.zeros(scores.shape, dtype=bool)
np.put_along_axis(kept, order, np.take_along_axis(valid, order, -1), axis=-1)
kept |= valid & (np.cumsum(valid, axis=-1) <= layer.sink_keys)  # attention sinks: the first valid keys
empty = np.iinfo(np.int32).max
indices = np.sort(np.where(kept, np.arange(kept.shape[-1]), empty), axis=-1)[..., : layer.kept_indices.shape[-1]]
assert (np.where(indices == empty, -1, indices) == layer.kept_indices).all()
```
"""
