"""Shared by the step benchmarks: FLOP counting and interleaved timing on a shared, noisy machine."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs torch counts while `fn` runs (a forward, or a forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def interleaved_times(variants: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                      repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed in rounds that run every variant once (so a load
    spike slows them all alike); the first `warmup` rounds are not kept."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, run in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
