"""The flash-attn glue (layouts, unpadding, flags, scale) run against a CPU stand-in.

The glue tests run our real layer through ``kernels.flash_attention`` with
``tests/flash_attn_standin.py`` in place of the flash-attn package (same
signatures, reference math). They check layouts, unpadding into cu_seqlens,
flags and the scale, not the CUDA kernels: those are checked on a GPU by
``python -m benchmarks.gpu_check``.
"""

import dataclasses

import pytest
import torch

from espnet_mha import dispatch, kernels, optional
from espnet_mha.testing import stock_and_flash

import flash_attn_standin
from attention_cases import CUDA, FP64
from conftest import random_case


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
