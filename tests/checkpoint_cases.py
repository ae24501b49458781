"""Shared by the checkpoint tests: output and state comparisons (the stock experiment folder
is the ``exp`` fixture of ``conftest.py``).

Every model here is built by ESPnet's ``ASRTask`` from a recipe config (see
``espnet_asr.py``); the reference is the same model built with the stock ``mha``.
"""

import torch
from espnet.nets.pytorch_backend.transformer.add_sos_eos import add_sos_eos

import espnet_asr


def outputs(model, seed=0):
    """(loss, decoder logits) of an ASR model on a fixed batch, fp32, eval mode."""
    b = espnet_asr.batch(seed)
    with torch.no_grad():
        loss, _, _ = model(**b)
        enc, enc_lens = model.encode(b["speech"], b["speech_lengths"])
        ys_in, _ = add_sos_eos(b["text"], model.sos, model.eos, model.ignore_id)
        logits, _ = model.decoder(enc, enc_lens, ys_in, b["text_lengths"] + 1)
    return loss, logits


_REFERENCE = {}


def assert_same_outputs(ours, reference):
    """Loss and decoder logits within 1e-5 (fp32); the reference's outputs are computed once."""
    if id(reference) not in _REFERENCE:
        _REFERENCE[id(reference)] = (reference, outputs(reference))
    for got, expected in zip(outputs(ours), _REFERENCE[id(reference)][1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def assert_same_state(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
