"""Small helpers shared by the bench scripts (timing, thread setup, table printing)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def set_threads(threads: int) -> None:
    """Pin torch (and BLAS via env) to ``threads`` CPU threads before timing."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def time_call(fn: Callable[[], object], *, repeat: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain aligned text table on stdout (bench scripts print, library code logs)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)))
