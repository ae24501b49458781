"""Loading state dicts: stock, fused, partial or mismatched ones load, or fail, as into the stock layer."""

import functools
import logging

import pytest
import torch
from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from espnet_mha import FlashMultiHeadedAttention, unfuse_keys
from espnet_mha.testing import stock_and_flash


def test_stock_state_dict_loads_strictly_and_round_trips():
    stock = MultiHeadedAttention(12, 3)
    ours = FlashMultiHeadedAttention(12, 3)
    result = ours.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sorted(ours.state_dict()) == ["linear_out.bias", "linear_out.weight", "linear_qkv.bias", "linear_qkv.weight"]
    back = dict(ours.state_dict())
    assert unfuse_keys(back, "")
    original = stock.state_dict()
    assert sorted(back) == sorted(original)
    for key in original:
        assert torch.equal(back[key], original[key])
    restored = MultiHeadedAttention(12, 3)
    restored.load_state_dict(back, strict=True)


def test_our_own_state_dict_loads():
    a, b = FlashMultiHeadedAttention(8, 2), FlashMultiHeadedAttention(8, 2)
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(a.linear_qkv.weight, b.linear_qkv.weight)


def test_wrong_size_names_the_key_and_shapes():
    stock = MultiHeadedAttention(16, 2)
    ours = FlashMultiHeadedAttention(12, 3)
    with pytest.raises(ValueError, match=r"linear_q.weight: expected shape \(12, 12\) for n_feat=12, found \(16, 16\)"):
        ours.load_state_dict(stock.state_dict())


@pytest.mark.parametrize("absent", [("linear_v.weight", "linear_k.bias"), ("linear_k.weight", "linear_k.bias",
                                     "linear_v.weight", "linear_v.bias", "linear_out.weight")])
def test_a_partial_stock_state_dict_loads_as_into_the_stock_layer(absent):
    """Some stock keys absent (a partial checkpoint): the present parts load and the absent
    ones are reported under their stock names, as by the stock layer (strict raises,
    strict=False returns them)."""
    state = MultiHeadedAttention(8, 2).state_dict()
    for key in absent:
        del state[key]
    stock, ours = stock_and_flash(8, 2, dtype=torch.float32, seed=5)
    for layer in (stock, ours):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict") as error:
            layer.load_state_dict(state)
        assert all(f'"{key}"' in str(error.value) for key in absent)
    results = [layer.load_state_dict(state, strict=False) for layer in (stock, ours)]
    assert sorted(results[0].missing_keys) == sorted(results[1].missing_keys) == sorted(absent)
    assert results[0].unexpected_keys == results[1].unexpected_keys == []
    fused = torch.cat([stock.linear_q.weight, stock.linear_k.weight, stock.linear_v.weight])
    assert torch.equal(ours.linear_qkv.weight, fused)
    assert torch.equal(ours.linear_qkv.bias, torch.cat([stock.linear_q.bias, stock.linear_k.bias, stock.linear_v.bias]))
    assert torch.equal(ours.linear_out.weight, stock.linear_out.weight)


@pytest.mark.parametrize("absent", [(), ("linear_v.weight", "linear_k.bias")], ids=["complete", "partial"])
def test_stock_parts_in_other_dtypes_load_as_into_the_stock_layer(absent):
    """A float64 state dict, complete with one float32 part or partial, into a float32
    layer: the stock layer's linears copy (and cast) each part; ours stacked only parts
    of one dtype (a partial one loaded nothing of q/k/v)."""
    state = {key: value.double() for key, value in MultiHeadedAttention(8, 2).state_dict().items()}
    state["linear_q.weight"] = state["linear_q.weight"].float()
    for key in absent:
        del state[key]
    stock, ours = stock_and_flash(8, 2, dtype=torch.float32, seed=3)
    results = [layer.load_state_dict(state, strict=False) for layer in (stock, ours)]
    assert sorted(results[0].missing_keys) == sorted(results[1].missing_keys) == sorted(absent)
    assert results[0].unexpected_keys == results[1].unexpected_keys == []
    assert torch.equal(stacked(ours), torch.cat([stock.linear_q.weight, stock.linear_k.weight, stock.linear_v.weight]))
    assert stacked(ours).dtype == torch.float32


def test_partial_stock_keys_a_called_projection_cannot_take_are_reported(caplog):
    """A parametrized linear_qkv has no plain rows to stand in for the absent parts: a
    warning names the keys, and load_state_dict reports them (raises when strict)."""
    from torch.nn.utils.parametrizations import weight_norm

    state = MultiHeadedAttention(8, 2).state_dict()
    del state["linear_v.weight"]
    layer = FlashMultiHeadedAttention(8, 2)
    layer.linear_qkv = weight_norm(layer.linear_qkv)
    with caplog.at_level(logging.WARNING, logger="espnet_mha.state_dict"):
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: .*"linear_q.weight"'):
            layer.load_state_dict(state)
    assert "half-converted attention layer at '': " in caplog.text and "missing ['linear_v.weight']" in caplog.text


