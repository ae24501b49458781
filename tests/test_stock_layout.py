"""Our layer built with the stock parameters (``state_dict_layout="stock"``, what ``mha``
builds under ``use_for_mha()``) against ESPnet's own layer, where code selects parameters
or modules by name or treats each ``nn.Linear`` as a unit.

The rest of the suite runs its comparisons with both layouts (the ``layout`` fixture);
this file covers what only the stock parameters make possible.
"""

import pytest
import torch
from torch import nn

from conftest import LowRankLinear, assert_layers_agree, quantize
from espnet_mha import FlashMultiHeadedAttention, quantized, use_for_mha
from espnet_mha.testing import build_s4_decoder, stock_and_flash

FP64 = dict(rtol=1e-10, atol=1e-10)
FP32 = dict(rtol=1e-5, atol=1e-5)


def seq(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pair(dtype=torch.float64, **options):
    return stock_and_flash(16, 4, dtype=dtype, state_dict_layout="stock", **options)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16], ids=["qint8", "float16"])
def test_quantize_dynamic_swaps_each_linear_as_in_the_stock_layer(dtype):
    """asr_inference --quantize_asr_model: q, k and v are quantized one by one, as the stock
    layer's, and called as modules (no re-quantization needed)."""
    stock, ours = pair(torch.float32)
    with torch.no_grad():
        stock.linear_k.weight.mul_(5.0)  # one int8 scale for stacked q/k/v would round differently
    ours.load_state_dict(stock.state_dict())
    stock, ours = quantize(stock, dtype), quantize(ours, dtype)
    assert all(type(getattr(ours, name)) is type(getattr(stock, name)) for name in ("linear_q", "linear_k", "linear_v"))
    assert quantized.projections(ours).exact
    assert_layers_agree(ours, stock, FP32)


def swap_by_name(model, targets):
    """Replace every module whose last name is in ``targets``, as ESPnet's LoRA adapter
    (``create_lora_adapter``: ``target_modules``) selects them. Returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        parent, _, last = name.rpartition(".")
        if last in targets and isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent) if parent else model, last, LowRankLinear(module))
            swapped += 1
    return swapped


def test_lora_target_modules_by_stock_name_adapt_the_same_linears():
    """target_modules [linear_q, linear_v]: the same modules are adapted as in the stock
    layer (the fused layout has none of these names), and the layers then agree in
    forward, steps and the adapters' gradients."""
    stock, ours = pair()
    assert swap_by_name(stock, {"linear_q", "linear_v"}) == swap_by_name(ours, {"linear_q", "linear_v"}) == 2
    assert_layers_agree(ours, stock, FP64)
    query, memory = seq(2, 5, 16, seed=3), seq(2, 7, 16, seed=4)
    for layer in (stock, ours):
        layer(query, memory)[0].square().sum().backward()
    for name, p in stock.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name).grad, p.grad, **FP64)


def test_freezing_a_stock_named_parameter_freezes_it():
    """ESPnet's --freeze_param (abs_task: ``k.startswith(t + ".") or k == t`` over
    ``named_parameters()``) with a stock sub-module name: the same parameters freeze, the
    others get the stock gradients, and decoding steps see the frozen ones."""
    stock, ours = pair()
    for layer in (stock, ours):
        for name, p in layer.named_parameters():
            if name.startswith("linear_q.") or name == "linear_v.weight":
                p.requires_grad = False
    frozen = [[n for n, p in layer.named_parameters() if not p.requires_grad] for layer in (stock, ours)]
    assert frozen[0] == frozen[1] == ["linear_q.weight", "linear_q.bias", "linear_v.weight"]
    query, memory = seq(3, 16, seed=5), seq(1, 7, 16, seed=6).expand(3, -1, -1)
    _, state = ours.step(query[:1], None, memory=memory[:1])
    out, _ = ours.step(query, state[:1], memory=memory)
    out.sum().backward()
    stock.step(query, None, memory=memory)[0].sum().backward()
    for name, p in stock.named_parameters():
        got = ours.get_parameter(name).grad
        assert (got is None) == (p.grad is None), name
        if got is not None:
            torch.testing.assert_close(got, p.grad, **FP64)


def test_saving_only_parameters_that_need_gradients_works():
    """ESPnet's --save_strategy required_grad_only drops frozen parameters from
    ``model.state_dict()`` by their ``named_parameters()`` names (trainer.py)."""
    stock, ours = pair()
    saved = []
    for layer in (stock, ours):
        layer.requires_grad_(False)
        layer.linear_out.requires_grad_(True)
        state = layer.state_dict()
        for name, p in layer.named_parameters():
            if not p.requires_grad:
                state.pop(name)
        saved.append(state)
    assert list(saved[0]) == list(saved[1]) == ["linear_out.weight", "linear_out.bias"]


