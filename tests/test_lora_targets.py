"""ESPnet's own LoRA (``create_adapter(model, "lora", conf)``, loralib) on a recipe model
with the stock ``mha``, ``flash_mha`` fused, and ``flash_mha`` with the stock parameters.

The usual ``target_modules: [linear_q, linear_v]`` adapt the stock layer's q and v; the
fused layer has no such modules, and the transformer encoder's own ``linear_q`` kept
ESPnet from raising, so its decoder attention got no adapter without a word (a review of
by-name ESPnet tools). It is now warned about (espnet_mha.lora_targets).
"""

import logging
import subprocess
import sys

import pytest
import torch

import espnet_asr
from espnet_mha import lora_targets

if not espnet_asr.espnet_has("espnet2.layers.create_adapter"):
    pytest.skip("this ESPnet has no adapters (espnet2.layers.create_adapter)", allow_module_level=True)
lora = pytest.importorskip("loralib", reason="ESPnet's LoRA needs loralib (the test extra installs it)")

DECODER_LAYERS = [prefix.rstrip(".") for prefix in espnet_asr.DECODER_ATTENTION]


def adapted(model):
    """Names of the modules ESPnet's LoRA swapped (loralib layers)."""
    return sorted(name for name, module in model.named_modules() if isinstance(module, lora.LoRALayer))


def build_and_adapt(tmp_path, attention, targets, caplog, **layer_options):
    from espnet2.layers.create_adapter import create_adapter

    model = espnet_asr.build(tmp_path, attention, seed=3, **layer_options)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.lora_targets"):
        create_adapter(model, "lora", {"rank": 2, "alpha": 2, "target_modules": targets})
    return model, [r.getMessage() for r in caplog.records if r.name == "espnet_mha.lora_targets"]


def test_stock_names_skip_fused_layers_with_a_warning(tmp_path, caplog):
    targets = ["linear_q", "linear_v"]
    stock, stock_lines = build_and_adapt(tmp_path, "mha", targets, caplog)
    fused, fused_lines = build_and_adapt(tmp_path, "flash_mha", targets, caplog)
    layout, layout_lines = build_and_adapt(tmp_path, "flash_mha", targets, caplog, state_dict_layout="stock")
    decoder = [f"{layer}.{name}" for layer in DECODER_LAYERS for name in ("linear_q", "linear_v")]
    assert set(decoder) < set(adapted(stock))
    assert adapted(layout) == adapted(stock)  # the same linears, as the stock layer's
    assert adapted(fused) == [name for name in adapted(stock) if name not in decoder]  # the encoder's only
    assert stock_lines == layout_lines == []
    assert len(fused_lines) == 1
    assert fused_lines[0].startswith(
        "espnet_mha: LoRA target_modules ['linear_q', 'linear_v'] select the stock layer's linear_q/k/v, which 2 "
        f"flash_mha layer(s) with the fused linear_qkv do not have: they get no adapter (first: '{DECODER_LAYERS[0]}')")
    assert "Add 'linear_qkv' to target_modules" in fused_lines[0]


@pytest.mark.parametrize("targets", [["v"], ["linear_q", "v"]])
def test_a_short_ending_that_matches_linear_qkv_warns(tmp_path, caplog, targets):
    """ESPnet matches target_modules by the end of a module's name: ``v`` selects the stock
    layer's linear_v, and also the fused linear_qkv, which then gets one pair for q, k and
    v together (an audit: outputs 1.2 apart from the stock layer's after training, without
    a word). Warned about; the stock-layout layer adapts as stock, without a warning. (The
    decoder alone: ``v`` would also select the encoder's ``conv``, which ESPnet refuses.)"""
    from espnet2.layers.create_adapter import create_adapter

    def adapt(**options):
        decoder = espnet_asr.build(tmp_path, options.pop("attention"), seed=3, **options)[0].decoder
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="espnet_mha.lora_targets"):
            create_adapter(decoder, "lora", {"rank": 2, "alpha": 2, "target_modules": targets})
        return adapted(decoder), [r.getMessage() for r in caplog.records if "by its ending" in r.getMessage()]

    layers = [layer.removeprefix("decoder.") for layer in DECODER_LAYERS]
    (stock, stock_lines), (fused, fused_lines) = adapt(attention="mha"), adapt(attention="flash_mha")
    layout, layout_lines = adapt(attention="flash_mha", state_dict_layout="stock")
    assert [f"{layer}.linear_qkv" for layer in layers] == [name for name in fused if name.endswith("linear_qkv")]
    assert layout == stock and stock_lines == layout_lines == []
    assert len(fused_lines) == 1 and fused_lines[0].startswith(
        f"espnet_mha: LoRA target_modules {targets} match the fused linear_qkv of 2 flash_mha layer(s) by its "
        f"ending (first: '{layers[0]}')")


