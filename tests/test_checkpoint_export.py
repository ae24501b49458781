"""to_stock and to_fused on whole models' state dicts: export to stock ESPnet, round trips, which layers convert."""

import logging

import pytest

import espnet_asr
from checkpoint_cases import assert_same_outputs, assert_same_state
from espnet_mha.checkpoint import to_fused, to_stock
from espnet_mha.checkpoint_keys import fused_layers, stock_layers
from espnet_mha.layer import FlashMultiHeadedAttention

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_export_to_stock_loads_in_stock_espnet_and_gives_the_same_outputs(exp):
    ours = exp.flash(seed=7)
    stock = espnet_asr.build(exp.root, "mha", seed=8)[0]
    exported = to_stock(ours.state_dict())
    result = stock.load_state_dict(exported, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(ours, stock)
    assert list(exported) == list(stock.state_dict())


def test_round_trip_is_bit_identical_and_touches_only_our_layers(exp):
    original = exp.stock_state()
    fused = to_fused(original)
    assert fused_layers(fused) == espnet_asr.DECODER_ATTENTION
    assert stock_layers(fused, layer_pattern=None) == [espnet_asr.ENCODER_ATTENTION]
    assert list(fused) == list(exp.flash().state_dict())
    for key, value in fused.items():
        if "linear_qkv" not in key:
            assert value is original[key], key
    back = to_stock(fused)
    assert_same_state(back, original)
    assert back._metadata == original._metadata
    assert list(back._metadata) == list(original._metadata)


def test_to_fused_with_a_model_picks_its_layers(exp):
    ours = exp.flash()
    fused = to_fused(exp.stock_state(), model=ours, layer_pattern="no match")
    ours.load_state_dict(fused, strict=True)
    assert_same_outputs(ours, exp.model)
    assert to_fused(fused, model=ours).keys() == fused.keys()  # already fused: unchanged


def test_to_fused_takes_a_bare_layers_state_dict():
    """A single layer's stock state dict (top-level linear_q/k/v keys) is fused by
    ``to_fused`` without a model; before, it came back unchanged, without a word (an audit)."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    stock = MultiHeadedAttention(12, 3)
    fused = to_fused(stock.state_dict())
    assert list(fused) == ["linear_qkv.weight", "linear_qkv.bias", "linear_out.weight", "linear_out.bias"]
    ours = FlashMultiHeadedAttention(12, 3)
    ours.load_state_dict(fused, strict=True)
    assert_same_state(to_stock(ours.state_dict()), stock.state_dict())


def test_a_keep_vars_state_dict_converts_to_plain_tensors():
    """``state_dict(keep_vars=True)`` holds the parameters themselves: the converted entries
    are detached tensors with their values (tied to the parameters' graph, they could not
    be deep-copied, where the stock dict can: a probe); the others stay the parameters."""
    import copy

    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    stock = MultiHeadedAttention(12, 3)
    ours = FlashMultiHeadedAttention(12, 3)
    for convert, layer in ((to_fused, stock), (to_stock, ours)):
        converted = convert(layer.state_dict(keep_vars=True))
        for key, value in converted.items():
            if "linear_out" in key:
                assert value is layer.get_parameter(key)
            else:
                assert not value.requires_grad and value.grad_fn is None, key
        copy.deepcopy(converted)
        assert_same_state(converted, convert(layer.state_dict()))


def test_to_fused_that_converts_nothing_says_which_layers_it_left(exp, caplog):
    """Without a model, layers the pattern does not match are left as they are; when that is
    all of them, a warning names them and what to pass."""
    original = exp.stock_state()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        same = to_fused(original, layer_pattern=r"no\.such\.layer\.$")
    assert list(same) == list(original)
    assert "to_fused converted nothing" in caplog.text
    assert repr(espnet_asr.ENCODER_ATTENTION) in caplog.text and "pass model=" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        to_fused(original)  # the decoder's layers match: the encoder's are left alone, as meant
    assert "converted nothing" not in caplog.text
    # A model with no fused layer (here the stock model) converts nothing either, and says so.
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        assert list(to_fused(original, model=exp.model)) == list(original)
    assert "the model has no FlashMultiHeadedAttention with the fused linear_qkv" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        to_fused(original, model=exp.flash())
    assert "converted nothing" not in caplog.text