def stacked(layer):
    """A layer's q/k/v weight as the fused (3D, D) rows, whichever its parameters."""
    if "linear_qkv" in layer._modules:
        return layer.linear_qkv.weight
    return torch.cat([layer.linear_q.weight, layer.linear_k.weight, layer.linear_v.weight])


def test_stock_layout_saves_what_the_stock_layer_loads():
    """state_dict_layout="stock" (what the mha name builds under use_for_mha): the state
    dict loads strictly into the stock layer, which then computes the same outputs,
    and it loads back into either layout."""
    ours = FlashMultiHeadedAttention(12, 3, state_dict_layout="stock").double()
    state = ours.state_dict()
    assert list(state) == list(MultiHeadedAttention(12, 3).state_dict())  # the stock order too
    stock = MultiHeadedAttention(12, 3).double()
    stock.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64), torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=0, atol=1e-12)
    for layout in ("fused", "stock"):
        other = FlashMultiHeadedAttention(12, 3, state_dict_layout=layout).double()
        other.load_state_dict(state, strict=True)
        assert torch.equal(stacked(other), stacked(ours))
        ours.load_state_dict(other.state_dict(), strict=True)
        assert torch.equal(stacked(other), stacked(ours))


@pytest.mark.parametrize("layout", ["fused", "stock"])
def test_a_file_missing_some_projections_keeps_the_current_ones(layout):
    """ESPnet's --init_param with an exclusion (file:::...linear_q) loads
    model.state_dict() updated with the rest of the file: the layer keeps its current
    q and takes k and v from the file, as the stock layer does."""
    current = MultiHeadedAttention(8, 2)
    stock, ours = MultiHeadedAttention(8, 2), FlashMultiHeadedAttention(8, 2, state_dict_layout=layout)
    stock.load_state_dict(current.state_dict())
    ours.load_state_dict(current.state_dict())
    file = {key: value for key, value in MultiHeadedAttention(8, 2).state_dict().items() if "linear_q." not in key}
    for model in (stock, ours):
        state = model.state_dict()
        state.update(file)
        model.load_state_dict(state, strict=True)
    expected, got = stock.state_dict(), dict(ours.state_dict())
    assert unfuse_keys(got, "") == (layout == "fused")
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_a_fused_file_replaces_the_current_stock_layout_entries():
    """--init_param with a fused file into a model with the stock parameters: the file
    wins over the model's current entries."""
    ours = FlashMultiHeadedAttention(8, 2, state_dict_layout="stock")
    file = FlashMultiHeadedAttention(8, 2).state_dict()
    state = ours.state_dict()
    state.update(file)
    ours.load_state_dict(state, strict=True)
    assert torch.equal(stacked(ours), file["linear_qkv.weight"])
    ours.load_state_dict(FlashMultiHeadedAttention(8, 2).state_dict(), strict=True)  # a fused file as it is


def test_stock_layout_entries_share_the_parameters_storage():
    """As for any module: an in-place update through state_dict() (an EMA does that)
    reaches the layer."""
    for layout in ("fused", "stock"):
        ours = FlashMultiHeadedAttention(8, 2, state_dict_layout=layout)
        key = "linear_qkv.weight" if layout == "fused" else "linear_k.weight"
        ours.state_dict()[key].fill_(3.0)
        assert torch.equal(stacked(ours)[8:16], torch.full((8, 8), 3.0))


def test_a_layer_pickled_with_the_old_stock_layout_still_saves_it():
    """Layers pickled before the stock layout held the stock parameters: fused, with
    state_dict_layout="stock" and the state-dict post-hook registered; they unpickle
    and keep writing the stock keys."""
    import pickle

    from espnet_mha import state_dict as adapter

    old = FlashMultiHeadedAttention(8, 2)
    old.__dict__["state_dict_layout"] = "stock"  # the instance attribute such a pickle restores
    old.register_state_dict_post_hook(adapter.state_dict_post_hook)
    copy = pickle.loads(pickle.dumps(old))
    state = copy.state_dict()
    assert list(state) == list(MultiHeadedAttention(8, 2).state_dict())
    assert torch.equal(torch.cat([state[f"linear_{x}.weight"] for x in "qkv"]), old.linear_qkv.weight)
    copy.load_state_dict(state)


def test_a_quantized_stock_state_dict_into_the_fused_layout_says_why_not():
    """quantize_dynamic packs each stock linear with its own scale, which one fused module
    cannot hold: a clear error naming the key (it was a bare KeyError from torch's loader).
    The stock layout takes it."""
    quantize = functools.partial(torch.ao.quantization.quantize_dynamic, qconfig_spec={torch.nn.Linear},
                                 dtype=torch.qint8)
    stock = quantize(MultiHeadedAttention(16, 4).eval())
    with pytest.raises(ValueError, match=r"^linear_q\.scale: a quantize_dynamic'd stock state dict cannot be "
                                         r"loaded into a layer with the fused linear_qkv"):
        quantize(FlashMultiHeadedAttention(16, 4).eval()).load_state_dict(stock.state_dict())
    quantize(FlashMultiHeadedAttention(16, 4, state_dict_layout="stock").eval()).load_state_dict(stock.state_dict())


