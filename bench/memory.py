"""Memory an op allocates while it runs.

CPU: the bytes allocated by the step, from torch.profiler's allocation records
(profile_memory=True): the sum of every event's own positive allocation. Frees
are ignored, so memory freed by the step (an old .grad) does not hide what it
allocates; an op that allocates and frees a temporary inside itself is counted
net. CUDA: torch.cuda.max_memory_allocated above what was allocated before.
"""
import torch


def allocated_bytes(fn, device: str = "cpu") -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
