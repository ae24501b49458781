"""select_backend's rules: what "auto" picks, forced backends, and the fallback reasons it gives."""

import dataclasses
import sys

import pytest
import torch

from espnet_mha import masks, optional
from espnet_mha.dispatch import BackendUnavailableError, select_backend
from espnet_mha.testing import stock_and_flash

from attention_cases import call


@pytest.fixture
def no_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    optional.reset()
    yield
    optional.reset()


RULES = [
    # (call overrides, expected backend, part of the fallback reason)
    (dict(), "flash_attn", ""),
    (dict(dtype=torch.float16, mask_kind=masks.KEY_PADDING), "flash_attn", ""),
    (dict(causal=True), "flash_attn", ""),
    (dict(d_k=256), "flash_attn", ""),
    (dict(device=torch.device("cpu")), "sdpa", "tensors are on cpu"),
    (dict(dtype=torch.float32), "sdpa", "flash-attn needs float16 or bfloat16"),
    (dict(d_k=320), "sdpa", "head size d_k=320 exceeds flash-attn's 256"),
    (dict(mask_kind=masks.PER_QUERY), "sdpa", "differs per query"),
    (dict(causal=True, mask_kind=masks.KEY_PADDING), "sdpa", "causal attention with a padding mask"),
    (dict(compiled=True, mask_kind=masks.KEY_PADDING), "sdpa", "key padding under torch.compile"),
    (dict(need_weights=True), "math", "keep_attn=True: only the math path returns the attention weights"),
    (dict(dropout_module="Identity"), "math", "the dropout module (Identity) is called"),
    # Unmasked CPU steps over one shared cache run the math (GEMM-shaped); other unmasked
    # CPU calls, caches per hypothesis included, run SDPA with a zero mask (pytorch #141128).
    (dict(device=torch.device("cpu"), dtype=torch.float32, shared_step=True), "math", "tensors are on cpu"),
    (dict(device=torch.device("cpu"), dtype=torch.float32), "sdpa", "tensors are on cpu"),
    (dict(device=torch.device("cpu"), shared_step=True, mask_kind=masks.KEY_PADDING), "sdpa", "tensors are on cpu"),
    (dict(shared_step=True), "flash_attn", ""),
]


@pytest.mark.parametrize("overrides,backend,reason", RULES, ids=[f"{r[1]}-{i}" for i, r in enumerate(RULES)])
def test_auto_selection_rules(standin, sm90, overrides, backend, reason):
    chosen, fallback = select_backend("auto", call(**overrides))
    assert chosen == backend
    assert reason in fallback and bool(fallback) == bool(reason)


def test_an_unknown_backend_is_refused_by_select_backend():
    """The layer checks ``backend`` when it is set, so this guards other callers of the
    pure function (a coverage audit: the line was never run)."""
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', .*\), got 'bogus'"):
        select_backend("bogus", call())


def test_old_gpu_and_missing_custom_ops_fall_back(standin, monkeypatch):
    monkeypatch.setattr(optional, "device_capability", lambda device: (7, 5))
    assert select_backend("auto", call()) == ("sdpa", "GPU is sm75; flash-attn 2's kernels are built for sm80 to sm9x")
    monkeypatch.setattr(optional, "device_capability", lambda device: (12, 0))
    assert select_backend("auto", call()) == ("sdpa", "GPU is sm120; flash-attn 2's kernels are built for sm80 to sm9x")
    monkeypatch.setattr(optional, "device_capability", lambda device: (8, 6))
    assert select_backend("auto", call(d_k=256)) == ("flash_attn", "")
    assert select_backend("auto", call(d_k=256, grad=True)) == (
        "sdpa", "head size d_k=256 > 192: flash-attn's backward needs sm80 or sm90, the GPU is sm86")
    assert select_backend("auto", call(empty=True)) == (
        "sdpa", "the batch or a time axis is empty; flash-attn needs positive sizes")
    monkeypatch.setattr(optional, "device_capability", lambda device: (8, 0))
    info = optional.flash_attn()
    assert not info.custom_ops  # the stand-in registers no torch.ops.flash_attn
    assert "registers no torch custom ops" in select_backend("auto", call(compiled=True))[1]
    with monkeypatch.context() as patch:
        patch.setattr(optional, "flash_attn", lambda: dataclasses.replace(info, custom_ops=True))
        assert select_backend("auto", call(compiled=True)) == ("flash_attn", "")


def test_missing_package_is_a_visible_fallback(no_flash_attn, sm90):
    backend, fallback = select_backend("auto", call())
    assert backend == "sdpa" and "flash-attn is not importable" in fallback
    with pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot serve this call: flash-attn is not importable"):
        select_backend("flash_attn", call())


def test_forced_backends(standin, sm90):
    assert select_backend("sdpa", call()) == ("sdpa", "")
    assert select_backend("math", call()) == ("math", "")
    assert select_backend("flash_attn", call()) == ("flash_attn", "")
    with pytest.raises(BackendUnavailableError, match=r"dtype is torch.float32"):
        select_backend("flash_attn", call(dtype=torch.float32))
    with pytest.raises(BackendUnavailableError, match=r"keep_attn=True needs backend='math' or 'auto'"):
        select_backend("flash_attn", call(need_weights=True))


def test_layer_reports_the_backend_and_the_reason():
    _, ours = stock_and_flash(8, 2)
    ours(torch.randn(1, 3, 8, dtype=torch.float64))
    assert ours.last_backend == "sdpa"
    assert ours.last_fallback  # why not flash-attn: not installed here, or CPU tensors
