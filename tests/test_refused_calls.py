"""A refused call (a forced backend that cannot serve, a bad input) raises and leaves no stale backend or cache."""

import pytest
import torch

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.dispatch import BackendUnavailableError

pytestmark = pytest.mark.usefixtures("layout")


def test_forced_backend_that_cannot_serve_raises():
    layer = FlashMultiHeadedAttention(8, 2, backend="flash_attn")
    with pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot serve this call: .*Use backend='auto'"):
        layer(torch.randn(1, 2, 8))
    # keep_attn with a backend that returns no weights: refused when built (every call would
    # raise), and at the call when keep_attn is switched on later.
    with pytest.raises(ValueError, match=r"keep_attn=True needs the attention weights, which only the math path "
                                         r"returns; backend='sdpa' cannot give them: use 'math' or 'auto'"):
        FlashMultiHeadedAttention(8, 2, backend="sdpa", keep_attn=True)
    layer = FlashMultiHeadedAttention(8, 2, backend="flash_attn")
    layer.keep_attn = True
    with pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot return attention weights"):
        layer(torch.randn(1, 2, 8))


def test_a_refused_call_leaves_no_stale_last_backend():
    layer = FlashMultiHeadedAttention(8, 2, backend="sdpa")
    layer(torch.randn(1, 3, 8))
    assert layer.last_backend == "sdpa"
    layer.keep_attn = True
    with pytest.raises(BackendUnavailableError, match=r"backend='sdpa' cannot return attention weights"):
        layer(torch.randn(1, 3, 8))
    assert layer.last_backend is None and layer.last_fallback == ""


def test_an_input_error_leaves_no_stale_last_backend_or_cache():
    layer = FlashMultiHeadedAttention(8, 2).eval()
    memory = torch.randn(2, 5, 8)
    with torch.no_grad():
        _, state = layer.step(torch.randn(2, 8), None, memory)
        assert layer.last_backend and layer.last_cache == "filled"
        with pytest.raises(ValueError, match=r"query has feature size 6"):
            layer.step(torch.randn(2, 6), state, memory)
        assert layer.last_backend is None and layer.last_fallback == "" and layer.last_cache is None
        layer(torch.randn(2, 3, 8))
        with pytest.raises(ValueError, match=r"query has feature size 6"):
            layer(torch.randn(2, 3, 6))
        assert layer.last_backend is None and layer.last_fallback == ""


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(2, 1, 4, dtype=torch.bool), ValueError, r"mask"),
    ("numpy", TypeError, r"mask must be a torch.Tensor or None, got ndarray"),
])
def test_a_bad_mask_on_the_first_step_raises_before_the_memory_is_projected(mask, error, match):
    layer = FlashMultiHeadedAttention(8, 2).eval()
    mask = torch.ones(2, 1, 5).numpy() if mask == "numpy" else mask
    with torch.no_grad(), pytest.raises(error, match=match):
        layer.step(torch.randn(2, 8), None, torch.randn(2, 5, 8), mask)
    assert layer.last_cache is None and not layer._cache_sources


def test_a_forced_backend_that_cannot_serve_a_first_step_raises_before_the_memory_is_projected():
    layer = FlashMultiHeadedAttention(8, 2, backend="flash_attn").eval()
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot serve"):
        layer.step(torch.randn(2, 8), None, torch.randn(2, 5, 8))
    assert layer.last_cache is None and not layer._cache_sources
