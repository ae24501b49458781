"""Our layer's outputs and gradients against ESPnet's MultiHeadedAttention: forward, backward, dropout, autocast."""

import pytest
import torch

from espnet_mha.testing import stock_and_flash, under_stock_names

from attention_cases import FP64

pytestmark = pytest.mark.usefixtures("layout")

FP32 = dict(rtol=1e-5, atol=1e-5)


def run_both(case, dtype, **options):
    stock, ours = stock_and_flash(case.n_feat, case.n_head, dtype=dtype, seed=case.seed, **options)
    query, memory, mask = case.tensors(dtype)
    expected, _ = stock(query, memory, mask)
    got, state = ours(query, memory, mask)
    return expected, got, state, ours


@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64), (torch.float32, FP32)], ids=["fp64", "fp32"])
def test_forward_matches_stock(case, dtype, tol):
    expected, got, state, ours = run_both(case, dtype)
    assert state is None
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **tol)
    assert ours.last_backend == "sdpa"
    assert ours.attn is None


def test_math_backend_matches_stock_and_keeps_weights(case):
    stock, ours = stock_and_flash(case.n_feat, case.n_head, seed=case.seed, keep_attn=True)
    query, memory, mask = case.tensors()
    expected, _ = stock(query, memory, mask)
    got, _ = ours(query, memory, mask)
    torch.testing.assert_close(got, expected, **FP64)
    torch.testing.assert_close(ours.attn, stock.attn, **FP64)
    assert ours.last_backend == "math"


def test_backward_matches_stock(case):
    stock, ours = stock_and_flash(case.n_feat, case.n_head, seed=case.seed)
    grads = []
    for layer in (stock, ours):
        query, memory, mask = case.tensors()
        inputs = [query] + ([] if memory is None else [memory])
        for x in inputs:
            x.requires_grad_(True)
        out, _ = layer(query, memory, mask)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
        (out * weight).sum().backward()
        grads.append([x.grad for x in inputs])
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, **FP64)
    got = under_stock_names({name: p.grad for name, p in ours.named_parameters()})
    for name, p in stock.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **FP64, msg=lambda m, name=name: f"{name}: {m}")


def test_fully_masked_rows_give_the_output_bias():
    stock, ours = stock_and_flash(12, 3)
    query, memory = torch.randn(2, 4, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 1] = False  # one query row
    mask[1] = False  # a whole batch element
    got, _ = ours(query, memory, mask)
    expected, _ = stock(query, memory, mask)
    torch.testing.assert_close(got, expected, **FP64)
    bias = ours.linear_out.bias.expand(4, 12)
    torch.testing.assert_close(got[1], bias, rtol=0, atol=0)
    torch.testing.assert_close(got[0, 1], bias[0], rtol=0, atol=0)


def test_dropout_is_applied_in_training_only():
    _, ours = stock_and_flash(16, 2, dropout=0.5)
    query, memory = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 40, 16, dtype=torch.float64)
    expected, _ = ours(query, memory)
    ours.train()
    samples = torch.stack([ours(query, memory)[0] for _ in range(400)])
    assert not torch.allclose(samples[0], samples[1])
    # Inverted dropout keeps the expectation: the mean converges to the eval output.
    torch.testing.assert_close(samples.mean(0), expected, rtol=0, atol=0.1)
    ours.eval()
    torch.testing.assert_close(ours(query, memory)[0], expected, rtol=0, atol=0)


