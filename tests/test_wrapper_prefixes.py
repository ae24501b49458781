"""Wrapped models' state dicts (compile, DataParallel, DDP): prefixes stripped on load; our compiled layer's plain keys."""

import pytest
import torch

import espnet_asr
from checkpoint_cases import assert_same_outputs, assert_same_state
from espnet_mha.checkpoint import load_stock_or_fused, to_fused
from espnet_mha.checkpoint_keys import strip_wrapper_prefixes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_our_compiled_layer_saves_plain_keys(exp):
    # The layer compiles module-level functions and never wraps itself (see compile_policy).
    ours = exp.flash(compile=True)
    assert ours.decoder.decoder.layers[1].layer.compile_setting is True
    assert list(ours.state_dict()) == list(exp.flash().state_dict())
    assert not [key for key in ours.state_dict() if "_orig_mod" in key]
    ours.load_state_dict(torch.load(exp.ave, weights_only=True), strict=True)


@pytest.mark.slow
def test_our_compiled_layer_saves_plain_keys_after_running_compiled(exp):
    ours = exp.flash(compile=True)
    ours.load_state_dict(torch.load(exp.ave, weights_only=True), strict=True)
    assert_same_outputs(ours, exp.model)
    assert list(ours.state_dict()) == list(exp.flash().state_dict())


@pytest.fixture
def process_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


WRAPPERS = {
    "compile": (torch.compile, ["_orig_mod."]),
    "dataparallel": (torch.nn.DataParallel, ["module."]),
    "ddp": (ddp, ["module."]),
    "ddp-of-compiled": (lambda m: ddp(torch.compile(m)), ["module.", "_orig_mod."]),
    "compiled-ddp": (lambda m: torch.compile(ddp(m)), ["_orig_mod.", "module."]),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_state_dicts_load(exp, wrapper, process_group):
    wrap, prefixes = WRAPPERS[wrapper]
    saved = wrap(espnet_asr.build(exp.root, "mha", seed=1)[0]).state_dict()
    assert next(iter(saved)).startswith("".join(prefixes))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict"):
        exp.flash().load_state_dict(saved)  # plain load_state_dict never strips prefixes
    clean, stripped = strip_wrapper_prefixes(saved)
    assert stripped == prefixes
    assert_same_state(clean, exp.stock_state())
    expected = to_fused(exp.stock_state())
    ours = exp.flash()
    load_stock_or_fused(ours, saved)
    assert_same_state(ours.state_dict(), expected)
    target = exp.flash()
    load_stock_or_fused(wrap(target), to_fused(saved))  # into a wrapped model, from a fused file
    assert_same_state(target.state_dict(), expected)


def test_load_stock_or_fused_unfuses_for_a_stock_model(exp):
    stock = espnet_asr.build(exp.root, "mha", seed=5)[0]
    load_stock_or_fused(stock, {f"module.{k}": v for k, v in to_fused(exp.stock_state()).items()})
    assert_same_state(stock.state_dict(), exp.stock_state())


def test_strip_wrapper_prefixes_inner_compiled_module_and_metadata():
    state = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state.add_module("1", torch.compile(torch.nn.Linear(2, 2)))
    saved = torch.nn.DataParallel(state).state_dict()
    assert list(saved) == ["module.0.weight", "module.0.bias", "module.1._orig_mod.weight", "module.1._orig_mod.bias"]
    clean, stripped = strip_wrapper_prefixes(saved)
    assert list(clean) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert stripped == ["module.", "_orig_mod."]
    assert set(clean._metadata) == {"", "0", "1"}
    assert strip_wrapper_prefixes({"module": torch.zeros(1)})[1] == []  # a key, not a prefix
    assert strip_wrapper_prefixes({"module.a": torch.zeros(1), "b": torch.zeros(1)})[1] == []
