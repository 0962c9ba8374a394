"""How many sweeps over all keys the prefill threshold kernel makes per row block, simulated on the CPU.

`_threshold_kernel` (`src/had_hf/kernels/prefill_threshold_kernel.py`) finds each row's threshold level by counting
rounds: first on a sample of key tiles, whose quantile is a guess g, then over all keys with a first window of 4
cuts around g, then with cuts spread evenly over what is left, until every row of the block is resolved. A block
costs one sweep over all keys per round, so the rounds after the first are the part that a better guess could save;
the sample's own rounds cost a sweep over its tiles each (reported in sweeps over all of the block's keys).
This script replays that logic in PyTorch, level counts taken from the exact binary scores, at the benchmark's
shapes and inputs (random normal queries and keys: `prefill.py`'s `make_inputs`; the launch settings of
`default_prefill_config`), and counts the full sweeps of every row block. `--window_rounds 2` asks what windows in
the first two full rounds (the second next to the first) would save.

    python benchmarks/prefill_rounds.py --out benchmarks/results/prefill_rounds_cpu.json      # ~4 min on 2 cores
    # smaller or larger samples than the launch settings draw: fixed sizes, or shares of each block's key range
    python benchmarks/prefill_rounds.py --window_rounds 1 --sample_keys 256 512 1024 --sample_shares 0.0625 0.03125 \
        --out benchmarks/results/prefill_rounds_sample_cpu.json

The replay of `_place_cuts` / `_narrow` is checked by its result, not its source: the level it resolves for every
row is the exact threshold of the row's top N (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import machine_record  # noqa: E402

from had_hf.kernels.prefill_launch import default_prefill_config  # noqa: E402
from had_hf.kernels.prefill_tiles import MAX_ROUNDS  # noqa: E402
from had_hf.selection import kept_counts  # noqa: E402

# (name, keys, head dim, causal): the prefill benchmark's shapes that fit a CPU replay
SHAPES = [("B1-H12-d64-n4k", 4096, 64, False), ("B1-H12-d64-n16k", 16384, 64, False),
          ("GQA-B1-H32/8-d128-n16k-causal", 16384, 128, True)]  # fmt: skip


def place_cuts(A, B, guess, window):
    """The 4 cut levels of a round in (A, B] (the kernel's `_place_cuts`): all levels of a span of at most 4, a window
    of 4 consecutive levels from guess - 1 (clamped into the interval) where `window`, else spread evenly."""
    span = B - A
    small = span <= 4
    window = window & (span > 4)
    start = torch.minimum(torch.maximum(guess - 1, A + 1), B - 3)
    return [
        torch.where(small, torch.minimum(A + j + 1, B), torch.where(window, start + j, A + ((j + 1) * span) // 5))
        for j in range(4)
    ]


def resolve(count_ge, target, guess, window_rounds: int, dim: int) -> tuple[int, torch.Tensor]:
    """Counting rounds until every row with a positive target has one level A (the kernel's `_rounds`):
    count_ge[r, l] = count(u >= l) for levels l = 0..dim + 1. Returns the rounds and the levels."""
    A = torch.zeros_like(target)
    B = A + dim
    live = target > 0
    rounds = 0
    while bool((live & (A != B)).any()):
        if rounds == MAX_ROUNDS:
            raise RuntimeError(f"rows left unresolved after {MAX_ROUNDS} rounds")
        pending = live & (A != B)
        cuts = place_cuts(A, B, guess, torch.tensor(rounds < window_rounds))
        counts = [count_ge.gather(1, cut.clamp(0, dim + 1)[:, None])[:, 0] for cut in cuts]
        j = sum((count >= target).long() for count in counts)[:, None]
        new_a = torch.stack([A, *cuts], 1).gather(1, j)[:, 0]
        new_b = torch.stack([*(cut - 1 for cut in cuts), B], 1).gather(1, j)[:, 0]
        A, B = torch.where(pending, new_a, A), torch.where(pending, new_b, B)
        rounds += 1
    return rounds, A


def level_counts(levels: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """count(u >= l) per row for l = 0..dim + 1 over the valid keys."""
    hist = torch.zeros(levels.shape[0], dim + 2, dtype=torch.long)
    hist.scatter_add_(1, torch.where(valid, levels, dim + 1), valid.long())
    return hist.flip(1).cumsum(1).flip(1)


def block_sample_tiles(
    config_tiles: int, block_n: int, range_tiles: int, sample_keys: int | None, sample_share: float | None
) -> int:
    """The sample tiles of a row block: the launch setting's (the kernel), a fixed number of keys, or a share of the
    block's key range (at least one tile, at most the launch setting's)."""
    if sample_keys is not None:
        return max(1, sample_keys // block_n)
    if sample_share is not None:
        return max(1, min(config_tiles, int(range_tiles * sample_share)))
    return config_tiles


def replay_shape(
    name: str,
    n: int,
    dim: int,
    causal: bool,
    window_rounds: list[int],
    seed: int,
    sample_keys: int | None = None,
    sample_share: float | None = None,
) -> dict:
    """Full sweeps per row block of one head at one shape, for each number of window rounds (the sample as the
    kernel draws it, or of `sample_keys` keys, or a `sample_share` of each block's key range)."""
    config = default_prefill_config(dim, dim, n)
    block_m, block_n = config.block_m, config.block_n
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(n, dim, generator=generator).sign()
    key = torch.randn(n, dim, generator=generator).sign()
    sweeps = {rounds: [] for rounds in window_rounds}
    far_rows = 0
    sample_sweeps = []  # per sampled block: its rounds over the sample, in sweeps over all its keys
    one_sweep, sample_keys_read = 0, 0  # keys read by one sweep of every block; keys read by the samples' rounds
    keys_read = {rounds: 0 for rounds in window_rounds}  # keys read by the full sweeps
    for m0 in range(0, n, block_m):
        rows = torch.arange(m0, min(n, m0 + block_m))
        kv_end = int(rows[-1]) + 1 if causal else n
        keys = torch.arange(kv_end)
        valid = keys[None, :] <= rows[:, None] if causal else torch.ones(len(rows), kv_end, dtype=torch.bool)
        levels = ((query[rows] @ key[:kv_end].T + dim) / 2).long()
        target = kept_counts(valid.sum(1), None, 0.117).long()
        guess = torch.zeros_like(target)
        window = 0
        range_tiles = -(-kv_end // block_n)
        sample_tiles = block_sample_tiles(config.sample_tiles, block_n, range_tiles, sample_keys, sample_share)
        if range_tiles > sample_tiles:  # the sample's tiles, its target scaled to its share of the range
            tiles = [(2 * i + 1) * range_tiles // (2 * sample_tiles) for i in range(sample_tiles)]
            sample = torch.cat([torch.arange(t * block_n, min(kv_end, (t + 1) * block_n)) for t in tiles])
            scaled = (target * (sample_tiles * block_n) + kv_end // 2) // kv_end
            sample_target = torch.where(target > 0, scaled.clamp(min=1), 0)
            counts = level_counts(levels[:, sample], valid[:, sample], dim)
            sample_rounds, guess = resolve(counts, sample_target, guess, 0, dim)
            sample_sweeps.append(sample_rounds * len(sample) / kv_end)
            sample_keys_read += sample_rounds * len(sample)
            window = max(window_rounds)
        counts = level_counts(levels, valid, dim)
        exact = None
        one_sweep += kv_end
        for rounds in window_rounds:
            used, level = resolve(counts, target, guess, min(rounds, window), dim)
            sweeps[rounds].append(used)
            keys_read[rounds] += used * kv_end
            exact = level
        far_rows += int(((exact - guess).abs() > 1).sum()) if window else 0
    return {
        "shape": name, "n": n, "head_dim": dim, "causal": causal, "block_m": block_m, "block_n": block_n,
        "sample_tiles": config.sample_tiles, "sample_keys": sample_keys, "sample_share": sample_share,
        "row_blocks": len(sweeps[window_rounds[0]]),
        "rows_with_threshold_beyond_guess_pm1": far_rows,
        "sampled_blocks": len(sample_sweeps),
        "sample_rounds_in_full_sweeps": sum(sample_sweeps) / max(1, len(sample_sweeps)),
        # all blocks together, weighted by their keys: the work of the pass in sweeps over all keys
        "key_weighted_sweeps": {
            str(rounds): {"full": keys_read[rounds] / one_sweep, "sample": sample_keys_read / one_sweep}
            for rounds in window_rounds
        },
        "full_sweeps": {
            str(rounds): {"mean": sum(used) / len(used), "histogram": dict(sorted(Counter(used).items()))}
            for rounds, used in sweeps.items()
        },
    }  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=[shape[0] for shape in SHAPES])
    parser.add_argument("--window_rounds", type=int, nargs="*", default=[1, 2], help="1: the kernel as it is")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample_keys", type=int, nargs="*", default=[],
                        help="also replay with samples of these many keys per block")  # fmt: skip
    parser.add_argument("--sample_shares", type=float, nargs="*", default=[],
                        help="also replay with samples of these shares of each block's key range")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = set(args.shapes) - {shape[0] for shape in SHAPES}
    if unknown:
        raise SystemExit(f"Unknown shape(s) {sorted(unknown)}; the shapes: {', '.join(s[0] for s in SHAPES)}.")
    samples = [{}, *({"sample_keys": k} for k in args.sample_keys), *({"sample_share": f} for f in args.sample_shares)]
    rows = [replay_shape(*shape, args.window_rounds, args.seed, **sample)
            for shape in SHAPES if shape[0] in args.shapes for sample in samples]  # fmt: skip
    machine = machine_record("cpu")
    result = {"benchmark": "prefill_rounds", "seed": args.seed, "one_head": True, "top_n_ratio": 0.117,
              **{key: machine[key] for key in ("torch", "command")}, "rows": rows}  # fmt: skip
    for row in rows:
        for rounds, sweeps in row["full_sweeps"].items():
            drawn = f"sample keys {row['sample_keys']}, share {row['sample_share']}"
            print(f"{row['shape']:<32} {drawn}: window rounds {rounds}: {sweeps['mean']:.3f} full sweeps per block "
                  f"{sweeps['histogram']}")  # fmt: skip
        weighted = row["key_weighted_sweeps"][str(args.window_rounds[0])]
        print(f"{'':<32} the sample's rounds: {row['sample_rounds_in_full_sweeps']:.3f} full sweeps per sampled block; "
              f"weighted by keys: {weighted['full']:.3f} full + {weighted['sample']:.3f} sample")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
