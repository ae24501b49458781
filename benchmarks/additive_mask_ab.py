"""A/B of the two ways a masked SDPA call on CUDA gets its mask, with the stock layer beside them.

Usage (on a CUDA machine)::

    python -m benchmarks.additive_mask_ab            # AB_DEVICE=cpu AB_QUICK=1 for a dry run

``bool``: the bool mask, guarded against empty rows (three launches) and copied aligned,
which SDPA turns into a float mask and may pad again; ``additive``: one aligned float mask
(:func:`espnet_mha.kernels.additive_mask`), what eager float32/bfloat16 calls on CUDA take.
Prints, per layer scenario and dtype (float32; bfloat16 without the stock layer, which cannot
mask in it) of ``benchmarks/test_bench_layer.py`` (key-padding masks), the mean
time of a call and the kernels one call launches. A diagnostic of our own two paths (the rule
is switched by replacing ``kernels.takes_empty_rows``); the claims against the stock layer
are pytest-benchmark's (``benchmarks/gpu_all.sh``).
"""

import os
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.test_bench_layer import FULL, QUICK, key_padding
from espnet_mha import kernels
from espnet_mha.testing import stock_and_flash

DEVICE = torch.device(os.environ.get("AB_DEVICE", "cuda"))
SIZES = QUICK if os.environ.get("AB_QUICK") else FULL
SCENARIOS = ("cross_infer", "cross_train", "cross_train_short", "self_infer", "self_train")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def mean_us(fn, repeat):
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat * 1e6


def launches(fn):
    """Kernels one call launches (operators on the CPU)."""
    cuda = DEVICE.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU))


def main():
    rule = kernels.takes_empty_rows
    for scenario in SCENARIOS:
        size = SIZES[scenario]
        for dtype in (torch.float32, torch.bfloat16):
            stock, ours = stock_and_flash(size["n_feat"], size["n_head"], dtype=dtype, device=DEVICE)
            query = torch.randn(size["batch"], size["t1"], size["n_feat"], device=DEVICE, dtype=dtype)
            memory = None if scenario.startswith("self") else torch.randn(
                size["batch"], size["t2"], size["n_feat"], device=DEVICE, dtype=dtype)
            mask = key_padding(size["batch"], size["t2"], DEVICE)
            train = "train" in scenario
            query.requires_grad_(train)

            def call(layer):
                with torch.set_grad_enabled(train):
                    out, _ = layer(query, memory, mask)
                if train:
                    out.float().sum().backward()

            row = {"stock": float("nan"), "stock_launches": "-"}  # the stock layer cannot mask in bf16
            runs = [("bool", ours, lambda q: False), ("additive", ours, rule)]
            for name, layer, takes in runs if dtype == torch.bfloat16 else [("stock", stock, rule)] + runs:
                kernels.takes_empty_rows = takes
                try:
                    row[name] = mean_us(lambda: call(layer), 50 if scenario == "self_train" else 200)
                    row[name + "_launches"] = launches(lambda: call(layer))
                finally:
                    kernels.takes_empty_rows = rule
            print(f"{scenario:18s} {str(dtype)[6:]:8s}"
                  + "".join(f"  {name} {row[name]:8.1f} us / {row[name + '_launches']} launches"
                            for name in ("stock", "bool", "additive"))
                  + f"  bool/additive {row['bool'] / row['additive']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