def test_a_state_dict_that_does_not_fit_raises_what_the_stock_layer_raises_too():
    """load_state_dict raises RuntimeError for the stock layer's mismatched or non-tensor
    entries; ours raise ValueError/TypeError naming the key, which are RuntimeErrors too."""
    stock, wrong = MultiHeadedAttention(8, 2), MultiHeadedAttention(16, 2).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for linear_q.weight"):
        stock.load_state_dict(wrong)
    cases = [(FlashMultiHeadedAttention(8, 2), wrong, ValueError,
              r"linear_q.weight: expected shape \(8, 8\) for n_feat=8, found \(16, 16\)"),
             (FlashMultiHeadedAttention(8, 2), {**stock.state_dict(), "linear_k.bias": [0.0] * 8}, TypeError,
              r"linear_k.bias must be a tensor, got list"),
             (FlashMultiHeadedAttention(8, 2, state_dict_layout="stock"),
              {"linear_qkv.weight": torch.zeros(25, 8), "linear_qkv.bias": torch.zeros(25)}, ValueError,
              r"linear_qkv.weight: first dimension 25 is not divisible by 3")]
    for layer, state, error, match in cases:
        for strict in (True, False):
            for kind in (error, RuntimeError):
                with pytest.raises(kind, match=match):
                    layer.load_state_dict(state, strict=strict)


@pytest.mark.parametrize("absent", ["weight", "bias"])
def test_a_partial_fused_state_dict_loads_into_the_stock_layout_as_into_the_fused_one(absent):
    """A fused file without linear_qkv.<absent>: the stock layout loads the other parameter and
    reports the absent one's stock keys (it kept none of q/k/v and called the present key
    unexpected); the fused layout loads the same numbers."""
    torch.manual_seed(0)
    source = FlashMultiHeadedAttention(8, 2).double()
    state = {k: v for k, v in source.state_dict().items() if k != f"linear_qkv.{absent}"}
    torch.manual_seed(1)
    fused = FlashMultiHeadedAttention(8, 2).double()
    torch.manual_seed(1)
    stock_layout = FlashMultiHeadedAttention(8, 2, state_dict_layout="stock").double()
    assert fused.load_state_dict(state, strict=False).missing_keys == [f"linear_qkv.{absent}"]
    result = stock_layout.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == [f"linear_{n}.{absent}" for n in "kqv"] and not result.unexpected_keys
    x, memory = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(stock_layout(x, memory)[0], fused(x, memory)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"linear_q.{absent}\""):
        stock_layout.load_state_dict(state)
    # --init_param: the model's own entries updated with the file, loaded strictly.
    torch.manual_seed(2)
    target = FlashMultiHeadedAttention(8, 2, state_dict_layout="stock").double()
    own = {key: value.clone() for key, value in target.state_dict().items()}
    target.load_state_dict({**own, **state})
    loaded, kept = ("bias", "weight") if absent == "weight" else ("weight", "bias")
    for name, row in zip(("linear_q", "linear_k", "linear_v"), source.state_dict()[f"linear_qkv.{loaded}"].chunk(3)):
        assert torch.equal(target.state_dict()[f"{name}.{loaded}"], row)
        assert torch.equal(target.state_dict()[f"{name}.{kept}"], own[f"{name}.{kept}"])


def test_a_lone_fused_entry_that_does_not_fit_is_named():
    layer = FlashMultiHeadedAttention(8, 2, state_dict_layout="stock")
    with pytest.raises(ValueError, match=r"linear_qkv.weight: first dimension 25 is not divisible by 3"):
        layer.load_state_dict({"linear_qkv.weight": torch.zeros(25, 8)}, strict=False)
    with pytest.raises(ValueError, match=r"linear_qkv.bias: expected a \(3D,\) bias, got shape \(\)"):
        layer.load_state_dict({"linear_qkv.bias": torch.tensor(1.0)}, strict=False)
    with pytest.raises(ValueError, match=r"linear_qkv.weight: expected a \(3D, D\) weight, got shape \(24,\)"):
        layer.load_state_dict({"linear_qkv.weight": torch.zeros(24)}, strict=False)
    with pytest.raises(ValueError, match=r"linear_qkv.bias: expected a \(3D,\) bias, got shape \(24, 8\)"):
        layer.load_state_dict({"linear_qkv.bias": torch.zeros(24, 8)}, strict=False)
    with pytest.raises(TypeError, match=r"linear_qkv.bias must be a tensor, got list"):
        layer.load_state_dict({"linear_qkv.bias": [1.0]}, strict=False)
