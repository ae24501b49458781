"""Where SDPA cannot serve a call (sdpa_kernel restrictions, pytorch #185539): math instead, logged, or an error when forced."""

import dataclasses

import pytest
import torch

from espnet_mha import dispatch
from espnet_mha.dispatch import BackendUnavailableError, select_backend
from espnet_mha.testing import stock_and_flash

from attention_cases import FP64, call


def test_compiled_float64_on_cpu_avoids_the_broken_sdpa_backward(monkeypatch):
    monkeypatch.setattr(dispatch, "_COMPILED_FP64_CPU_SDPA_BROKEN", True)
    cpu64 = call(device=torch.device("cpu"), dtype=torch.float64, compiled=True)
    backend, fallback = select_backend("auto", cpu64)
    assert backend == "math" and "pytorch #185539" in fallback
    assert select_backend("auto", dataclasses.replace(cpu64, compiled=False))[0] == "sdpa"
    assert select_backend("sdpa", cpu64) == ("sdpa", "")  # no gradients: the forward runs
    # A forced sdpa that records gradients: refused before the forward (the backward failed
    # with PyTorch's "expected scalar type Double but found Float").
    with pytest.raises(BackendUnavailableError, match=r"backend='sdpa' cannot serve this call, whose backward would "
                                                      r"fail: compiled float64 SDPA backward fails on CPU .*pytorch "
                                                      r"#185539.* backend='auto'.*torch.no_grad\(\)"):
        select_backend("sdpa", dataclasses.replace(cpu64, grad=True))


def test_a_forced_sdpa_compiled_float64_training_call_is_refused_before_it_runs():
    if not dispatch._COMPILED_FP64_CPU_SDPA_BROKEN:
        pytest.skip(f"pytorch #185539 is fixed in torch {torch.__version__}")
    from espnet_mha import FlashMultiHeadedAttention

    layer = FlashMultiHeadedAttention(16, 2, compile=True, backend="sdpa").double().train()
    query, memory = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match=r"pytorch #185539"):
        layer(query, memory)  # the parameters require gradients
    assert layer.last_backend is None
    # No backward can follow: nothing that reaches the attention requires gradients (linear_out
    # may: its gradient needs no attention backward), or gradients are off.
    for name, param in layer.named_parameters():
        param.requires_grad_(name.startswith("linear_out"))
    layer(query, memory)
    assert layer.last_backend == "sdpa"
    with pytest.raises(BackendUnavailableError, match=r"pytorch #185539"):
        layer(query.requires_grad_(), memory)
    with torch.no_grad():
        layer(query, memory)
    assert layer.last_backend == "sdpa"


