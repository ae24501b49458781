"""Kernel dispatch: the selection rules, and the flash-attn glue against a CPU stand-in.

The glue tests run our real layer through ``kernels.flash_attention`` with
``tests/flash_attn_standin.py`` in place of the flash-attn package (same
signatures, reference math). They check layouts, unpadding into cu_seqlens,
flags and the scale, not the CUDA kernels: those are checked on a GPU by
``python -m benchmarks.gpu_check``.
"""

import dataclasses
import sys

import pytest
import torch

from espnet_mha import dispatch, kernels, masks, optional
from espnet_mha.dispatch import AttentionCall, BackendUnavailableError, select_backend
from espnet_mha.testing import stock_and_flash

import flash_attn_standin
from conftest import random_case

FP64 = dict(rtol=1e-10, atol=1e-10)
CUDA = torch.device("cuda")


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    optional.reset()
    flash_attn_standin.calls.clear()
    yield flash_attn_standin
    optional.reset()


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.setattr(optional, "device_capability", lambda device: (9, 0) if device.type == "cuda" else None)


@pytest.fixture
def no_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    optional.reset()
    yield
    optional.reset()


def call(**overrides):
    base = dict(device=CUDA, dtype=torch.bfloat16, d_k=64, mask_kind=masks.NO_MASK)
    return AttentionCall(**{**base, **overrides})


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


@pytest.fixture
def flash_on_cpu(standin, sm90, monkeypatch):
    """Route CPU fp64 calls to the flash-attn glue (real rules, device and dtype pretended)."""
    real = dispatch.flash_attn_refusal
    monkeypatch.setattr(dispatch, "flash_attn_refusal",
                        lambda c: real(dataclasses.replace(c, device=CUDA, dtype=torch.bfloat16)))
    return standin


@pytest.mark.standin
@pytest.mark.parametrize("seed", range(24), ids=lambda s: f"seed{s}")
def test_flash_glue_matches_stock(flash_on_cpu, seed):
    case = random_case(seed)
    stock, ours = stock_and_flash(case.n_feat, case.n_head, seed=seed)
    query, memory, mask = case.tensors()
    expected, _ = stock(query, memory, mask)
    got, _ = ours(query, memory, mask)
    torch.testing.assert_close(got, expected, **FP64)
    per_query = mask is not None and mask.size(1) > 1 and case.t1 > 1
    assert ours.last_backend == ("sdpa" if per_query else "flash_attn")
    if not per_query:
        (record,) = flash_on_cpu.calls
        assert record["softmax_scale"] == (case.n_feat // case.n_head) ** -0.5
        assert record["causal"] is False and record["dropout_p"] == 0.0


@pytest.mark.standin
def test_flash_varlen_unpadding(flash_on_cpu):
    stock, ours = stock_and_flash(12, 3)
    query, memory = torch.randn(3, 4, 12, dtype=torch.float64), torch.randn(3, 6, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).unsqueeze(1)
    got, _ = ours(query, memory, mask)
    torch.testing.assert_close(got, stock(query, memory, mask)[0], **FP64)
    (record,) = flash_on_cpu.calls
    assert record["fn"] == "flash_attn_varlen_func"
    assert record["cu_seqlens_q"] == [0, 4, 8, 12]
    # The fully masked utterance is given all its keys (never a zero-length sequence,
    # out-of-bounds writes before flash-attn 2.6.3, PR #1155); its context is zeroed
    # afterwards, as the stock layer's.
    assert record["cu_seqlens_k"] == [0, 6, 8, 14]
    assert (record["max_seqlen_q"], record["max_seqlen_k"]) == (4, 6)
    assert record["q"] == (12, 3, 4) and record["k"] == (14, 3, 4)
    torch.testing.assert_close(got[2], ours.linear_out.bias.expand(4, 12), rtol=0, atol=0)


@pytest.mark.standin
def test_flash_causal_and_dropout_flags(flash_on_cpu):
    stock, ours = stock_and_flash(12, 3, causal=True)
    query = torch.randn(2, 5, 12, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5)
    torch.testing.assert_close(ours(query)[0], stock(query, None, causal)[0], **FP64)
    assert flash_on_cpu.calls[-1]["causal"] is True and ours.last_backend == "flash_attn"
    ours.dropout.p = 0.25
    ours.train()
    ours(query)
    assert flash_on_cpu.calls[-1]["dropout_p"] == 0.25
    # A causal layer with a padding mask cannot be unpadded: SDPA serves it.
    ours.eval()
    ours(query, None, torch.ones(2, 1, 5))
    assert ours.last_backend == "sdpa" and "causal" in ours.last_fallback


@pytest.mark.standin
def test_flash_step_with_a_shared_cache(flash_on_cpu):
    stock, ours = stock_and_flash(16, 4)
    memory = torch.randn(1, 9, 16, dtype=torch.float64).expand(5, -1, -1)
    query = torch.randn(5, 16, dtype=torch.float64)
    got, state = ours.step(query, None, memory=memory)
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    record = flash_on_cpu.calls[-1]
    # The beam is folded into the query time of one batch: q (1, B, H, d_k), k (1, T2, H, d_k).
    assert (record["fn"], record["q"], record["k"]) == ("flash_attn_func", (1, 5, 4, 4), (1, 9, 4, 4))


@pytest.mark.standin
@pytest.mark.parametrize("backend", ["auto", "flash_attn"])
def test_flash_masked_steps_with_a_shared_cache(flash_on_cpu, backend):
    """A mask per hypothesis with a batch-1 state (ESPnet's protocol): the beam is not folded,
    so the mask stays key padding and flash-attn serves it (forced, it raised, naming a
    per-query mask the caller never passed). A (1, 1, T2) mask still folds."""
    stock, ours = stock_and_flash(16, 4, backend=backend)
    memory = torch.randn(1, 9, 16, dtype=torch.float64).expand(5, -1, -1)
    query = torch.randn(5, 16, dtype=torch.float64)
    mask = torch.rand(5, 1, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[2] = False  # a hypothesis with no memory frame
    _, state = ours.step(query[:1], None, memory=memory[:1])
    for given, folded in ((mask, False), (mask[:1], True)):
        for state_ in (None, state[:1]):
            got, _ = ours.step(query, state_, memory=memory, mask=given)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory, mask=given)[0], **FP64)
            assert ours.last_backend == "flash_attn"
            record = flash_on_cpu.calls[-1]
            assert record["fn"] == "flash_attn_varlen_func"
            assert record["cu_seqlens_q"] == ([0, 5] if folded else [0, 1, 2, 3, 4, 5])


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


