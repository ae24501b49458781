"""Skipping padded keys on CPU (espnet_mha.packing) against the stock layer."""

import pytest
import torch

from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from espnet_mha import FlashMultiHeadedAttention, packing
from espnet_mha.testing import stock_and_flash, under_stock_names

pytestmark = pytest.mark.usefixtures("layout")

FP64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def always_per_item(monkeypatch):
    """Make every masked CPU call run per item, whatever its size."""
    monkeypatch.setattr(packing, "ITEM_COST_MACS", 0)


def padding_mask(lengths, t2):
    """ESPnet's key padding ``(B, 1, T2)``: True for the first ``lengths[i]`` frames."""
    return (torch.arange(t2)[None, :] < torch.tensor(lengths)[:, None]).unsqueeze(1)


def forward_backward(layer, query, memory, mask):
    query = query.clone().requires_grad_(True)
    memory = None if memory is None else memory.clone().requires_grad_(True)
    out, _ = layer(query, memory, mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * weight).sum().backward()
    params = {name: p.grad for name, p in layer.named_parameters()}
    return out, query.grad, None if memory is None else memory.grad, params


def assert_matches_stock(stock, ours, query, memory, mask):
    expected = forward_backward(stock, query, memory, mask)
    got = forward_backward(ours, query, memory, mask)
    for e, g in zip(expected[:3], got[:3]):
        if e is not None:
            torch.testing.assert_close(g, e, **FP64)
    stock_params, our_params = expected[3], got[3]
    our_params = under_stock_names(our_params)
    for name, grad in stock_params.items():
        torch.testing.assert_close(our_params[name], grad, **FP64, msg=lambda m, name=name: f"{name}: {m}")


def test_random_cases_per_item_match_stock(case, always_per_item):
    """Every mask layout of the random cases (holes, per-query masks, batch-1 masks,
    fully masked rows and items), forward and all gradients."""
    stock, ours = stock_and_flash(case.n_feat, case.n_head, seed=case.seed)
    query, memory, mask = case.tensors()
    assert_matches_stock(stock, ours, query, memory, mask)
    if mask is not None:
        assert ours.last_backend == "sdpa"


@pytest.mark.parametrize("self_attention", [False, True], ids=["cross", "self"])
@pytest.mark.parametrize("lengths", [(13, 5, 9, 1), (13, 0, 13, 7), (4, 4, 4, 4)])
def test_padded_batches_match_stock_and_report_the_skipped_share(self_attention, lengths, always_per_item):
    stock, ours = stock_and_flash(24, 4)
    gen = torch.Generator().manual_seed(len(lengths))
    t2 = 13
    t1 = t2 if self_attention else 6
    query = torch.randn(4, t1, 24, generator=gen, dtype=torch.float64)
    memory = None if self_attention else torch.randn(4, t2, 24, generator=gen, dtype=torch.float64)
    mask = padding_mask(lengths, t2)
    assert_matches_stock(stock, ours, query, memory, mask)
    computed = sum(max(n, 1) for n in lengths)  # an empty item still makes one (masked) key
    assert ours.last_skipped_keys == pytest.approx(1 - computed / (4 * t2))


def test_plan_splits_only_when_the_skipped_work_pays():
    lengths = [300, 168, 150, 295, 168, 210, 197, 155]  # the cross_train benchmark's padding
    keep = padding_mask(lengths, 300)
    assert packing.plan(keep, batch=8, t1=60, t2=300, d=1024) == tuple(lengths)
    # D=256: 15M multiply-adds skipped per item, where per-item calls lost (a 2-core Xeon:
    # the cross-attention benchmarks 0.80x in inference, 0.92x in training).
    assert packing.plan(keep, batch=8, t1=60, t2=300, d=256) is None
    assert packing.plan(padding_mask([300] * 8, 300), batch=8, t1=60, t2=300, d=1024) is None
    assert packing.plan(None, batch=8, t1=60, t2=300, d=1024) is None
    # A mask shared by the batch (b = 1) gives every item the same length.
    assert packing.plan(padding_mask([100], 200), batch=3, t1=1000, t2=200, d=256) == (100, 100, 100)