def test_an_sdpa_kernel_restriction_reaches_a_remembered_decoding_step():
    """Steps whose signature was seen skip the checks; the restriction is part of that
    signature (a probe: the remembered sdpa choice ran and PyTorch raised "No viable backend")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stock, ours = stock_and_flash(8, 2)
    forced = ours.__class__(8, 2, backend="sdpa").double().eval()
    forced.load_state_dict(ours.state_dict())
    memory = torch.randn(3, 5, 8, dtype=torch.float64)  # distinct items: caches per item, SDPA
    queries = torch.randn(4, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        states = {ours: None, forced: None}
        for t in range(2):
            for layer in states:
                _, states[layer] = layer.step(queries[t], states[layer], memory)
                assert layer.last_backend == "sdpa"
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            got, _ = ours.step(queries[2], states[ours], memory)
            assert ours.last_backend == "math" and "sdpa_kernel allows SDPA efficient" in ours.last_fallback
            torch.testing.assert_close(got, stock.step(queries[2], None, memory)[0], **FP64)
            with pytest.raises(BackendUnavailableError, match=r"backend='sdpa' cannot serve this call: "
                                                              r"torch.nn.attention.sdpa_kernel allows SDPA efficient"):
                forced.step(queries[2], states[forced], memory)
            assert forced.last_backend is None
        ours.step(queries[3], states[ours], memory)
        assert ours.last_backend == "sdpa"


SDPA_RESTRICTIONS = [
    # (kernels sdpa_kernel allows, dropout in training, whether SDPA serves the call on CPU)
    ("EFFICIENT_ATTENTION", False, False),
    ("CUDNN_ATTENTION", False, False),
    ("FLASH_ATTENTION", True, False),  # the CPU flash kernel takes no dropout
    ("FLASH_ATTENTION", False, True),
    ("MATH", True, True),
]


@pytest.mark.parametrize("allowed,dropout,sdpa_serves", SDPA_RESTRICTIONS,
                         ids=[f"{a}-{'dropout' if d else 'eval'}" for a, d, _ in SDPA_RESTRICTIONS])
def test_an_sdpa_kernel_restriction_is_a_visible_fallback_to_math(allowed, dropout, sdpa_serves):
    """``torch.nn.attention.sdpa_kernel([...])`` (e.g. left on from a GPU setup) that leaves
    SDPA no kernel for a CPU call: the stock layer never calls SDPA and runs; ``auto`` raised
    "No available kernel" (found by a probe). It now takes the math path and says why; a
    forced ``sdpa`` raises our error naming the restriction."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stock, ours = stock_and_flash(16, 4)
    for layer in (stock, ours):
        layer.dropout.p = 0.2 if dropout else 0.0
        layer.train(dropout)
    query, memory = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    keep = torch.ones(2, 1, 5, dtype=torch.bool)
    keep[1, :, 3:] = False
    with sdpa_kernel([getattr(SDPBackend, allowed)]):
        for mask in (None, keep):
            torch.manual_seed(0)
            expected, _ = stock(query, memory, mask)
            torch.manual_seed(0)
            got, _ = ours(query, memory, mask)
            torch.testing.assert_close(got, expected, **FP64)
            if sdpa_serves:
                assert ours.last_backend == "sdpa" and "sdpa_kernel" not in ours.last_fallback
            else:
                assert ours.last_backend == "math"
                assert "torch.nn.attention.sdpa_kernel allows SDPA" in ours.last_fallback
            with torch.no_grad():
                torch.manual_seed(0)
                _, state = ours.step(query[:, 0], None, memory, mask)
                torch.manual_seed(0)
                got, _ = ours.step(query[:, 1], state, memory, mask)
                torch.manual_seed(0)
                expected, _ = stock.step(query[:, 1], None, memory, mask)
            torch.testing.assert_close(got, expected, **FP64)
        forced = ours.__class__(16, 4, dropout=0.2 if dropout else 0.0, backend="sdpa").double().train(dropout)
        if sdpa_serves:
            forced(query, memory, keep)
        else:
            with pytest.raises(BackendUnavailableError, match=r"backend='sdpa' cannot serve this call: "
                                                              r"torch.nn.attention.sdpa_kernel allows SDPA"):
                forced(query, memory, keep)
    ours(query, memory, keep)  # the restriction lifted: SDPA again
    assert ours.last_backend == "sdpa"


def test_on_cuda_an_sdpa_restriction_is_left_to_pytorch_unless_it_allows_no_kernel():
    """CUDA's kernels have rules of their own (dtype, head size, GPU): not guessed here."""
    assert dispatch.sdpa_restriction(call(sdpa_kernels=(("efficient",), True))) == ""
    assert dispatch.sdpa_restriction(call(sdpa_kernels=((), False))) == (
        "torch.nn.attention.sdpa_kernel allows SDPA no kernel, which cannot serve this call on cuda")
    assert dispatch.sdpa_restriction(call(sdpa_kernels=None)) == ""


def test_a_fallback_is_logged_once_at_info_where_sdpa_was_refused_else_at_debug(caplog):
    """On the CPU flash-attn never runs (a DEBUG line per layer and kind of call); SDPA refused
    by an sdpa_kernel restriction is a downgrade the user asked for without knowing (INFO)."""
    import logging

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from espnet_mha import FlashMultiHeadedAttention

    layer = FlashMultiHeadedAttention(8, 2).eval()
    query = torch.randn(2, 3, 8)
    with caplog.at_level(logging.DEBUG, logger="espnet_mha"):
        layer(query)
        layer(query)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            layer(query)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            layer.keep_attn = True  # math because of keep_attn, not of the restriction
            layer(query)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "instead of flash_attn" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.DEBUG, logging.INFO, logging.DEBUG]
    assert "keep_attn=True" in lines[2][1]
    assert lines[0][1].startswith("espnet_mha: using sdpa instead of flash_attn: ")
    assert "using math instead of flash_attn: " in lines[1][1] and "sdpa_kernel allows SDPA efficient" in lines[1][1]