def test_autocast_bfloat16_error_is_within_twice_the_stock_error():
    stock, ours = stock_and_flash(32, 4, dtype=torch.float64)
    query, memory = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    reference, _ = stock(query.double(), memory.double())
    # The stock layer cannot mask in bfloat16 (numpy has no bfloat16 finfo), so the
    # low-precision comparison is unmasked; ours with a mask is checked against fp64.
    stock.float(), ours.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ours(query, memory)
        stock_bf16, _ = stock(query, memory)
    assert got.dtype == torch.bfloat16
    stock_err = (stock_bf16.double() - reference).abs().max()
    assert (got.double() - reference).abs().max() <= 2 * stock_err

    mask = torch.rand(2, 1, 8) > 0.3
    mask[1] = False
    stock.double()
    reference, _ = stock(query.double(), memory.double(), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ours(query, memory, mask)
    assert (got.double() - reference).abs().max() <= 2 * stock_err + 1e-2


def test_the_math_backend_gives_second_derivatives_as_the_stock_layer():
    """Double backward (create_graph=True) and forward-mode AD are not implemented by
    PyTorch's CPU SDPA kernel (nor flash-attn); backend="math" computes them, as the
    stock layer does (README: Differences)."""
    stock, ours = stock_and_flash(8, 2, backend="math")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, generator=gen) > 0.3
    results = []
    for layer in (ours, stock):
        (grad,) = torch.autograd.grad(layer(query, memory, mask)[0].pow(2).sum(), query, create_graph=True)
        results.append(torch.autograd.grad(grad.pow(2).sum(), query)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)
    tangent = torch.randn_like(query)
    _, got = torch.func.jvp(lambda q: ours(q, memory)[0], (query.detach(),), (tangent,))
    _, expected = torch.func.jvp(lambda q: stock(q, memory)[0], (query.detach(),), (tangent,))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# jacrev vmaps SDPA's CPU backward, which has no batching rule (PyTorch warns, and loops).
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_torch_func_transforms_with_a_mask_give_the_stock_gradients():
    """With a mask, the stock layer fails under torch.func.grad and jacrev (its
    ``torch.tensor(0).numpy()`` reads a data pointer the transforms' tensors do not have;
    a probe); ours runs there, and gives what autograd gives through the stock layer."""
    stock, ours = stock_and_flash(8, 2)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    memory = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 3, 5, generator=gen) > 0.4
    mask[1, 0] = False  # a fully masked row

    def loss(layer):
        return lambda q: layer(q, memory, mask)[0].pow(2).sum()

    with pytest.raises(RuntimeError, match="storage"):
        torch.func.grad(loss(stock))(query)
    leaf = query.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(stock)(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(loss(ours))(query), expected, rtol=1e-10, atol=1e-10)
    jacobian = torch.func.jacrev(lambda q: ours(q, memory, mask)[0])(query)
    torch.testing.assert_close(torch.einsum("abcxyz,abc->xyz", jacobian, 2 * ours(query, memory, mask)[0]),
                               expected, rtol=1e-10, atol=1e-10)


def test_the_query_scale_is_folded_only_where_it_is_a_power_of_two():
    """Cached steps fold the stock 1/sqrt(d_k) into the query projection only where that
    changes no bit (a power of two); the eager lookup and the loop dynamo traces agree."""
    import math

    import numpy

    from espnet_mha.functional import exact_query_scale

    for d_k in range(1, 5000):
        scale = 1.0 / math.sqrt(d_k)
        assert exact_query_scale(d_k) == (scale if math.frexp(scale)[0] == 0.5 else None), d_k
        assert exact_query_scale(numpy.int64(d_k)) == exact_query_scale(d_k), d_k  # the loop dynamo traces


def test_attn_goes_back_to_none_when_keep_attn_is_switched_off():
    """``attn`` is the last weights while ``keep_attn`` is on, else None (it kept the weights
    of the last call made with it on): forward, a cached step on a remembered signature,
    and a causal step."""
    _, ours = stock_and_flash(16, 4)
    _, causal = stock_and_flash(16, 4, causal=True)
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 3, 16, generator=gen, dtype=torch.float64), torch.randn(1, 5, 16, generator=gen,
                                                                                          dtype=torch.float64)
    with torch.no_grad():
        _, state = ours.step(query[:, 0], None, memory=memory.expand(2, -1, -1))
        for _ in range(2):  # the second one takes the remembered fast path
            ours.step(query[:, 0], state[:1], memory=memory.expand(2, -1, -1))
        calls = [lambda layer: layer(query, memory.expand(2, -1, -1)),
                 lambda layer: layer.step(query[:, 1], state[:1], memory=memory.expand(2, -1, -1)),
                 lambda layer: layer.step(query[:, 1], None)]
        for layer, call in ((ours, calls[0]), (ours, calls[1]), (causal, calls[2])):
            layer.keep_attn = True
            call(layer)
            assert layer.attn is not None
            layer.keep_attn = False
            call(layer)
            assert layer.attn is None
