"""No leaks: decoding many utterances in a row keeps memory flat.

ESPnet decodes a test set utterance after utterance with one model. Each
utterance makes per-layer key/value caches (``(1, T2, 2D)`` here, 200 KB for the
sizes below with 2 layers); a cache kept alive by the module, a global or a
growing list would add up to tens of MB over 500 utterances.
"""

import gc
import logging
import os
import sys

import pytest
import torch

from espnet_mha import cache_records, compile_policy
from espnet_mha.layer import FlashMultiHeadedAttention
from espnet_mha.testing import beam_search, build_s4_decoder, prepare_for_decoding

UTTERANCES = 500
WARMUP = 50
CHECKS = (100, 300, 500)
T2, D_MODEL, N_LAYERS = 200, 32, 2
# Bounds between utterance 100 and 500: no more live tensors, RSS within 16 MiB.
# A leaked cache per utterance would be T2 * 2D * 8 bytes * N_LAYERS = 200 KB, so 80 MB
# over those 400 utterances. Measured here: RSS +0.1 MiB and a constant 107 tensors as is;
# +105 MiB (cache kept as numpy) or 307 -> 1107 tensors with a deliberately kept cache.
RSS_BOUND = 16 * 2**20


def live_tensors():
    gc.collect()
    # type() rather than isinstance(): isinstance() on some lazy torch module proxies warns.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def layer_attributes(decoder):
    """Everything our layers keep on ``self`` besides parameters: names and sizes of containers."""
    snapshot = []
    for module in decoder.modules():
        if isinstance(module, FlashMultiHeadedAttention):
            for name, value in sorted(vars(module).items()):
                if name in ("_parameters", "_buffers", "_modules"):
                    continue
                size = len(value) if isinstance(value, (dict, set, list, tuple)) else None
                if name == "_cache_sources":  # one entry per cache, up to a fixed bound
                    assert size <= cache_records.MAX_SOURCES
                    size = "bounded"
                snapshot.append((name, type(value).__name__, size))
    return snapshot


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc/self/statm")
def test_decoding_500_utterances_keeps_memory_flat(one_thread):
    decoder = build_s4_decoder("flash_mha", vocab_size=12, d_model=D_MODEL, n_layers=N_LAYERS, n_head=4)
    search = beam_search(prepare_for_decoding(decoder.double()), beam_size=3)
    memory = torch.randn(T2, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def decode(i):
        # A different memory every utterance (same size), short hypotheses (maxlen 6).
        with torch.no_grad():
            return search(memory * (1 + i % 7) / 4, maxlenratio=0.03, minlenratio=0.0)

    # BatchBeamSearch logs every utterance; pytest's log capture would keep every record.
    logging.disable(logging.CRITICAL)
    try:
        for i in range(WARMUP):
            decode(i)
        tensors, resident, attributes = {}, {}, {}
        compiled = compile_policy.compiled.cache_info().currsize
        for i in range(WARMUP, UTTERANCES + 1):
            if i in CHECKS:
                tensors[i], resident[i], attributes[i] = live_tensors(), rss(), layer_attributes(decoder)
            if i < UTTERANCES:
                assert len(decode(i)) > 0
    finally:
        logging.disable(logging.NOTSET)
    first, last = CHECKS[0], CHECKS[-1]
    assert tensors[last] <= tensors[first], f"live tensors grew: {tensors}"
    assert resident[last] - resident[first] <= RSS_BOUND, (
        f"RSS grew by {(resident[last] - resident[first]) / 2**20:.1f} MiB over "
        f"{last - first} utterances (bound {RSS_BOUND / 2**20:.0f} MiB): {resident}"
    )
    assert attributes[last] == attributes[first], "our layers keep growing state on self"
    assert compile_policy.compiled.cache_info().currsize == compiled
    for module in decoder.modules():
        if isinstance(module, FlashMultiHeadedAttention):
            assert module.attn is None