@pytest.mark.parametrize("init", [nn.init.xavier_uniform_, nn.init.orthogonal_,
                                  lambda w: nn.init.kaiming_normal_(w, mode="fan_out")],
                         ids=["xavier", "orthogonal", "kaiming_fan_out"])
def test_a_users_own_init_of_every_linear_gives_the_stock_weights(init):
    """model.apply over nn.Linear modules: per (D, D) projection, as in the stock layer
    (the fused (3D, D) matrix has other fans and is orthogonalised as a whole)."""
    weights = []
    for name in ("mha", "flash_mha"):
        options = None if name == "mha" else {"state_dict_layout": "stock"}
        decoder = build_s4_decoder(name, vocab_size=11, d_model=24, n_layers=2, n_head=3, layer_options=options)
        torch.manual_seed(9)
        decoder.apply(lambda m: init(m.weight) if isinstance(m, nn.Linear) else None)
        weights.append(decoder.state_dict())
    assert list(weights[0]) == list(weights[1])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


def test_a_per_parameter_optimizer_steps_as_with_the_stock_layer():
    """Adafactor keeps row/column statistics per parameter: per (D, D) projection here too.
    (Not ``linear_k.bias``: the softmax ignores it, so its gradient is rounding noise in
    both layers, which Adafactor's normalisation scales up to a full step.)"""
    stock, ours = pair()
    query, memory = seq(2, 5, 16, seed=7), seq(2, 7, 16, seed=8)
    for layer in (stock, ours):
        optimizer = torch.optim.Adafactor(layer.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            layer(query, memory)[0].square().sum().backward()
            assert layer.linear_k.bias.grad.abs().max() < 1e-12
            optimizer.step()
    for name, p in stock.named_parameters():
        if name != "linear_k.bias":
            torch.testing.assert_close(ours.get_parameter(name), p, **FP64, msg=lambda m, name=name: f"{name}: {m}")


def test_use_for_mha_builds_the_stock_parameters(monkeypatch):
    """The plain ``mha`` name under use_for_mha(): the decoder has the stock decoder's
    parameter names, shapes and order."""
    from espnet_mha import restore_mha

    monkeypatch.setenv("ESPNET_MHA_REPLACE_MHA", "0")
    stock = build_s4_decoder("mha", vocab_size=11, d_model=24, n_layers=2, n_head=3)
    use_for_mha()
    try:
        ours = build_s4_decoder("mha", vocab_size=11, d_model=24, n_layers=2, n_head=3)
    finally:
        restore_mha()
    assert any(isinstance(m, FlashMultiHeadedAttention) for m in ours.modules())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in stock.named_parameters()]
    for (_, a), (_, b) in zip(ours.named_parameters(), stock.named_parameters()):
        assert torch.equal(a, b)  # same seed, same weights


def test_a_fused_file_loads_and_a_stock_file_loads():
    """A stock state dict loads strictly as it is; a fused one (trained with flash_mha)
    through the pre-hook, and then computes as the stock layer given the converted
    file; wrong sizes are named as by the stock layer."""
    from espnet_mha import to_stock

    torch.manual_seed(1)
    fused = FlashMultiHeadedAttention(16, 4).double().state_dict()
    stock, ours = pair()
    stock.load_state_dict(to_stock(fused))
    ours.load_state_dict(fused)
    x, memory = seq(2, 3, 16), seq(2, 5, 16, seed=1)
    torch.testing.assert_close(ours(x, memory)[0], stock(x, memory)[0], **FP64)
    wrong = {**stock.state_dict(), "linear_q.weight": torch.zeros(8, 16, dtype=torch.float64)}
    messages = []
    for layer in (stock, ours):
        with pytest.raises(RuntimeError, match=r"size mismatch for linear_q.weight") as error:
            layer.load_state_dict(wrong)
        messages.append(str(error.value).split(":", 1)[1])
    assert messages[0] == messages[1]


