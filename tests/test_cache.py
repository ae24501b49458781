"""step() with the key/value cache: against forward, the stock step and ESPnet's beam search."""

import contextlib
import copy
import pickle
import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_same_nbest
from espnet_mha import cache_records
from espnet_mha.checkpoint import to_stock
from espnet_mha.testing import beam_search, prepare_for_decoding, s4_decoder_pair, stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")

FP64 = dict(rtol=1e-10, atol=1e-10)


def seq(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_cross_attention_steps_equal_forward(seed, masked):
    n_head, d_k = [(1, 5), (3, 7), (4, 8), (2, 1)][seed]
    _, ours = stock_and_flash(n_head * d_k, n_head, seed=seed)
    batch, t1, t2 = 3, 6, 9
    query, memory = seq(batch, t1, n_head * d_k, seed=seed), seq(batch, t2, n_head * d_k, seed=seed + 10)
    mask = None
    if masked:
        mask = seq(batch, 1, t2, seed=seed + 20) > 0
        mask[0] = False  # a fully masked utterance
    expected, _ = ours(query, memory, mask)
    state = ours.default_state(batch)
    for t in range(t1):
        out, state = ours.step(query[:, t], state, memory=memory, mask=mask)
        torch.testing.assert_close(out, expected[:, t], **FP64)
    assert state.shape == (batch, 2, n_head, t2, d_k)


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_cross_step_matches_the_stock_step_with_beam_search_states(seed):
    """The state protocol of S4Decoder.batch_score: split per hypothesis, batch 1 back."""
    stock, ours = stock_and_flash(16, 4, seed=seed)
    memory = seq(1, 13, 16, seed=seed).expand(5, -1, -1)  # BatchBeamSearch expands xs
    state = None
    for t in range(6):
        batch = 1 if t == 0 else 5 - t % 3
        query = seq(batch, 16, seed=100 * seed + t)
        expected, _ = stock.step(query, None, memory=memory[:batch])
        got, new_state = ours.step(query, state, memory=memory[:batch])
        torch.testing.assert_close(got, expected, **FP64)
        assert new_state.shape[0] == batch
        per_hyp = [new_state[b].unsqueeze(0) for b in range(batch)]
        state = per_hyp[0]


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


def test_a_state_is_recomputed_when_the_weights_change_within_an_utterance():
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 7, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        for _ in range(2):  # the second step takes the remembered signature
            _, state = ours.step(query, state[:1], memory=memory)
        for p in stock.parameters():
            p.add_(0.1)
        ours.load_state_dict(stock.state_dict())  # in place
        for _ in range(2):
            got, state = ours.step(query, state[:1], memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
        assert ours.last_cache == "reused"  # the recomputed state is kept again


@pytest.mark.parametrize("change", ["data_assignment", "dtype_round_trip"])
def test_a_state_is_recomputed_when_new_weights_land_where_the_old_ones_were(change):
    """``param.data = ...`` and ``.half().float()`` free the old weights without a write, and
    the allocator often hands their address to the new ones (the write counters match
    too): the record's storage reference tells them apart (reused before: up to 0.97 off)."""
    stock, ours = stock_and_flash(64, 4, dtype=torch.float32)
    memory, query = seq(1, 9, 64, dtype=torch.float32).expand(3, -1, -1), seq(3, 64, seed=1, dtype=torch.float32)
    with torch.no_grad():
        for attempt in range(12):
            _, state = ours.step(query, None, memory=memory)  # a filled cache (no query views kept)
            if change == "data_assignment":
                for scale in (0.5, 4.0 if attempt % 2 else 1.0):  # the second lands where the first was
                    for p in qkv_parameters(ours):
                        p.data = p.data * scale
            else:
                ours.half().float()
            stock.load_state_dict(to_stock(ours.state_dict()))
            got, _ = ours.step(query, state[:1], memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], rtol=1e-5, atol=1e-5)
            assert ours.last_cache.startswith("recomputed")


def test_under_inference_mode_a_state_serves_the_next_steps():
    """Views of inference tensors have no ``_base``: BatchBeamSearch's fresh ``expand`` of the
    encoder output looked like another memory on every step, so every step recomputed."""
    stock, ours = stock_and_flash(16, 4)
    with torch.inference_mode():
        encoded = seq(1, 7, 16)
        query = seq(3, 16, seed=1)
        _, state = ours.step(query[:1], None, memory=encoded.expand(1, -1, -1))
        for _ in range(3):
            got, state = ours.step(query, state[:1], memory=encoded.expand(3, -1, -1))
            assert ours.last_cache == "reused"
            torch.testing.assert_close(got, stock.step(query, None, memory=encoded.expand(3, -1, -1))[0], **FP64)


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


def test_a_state_made_under_inference_mode_serves_a_step_with_gradients():
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 7, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    with torch.inference_mode():
        _, state = ours.step(query, None, memory=memory)
    got, _ = ours.step(query, state[:1], memory=memory)
    assert ours.last_cache == "recomputed: a state made under torch.inference_mode cannot be saved for backward"
    got.sum().backward()
    stock.step(query, None, memory=memory)[0].sum().backward()
    torch.testing.assert_close(ours.linear_out.weight.grad, stock.linear_out.weight.grad, **FP64)
    torch.testing.assert_close(stock_named_grads(ours)["linear_k.weight"], stock.linear_k.weight.grad, **FP64)


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


def test_state_none_always_recomputes():
    _, ours = stock_and_flash(12, 3)
    query = seq(2, 12)
    a, _ = ours.step(query, None, memory=seq(2, 9, 12, seed=1))
    b, _ = ours.step(query, None, memory=seq(2, 9, 12, seed=2))
    assert not torch.allclose(a, b)


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


@pytest.mark.parametrize("dtype,score_tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("beam", [1, 3, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_beam_search_gives_the_stock_nbest(seed, beam, dtype, score_tol):
    stock, ours = s4_decoder_pair(vocab_size=20, d_model=32, n_layers=2, n_head=4, seed=seed, dtype=dtype)
    assert_same_nbest(stock, ours, seq(23, 32, seed=seed, dtype=dtype), beam=beam, maxlenratio=0.6,
                      score_tol=score_tol)


def test_two_threads_share_one_module():
    """Nothing of an utterance lives on the module: concurrent decoding = sequential."""
    stock, ours = s4_decoder_pair(vocab_size=15, d_model=16, n_layers=1, n_head=2, seed=3, dtype=torch.float32)
    prepare_for_decoding(ours)
    inputs = [seq(19, 16, seed=s, dtype=torch.float32) for s in range(4)]

    def decode(x):
        with torch.no_grad():
            return [h.yseq.tolist() for h in beam_search(ours, beam_size=3)(x, maxlenratio=0.5, minlenratio=0.0)]

    sequential = [decode(x) for x in inputs]
    concurrent = [None] * len(inputs)

    def worker(i):
        concurrent[i] = decode(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert concurrent == sequential


@pytest.mark.parametrize("shared", [True, False], ids=["shared-cache", "per-hypothesis-cache"])
def test_step_keeps_the_stock_weights_when_asked(shared):
    stock, ours = stock_and_flash(12, 3, keep_attn=True)
    memory = seq(1, 7, 12).expand(4, -1, -1) if shared else seq(4, 7, 12)
    query = seq(4, 12, seed=1)
    mask = seq(4, 1, 7, seed=2) > 0
    expected, _ = stock.step(query, None, memory=memory, mask=mask)
    got, _ = ours.step(query, None, memory=memory, mask=mask)
    torch.testing.assert_close(got, expected, **FP64)
    torch.testing.assert_close(ours.attn, stock.attn, **FP64)
    assert ours.last_backend == "math"


def dropout_pair(p, **options):
    """The stock layer and ours with attention dropout ``p``, same weights, in training mode."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    from espnet_mha import FlashMultiHeadedAttention

    torch.manual_seed(0)
    stock = MultiHeadedAttention(12, 3, dropout=p).double().train()
    ours = FlashMultiHeadedAttention(12, 3, dropout=p, **options).double().train()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_steps_in_training_apply_dropout_as_the_stock_step(backend):
    """The stock step runs forward, so it drops attention weights in training.
    With p = 1 every weight is dropped: the output is the output bias, exactly."""
    stock, ours = dropout_pair(1.0, backend=backend)
    query, memory = seq(4, 12), seq(1, 7, 12).expand(4, -1, -1)
    bias = ours.linear_out.bias.expand(4, 12)
    _, state = ours.step(query, None, memory=memory)
    for got, _ in (ours.step(query, None, memory=memory), ours.step(query, state, memory=memory),
                   ours.step(query, state[:1], memory=memory), ours.step(query, state.contiguous(), memory=memory)):
        torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
        torch.testing.assert_close(got, bias, rtol=0, atol=0)
    _, causal = dropout_pair(1.0, backend=backend, causal=True)
    _, state = causal.step(query, None)
    torch.testing.assert_close(causal.step(query, state)[0], bias, rtol=0, atol=0)


def test_dropout_of_a_step_keeps_the_expectation_and_stops_in_eval():
    _, ours = dropout_pair(0.5)
    query, memory = seq(2, 12), seq(2, 40, 12, seed=1)
    _, state = ours.step(query, None, memory=memory)
    samples = torch.stack([ours.step(query, state, memory=memory)[0] for _ in range(400)])
    assert not torch.allclose(samples[0], samples[1])
    ours.eval()
    expected, _ = ours.step(query, state, memory=memory)
    torch.testing.assert_close(samples.mean(0), expected, rtol=0, atol=0.1)
    torch.testing.assert_close(ours.step(query, state, memory=memory)[0], expected, rtol=0, atol=0)


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


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="torch < 2.7 cannot tell torch.export from torch.compile: both get the stock step")
def test_a_step_compiled_by_the_user_checks_where_its_state_came_from():
    """torch.compile around the layer's step (as a user compiling the decoder's batch_score
    does): a state made from one memory, given with another of the same length (a
    streaming window that slid), is recomputed as in eager. The check was skipped while
    tracing, so the compiled step silently reused the old keys."""
    torch._dynamo.reset()
    stock, ours = stock_and_flash(16, 2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(1, 6, 16, generator=gen), torch.randn(1, 6, 16, generator=gen)
    query = torch.randn(3, 16, generator=gen)
    step = torch.compile(ours.step, backend="eager")
    with torch.no_grad():
        _, state = step(query[:1], None, memory=first)
        for memory, cache_use in ((second, "recomputed: the state was made from another memory"), (second, "reused")):
            got, state = step(query, state[:1], memory=memory.expand(3, -1, -1))
            torch.testing.assert_close(got, stock.step(query, None, memory=memory.expand(3, -1, -1))[0],
                                       rtol=1e-5, atol=1e-5)
            assert ours.last_cache == cache_use


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


@pytest.mark.parametrize("case", ["no_grad_first_step", "detached_memory", "frozen_weights"])
def test_a_state_whose_graph_does_not_fit_the_step_is_recomputed(case):
    """A state carries the autograd graph of its projection. Made under no_grad and reused
    with gradients, the memory and the k/v weights got no gradient (stock: norms 1.3 and
    1.7); made from a memory that required grad and reused with ``memory.detach()``, or
    with weights frozen since, gradients leaked to where the stock step sends none."""
    stock, ours = stock_and_flash(16, 4)
    leaf, query = seq(1, 7, 16).requires_grad_(True), seq(3, 16, seed=1)
    memory = leaf.expand(3, -1, -1)  # as BatchBeamSearch passes it
    _, good = ours.step(query[:1], None, memory=leaf)
    ours.step(query, good[:1], memory=memory)  # reused: the signature is remembered (the fast path)
    assert ours.last_cache == "reused" and ours._checked_steps
    context = torch.no_grad() if case == "no_grad_first_step" else contextlib.nullcontext()
    with context:
        _, state = ours.step(query[:1], None, memory=leaf)
    given = memory.detach() if case == "detached_memory" else memory
    if case == "frozen_weights":
        for layer in (stock, ours):
            layer.requires_grad_(False)
    for layer in (stock, ours):
        layer.zero_grad(set_to_none=True)
    leaf.grad = None
    out, _ = ours.step(query, state[:1], memory=given)
    out.sum().backward()
    got = (leaf.grad, *stock_named_grads(ours).values())
    assert ours.last_cache.startswith("recomputed")
    leaf.grad = None
    stock.step(query, None, memory=given)[0].sum().backward()
    expected = (leaf.grad, *(p.grad for p in stock.parameters()))
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, **FP64)


def qkv_parameters(layer):
    """Our layer's q/k/v parameters: the fused ones, or the stock linear_q/k/v's."""
    return [p for name, p in layer.named_parameters() if not name.startswith("linear_out")]


def stock_named_grads(layer):
    """Our layer's gradients under the stock names, in the stock order (None where none)."""
    named = {name: p.grad for name, p in layer.named_parameters()}
    if "linear_qkv.weight" in named:
        for param in ("weight", "bias"):
            grad = named.pop(f"linear_qkv.{param}")
            for x, part in zip("qkv", (None,) * 3 if grad is None else grad.chunk(3)):
                named[f"linear_{x}.{param}"] = part
    order = [f"linear_{x}.{param}" for x in ("q", "k", "v", "out") for param in ("weight", "bias")]
    return {name: named[name] for name in order}


def kv_weight_name(layer):
    """The parameter name of the weight our layer projects keys from."""
    return "linear_qkv.weight" if "linear_qkv" in layer._modules else "linear_k.weight"


def test_torch_func_transforms_over_a_step_match_stock():
    """vmap and grad over step: their tensors have no address for the cache's records
    (it raised "Cannot access data pointer"); the step then computes as the stock one."""
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(4, 7, 16), seq(4, 16, seed=1)

    def one(layer):
        return lambda q, m: layer.step(q[None], None, memory=m[None])[0][0]

    torch.testing.assert_close(torch.func.vmap(one(ours))(query, memory), torch.func.vmap(one(stock))(query, memory),
                               **FP64)
    grad = [torch.func.grad(lambda m, layer=layer: layer.step(query, None, memory=m)[0].sum())(memory)
            for layer in (ours, stock)]
    torch.testing.assert_close(grad[0], grad[1], **FP64)


@pytest.mark.parametrize("causal_memory", [False, True], ids=["cross", "self"])
def test_a_step_with_several_query_positions_is_forward_as_in_the_stock_step(causal_memory):
    stock, ours = stock_and_flash(16, 4)
    query, memory = seq(2, 3, 16), None if causal_memory else seq(2, 5, 16, seed=1)
    got, state = ours.step(query, None, memory=memory)
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    assert got.shape == (2, 3, 16) and state is None


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


class StepOf(torch.nn.Module):
    """``forward`` is the layer's ``step`` (what torch.func.functional_call calls)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, query, state, memory):
        return self.layer.step(query, state, memory=memory)[0]


@pytest.mark.parametrize("swap", ["memory", "weights"])
def test_a_state_is_recomputed_for_a_detached_copy_that_requires_grad(swap):
    """``x.detach().requires_grad_()`` has the address, write counter and flags of ``x``, but
    a state's graph reaches only ``x`` (a memory swapped so, or weights through
    torch.func.functional_call): the copy got no gradient (stock: 0.66 on the k/v rows)."""
    stock, ours = stock_and_flash(16, 4)
    leaf, query = seq(1, 7, 16).requires_grad_(True), seq(3, 16, seed=1)
    _, state = ours.step(query[:1], None, memory=leaf)
    memory = leaf.detach().requires_grad_(True) if swap == "memory" else leaf
    wrapper = StepOf(ours)
    params = {name: p.detach().requires_grad_(True) for name, p in wrapper.named_parameters()}
    if swap == "memory":
        out = wrapper(query, state[:1], memory.expand(3, -1, -1))
    else:
        out = torch.func.functional_call(wrapper, params, (query, state[:1], memory.expand(3, -1, -1)))
    assert ours.last_cache.startswith("recomputed")
    name = kv_weight_name(ours)
    got = torch.autograd.grad(out.sum(), memory if swap == "memory" else params[f"layer.{name}"])[0]
    stock_out = stock.step(query, None, memory=memory.expand(3, -1, -1))[0]
    if swap == "memory":
        expected = torch.autograd.grad(stock_out.sum(), memory)[0]
    elif name == "linear_k.weight":
        expected = torch.autograd.grad(stock_out.sum(), stock.linear_k.weight)[0]
    else:
        stock_out.sum().backward()
        expected = torch.cat([getattr(stock, f"linear_{x}").weight.grad for x in "qkv"])
    torch.testing.assert_close(got, expected, **FP64)


def test_a_state_reused_without_gradients_keeps_its_graph():
    """A no-grad step that reuses a state made with gradients must not record it as made
    without them: the next step with gradients reuses it (it recomputed needlessly)."""
    _, ours = stock_and_flash(16, 4)
    leaf, query = seq(1, 7, 16).requires_grad_(True), seq(3, 16, seed=1)
    _, state = ours.step(query[:1], None, memory=leaf)
    with torch.no_grad():
        ours.step(query, state[:1], memory=leaf.expand(3, -1, -1))
    assert ours.last_cache == "reused"
    ours.step(query, state[:1], memory=leaf.expand(3, -1, -1))
    assert ours.last_cache == "reused"


def test_a_weight_at_the_same_address_with_other_strides_is_another_weight():
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 7, 16), seq(3, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query[:1], None, memory=memory)
        name = kv_weight_name(ours)
        weight = ours.get_parameter(name)
        rows = weight.size(0)
        transposed = weight.as_strided((rows, 16), (1, rows))  # same storage and address, other layout
        wrapper = StepOf(ours)
        got = torch.func.functional_call(wrapper, {f"layer.{name}": transposed},
                                         (query, state[:1], memory.expand(3, -1, -1)))
        assert ours.last_cache.startswith("recomputed")
        stock_params = ({name: transposed} if rows == 16 else
                        {f"linear_{x}.weight": w for x, w in zip("qkv", transposed.chunk(3))})
        expected = torch.func.functional_call(StepOf(stock), {f"layer.{k}": v for k, v in stock_params.items()},
                                              (query, None, memory.expand(3, -1, -1)))
    torch.testing.assert_close(got, expected, **FP64)


def test_an_inference_mode_memory_serves_a_step_with_gradients():
    """A frozen encoder run under inference_mode feeding decoder training: the batched GEMM
    saved the inference tensor for backward, which autograd refuses (stock: fine)."""
    stock, ours = stock_and_flash(16, 4)
    with torch.inference_mode():
        memory = seq(1, 7, 16)
    query = seq(3, 16, seed=1)
    out, _ = ours.step(query, None, memory=memory.expand(3, -1, -1))
    out.sum().backward()
    stock.step(query, None, memory=memory.expand(3, -1, -1))[0].sum().backward()
    torch.testing.assert_close(out, stock.step(query, None, memory=memory.expand(3, -1, -1))[0], **FP64)
    for name, grad in stock_named_grads(ours).items():
        torch.testing.assert_close(grad, stock.get_parameter(name).grad, **FP64)


def test_the_inference_tensor_itself_serves_a_step_with_gradients():
    """The inference tensor itself, not a view: the stock step raises (its linear_k saves
    it for backward); ours serves it, with the stock step's values and gradients on a
    copy of it; forward raises as the stock one does (README, "Differences")."""
    stock, ours = stock_and_flash(16, 4)
    with torch.inference_mode():
        memory = seq(2, 7, 16)
    query = seq(2, 16, seed=1)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        stock.step(query, None, memory=memory)
    out, _ = ours.step(query, None, memory=memory)
    out.sum().backward()
    expected, _ = stock.step(query, None, memory=memory.clone())
    expected.sum().backward()
    torch.testing.assert_close(out, expected, **FP64)
    for name, grad in stock_named_grads(ours).items():
        torch.testing.assert_close(grad, stock.get_parameter(name).grad, **FP64)
    for layer in (stock, ours):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            layer(query.unsqueeze(1), memory)


def test_a_wrapper_subclass_memory_gets_the_stock_step():
    """A tensor subclass without a storage of its own (TwoTensor) has nothing for the
    cache's records (it raised "invalid python storage"): the stock step serves it."""
    from torch.testing._internal.two_tensor import TwoTensor

    stock, ours = stock_and_flash(16, 4)
    a, query = seq(2, 7, 16), seq(2, 16, seed=1)
    memory = TwoTensor(a, a.clone())
    with torch.no_grad():
        got, state = ours.step(query, None, memory=memory)
        torch.testing.assert_close(got.a, stock.step(query, None, memory=a)[0], **FP64)
    assert state is None and ours.last_cache is None


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


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_parameters_can_be_swapped_after_a_step(grad):
    """With ``swap_module_params_on_conversion``, ``.to()`` and ``load_state_dict`` swap the
    parameter objects' contents (``torch.utils.swap_tensors``), which refuses a tensor held
    elsewhere (the remembered query views) or weakly referenced (the cache records): both
    failed after one step. The layer forgets them first; the next step recomputes."""
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32)
    memory, query = seq(1, 9, 16, dtype=torch.float32).expand(3, -1, -1), seq(3, 16, seed=1, dtype=torch.float32)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.set_grad_enabled(grad):
            state = ours.step(query, None, memory=memory)[1]
            # Detached: a state's graph holds the weights, as any output's graph does.
            state = ours.step(query, state, memory=memory)[1].detach()
            ours.double()
            stock.double()
            got, _ = ours.step(query.double(), state.double(), memory=memory.double())
            assert ours.last_cache.startswith("recomputed")
            torch.testing.assert_close(got, stock.step(query.double(), None, memory=memory.double())[0], **FP64)
            del got  # (its graph holds the output weights)
            ours.load_state_dict(stock.state_dict())
            ours.step(query.double(), None, memory=memory.double())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


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


