"""Our wrappers of ESPnet functions (espnet_mha.wrapping): installed once, again and again,
next to wrappers of others. A review found that a function someone put over ours was taken
for ESPnet's at the next install (the startup hook, our layer's import, each layer built):
ours then called theirs and theirs ours, without end; a functools.wraps copy of ours was
replaced, and never called again."""

import functools
import subprocess
import sys
import types

import pytest

from espnet_mha import wrapping


@pytest.fixture
def espnet_module(monkeypatch):
    """A stand-in for an ESPnet module with a function ``f`` (a module of this test's own:
    what is tested is how our installs treat the functions on it)."""
    module = types.ModuleType("espnet_mha_test_module")

    def f(x):
        return ["espnet", x]

    module.f = f
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def make_ours(originals):
    def f(x):
        return ["ours", *originals["f"](x)]

    return f


def test_replace_function_records_espnets_function_once(espnet_module):
    espnet, originals = espnet_module.f, {}
    ours = make_ours(originals)
    assert wrapping.replace_function(espnet_module.__name__, ours, originals) is espnet
    assert espnet_module.f is ours and wrapping.is_ours(ours) and originals["f"] is espnet
    assert wrapping.replace_function(espnet_module.__name__, ours, originals) is espnet
    assert espnet_module.f(1) == ["ours", "espnet", 1]
    reloaded = make_ours(originals)  # our module reloaded: a new wrapper replaces the old one
    assert wrapping.replace_function(espnet_module.__name__, reloaded, originals) is espnet
    assert espnet_module.f is reloaded and espnet_module.f(2) == ["ours", "espnet", 2]
    assert wrapping.replace_function("espnet_mha_no_such_module", ours, {}) is None


@pytest.mark.parametrize("kind", ["plain", "functools.wraps"])
def test_someone_elses_wrapper_over_ours_stays(espnet_module, kind):
    originals = {}
    ours = make_ours(originals)
    wrapping.replace_function(espnet_module.__name__, ours, originals)

    def theirs(x):
        return ["theirs", *ours(x)]

    if kind == "functools.wraps":
        theirs = functools.wraps(ours)(theirs)  # copies our mark
    espnet_module.f = theirs
    assert not wrapping.is_ours(theirs)
    assert wrapping.replace_function(espnet_module.__name__, make_ours(originals), originals) is not None
    assert espnet_module.f is theirs
    assert espnet_module.f(3) == ["theirs", "ours", "espnet", 3]  # not a RecursionError


def test_a_function_put_there_before_our_first_install_is_wrapped(espnet_module):
    """What is there at our first install is what ours calls (ESPnet's, or a wrapper of it)."""
    espnet = espnet_module.f
    espnet_module.f = lambda x: ["theirs", *espnet(x)]
    originals = {}
    wrapping.replace_function(espnet_module.__name__, make_ours(originals), originals)
    assert espnet_module.f(4) == ["ours", "theirs", "espnet", 4]


def test_replace_classmethod(monkeypatch):
    class Task:
        @classmethod
        def build(cls, x):
            return ["espnet", cls.__name__, x]

    class Child(Task):
        pass

    originals = {}

    def build(cls, x):
        return ["ours", *originals["build"](cls, x)]

    espnet = Task.__dict__["build"]
    assert wrapping.replace_classmethod(Task, build, originals) is espnet.__func__
    assert Child.build(1) == ["ours", "espnet", "Child", 1]
    ours = Task.__dict__["build"].__func__

    def theirs(cls, x):
        return ["theirs", *ours(cls, x)]

    Task.build = classmethod(theirs)
    assert wrapping.replace_classmethod(Task, build, originals) is espnet.__func__
    assert Child.build(2) == ["theirs", "ours", "espnet", "Child", 2]
    assert wrapping.replace_classmethod(Child, build, {}) is None  # not its own classmethod


def test_espnets_functions_with_a_users_wrapper_between_our_installs():
    """The review's case, with ESPnet's own functions: a user wraps what our startup hook (the
    filter) or our first layer (build_optimizers) installed; our layer's import and the next
    layer built install again."""
    code = """
import argparse, torch
import espnet2.torch_utils.load_pretrained_model as loader
from espnet2.tasks.abs_task import AbsTask
from espnet2.tasks.asr import ASRTask  # imports the S4 registry: the startup hook wraps the filter
ours, calls = loader.filter_state_dict, []
def mine(dst, src):
    calls.append("filter")
    return ours(dst, src)
loader.filter_state_dict = mine
from espnet_mha.layer import FlashMultiHeadedAttention
FlashMultiHeadedAttention(8, 2)
ours_build = AbsTask.__dict__["build_optimizers"].__func__
def mine_build(cls, args, model):
    calls.append("build")
    return ours_build(cls, args, model=model)
AbsTask.build_optimizers = classmethod(mine_build)
layer = FlashMultiHeadedAttention(8, 2)
assert loader.filter_state_dict is mine and AbsTask.__dict__["build_optimizers"].__func__ is mine_build
print(sorted(loader.filter_state_dict({"a.linear_qkv.weight": torch.zeros(6, 2)}, {"a.linear_q.weight": torch.ones(2, 2)})))
args = argparse.Namespace(optim="adam", optim_conf={}, sharded_ddp=False, exclude_weight_decay=False, freeze_param=[])
print(type(ASRTask.build_optimizers(args, model=layer)[0]).__name__, calls)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["['a.linear_q.weight']", "Adam ['filter', 'build']"]
