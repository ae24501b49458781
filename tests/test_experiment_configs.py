"""config.yaml converted with the weights: attention layers' names and options, and freeze_param."""

import pytest
import torch
import yaml

from espnet_mha.checkpoint_keys import fused_layers
from espnet_mha.configs import fused_config, stock_config
from espnet_mha.convert import ConversionError
from espnet_mha.export import convert_experiment, export_experiment
from experiment_cases import experiment

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_an_mha_layer_with_our_options_is_made_stock_too(tmp_path):
    """Under ESPNET_MHA_REPLACE_MHA=1, mha builds our layer and reads our options."""
    layer = {"_name_": "mha", "n_head": 2, "backend": "sdpa", "state_dict_layout": "stock"}
    assert stock_config({"layer": [layer]}) == ({"layer": [{"_name_": "mha", "n_head": 2}]}, ["layer[0]"])
    assert stock_config({"layer": [{"_name_": "mha", "n_head": 2}]}) == ({"layer": [{"_name_": "mha", "n_head": 2}]},
                                                                          [])
    # The mha name ignores causal (as the stock layer does): dropped, where it was refused
    # as if the layer had been causal (fused_config drops it too).
    assert stock_config({"layer": [{"_name_": "mha", "causal": True}]}) == ({"layer": [{"_name_": "mha"}]},
                                                                             ["layer[0]"])


def test_fused_config_makes_every_attention_layer_flash_mha_with_the_fused_parameters():
    """A layer built with the stock parameters would split the fused files again, and its
    parameter list would not fit the converted optimizer state (a probe's resume failed)."""
    config = {"decoder_conf": {"layer": [{"_name_": "s4"},
                                         {"_name_": "flash_mha", "n_head": 4, "state_dict_layout": "stock"},
                                         {"_name_": "mha", "n_head": 2, "state_dict_layout": "stock"},
                                         {"_name_": "flash_mha", "n_head": 4, "causal": False},
                                         # The stock layer ignores causal; flash_mha would apply it.
                                         {"_name_": "mha", "n_head": 2, "causal": True}]}}
    new, paths = fused_config(config)
    assert new["decoder_conf"]["layer"] == [{"_name_": "s4"}, {"_name_": "flash_mha", "n_head": 4},
                                            {"_name_": "flash_mha", "n_head": 2},
                                            {"_name_": "flash_mha", "n_head": 4, "causal": False},
                                            {"_name_": "flash_mha", "n_head": 2}]
    assert paths == ["decoder_conf.layer[1]", "decoder_conf.layer[2]", "decoder_conf.layer[4]"]
    assert config["decoder_conf"]["layer"][1]["state_dict_layout"] == "stock"  # a copy


def test_freeze_param_follows_the_layout(tmp_path):
    """config.yaml's freeze_param names parameters: after converting, linear_q/k/v (or
    linear_qkv) of our layers would freeze nothing, and a resumed or fine-tuned run trained
    what the original froze (a probe: q/k/v 2e-3 off after two Adam steps). The entries are
    rewritten; part of one layer's q/k/v cannot be frozen in the fused layout."""
    src = experiment(tmp_path / "exp")
    prefix = fused_layers(torch.load(src / "1epoch.pth", weights_only=True))[0].rstrip(".")
    config = yaml.safe_load((src / "config.yaml").read_text())
    others = ["encoder", "decoder.decoder.layers.0"]
    (src / "config.yaml").write_text(yaml.safe_dump(config | {"freeze_param": [others[0], f"{prefix}.linear_qkv",
                                                                               others[1]]}))
    report = export_experiment(src, tmp_path / "stock")
    stock_names = yaml.safe_load((tmp_path / "stock" / "config.yaml").read_text())["freeze_param"]
    assert stock_names == [others[0], *(f"{prefix}.linear_{x}" for x in "qkv"), others[1]]
    assert f"freeze_param: {prefix}.linear_qkv -> {', '.join(stock_names[1:4])}" in report.lines()
    convert_experiment(tmp_path / "stock", tmp_path / "fused", to="fused")
    assert yaml.safe_load((tmp_path / "fused" / "config.yaml").read_text())["freeze_param"] == [
        others[0], f"{prefix}.linear_qkv", others[1]]
    config = yaml.safe_load((tmp_path / "stock" / "config.yaml").read_text())
    (tmp_path / "stock" / "config.yaml").write_text(yaml.safe_dump(config | {"freeze_param": stock_names[:3]}))
    with pytest.raises(ConversionError, match=rf"freeze_param freezes {prefix}\.linear_q, {prefix}\.linear_k but not "
                                              rf"all of q, k and v of {prefix}: the fused linear_qkv is frozen"):
        convert_experiment(tmp_path / "stock", tmp_path / "partial", to="fused")
    assert not (tmp_path / "partial" / "config.yaml").exists()
