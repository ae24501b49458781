"""flash_mha in ESPnet's layer registry: import, mha override, startup hook."""

import os
import subprocess
import sys

import pytest
from espnet2.asr.state_spaces import registry, utils

import espnet_mha
from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.registration import ENV_REPLACE_MHA, LAYER_PATH, MHA_LAYER_PATH, STOCK_LAYER_PATH, apply_environment


@pytest.fixture(autouse=True)
def restore_registry(monkeypatch):
    monkeypatch.delenv(ENV_REPLACE_MHA, raising=False)  # use_for_mha() sets it; monkeypatch restores it
    yield
    espnet_mha.restore_mha()


def test_import_registers_flash_mha():
    assert registry.layer["flash_mha"] == LAYER_PATH
    layer = utils.instantiate(registry.layer, {"_name_": "flash_mha", "n_head": 2}, 8)
    assert isinstance(layer, FlashMultiHeadedAttention)


def test_use_for_mha_and_restore_are_idempotent():
    espnet_mha.use_for_mha()
    espnet_mha.use_for_mha()
    assert espnet_mha.mha_is_ours()
    assert isinstance(utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2}, 8), FlashMultiHeadedAttention)
    espnet_mha.restore_mha()
    espnet_mha.restore_mha()
    assert registry.layer["mha"] == STOCK_LAYER_PATH
    assert not isinstance(utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2}, 8), FlashMultiHeadedAttention)
    assert registry.layer["flash_mha"] == LAYER_PATH


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("ESPNET_MHA_REPLACE_MHA", "1")
    apply_environment()
    assert espnet_mha.mha_is_ours()
    # The usual spellings of on/off, as ESPNET_MHA_COMPILE takes them ("true" failed the import).
    for value, ours in (("yes", True), (" TRUE ", True), ("Off", False), ("0", False), ("", False)):
        espnet_mha.restore_mha()
        monkeypatch.setenv("ESPNET_MHA_REPLACE_MHA", value)
        apply_environment()
        assert espnet_mha.mha_is_ours() == ours, value
    monkeypatch.setenv("ESPNET_MHA_REPLACE_MHA", "maybe")
    with pytest.raises(ValueError, match=r"ESPNET_MHA_REPLACE_MHA='maybe' must be 0/1 \(or true/false, yes/no, "
                                         r"on/off\)"):
        apply_environment()