def test_the_zero_mask_of_unmasked_cpu_calls_is_made_once_and_serves_autograd():
    """Unmasked CPU SDPA calls get a remembered zero mask (pytorch #141128). The first one
    made under inference mode must still serve a forward and backward with gradients,
    where an inference tensor cannot be saved for backward."""
    from espnet_mha import kernels

    stock, ours = stock_and_flash(16, 4)
    kernels._ZERO_MASKS.clear()
    query = seq(2, 7, 16)
    with torch.inference_mode():
        ours(query, None, None)
    (mask,) = kernels._ZERO_MASKS.values()
    assert not mask.is_inference() and mask.shape == (1, 1, 1, 7) and not mask.any()
    query.requires_grad_(True)
    got, _ = ours(query, None, None)
    (grad,) = torch.autograd.grad(got.sum(), query)
    assert list(kernels._ZERO_MASKS.values()) == [mask]  # the same tensor served again
    stock_query = query.detach().requires_grad_(True)
    expected, _ = stock(stock_query, None, None)
    torch.testing.assert_close(got, expected, **FP64)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), stock_query)[0], **FP64)


@pytest.mark.parametrize("how", ["detach", "no_grad_step"])
def test_a_state_without_a_graph_is_recomputed_when_gradients_are_needed(how):
    """Training through the steps with a backward every two steps, the state detached after
    each (the habit that avoids backward through a freed graph), or a state returned by a
    step without gradients: its keys would carry no gradient to the memory and the k/v
    weights (they were reused: 0.4-4.7 off the stock step's gradients)."""
    stock, ours = stock_and_flash(16, 4)
    names = [name for name, _ in stock.named_parameters()]

    caches = []

    def train(layer):
        memory = seq(2, 5, 16, seed=1).requires_grad_(True)
        params = [memory, *layer.parameters()]
        grads, state, loss = [torch.zeros_like(p) for p in params], None, 0
        for t in range(6):
            if how == "no_grad_step" and t % 2 == 1 and state is not None:
                with torch.no_grad():
                    state = layer.step(seq(2, 16, seed=50 + t), state, memory=memory)[1]
            out, state = layer.step(seq(2, 16, seed=t), state, memory=memory)
            caches.append(getattr(layer, "last_cache", "stock"))
            loss = loss + out.pow(2).sum()
            if t % 2 == 1:
                grads = [g + d for g, d in zip(grads, torch.autograd.grad(loss, params))]
                loss, state = 0, state.detach() if state is not None else None
        return grads

    expected, got = train(stock), train(ours)
    reason = "recomputed: the state carries no graph, and the memory or the key/value weights need gradients"
    assert caches[6:] == ["filled", "reused", reason, "reused", reason, "reused"]
    torch.testing.assert_close(got[0], expected[0], **FP64)
    ours_grads = dict(zip([name for name, _ in ours.named_parameters()], got[1:]))
    stock_grads = dict(zip(names, expected[1:]))
    torch.testing.assert_close(ours_grads["linear_out.weight"], stock_grads["linear_out.weight"], **FP64)
    kv = ours_grads.get("linear_k.weight")
    if kv is None:  # the fused layout: rows q, k, v
        kv = ours_grads["linear_qkv.weight"][16:32]
    torch.testing.assert_close(kv, stock_grads["linear_k.weight"], **FP64)


