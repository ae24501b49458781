"""Each hypothesis' own decoder states in ESPnet's ``S4Decoder`` beam search (opt-in).

``S4Decoder.batch_score`` (ESPnet 202402 and 202511, the releases tested) gets a
list of per-hypothesis states from ``BatchBeamSearch`` and, as a "workaround for
remaining beam width of 1", steps the whole beam from the first hypothesis' states
(``states = states[0]``). A layer whose
state is the same for every hypothesis does not mind: the cross-attention cache of
``mha``/``flash_mha``. A layer whose state is its hypothesis' history does: ``s4``
layers, and ``flash_mha`` with ``causal: true``, whose steps then attend to the first
hypothesis' tokens (a probe: beam 4, 6 of 10 final scores 0.03-0.41 off the decoder's
``forward`` over the same tokens; exact at beam 1).

:func:`merge_beam_states` wraps ``batch_score`` so that it steps each hypothesis from
its own states, stacked over the beam. That changes the hypotheses of decoders with
``s4`` layers too (they were decoded from the first hypothesis' states), so it is
opt-in. For ESPnet's command-line tools, ``ESPNET_MHA_MERGE_BEAM_STATES=1`` applies it
when a ``flash_mha`` layer (or ``mha`` built by us) is built: ``S4Decoder`` is loaded then.
"""

import functools
import logging
import os

import torch

from espnet_mha import checks

logger = logging.getLogger(__name__)

ENV_MERGE_BEAM_STATES = "ESPNET_MHA_MERGE_BEAM_STATES"


def merge_states(states):
    """The states of a beam's hypotheses as one state per layer.

    Args:
        states: one list per hypothesis of per-layer states (each None or a tensor of
            batch 1, as ``S4Decoder.batch_score`` returns them).

    Returns:
        One entry per layer: None, the hypotheses' states stacked on the batch axis, or,
        where every hypothesis holds the same view (a cache shared by the beam), that
        view expanded over the beam without a copy.

    Raises:
        ValueError: the hypotheses hold different numbers of layer states, or a layer's
            state is None for some hypotheses only.
    """
    layers = {len(hyp) for hyp in states}
    if len(layers) != 1:
        raise ValueError(f"states: the hypotheses hold different numbers of layer states, {sorted(layers)}")
    merged = []
    for i, items in enumerate(zip(*states)):
        nones = sum(item is None for item in items)
        if nones == len(items):
            merged.append(None)
            continue
        if nones:
            raise ValueError(f"states: layer {i}'s state is None for {nones} of {len(items)} hypotheses only")
        first = items[0]
        if first.size(0) == 1 and all(item.data_ptr() == first.data_ptr() and item.shape == first.shape
                                      and item.stride() == first.stride() for item in items[1:]):
            merged.append(first.expand(len(items), *first.shape[1:]))
        else:
            merged.append(torch.cat(items))
    return merged


def _s4_decoder():
    """ESPnet's ``S4Decoder``, and its own ``batch_score`` where ours wraps it (else None)."""
    from espnet2.asr.decoder.s4_decoder import S4Decoder

    return S4Decoder, getattr(S4Decoder.batch_score, "_espnet_mha_original", None)


def merge_beam_states():
    """Make ``S4Decoder.batch_score`` step each hypothesis from its own states (idempotent);
    :func:`restore_beam_states` undoes it. Sets ``ESPNET_MHA_MERGE_BEAM_STATES=1`` for
    interpreters started from this one."""
    S4Decoder, original = _s4_decoder()
    if original is None:
        score = S4Decoder.batch_score

        @functools.wraps(score)
        def batch_score(self, ys, states, xs, *args, **kwargs):
            if len(states) > 1 and all(type(hyp) is list for hyp in states):
                states = [merge_states(states)]  # batch_score steps the beam from states[0]
            return score(self, ys, states, xs, *args, **kwargs)

        batch_score._espnet_mha_original = score
        S4Decoder.batch_score = batch_score
        logger.info("espnet_mha: S4Decoder.batch_score now steps each hypothesis from its own states")
    os.environ[ENV_MERGE_BEAM_STATES] = "1"


def restore_beam_states():
    """Give ``S4Decoder.batch_score`` back ESPnet's own (idempotent), here and in
    interpreters started from now on."""
    S4Decoder, original = _s4_decoder()
    if original is not None:
        S4Decoder.batch_score = original
    os.environ[ENV_MERGE_BEAM_STATES] = "0"


def beam_states_merged():
    """Whether ``S4Decoder.batch_score`` steps each hypothesis from its own states."""
    return _s4_decoder()[1] is not None


def apply_environment():
    """Apply ``ESPNET_MHA_MERGE_BEAM_STATES`` (by the layer's constructor: a decoder is being
    built, so ``S4Decoder`` is loaded; the startup hook runs before it is).

    Raises:
        ValueError: if it is set to something other than 0/1 (or false/true, no/yes, off/on).
    """
    value = os.environ.get(ENV_MERGE_BEAM_STATES, "")
    if value.strip() and checks.env_flag(ENV_MERGE_BEAM_STATES, value) and not beam_states_merged():
        merge_beam_states()
