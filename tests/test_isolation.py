"""No shared mutable state between utterances: the layer keeps nothing of a call on ``self``
(attention weights only with ``keep_attn=True``; which memory each decoding cache
holds, as addresses, see espnet_mha.cache_records), so threads that decode different
utterances with one module get what they get one after the other, the module is
unchanged afterwards, and new weights take effect on the next utterance.
(tests/test_step_matches_stock.py::test_two_threads_share_one_module is the basic version;
this one adds a barrier, repeated rounds, different lengths and beams, scores, layer-level
interleaving and a snapshot of every attribute of our layers.)
"""

import threading

import pytest
import torch

from espnet_mha.layer import FlashMultiHeadedAttention
from espnet_mha.testing import beam_search, build_s4_decoder, prepare_for_decoding, stock_and_flash

ROUNDS = 3


def seq(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def snapshot(model):
    """Every parameter and buffer of ``model``, and every attribute of our attention layers
    in it: tensors cloned, plain values copied, containers by repr, other objects by identity.
    (ESPnet's S4 kernels rebuild helper objects per call, so only our layers' attributes are
    compared.)"""
    state = {f"state_dict:{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for prefix, module in model.named_modules():
        if not isinstance(module, FlashMultiHeadedAttention):
            continue
        for name, value in vars(module).items():
            # _cache_sources: what each cache was projected from (addresses, counters, weak
            # references; no tensor kept alive); new caches add entries, and an entry can
            # only force a recomputation.
            if name in ("_parameters", "_buffers", "_cache_sources"):
                continue
            if name == "_modules":
                value = sorted(value)
            elif isinstance(value, torch.Tensor):
                value = value.detach().clone()
            elif isinstance(value, (set, dict, list)):
                value = repr(value)
            elif not isinstance(value, (int, float, str, bool, type(None), tuple)):
                value = ("object", id(value))
            state[f"{prefix}:{name}"] = value
    return state


def assert_same(before, after):
    assert before.keys() == after.keys(), f"attributes added/removed: {before.keys() ^ after.keys()}"
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), f"{key} changed"
        else:
            assert value == after[key], f"{key} changed: {value!r} -> {after[key]!r}"


def run_threads(targets):
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(target):
        try:
            barrier.wait()
            target()
        except Exception as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a decoding thread hangs"
    if errors:
        raise errors[0]


def test_concurrent_beam_search_equals_sequential_and_leaves_the_module_unchanged(one_thread):
    decoder = prepare_for_decoding(
        build_s4_decoder("flash_mha", vocab_size=15, d_model=16, n_layers=2, n_head=2, seed=3).double()
    )
    # Different encoder lengths and beams per utterance, so any cross-talk changes shapes or scores.
    utterances = [(seq(t2, 16, seed=t2), beam) for t2, beam in [(13, 3), (19, 1), (23, 4), (29, 2)]]

    def decode(memory, beam):
        with torch.no_grad():
            hyps = beam_search(decoder, beam_size=beam)(memory, maxlenratio=0.5, minlenratio=0.0)
        return [(h.yseq.tolist(), float(h.score)) for h in hyps]

    sequential = [decode(*u) for u in utterances]
    before = snapshot(decoder)
    concurrent = [[] for _ in utterances]

    def worker(i):
        return lambda: concurrent[i].extend(decode(*utterances[i]) for _ in range(ROUNDS))

    run_threads([worker(i) for i in range(len(utterances))])
    for i, expected in enumerate(sequential):
        assert len(expected) > 0
        assert concurrent[i] == [expected] * ROUNDS, f"utterance {i} differs when decoded concurrently"
    assert_same(before, snapshot(decoder))
    assert all(m.attn is None for m in decoder.modules() if isinstance(m, FlashMultiHeadedAttention))


@pytest.mark.parametrize("causal", [False, True], ids=["cross", "causal"])
def test_interleaved_steps_on_one_layer_do_not_cross_talk(causal, one_thread):
    """Two threads step one layer with their own memories and states, many times."""
    _, layer = stock_and_flash(12, 3, causal=causal)
    streams = []
    for seed, (batch, t2, steps) in enumerate([(2, 7, 60), (5, 11, 45)]):
        memory = seq(1, t2, 12, seed=seed).expand(batch, -1, -1)
        mask = seq(batch, 1, t2, seed=seed + 10) > -0.5
        streams.append((seq(steps, batch, 12, seed=seed + 20), memory, mask))

    def decode(queries, memory, mask):
        state, outs = None, []
        for query in queries:
            out, state = layer.step(query, state, memory=memory, mask=None if causal else mask)
            if state is not None and not causal:
                state = state[0].unsqueeze(0)  # the beam-search state protocol
            outs.append(out)
        return torch.stack(outs)

    with torch.no_grad():
        expected = [decode(*s) for s in streams]
        before = snapshot(layer)
        got = [None] * len(streams)

        def worker(i):
            def run():
                with torch.no_grad():  # grad mode is per thread
                    for _ in range(ROUNDS):
                        got[i] = decode(*streams[i])
                        torch.testing.assert_close(got[i], expected[i], rtol=0, atol=0)
            return run

        run_threads([worker(i) for i in range(len(streams))])
    assert_same(before, snapshot(layer))


@pytest.mark.parametrize("keep_attn", [False, True])
def test_only_requested_attention_weights_stay_on_the_module(keep_attn):
    stock, ours = stock_and_flash(12, 3, keep_attn=keep_attn)
    query, memory = seq(2, 4, 12, seed=0), seq(2, 6, 12, seed=1)
    mask = seq(2, 1, 6, seed=2) > 0
    ours(query, memory, mask)  # the first calls memoise the backend decisions
    ours.step(query[:, 0], None, memory=memory, mask=mask)
    before = snapshot(ours)
    for call in ("forward", "step"):
        if call == "forward":
            stock(query, memory, mask), ours(query, memory, mask)
        else:
            stock.step(query[:, 1], None, memory=memory, mask=mask)
            ours.step(query[:, 1], None, memory=memory, mask=mask)
        if keep_attn:
            torch.testing.assert_close(ours.attn, stock.attn, rtol=1e-10, atol=1e-10)
        else:
            assert ours.attn is None
    after = snapshot(ours)
    if keep_attn:
        before.pop(":attn"), after.pop(":attn")
    assert_same(before, after)
    tensors = [name for name, value in vars(ours).items() if isinstance(value, torch.Tensor)]
    assert tensors == (["attn"] if keep_attn else [])


def test_loading_new_weights_between_utterances_leaves_no_stale_cache(one_thread):
    """The bug class of the closed ESPnet PR #6624 (memory K/V cached on the module)."""
    first, second = (
        prepare_for_decoding(build_s4_decoder("flash_mha", vocab_size=15, d_model=16, n_layers=1,
                                              n_head=2, seed=seed).double())
        for seed in (3, 4)
    )
    memory = seq(17, 16, seed=5)

    def decode(decoder):
        with torch.no_grad():
            hyps = beam_search(decoder, beam_size=3)(memory, maxlenratio=0.5, minlenratio=0.0)
        return [(h.yseq.tolist(), float(h.score)) for h in hyps]

    before = decode(first)
    expected = decode(second)
    assert before != expected
    first.load_state_dict(second.state_dict())
    # S4 caches its discretised step matrices in setup_step (ESPnet's inference calls it
    # after loading); our layers need nothing.
    prepare_for_decoding(first)
    assert decode(first) == expected
