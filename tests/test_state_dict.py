"""Layer-level state-dict adapter: stock checkpoints load with plain strict load_state_dict."""

import functools
import logging

import pytest
import torch
from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from espnet_mha import FlashMultiHeadedAttention, fuse_keys, to_fused, to_stock, unfuse_keys
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


def test_mixed_layouts_are_refused():
    state = dict(MultiHeadedAttention(8, 2).state_dict())
    state["linear_qkv.weight"] = torch.zeros(24, 8)
    with pytest.raises(KeyError, match=r"has both stock keys and fused \['linear_qkv.weight'\]"):
        fuse_keys(state, "")


def test_unfuse_errors():
    with pytest.raises(KeyError, match=r"missing \['p.linear_qkv.bias'\]"):
        unfuse_keys({"p.linear_qkv.weight": torch.zeros(6, 2)}, "p.")
    odd = {"p.linear_qkv.weight": torch.zeros(5, 2), "p.linear_qkv.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"p.linear_qkv.weight: first dimension 5 is not divisible by 3"):
        unfuse_keys(odd, "p.")
    assert sorted(odd) == ["p.linear_qkv.bias", "p.linear_qkv.weight"]  # left as it was (the weight was removed)
    assert not unfuse_keys({"x": torch.zeros(1)}, "")
    for unfuse in (unfuse_keys, lambda sd, p: to_stock(sd)):
        with pytest.raises(TypeError, match=r"p.linear_qkv.weight must be a tensor, got list"):
            unfuse({"p.linear_qkv.weight": [1.0], "p.linear_qkv.bias": torch.zeros(3)}, "p.")
    # Without n_feat, q/k/v of different row counts were fused into a tensor that splits otherwise.
    uneven = {f"linear_{n}.{p}": torch.zeros((rows, 8) if p == "weight" else (rows,))
              for n, rows in zip("qkv", (8, 16, 8)) for p in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"the q/k/v parts differ in shape, dtype or device: linear_q.weight \(8, 8\) "
                                         r"torch.float32 on cpu, linear_k.weight \(16, 8\)"):
        fuse_keys(uneven, "")
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module or None, got str"):
        to_fused({}, model="decoder")


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


def test_helper_arguments_are_checked():
    import espnet_mha

    good = MultiHeadedAttention(8, 2).state_dict()
    with pytest.raises(TypeError, match=r"state_dict must be a mapping of names to tensors \(a state dict\), got NoneType"):
        fuse_keys(None, "")
    with pytest.raises(TypeError, match=r"state_dict must be a mapping .*, got list"):
        espnet_mha.to_stock([1, 2])
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got NoneType"):
        espnet_mha.load_stock_or_fused(None, good)
    with pytest.raises(TypeError, match=r"state_dict must be a mapping .*, got str"):
        espnet_mha.load_stock_or_fused(FlashMultiHeadedAttention(8, 2), "model.pth")
    with pytest.raises(TypeError, match=r"n_feat must be an int, got str '8'"):
        fuse_keys(dict(good), "", n_feat="8")
    with pytest.raises(TypeError, match=r"^linear_k.bias must be a tensor, got list$"):
        fuse_keys(dict(good, **{"linear_k.bias": [0.0] * 8}), "")
    odd = dict(good, **{"linear_k.weight": torch.zeros(8, 6)})
    with pytest.raises(ValueError, match=r"the q/k/v parts differ in shape, dtype or device: linear_q.weight \(8, 8\) "
                                         r"torch.float32 on cpu, linear_k.weight \(8, 6\)"):
        fuse_keys(odd, "")
    meta = dict(good, **{"linear_v.weight": torch.zeros(8, 8, device="meta")})
    with pytest.raises(ValueError, match=r"linear_v.weight \(8, 8\) torch.float32 on meta"):
        FlashMultiHeadedAttention(8, 2).load_state_dict(meta)
    with pytest.raises(ValueError, match=r"linear_qkv.weight \(24, 8\) and linear_qkv.bias \(9,\) are not a \(3D, D\) weight"):
        unfuse_keys({"linear_qkv.weight": torch.zeros(24, 8), "linear_qkv.bias": torch.zeros(9)}, "")
    # Found by a probe: each of these converted something, or failed inside with an IndexError or
    # AttributeError; the dict is left as it was.
    fused = FlashMultiHeadedAttention(8, 2).state_dict()
    for helper, state in ((fuse_keys, dict(good)), (unfuse_keys, dict(fused))):
        with pytest.raises(TypeError, match=r"prefix must be a str .*, got NoneType None"):
            helper(state, None)
        with pytest.raises(TypeError, match=r"its key 5 is a int, not a str"):
            helper({**state, 5: torch.zeros(1)}, "")
    both = {**good, **fused}
    with pytest.raises(KeyError, match=r"has both fused keys \['linear_qkv.weight', 'linear_qkv.bias'\] and stock "
                                       r"\['linear_q.weight'"):
        unfuse_keys(both, "")
    assert both.keys() == {**good, **fused}.keys() and torch.equal(both["linear_q.weight"], good["linear_q.weight"])
    wide = {"linear_qkv.weight": torch.zeros(24, 9), "linear_qkv.bias": torch.zeros(24)}
    with pytest.raises(ValueError, match=r"linear_qkv.weight: expected shape \(3D, D\) = \(27, 9\), found \(24, 9\)"):
        unfuse_keys(wide, "")
    flat = {f"linear_{x}.{p}": torch.zeros(8) for x in "qkv" for p in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"linear_q.weight: expected a \(D, D\) weight, found \(8,\)"):
        fuse_keys(flat, "")
    short = dict(good, **{f"linear_{x}.bias": torch.zeros(4) for x in "qkv"})
    with pytest.raises(ValueError, match=r"linear_q.bias: expected shape \(8,\) for the \(8, 8\) weight, found \(4,\)"):
        fuse_keys(short, "")
    assert "linear_qkv.weight" not in short and short.keys() == good.keys()
    with pytest.raises(ValueError, match=r"linear_qkv.weight: expected shape \(3D, D\), found \(\)"):
        espnet_mha.to_stock({**fused, "linear_qkv.weight": torch.tensor(1.0)})
    for value, error, match in ((torch.tensor(1.0), ValueError, r"expected a \(D, D\) weight, D > 0, found shape \(\)"),
                                (torch.zeros(0, 8), ValueError, r"found shape \(0, 8\)"),
                                ([1.0], TypeError, r"linear_out.weight must be a tensor, got list")):
        with pytest.raises(error, match=match):
            espnet_mha.to_fused({**good, "linear_out.weight": value})


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


@pytest.mark.parametrize("change", ["weight_norm", "prune", "quantize_dynamic"])
def test_to_stock_refuses_a_fused_projection_that_is_not_a_plain_linear(change):
    """Its keys have no stock counterpart: a quantized layer's were passed through (the
    result then failed to load into the quantized stock layer), a parametrized one was
    reported as half-converted."""
    from espnet_mha import to_stock

    layer = FlashMultiHeadedAttention(16, 4).eval()
    if change == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(layer.linear_qkv)
    elif change == "prune":
        from torch.nn.utils import prune

        prune.custom_from_mask(layer.linear_qkv, "weight", torch.ones(48, 16))
    else:
        layer = torch.ao.quantization.quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"^linear_qkv\.\S+ \(and [1-9]\d* more such keys\): this layer's linear_qkv "
                                         r"is not a plain nn.Linear \(quantized, parametrized or adapted\).* "
                                         r"torch.nn.utils.prune.remove\(layer.linear_qkv, 'weight'\) for pruning, "
                                         r"torch.nn.utils.parametrize.remove_parametrizations"):
        to_stock(layer.state_dict())


