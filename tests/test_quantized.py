"""Dynamic quantization (``asr_inference --quantize_asr_model true``) against the stock layer.

``torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype)`` swaps our fused
``linear_qkv`` and ``linear_out`` for quantized modules, as it swaps the stock
layer's four linears. Both layers are quantized the way ESPnet does it and must
compute the same (fp32 tolerance), forward and step, and give the same n-best.
"""

import logging
import warnings

import pytest
import torch
from torch import nn

from conftest import assert_same_nbest
from espnet_mha import quantized
from espnet_mha.testing import s4_decoder_pair, stock_and_flash

FP32 = dict(rtol=1e-5, atol=1e-5)


def quantize(model, dtype):
    with warnings.catch_warnings():  # torch's deprecation notice for the eager quantization API
        warnings.simplefilter("ignore")
        return torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=dtype)


def quantized_pair(dtype, **options):
    """Stock and ours with the same weights, keys 5x larger than queries and values, so
    that one int8 scale for the fused q/k/v would round differently from three."""
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32, **options)
    with torch.no_grad():
        stock.linear_k.weight.mul_(5.0)
    ours.load_state_dict(stock.state_dict())
    return quantize(stock, dtype), quantize(ours, dtype)


def seq(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_layer_matches_the_quantized_stock_layer(dtype):
    stock, ours = quantized_pair(dtype)
    rng = torch.get_rng_state()
    assert not quantized.is_plain(ours.linear_qkv) and quantized.projections(ours).exact
    assert torch.equal(torch.get_rng_state(), rng)  # re-quantizing draws no random numbers
    query, memory = seq(3, 4, 16), seq(3, 6, 16, seed=1)
    mask = seq(3, 1, 6, seed=2) > -0.3
    for args in ((query, memory, mask), (query, memory, None), (query, None, None)):
        torch.testing.assert_close(ours(*args)[0], stock(*args)[0], **FP32)
    shared = memory[:1].expand(3, -1, -1)
    _, state = ours.step(query[:1, 0], None, memory=shared[:1])
    assert ours.last_cache == "filled"
    for t in range(1, 4):
        got, state = ours.step(query[:, t], state[:1], memory=shared)
        torch.testing.assert_close(got, stock.step(query[:, t], None, memory=shared)[0], **FP32)
        assert ours.last_cache == "reused"
    got, _ = ours.step(query[:, 0], None, memory=memory, mask=mask)
    torch.testing.assert_close(got, stock.step(query[:, 0], None, memory=memory, mask=mask)[0], **FP32)
    for got, expected in zip(ours.forward_qkv(query, memory, memory), stock.forward_qkv(query, memory, memory)):
        torch.testing.assert_close(got, expected, **FP32)


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


def test_quantized_causal_layer_forward_works_and_step_says_unsupported():
    _, ours = quantized_pair(torch.qint8, causal=True)
    out, _ = ours(seq(2, 3, 16))
    assert out.shape == (2, 3, 16)
    with pytest.raises(NotImplementedError, match="causal layer with quantized linears"):
        ours.step(seq(2, 16), None)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_beam_search_gives_the_quantized_stock_nbest(dtype):
    stock, ours = s4_decoder_pair(vocab_size=20, d_model=32, n_layers=2, n_head=4, seed=1, dtype=torch.float32)
    assert_same_nbest(quantize(stock, dtype), quantize(ours, dtype), seq(23, 32, seed=4), beam=3,
                      maxlenratio=0.6, score_tol=1e-4)


def test_parametrized_linears_are_called_as_modules():
    """Any linear that holds no plain ``weight`` (here weight_norm, a torch parametrization)
    is called as a module. Weight norm is per output row, so on the fused projection
    it equals the stock layer's three normalized linears."""
    from torch.nn.utils.parametrizations import weight_norm

    stock, ours = stock_and_flash(16, 4)
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        setattr(stock, name, weight_norm(getattr(stock, name)))
    ours.linear_qkv, ours.linear_out = weight_norm(ours.linear_qkv), weight_norm(ours.linear_out)
    query = seq(2, 3, 16).double().requires_grad_(True)
    memory = seq(2, 5, 16, seed=1).double()
    fp64 = dict(rtol=1e-10, atol=1e-10)
    out, _ = ours(query, memory)
    torch.testing.assert_close(out, stock(query, memory)[0], **fp64)
    (grad,) = torch.autograd.grad(out.sum(), query)
    torch.testing.assert_close(grad, torch.autograd.grad(stock(query, memory)[0].sum(), query)[0], **fp64)
    got, state = ours.step(query[:, 0].detach(), None, memory=memory)
    torch.testing.assert_close(got, stock.step(query[:, 0].detach(), None, memory=memory)[0], **fp64)
    got, _ = ours.step(query[:, 1].detach(), state, memory=memory)
    torch.testing.assert_close(got, stock.step(query[:, 1].detach(), None, memory=memory)[0], **fp64)
