"""Checkpoint errors: wrong sizes, missing or mixed keys, wrong arguments and Lightning files are named."""

import logging

import pytest
import torch

import espnet_asr
from espnet_mha.checkpoint import load_stock_or_fused, to_fused, to_stock
from espnet_mha.checkpoint_keys import strip_wrapper_prefixes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_wrong_attention_size_names_key_expected_and_found(exp, tmp_path):
    ours = espnet_asr.build(tmp_path, "flash_mha", d_model=48)[0]
    with pytest.raises(ValueError, match=r"decoder\.decoder\.layers\.1\.layer\.linear_q\.weight: "
                                         r"expected shape \(48, 48\) for n_feat=48, found \(32, 32\)"):
        ours.load_state_dict(torch.load(exp.ave, weights_only=True))
    with pytest.raises(ValueError, match=r"layers\.1\.layer\.linear_q\.weight: expected shape \(48, 48\) "
                                         r"for n_feat=48, found \(32, 32\)"):
        to_fused(exp.stock_state(), model=ours)
    with pytest.raises(RuntimeError, match=r"size mismatch for decoder\.decoder\.layers\.1\.layer\.linear_qkv\.weight: "
                                           r"copying a param with shape torch\.Size\(\[96, 32\]\) from checkpoint, "
                                           r"the shape in current model is torch\.Size\(\[144, 48\]\)"):
        ours.load_state_dict(to_fused(exp.stock_state()))


def test_inconsistent_stock_sizes_name_the_key(exp):
    state = exp.stock_state()
    state["decoder.decoder.layers.4.layer.linear_v.weight"] = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"layers\.4\.layer\.linear_v\.weight: expected shape \(32, 32\) "
                                         r"for n_feat=32, found \(32, 16\)"):
        to_fused(state)


def test_half_converted_state_dict_names_the_missing_keys(exp):
    """A whole model's strict load names the absent stock key, as the stock model's does;
    the file converters refuse such a state dict."""
    state = exp.stock_state()
    del state["decoder.decoder.layers.4.layer.linear_k.weight"]
    missing = r"missing \['decoder\.decoder\.layers\.4\.layer\.linear_k\.weight'\]"
    messages = []
    for model in (espnet_asr.build(exp.root, "mha", seed=2)[0], exp.flash()):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict") as error:
            model.load_state_dict(state)
        messages.append(str(error.value).replace("ESPnetASRModel", ""))
    assert messages[0] == messages[1]
    assert '"decoder.decoder.layers.4.layer.linear_k.weight"' in messages[1]
    with pytest.raises(KeyError, match=missing):
        to_fused(state)
    fused = to_fused(exp.stock_state())
    del fused["decoder.decoder.layers.1.layer.linear_qkv.bias"]
    with pytest.raises(KeyError, match=r"missing \['decoder\.decoder\.layers\.1\.layer\.linear_qkv\.bias'\]"):
        to_stock(fused)


def test_both_layouts_are_refused(exp, caplog):
    state = to_fused(exp.stock_state())
    state["decoder.decoder.layers.1.layer.linear_q.weight"] = torch.zeros(32, 32)
    with pytest.raises(KeyError, match=r"at 'decoder\.decoder\.layers\.1\.layer\.' has both fused keys and stock "
                                       r"\['decoder\.decoder\.layers\.1\.layer\.linear_q\.weight'\]"):
        to_stock(state)
    # Foreign fused tensors next to stock ones (not the --init_param pattern) stay refused.
    mixed = dict(exp.stock_state(), **{"decoder.decoder.layers.1.layer.linear_qkv.weight": torch.zeros(96, 32),
                                            "decoder.decoder.layers.1.layer.linear_qkv.bias": torch.zeros(96)})
    with caplog.at_level(logging.WARNING, logger="espnet_mha.state_dict"):
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "decoder\.decoder\.layers\.1\.layer\.linear_q\.weight"'):
            exp.flash().load_state_dict(mixed)
    assert "has both stock keys and fused" in caplog.text


@pytest.mark.parametrize("key, shape, message", [
    ("weight", (96, 16), r"linear_qkv\.weight: expected shape \(3D, D\) = \(48, 16\), found \(96, 16\)"),
    ("bias", (32,), r"linear_qkv\.bias: expected shape \(96,\), found \(32,\)"),
])
def test_fused_shapes_are_checked_on_export(exp, key, shape, message):
    state = to_fused(exp.stock_state())
    state[f"decoder.decoder.layers.1.layer.linear_qkv.{key}"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        to_stock(state)


def test_argument_errors(exp):
    ours = exp.flash()
    prefixed = {f"module.{k}": v for k, v in exp.stock_state().items()}
    with pytest.raises(KeyError, match=r"the model's attention layer 'decoder\.decoder\.layers\.1\.layer\.' has "
                                       r"neither linear_q/k/v nor linear_qkv keys .*strip_wrapper_prefixes"):
        to_fused(prefixed, model=ours)
    with pytest.raises(ValueError, match=r"layer_pattern '\(' is not a valid regular expression"):
        to_fused(exp.stock_state(), layer_pattern="(")
    with pytest.raises(TypeError, match=r"looks like an ESPnet training checkpoint .*pass checkpoint\['model'\]"):
        load_stock_or_fused(ours, {"model": exp.stock_state(), "optimizers": []})
    with pytest.raises(ValueError, match=r"keys 'x\._orig_mod\.w' and 'x\.w' both become 'x\.w' without wrapper"):
        strip_wrapper_prefixes({"x._orig_mod.w": torch.zeros(1), "x.w": torch.zeros(1)})


def test_a_lightning_checkpoint_is_named_and_a_load_of_nothing_warns(exp, caplog):
    """An audit: a Lightning *.ckpt, or its state_dict (keys under "model."), loaded with
    strict=False into the ESPnet model left every weight as it was, without a word."""
    ours = exp.flash()
    lightning = {f"model.{k}": v for k, v in exp.stock_state().items()}
    with pytest.raises(TypeError, match=r"looks like a Lightning checkpoint .*pass its 'state_dict' entry"):
        load_stock_or_fused(ours, {"state_dict": lightning, "pytorch-lightning_version": "2.5.0"}, strict=False)
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        result = load_stock_or_fused(ours, lightning, strict=False)
    assert len(result.unexpected_keys) == len(lightning)
    assert "load_stock_or_fused loaded nothing: no key of the state dict is the model's (e.g. 'model." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        load_stock_or_fused(ours, exp.stock_state(), strict=False)
    assert "loaded nothing" not in caplog.text