def _split_under_no_grad(state, step):
    with torch.no_grad():
        return state[0].unsqueeze(0)


def _split_off_a_no_grad_step(state, step):
    with torch.no_grad():
        state = step(state[0].unsqueeze(0))  # a batch-1 state: the step returns a new, graph-less view
    return state[0].unsqueeze(0)  # BatchBeamSearch's split, with gradients on


def _split_off_a_detached_copy(state, step):
    return state.detach().requires_grad_(True)[0].unsqueeze(0)


@pytest.mark.parametrize("hand_over", [_split_under_no_grad, _split_off_a_no_grad_step, _split_off_a_detached_copy])
def test_a_view_of_a_state_without_a_graph_is_recomputed_when_gradients_are_needed(hand_over):
    """A state whose own grad_fn is set (a view made with gradients on) but whose graph ends
    at a tensor without one: the state a step without gradients returned, a split made
    under no_grad, a ``detach().requires_grad_()`` copy. Reused, its keys gave the memory no
    gradient and the k/v weights none (stock: up to 2.2 on them)."""
    stock, ours = stock_and_flash(16, 4)
    memory = seq(1, 5, 16, seed=1).requires_grad_(True)
    beam = memory.expand(3, -1, -1)
    _, state = ours.step(seq(3, 16, seed=2), None, memory=beam)
    state = hand_over(state, lambda s: ours.step(seq(3, 16, seed=3), s, memory=beam)[1])
    query = seq(3, 16, seed=4)
    got = ours.step(query, state, memory=beam)[0]
    assert ours.last_cache.startswith("recomputed: the state carries no graph")
    expected = stock.step(query, None, memory=beam)[0]
    torch.testing.assert_close(got, expected, **FP64)
    weights = seq(*got.shape, seed=5)
    (got * weights).sum().backward()
    stock_memory_grad = torch.autograd.grad((expected * weights).sum(), [memory, *stock.parameters()])
    torch.testing.assert_close(memory.grad, stock_memory_grad[0], **FP64)
    stock_grads = dict(zip([name for name, _ in stock.named_parameters()], stock_memory_grad[1:]))
    for name, grad in stock_named_grads(ours).items():
        torch.testing.assert_close(grad, stock_grads[name], **FP64)


