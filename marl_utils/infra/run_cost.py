"""Seconds and peak memory of a block of work: how PPO, GRPO and RLOO runs are compared (notebook 07, `marl ppo`).
"""

from __future__ import annotations

import contextlib
import time

import torch

MB = 2 ** 20


@contextlib.contextmanager
def measure_cost(device=None):
    """Seconds and peak memory of the block, into the yielded dict: seconds, peak_memory_mb.

    CUDA: the allocator's peak above what was allocated at the start. CPU: the process's resident-set peak above
    its size at the start (the kernel's high-water mark, reset first; None where that cannot be reset).
    """
    from .process_memory import peak_rss_bytes, reset_peak_rss, return_free_heap, rss_bytes

    cost = {}
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        return_free_heap()  # freed heap of earlier work would otherwise still count as resident
        start = rss_bytes()
        resettable = start is not None and reset_peak_rss()
    began = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = peak_rss_bytes() if resettable else None
        cost["seconds"] = round(time.perf_counter() - began, 2)
        cost["peak_memory_mb"] = round((peak - start) / MB, 1) if peak is not None else None
