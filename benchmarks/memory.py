"""Peak tensor memory of a call, from the profiler's allocation events (CPU and CUDA)."""

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn, device):
    """Peak bytes allocated by ``fn()`` above what was live before it.

    Args:
        fn: a callable; its result is dropped before returning.
        device: ``torch.device``; on CUDA the allocator's peak statistic is used,
            elsewhere the profiler's time-ordered allocation/free events.

    Returns:
        int: peak extra bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
