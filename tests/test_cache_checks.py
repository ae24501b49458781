"""Which states a step trusts: malformed ones raise; foreign, forgotten, changed or aliased ones are recomputed."""

import copy
import pickle

import pytest
import torch

from cache_cases import FP64, seq
from espnet_mha import cache_records
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


@pytest.mark.parametrize(
    "state,match",
    [
        (seq(1, 2, 3, 9, 5), r"shape \(1, 2, 3, 9, 5\) is not \(b, 2, 3, t, 4\)"),
        (seq(1, 2, 4, 9, 3), r"shape \(1, 2, 4, 9, 3\) is not"),
        (seq(1, 9, 24), r"shape \(1, 9, 24\) is not"),
    ],
)
def test_a_malformed_state_raises(state, match):
    _, ours = stock_and_flash(12, 3)
    with pytest.raises(ValueError, match=r"state is not a cross-attention cache for this query: " + match):
        ours.step(seq(2, 12), state, memory=seq(2, 9, 12))
    with pytest.raises(TypeError, match=r"state must be None or the \(b, 2, n_head, T, d_k\) cache"):
        ours.step(seq(2, 12), [state], memory=seq(2, 9, 12))


def test_a_sparse_state_is_refused_by_name():
    _, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 5, 16), seq(1, 16)
    _, state = ours.step(query, None, memory=memory)
    ours.step(query, state, memory=memory)
    with pytest.raises(TypeError, match=r"state is not a cross-attention cache for this query: it must be a dense "
                                        r"\(strided\) tensor, got layout torch.sparse_coo"):
        ours.step(query, state.to_sparse(), memory=memory)


def test_foreign_forgotten_and_copied_states_are_recomputed(monkeypatch):
    """A state the layer has no record of (a copy, one of another layer, one forgotten
    after cache_records.MAX_SOURCES caches) cannot be checked against its memory: recomputed."""
    stock, ours = stock_and_flash(16, 4)
    query = seq(3, 16)
    memories = [seq(1, 5, 16, seed=i).expand(3, -1, -1) for i in range(4)]
    _, state = ours.step(query, None, memory=memories[0])
    got, _ = ours.step(query, state.clone(), memory=memories[1])
    assert ours.last_cache == "recomputed: this layer has no record of the state (not made by it, or forgotten)"
    torch.testing.assert_close(got, stock.step(query, None, memory=memories[1])[0], **FP64)
    monkeypatch.setattr(cache_records, "MAX_SOURCES", 2)
    old = ours.step(query, None, memory=memories[2])[1]
    for memory in memories:  # more caches than the layer keeps records of
        ours.step(query, None, memory=memory)
    got, _ = ours.step(query, old[:1], memory=memories[3])
    assert ours.last_cache.startswith("recomputed: ")
    torch.testing.assert_close(got, stock.step(query, None, memory=memories[3])[0], **FP64)
    twin = copy.deepcopy(ours)  # copies (and pickles) know no caches
    got, _ = twin.step(query, old[:1], memory=memories[2])
    assert twin.last_cache.startswith("recomputed: this layer has no record")
    torch.testing.assert_close(got, stock.step(query, None, memory=memories[2])[0], **FP64)
    assert pickle.loads(pickle.dumps(ours))._cache_sources == {}


def test_a_state_changed_in_place_is_recomputed():
    stock, ours = stock_and_flash(8, 2)
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(3, 8, generator=gen, dtype=torch.float64), torch.randn(1, 5, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _, state = ours.step(query[:1], None, memory=memory)
        state = state[:1]
        ours.step(query, state, memory=memory.expand(3, -1, -1))
        state.mul_(0.0)
        got, _ = ours.step(query, state, memory=memory.expand(3, -1, -1))
    assert ours.last_cache == "recomputed: the state was changed in place since it was made"
    torch.testing.assert_close(got, stock.step(query, None, memory=memory.expand(3, -1, -1))[0], rtol=1e-10, atol=1e-10)


def test_a_tensor_over_a_cache_address_is_not_that_cache():
    """A record keeps a weak reference to the cache's own storage: another storage over
    the same elements (a numpy alias, rewritten through numpy, which no write counter
    sees) is not the cache, and is recomputed."""
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 9, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        elements = state[0].numpy()
        elements[...] = 0.0
        alias = torch.from_numpy(elements).unsqueeze(0)
        assert alias.data_ptr() == state.data_ptr() and alias._version == state._version
        got, _ = ours.step(query, alias, memory=memory)
    assert ours.last_cache == "recomputed: this layer has no record of the state (not made by it, or forgotten)"
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)


def test_states_allocated_where_freed_caches_were_are_recomputed():
    """What a probe found reused: a zeros state given at the start of each utterance (in
    place of None) landing where the last utterance's freed cache was (27 of 30 steps
    wrong), and another layer's state landing where this layer's freed cache was (19 of
    20). The allocator decides where they land; the results may not depend on it."""
    stock, ours = stock_and_flash(16, 4, seed=1)
    _, other = stock_and_flash(16, 4, seed=2)
    memory, query = seq(1, 9, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    expected = stock.step(query, None, memory=memory)[0]
    with torch.no_grad():
        for _ in range(10):
            state = torch.zeros(1, 2, 4, 9, 4, dtype=torch.float64)
            for _ in range(3):
                got, state = ours.step(query, state, memory=memory)
                torch.testing.assert_close(got, expected, **FP64)
            del state
        for _ in range(10):
            _, state = ours.step(query, None, memory=memory)
            del state
            _, foreign = other.step(query, None, memory=memory)
            got, _ = ours.step(query, foreign, memory=memory)
            torch.testing.assert_close(got, expected, **FP64)
            assert ours.last_cache.startswith("recomputed")


def test_a_view_of_other_items_of_a_cache_is_recomputed():
    """With B distinct memories, ``state[0:1].expand(B, ...)`` is a view of the cache with
    item 0's keys for every item: recomputed (it was reused)."""
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(3, 9, 16), seq(3, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        got, _ = ours.step(query, state[0:1].expand(3, -1, -1, -1, -1), memory=memory)
    assert ours.last_cache == "recomputed: the state is a view of other items of the cache this layer made"
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    with torch.no_grad():
        ours.step(query, state, memory=memory)
    assert ours.last_cache == "reused"
