"""ESPnet's --init_param with our layer: partial loads, --ignore_init_mismatch's filter, the startup hook's wrappers."""

import logging
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

import espnet_asr
from checkpoint_cases import assert_same_outputs, assert_same_state
from espnet_mha.checkpoint import to_fused, to_stock

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


LAYER = "decoder.decoder.layers.1.layer"


@pytest.mark.parametrize("ignore_init_mismatch", [False, True])
@pytest.mark.parametrize("init_param,loaded", [("{path}", "decoder."), ("{path}:decoder:decoder", "decoder."),
                                               (f"{{path}}:{LAYER}:{LAYER}", f"{LAYER}.")])
def test_espnet_init_param_loads_a_stock_file(exp, init_param, loaded, ignore_init_mismatch):
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    ours = exp.flash()
    load_pretrained_model(init_param.format(path=exp.ave), ours, ignore_init_mismatch=ignore_init_mismatch)
    got, expected = ours.state_dict(), to_fused(exp.stock_state())
    for key in [key for key in expected if key.startswith(loaded)]:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("ignore_init_mismatch", [False, True])
def test_espnet_init_param_can_exclude_part_of_our_layer(exp, ignore_init_mismatch):
    """--init_param file:::<layer>.linear_q keeps the model's current q and loads the rest,
    for our layer as for the stock one (it raised missing/unexpected keys before)."""
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    stock = espnet_asr.build(exp.root, "mha", seed=5)[0]
    ours = exp.flash()
    ours.load_state_dict(stock.state_dict(), strict=True)
    for model in (stock, ours):
        load_pretrained_model(f"{exp.ave}:::decoder.decoder.layers.1.layer.linear_q", model,
                              ignore_init_mismatch=ignore_init_mismatch)
    assert_same_outputs(ours, stock)


@pytest.mark.parametrize("file_layout", ["stock", "fused"])
def test_espnet_init_param_with_ignore_init_mismatch_loads_either_layout(exp, tmp_path, file_layout, caplog):
    """ESPnet's filter drops the file's keys that the model's state_dict() lacks before
    loading, so a stock file's linear_q/k/v never reached the fused layer (q, k and v stayed
    random; an independent probe: logits 0.35 off). espnet_mha.init_param matches them."""
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    path = exp.ave
    if file_layout == "fused":
        path = tmp_path / "fused.pth"
        torch.save(to_fused(exp.stock_state()), path)
    ours = exp.flash()
    with caplog.at_level(logging.INFO, logger="espnet_mha.init_param"):
        load_pretrained_model(str(path), ours, ignore_init_mismatch=True)
    assert_same_outputs(ours, exp.model)
    assert ("kept 12 stock q/k/v keys of 2 layer(s)" in caplog.text) == (file_layout == "stock")
    assert "Filter out" not in caplog.text


