"""Where the time of a decode step goes: the CUDA kernels of one timed `generate()` of `generate.py`, per variant.

Runs one row of `benchmarks/generate.py` (the random-weight Llama: eager sdpa, sdpa with a compiled `StaticCache`, HAD
compiled) with the profiler around each variant's timed `generate()`, and writes each variant's kernel table (CUDA
time, calls) to a text file with the machine and the command. The profiler slows the step, so the per-token times in
the header are above `generate.py`'s; the tables are for where the time goes, `generate.json` for how much:

    PYTHONPATH=src python benchmarks/generate_profile.py --batch 1 --n 4096 --out $OUT/generate_profile_llama_b1_4k.txt

`--sink_keys k` profiles the HAD model with attention sinks (`HADConfig(sink_keys=k)`), as `generate.py`'s option.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402


def profiled_generate(tables: list[str], row_limit: int):
    """`generate` of the model class, profiled on each variant's timed call (the third: two warm-ups come first)."""
    from torch.profiler import ProfilerActivity, profile

    calls = {"n": 0}

    def wrap(original):
        def generate_profiled(self, *args, **kwargs):
            if kwargs.get("disable_compile"):  # the eager HAD run that checks the tokens
                return original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] % 3:
                return original(self, *args, **kwargs)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                output = original(self, *args, **kwargs)
                torch.cuda.synchronize()
            tokens = kwargs.get("max_new_tokens")
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=90)
            tables.append(f"## variant {len(tables) + 1} of the row ({tokens} new tokens)\n{table}")
            return output

        return generate_profiled

    return wrap


def build_parser() -> argparse.ArgumentParser:
    """This script's options: the row's shape and output, and the options of `generate.run_row` (`--new-tokens`,
    `--warmup-tokens`, `--sink_keys`)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[generate.row_options()]
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n", type=int, default=4096, help="context length")
    parser.add_argument("--rows", type=int, default=30, help="kernels listed per variant")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("generate_profile.py profiles CUDA kernels: it needs a GPU.")
    import transformers

    device = torch.device("cuda")
    model = generate.llama_model(device)
    tables: list[str] = []
    model_class = type(model)
    original = model_class.generate
    model_class.generate = profiled_generate(tables, args.rows)(original)
    try:
        config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
        row = generate.run_row(model, "llama-random-8l-2048", args.batch, args.n, args, device, config)
    finally:
        model_class.generate = original
    names = ("sdpa_eager", "sdpa_static", "had")
    header = [
        f"command: python {' '.join(sys.argv)}",
        f"machine: {torch.cuda.get_device_name()}, {platform.platform()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        f"row: batch {args.batch}, n {args.n}, sink keys {args.sink_keys}; variants in order: {', '.join(names)}",
        "ms per token (profiled run): " + ", ".join(f"{k} {row[k].get('ms_per_token')}" for k in names),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header) + "\n\n" + "\n\n".join(tables) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
