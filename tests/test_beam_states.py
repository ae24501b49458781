"""espnet_mha.beam_states: each hypothesis' own states in ESPnet's S4Decoder beam search,
checked with ESPnet's own S4Decoder and BatchBeamSearch against the decoder's forward."""

import logging

import pytest
import torch
from espnet2.asr.decoder.s4_decoder import S4Decoder

from conftest import assert_same_nbest
from espnet_mha import beam_states
from espnet_mha.testing import beam_search, build_s4_decoder, prepare_for_decoding

V, D = 20, 32


@pytest.fixture
def merged():
    beam_states.merge_beam_states()
    yield
    beam_states.restore_beam_states()


def causal_decoder(*, s4=False, seed=0):
    """Two blocks of [(s4,) causal flash_mha, flash_mha, ff], fp64, with sharpened logits."""
    layers = [{"_name_": "flash_mha", "n_head": 4, "causal": True}, {"_name_": "flash_mha", "n_head": 4},
              {"_name_": "ff"}]
    if s4:
        layers.insert(0, {"_name_": "s4", "keops": False})
    torch.manual_seed(seed)
    decoder = S4Decoder(vocab_size=V, encoder_output_size=D, n_layers=2, layer=layers, norm="layer",
                        residual={"_name_": "R"}, dropout=0.0).double()
    with torch.no_grad():
        decoder.output.weight.mul_(4)  # spread the scores: distinct hypotheses, no ties
    return prepare_for_decoding(decoder)


def forward_score(decoder, memory, yseq):
    """The decoder's ``forward`` log-probability of ``yseq`` (sos ... eos), teacher-forced."""
    tokens = torch.tensor(yseq)
    with torch.no_grad():
        logits, _ = decoder(memory[None], torch.tensor([memory.size(0)]), tokens[None, :-1],
                            torch.tensor([tokens.size(0) - 1]))
    return logits.log_softmax(-1)[0].gather(-1, tokens[1:, None]).sum().item()


def score_errors(decoder, memory, beam, reference=forward_score):
    """|beam score - ``reference`` score| of each hypothesis the search finished."""
    with torch.no_grad():
        hyps = beam_search(decoder, beam_size=beam, vocab_size=V)(memory, maxlenratio=0.0)
    # A hypothesis cut at the length limit gets <eos> appended unscored: left out.
    return [abs(float(h.score) - reference(decoder, memory, h.yseq.tolist())) for h in hyps
            if len(h.yseq) <= memory.size(0)]


def memory(seed):
    return torch.randn(12, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 7])  # seeds whose searches end hypotheses early
@pytest.mark.parametrize("beam", [3, 10])
def test_merged_causal_steps_score_each_hypothesis_as_forward(merged, seed, beam):
    decoder = causal_decoder(seed=seed)
    errors = score_errors(decoder, memory(seed), beam)
    assert len(errors) > 1 and max(errors) < 1e-9, errors


def stepped_score(decoder, memory, yseq):
    """The log-probability of ``yseq`` by the decoder's own steps over it alone (batch 1)."""
    state, total = decoder.init_state(memory), 0.0
    with torch.no_grad():
        for t in range(1, len(yseq)):
            logp, states = decoder.batch_score(torch.tensor([yseq[:t]]), [state], memory[None])
            total, state = total + logp[0, yseq[t]].item(), states[0]
    return total


def test_merged_s4_and_causal_steps_score_each_hypothesis_as_its_own_steps(merged):
    """s4 layers' states were the first hypothesis' too (and ESPnet's s4 step is not its
    forward: 0.13 apart at beam 1): merged, every beam score is that of the decoder's own
    steps over the hypothesis alone."""
    errors = score_errors(causal_decoder(s4=True), memory(2), 4, reference=stepped_score)
    assert len(errors) > 1 and max(errors) < 1e-9, errors


def test_espnet_batch_score_steps_the_beam_from_the_first_hypothesis_and_we_warn(caplog):
    """Without the merge, ESPnet's batch_score hands hypothesis 0's states to the beam:
    scores off forward's (0.03-0.41 in a probe), and the causal layer says so, once."""
    decoder = causal_decoder()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.causal_steps"):
        errors = score_errors(decoder, memory(0), 4)
    assert max(errors) > 1e-3
    warnings = [r for r in caplog.records if "attend to that hypothesis' history" in r.getMessage()]
    assert len(warnings) == 2  # once per causal layer
    assert "merge_beam_states" in warnings[0].getMessage()


