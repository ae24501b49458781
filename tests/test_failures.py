"""Failure behaviour: NaN/Inf in unmasked inputs or weights propagate as in the stock
layer (never hidden), and mismatched dtypes or devices raise a clear error before any
kernel runs."""

import pytest
import torch

from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")

FP64 = dict(rtol=1e-10, atol=1e-10)
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
B, T1, T2, D, H = 2, 3, 5, 12, 3


def inputs():
    """query (B, T1, D), memory (B, T2, D), key-padding mask: batch 0 pads keys 3.., batch 1 keeps all."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(B, T1, D, generator=gen, dtype=torch.float64)
    memory = torch.randn(B, T2, D, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, 1, T2, dtype=torch.bool)
    mask[0, 0, 3:] = False
    return query, memory, mask


def assert_same_non_finite(got, expected, what, *, exact=True):
    """Non-finite wherever the stock layer is (exactly there if ``exact``); equal where both are finite."""
    if exact:
        assert torch.equal(got.isfinite(), expected.isfinite()), f"{what}: non-finite pattern differs from stock"
    else:
        hidden = got.isfinite() & ~expected.isfinite()
        assert not hidden.any(), f"{what}: hides {int(hidden.sum())} non-finite values of the stock layer"
    finite = got.isfinite() & expected.isfinite()
    torch.testing.assert_close(got[finite], expected[finite], **FP64, msg=lambda m: f"{what}: {m}")


def gradients(layer, out, leaves):
    """Gradients of ``out.sum()`` for the inputs and the parameters (stock q/k/v fused)."""
    if hasattr(layer, "linear_qkv"):
        params = [layer.linear_qkv.weight, layer.linear_qkv.bias]
    else:
        params = [getattr(layer, f"linear_{n}").weight for n in "qkv"]
        params += [getattr(layer, f"linear_{n}").bias for n in "qkv"]
    params += [layer.linear_out.weight, layer.linear_out.bias]
    grads = list(torch.autograd.grad(out.sum(), leaves + params))
    if not hasattr(layer, "linear_qkv"):
        n = len(leaves)
        grads[n : n + 6] = [torch.cat(grads[n : n + 3]), torch.cat(grads[n + 3 : n + 6])]
    return grads


def poison(where, value):
    """Inputs with ``value`` at one *unmasked* element of the query, the memory or a parameter."""
    query, memory, mask = inputs()
    if where == "query":
        query[1, 1, 4] = value
    elif where == "memory":
        memory[1, 2, 0] = value  # batch 1 keeps every key
    elif where == "self":
        query[1, 2, 7] = value
        memory, mask = None, None
    return query, memory, mask


@pytest.mark.parametrize("keep_attn", [False, True], ids=["sdpa", "math"])
@pytest.mark.parametrize("where", ["query", "memory", "self", "key_weight", "out_weight"])
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_non_finite_values_propagate_like_the_stock_layer(value, where, keep_attn):
    stock, ours = stock_and_flash(D, H, keep_attn=keep_attn)
    if where.endswith("weight"):
        with torch.no_grad():
            (stock.linear_k if where == "key_weight" else stock.linear_out).weight[2, 3] = value
        ours.load_state_dict(stock.state_dict())
    query, memory, mask = poison(where, value)
    leaves = [x.requires_grad_(True) for x in (query, memory) if x is not None]
    expected, _ = stock(query, memory, mask)
    got, _ = ours(query, memory, mask)
    assert not got.isfinite().all(), "a non-finite input was hidden"
    assert_same_non_finite(got, expected, "output")
    expected_grads = gradients(stock, expected, leaves)
    got_grads = gradients(ours, got, leaves)
    names = [f"input {i}" for i in range(len(leaves))] + ["w_qkv", "b_qkv", "w_out", "b_out"]
    # Gradients may be non-finite in more places, never fewer: with a NaN key weight every
    # score is NaN, and SDPA's backward carries the NaN row statistics into the masked keys'
    # gradients, where the stock masked_fill zeroes them (the math backend matches the stock).
    for name, g, e in zip(names, got_grads, expected_grads):
        assert_same_non_finite(g, e, f"gradient of {name}", exact=keep_attn)
    assert not all(g.isfinite().all() for g in got_grads), "gradients hide the non-finite value"


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_non_finite_values_propagate_through_cached_steps(value):
    """A non-finite memory element poisons every later step that reads the cache, like the stock step."""
    stock, ours = stock_and_flash(D, H)
    query, memory, mask = inputs()
    memory[1, 2, 0] = value
    query[0, 2, 1] = value
    state = None
    for t in range(T1):
        expected, _ = stock.step(query[:, t], None, memory=memory, mask=mask)
        got, state = ours.step(query[:, t], state, memory=memory, mask=mask)
        assert not got[1].isfinite().any(), f"step {t}: poisoned memory hidden"
        assert bool(got[0].isfinite().all()) is (t != 2), f"step {t}: poisoned query"
        assert_same_non_finite(got, expected, f"step {t}")


F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.mark.parametrize("call", ["forward", "step"])
@pytest.mark.parametrize(
    "layer_dtype,query_dtype,memory_dtype,autocast,match",
    [
        (F64, F64, F32, False, r"memory dtype torch.float32 != the layer's parameter dtype torch.float64"),
        (F32, F32, F64, False, r"memory dtype torch.float64 != the layer's parameter dtype torch.float32"),
        # autocast never casts float64, so these mismatches stay mismatches under it.
        (F32, F64, F64, True, r"query dtype torch.float64 != the layer's parameter dtype torch.float32"),
        (F64, F32, F64, True, r"query dtype torch.float32 != the layer's parameter dtype torch.float64"),
        (F32, F32, F64, True, r"memory dtype torch.float64 != the layer's parameter dtype torch.float32"),
    ],
    ids=["fp32-memory", "fp64-memory", "fp64-query-autocast", "fp32-query-fp64-layer-autocast",
         "fp64-memory-autocast"],
)
def test_dtype_mismatches_raise_a_clear_error(layer_dtype, query_dtype, memory_dtype, autocast, match, call):
    _, ours = stock_and_flash(D, H, dtype=layer_dtype)
    query, memory, _ = inputs()
    query, memory = query.to(query_dtype), memory.to(memory_dtype)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast), pytest.raises(TypeError, match=match):
        if call == "forward":
            ours(query, memory)
        else:
            ours.step(query[:, 0], None, memory=memory)


@pytest.mark.parametrize(
    "query_dtype,memory_dtype",
    [(F32, BF16), (BF16, F32), (BF16, BF16)],
    ids=["fp32-query-bf16-memory", "bf16-query-fp32-memory", "bf16-both"],
)
def test_mixed_dtypes_under_autocast_work_like_the_stock_layer(query_dtype, memory_dtype):
    """ESPnet AMP: the encoder output can be low precision while the decoder stream is fp32."""
    stock, ours = stock_and_flash(D, H, dtype=F32)
    query, memory, mask = inputs()
    query, memory = query.to(query_dtype), memory.to(memory_dtype)
    with torch.autocast("cpu", dtype=BF16):
        # The stock layer cannot mask in bf16 (numpy has no bfloat16 finfo): compare unmasked.
        expected, _ = stock(query, memory)
        got, _ = ours(query, memory)
        step, _ = ours.step(query[:, 0], None, memory=memory)
        masked, _ = ours(query, memory, mask)
    assert got.dtype == expected.dtype == masked.dtype == BF16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=5e-2)
    torch.testing.assert_close(step.float(), got[:, 0].float(), rtol=0, atol=5e-2)
    reference, _ = stock.double()(query.double(), memory.double(), mask)
    torch.testing.assert_close(masked.double(), reference, rtol=0, atol=5e-2)


OTHER_DEVICES = [
    "meta",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


@pytest.mark.parametrize("device", OTHER_DEVICES)
@pytest.mark.parametrize("call", ["forward", "step"])
@pytest.mark.parametrize("moved", ["query", "memory", "mask", "query+memory"])
def test_inputs_on_another_device_raise_a_clear_error(moved, call, device):
    """Before any kernel runs (meta stands in for a second device where there is no GPU)."""
    _, ours = stock_and_flash(D, H)
    query, memory, mask = inputs()
    if "query" in moved:
        query = query.to(device)
    if "memory" in moved:
        memory = memory.to(device)
    if moved == "mask":
        mask = mask.to(device)
        match = rf"mask is on {device}\S* but query is on cpu"
    else:
        first = moved.split("+")[0]
        match = rf"{first} is on {device}\S* but the layer's parameters are on cpu"
    with pytest.raises(ValueError, match=match):
        if call == "forward":
            ours(query, memory, mask)
        else:
            ours.step(query[:, 0], None, memory=memory, mask=mask)


@pytest.mark.parametrize("step", [False, True], ids=["forward", "step"])
@pytest.mark.parametrize("where", ["query", "key_weight"])
def test_nan_is_not_hidden_without_a_mask(where, step):
    """SDPA's CPU kernel returns zeros for a query row whose scores are all NaN when
    no mask is given (pytorch #141128); ours must give NaN there like the stock layer."""
    stock, ours = stock_and_flash(D, H)
    if where == "key_weight":
        with torch.no_grad():
            stock.linear_k.weight[2, :] = float("nan")  # a NaN key column: every score of head 0 is NaN
        ours.load_state_dict(stock.state_dict())
    query, memory, _ = inputs()
    if where == "query":
        query[1, 1, 4] = float("nan")
    if step:
        expected, _ = stock.step(query[:, 1], None, memory=memory)
        _, state = ours.step(query[:, 0], None, memory=memory)
        got, _ = ours.step(query[:, 1], state, memory=memory)
        got, _ = ours.step(query[:, 1], state, memory=memory)  # the remembered-signature path
    else:
        expected, _ = stock(query, memory, None)
        got, _ = ours(query, memory, None)
    assert not expected.isfinite().all()
    assert_same_non_finite(got, expected, "output")


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_a_query_row_whose_scores_are_all_minus_inf(backend):
    """The documented exception (README, "Differences"): every score of a query row -inf
    (an inf query feature times a key bias). The stock softmax gives NaN; SDPA a zero
    context, so the row is linear_out.bias; the math backend gives the stock NaN."""
    stock, ours = stock_and_flash(D, H, backend=backend)
    with torch.no_grad():
        stock.linear_q.weight.zero_()
        stock.linear_q.weight[:, 0] = 1.0
        stock.linear_k.bias.fill_(5.0)
    ours.load_state_dict(stock.state_dict())
    query, memory, _ = inputs()
    query[1, 1, 0] = float("-inf")  # q = -inf in every feature, keys' bias 5: scores -inf
    expected, _ = stock(query, memory, None)
    got, _ = ours(query, memory, None)
    assert expected[1, 1].isnan().all()
    if backend == "math":
        assert_same_non_finite(got, expected, "output")
    else:
        torch.testing.assert_close(got[1, 1], ours.linear_out.bias.expand(D), rtol=0, atol=0)
    finite = expected.isfinite()
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-10)


def test_nan_is_not_hidden_in_a_causal_layer():
    """The same SDPA behaviour with is_causal: a causal layer must still give NaN rows."""
    stock, ours = stock_and_flash(D, H, causal=True)
    with torch.no_grad():
        stock.linear_k.weight[2, :] = float("nan")  # a NaN key column; values stay finite
    ours.load_state_dict(stock.state_dict())
    query, _, _ = inputs()
    causal = torch.ones(T1, T1, dtype=torch.bool).tril().unsqueeze(0)
    expected, _ = stock(query, None, causal)
    got, _ = ours(query, None, None)
    assert not expected.isfinite().all()
    assert_same_non_finite(got, expected, "output")
