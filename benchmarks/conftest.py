"""Shared options and helpers of the benchmarks.

Every scenario is one pytest-benchmark group holding ``stock`` (ESPnet's own
layer), ``flash_mha`` and, where compile applies, ``flash_mha-compiled``, on
the same seeded inputs in the same session. Each case checks once, outside
the timed call, that its result matches the stock result.
"""

import platform

import pytest
import torch

import espnet_mha  # noqa: F401  (registers flash_mha)
from espnet_mha import optional

# flash_mha-stock_layout: our layer with the stock parameters (what mha builds under use_for_mha()).
IMPLS = ("stock", "flash_mha", "flash_mha-compiled", "flash_mha-stock_layout")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes, no compiled variants (CI smoke run)")
    parser.addoption("--bench-device", default="cpu", help="device to run on (cpu, cuda)")
    parser.addoption("--bench-dtype", default="float32", help="float32, bfloat16 or float16")


# The decoding cases (50 steps of one layer, a whole beam search) take 0.2-3 s a call on the
# stock side, so pytest-benchmark's default gives that side 5 rounds. On a 2-core VM the medians of
# two such runs were up to 30% apart (stock beam search 2366 and 3062 ms, minutes apart).
DECODING_MIN_ROUNDS = 15
# Interleaved cases (test_bench_layer.run_interleaved): their one entry, and its rounds.
INTERLEAVED = "interleaved"
INTERLEAVED_ROUNDS = 15


def pytest_collection_modifyitems(config, items):
    """At least ``DECODING_MIN_ROUNDS`` rounds (or the ``--benchmark-min-rounds`` given, if
    more) for every decoding case, both layers alike (a ``benchmark`` marker)."""
    rounds = max(DECODING_MIN_ROUNDS, config.getoption("benchmark_min_rounds"))
    for item in items:
        if item.get_closest_marker("decoding") is not None:
            item.add_marker(pytest.mark.benchmark(min_rounds=rounds))


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def interleaved_rounds(request, quick):
    """Rounds of an interleaved case: 2 with --quick, else ``INTERLEAVED_ROUNDS`` or the
    ``--benchmark-min-rounds`` given, if more."""
    return 2 if quick else max(INTERLEAVED_ROUNDS, request.config.getoption("benchmark_min_rounds"))


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--bench-device"))


@pytest.fixture(scope="session")
def dtype(request):
    return getattr(torch, request.config.getoption("--bench-dtype"))


@pytest.fixture(params=IMPLS)
def impl(request, quick):
    if request.param.endswith("compiled") and quick:
        pytest.skip("--quick: compiled variants take tens of seconds to compile on CPU")
    return request.param


def machine_info(device, dtype):
    info = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), **optional.versions()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rand(*shape, seed, device, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
