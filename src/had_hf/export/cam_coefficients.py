"""The coefficients of the CAM cost model: every figure with its unit and source, read from a JSON file
(`coefficients/default.json` unless the user passes their own) and validated."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

COMPONENTS = ("qk", "topn", "softmax", "av")
COMPONENT_LABELS = {"qk": "Q.K^T", "topn": "top-N", "softmax": "softmax", "av": "A.V"}
DESIGNS = ("bf16", "had")
DESIGN_LABELS = {"bf16": "BF16 attention", "had": "HAD-CAM"}
METRICS = ("area_mm2", "power_w", "energy_per_token_nj", "latency_cycles")
METRIC_LABELS = {
    "area_mm2": "area (mm2)",
    "power_w": "power (W)",
    "energy_per_token_nj": "energy per token (nJ)",
    "latency_cycles": "latency (cycles)",
}

COEFFICIENTS_FORMAT = "had_hf.cam_coefficients"


# Every key a coefficient file must define; the values of the first group must be > 0 (they divide or set scales).
_POSITIVE_KEYS = (
    "reference.n_keys",
    "reference.width",
    "reference.top_n",
    "clock_mhz",
    "initiation_interval_cycles",
    "bf16.bits_per_element",
)
_NONNEGATIVE_KEYS = (
    *(
        f"{design}.{component}.{quantity}"
        for design in DESIGNS
        for component in COMPONENTS
        for quantity in ("area_mm2", "power_w")
    ),
    "cycles.cam_search",
    "cycles.adc",
    "cycles.scaler",
    "cycles.topn_merge",
    "cycles.softmax_lut",
    "cycles.softmax_accumulator",
    "cycles.softmax_divider",
    "cycles.bf16_mac",
    "cell.area_um2",
    "cell.peripheral_fraction",
    "cell.search_energy_fj_per_bit",
    "cell.write_energy_fj_per_bit",
)
REQUIRED_COEFFICIENTS = tuple(sorted(_POSITIVE_KEYS + _NONNEGATIVE_KEYS))

SOURCES = (
    "HAD paper: 'Hamming Attention Distillation: Binarizing Keys and Queries for Efficient Long-Context "
    "Transformers', hardware table (one query against 256 keys of width 1024; Synopsys Design Compiler on a small "
    "module, scaled to the full design).",
    "CAMformer, a later CAM attention accelerator by an author of the HAD paper: github.com/tmo324/CAMformerV1, "
    "file data/inputs/hardware_modules.csv (per-module delay, power, area), and its cell-level CAM model "
    "(10T1C binary-attention CAM cell, 28 nm).",
)


class CoefficientError(ValueError):
    """A coefficient file is missing a key, has an unknown one, or holds a value that is not allowed."""


@dataclass(frozen=True)
class Coefficient:
    """One figure of the cost model, with its unit and where it comes from."""

    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class CAMCoefficients:
    """The validated figures of a coefficient file.

    Args:
        entries (`dict[str, Coefficient]`): every key of `REQUIRED_COEFFICIENTS`.
        path (`str`): the file they were read from (`"default"` for the packaged defaults).
    """

    entries: Mapping[str, Coefficient]
    path: str = "default"

    def __getitem__(self, name: str) -> float:
        return self.entries[name].value

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(entry) for name, entry in sorted(self.entries.items())}


def default_coefficients_path() -> Path:
    """The coefficient file shipped inside the package."""
    return Path(str(resources.files("had_hf.export") / "coefficients" / "default.json"))


def load_coefficients(path: str | Path | None = None) -> CAMCoefficients:
    """Reads and validates a coefficient file.

    Args:
        path (`str` or `Path`, *optional*):
            A JSON file in the format of `coefficients/default.json`: `{"coefficients": {name: {"value": number,
            "unit": str, "source": str}}}` with every name of `REQUIRED_COEFFICIENTS`. Defaults to the packaged file.

    Raises:
        `CoefficientError`: the file is not JSON, lacks a key, has an unknown key, or a value is not a finite number
        in its allowed range; the message names the file and the key.
    """
    file = Path(path) if path is not None else default_coefficients_path()
    label = "default" if path is None else str(file)
    try:
        document = json.loads(file.read_text())
    except FileNotFoundError:
        raise CoefficientError(f"Coefficient file {file} does not exist.") from None
    except json.JSONDecodeError as error:
        raise CoefficientError(f"Coefficient file {file} is not valid JSON: {error}.") from None
    return parse_coefficients(document, label)


def parse_coefficients(document: Any, label: str = "<dict>") -> CAMCoefficients:
    """Validates an already-parsed coefficient document (see `load_coefficients`)."""
    if not isinstance(document, dict) or not isinstance(document.get("coefficients"), dict):
        raise CoefficientError(f"Coefficient file {label} must be a JSON object with a 'coefficients' object.")
    if document.get("format", COEFFICIENTS_FORMAT) != COEFFICIENTS_FORMAT:
        raise CoefficientError(
            f"Coefficient file {label} has format {document['format']!r}, expected {COEFFICIENTS_FORMAT!r}."
        )
    raw = document["coefficients"]
    missing = [name for name in REQUIRED_COEFFICIENTS if name not in raw]
    if missing:
        raise CoefficientError(f"Coefficient file {label} is missing the coefficient(s) {', '.join(missing)}.")
    unknown = sorted(set(raw) - set(REQUIRED_COEFFICIENTS))
    if unknown:
        raise CoefficientError(
            f"Coefficient file {label} has unknown coefficient(s) {', '.join(unknown)} (a typo?). Known names: "
            f"{', '.join(REQUIRED_COEFFICIENTS)}."
        )
    entries = {}
    for name in REQUIRED_COEFFICIENTS:
        entry = raw[name]
        if not isinstance(entry, dict):
            raise CoefficientError(f"Coefficient {name!r} in {label} must be an object with value, unit and source.")
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CoefficientError(
                f"Coefficient {name!r} in {label} must have a finite numeric 'value', got {value!r}."
            )
        minimum_ok = value > 0 if name in _POSITIVE_KEYS else value >= 0
        if not minimum_ok:
            bound = "> 0" if name in _POSITIVE_KEYS else ">= 0"
            raise CoefficientError(f"Coefficient {name!r} in {label} must be {bound}, got {value!r}.")
        for field_name in ("unit", "source"):
            if not isinstance(entry.get(field_name), str) or not entry[field_name].strip():
                raise CoefficientError(f"Coefficient {name!r} in {label} needs a non-empty string {field_name!r}.")
        entries[name] = Coefficient(float(value), entry["unit"], entry["source"])
    return CAMCoefficients(entries, label)