def test_one_causal_hypothesis_over_a_beam_without_a_split_cache_does_not_warn(caplog):
    """A batch-1 cache of its own (one prefix, several candidate tokens) serves a beam rightly."""
    layer = causal_decoder().decoder.layers[0].layer
    with caplog.at_level(logging.WARNING, logger="espnet_mha.causal_steps"):
        _, state = layer.step(torch.randn(1, D, dtype=torch.float64), None)
        _, state = layer.step(torch.randn(1, D, dtype=torch.float64), state)
        layer.step(torch.randn(4, D, dtype=torch.float64), state)
    assert not caplog.records


@pytest.mark.parametrize("beam", [1, 4])
def test_merged_stock_and_ours_give_the_same_nbest(merged, beam):
    """[s4, mha|flash_mha, ff] decoders with the same weights, both merged: the same n-best
    (the cross-attention cache, shared by the beam, is expanded, not copied: reused)."""
    stock = prepare_for_decoding(build_s4_decoder("mha", vocab_size=V, d_model=D, n_layers=2).double())
    ours = prepare_for_decoding(build_s4_decoder("flash_mha", vocab_size=V, d_model=D, n_layers=2).double())
    ours.load_state_dict(stock.state_dict())
    assert_same_nbest(stock, ours, memory(3), beam=beam, maxlenratio=0.0, score_tol=1e-9)
    assert ours.decoder.layers[1].layer.last_cache == "reused"


def test_merge_states_stacks_distinct_states_and_expands_a_shared_one():
    shared = torch.randn(1, 2, 3)
    distinct = [torch.randn(1, 4) for _ in range(3)]
    merged_states = beam_states.merge_states([[None, shared, d] for d in distinct])
    assert merged_states[0] is None
    assert merged_states[1].shape == (3, 2, 3) and merged_states[1].stride(0) == 0
    assert merged_states[1].data_ptr() == shared.data_ptr()
    torch.testing.assert_close(merged_states[2], torch.cat(distinct))


def test_merge_states_rejects_hypotheses_that_disagree():
    with pytest.raises(ValueError, match=r"different numbers of layer states, \[1, 2\]"):
        beam_states.merge_states([[None], [None, None]])
    with pytest.raises(ValueError, match="layer 0's state is None for 1 of 2 hypotheses only"):
        beam_states.merge_states([[None], [torch.zeros(1, 2)]])


def test_merge_and_restore_are_idempotent_and_set_the_environment(monkeypatch):
    monkeypatch.setenv(beam_states.ENV_MERGE_BEAM_STATES, "")
    original = S4Decoder.batch_score
    try:
        beam_states.merge_beam_states()
        beam_states.merge_beam_states()
        assert beam_states.beam_states_merged()
        assert S4Decoder.batch_score._espnet_mha_original is original
        assert beam_states.os.environ[beam_states.ENV_MERGE_BEAM_STATES] == "1"
    finally:
        beam_states.restore_beam_states()
        beam_states.restore_beam_states()
    assert S4Decoder.batch_score is original and not beam_states.beam_states_merged()
    assert beam_states.os.environ[beam_states.ENV_MERGE_BEAM_STATES] == "0"


def test_the_environment_merges_when_a_layer_is_built(monkeypatch):
    from espnet_mha.layer import FlashMultiHeadedAttention

    monkeypatch.setenv(beam_states.ENV_MERGE_BEAM_STATES, "1")
    try:
        FlashMultiHeadedAttention(8, 2)
        assert beam_states.beam_states_merged()
    finally:
        beam_states.restore_beam_states()
    monkeypatch.setenv(beam_states.ENV_MERGE_BEAM_STATES, "maybe")
    with pytest.raises(ValueError, match="ESPNET_MHA_MERGE_BEAM_STATES='maybe' must be 0/1"):
        FlashMultiHeadedAttention(8, 2)