def test_a_backward_after_each_step_with_keys_and_values_frozen():
    """linear_k and linear_v frozen, linear_q trained, one backward per step (stock: fine):
    the cache's graph reached linear_q through the stacked q/k/v, so the second step's
    backward went through the first step's graph again and raised."""
    stock, ours = pair()
    for layer in (stock, ours):
        layer.linear_k.requires_grad_(False)
        layer.linear_v.requires_grad_(False)
    memory, state = seq(1, 7, 16, seed=1).expand(3, -1, -1), None
    for t in range(3):
        query = seq(3, 16, seed=10 + t)
        for layer in (stock, ours):
            layer.zero_grad(set_to_none=True)
        out, state = ours.step(query, None if state is None else state[:1], memory=memory)
        out.square().sum().backward()
        stock.step(query, None, memory=memory)[0].square().sum().backward()
        torch.testing.assert_close(ours.linear_q.weight.grad, stock.linear_q.weight.grad, **FP64)
        assert ours.linear_k.weight.grad is None


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_spectral_norm_on_the_keys_steps_as_the_stock_layer(mode):
    """spectral_norm (a parametrization with a power-iteration buffer) on linear_k: in
    training mode its weight changes at every call, and the stock step calls it at every
    step, so the cache is recomputed rather than reused (it drifted 3.5e-4 from stock)."""
    stock, ours = pair()
    for layer in (stock, ours):
        torch.manual_seed(7)
        torch.nn.utils.parametrizations.spectral_norm(layer.linear_k)
        layer.train(mode == "train")
    memory, state = seq(1, 6, 16, seed=2).expand(3, -1, -1), None
    with torch.no_grad():
        for t in range(4):
            query = seq(3, 16, seed=20 + t)
            got, state = ours.step(query, None if state is None else state[:1], memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
            if t:  # in training mode the stock step: no cache
                assert ours.last_cache == ("reused" if mode == "eval" else None)


class DroppedLowRank(LowRankLinear):
    """loralib's ``Linear`` in training mode: dropout on the input of the low-rank update."""

    def __init__(self, linear, dropout):
        super().__init__(linear)
        self.lora_dropout = dropout

    def forward(self, x):
        return nn.Linear.forward(self, x) + self.lora_dropout(x) @ self.lora_a.t() @ self.lora_b.t()


@pytest.mark.parametrize("dropout", [nn.Dropout(0.3), nn.AlphaDropout(0.3)], ids=["dropout", "alpha_dropout"])
@pytest.mark.parametrize("names", [("linear_q", "linear_v"), ("linear_k",)], ids=["q_v", "k"])
def test_projections_that_draw_random_numbers_step_as_the_stock_layer(names, dropout):
    """LoRA with dropout in training mode on some of q/k/v: each step draws what the stock
    step draws (it calls q, k, v in that order on the whole expanded memory). The cache
    drew in another order and for one memory row (steps 0.56-20 off), and missed dropout
    classes other than nn.Dropout."""
    stock, ours = pair()
    for layer in (stock, ours):
        for name in names:
            setattr(layer, name, DroppedLowRank(getattr(layer, name), dropout))
    memory, state = seq(1, 6, 16, seed=2).expand(3, -1, -1), None
    for t in range(3):
        query = seq(3, 16, seed=30 + t)
        torch.manual_seed(t)
        got, state = ours.step(query, state, memory=memory)
        torch.manual_seed(t)
        torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)


@pytest.mark.parametrize("name,hooked", [("linear_q", None), ("linear_k", "linear_q")], ids=["q", "k_q_hooked"])
def test_a_transposed_square_weight_is_seen_by_the_next_step(name, hooked):
    """``weight.data = weight.data.t()``: same tensor, address and storage, other strides (a
    square weight only the stock layout has). Missed before: the remembered query views
    (linear_q, 0.18 off), and the called modules' record when a projection is called as
    a module (linear_k with a hook on linear_q, 0.39 off)."""
    stock, ours = pair()
    if hooked:
        getattr(ours, hooked).register_forward_hook(lambda module, args, out: None)
    memory, query = seq(1, 7, 16, seed=1).expand(3, -1, -1), seq(3, 16, seed=2)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        for layer in (stock, ours):
            weight = getattr(layer, name).weight
            weight.data = weight.data.t()
        got, _ = ours.step(query, state[:1], memory=memory)
        torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)


@pytest.mark.parametrize("name", ["linear_q", "linear_k"])
def test_mixed_projection_dtypes_raise_as_in_the_stock_layer(name):
    """A float32 linear in a float64 layer (e.g. a partial float32 state dict loaded with
    assign=True): the stock layer's linears raise; stacking promoted it silently, and a
    step raised another error for linear_q."""
    stock, ours = pair()
    for layer in (stock, ours):
        getattr(layer, name).float()
    query, memory = seq(2, 3, 16), seq(2, 5, 16, seed=1)
    with pytest.raises(RuntimeError):
        stock(query, memory)
    with pytest.raises(TypeError, match=rf"must share one dtype .* {name}.weight torch.float32"):
        ours(query, memory)
    with pytest.raises(TypeError, match=rf"{name}.weight torch.float32"):
        ours.step(query[:, 0], None, memory=memory)
