"""Remembered step signatures: a step skips its checks only where a checked step vouches for it."""

import pytest
import torch

from cache_cases import FP64, seq, stock_named_grads
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


@pytest.mark.parametrize(
    "state,match",
    [
        (seq(1, 2, 3, 9, 5), r"shape \(1, 2, 3, 9, 5\) is not"),
        (seq(1, 2, 3, 9, 4, dtype=torch.float32).expand(2, -1, -1, -1, -1), None),
        (seq(3, 2, 3, 9, 4), None),
    ],
)
def test_checks_still_apply_once_a_step_signature_was_seen(state, match):
    """Steps skip their checks only for a signature (shapes, dtypes, devices) that
    passed them on this layer, with a state made from that very memory; anything
    else goes through them again (``match`` None: a well-formed state that does not fit,
    recomputed)."""
    stock, ours = stock_and_flash(12, 3)
    memory = seq(2, 9, 12)
    _, good = ours.step(seq(2, 12), None, memory=memory)
    with torch.no_grad():
        for _ in range(2):  # the second call takes the remembered signature
            ours.step(seq(2, 12), good, memory=memory)
    assert ours._checked_steps and ours.last_cache == "reused"
    if match is None:
        got, _ = ours.step(seq(2, 12), state, memory=memory)
        assert ours.last_cache.startswith("recomputed: state ")
        torch.testing.assert_close(got, stock.step(seq(2, 12), None, memory=memory)[0], **FP64)
    else:
        with pytest.raises(ValueError, match=match):
            ours.step(seq(2, 12), state, memory=memory)
    with pytest.raises(ValueError, match=r"memory batch 3"):
        ours.step(seq(2, 12), good, memory=seq(3, 9, 12))
    with pytest.raises(TypeError, match=r"memory dtype torch.float32"):
        ours.step(seq(2, 12), good, memory=memory.float())
    # Same shapes (the remembered signature), another memory: recomputed, not reused.
    other = seq(2, 9, 12, seed=5)
    with torch.no_grad():
        got, _ = ours.step(seq(2, 12), good, memory=other)
    assert ours.last_cache == "recomputed: the state was made from another memory"
    torch.testing.assert_close(got, stock.step(seq(2, 12), None, memory=other)[0], **FP64)
    with torch.no_grad():  # written in place: the in-place counter moved
        memory.add_(1.0)
        got, _ = ours.step(seq(2, 12), good, memory=memory)
    assert ours.last_cache == "recomputed: the state was made from another memory"
    torch.testing.assert_close(got, stock.step(seq(2, 12), None, memory=memory)[0], **FP64)


def test_a_batch1_state_never_serves_distinct_memories_even_on_a_remembered_signature():
    """Shared and distinct memories of the same shapes have the same signature; once it
    is remembered (shared beam), a batch-1 state handed back with B distinct memories
    must still not be reused for all of them."""
    stock, ours = stock_and_flash(12, 3)
    shared = seq(1, 7, 12).expand(3, -1, -1)
    distinct = seq(3, 7, 12, seed=1)
    with torch.no_grad():
        _, state = ours.step(seq(1, 12), None, memory=shared[:1])
        for _ in range(2):  # remembers (query 3, memory 3, state 1)
            _, state = ours.step(seq(3, 12), state[:1], memory=shared)
        assert ours._checked_steps
        state = None
        for t in range(3):
            query = seq(3, 12, seed=t)
            got, state = ours.step(query, None if state is None else state[:1], memory=distinct)
            torch.testing.assert_close(got, stock.step(query, None, memory=distinct)[0], **FP64)
            assert ours.last_cache != "reused" or state.size(0) == 3


def test_a_remembered_step_keeps_the_backend_its_own_call_chose(monkeypatch):
    """Threads sharing a layer: the memo stored ``_last`` after the kernel ran, which a masked
    forward in another thread may have overwritten meanwhile (a step then ran on sdpa)."""
    from espnet_mha import functional

    _, ours = stock_and_flash(16, 4)
    real = functional.attend_cached

    def another_thread_writes(*args, **kwargs):
        ours._last["backend"], ours._last["fallback"] = "sdpa", "another thread's call"
        return real(*args, **kwargs)

    memory = seq(1, 5, 16).expand(3, -1, -1)
    with torch.no_grad():
        _, state = ours.step(seq(1, 16), None, memory=memory[:1])
        monkeypatch.setattr(functional, "attend_cached", another_thread_writes)
        ours.step(seq(3, 16), state[:1], memory=memory)
    assert {backend for backend, _ in ours._checked_steps.values()} == {"math"}


def test_remembered_steps_follow_the_parameters():
    """In-place weight changes, dtype conversion and gradients after remembered steps."""
    stock, ours = stock_and_flash(16, 4)
    memory = seq(1, 11, 16).expand(3, -1, -1)
    query = seq(3, 16, seed=1)

    def decode(module, grad=False):
        dtype = module.linear_out.weight.dtype
        q, mem = query.to(dtype), memory.to(dtype)
        with torch.set_grad_enabled(grad):
            _, state = module.step(q[:1], None, memory=mem[:1])
            state = None if state is None else state[:1]  # the stock layer keeps no state
            return [module.step(q, state, memory=mem)[0] for _ in range(3)]

    def check(grad=False):
        for got in decode(ours, grad):
            torch.testing.assert_close(got, decode(stock)[0], **FP64)

    check()
    with torch.no_grad():  # an optimizer-like in-place update of the stock weights...
        for p in stock.parameters():
            p.add_(0.5)
    ours.load_state_dict(stock.state_dict())  # ...copied in place into ours
    check()
    stock.float(), ours.float()
    for got in decode(ours):
        torch.testing.assert_close(got, decode(stock)[0], rtol=1e-5, atol=1e-5)
        assert got.dtype == torch.float32
    stock.double(), ours.double()
    check(grad=True)
    decode(ours, grad=True)[-1].sum().backward()
    decode(stock, grad=True)[-1].sum().backward()
    torch.testing.assert_close(ours.linear_out.weight.grad, stock.linear_out.weight.grad, **FP64)
    torch.testing.assert_close(stock_named_grads(ours)["linear_q.weight"], stock.linear_q.weight.grad, **FP64)


def test_the_memo_of_step_signatures_starts_over_when_full(monkeypatch):
    """More remembered signatures than the memo holds (one per memory length and beam):
    it is emptied and refilled, and every step still equals the stock step."""
    from espnet_mha import decoding

    monkeypatch.setattr(decoding, "_MAX_CHECKED_STEPS", 4)
    stock, ours = stock_and_flash(8, 2)
    query = seq(3, 8)
    with torch.no_grad():
        for t2 in range(1, 12):
            memory = seq(1, t2, 8, seed=t2)
            _, state = ours.step(query[:1], None, memory=memory)
            for _ in range(2):
                got, _ = ours.step(query, state[:1], memory=memory.expand(3, -1, -1))
                torch.testing.assert_close(got, stock.step(query, None, memory=memory.expand(3, -1, -1))[0], **FP64)
            assert 1 <= len(ours._checked_steps) <= 4
