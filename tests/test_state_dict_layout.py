"""state_dict_layout's projections: which the layer has, setting, replacing and reading them; forward_qkv's checks."""

import pytest
import torch
from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.testing import stock_and_flash


def test_stock_layout_has_the_stock_parameters():
    """The stock layer's parameter names, shapes and order, so whatever selects parameters
    by name sees the stock layer; the same seed gives the same values."""
    torch.manual_seed(4)
    stock = MultiHeadedAttention(8, 2)
    torch.manual_seed(4)
    ours = FlashMultiHeadedAttention(8, 2, state_dict_layout="stock")
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in stock.named_parameters()]
    for (_, a), (_, b) in zip(ours.named_parameters(), stock.named_parameters()):
        assert torch.equal(a, b)
    state = ours.state_dict(keep_vars=True)
    assert state["linear_q.weight"] is ours.linear_q.weight and "linear_qkv.weight" not in state


def test_the_layout_cannot_be_changed_after_construction():
    """It decides which parameters the layer has (setting it used to switch the saved keys)."""
    layer = FlashMultiHeadedAttention(8, 2)
    with pytest.raises(AttributeError, match=r"state_dict_layout is decided when the layer is built .* "
                                             r"got an assignment of 'stock'"):
        layer.state_dict_layout = "stock"
    assert layer.state_dict_layout == "fused"
    assert FlashMultiHeadedAttention(8, 2, state_dict_layout="stock").state_dict_layout == "stock"


def test_bad_state_dict_layout_is_named():
    with pytest.raises(ValueError, match=r"state_dict_layout must be one of \('fused', 'stock'\), got 'flat'"):
        FlashMultiHeadedAttention(8, 2, state_dict_layout="flat")


def test_stock_layout_parametrizes_as_the_stock_layer():
    """weight_norm on linear_q: the state dict has the stock layer's keys, loads into it,
    and both compute the same."""
    from torch.nn.utils.parametrizations import weight_norm

    stock, ours = stock_and_flash(8, 2, dtype=torch.float64, seed=1, state_dict_layout="stock")
    for layer in (stock, ours):
        layer.linear_q = weight_norm(layer.linear_q)
    assert list(ours.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], stock(x)[0], rtol=1e-12, atol=1e-12)


def test_stock_helpers_check_their_arguments():
    layer = FlashMultiHeadedAttention(8, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"key has feature size 6"):
        layer.forward_qkv(x, torch.randn(2, 5, 6), torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"key \(1, 5, 8\) and value \(1, 5, 8\) must both be \(B, T2, D\) with the query's batch B=2"):
        layer.forward_qkv(x, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    q, k, v = layer.forward_qkv(x, torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    scores = q @ k.transpose(-2, -1)
    with pytest.raises(ValueError, match=r"a 2-D mask \(h, T2\) with h > 1 is a per-head mask"):
        layer.forward_attention(v, scores, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"scores must be a 4-D torch.Tensor, got shape \(2, 3, 5\)"):
        layer.forward_attention(v, scores[:, 0], None)
    with pytest.raises(TypeError, match=r"value must be a 4-D torch.Tensor, got list"):
        layer.forward_attention([1.0], scores, None)
    with pytest.raises(ValueError, match=r"value \(2, 2, 4, 4\) and scores \(2, 2, 3, 5\) must be"):
        layer.forward_attention(v[:, :, :4], scores, None)


@pytest.mark.parametrize("layout,name", [("fused", "linear_q"), ("fused", "linear_v"), ("stock", "linear_qkv")])
@pytest.mark.parametrize("how", ["setattr", "add_module", "register_module"])
def test_a_projection_of_the_other_layout_cannot_be_set(layout, name, how):
    """The stock layer calls whatever module holds linear_q; a layer of the other layout
    would keep such a module, save it and never call it (silently the old weights)."""
    layer = FlashMultiHeadedAttention(8, 2, state_dict_layout=layout)
    before = dict(layer.state_dict())
    replacement = torch.nn.Linear(8, 24 if name == "linear_qkv" else 8)
    with pytest.raises(AttributeError, match=rf"cannot set {name} to a Linear: this layer has the .*state_dict_layout='{layout}'"
                                             r".* would never be called"):
        if how == "setattr":
            setattr(layer, name, replacement)
        else:
            getattr(layer, how)(name, replacement)
    assert layer.state_dict().keys() == before.keys()


@pytest.mark.parametrize("layout", ["fused", "stock"])
def test_a_projection_of_the_layout_can_be_replaced(layout):
    """Replacing one of the layer's own projections (an adapter, a LoRA linear) is what the
    stock layer allows: the replacement is called, as in the stock layer."""
    torch.manual_seed(0)
    stock = MultiHeadedAttention(8, 2).double().eval()
    layer = FlashMultiHeadedAttention(8, 2, state_dict_layout=layout).double().eval()
    layer.load_state_dict(stock.state_dict())
    torch.manual_seed(1)
    stock.linear_out = torch.nn.Linear(8, 8).double()
    layer.linear_out = stock.linear_out
    if layout == "stock":
        stock.linear_q = torch.nn.Linear(8, 8).double()
        layer.linear_q = stock.linear_q
    x, memory = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, memory)[0], stock(x, memory)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout,name,match", [
    ("fused", "linear_k", r"has no attribute 'linear_k': this layer has the fused linear_qkv "
                          r"\(state_dict_layout='fused'\), nn.Linear\(D, 3D\) with rows q, k, v \(linear_k is "
                          r"rows D:2D\); build it with state_dict_layout='stock'"),
    ("stock", "linear_qkv", r"has no attribute 'linear_qkv': this layer has the stock linear_q/k/v"),
    ("fused", "linear_z", r"^'FlashMultiHeadedAttention' object has no attribute 'linear_z'$"),
])
def test_reading_a_projection_of_the_other_layout_says_which_layout(layout, name, match):
    layer = FlashMultiHeadedAttention(8, 2, state_dict_layout=layout)
    with pytest.raises(AttributeError, match=match):
        getattr(layer, name)
    assert not hasattr(layer, name)