@pytest.mark.parametrize("change", ["lora", "weight_norm"])
@pytest.mark.parametrize("with_model", [False, True], ids=["pattern", "model"])
def test_to_fused_refuses_a_stock_projection_that_is_not_a_plain_linear(change, with_model):
    """The mirror of to_stock's refusal: a stock layer's linear_q with LoRA's lora_A/lora_B
    (loralib's Linear saves them beside weight and bias) or a parametrization has keys the
    fused linear_qkv has no place for; they were left in the result, which a non-strict
    load (ESPnet's build_model_from_file) dropped without a word."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    from espnet_mha import to_fused

    stock = MultiHeadedAttention(16, 4).eval()
    if change == "lora":
        stock.linear_q.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 16)))
        stock.linear_q.register_parameter("lora_B", torch.nn.Parameter(torch.zeros(16, 2)))
    else:
        torch.nn.utils.parametrizations.weight_norm(stock.linear_q)
    model = FlashMultiHeadedAttention(16, 4, state_dict_layout="fused") if with_model else None
    with pytest.raises(ValueError, match=r"^linear_q\.\S+ \(and [1-9]\d* more such keys\): this layer's linear_q is not "
                                         r"a plain nn.Linear \(adapted or parametrized\), and the fused "
                                         r"linear_qkv has no place for its keys"):
        to_fused(stock.state_dict(), model=model)


def test_a_single_extra_key_is_named_alone():
    """An audit read "(and 0 more such keys)" in the message."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    from espnet_mha import to_fused

    stock = MultiHeadedAttention(16, 4).eval()
    stock.linear_k.register_buffer("scaling", torch.ones(1))
    with pytest.raises(ValueError, match=r"^linear_k\.scaling: this layer's linear_k is not a plain nn.Linear"):
        to_fused(stock.state_dict())


def test_load_stock_or_fused_keeps_a_models_own_module_prefix():
    """A model whose child is named ``module`` (not DDP): its keys start with ``module.``,
    which the loader took for DDP's and removed (every key then missing)."""
    from espnet_mha.checkpoint import load_stock_or_fused

    class Holder(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.module = layer

    stock, ours = stock_and_flash(16, 4)
    query, memory = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    holder = Holder(ours)
    with torch.no_grad():
        for p in holder.parameters():
            p.zero_()
    assert not load_stock_or_fused(holder, Holder(stock).state_dict()).missing_keys
    torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=1e-10, atol=1e-10)


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
