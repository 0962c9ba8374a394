"""How `prefill.py` measures a call: its median time, the time and peak memory of one slow call, the peak memory of
a call, and the same for each SDPA backend (the baseline; `sdpa_backends` is decode.py's list of them too). Smoke runs (the CPU, Triton's interpreter) make one call
where a GPU run would time many, and record no memory.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import triton


def bench_ms(fn, smoke: bool) -> float:
    """Median time of `fn` in milliseconds (smoke runs: one call, to exercise the code)."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_slow(fn, smoke: bool) -> tuple[float, int | None]:
    """Time (ms) and peak memory of one call after one warm-up: the PyTorch path takes seconds at long n."""
    if smoke:
        return bench_ms(fn, smoke), None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)), int(torch.cuda.max_memory_allocated())


def peak_bytes(fn, smoke: bool) -> int | None:
    """Peak of allocated GPU memory during one call (inputs included: they are allocated before and kept)."""
    if smoke:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def sdpa_backends(smoke: bool) -> dict:
    from torch.nn.attention import SDPBackend

    if smoke:
        return {"math": SDPBackend.MATH}
    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def run_sdpa(query, key, value, causal: bool, smoke: bool) -> tuple[dict, dict]:
    """Time and peak memory of each SDPA backend that runs (an error text for those that do not)."""
    from torch.nn.attention import sdpa_kernel

    gqa = query.shape[1] != key.shape[1]
    times: dict = {}
    peaks: dict = {}
    for name, backend in sdpa_backends(smoke).items():

        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=gqa)

        try:
            call()
            times[name] = bench_ms(call, smoke)
            peaks[name] = peak_bytes(call, smoke)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            times[name] = f"unsupported: {error_text(error)}"
        if not smoke:
            torch.cuda.empty_cache()
    return times, peaks
