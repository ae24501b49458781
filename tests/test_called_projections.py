"""Projections that are no plain nn.Linear (parametrized, subclassed, hooked, tensor subclasses) are called as modules."""

import logging

import pytest
import torch
from torch import nn

from conftest import LowRankLinear
from espnet_mha import quantized
from espnet_mha.testing import stock_and_flash
from projection_cases import Rows, seq


def test_parametrized_linears_are_called_as_modules():
    """Any linear that holds no plain ``weight`` (here weight_norm, a torch parametrization)
    is called as a module. Weight norm is per output row, so on the fused projection
    it equals the stock layer's three normalized linears."""
    from torch.nn.utils.parametrizations import weight_norm

    stock, ours = stock_and_flash(16, 4)
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        setattr(stock, name, weight_norm(getattr(stock, name)))
    ours.linear_qkv, ours.linear_out = weight_norm(ours.linear_qkv), weight_norm(ours.linear_out)
    query = seq(2, 3, 16).double().requires_grad_(True)
    memory = seq(2, 5, 16, seed=1).double()
    fp64 = dict(rtol=1e-10, atol=1e-10)
    out, _ = ours(query, memory)
    torch.testing.assert_close(out, stock(query, memory)[0], **fp64)
    (grad,) = torch.autograd.grad(out.sum(), query)
    torch.testing.assert_close(grad, torch.autograd.grad(stock(query, memory)[0].sum(), query)[0], **fp64)
    got, state = ours.step(query[:, 0].detach(), None, memory=memory)
    torch.testing.assert_close(got, stock.step(query[:, 0].detach(), None, memory=memory)[0], **fp64)
    got, _ = ours.step(query[:, 1].detach(), state, memory=memory)
    torch.testing.assert_close(got, stock.step(query[:, 1].detach(), None, memory=memory)[0], **fp64)


def test_a_deep_copy_uses_its_own_parametrized_linears():
    """The module projections remembered on the first call referred to the original's
    modules: a copy made after it computed (and trained) with the original's weights."""
    import copy

    from torch.nn.utils.parametrizations import weight_norm

    stock, ours = stock_and_flash(16, 4)
    ours.linear_qkv = weight_norm(ours.linear_qkv)
    query, memory = seq(2, 3, 16).double(), seq(2, 5, 16, seed=1).double()
    expected, _ = ours(query, memory)
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        ours.linear_qkv.parametrizations.weight.original1.mul_(2.0)
    got, _ = twin(query, memory)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.sum().backward()
    assert twin.linear_qkv.parametrizations.weight.original1.grad is not None
    assert ours.linear_qkv.parametrizations.weight.original1.grad is None


def test_subclassed_linears_are_called_as_modules():
    """A LoRA-style nn.Linear subclass on linear_out (and on linear_qkv): its update counts,
    and gets gradients, as in the stock layer with the same modules (it was skipped)."""
    stock, ours = stock_and_flash(16, 4)
    ours.linear_out = LowRankLinear(ours.linear_out)
    stock.linear_out = LowRankLinear(stock.linear_out)
    ours.linear_qkv = LowRankLinear(ours.linear_qkv)
    stock.linear_q, stock.linear_k, stock.linear_v = (Rows(ours.linear_qkv, i * 16, (i + 1) * 16) for i in range(3))
    query, memory = seq(2, 3, 16).double(), seq(2, 5, 16, seed=1).double()
    fp64 = dict(rtol=1e-10, atol=1e-10)
    for args in ((query, memory), (query, None)):
        out, _ = ours(*args)
        torch.testing.assert_close(out, stock(*args)[0], **fp64)
    (got,) = torch.autograd.grad(ours(query, memory)[0].sum(), ours.linear_out.lora_b)
    (expected,) = torch.autograd.grad(stock(query, memory)[0].sum(), stock.linear_out.lora_b)
    torch.testing.assert_close(got, expected, **fp64)
    with torch.no_grad():
        shared = memory[:1].expand(2, -1, -1)
        _, state = ours.step(query[:1, 0], None, memory=shared[:1])
        for t in range(3):
            got, state = ours.step(query[:, t], state[:1], memory=shared)
            torch.testing.assert_close(got, stock.step(query[:, t], None, memory=shared)[0], **fp64)


def test_hooks_on_the_linears_run():
    """Forward hooks on linear_out run, and change the output, as on the stock layer's
    linear_out, in forward and in cached decoding steps (also when the hook comes after
    the steps were first checked)."""
    stock, ours = stock_and_flash(16, 4)
    calls = []

    def double(module, args, output):
        calls.append(module)
        return 2 * output

    query, memory = seq(2, 3, 16).double(), seq(2, 5, 16, seed=1).double()
    fp64 = dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        shared = memory[:1].expand(2, -1, -1)
        _, state = ours.step(query[:1, 0], None, memory=shared[:1])
        for _ in range(2):  # the second step takes the remembered fast path
            ours.step(query[:, 0], state[:1], memory=shared)
        ours.linear_out.register_forward_hook(double)
        stock.linear_out.register_forward_hook(double)
        got, _ = ours.step(query[:, 1], state[:1], memory=shared)
        torch.testing.assert_close(got, stock.step(query[:, 1], None, memory=shared)[0], **fp64)
    calls.clear()
    torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], **fp64)
    assert calls == [ours.linear_out, stock.linear_out]


