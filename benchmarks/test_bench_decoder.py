"""Whole-decoder scenario: ESPnet's BatchBeamSearch over S4Decoder, stock mha vs flash_mha."""

import contextlib
import itertools

import pytest
import torch

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.testing import beam_search, prepare_for_decoding, s4_decoder_pair

from .conftest import rand, tolerance
from .test_bench_layer import run_case, run_interleaved

FULL = dict(n_layers=6, d_model=256, n_head=4, vocab_size=500, beam=10, frames=300, tokens=60)
QUICK = dict(n_layers=1, d_model=32, n_head=4, vocab_size=20, beam=3, frames=20, tokens=5)


@pytest.fixture(scope="module")
def decoders(request):
    size = QUICK if request.config.getoption("--quick") else FULL
    device = torch.device(request.config.getoption("--bench-device"))
    dtype = getattr(torch, request.config.getoption("--bench-dtype"))
    args = decoder_args(size, dtype)
    stock, ours = s4_decoder_pair(**args)
    _, compiled = s4_decoder_pair(layer_options={"compile": True}, **args)
    _, stock_layout = s4_decoder_pair(layer_options={"state_dict_layout": "stock"}, **args)
    models = {"stock": stock, "flash_mha": ours, "flash_mha-compiled": compiled, "flash_mha-stock_layout": stock_layout}
    return size, {name: prepare_for_decoding(model.to(device)) for name, model in models.items()}


def decoder_args(size, dtype):
    return dict(vocab_size=size["vocab_size"], d_model=size["d_model"], n_layers=size["n_layers"],
                n_head=size["n_head"], seed=0, dtype=dtype)


def same_n_best(got, expected, dtype):
    assert [h.yseq.tolist() for h in got] == [h.yseq.tolist() for h in expected]
    scores = torch.tensor([float(h.score) for h in got]), torch.tensor([float(h.score) for h in expected])
    torch.testing.assert_close(*scores, **tolerance(dtype))


def search(decoder, size, x):
    with torch.no_grad():
        return beam_search(decoder, beam_size=size["beam"])(
            x, maxlenratio=size["tokens"] / size["frames"], minlenratio=0.0
        )


@pytest.mark.decoding
def test_beam_search_decoding(benchmark, impl, decoders, device, dtype):
    size, models = decoders
    x = rand(size["frames"], size["d_model"], seed=6, device=device, dtype=dtype)
    same_n_best(search(models[impl], size, x), search(models["stock"], size, x), dtype)
    run_case(benchmark, "s4decoder_beam_search", impl, lambda: search(models[impl], size, x),
             device, dtype, size)


@pytest.mark.decoding
def test_beam_search_attention_replayed(benchmark, decoders, device, dtype):
    """The bound on the whole decoder's speed-up: the same search with every
    attention step replaced by a lookup of what our layer returned in a real
    search (the same outputs and states, so the same hypotheses), i.e. attention
    that costs nothing. The stock/``attention_replayed`` ratio is the most any
    attention layer can give this decoder on this machine in this session."""
    size, models = decoders
    x = rand(size["frames"], size["d_model"], seed=6, device=device, dtype=dtype)
    with attention_replayed(models["flash_mha"], size, x) as replayed:
        run_case(benchmark, "s4decoder_beam_search", "attention_replayed", replayed, device, dtype, size)


@pytest.mark.decoding
def test_beam_search_interleaved(benchmark, decoders, interleaved_rounds, device, dtype):
    """The stock decoder, ours and ``attention_replayed`` in interleaved rounds (see
    :func:`run_interleaved`): the speed-up and its bound measured side by side."""
    size, models = decoders
    x = rand(size["frames"], size["d_model"], seed=6, device=device, dtype=dtype)
    _, replay_model = s4_decoder_pair(**decoder_args(size, dtype))  # its own layers: ours keep their step
    with attention_replayed(prepare_for_decoding(replay_model.to(device)), size, x) as replayed:
        fns = {"stock": lambda: search(models["stock"], size, x),
               "flash_mha": lambda: search(models["flash_mha"], size, x),
               "attention_replayed": replayed}
        expected = fns["stock"]()
        same_n_best(fns["flash_mha"](), expected, dtype)
        same_n_best(replayed(), expected, dtype)  # the replay is of the same search
        run_interleaved(benchmark, "s4decoder_beam_search", fns, device, dtype, size, interleaved_rounds)


@contextlib.contextmanager
def attention_replayed(decoder, size, x):
    """Yield ``replayed()``: ``search(decoder, size, x)`` with every attention ``step``
    replaced by a lookup of what it returned in a real search of ``x`` (checked: the
    same hypotheses and scores). The layers' ``step`` is restored on exit."""
    layers = [m for m in decoder.modules() if isinstance(m, FlashMultiHeadedAttention)]
    assert layers
    records = {layer: [] for layer in layers}
    try:
        for layer in layers:
            def recording(*args, _layer=layer, **kwargs):
                result = type(_layer).step(_layer, *args, **kwargs)
                records[_layer].append(result)
                return result
            layer.step = recording  # an instance attribute: S4Decoder calls layer.step
        expected = search(decoder, size, x)
        for layer in layers:
            # Every search makes the same calls in the same order, so a cycle replays them.
            layer.step = lambda *args, _replies=itertools.cycle(records[layer]), **kwargs: next(_replies)
        got = search(decoder, size, x)
        assert [h.yseq.tolist() for h in got] == [h.yseq.tolist() for h in expected]
        assert [float(h.score) for h in got] == [float(h.score) for h in expected]
        yield lambda: search(decoder, size, x)
    finally:
        for layer in layers:
            layer.__dict__.pop("step", None)
