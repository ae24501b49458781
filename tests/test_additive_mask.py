"""The additive mask that eager SDPA calls on CUDA get (``kernels.additive_mask``), run on the
CPU by forcing its predicate, against the stock layer: the rule's math is device-independent,
and ``python -m benchmarks.gpu_check`` checks the CUDA kernels with it."""

import types

import pytest
import torch

from espnet_mha import checks, compile_policy, kernels
from espnet_mha.testing import stock_and_flash


@pytest.fixture
def forced(monkeypatch):
    """Masked SDPA calls take the additive mask here as on CUDA; counts the masks made."""
    made = []
    make = kernels.additive_mask

    def counted(keep, dtype, **kwargs):
        made.append((tuple(keep.shape), dtype))
        return make(keep, dtype, **kwargs)

    monkeypatch.setattr(kernels, "takes_empty_rows", lambda q: compile_policy.plain_eager())
    monkeypatch.setattr(kernels, "additive_mask", counted)
    monkeypatch.setenv("ESPNET_MHA_SKIP_PADDED_KEYS", "0")  # the batched call, not one per item
    return made


def test_forward_and_gradients_equal_stock(case, forced):
    """Random shapes and masks (key padding, per query, batch 1, fully masked rows and items,
    numeric masks): float64 output and input gradients within 1e-10 of the stock layer."""
    stock, ours = stock_and_flash(case.n_feat, case.n_head, dtype=torch.float64, seed=case.seed, backend="sdpa")
    query, memory, mask = case.tensors()
    results = []
    for layer in (stock, ours):
        leaves = [None if x is None else x.clone().requires_grad_() for x in (query, memory)]
        out, _ = layer(leaves[0], leaves[1], mask)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append([out] + [x.grad for x in leaves if x is not None])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert ours.last_backend == "sdpa"
    assert bool(forced) == (mask is not None)


def test_parameter_gradients_equal_stock(forced):
    """Fully masked rows send no gradient anywhere; the others as the stock layer."""
    stock, ours = stock_and_flash(16, 4, dtype=torch.float64, seed=3, backend="sdpa")
    query, memory = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, 2], mask[2] = False, False
    for layer in (stock, ours):
        out, _ = layer(query, memory, mask)
        out.square().sum().backward()
    grads = {name: p.grad for name, p in ours.named_parameters()}
    stock_grads = torch.cat([stock.linear_q.weight.grad, stock.linear_k.weight.grad, stock.linear_v.weight.grad])
    torch.testing.assert_close(grads["linear_qkv.weight"], stock_grads, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads["linear_out.weight"], stock.linear_out.weight.grad, rtol=0, atol=1e-10)
    assert forced


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mask_values_and_layout(dtype):
    keep = torch.rand(2, 3, 11, generator=torch.Generator().manual_seed(0)) > 0.5
    keep[1, 2] = False
    bias = kernels.additive_mask(keep, dtype)
    assert bias.shape == (2, 1, 3, 11) and bias.dtype == dtype
    assert torch.equal(bias[:, 0] == 0, keep)
    assert torch.equal(bias[:, 0][~keep], torch.full((int((~keep).sum()),), torch.finfo(dtype).min, dtype=dtype))
    # SDPA's memory-efficient kernel copies a mask whose rows are not 8-aligned (pad_bias).
    assert bias.stride(-1) == 1 and all(s % 8 == 0 for s in bias.stride()[:-1])


def test_autocast_keeps_fully_masked_rows_finite(forced):
    """bf16 under autocast: finite everywhere, fully masked rows give the output bias, and
    the rest within bf16 rounding of the float64 stock result."""
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32, seed=5, backend="sdpa")
    query = torch.randn(3, 6, 32, requires_grad=True)
    memory = torch.randn(3, 9, 32, requires_grad=True)
    mask = torch.rand(3, 1, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[1] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(query, memory, mask)
    out.float().sum().backward()
    assert forced[-1][1] == torch.bfloat16
    assert out.isfinite().all() and query.grad.isfinite().all() and memory.grad.isfinite().all()
    assert torch.equal(out[1].float(), ours.linear_out.bias.to(torch.bfloat16).float().expand(6, -1))
    expected, _ = stock.double()(query.double(), memory.double(), mask)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.1)


def cuda_query(dtype):
    """What the rule reads of a query on CUDA (no CUDA tensor here)."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))


def test_taken_by_eager_cuda_calls_only(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert kernels.takes_empty_rows(cuda_query(dtype))
    assert not kernels.takes_empty_rows(torch.zeros(1))
    monkeypatch.setattr(compile_policy, "plain_eager", lambda: False)  # compile, capture, vmap...
    assert not kernels.takes_empty_rows(cuda_query(torch.float32))


def test_not_taken_in_float16(monkeypatch):
    """float16's lowest value leaves no headroom: a score below -16 plus -65504 rounds to
    -inf, and fully masked rows then gave NaN query gradients on an H200. float16 calls
    (also float32 ones under float16 autocast) keep the bool mask and the guard."""
    assert not kernels.takes_empty_rows(cuda_query(torch.float16))
    monkeypatch.setattr(checks, "autocast_dtype", lambda device: torch.float16 if device == "cuda" else None)
    assert not kernels.takes_empty_rows(cuda_query(torch.float32))
    assert kernels.takes_empty_rows(cuda_query(torch.float64))  # autocast leaves float64 alone


@pytest.mark.parametrize("seed", range(6))
def test_masked_decoding_steps_equal_stock(seed, forced):
    """Masked cross-attention steps (the first fills the cache, then a beam reuses it, with
    fully masked hypotheses) and causal self-attention steps with a mask over the cache."""
    gen = torch.Generator().manual_seed(seed)
    n_head, beam, t2 = 1 + seed % 4, 1 + seed, 3 + 2 * seed
    n_feat = 4 * n_head
    stock, ours = stock_and_flash(n_feat, n_head, dtype=torch.float64, seed=seed, backend="sdpa")
    memory = torch.randn(1, t2, n_feat, generator=gen, dtype=torch.float64).expand(beam, -1, -1)
    mask = torch.rand(beam, 1, t2, generator=gen) > 0.4
    mask[-1] = False
    state = None
    for _ in range(3):
        query = torch.randn(beam, n_feat, generator=gen, dtype=torch.float64)
        expected, _ = stock.step(query, None, memory=memory, mask=mask)
        got, state = ours.step(query, state, memory=memory, mask=mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert forced
    made = len(forced)

    stock, causal = stock_and_flash(n_feat, n_head, dtype=torch.float64, seed=seed, backend="sdpa", causal=True)
    tokens = torch.randn(beam, 4, n_feat, generator=gen, dtype=torch.float64)
    keep = torch.rand(beam, 1, 4, generator=gen) > 0.3
    keep[..., 0] = True
    state = None
    for t in range(4):
        got, state = causal.step(tokens[:, t], state, mask=keep[..., :t + 1])
        lower = torch.ones(t + 1, t + 1, dtype=torch.bool).tril()[None]
        expected, _ = stock(tokens[:, :t + 1], None, keep[..., :t + 1] & lower)
        torch.testing.assert_close(got, expected[:, -1], rtol=0, atol=1e-10)
    assert len(forced) > made
