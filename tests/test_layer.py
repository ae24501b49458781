"""Our layer against ESPnet's own MultiHeadedAttention: forward, backward, options."""

import pytest
import torch
from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.testing import stock_and_flash, under_stock_names

pytestmark = pytest.mark.usefixtures("layout")

FP64 = dict(rtol=1e-10, atol=1e-10)
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


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("mask_rows", [None, 1, "t1"], ids=["no_mask", "key_mask", "query_mask"])
@pytest.mark.parametrize("t1,t2", [(4, 0), (0, 5), (0, 0)], ids=["no_keys", "no_queries", "both_empty"])
def test_empty_time_axes_match_stock(t1, t2, mask_rows, backend):
    """No memory frames: the stock output is the output bias (an empty softmax
    gives zero context); no query frames: an empty output. Masked calls once
    failed in the padded-key planner here."""
    stock, ours = stock_and_flash(8, 2, backend=backend)
    query = torch.randn(2, t1, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, t2, 8, dtype=torch.float64)
    mask = None if mask_rows is None else torch.ones(2, t1 if mask_rows == "t1" else 1, t2, dtype=torch.bool)
    expected, _ = stock(query, memory, mask)
    got, _ = ours(query, memory, mask)
    torch.testing.assert_close(got, expected, **FP64)
    (grad,) = torch.autograd.grad(got.sum(), query)
    torch.testing.assert_close(grad, torch.zeros_like(query), rtol=0, atol=0)


def test_empty_batch_gives_an_empty_output():
    """B = 0 (the stock layer fails to reshape it): an empty output, masked or not."""
    ours = FlashMultiHeadedAttention(8, 2)
    query, memory = torch.randn(0, 3, 8), torch.randn(0, 5, 8)
    for mask in (None, torch.ones(0, 1, 5, dtype=torch.bool)):
        assert ours(query, memory, mask)[0].shape == (0, 3, 8)
    assert ours.step(query[:, 0], None, memory=memory)[0].shape == (0, 8)


@pytest.mark.parametrize("query_2d, memory_2d", [(True, False), (False, True), (True, True)],
                         ids=["query", "memory", "both"])
def test_a_2d_query_or_memory_is_one_position_as_in_the_stock_layer(query_2d, memory_2d):
    """The stock layer reads a ``(B, D)`` query or memory as one position
    (``view(B, -1, H, d_k)``; its ``step`` hands ``forward`` the 2-D query): forward
    returns ``(B, 1, D)``. Ours raised "must be 3-D"."""
    stock, ours = stock_and_flash(16, 4)
    query = torch.randn(3, 1 if query_2d else 4, 16, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(3, 1 if memory_2d else 5, 16, dtype=torch.float64)
    mask = torch.tensor([[[True]], [[False]], [[True]]]) if memory_2d else None
    args = (query[:, 0] if query_2d else query), (memory[:, 0] if memory_2d else memory), mask
    expected, _ = stock(*args)
    got, _ = ours(*args)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **FP64)
    grad_out = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, query, grad_out)[0],
                               torch.autograd.grad(expected, query, grad_out)[0], **FP64)
    if query_2d:  # step with a one-frame memory
        for state in (None, ours.step(args[0], None, memory=args[1])[1]):
            torch.testing.assert_close(ours.step(args[0], state, memory=args[1], mask=mask)[0],
                                       stock.step(args[0], None, memory=args[1], mask=mask)[0], **FP64)


