"""Layer-level scenarios: cross-/self-attention inference and training, decoding steps.

Run: ``python -m pytest benchmarks --benchmark-enable`` (``make bench``).
"""

import statistics
import time

import pytest
import torch

from espnet_mha.testing import stock_and_flash

from .conftest import INTERLEAVED, machine_info, rand, sync, tolerance
from .memory import peak_bytes

FULL = {
    "cross_infer": dict(batch=8, t1=60, t2=300, n_feat=256, n_head=4),
    "cross_train": dict(batch=8, t1=60, t2=300, n_feat=256, n_head=4),
    # A wide model on short utterances, where the projections' backward dominates.
    "cross_train_short": dict(batch=8, t1=20, t2=100, n_feat=512, n_head=8),
    "self_infer": dict(batch=4, t1=1000, t2=1000, n_feat=256, n_head=4),
    "self_train": dict(batch=4, t1=2000, t2=2000, n_feat=256, n_head=4),
    "decode_50_steps": dict(steps=50, beam=10, t2=300, n_feat=256, n_head=4),
    "decode_50_steps_per_utterance": dict(steps=50, batch=10, t2=300, n_feat=256, n_head=4),
}
QUICK = {
    "cross_infer": dict(batch=2, t1=8, t2=20, n_feat=32, n_head=4),
    "cross_train": dict(batch=2, t1=8, t2=20, n_feat=32, n_head=4),
    "cross_train_short": dict(batch=2, t1=4, t2=10, n_feat=64, n_head=8),
    "self_infer": dict(batch=2, t1=48, t2=48, n_feat=32, n_head=4),
    "self_train": dict(batch=2, t1=64, t2=64, n_feat=32, n_head=4),
    "decode_50_steps": dict(steps=5, beam=4, t2=20, n_feat=32, n_head=4),
    "decode_50_steps_per_utterance": dict(steps=5, batch=3, t2=20, n_feat=32, n_head=4),
}


def sizes(scenario, quick):
    # decode_50_steps_whole_state: the steps of decode_50_steps, the state handed back whole.
    return (QUICK if quick else FULL)[scenario.removesuffix("_whole_state")]


def layers(impl, size, device, dtype):
    """The layer under test and the stock reference, same weights (stock -> our adapter)."""
    stock, ours = stock_and_flash(size["n_feat"], size["n_head"], dtype=dtype, device=device,
                                  compile=impl.endswith("compiled"),
                                  state_dict_layout="stock" if impl.endswith("stock_layout") else "fused")
    return (stock if impl == "stock" else ours), stock


def key_padding(batch, t2, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t2 // 2, t2 + 1, (batch,), generator=gen)
    lengths[0] = t2
    return (torch.arange(t2)[None, :] < lengths[:, None]).unsqueeze(1).to(device)


def sequence_inputs(size, self_attention, device, dtype):
    query = rand(size["batch"], size["t1"], size["n_feat"], seed=1, device=device, dtype=dtype)
    memory = None if self_attention else rand(size["batch"], size["t2"], size["n_feat"], seed=2, device=device, dtype=dtype)
    return query, memory, key_padding(size["batch"], size["t2"], device)


def warm_up(benchmark, fn, device):
    """Run once (compiling if the layer compiles) and record that time separately."""
    start = time.perf_counter()
    fn()
    sync(device)
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - start, 3)
    fn()


def run_case(benchmark, scenario, impl, fn, device, dtype, size):
    benchmark.group = scenario
    benchmark.name = impl
    benchmark.extra_info.update(machine_info(device, dtype), scenario=scenario, impl=impl, **size)
    warm_up(benchmark, fn, device)
    benchmark.extra_info["peak_mb"] = round(peak_bytes(fn, device) / 2**20, 2)

    def timed():
        fn()
        sync(device)

    benchmark(timed)


def run_interleaved(benchmark, scenario, fns, device, dtype, size, rounds):
    """Time the implementations ``fns`` ({impl: callable}, ``stock`` first) in
    interleaved rounds: each round runs every one once, in an order that rotates
    from round to round, so all of them meet the same state of the machine. On a
    shared VM whose speed drifts by tens of percent within minutes, the cases
    above, which run one implementation's rounds after the other's, can put one
    side in a fast spell and the other in a slow one; the ratio of two times
    taken seconds apart cannot.

    One pytest-benchmark entry (``impl`` ``interleaved``; its own timing is of a
    whole round) whose ``extra_info`` holds every implementation's times
    (``seconds``) and the median over rounds of stock / implementation
    (``speedup``), which ``benchmarks.report`` tabulates."""
    benchmark.group = f"{scenario} (interleaved)"
    benchmark.name = INTERLEAVED
    benchmark.extra_info.update(machine_info(device, dtype), scenario=scenario, impl=INTERLEAVED, **size)
    names = list(fns)
    assert names[0] == "stock", names
    seconds = {name: [] for name in names}
    for fn in fns.values():
        fn()  # warm-up (fills allocator caches; nothing here compiles)

    def one_round():
        first = len(seconds["stock"]) % len(names)
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    benchmark.extra_info["seconds"] = {name: [round(s, 6) for s in times] for name, times in seconds.items()}
    benchmark.extra_info["speedup"] = {
        name: round(statistics.median(s / t for s, t in zip(seconds["stock"], seconds[name])), 3)
        for name in names[1:]
    }


