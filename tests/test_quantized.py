"""Dynamic quantization (``asr_inference --quantize_asr_model true``) against the stock layer.

``torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype)`` swaps our fused
``linear_qkv`` and ``linear_out`` for quantized modules, as it swaps the stock
layer's four linears. Both layers are quantized the way ESPnet does it and must
compute the same (fp32 tolerance), forward and step, and give the same n-best.
"""

import logging
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import LowRankLinear, assert_layers_agree, assert_same_nbest, quantize
from espnet_mha import quantized
from espnet_mha.testing import s4_decoder_pair, stock_and_flash

FP32 = dict(rtol=1e-5, atol=1e-5)


def quantized_pair(dtype, **options):
    """Stock and ours with the same weights, keys 5x larger than queries and values, so
    that one int8 scale for the fused q/k/v would round differently from three."""
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32, **options)
    with torch.no_grad():
        stock.linear_k.weight.mul_(5.0)
    ours.load_state_dict(stock.state_dict())
    return quantize(stock, dtype), quantize(ours, dtype)


def seq(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_layer_matches_the_quantized_stock_layer(dtype):
    stock, ours = quantized_pair(dtype)
    rng = torch.get_rng_state()
    assert not quantized.is_plain(ours.linear_qkv) and quantized.projections(ours).exact
    assert torch.equal(torch.get_rng_state(), rng)  # re-quantizing draws no random numbers
    assert_layers_agree(ours, stock, FP32)


def test_qint8_without_the_float_weights_runs_fused_and_says_so(caplog):
    stock, ours = quantized_pair(torch.qint8)
    ours.__dict__["_float_linear_qkv"] = None  # e.g. a model quantized before this version
    with caplog.at_level(logging.WARNING, logger="espnet_mha.quantized"):
        got, _ = ours(seq(2, 3, 16), seq(2, 5, 16, seed=1))
    assert not quantized.projections(ours).exact
    assert "results are close to, not the same as, the quantized stock layer's" in caplog.text
    expected, _ = stock(seq(2, 3, 16), seq(2, 5, 16, seed=1))
    assert not torch.allclose(got, expected, **FP32)  # one int8 scale for q, k and v
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)


def test_changed_float_weights_are_not_used_for_the_quantized_layer():
    """The kept float weights are used only if they reproduce the swapped module exactly."""
    _, ours = quantized_pair(torch.qint8)
    with torch.no_grad():
        ours._float_linear_qkv.weight.mul_(2.0)
    assert not quantized.projections(ours).exact


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_causal_layer_steps_equal_its_forward(dtype):
    """(It raised NotImplementedError before.) qint8 also quantizes each call's input with
    its own scale, so a step's (B, D) query rounds differently from the forward's (B, T, D)."""
    _, ours = quantized_pair(dtype, causal=True)
    query = seq(2, 5, 16)
    expected, _ = ours(query)
    state = None
    for t in range(5):
        got, state = ours.step(query[:, t], state)
        torch.testing.assert_close(got, expected[:, t], **(FP32 if dtype == torch.float16 else dict(rtol=0, atol=0.05)))


def test_loading_quantized_weights_after_a_forward_is_not_ignored(caplog):
    """The q/k/v parts re-quantized on the first call are made again when new quantized
    weights are loaded (they were kept, silently computing with the old weights). The
    float weights then no longer match, so the fused module runs, and says so."""
    _, ours = quantized_pair(torch.qint8)
    query, memory = seq(2, 3, 16), seq(2, 5, 16, seed=1)
    ours(query, memory)
    other = quantize(stock_and_flash(16, 4, dtype=torch.float32, seed=3)[1], torch.qint8)
    ours.load_state_dict(other.state_dict())
    with caplog.at_level(logging.WARNING, logger="espnet_mha.quantized"):
        got, _ = ours(query, memory)
    assert "close to, not the same as" in caplog.text
    other.__dict__["_float_linear_qkv"] = None  # the same fused computation with the loaded weights
    torch.testing.assert_close(got, other(query, memory)[0], rtol=0, atol=0)


def test_a_quantized_model_pickles_and_copies():
    """quantize_dynamic leaves a qconfig (a local function) on the float linear it swapped
    out, which only our layer still holds: torch.save(model) failed on it."""
    import copy
    import io

    stock, ours = quantized_pair(torch.qint8)
    query, memory = seq(2, 3, 16), seq(2, 5, 16, seed=1)
    expected, _ = ours(query, memory)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(ours)):
        assert quantized.projections(twin).exact
        torch.testing.assert_close(twin(query, memory)[0], stock(query, memory)[0], **FP32)
        torch.testing.assert_close(twin(query, memory)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantized_beam_search_gives_the_quantized_stock_nbest(dtype):
    stock, ours = s4_decoder_pair(vocab_size=20, d_model=32, n_layers=2, n_head=4, seed=1, dtype=torch.float32)
    assert_same_nbest(quantize(stock, dtype), quantize(ours, dtype), seq(23, 32, seed=4), beam=3,
                      maxlenratio=0.6, score_tol=1e-4)


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


class Rows(nn.Module):
    """Rows ``[start, stop)`` of a module's output: the stock layer's q/k/v view of our
    adapted ``linear_qkv``."""

    def __init__(self, module, start, stop):
        super().__init__()
        self.module, self.start, self.stop = module, start, stop

    def forward(self, x):
        return self.module(x)[..., self.start:self.stop]


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


def test_a_new_bias_on_a_quantized_fused_projection_is_used():
    """A qint8 fused linear_qkv given a new bias after the swap (set_weight_bias, or a
    quantized checkpoint of bias-only tuning) computes with it, as the quantized stock
    layer's linear_v does: the re-quantized q/k/v parts took the float copy's old bias,
    silently (1.4 off, found by a probe). Steps too, with the cache recomputed."""
    stock, ours = (quantize(layer, torch.qint8) for layer in stock_and_flash(32, 4, dtype=torch.float32))
    query, memory = seq(2, 3, 32), seq(2, 7, 32, seed=1)
    with torch.no_grad():
        _, state = ours.step(query[:, 0], None, memory=memory)
        new_bias = torch.randn(32, generator=torch.Generator().manual_seed(5))
        stock.linear_v.set_weight_bias(stock.linear_v.weight(), new_bias)
        bias = ours.linear_qkv.bias().clone()
        bias[64:] = new_bias
        ours.linear_qkv.set_weight_bias(ours.linear_qkv.weight(), bias)
        torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=1e-5, atol=1e-5)
        got, _ = ours.step(query[:, 1], state, memory=memory)
        assert ours.last_cache.startswith("recomputed")
        torch.testing.assert_close(got, stock.step(query[:, 1], None, memory=memory)[0], rtol=1e-5, atol=1e-5)


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
