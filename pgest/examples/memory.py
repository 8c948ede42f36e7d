"""What a call allocates on the CPU or a GPU, measured (never estimated):
torch.profiler's allocator events on the CPU, the caching allocator's peak
on CUDA. The examples report their peaks with it; the benchmarks and the
memory tests use the same functions."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch


def allocated_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes a call allocates. CPU: from torch.profiler's allocation records,
    the sum of every event's own positive allocation (frees ignored, so an old
    .grad released by the call does not hide what it allocates; a temporary
    allocated and freed inside one op counts net). CUDA: the peak of
    torch.cuda.max_memory_allocated above what was allocated before."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def _cpu_memory_timeline(fn: Callable[[], object]):
    """(time, +bytes or -bytes) of every allocation and free of the CPU
    allocator during a call, temporaries inside an op included: the raw
    memory events torch.profiler records. A block allocated before the call
    and freed during it (an old .grad) is not reported by the allocator, so
    it cannot hide a peak. (The profiler's derived MemoryProfile timeline
    loses the destruction of some tensors that were updated in place, and
    over-counted here.)"""
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return sorted(((e.start_ns(), e.nbytes()) for e in events), key=lambda r: r[0])


def peak_allocated_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak of the bytes torch holds allocated during a call, above what it
    held before (CPU: the memory timeline replayed; CUDA: max_memory_allocated)."""
    if device.startswith("cuda"):
        return allocated_bytes(fn, device)
    live = peak = 0
    for _, delta in _cpu_memory_timeline(fn):
        live += delta
        peak = max(peak, live)
    return peak


def largest_allocation_bytes(fn: Callable[[], object]) -> int:
    """The single largest CPU tensor allocation made during a call."""
    return max((d for _, d in _cpu_memory_timeline(fn)), default=0)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native layer logs its start and stop on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