def workload(scenario, size, device, dtype):
    """``(call, training)`` for ``scenario``: ``call(module)`` runs the timed work on seeded
    inputs and returns what is compared with the stock layer's result (a tensor, or the
    outputs of every decoding step); ``training``: it runs forward and backward."""
    if scenario == "decode_50_steps_per_utterance":
        return utterance_steps(size, device, dtype), False
    if scenario.startswith("decode_50_steps"):
        return beam_steps(size, "whole" if scenario.endswith("whole_state") else "split", device, dtype), False
    query, memory, mask = sequence_inputs(size, scenario.startswith("self"), device, dtype)
    if scenario.endswith("infer"):
        return (lambda module: module(query, memory, mask)[0]), False
    query.requires_grad_(True)
    grad_out = rand(size["batch"], size["t1"], size["n_feat"], seed=3, device=device, dtype=dtype)

    def step(module):
        query.grad = None
        module.zero_grad(set_to_none=True)
        out, _ = module(query, memory, mask)
        out.backward(grad_out)
        return query.grad

    return step, True


def prepared(impl, scenario, quick, device, dtype):
    """``(size, layer, stock, call, grad_mode)``: ``impl``'s layer and the stock one with the
    same weights, the :func:`workload` of ``scenario``, checked once against the stock
    result, and the grad mode to time it in."""
    size = sizes(scenario, quick)
    layer, stock = layers(impl, size, device, dtype)
    call, training = workload(scenario, size, device, dtype)
    if training:
        layer.train(), stock.train()
    grad_mode = torch.enable_grad if training else torch.no_grad
    with grad_mode():
        got, expected = call(layer), call(stock)
        for a, b in zip(*((x if isinstance(x, list) else [x]) for x in (got, expected))):
            torch.testing.assert_close(a, b, **tolerance(dtype))
    return size, layer, stock, call, grad_mode


def time_scenario(benchmark, impl, scenario, quick, device, dtype):
    """:func:`run_case` of ``impl``'s layer on the :func:`prepared` ``scenario``."""
    size, layer, _, call, grad_mode = prepared(impl, scenario, quick, device, dtype)
    with grad_mode():
        run_case(benchmark, scenario, impl, lambda: call(layer), device, dtype, size)


@pytest.mark.parametrize("scenario", ["cross_infer", "self_infer"], ids=["cross", "self"])
def test_inference(benchmark, impl, scenario, quick, device, dtype):
    time_scenario(benchmark, impl, scenario, quick, device, dtype)


@pytest.mark.parametrize("scenario", ["cross_train", "cross_train_short", "self_train"],
                         ids=["cross", "cross_short", "self"])
def test_training_step(benchmark, impl, scenario, quick, device, dtype):
    """Forward + backward of the layer (inputs and parameters get gradients)."""
    time_scenario(benchmark, impl, scenario, quick, device, dtype)


@pytest.mark.decoding
@pytest.mark.parametrize("hand_back", ["split", "whole"])
def test_decoding_steps(benchmark, impl, hand_back, quick, device, dtype):
    """Decoding steps the way BatchBeamSearch drives S4Decoder: 1 hypothesis, then the
    beam; memory expanded over the beam; states split per hypothesis, the first one
    handed back. The first step (which fills our cache) is timed too. ``whole``: a loop
    of one's own that hands each step the state the last one returned (scenario
    ``decode_50_steps_whole_state``; the stock step returns no state, so it times the same)."""
    scenario = "decode_50_steps" if hand_back == "split" else "decode_50_steps_whole_state"
    time_scenario(benchmark, impl, scenario, quick, device, dtype)


def beam_steps(size, hand_back, device, dtype):
    """``decode(module)``: the steps of ``test_decoding_steps`` on seeded inputs, returning the outputs."""
    memory = rand(1, size["t2"], size["n_feat"], seed=4, device=device, dtype=dtype)
    queries = rand(size["steps"], size["beam"], size["n_feat"], seed=5, device=device, dtype=dtype)

    def decode(module):
        state, outs = None, []
        for t in range(size["steps"]):
            batch = 1 if t == 0 else size["beam"]
            out, state = module.step(queries[t, :batch], state, memory=memory.expand(batch, -1, -1))
            if hand_back == "split":
                per_hypothesis = [None if state is None else state[b].unsqueeze(0) for b in range(batch)]
                state = per_hypothesis[0]
            outs.append(out)
        return outs

    return decode


@pytest.mark.decoding
def test_decoding_steps_per_utterance(benchmark, impl, quick, device, dtype):
    """Greedy decoding steps of a batch of utterances decoded together: one hypothesis
    each, a memory (and so a cache) per utterance, each step handed the state the last one
    returned. The first step, which fills our caches, is timed too."""
    time_scenario(benchmark, impl, "decode_50_steps_per_utterance", quick, device, dtype)


def utterance_steps(size, device, dtype):
    """``decode(module)``: the steps of ``test_decoding_steps_per_utterance``, returning the outputs."""
    memory = rand(size["batch"], size["t2"], size["n_feat"], seed=4, device=device, dtype=dtype)
    queries = rand(size["steps"], size["batch"], size["n_feat"], seed=5, device=device, dtype=dtype)

    def decode(module):
        state, outs = None, []
        for t in range(size["steps"]):
            out, state = module.step(queries[t], state, memory=memory)
            outs.append(out)
        return outs

    return decode


@pytest.mark.parametrize("scenario", ["cross_infer", "self_infer", "cross_train", "cross_train_short", "self_train",
                                      "decode_50_steps", "decode_50_steps_per_utterance"])
def test_interleaved(benchmark, scenario, quick, interleaved_rounds, device, dtype):
    """The layer scenarios above with the stock layer's rounds and ours (eager, fused)
    interleaved (see :func:`run_interleaved`)."""
    size, layer, stock, call, grad_mode = prepared("flash_mha", scenario, quick, device, dtype)
    with grad_mode():
        fns = {"stock": lambda: call(stock), "flash_mha": lambda: call(layer)}
        run_interleaved(benchmark, scenario, fns, device, dtype, size, interleaved_rounds)
