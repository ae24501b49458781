"""The cache of a called projection is remade when it changes between steps: weights, buffers, settings, hooks."""

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import LowRankLinear
from espnet_mha.testing import stock_and_flash
from projection_cases import Rows, seq


def test_a_cache_follows_changes_to_a_called_projection_within_an_utterance():
    """A linear_qkv the layer calls as a module: a hook added, or its extra parameters
    (LoRA's) updated in place, between two steps of one utterance recompute the cache, as
    the stock layer, which projects the memory every step, sees them (the old keys and
    values were reused)."""
    stock, ours = stock_and_flash(16, 4)
    ours.linear_qkv = LowRankLinear(ours.linear_qkv)
    stock.linear_q, stock.linear_k, stock.linear_v = (Rows(ours.linear_qkv, i * 16, (i + 1) * 16) for i in range(3))
    query, memory = seq(2, 16).double(), seq(1, 5, 16, seed=1).double()
    fp64 = dict(rtol=1e-10, atol=1e-10)

    def scale(module, args, output):
        return 0.5 * output

    def update_lora():
        with torch.no_grad():
            ours.linear_qkv.lora_b.mul_(2.0)

    def add_hook():
        ours.linear_qkv.register_forward_hook(scale)

    with torch.no_grad():
        _, state = ours.step(query[:1], None, memory=memory)
        for change in (update_lora, add_hook):
            ours.step(query, state[:1], memory=memory.expand(2, -1, -1))
            assert ours.last_cache == "reused"
            change()
            got, state = ours.step(query, state[:1], memory=memory.expand(2, -1, -1))
            assert ours.last_cache == "recomputed: the key/value weights changed since the state was made"
            torch.testing.assert_close(got, stock.step(query, None, memory=memory.expand(2, -1, -1))[0], **fp64)


class Scaled(nn.Module):
    """A parametrization with a constant held as a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))

    def forward(self, weight):
        return weight * self.scale


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("change", ["prune_mask", "parametrization_buffer", "weight_norm_hook"])
def test_a_cache_follows_the_buffers_of_a_called_projection(change):
    """A pruning mask or a parametrization's constant (buffers, not parameters) changed in
    place between two steps recomputes the cache, as for a parameter (it was reused).
    Pruning and the hook-based ``weight_norm`` set a new ``weight`` tensor before each
    call, which is no change: the cache is reused until the mask or ``weight_g`` changes."""
    from torch.nn.utils import parametrize, prune, weight_norm

    stock, ours = stock_and_flash(16, 4)
    if change == "prune_mask":
        prune.random_unstructured(ours.linear_qkv, "weight", amount=0.3)
        buffer = ours.linear_qkv.weight_mask
    elif change == "weight_norm_hook":
        weight_norm(ours.linear_qkv)
        buffer = ours.linear_qkv.weight_g
    else:
        parametrize.register_parametrization(ours.linear_qkv, "weight", Scaled())
        buffer = ours.linear_qkv.parametrizations.weight[0].scale
    assert_a_change_between_steps_recomputes(
        stock, ours, (lambda: buffer[:5].zero_()) if change != "parametrization_buffer" else (lambda: buffer.fill_(2.0)))


def assert_a_change_between_steps_recomputes(stock, ours, change):
    """The cache made through ours' called linear_qkv (stock reads its rows) is reused, then
    ``change()`` between two steps recomputes it, and the step computes as the stock step."""
    stock.linear_q, stock.linear_k, stock.linear_v = (Rows(ours.linear_qkv, i * 16, (i + 1) * 16) for i in range(3))
    query, memory = seq(2, 16).double(), seq(1, 5, 16, seed=1).double().expand(2, -1, -1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        ours.step(query, state[:1], memory=memory)
        assert ours.last_cache == "reused"
        change()
        got, _ = ours.step(query, state[:1], memory=memory)
    assert ours.last_cache == "recomputed: the key/value weights changed since the state was made"
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], rtol=1e-10, atol=1e-10)


class Adapter(nn.Module):
    """A LoRA-style wrapper: a child linear, and attributes that change the output: a
    number, a dict of numbers (as peft's ``scaling``) and a tensor that is neither a
    parameter nor a buffer."""

    def __init__(self, base):
        super().__init__()
        self.base, self.scale, self.scaling = base, 1.0, {"default": 1.0}
        self.options = SimpleNamespace(scale=1.0)
        self.ordered = OrderedDict(scale=1.0)
        self.gate = torch.ones((), dtype=base.weight.dtype)
        self.last_output = None  # what a recorder keeps: changed by every call, no change of the weights
        gen = torch.Generator().manual_seed(3)
        self.down = nn.Parameter(torch.randn(2, base.in_features, generator=gen, dtype=base.weight.dtype))
        self.up = nn.Parameter(torch.randn(base.out_features, 2, generator=gen, dtype=base.weight.dtype))

    def forward(self, x):
        scale = self.scale * self.scaling["default"] * self.options.scale * self.ordered["scale"]
        self.last_output = self.base(x) + scale * self.gate * (x @ self.down.t() @ self.up.t())
        return self.last_output


@pytest.mark.parametrize("change", ["attribute", "dict_attribute", "ordered_dict_attribute", "namespace_attribute",
                                    "tensor_attribute", "child_hook"])
def test_a_cache_follows_the_settings_and_child_hooks_of_a_called_projection(change):
    """An adapter switched off through an attribute (its scale, an entry of a dict, an
    OrderedDict or a SimpleNamespace of scales, or a tensor attribute set to 0), or a hook
    on a child of the projection, between two steps recomputes the cache (it was reused:
    1.4e-2 and 9.3e-2 off the stock step, which projects the memory every step; the
    containers and the tensor were not looked at). The output the adapter keeps of each
    call is no change: the cache is reused until the change (it was recomputed at every
    step once tensor attributes were keyed)."""
    stock, ours = stock_and_flash(16, 4)
    ours.linear_qkv = adapter = Adapter(ours.linear_qkv)

    def change_it():
        if change == "attribute":
            adapter.scale = 0.0
        elif change == "dict_attribute":
            adapter.scaling["default"] = 0.0
        elif change == "ordered_dict_attribute":
            adapter.ordered["scale"] = 0.0
        elif change == "namespace_attribute":
            adapter.options.scale = 0.0
        elif change == "tensor_attribute":
            adapter.gate.zero_()
        else:
            adapter.base.register_forward_hook(lambda module, args, output: 2 * output)

    assert_a_change_between_steps_recomputes(stock, ours, change_it)
