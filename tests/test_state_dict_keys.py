"""The state-dict key helpers (fuse_keys, unfuse_keys, to_fused, to_stock, load_stock_or_fused) and their refusals."""

import pytest
import torch
from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from espnet_mha import FlashMultiHeadedAttention, fuse_keys, to_fused, to_stock, unfuse_keys
from espnet_mha.testing import stock_and_flash


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