@pytest.mark.parametrize("targets", [["linear_qkv"], ["linear_q", "linear_qkv"], [f"{DECODER_LAYERS[1]}.linear_qkv"]])
def test_a_target_that_names_linear_qkv_adapts_the_fused_layer(tmp_path, caplog, targets):
    """No warning for a layer whose linear_qkv is a target; the adapted layer decodes as
    before (loralib's B starts at zero) and trains its low-rank pair."""
    plain = espnet_asr.build(tmp_path, "flash_mha", seed=3)[0]
    model, lines = build_and_adapt(tmp_path, "flash_mha", targets, caplog)
    qkv = [f"{layer}.linear_qkv" for layer in DECODER_LAYERS if any(f"{layer}.linear_qkv".endswith(t) for t in targets)]
    assert [name for name in adapted(model) if name.endswith("linear_qkv")] == qkv
    unmatched = [layer for layer in DECODER_LAYERS if f"{layer}.linear_qkv" not in qkv]
    if "linear_q" in targets and unmatched:
        assert len(lines) == 1 and f"(first: '{unmatched[0]}')" in lines[0]
    else:
        assert lines == []
    layer = model.get_submodule(qkv[0].rpartition(".")[0])
    query, memory = torch.randn(2, 3, espnet_asr.D_MODEL), torch.randn(2, 5, espnet_asr.D_MODEL)
    reference = plain.get_submodule(qkv[0].rpartition(".")[0])
    torch.testing.assert_close(layer(query, memory)[0], reference(query, memory)[0], rtol=0, atol=1e-6)
    layer.train()  # loralib merges the pair into the weight in eval mode
    layer(query, memory)[0].square().sum().backward()
    assert layer.linear_qkv.lora_B.grad.abs().sum() > 0  # B starts at zero; its gradient does not


def test_a_direct_call_is_wrapped_too_and_the_wrapper_once(tmp_path, caplog):
    import espnet2.layers.create_adapter as create_adapter
    import espnet2.layers.create_adapter_fn as create_adapter_fn

    model = espnet_asr.build(tmp_path, "flash_mha", seed=3)[0]  # ESPnet's adapter module imported, a layer built
    assert create_adapter_fn.create_lora_adapter is lora_targets.create_lora_adapter
    assert create_adapter.create_adapter_fn_table["lora"] is lora_targets.create_lora_adapter
    assert lora_targets.install() and create_adapter_fn.create_lora_adapter is lora_targets.create_lora_adapter
    assert lora_targets._ORIGINAL["create_lora_adapter"].__module__ == create_adapter_fn.__name__
    with caplog.at_level(logging.WARNING, logger="espnet_mha.lora_targets"):
        create_adapter_fn.create_lora_adapter(model, 2, 2, 0.0, ["linear_k"])  # positional, as ESPnet allows
    assert "target_modules ['linear_k'] select" in caplog.text
    with pytest.raises(ValueError, match=r"Target modules \['nothing'\] not found in the base model"):
        create_adapter_fn.create_lora_adapter(model, target_modules=["nothing"])  # ESPnet's own error


def test_the_layer_does_not_import_espnets_adapter_code_and_wraps_it_once_espnet_has():
    """Importing ESPnet's adapter module imports its s3prl front-end and tries transformers
    (slow, or failing where a broken optional package raises more than ImportError; a
    review), so the layer waits for ESPnet to import it, as its tasks do before they build a
    model, and wraps it when a layer is built."""
    code = """
import sys
import espnet_mha.layer
assert "espnet2.layers.create_adapter_fn" not in sys.modules
import espnet2.layers.create_adapter as create_adapter
from espnet_mha import lora_targets
assert create_adapter.create_adapter_fn_table["lora"] is not lora_targets.create_lora_adapter
espnet_mha.layer.FlashMultiHeadedAttention(8, 2)
assert create_adapter.create_adapter_fn_table["lora"] is lora_targets.create_lora_adapter
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
