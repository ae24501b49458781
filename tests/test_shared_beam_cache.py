"""One cache shared by a beam: projected once, served to any beam as stride-0 views, run on its own backend."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cache_cases import FP64, seq
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n_feat, n_head", [(64, 4), (32, 4), (16, 4), (24, 4)], ids=lambda v: str(v))
def test_the_shared_beam_step_computes_the_bits_of_the_general_step(n_feat, n_head, dtype):
    """A beam step over a shared cache without mask takes its own ops (and with d_k a
    power of 4 applies 1/sqrt(d_k) in the query GEMM); they may not change a bit of
    what the general path (here made to run by keep_attn) computes."""
    stock, ours = stock_and_flash(n_feat, n_head, dtype=dtype)
    _, general = stock_and_flash(n_feat, n_head, dtype=dtype, keep_attn=True)
    memory = seq(1, 11, n_feat, seed=1, dtype=dtype).expand(5, -1, -1)
    query = seq(5, n_feat, seed=2, dtype=dtype)

    def beam_steps(layer):
        _, state = layer.step(query[:1], None, memory=memory[:1])
        return [layer.step(query, state[0].unsqueeze(0), memory=memory)[0] for _ in range(2)]

    with torch.no_grad():
        expected, _ = stock.step(query, None, memory=memory)
        fast, reference = beam_steps(ours), beam_steps(general)
    assert general.attn is not None and len(ours._checked_steps) == 1  # the second step was remembered
    for got in fast:
        assert torch.equal(got, reference[0])
    torch.testing.assert_close(fast[0], expected, **(FP64 if dtype == torch.float64 else {}))


def test_stride0_memory_is_projected_once_and_state_is_shared():
    _, ours = stock_and_flash(32, 4)
    memory = seq(1, 50, 32).expand(10, -1, -1)
    with FlopCounterMode(display=False) as counter:
        _, state = ours.step(seq(10, 32), None, memory=memory)
    projection = 2 * 50 * 32 * 64  # one (T2, D) x (D, 2D) GEMM, not ten
    assert counter.get_total_flops() < 2 * projection
    assert state.shape == (10, 2, 4, 50, 8) and state.stride(0) == 0
    # A later step reuses it: only the query and output projections and attention.
    with FlopCounterMode(display=False) as counter:
        ours.step(seq(10, 32, seed=1), state[0].unsqueeze(0), memory=memory)
    assert counter.get_total_flops() < projection


def test_batch1_state_serves_a_batch_b_query_without_copying():
    _, ours = stock_and_flash(12, 3)
    memory = seq(1, 7, 12).expand(4, -1, -1)
    _, state = ours.step(seq(1, 12), None, memory=memory[:1])
    query = seq(4, 12, seed=3)
    got, new_state = ours.step(query, state, memory=memory)
    assert new_state.data_ptr() == state.data_ptr() and new_state.shape[0] == 4
    expected, _ = ours(query[:, None], memory)
    torch.testing.assert_close(got, expected[:, 0], **FP64)


def test_a_search_that_changes_its_beam_can_hand_back_the_last_state():
    """A shared cache comes back expanded (stride 0) over the query batch; handed to a
    step with another batch it is its batch-1 self, as the stock step passes any state."""
    stock, ours = stock_and_flash(16, 4)
    memory = seq(1, 9, 16)
    state = None
    with torch.no_grad():
        for batch in (1, 10, 3, 5, 2):
            query = seq(batch, 16, seed=batch)
            got, state = ours.step(query, state, memory=memory.expand(batch, -1, -1))
            torch.testing.assert_close(got, stock.step(query, None, memory=memory.expand(batch, -1, -1))[0], **FP64)
            assert ours.last_cache == ("filled" if batch == 1 else "reused")


def test_any_stride0_view_of_a_shared_cache_is_reused():
    """The state a step returns for a shared cache (expanded with stride 0), handed back
    whole, then a part of it: one cache for every hypothesis, reused each time."""
    _, ours = stock_and_flash(16, 4)
    memory = seq(1, 9, 16)
    with torch.no_grad():
        _, state = ours.step(seq(1, 16), None, memory=memory)
        for batch, part in ((10, 10), (10, 10), (3, 3), (4, 1)):
            _, state = ours.step(seq(batch, 16, seed=batch), state[:part], memory=memory.expand(batch, -1, -1))
            assert ours.last_cache == "reused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_a_shared_cache_handed_back_whole_is_attended_as_one_cache(dtype, masked):
    """A loop that hands each step the state the last one returned (a shared cache
    expanded over the beam) gets the very bits of ESPnet's protocol (its batch-1 first
    item): the beam is folded into one GEMM-shaped attention either way. It ran as B
    matrix-vector products, 4.5x slower for 50 steps of beam 10 over 300 frames."""
    stock, ours = stock_and_flash(64, 4, dtype=dtype)
    memory = seq(1, 37, 64, dtype=dtype)
    mask = (seq(1, 1, 37, seed=3) > -0.5) if masked else None
    with torch.no_grad():
        _, state = ours.step(seq(1, 64, dtype=dtype), None, memory=memory, mask=mask)
        _, state = ours.step(seq(6, 64, seed=1, dtype=dtype), state, memory=memory.expand(6, -1, -1), mask=mask)
        assert state.shape[0] == 6 and state.stride(0) == 0
        for t in range(2, 5):
            query = seq(6, 64, seed=t, dtype=dtype)
            whole, state = ours.step(query, state, memory=memory.expand(6, -1, -1), mask=mask)
            first, _ = ours.step(query, state[0].unsqueeze(0), memory=memory.expand(6, -1, -1), mask=mask)
            assert ours.last_cache == "reused"
            assert torch.equal(whole, first)
            expected, _ = stock.step(query, None, memory=memory.expand(6, -1, -1), mask=mask)
            torch.testing.assert_close(whole, expected, **(FP64 if dtype == torch.float64 else {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_shared_and_per_utterance_caches_each_run_their_backend(dtype):
    """CPU, no mask: a beam over one shared cache runs the stock math (its products are
    GEMMs); caches per utterance (a batch of utterances decoded together) run SDPA, 3-4x
    faster than the math's matrix-vector products, with a zero mask that keeps NaN rows.
    The two states have the same shape: the remembered signature of a step must tell them
    apart. Both equal the stock step."""
    stock, ours = stock_and_flash(16, 4, seed=3, dtype=dtype)
    shared, own = seq(1, 11, 16, seed=1, dtype=dtype).expand(4, -1, -1), seq(4, 11, 16, seed=2, dtype=dtype)
    query = seq(4, 16, seed=5, dtype=dtype)
    with torch.no_grad():
        _, shared_state = ours.step(query, None, memory=shared)
        _, own_state = ours.step(query, None, memory=own)
        assert shared_state.shape == own_state.shape and shared_state.stride(0) == 0
        for _ in range(3):  # the later rounds take the remembered signatures
            for state, memory, backend in [(shared_state, shared, "math"), (own_state, own, "sdpa")]:
                got, _ = ours.step(query, state, memory=memory)
                assert (ours.last_backend, ours.last_cache) == (backend, "reused")
                expected, _ = stock.step(query, None, memory=memory)
                torch.testing.assert_close(got, expected, **(FP64 if dtype == torch.float64 else {}))
    assert len(ours._checked_steps) == 2
