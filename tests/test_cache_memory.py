"""A state serves only the memory it was made from: a new utterance, a streaming window, rewritten storage."""

import pickle

import pytest
import torch

from cache_cases import FP64, seq
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


@pytest.mark.parametrize(
    "state,why",
    [
        (seq(1, 2, 3, 8, 4), "state length 8 != memory length 9"),
        (seq(1, 2, 3, 9, 4, dtype=torch.float32), "state torch.float32 on cpu != memory torch.float64 on cpu"),
        (torch.empty(1, 2, 3, 9, 4, dtype=torch.float64, device="meta"),
         "state torch.float64 on meta != memory torch.float64 on cpu"),
        (seq(1, 2, 3, 9, 4), "a batch-1 state cannot serve 2 distinct memories"),
        # A batch of utterances that dropped one and handed back the last state (it raised
        # "batch 3 is neither 1 nor the query batch 2"; the stock step ignores the state).
        (seq(3, 2, 3, 9, 4), "state batch 3 is neither 1 nor the query batch 2"),
    ],
)
def test_a_state_that_does_not_belong_to_the_memory_is_recomputed(state, why):
    """The stock layer attends to the memory it is given, so a well-formed state that
    cannot hold that memory's keys is recomputed from it (never reused), visibly."""
    stock, ours = stock_and_flash(12, 3)
    query, memory = seq(2, 12), seq(2, 9, 12, seed=1)
    got, new_state = ours.step(query, state, memory=memory)
    assert ours.last_cache == f"recomputed: {why}"
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    assert new_state.shape == (2, 2, 3, 9, 4) and new_state.dtype == torch.float64
    ours.step(query, new_state, memory=memory)
    assert ours.last_cache == "reused"


def test_a_state_from_the_last_utterance_never_serves_a_new_memory():
    """A decoding loop that forgets to reset the state: the stock layer ignores it, so
    ours must recompute, also when the new memory is allocated where the last one was
    (same address, shape, strides and write counter; it happens within a few tries)."""
    stock, ours = stock_and_flash(16, 4)
    query = seq(3, 16)
    state = None
    with torch.no_grad():
        for i in range(60):
            memory = seq(1, 6, 16, seed=i).expand(3, -1, -1)
            got, state = ours.step(query, state, memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
            state = state[0].unsqueeze(0)
            del memory
    # The same address for sure: two tensors over one numpy buffer, rewritten in between.
    buffer = seq(1, 6, 16, seed=100).numpy()
    first = torch.from_numpy(buffer)
    _, state = ours.step(query, None, memory=first.expand(3, -1, -1))
    buffer[:] = seq(1, 6, 16, seed=101).numpy()
    second = torch.from_numpy(buffer)
    got, _ = ours.step(query, state[:1], memory=second.expand(3, -1, -1))
    assert ours.last_cache == "recomputed: the state was made from another memory"
    torch.testing.assert_close(got, stock.step(query, None, memory=second.expand(3, -1, -1))[0], **FP64)


@pytest.mark.parametrize("window", [None, 6], ids=["growing", "sliding"])
def test_streaming_memory_keeps_matching_the_stock_step(window):
    """ESPnet's BatchBeamSearchOnline keeps decoder states across blocks while the
    encoder output grows (or slides, encoded_feat_length_limit): every step must
    attend to the memory it is given, as the stock step does."""
    stock, ours = stock_and_flash(16, 4)
    encoded = seq(20, 16, seed=3)
    state = None
    with torch.no_grad():
        for step, end in enumerate([6, 6, 10, 10, 14, 14, 20, 20]):
            h = encoded[:end] if window is None else encoded[end - window:end]
            batch = 1 if step == 0 else 3
            memory = h.expand(batch, -1, -1)
            query = seq(batch, 16, seed=step)
            got, new_state = ours.step(query, state, memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
            state = new_state[0].unsqueeze(0)
            assert ours.last_cache == ("filled" if step == 0 else "reused" if step % 2 else ours.last_cache)
            if step and not step % 2:
                assert ours.last_cache.startswith("recomputed: ")


@pytest.mark.parametrize("alias", ["data", "set_", "queue_rebuild"])
def test_another_tensor_over_the_memory_storage_is_not_trusted_after_a_write(alias):
    """The memory written in place through its own tensor (its write counter moves), then
    handed to the next step as another tensor over the same storage, whose counter is its
    own (``.data``, ``set_``, a torch.multiprocessing queue's rebuild in the same process,
    as an encoder thread writing blocks into one shared buffer): the old keys were reused
    (0.28-0.47 off the stock step)."""
    from multiprocessing.reduction import ForkingPickler

    stock, ours = stock_and_flash(16, 4)
    make = {"data": lambda m: m.data,
            "set_": lambda m: torch.empty(0, dtype=m.dtype).set_(m.untyped_storage(), m.storage_offset(),
                                                                 m.shape, m.stride()),
            "queue_rebuild": lambda m: pickle.loads(ForkingPickler.dumps(m))}[alias]
    memory, query = seq(1, 7, 16).share_memory_(), seq(1, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=make(memory))
        memory.add_(1.0)
        got, _ = ours.step(query, state, memory=make(memory))
    assert ours.last_cache == ("recomputed: the memory is another tensor over the storage the state was made "
                               "from (its writes are not seen)")
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)


@pytest.mark.parametrize("negate", ["conj_imag", "neg_view"])
@pytest.mark.parametrize("beam", [1, 4])
def test_a_negated_view_of_the_memory_is_another_memory(negate, beam):
    """``z.conj().imag`` and ``torch._neg_view(m)`` read ``m``'s storage negated, at the same
    address with the same strides and write counter: a state made from ``m`` was reused for
    them, 0.25 off the stock step in fp64 (an audit). The negative bit is now part of the key,
    on the checked path and the remembered one."""
    stock, ours = stock_and_flash(16, 4)
    gen = torch.Generator().manual_seed(beam)
    z = torch.randn(1, 5, 16, dtype=torch.complex128, generator=gen)
    memory = z.imag
    negated = z.conj().imag if negate == "conj_imag" else torch._neg_view(memory)
    assert negated.is_neg() and negated.data_ptr() == memory.data_ptr()
    query = torch.randn(beam, 16, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        for _ in range(2):  # the second time on the remembered step's path
            _, state = ours.step(query, None, memory.expand(beam, -1, -1))
            ours.step(query, state, memory.expand(beam, -1, -1))
            got, _ = ours.step(query, state, negated.expand(beam, -1, -1))
            assert ours.last_cache == "recomputed: the state was made from another memory"
            expected, _ = stock.step(query, None, negated.expand(beam, -1, -1))
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
