"""Peak memory an op allocates while it runs, beyond what existed before.

CPU: the allocation timeline recorded by torch.profiler (profile_memory=True),
whose [memory] events carry +bytes for an allocation and -bytes for a free, in
order: the peak is the largest running sum. CUDA: torch.cuda.max_memory_allocated
after a reset.
"""
import torch


def peak_bytes(fn, device: str = "cpu") -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    for e in events:
        running += e.cpu_memory_usage
        peak = max(peak, running)
    return peak
