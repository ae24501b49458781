"""Causal self-attention steps: forward with a causal mask, the self-attention cache and its errors."""

import pytest
import torch

from cache_cases import FP64, seq
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


def test_self_step_without_causal_keeps_the_stock_behaviour():
    stock, ours = stock_and_flash(12, 3)
    query = seq(4, 12)
    marker = object()
    expected, _ = stock.step(query, marker)
    got, state = ours.step(query, marker)
    assert state is marker
    torch.testing.assert_close(got, expected, **FP64)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_causal_forward_equals_stock_with_a_causal_mask_and_steps(masked):
    stock, ours = stock_and_flash(15, 3, causal=True)
    batch, t = 3, 8
    query = seq(batch, t, 15)
    keep = torch.ones(batch, 1, t, dtype=torch.bool)
    if masked:
        keep = seq(batch, 1, t, seed=4) > -0.5
        keep[1, 0, 0] = False  # the first query of utterance 1 has no key at all
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    expected, _ = stock(query, None, keep & causal)
    got, _ = ours(query, None, keep if masked else None)
    torch.testing.assert_close(got, expected, **FP64)
    # SequenceModel passes the encoder memory and its mask: a causal layer ignores both.
    ignored, _ = ours(query, seq(batch, 5, 15), torch.zeros(batch, 1, 5))
    if not masked:
        torch.testing.assert_close(ignored, expected, **FP64)
    state = ours.default_state(batch)
    for i in range(t):
        out, state = ours.step(query[:, i], state, mask=keep[..., : i + 1] if masked else None)
        torch.testing.assert_close(out, expected[:, i], **FP64)
    assert state.shape == (batch, 2, 3, t, 5)


def test_causal_cache_errors():
    _, ours = stock_and_flash(12, 3, causal=True)
    with pytest.raises(ValueError, match=r"not a self-attention cache for this query: shape \(2, 2, 3, 3, 5\) is not \(1 or 2, 2, 3, t, 4\)"):
        ours.step(seq(2, 12), seq(2, 2, 3, 3, 5))
    with pytest.raises(ValueError, match=r"batch 3 is neither 1 nor the query batch 2"):
        ours.step(seq(2, 12), seq(3, 2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"dtype torch.float32 != torch.float64"):
        ours.step(seq(2, 12), seq(1, 2, 3, 3, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"device meta != query device cpu"):
        ours.step(seq(2, 12), torch.empty(1, 2, 3, 3, 4, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match=r"state must be None or the \(b, 2, n_head, T, d_k\) cache"):
        ours.step(seq(2, 12), "cache")


def test_a_causal_step_ignores_the_memory_and_its_mask():
    """SequenceModel hands every layer the encoder memory and its mask; a causal layer's
    forward ignores both, and so do its steps (a step applied the memory mask to its own
    positions when the lengths happened to match)."""
    _, ours = stock_and_flash(8, 2, causal=True)
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64), torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[[True, True, False]], [[True, False, False]]])
    expected, _ = ours(query, memory, mask)
    state = None
    for t in range(5):
        got, state = ours.step(query[:, t], state, memory=memory, mask=mask)
        torch.testing.assert_close(got, expected[:, t], rtol=1e-10, atol=1e-10)
    # Whatever the memory is: a 2-D one of another width or dtype too (it was refused).
    other = torch.randn(4, 6)
    torch.testing.assert_close(ours(query, other)[0], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.step(query[:, 0], None, memory=other)[0], expected[:, 0], rtol=1e-10, atol=1e-10)


def test_causal_step_takes_an_expanded_cache_of_another_beam_and_names_a_multi_position_query():
    """As the cross-attention step: a cache expanded with stride 0 over another number of
    hypotheses is its batch-1 self (it raised "batch 3 is neither 1 nor the query batch
    2"); a (B, T>1, D) query raises saying what a causal step takes."""
    _, ours = stock_and_flash(16, 4, causal=True)
    query = seq(1, 4, 16)
    expected, _ = ours(query.expand(2, -1, -1))
    state = None
    for t in range(4):
        out, state = ours.step(query[:, t].expand(2, -1), state)
        torch.testing.assert_close(out, expected[:, t], **FP64)
        state = state[:1].expand(3, -1, -1, -1, -1)
    with pytest.raises(ValueError, match=r"query of a causal step must be one position per hypothesis, \(B, D\) or "
                                         r"\(B, 1, D\), got \(2, 3, 16\); forward takes several positions"):
        ours.step(seq(2, 3, 16), None)