def _fresh_python(code, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPNET_MHA")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True).stdout


def test_startup_hook_registers_without_importing_us_first():
    """What `python -m espnet2.bin.asr_train` sees: flash_mha is there, nothing imported at start."""
    out = _fresh_python(
        "import sys; assert 'espnet_mha' not in sys.modules and 'torch' not in sys.modules;"
        "from espnet2.asr.state_spaces import registry; print(registry.layer['flash_mha'], registry.layer['mha'])"
    )
    assert out.split() == [LAYER_PATH, STOCK_LAYER_PATH]
    out = _fresh_python("from espnet2.asr.state_spaces import registry; print(registry.layer['mha'])",
                        ESPNET_MHA_REPLACE_MHA="1")
    assert out.strip() == MHA_LAYER_PATH
    for value, on in (("1", False), ("yes", False), ("Off", True), ("false", True), ("0", True)):
        out = _fresh_python("from espnet2.asr.state_spaces import registry; print('flash_mha' in registry.layer)",
                            ESPNET_MHA_NO_HOOK=value)
        assert out.strip() == str(on), value  # "off" disabled the hook (a probe)


def test_the_startup_hook_leaves_processes_without_the_s4_registry_alone():
    """ESPnet's task base (every task's, TTS included) and its --init_param loader import
    nothing of ours: only the S4 registry's import does (a review: a hook that also waited
    for the loader made every ESPnet task import us, and fail on a bad ESPNET_MHA_* value)."""
    out = _fresh_python("import sys, espnet2.tasks.abs_task, espnet2.torch_utils.load_pretrained_model as loader;"
                        "print('espnet_mha' in sys.modules, loader.filter_state_dict.__module__)",
                        ESPNET_MHA_REPLACE_MHA="maybe")
    assert out.splitlines()[-1] == "False espnet2.torch_utils.load_pretrained_model"
    out = _fresh_python("import espnet2.torch_utils.load_pretrained_model as loader;"
                        "from espnet2.asr.state_spaces import registry; print(loader.filter_state_dict.__module__)")
    assert out.splitlines()[-1] == "espnet_mha.init_param"


def test_import_applies_the_environment_without_the_startup_hook():
    out = _fresh_python("import espnet_mha; from espnet2.asr.state_spaces import registry; print(registry.layer['mha'])",
                        ESPNET_MHA_NO_HOOK="1", ESPNET_MHA_REPLACE_MHA="1")
    assert out.strip() == MHA_LAYER_PATH


def _child_mha_path():
    return "__import__('espnet2.asr.state_spaces.registry', fromlist=['layer']).layer['mha']"


def test_use_for_mha_reaches_spawned_workers():
    """ESPnet's --multiprocessing_distributed starts workers with the spawn method: they
    build their registry at startup, from the environment use_for_mha() sets."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    espnet_mha.use_for_mha()
    with context.Pool(1) as pool:
        assert pool.apply(eval, (_child_mha_path(),)) == MHA_LAYER_PATH
    espnet_mha.restore_mha()
    with context.Pool(1) as pool:
        assert pool.apply(eval, (_child_mha_path(),)) == STOCK_LAYER_PATH


def test_mha_builds_our_layer_saving_the_stock_layout():
    espnet_mha.use_for_mha()
    layer = utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2}, 8)
    assert isinstance(layer, FlashMultiHeadedAttention) and layer.state_dict_layout == "stock"
    assert "linear_q.weight" in layer.state_dict() and "linear_qkv.weight" not in layer.state_dict()
    assert utils.instantiate(registry.layer, {"_name_": "flash_mha", "n_head": 2}, 8).state_dict_layout == "fused"


@pytest.mark.parametrize("causal", [True, "yes", 2], ids=["true", "yes", "two"])
def test_the_mha_name_ignores_causal_as_the_stock_layer_does(caplog, causal):
    """The stock layer drops unknown options, so an mha entry with causal: true is
    cross-attention to the memory; under use_for_mha() it became causal self-attention
    (an S4Decoder's logits 0.67 off). Ignored, with a warning; also a value that
    flash_mha refuses ("yes", 2), which the stock layer drops as well (an audit found them
    refused)."""
    import torch

    stock = utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2, "causal": causal}, 8).double()
    espnet_mha.use_for_mha()
    ours = utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2, "causal": causal}, 8).double()
    assert f"the mha name ignores causal: {causal!r}" in caplog.text and not ours.causal
    ours.load_state_dict(stock.state_dict())
    gen = torch.Generator().manual_seed(0)
    query, memory = (torch.randn(2, t, 8, generator=gen, dtype=torch.float64) for t in (3, 5))
    torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=1e-10, atol=1e-10)


def test_the_mha_name_with_the_fused_layout_warns(caplog):
    """An mha entry asking for state_dict_layout: fused gets it, and a warning: its checkpoints
    are fused under a config that says mha, which the stock layer loads with strict=False,
    dropping linear_qkv (an audit)."""
    espnet_mha.use_for_mha()
    layer = utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2, "state_dict_layout": "fused"}, 8)
    assert layer.state_dict_layout == "fused"
    assert "the mha name with state_dict_layout: fused writes fused checkpoints" in caplog.text
    caplog.clear()
    utils.instantiate(registry.layer, {"_name_": "mha", "n_head": 2}, 8)
    assert "state_dict_layout: fused" not in caplog.text


def test_an_unknown_attribute_of_the_package_is_named():
    """The package's module __getattr__ loads the layer and helpers on first use; any other
    name raises the AttributeError that hasattr and getattr's default rely on."""
    with pytest.raises(AttributeError, match=r"^module 'espnet_mha' has no attribute 'no_such_name'$"):
        getattr(espnet_mha, "no_such_name")
    assert not hasattr(espnet_mha, "no_such_name")