def test_a_memory_view_made_under_no_grad_gets_the_gradient_of_its_step():
    """A memory view made under no_grad is a leaf of its own (no grad_fn): the step's memory
    gradient goes to it, not to its base. A cache made from a view made with gradients
    reached the base, and was reused: the step's gradient leaked into the base (1.08 off)."""
    stock, ours = stock_and_flash(16, 4)
    base_ours, base_stock = seq(1, 5, 16, seed=1).requires_grad_(True), seq(1, 5, 16, seed=1).requires_grad_(True)
    first, second = seq(3, 16, seed=2), seq(3, 16, seed=3)
    out_ours, state = ours.step(first, None, memory=base_ours.expand(3, -1, -1))
    out_stock = stock.step(first, None, memory=base_stock.expand(3, -1, -1))[0]
    with torch.no_grad():
        view_ours, view_stock = base_ours.expand(3, -1, -1), base_stock.expand(3, -1, -1)
    out_ours = out_ours + ours.step(second, state, memory=view_ours)[0]
    assert ours.last_cache.startswith("recomputed")
    out_stock = out_stock + stock.step(second, None, memory=view_stock)[0]
    out_ours.sum().backward()
    out_stock.sum().backward()
    torch.testing.assert_close(base_ours.grad, base_stock.grad, **FP64)
    torch.testing.assert_close(view_ours.grad, view_stock.grad, **FP64)


