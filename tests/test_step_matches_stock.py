"""step() with the key/value cache: against forward, the stock step and ESPnet's beam search."""

import threading

import pytest
import torch

from cache_cases import FP64, seq
from conftest import assert_same_nbest
from espnet_mha.testing import beam_search, prepare_for_decoding, s4_decoder_pair, stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


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


def test_state_none_always_recomputes():
    _, ours = stock_and_flash(12, 3)
    query = seq(2, 12)
    a, _ = ours.step(query, None, memory=seq(2, 9, 12, seed=1))
    b, _ = ours.step(query, None, memory=seq(2, 9, 12, seed=2))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("causal_memory", [False, True], ids=["cross", "self"])
def test_a_step_with_several_query_positions_is_forward_as_in_the_stock_step(causal_memory):
    stock, ours = stock_and_flash(16, 4)
    query, memory = seq(2, 3, 16), None if causal_memory else seq(2, 5, 16, seed=1)
    got, state = ours.step(query, None, memory=memory)
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    assert got.shape == (2, 3, 16) and state is None


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