def test_environment_variable_turns_it_off(monkeypatch, always_per_item):
    _, ours = stock_and_flash(24, 4)
    query = torch.randn(4, 6, 24, dtype=torch.float64)
    memory = torch.randn(4, 13, 24, dtype=torch.float64)
    mask = padding_mask((13, 5, 9, 1), 13)
    ours(query, memory, mask)
    assert ours.last_skipped_keys > 0
    monkeypatch.setenv(packing.ENV_SKIP, "0")
    ours(query, memory, mask)
    assert ours.last_skipped_keys == 0.0
    for on in ("", " ", "1", "Yes"):
        monkeypatch.setenv(packing.ENV_SKIP, on)
        ours(query, memory, mask)
        assert ours.last_skipped_keys > 0, on
    # Any other value was read as on, without a word (an audit found it); now it raises.
    monkeypatch.setenv(packing.ENV_SKIP, "disable")
    with pytest.raises(ValueError, match=r"ESPNET_MHA_SKIP_PADDED_KEYS='disable' must be 0/1"):
        ours(query, memory, mask)


@pytest.mark.parametrize("options", [dict(keep_attn=True), dict(causal=True), dict(backend="math")],
                         ids=["keep_attn", "causal", "math"])
def test_not_used_where_the_full_call_is_needed(options, always_per_item):
    _, ours = stock_and_flash(24, 4, **options)
    query = torch.randn(4, 13, 24, dtype=torch.float64)
    ours(query, None, padding_mask((13, 5, 9, 1), 13))
    assert ours.last_skipped_keys == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_dropout_in_training_runs_the_batch_whole_with_the_stock_random_draws(always_per_item, seed):
    """Per-item calls would draw the dropout mask in other shapes than the stock layer's
    one call, so later layers would see other random numbers too. With dropout active
    the batch runs whole: the same output, gradients and RNG state as the stock layer."""
    stock = MultiHeadedAttention(24, 4, dropout=0.5).double().train()
    ours = FlashMultiHeadedAttention(24, 4, dropout=0.5).double().train()
    ours.load_state_dict(stock.state_dict())
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(4, 6, 24, generator=gen, dtype=torch.float64)
    memory = torch.randn(4, 13, 24, generator=gen, dtype=torch.float64)
    mask = padding_mask((13, 5, 9, 1), 13)
    results = []
    for layer in (stock, ours):
        torch.manual_seed(seed)
        out, query_grad, memory_grad, _ = forward_backward(layer, query, memory, mask)
        results.append((out, query_grad, memory_grad, torch.rand(3)))  # the RNG after the layer
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert ours.last_skipped_keys == 0.0
    ours.eval()  # no dropout: per item again
    ours(query, memory, mask)
    assert ours.last_skipped_keys > 0


def test_non_finite_values_with_skipped_keys(always_per_item):
    """A NaN weight: the output is non-finite exactly where the stock one is; gradients
    are non-finite wherever the stock ones are, except the skipped (masked, padded)
    memory frames, which get exactly zero where the stock layer gets 0 * NaN."""
    stock, ours = stock_and_flash(24, 4)
    with torch.no_grad():
        stock.linear_out.weight[2, 3] = float("nan")
    ours.load_state_dict(stock.state_dict())
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(4, 6, 24, generator=gen, dtype=torch.float64)
    memory = torch.randn(4, 13, 24, generator=gen, dtype=torch.float64)
    lengths = (13, 5, 9, 1)
    mask = padding_mask(lengths, 13)
    expected, got = forward_backward(stock, query, memory, mask), forward_backward(ours, query, memory, mask)
    assert torch.equal(got[0].isfinite(), expected[0].isfinite())
    padded = ~mask[:, 0, :, None].expand(4, 13, 24)
    assert not expected[2][padded].isfinite().all()  # the stock layer: 0 * NaN
    assert (got[2][padded] == 0).all()
    assert torch.equal(got[2][~padded].isfinite(), expected[2][~padded].isfinite())
    assert torch.equal(got[1].isfinite(), expected[1].isfinite())