@pytest.mark.parametrize("batch, rows", [(1, 7), (2, 6), (3, 3)], ids=["unbatched", "grouped", "one_frame"])
def test_a_2d_memory_is_read_as_the_stock_view_reads_it(batch, rows):
    """The stock layer projects a 2-D ``(N, D)`` memory and views it as ``(B, N / B, .)`` for
    a query batch B: ``(T2, D)`` for a batch-1 query (an unbatched memory), ``(B, D)`` one
    frame per item. Ours read every 2-D memory as ``(B, D)`` and raised for a batch-1 query
    with a ``(T2, D)`` memory (an audit found it). forward, step (cached or not) and
    ``forward_qkv``; a row count the batch does not divide raises, naming the shape."""
    stock, ours = stock_and_flash(30, 5)
    gen = torch.Generator().manual_seed(batch)
    query = torch.randn(batch, 4, 30, dtype=torch.float64, generator=gen)
    memory = torch.randn(rows, 30, dtype=torch.float64, generator=gen, requires_grad=True)
    expected, got = stock(query, memory)[0], ours(query, memory)[0]
    torch.testing.assert_close(got, expected, **FP64)
    grad_out = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, memory, grad_out)[0],
                               torch.autograd.grad(expected, memory, grad_out)[0], **FP64)
    with torch.no_grad():
        state = None
        for t in range(3):
            got, state = ours.step(query[:, t], state, memory=memory)
            torch.testing.assert_close(got, stock.step(query[:, t], None, memory=memory)[0], **FP64)
        for got, expected in zip(ours.forward_qkv(query, memory, memory), stock.forward_qkv(query, memory, memory)):
            torch.testing.assert_close(got, expected, **FP64)
        # step over all T1 positions at once (the stock step runs forward): it raised "must be 3-D"
        torch.testing.assert_close(ours.step(query, None, memory)[0], stock.step(query, None, memory)[0], **FP64)
    bad = torch.randn(5, 30, dtype=torch.float64)
    message = r"memory of shape \(5, 30\): a 2-D memory needs a multiple of the query batch B=2 rows"
    with pytest.raises(ValueError, match=message):
        ours(torch.randn(2, 4, 30, dtype=torch.float64), bad)
    with pytest.raises(ValueError, match=message):
        ours.step(torch.randn(2, 30, dtype=torch.float64), None, memory=bad)
    with pytest.raises(ValueError, match=r"memory has feature size 29 \(shape \(5, 29\), \(N, D\)\), expected n_feat=30"):
        ours(torch.randn(2, 4, 30, dtype=torch.float64), torch.randn(5, 29, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"key of shape \(5, 30\): a 2-D key needs a multiple of the query batch B=2"):
        ours.forward_qkv(torch.randn(2, 4, 30, dtype=torch.float64), *[torch.randn(5, 30, dtype=torch.float64)] * 2)


@pytest.mark.parametrize("positions", [1, 4])
def test_step_takes_a_3d_query_that_is_a_parameter_or_subclass(positions):
    """The stock ``step`` runs ``forward`` on any tensor: a ``(B, 1, D)`` or ``(B, T1, D)``
    query that is an ``nn.Parameter`` or another subclass gives its result. Ours tested
    ``type(query) is torch.Tensor`` and raised "query must be 2-D" (an audit found it)."""
    stock, ours = stock_and_flash(30, 5)
    memory = torch.randn(3, 7, 30, dtype=torch.float64)
    query = torch.nn.Parameter(torch.randn(3, positions, 30, dtype=torch.float64))
    expected, got = stock.step(query, None, memory), ours.step(query, None, memory)
    assert got[0].shape == expected[0].shape
    torch.testing.assert_close(got[0], expected[0], **FP64)


def test_forward_attention_takes_scores_of_batch_1_as_the_stock_helper():
    """The stock ``forward_attention`` broadcasts batch-1 scores over the value's batch
    (its ``matmul``), with or without a mask; ours refused them (an audit found it).
    Scores of a larger batch than the value's stay refused: the stock helper's view then
    runs the items together into one."""
    stock, ours = stock_and_flash(30, 5)
    value = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    scores = torch.randn(1, 5, 4, 7, dtype=torch.float64)
    for mask in (None, torch.rand(2, 1, 7) > 0.3, torch.rand(2, 4, 7) > 0.5):
        torch.testing.assert_close(ours.forward_attention(value, scores, mask),
                                   stock.forward_attention(value, scores, mask), **FP64)
        assert ours.attn.shape == stock.attn.shape
        torch.testing.assert_close(ours.attn, stock.attn, **FP64)
    with pytest.raises(ValueError, match=r"value \(1, 5, 7, 6\) and scores \(2, 5, 4, 7\) must be"):
        ours.forward_attention(value[:1], scores.expand(2, -1, -1, -1), None)


@pytest.mark.parametrize("self_attention", [False, True], ids=["cross", "self"])
def test_transposed_layout(self_attention):
    """transposed=True: query and output (B, D, T1); memory stays (B, T2, D)."""
    stock, ours = stock_and_flash(16, 4, transposed=True)
    query = torch.randn(3, 6, 16, dtype=torch.float64)
    memory = None if self_attention else torch.randn(3, 9, 16, dtype=torch.float64)
    t2 = 6 if self_attention else 9
    mask = torch.rand(3, 1, t2) > 0.3
    expected, _ = stock(query, memory, mask)
    got, _ = ours(query.transpose(1, 2), memory, mask)
    assert got.shape == (3, 16, 6)
    torch.testing.assert_close(got.transpose(1, 2), expected, **FP64)


def test_same_seed_gives_the_stock_initialisation():
    torch.manual_seed(3)
    stock = MultiHeadedAttention(20, 4)
    torch.manual_seed(3)
    ours = FlashMultiHeadedAttention(20, 4)
    got = under_stock_names(ours.named_parameters())
    for name, p in stock.named_parameters():
        assert torch.equal(got[name], p), name


def test_constructs_where_the_stock_layer_does():
    """Under FakeTensorMode (shape-only runs, memory estimators) and on the meta device
    (allocate, then materialise), as the stock layer; and leaving the global RNG where
    the stock constructor leaves it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        query, memory, mask = torch.randn(2, 5, 24), torch.randn(2, 7, 24), torch.ones(2, 1, 7, dtype=torch.bool)
        shapes = [tuple(cls(24, 3)(query, memory)[0].shape) for cls in (MultiHeadedAttention,
                                                                          FlashMultiHeadedAttention)]
        # (The stock layer's masked path calls .numpy(), which fake tensors refuse.)
        shapes.append(tuple(FlashMultiHeadedAttention(24, 3)(query, memory, mask)[0].shape))
    assert shapes == [(2, 5, 24)] * 3
    with torch.device("meta"):
        layer = FlashMultiHeadedAttention(24, 3)
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    assert layer.to_empty(device="cpu")(torch.randn(2, 5, 24))[0].shape == (2, 5, 24)
    states = []
    for cls in (MultiHeadedAttention, FlashMultiHeadedAttention):
        torch.manual_seed(0)
        cls(24, 3)
        states.append(torch.random.get_rng_state())
    assert torch.equal(*states)


def test_stock_attributes_and_state():
    layer = FlashMultiHeadedAttention(24, 3, dropout=0.1, transposed=False, unknown_option=1)
    assert (layer.h, layer.d_k, layer.d_model, layer.d_output) == (3, 8, 24, 24)
    assert layer.dropout.p == 0.1
    assert layer.default_state(1, device="cpu") is None
    assert layer.default_state(4) is None


def test_forward_qkv_and_forward_attention_helpers_match_stock():
    stock, ours = stock_and_flash(18, 3)
    query, key = torch.randn(2, 4, 18, dtype=torch.float64), torch.randn(2, 7, 18, dtype=torch.float64)
    for got, expected in zip(ours.forward_qkv(query, key, key), stock.forward_qkv(query, key, key)):
        torch.testing.assert_close(got, expected, **FP64)
    q, k, v = stock.forward_qkv(query, key, key)
    scores = q @ k.transpose(-2, -1)
    mask = torch.rand(2, 4, 7) > 0.4
    mask[1, 2] = False
    torch.testing.assert_close(ours.forward_attention(v, scores, mask), stock.forward_attention(v, scores, mask), **FP64)
    torch.testing.assert_close(ours.attn, stock.attn, **FP64)
    # What the stock helper's view also reads (a probe): (B, D) inputs, one position each, and a
    # value of another length than the key. They were refused.
    for args in ((query[:, 0], key, key), (query, key[:, 0], key[:, 0]), (query, key, key[:, :3]),
                 (query, query, query[:, :2])):
        for got, expected in zip(ours.forward_qkv(*args), stock.forward_qkv(*args)):
            torch.testing.assert_close(got, expected, **FP64)


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


@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "normal", "chainer"])
@pytest.mark.parametrize("d_model", [24, 6])
def test_espnet_init_gives_the_stock_weights(init, d_model, layout):
    """ESPnet's --init on a whole decoder, same seed: the fused q/k/v weights get what the
    stock layer's three linears get (xavier counted the fused fan-out, 3D, and started
    them sqrt(2) times smaller). At a width that is not a multiple of 4, the normal draws
    differ in the fused layout (README, "Differences"); the stock layout's match."""
    from espnet2.torch_utils.initialize import initialize

    from espnet_mha import to_fused
    from espnet_mha.testing import build_s4_decoder

    decoders = []
    for name in ("mha", "flash_mha"):
        decoder = build_s4_decoder(name, vocab_size=11, d_model=d_model, n_layers=2, n_head=3)
        torch.manual_seed(5)
        try:
            initialize(decoder, init)
        except ValueError as error:  # ESPnet 202412 and older have no "normal"
            if name == "mha" and "Unknown initialization" in str(error):
                pytest.skip(f"this ESPnet's initialize has no {init!r}")
            raise
        decoders.append(decoder.state_dict())
    stock, ours = decoders
    if any(key.endswith("linear_qkv.weight") for key in ours):
        stock = to_fused(stock)
    assert sorted(stock) == sorted(ours)
    if d_model % 4 and layout == "fused" and init not in ("xavier_uniform", "kaiming_uniform"):
        # The documented difference (PyTorch's normal_ draws a size that is not a multiple
        # of 16 in another way): if this fails, PyTorch changed, and so does the README.
        assert not all(torch.allclose(ours[key], stock[key], rtol=1e-6, atol=0) for key in stock)
        return
    for key in stock:
        torch.testing.assert_close(ours[key], stock[key], rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("shape", [(2, 3, 1), (1, 3, 1), (2, 1, 1), (1, 5), (1, 1), (3,), (1,)],
                         ids=["B,T1,1", "1,T1,1", "B,1,1", "1,T2", "1,1", "T1", "1"])
@pytest.mark.parametrize("self_attention", [False, True], ids=["cross", "self"])
def test_masks_the_stock_layer_broadcasts(shape, self_attention):
    """Other mask shapes the stock layer broadcasts (its mask.unsqueeze(1) against the
    (B, H, T1, T2) scores) mean the same here: (B, T1, 1) masks whole query rows (their
    output is the bias), (1, T2) is one key mask for all, a 1-D (T1,) one flag per query
    row. They were refused (the 1-D ones until a probe found them)."""
    stock, ours = stock_and_flash(8, 2)
    gen = torch.Generator().manual_seed(sum(shape))
    t2 = 3 if self_attention else 5
    query = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    memory = None if self_attention else torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    shape = tuple(t2 if (len(shape) == 2 and i == 1 and n == 5) else n for i, n in enumerate(shape))
    mask = torch.rand(shape, generator=gen) > 0.4
    mask.view(-1)[0] = False  # at least one masked entry
    torch.testing.assert_close(ours(query, memory, mask)[0], stock(query, memory, mask)[0], rtol=1e-10, atol=1e-10)
    if not self_attention and len(shape) == 1:  # a step: one query row
        row = mask[:1]
        for state in (None, ours.step(query[:, 0], None, memory, row)[1]):
            torch.testing.assert_close(ours.step(query[:, 1], state, memory, row)[0],
                                       stock.step(query[:, 1], None, memory, row)[0], rtol=1e-10, atol=1e-10)


def test_complex_masks_mean_what_they_mean_to_the_stock_layer():
    """The stock layer's ``mask.eq(0)`` takes a complex mask (nonzero keeps); ours refused it
    (a probe). A per-head 2-D mask (h, T2), h > 1, stays refused, naming why."""
    stock, ours = stock_and_flash(8, 2)
    gen = torch.Generator().manual_seed(3)
    query, memory = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    mask = (torch.rand(2, 1, 5, generator=gen) > 0.4).to(torch.complex64) * (1 - 2j)
    torch.testing.assert_close(ours(query, memory, mask)[0], stock(query, memory, mask)[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5\): a 2-D mask \(h, T2\) with h > 1 is a per-head "
                                         r"mask to the stock layer"):
        ours(query, memory, torch.ones(2, 5, dtype=torch.bool))


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
