"""Inputs of the shapes the stock layer takes: empty axes, 2-D query or memory, transposed, broadcast and complex masks."""

import pytest
import torch

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.testing import stock_and_flash

from attention_cases import FP64

pytestmark = pytest.mark.usefixtures("layout")


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