@pytest.mark.parametrize("layout", ["fused", "stock"])
def test_parameters_of_a_tensor_subclass_are_called_as_modules(layout, caplog):
    """Linears whose weights are a tensor subclass (as torchao's quantized weights or a
    DTensor; here TwoTensor, which has no storage of its own) are called as modules, so
    the subclass runs its own F.linear; a step computes as the stock step, without a
    cache (it raised: the cache's records read the weights' storage)."""
    from torch.testing._internal.two_tensor import TwoTensor

    stock, ours = stock_and_flash(16, 4, state_dict_layout=layout)
    for layer in (stock, ours):
        for linear in layer.children():
            if isinstance(linear, nn.Linear):
                weight = linear.weight.detach()
                linear.weight = nn.Parameter(TwoTensor(weight.clone(), weight.clone()), requires_grad=False)
    query, memory = seq(2, 3, 16).double(), seq(2, 5, 16, seed=1).double()
    fp64 = dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="espnet_mha"):
        got = ours(query, memory)[0]
        assert type(got) is TwoTensor
        torch.testing.assert_close(got.a, stock(query, memory)[0].a, **fp64)
        state = None
        for t in range(3):
            got, state = ours.step(query[:, t], state, memory=memory)
            torch.testing.assert_close(got.a, stock.step(query[:, t], None, memory=memory)[0].a, **fp64)
            assert state is None and ours.last_cache is None
    assert "its parameters are of a tensor subclass, TwoTensor" in caplog.text


def test_a_projection_that_returns_a_tensor_subclass_is_used_for_one_step():
    """A called key/value projection whose output is a tensor subclass (here through a
    TwoTensor attribute): its keys and values serve the step they were made for, the state
    passes through, as the stock step's (the step raised: the cache's records read the
    storage, which such a tensor does not have)."""
    from torch.testing._internal.two_tensor import TwoTensor

    class Gated(nn.Module):
        def __init__(self, base):
            super().__init__()
            one = torch.ones((), dtype=base.weight.dtype)
            self.base, self.gate = base, TwoTensor(one, one.clone())

        def forward(self, x):
            return self.base(x) * self.gate

    stock, ours = stock_and_flash(16, 4, state_dict_layout="stock")
    for layer in (stock, ours):
        for name in ("linear_q", "linear_k", "linear_v"):
            setattr(layer, name, Gated(getattr(layer, name)))
    query, memory = seq(3, 2, 16).double(), seq(2, 5, 16, seed=1).double()
    with torch.no_grad():
        state = None
        for t in range(3):
            got, state = ours.step(query[t], state, memory=memory)
            assert state is None and ours.last_cache is None
            torch.testing.assert_close(got.a, stock.step(query[t], None, memory=memory)[0].a, rtol=1e-10, atol=1e-10)


def test_parameters_that_are_only_tagged_or_fake_are_read():
    """An nn.Parameter subclass that changes no dispatch (a tag) and the FakeTensors of a
    non-strict torch.export are read as plain parameters (the fast path, the cache): the
    tagged one took the stock step, 80x slower, and export projected with the whole fused
    weight, both after tensor-subclass weights came to be called as modules."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class TaggedParameter(nn.Parameter):
        pass

    stock, ours = stock_and_flash(16, 4)
    ours.linear_qkv.weight = TaggedParameter(ours.linear_qkv.weight.detach())
    assert quantized.is_plain(ours.linear_qkv)
    query, memory = seq(2, 16).double(), seq(1, 5, 16, seed=1).double().expand(2, -1, -1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        got, _ = ours.step(query, state, memory=memory)
    assert ours.last_cache == "reused"
    torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], rtol=1e-10, atol=1e-10)
    with FakeTensorMode():
        fake = nn.Linear(4, 4)
    assert quantized.is_plain(fake)


def test_a_projection_without_bias_is_called_as_a_module():
    """A bias-less nn.Linear put in as linear_qkv (the stock layer's with zero biases)."""
    stock, ours = stock_and_flash(16, 4)
    ours.linear_qkv = nn.Linear(16, 48, bias=False).double()
    with torch.no_grad():
        ours.linear_qkv.weight.copy_(torch.cat([stock.linear_q.weight, stock.linear_k.weight, stock.linear_v.weight]))
        for linear in (stock.linear_q, stock.linear_k, stock.linear_v):
            linear.bias.zero_()
    query, memory = seq(2, 3, 16).double(), seq(2, 5, 16, seed=1).double()
    torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        _, state = ours.step(query[:, 0], None, memory=memory)
        got, _ = ours.step(query[:, 1], state, memory=memory)
    torch.testing.assert_close(got, stock.step(query[:, 1], None, memory=memory)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["fused", "stock"])
def test_hooks_see_the_shapes_the_stock_step_gives(layout):
    """A cached step calls a hooked linear_q with the (B, D) query and linear_out with
    (B, 1, D), as the stock step (forward of the 2-D query) does: linear_out got (B, D),
    so a hook taking ``output[:, -1]`` got (B,) instead of (B, D)."""
    stock, ours = stock_and_flash(16, 4, state_dict_layout=layout)
    seen = {"stock": [], "ours": []}
    for name, layer in (("stock", stock), ("ours", ours)):
        for linear in ("linear_q", "linear_out"):
            if hasattr(layer, linear):
                getattr(layer, linear).register_forward_hook(
                    lambda module, args, output, name=name, linear=linear: seen[name].append((linear, output.shape)))
    query, memory = seq(3, 16).double(), seq(1, 5, 16, seed=1).double().expand(3, -1, -1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        seen["ours"].clear()
        got, _ = ours.step(query, state[:1], memory=memory)
        expected, _ = stock.step(query, None, memory=memory)
    assert ours.last_cache == "reused"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if layout == "fused":
        assert seen["ours"] == [("linear_out", torch.Size([3, 1, 16]))]
    else:
        assert seen["ours"] == seen["stock"] == [("linear_q", torch.Size([3, 16])), ("linear_out", torch.Size([3, 1, 16]))]
