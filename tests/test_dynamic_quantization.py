"""Dynamic quantization (quantize_dynamic, as --quantize_asr_model) computes as the quantized stock layer."""

import logging

import pytest
import torch

from conftest import assert_layers_agree, assert_same_nbest, quantize
from espnet_mha import quantized
from espnet_mha.testing import s4_decoder_pair, stock_and_flash
from projection_cases import seq

FP32 = dict(rtol=1e-5, atol=1e-5)


def quantized_pair(dtype, **options):
    """Stock and ours with the same weights, keys 5x larger than queries and values, so
    that one int8 scale for the fused q/k/v would round differently from three."""
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32, **options)
    with torch.no_grad():
        stock.linear_k.weight.mul_(5.0)
    ours.load_state_dict(stock.state_dict())
    return quantize(stock, dtype), quantize(ours, dtype)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_layer_matches_the_quantized_stock_layer(dtype):
    stock, ours = quantized_pair(dtype)
    rng = torch.get_rng_state()
    assert not quantized.is_plain(ours.linear_qkv) and quantized.projections(ours).exact
    assert torch.equal(torch.get_rng_state(), rng)  # re-quantizing draws no random numbers
    assert_layers_agree(ours, stock, FP32)


def test_qint8_without_the_float_weights_runs_fused_and_says_so(caplog):
    stock, ours = quantized_pair(torch.qint8)
    ours.__dict__["_float_linear_qkv"] = None  # e.g. a model quantized before this version
    with caplog.at_level(logging.WARNING, logger="espnet_mha.quantized"):
        got, _ = ours(seq(2, 3, 16), seq(2, 5, 16, seed=1))
    assert not quantized.projections(ours).exact
    assert "results are close to, not the same as, the quantized stock layer's" in caplog.text
    expected, _ = stock(seq(2, 3, 16), seq(2, 5, 16, seed=1))
    assert not torch.allclose(got, expected, **FP32)  # one int8 scale for q, k and v
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)


def test_changed_float_weights_are_not_used_for_the_quantized_layer():
    """The kept float weights are used only if they reproduce the swapped module exactly."""
    _, ours = quantized_pair(torch.qint8)
    with torch.no_grad():
        ours._float_linear_qkv.weight.mul_(2.0)
    assert not quantized.projections(ours).exact


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_causal_layer_steps_equal_its_forward(dtype):
    """(It raised NotImplementedError before.) qint8 also quantizes each call's input with
    its own scale, so a step's (B, D) query rounds differently from the forward's (B, T, D)."""
    _, ours = quantized_pair(dtype, causal=True)
    query = seq(2, 5, 16)
    expected, _ = ours(query)
    state = None
    for t in range(5):
        got, state = ours.step(query[:, t], state)
        torch.testing.assert_close(got, expected[:, t], **(FP32 if dtype == torch.float16 else dict(rtol=0, atol=0.05)))


def test_loading_quantized_weights_after_a_forward_is_not_ignored(caplog):
    """The q/k/v parts re-quantized on the first call are made again when new quantized
    weights are loaded (they were kept, silently computing with the old weights). The
    float weights then no longer match, so the fused module runs, and says so."""
    _, ours = quantized_pair(torch.qint8)
    query, memory = seq(2, 3, 16), seq(2, 5, 16, seed=1)
    ours(query, memory)
    other = quantize(stock_and_flash(16, 4, dtype=torch.float32, seed=3)[1], torch.qint8)
    ours.load_state_dict(other.state_dict())
    with caplog.at_level(logging.WARNING, logger="espnet_mha.quantized"):
        got, _ = ours(query, memory)
    assert "close to, not the same as" in caplog.text
    other.__dict__["_float_linear_qkv"] = None  # the same fused computation with the loaded weights
    torch.testing.assert_close(got, other(query, memory)[0], rtol=0, atol=0)


def test_a_quantized_model_pickles_and_copies():
    """quantize_dynamic leaves a qconfig (a local function) on the float linear it swapped
    out, which only our layer still holds: torch.save(model) failed on it."""
    import copy
    import io

    stock, ours = quantized_pair(torch.qint8)
    query, memory = seq(2, 3, 16), seq(2, 5, 16, seed=1)
    expected, _ = ours(query, memory)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(ours)):
        assert quantized.projections(twin).exact
        torch.testing.assert_close(twin(query, memory)[0], stock(query, memory)[0], **FP32)
        torch.testing.assert_close(twin(query, memory)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_beam_search_gives_the_quantized_stock_nbest(dtype):
    stock, ours = s4_decoder_pair(vocab_size=20, d_model=32, n_layers=2, n_head=4, seed=1, dtype=torch.float32)
    assert_same_nbest(quantize(stock, dtype), quantize(ours, dtype), seq(23, 32, seed=4), beam=3,
                      maxlenratio=0.6, score_tol=1e-4)


def test_a_new_bias_on_a_quantized_fused_projection_is_used():
    """A qint8 fused linear_qkv given a new bias after the swap (set_weight_bias, or a
    quantized checkpoint of bias-only tuning) computes with it, as the quantized stock
    layer's linear_v does: the re-quantized q/k/v parts took the float copy's old bias,
    silently (1.4 off, found by a probe). Steps too, with the cache recomputed."""
    stock, ours = (quantize(layer, torch.qint8) for layer in stock_and_flash(32, 4, dtype=torch.float32))
    query, memory = seq(2, 3, 32), seq(2, 7, 32, seed=1)
    with torch.no_grad():
        _, state = ours.step(query[:, 0], None, memory=memory)
        new_bias = torch.randn(32, generator=torch.Generator().manual_seed(5))
        stock.linear_v.set_weight_bias(stock.linear_v.weight(), new_bias)
        bias = ours.linear_qkv.bias().clone()
        bias[64:] = new_bias
        ours.linear_qkv.set_weight_bias(ours.linear_qkv.weight(), bias)
        torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=1e-5, atol=1e-5)
        got, _ = ours.step(query[:, 1], state, memory=memory)
        assert ours.last_cache.startswith("recomputed")
        torch.testing.assert_close(got, stock.step(query[:, 1], None, memory=memory)[0], rtol=1e-5, atol=1e-5)