class DataWriter(torch.optim.Optimizer):
    """An optimizer that writes through ``.data``, which moves no write counter."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-0.5)


@pytest.mark.parametrize("make", ["adam_fused", "sgd_fused", "data_writer"])
def test_an_optimizer_step_within_an_utterance_recomputes_the_cache(make):
    """Fused optimizers update the weights without moving their write counters (torch 2.11,
    CPU), as does one writing through ``.data``: a cache made before the step was reused
    (1.4 off with Adam(fused=True))."""
    stock, ours = stock_and_flash(16, 4)
    params = list(ours.parameters())
    optimizer = {"adam_fused": lambda: torch.optim.Adam(params, lr=0.1, fused=True),
                 "sgd_fused": lambda: torch.optim.SGD(params, lr=0.5, fused=True),
                 "data_writer": lambda: DataWriter(params)}[make]()
    query, memory = seq(3, 16), seq(1, 5, 16, seed=1).expand(3, -1, -1)
    out, state = ours.step(query, None, memory=memory)
    out.pow(2).sum().backward()
    versions = [p._version for p in params]
    optimizer.step()
    if make != "data_writer":
        assert [p._version for p in params] == versions  # the fused update moved no counter
    stock.load_state_dict(to_stock(ours.state_dict()))
    with torch.no_grad():
        got, _ = ours.step(query, state[:1], memory=memory)
        expected, _ = stock.step(query, None, memory=memory)
    assert ours.last_cache == "recomputed: the key/value weights changed since the state was made"
    torch.testing.assert_close(got, expected, **FP64)


def test_forward_mode_ad_gets_the_stock_step_and_the_math_path():
    """A dual memory has its primal's address and write counter: a cache of the primal
    (or of another tangent) lost or misstated the tangent. Under a dual level the step is
    the stock step, and ``auto`` takes the math path (SDPA has no forward derivative)."""
    import torch.autograd.forward_ad as fwad

    stock, ours = stock_and_flash(16, 4)
    query, memory = seq(2, 16), seq(2, 5, 16, seed=1)
    _, state = ours.step(query, None, memory=memory)
    for seed in (2, 3):
        with fwad.dual_level():
            dual = fwad.make_dual(memory, seq(2, 5, 16, seed=seed))
            got, new_state = ours.step(query, state, memory=dual)
            expected, _ = stock.step(query, None, memory=dual)
            assert ours.last_cache is None and new_state is state
            assert ours.last_backend == "math" and "forward-mode AD" in ours.last_fallback
            torch.testing.assert_close(fwad.unpack_dual(got).tangent, fwad.unpack_dual(expected).tangent, **FP64)
            torch.testing.assert_close(got, expected, **FP64)
    tangent = seq(2, 5, 16, seed=4)
    got = torch.func.jvp(lambda m: ours(query.unsqueeze(1), m)[0], (memory,), (tangent,))[1]
    expected = torch.func.jvp(lambda m: stock(query.unsqueeze(1), m)[0], (memory,), (tangent,))[1]
    torch.testing.assert_close(got, expected, **FP64)


def test_a_sparse_state_is_refused_by_name():
    _, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 5, 16), seq(1, 16)
    _, state = ours.step(query, None, memory=memory)
    ours.step(query, state, memory=memory)
    with pytest.raises(TypeError, match=r"state is not a cross-attention cache for this query: it must be a dense "
                                        r"\(strided\) tensor, got layout torch.sparse_coo"):
        ours.step(query, state.to_sparse(), memory=memory)


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


def test_a_state_is_recomputed_when_the_fp32_matmul_precision_changes():
    """``torch.set_float32_matmul_precision("medium")`` runs the CPU's fp32 batched matmuls in
    bf16 (oneDNN, on CPUs with bf16 units) and CUDA's in tf32: keys projected under it and
    reused after "highest" was set again were 3.7e-4 off the stock step (a probe's case).
    The step after the change projects the memory again, as the stock step does."""
    stock, ours = stock_and_flash(32, 4)
    stock, ours = stock.float(), ours.float()
    query, memory = seq(3, 32, dtype=torch.float32), seq(1, 7, 32, seed=1, dtype=torch.float32).expand(3, -1, -1)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        _, state = ours.step(query[:1], None, memory=memory[:1])
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad():
            got, _ = ours.step(query, state[:1], memory=memory)
            assert ours.last_cache == ("recomputed: the fp32 matmul precision (torch.set_float32_matmul_precision) "
                                       "changed since the state was made")
            fresh, _ = ours.step(query, None, memory=memory)
            expected, _ = stock.step(query, None, memory=memory)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got, fresh)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