@pytest.mark.parametrize("file_layout", ["stock", "fused"])
@pytest.mark.parametrize("attention", ["mha", "flash_mha"])
def test_fine_tuning_on_a_new_vocabulary_keeps_the_attention_weights(exp, tmp_path, monkeypatch, attention,
                                                                    file_layout, caplog):
    """The recipe way to fine-tune on other tokens: --init_param with --ignore_init_mismatch,
    which filters the output layers (their size changed) and must load everything else. The
    same load into a stock model with the new vocabulary is the reference, key by key."""
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    path = exp.ave
    if file_layout == "fused":
        path = tmp_path / "fused.pth"
        torch.save(to_fused(exp.stock_state()), path)
    monkeypatch.setattr(espnet_asr, "TOKENS", [*espnet_asr.TOKENS, "new1", "new2"])
    stock = espnet_asr.build(tmp_path, "mha", seed=4)[0]
    ours = espnet_asr.build(tmp_path, attention, seed=4)[0]
    load_pretrained_model(str(exp.ave), stock, ignore_init_mismatch=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_pretrained_model(str(path), ours, ignore_init_mismatch=True)
    filtered = sorted(re.findall(r"Filter out (\S+) from pretrained dict because of size mismatch", caplog.text))
    assert filtered == ["ctc.ctc_lo.bias", "ctc.ctc_lo.weight", "decoder.embed.weight", "decoder.output.bias",
                        "decoder.output.weight"]
    assert "name not found" not in caplog.text
    assert_same_state(to_stock(ours.state_dict()), stock.state_dict())


def init_param_in_a_fresh_process(config, path, out, report, **env):
    """As asr_train does, in a fresh interpreter (the startup hook's, nothing of ours imported by
    hand): build the model from ``config``, load ``path`` with --init_param and
    --ignore_init_mismatch, save the model's state dict to ``out``, then run ``report`` (a line
    of Python that prints what the test checks). INFO logging goes to stderr.

    Returns:
        the finished ``subprocess.CompletedProcess`` (exit status 0 asserted).
    """
    code = (
        "import logging, sys, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from espnet2.tasks.asr import ASRTask\n"
        "from espnet2.torch_utils.load_pretrained_model import load_pretrained_model\n"
        f"model, _ = ASRTask.build_model_from_file({str(config)!r}, None, 'cpu')\n"
        f"load_pretrained_model({str(path)!r}, model, ignore_init_mismatch=True)\n"
        f"torch.save(model.state_dict(), {str(out)!r})\n"
        f"{report}\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_an_espnet_entry_point_gets_the_filter_through_the_startup_hook(exp, tmp_path):
    """As asr_train: the model is built from a config naming flash_mha (our layer imported by
    ESPnet's registry, nothing imported by hand), then --init_param with
    --ignore_init_mismatch loads a stock file."""
    out = tmp_path / "loaded.pth"
    result = init_param_in_a_fresh_process(
        exp.flash_config, exp.ave, out,
        "print(sorted(m for m in sys.modules if m == 'espnet_mha' or m.startswith('espnet_mha.init')))")
    assert "['espnet_mha', 'espnet_mha.init_param']" in result.stdout
    loaded, expected = torch.load(out, weights_only=True), to_fused(exp.stock_state())
    for key in [key for key in expected if ".layer.linear_qkv." in key]:
        assert torch.equal(loaded[key], expected[key]), key


def test_a_stock_model_gets_the_filter_without_our_layer(exp, tmp_path):
    """A stock-only process (a config naming mha, our layer never built or imported) fine-tuning
    from a flash_mha file with --init_param --ignore_init_mismatch: ESPnet's filter dropped the
    fused linear_qkv, so q, k and v kept their random initialisation. The startup hook wraps
    the filter when ESPnet imports the S4 layer registry."""
    fused, out = tmp_path / "fused.pth", tmp_path / "loaded.pth"
    torch.save(to_fused(exp.stock_state()), fused)
    report = "print('layer imported:', 'espnet_mha.layer' in sys.modules)"
    result = init_param_in_a_fresh_process(exp.stock_config, fused, out, report)
    assert "layer imported: False" in result.stdout
    assert "split 4 fused linear_qkv keys" in result.stderr and "Filter out" not in result.stderr
    assert_same_state(torch.load(out, weights_only=True), exp.stock_state())
    # ESPNET_MHA_NO_HOOK leaves ESPnet's filter as it is (it drops the fused keys, with its warnings).
    result = init_param_in_a_fresh_process(exp.stock_config, fused, out, report, ESPNET_MHA_NO_HOOK="1")
    assert "name not found" in result.stderr and "split" not in result.stderr


def test_match_layouts_leaves_a_layer_with_both_layouts_in_the_file_to_espnet(caplog):
    """A file with both layouts for one layer is no checkpoint of either layer: ESPnet's filter
    decides, as before (the layer's load would warn and refuse the mix)."""
    from espnet_mha.init_param import match_layouts

    d = 4
    fused_model = {"a.linear_qkv.weight": torch.zeros(3 * d, d), "a.linear_qkv.bias": torch.zeros(3 * d)}
    both = {"a.linear_q.weight": torch.ones(d, d), "a.linear_qkv.bias": torch.ones(3 * d)}
    assert match_layouts(fused_model, both) == (both, set())
    wrong_shape = {"a.linear_q.weight": torch.ones(d + 1, d)}
    assert match_layouts(fused_model, wrong_shape) == (wrong_shape, set())
    stock_model = {f"a.{name}.weight": torch.zeros(d, d) for name in ("linear_q", "linear_k", "linear_v")}
    state, kept = match_layouts(stock_model, {"a.linear_qkv.weight": torch.arange(3.0 * d * d).view(3 * d, d)})
    assert list(state) == list(stock_model) and not kept
    assert torch.equal(state["a.linear_v.weight"], torch.arange(2.0 * d * d, 3.0 * d * d).view(d, d))


def test_match_layouts_passes_keys_that_are_not_names_to_espnet():
    """ESPnet's filter drops such a key with its warning; the regexes must not see it (a review)."""
    from espnet_mha.init_param import filter_state_dict

    dst = {"a.linear_qkv.weight": torch.zeros(6, 2)}
    src = {3: torch.ones(1), "a.linear_q.weight": torch.ones(2, 2)}
    assert list(filter_state_dict(dst, src)) == ["a.linear_q.weight"]


def test_the_wrappers_survive_a_reload_and_a_fresh_import_of_the_package():
    """A fresh import of our package in the same process (its modules purged from sys.modules)
    found no ESPnet function to keep and broke ESPnet's filter for every model (a review).
    The LoRA wrapper is checked where this ESPnet has adapters."""
    adapters = espnet_asr.espnet_has("espnet2.layers.create_adapter")
    code = """
import importlib, sys, torch
ADAPTERS = %r
if ADAPTERS:
    import espnet2.layers.create_adapter  # as ESPnet's tasks do
import espnet_mha.layer
import espnet2.torch_utils.load_pretrained_model as loader
for name in [n for n in sys.modules if n == "espnet_mha" or n.startswith("espnet_mha.")]:
    del sys.modules[name]
import espnet_mha.layer
importlib.reload(sys.modules["espnet_mha.init_param"]).install()
importlib.reload(sys.modules["espnet_mha.lora_targets"]).install()
from espnet_mha import init_param, lora_targets
assert loader.filter_state_dict is init_param.filter_state_dict
assert init_param._ORIGINAL["filter_state_dict"].__module__ == loader.__name__
if ADAPTERS:
    import espnet2.layers.create_adapter_fn as adapter_fn
    assert adapter_fn.create_lora_adapter is lora_targets.create_lora_adapter
    assert lora_targets._ORIGINAL["create_lora_adapter"].__module__ == adapter_fn.__name__
    assert espnet2.layers.create_adapter.create_adapter_fn_table["lora"] is lora_targets.create_lora_adapter
print(sorted(loader.filter_state_dict({"a.linear_qkv.weight": torch.zeros(6, 2)},
                                      {"a.linear_q.weight": torch.ones(2, 2), "b": torch.ones(1)})))
""" % adapters
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("['a.linear_q.weight']")


def test_the_filter_wrapper_is_installed_once_by_the_layer():
    import espnet2.torch_utils.load_pretrained_model as espnet_loader

    from espnet_mha import init_param

    assert espnet_loader.filter_state_dict is init_param.filter_state_dict and init_param.install()
    assert espnet_loader.filter_state_dict is init_param.filter_state_dict
    assert init_param._ORIGINAL["filter_state_dict"].__module__ == espnet_loader.__name__
    assert pickle.loads(pickle.dumps(espnet_loader.filter_state_dict)) is init_param.filter_state_dict
