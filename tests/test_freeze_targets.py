"""ESPnet's ``--freeze_param`` on a recipe model with the stock ``mha``, ``flash_mha`` fused,
and ``flash_mha`` with the stock parameters.

An entry naming the stock layer's ``linear_q`` freezes its query projection; the fused
layer has no parameter of that name and ESPnet says nothing about an entry that matches
nothing, so its q/k/v stayed trainable without a word. It is now warned about
(espnet_mha.freeze_targets), through ESPnet's ``asr_train`` itself.
"""

import logging
import re
import subprocess
import sys

import pytest
import yaml

import espnet_asr
from espnet_mha import freeze_targets

DECODER_LAYERS = [prefix.rstrip(".") for prefix in espnet_asr.DECODER_ATTENTION]


def dry_run(tmp_path, attention, freeze_param, **layer_options):
    """``python -m espnet2.bin.asr_train --dry_run true`` (builds the model, freezes, builds the
    optimizer, writes config.yaml, stops): (names ESPnet froze, our warnings)."""
    config, tokens = tmp_path / f"{attention}.yaml", tmp_path / "tokens.txt"
    config.write_text(yaml.safe_dump(espnet_asr.recipe_config(attention, **layer_options)))
    tokens.write_text("\n".join(espnet_asr.TOKENS) + "\n")
    data = str(tmp_path / "absent")
    command = [sys.executable, "-m", "espnet2.bin.asr_train", "--dry_run", "true", "--config", str(config),
               "--output_dir", str(tmp_path / f"exp_{attention}"), "--token_list", str(tokens),
               "--train_data_path_and_name_and_type", f"{data},speech,sound",
               "--valid_data_path_and_name_and_type", f"{data},speech,sound",
               "--train_shape_file", data, "--valid_shape_file", data, "--freeze_param", *freeze_param]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    frozen = re.findall(r"INFO: Setting (\S+)\.requires_grad = False", result.stderr)
    return frozen, re.findall(r"WARNING: (espnet_mha: --freeze_param .*)", result.stderr)


@pytest.mark.slow
def test_asr_train_warns_when_an_entry_names_fused_q_k_v(tmp_path):
    """The real entry point, stock against fused: the same entries freeze the stock layer's q
    and the whole of the second layer; for the fused layer ESPnet freezes only the second
    layer, and we say so."""
    freeze = [f"{DECODER_LAYERS[0]}.linear_q", DECODER_LAYERS[1]]
    stock, stock_lines = dry_run(tmp_path, "mha", freeze)
    fused, fused_lines = dry_run(tmp_path, "flash_mha", freeze)
    assert stock == [f"{DECODER_LAYERS[0]}.linear_q.{p}" for p in ("weight", "bias")] + [
        f"{DECODER_LAYERS[1]}.{m}.{p}" for m in ("linear_q", "linear_k", "linear_v", "linear_out")
        for p in ("weight", "bias")]
    assert fused == [f"{DECODER_LAYERS[1]}.{m}.{p}" for m in ("linear_qkv", "linear_out") for p in ("weight", "bias")]
    assert stock_lines == [] and len(fused_lines) == 1
    assert fused_lines[0] == (
        f"espnet_mha: --freeze_param {freeze} names the stock layer's linear_q/k/v, which 1 flash_mha layer(s) with "
        f"the fused linear_qkv do not have: their q, k and v stay trainable (first: '{DECODER_LAYERS[0]}'). Freeze "
        f"'{DECODER_LAYERS[0]}.linear_qkv' (q, k and v together), or build those layers with state_dict_layout: "
        "stock (the stock linear_q/k/v, frozen one by one as in the stock layer)")


@pytest.mark.parametrize("entries, missed", [
    ([f"{DECODER_LAYERS[0]}.linear_q"], DECODER_LAYERS[:1]),
    ([f"{DECODER_LAYERS[1]}.linear_v.bias"], DECODER_LAYERS[1:]),
    ([f"{layer}.linear_k.weight" for layer in DECODER_LAYERS], DECODER_LAYERS),
    ([f"{DECODER_LAYERS[0]}.linear_q", f"{DECODER_LAYERS[0]}.linear_qkv"], []),  # the fused layer is frozen too
    ([f"{DECODER_LAYERS[0]}.linear_q", f"{DECODER_LAYERS[0]}.linear_qkv.bias"], DECODER_LAYERS[:1]),  # not its weight
    ([f"{DECODER_LAYERS[0]}.linear_k.bias", f"{DECODER_LAYERS[0]}.linear_qkv.bias"], []),
    ([DECODER_LAYERS[0]], []), (["decoder"], []), ([f"{DECODER_LAYERS[0]}.linear_out"], []),
    (["decoder.decoder.layers.1.layer.linear"], []),  # no parameter of either layer: ESPnet's rule matches whole names
    ([], []),
], ids=["linear_q", "linear_v.bias", "both_layers", "with_linear_qkv", "with_fused_bias_only", "biases", "layer", "decoder", "linear_out",
        "partial_name", "none"])
def test_missed_layers_follows_espnets_rule(tmp_path, entries, missed):
    fused = espnet_asr.build(tmp_path, "flash_mha")[0]
    assert freeze_targets.missed_layers(fused, entries) == missed
    layout = espnet_asr.build(tmp_path, "flash_mha", state_dict_layout="stock")[0]
    assert freeze_targets.missed_layers(layout, entries) == []  # frozen one by one, as the stock layer


def test_the_wrapper_returns_espnets_optimizers(tmp_path, caplog):
    """ESPnet's build_optimizers runs as it is, after the warning."""
    from espnet2.tasks.asr import ASRTask

    model, args = espnet_asr.build(tmp_path, "flash_mha")
    args.freeze_param = [f"{DECODER_LAYERS[1]}.linear_k"]
    with caplog.at_level(logging.WARNING, logger="espnet_mha.freeze_targets"):
        optimizers = ASRTask.build_optimizers(args, model=model)
    assert f"(first: '{DECODER_LAYERS[1]}')" in caplog.text
    original = freeze_targets._ORIGINAL["build_optimizers"](ASRTask, args, model=model)
    assert [type(o) for o in optimizers] == [type(o) for o in original]
    assert [p for g in optimizers[0].param_groups for p in g["params"]] == list(model.parameters())
    caplog.clear()
    args.freeze_param = []
    with caplog.at_level(logging.WARNING, logger="espnet_mha.freeze_targets"):
        ASRTask.build_optimizers(args, model=model)
    assert caplog.text == ""


def test_install_is_idempotent_and_survives_a_reload():
    code = """
import importlib
import espnet2.tasks.abs_task as abs_task
import espnet_mha.layer
from espnet_mha import freeze_targets
espnet_mha.layer.FlashMultiHeadedAttention(8, 2)  # installs
wrapped = abs_task.AbsTask.__dict__["build_optimizers"].__func__
assert wrapped is freeze_targets.build_optimizers
assert freeze_targets.install() and freeze_targets.install()
reloaded = importlib.reload(freeze_targets)
assert reloaded.install()
assert reloaded._ORIGINAL["build_optimizers"].__module__ == abs_task.__name__
assert abs_task.AbsTask.__dict__["build_optimizers"].__func__ is reloaded.build_optimizers
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "ok"  # after ESPnet's own prints


def test_nothing_is_installed_before_espnet_imports_its_task_module():
    code = ("import sys, espnet_mha.layer; espnet_mha.layer.FlashMultiHeadedAttention(8, 2);"
            "from espnet_mha import freeze_targets;"
            "print('espnet2.tasks.abs_task' in sys.modules, freeze_targets.install())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].split() == ["False", "False"]