def test_the_flash_attn_lookup_traces_without_a_graph_break(standin):
    """The flash-attn call inside a compiled function reads the probe: no graph break."""
    optional.flash_attn()  # selection always probes eagerly first

    def uses_probe(x):
        module = optional.flash_attn().module
        return x * 2 if module is flash_attn_standin else x

    compiled = torch.compile(uses_probe, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))


def test_gpu_masks_are_copied_contiguous_and_aligned():
    mask = (torch.rand(3, 1, 5, 13) > 0.5)[..., :11]  # a view: rows 13 apart, 11 long
    aligned = kernels.aligned_mask(mask)
    assert torch.equal(aligned, mask)
    assert aligned.stride(-1) == 1 and aligned.stride(-2) % 8 == 0


@pytest.mark.standin
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (2, 3, 0)], ids=["B=0", "T1=0", "T2=0"])
def test_empty_calls_go_to_sdpa_not_flash_attn(flash_on_cpu, shape):
    """flash-attn refuses an empty batch (flash_api.cpp: "batch size must be positive") and
    the unpadding glue cannot build cu_seqlens for T1 = 0: empty calls take SDPA and give
    the stock result (an empty output, or the output bias without keys)."""
    stock, ours = stock_and_flash(12, 3)
    batch, t1, t2 = shape
    query, memory = torch.randn(batch, t1, 12, dtype=torch.float64), torch.randn(batch, t2, 12, dtype=torch.float64)
    mask = torch.ones(batch, 1, t2, dtype=torch.bool)
    for args in ((query, memory, None), (query, memory, mask)):
        # The stock layer cannot reshape an empty batch (README: Differences).
        expected = torch.empty(0, t1, 12, dtype=torch.float64) if batch == 0 else stock(*args)[0]
        torch.testing.assert_close(ours(*args)[0], expected, **FP64)
        assert ours.last_backend == "sdpa" and "empty" in ours.last_fallback
    assert not flash_on_cpu.calls


@pytest.mark.standin
def test_flash_attn_is_asked_for_a_deterministic_backward_when_torch_is(flash_on_cpu):
    _, ours = stock_and_flash(12, 3)
    query = torch.randn(2, 5, 12, dtype=torch.float64)
    ours(query)
    assert flash_on_cpu.calls[-1]["deterministic"] is False
    torch.use_deterministic_algorithms(True)
    try:
        ours(query)
    finally:
        torch.use_deterministic_algorithms(False)
    assert flash_on_cpu.calls[-1]["deterministic"] is True


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
