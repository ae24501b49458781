"""Attention dropout against the stock layer: the same random draws, the dropout module's
own training flag, and a replaced or hooked dropout module (called as the stock layer calls it)."""

import pytest
import torch
from espnet2.asr.state_spaces.attention import MultiHeadedAttention
from torch import nn

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.dispatch import BackendUnavailableError

pytestmark = pytest.mark.usefixtures("layout")

FP64 = dict(rtol=1e-10, atol=1e-10)


def pair(n_feat, n_head, p, *, seed=0, **options):
    """The stock layer and ours with dropout ``p`` and the same weights, fp64, in training mode."""
    torch.manual_seed(seed)
    stock = MultiHeadedAttention(n_feat, n_head, dropout=p).double().train()
    ours = FlashMultiHeadedAttention(n_feat, n_head, dropout=p, **options).double().train()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def seeded(layer, seed, fn):
    """``fn(layer)`` after seeding the global RNG, and a draw of the RNG after it (what
    the rest of a model would see)."""
    torch.manual_seed(seed)
    return fn(layer), torch.rand(4)


def forward_and_grads(query, memory, mask):
    def run(layer):
        q = query.clone().requires_grad_(True)
        m = None if memory is None else memory.clone().requires_grad_(True)
        out, _ = layer(q, m, mask)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
        return out, q.grad, None if m is None else m.grad
    return run


def assert_same(got, expected):
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(g, e, **FP64)


def test_forward_draws_the_stock_random_numbers(case):
    """Random shapes and masks (fully masked rows included): output, gradients and the RNG
    state after the layer equal the stock layer's under the same seed."""
    stock, ours = pair(case.n_feat, case.n_head, 0.3, seed=case.seed)
    fn = forward_and_grads(*case.tensors())
    assert_same(seeded(ours, case.seed, fn), seeded(stock, case.seed, fn))


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_in_training_draw_the_stock_random_numbers(batch):
    """The stock step runs forward, dropout included, in training; so does ours, with the
    draws in the stock order also for a beam served by one shared cache."""
    stock, ours = pair(16, 4, 0.4)
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(1, 9, 16, generator=gen, dtype=torch.float64).expand(batch, -1, -1)
    queries = torch.randn(4, batch, 16, generator=gen, dtype=torch.float64)

    def steps(layer):
        state, outs = None, []
        for query in queries:
            out, state = layer.step(query, state, memory=memory)
            outs.append(out)
        return outs

    assert_same(seeded(ours, 0, steps), seeded(stock, 0, steps))


@pytest.mark.parametrize("mode", ["train_layer_eval_dropout", "eval_layer_train_dropout"])
def test_the_dropout_modules_own_flag_decides(mode):
    """Dropout switched off for training (the layer in train(), its nn.Dropout in eval()),
    and MC dropout at inference (the other way round): the stock layer calls
    ``self.dropout(...)``, so the module's flag decides, in forward and in step."""
    stock, ours = pair(16, 4, 0.5)
    for layer in (stock, ours):
        layer.train(mode.startswith("train"))
        layer.dropout.train(not mode.startswith("train"))
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64), torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    fn = forward_and_grads(query, memory, None)
    assert_same(seeded(ours, 0, fn), seeded(stock, 0, fn))
    with torch.no_grad():
        step = lambda layer: layer.step(query[:, 0], None, memory=memory)[0]  # noqa: E731
        assert_same(seeded(ours, 0, step), seeded(stock, 0, step))


class HalfWeights(nn.Module):
    """A user's replacement for the attention dropout, with no ``p``."""

    def forward(self, x):
        return x * 0.5


def replacements():
    hooked = nn.Dropout(0.3)
    hooked.register_forward_hook(lambda module, args, out: out * 2.0)
    backward_hooked = nn.Dropout(0.3)
    backward_hooked.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 3.0,))
    wrapped = nn.Dropout(0.3)  # a forward set on the instance, as wrappers (accelerate...) do
    wrapped.forward = lambda x, _forward=wrapped.forward: _forward(x) * 0.5
    return {"identity": nn.Identity(), "custom": HalfWeights(), "hooked_dropout": hooked,
            "dropout_subclass": type("MyDropout", (nn.Dropout,), {})(0.3),
            "backward_hooked_dropout": backward_hooked, "instance_forward": wrapped}


@pytest.mark.parametrize("name", sorted(replacements()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_replaced_or_hooked_dropout_module_is_called_as_the_stock_layer_calls_it(name, training):
    stock, ours = pair(16, 4, 0.0)
    for layer in (stock, ours):
        layer.dropout = replacements()[name]
        layer.train(training)
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64), torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 5, 7, generator=gen) > 0.4
    mask[1, 2] = False  # a fully masked row
    for memory_, mask_ in ((memory, mask), (None, mask[:, :, :5]), (memory, None)):
        fn = forward_and_grads(query, memory_, mask_)
        assert_same(seeded(ours, 0, fn), seeded(stock, 0, fn))
        assert ours.last_backend == "math" and "dropout module" in ours.last_fallback
    with torch.no_grad():
        state, stock_state = None, None
        for t in range(3):  # the stock step; the state passes through, as the stock one
            (got, state), rng = seeded(ours, t, lambda layer: layer.step(query[:, t], state, memory=memory,
                                                                         mask=mask[:, :1]))
            (expected, stock_state), stock_rng = seeded(stock, t, lambda layer: layer.step(
                query[:, t], stock_state, memory=memory, mask=mask[:, :1]))
            assert_same((got, rng), (expected, stock_rng))
            assert state is None and ours.last_cache is None


@pytest.mark.parametrize("name", ["identity", "custom"])
def test_a_replaced_dropout_module_under_an_sdpa_kernel_restriction(name):
    """Under ``sdpa_kernel`` without SDPA's math kernel, a layer whose dropout module has no
    ``p`` (``nn.Identity``, a module of one's own) computes as the stock layer on the math
    path, which calls the module: forward and step raised AttributeError ('p')."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stock, ours = pair(16, 4, 0.0)
    for layer in (stock, ours):
        layer.dropout = replacements()[name]
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64), torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
        torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], rtol=1e-10, atol=1e-10)
        assert ours.last_backend == "math"
        got, _ = ours.step(query[:, 0], None, memory=memory)
        torch.testing.assert_close(got, stock.step(query[:, 0], None, memory=memory)[0], rtol=1e-10, atol=1e-10)


def test_a_causal_layer_with_a_replaced_dropout_module():
    """Causal forward equals the stock layer given the causal mask; steps equal forward."""
    stock, ours = pair(16, 4, 0.0, causal=True)
    for layer in (stock, ours):
        layer.dropout = HalfWeights()
    query = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril().unsqueeze(0)
    expected, _ = stock(query, None, causal)
    got, _ = ours(query)
    torch.testing.assert_close(got, expected, **FP64)
    state, outs = None, []
    for t in range(5):
        out, state = ours.step(query[:, t], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, dim=1), expected, **FP64)
    assert ours.last_backend == "math"


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_a_forced_kernel_backend_refuses_a_dropout_module_it_cannot_call(backend):
    _, ours = pair(16, 4, 0.0, backend=backend)
    ours.dropout = HalfWeights()
    with pytest.raises(BackendUnavailableError, match=rf"backend='{backend}' cannot call the layer's dropout module "
                                                      r"\(HalfWeights"):
        ours(torch.randn(1, 2, 16, dtype=torch.float64))
    assert ours.last_backend is None
    # Forced math calls it, and reports nothing given up (a probe saw a fallback reported).
    ours.backend = "math"
    ours(torch.randn(1, 2, 16, dtype=torch.float64))
    assert (ours.last_backend, ours.last_fallback) == ("math", "")


def test_an_inplace_dropout_leaves_the_dropped_weights_in_attn_as_the_stock_one():
    """The stock ``self.dropout(self.attn)`` with ``inplace=True`` overwrites ``self.attn``."""
    stock, ours = pair(16, 4, 0.0, keep_attn=True)
    for layer in (stock, ours):
        layer.dropout = nn.Dropout(0.4, inplace=True)
    query, memory = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        got, expected = seeded(ours, 0, lambda layer: layer(query, memory)[0]), seeded(stock, 0,
                                                                                     lambda layer: layer(query, memory)[0])
    assert_same(got, expected)
    torch.testing.assert_close(ours.attn, stock.attn, **FP64)


@pytest.mark.fused_only
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_with_a_replaced_dropout_a_called_linear_qkv_runs_once_per_input(self_attention):
    """The stock path calls a non-plain linear_qkv (hooks, LoRA...) once per distinct input,
    as the layer's own path does, not once per q, k and v."""
    stock, ours = pair(16, 4, 0.0)
    calls = []
    ours.linear_qkv.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    ours.dropout = nn.Identity()
    stock.dropout = nn.Identity()
    query = torch.randn(2, 3, 16, dtype=torch.float64)
    memory = None if self_attention else torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(query, memory)[0], stock(query, memory)[0], **FP64)
    assert len(calls) == (1 if self_attention else 2)


def test_an_espnet_asr_model_trains_as_with_the_stock_layer_under_dropout(tmp_path, monkeypatch):
    """ASRTask's model from the recipe config, dropout 0.2 in every nn.Dropout (ours
    included), four Adam steps from the same seed: the same losses and parameters as with
    the stock ``mha``, since ours draws the stock random numbers (also where the padded
    encoder frames would be skipped without dropout)."""
    from espnet_asr import batch, build

    from espnet_mha import packing
    from espnet_mha.checkpoint import to_stock

    monkeypatch.setattr(packing, "ITEM_COST_MACS", 0)

    models = []
    for attention in ("mha", "flash_mha"):
        model, _ = build(tmp_path, attention, seed=0)
        model.double().train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.2
        models.append(model)
    stock, ours = models
    torch.testing.assert_close(to_stock(ours.state_dict()), stock.state_dict(), rtol=0, atol=0)
    losses = {id(model): [] for model in models}
    for model in models:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(4):
            torch.manual_seed(step)
            inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch(seed=step).items()}
            loss, _, _ = model(**inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[id(model)].append(loss.item())
    assert losses[id(ours)] == pytest.approx(losses[id(stock)], rel=1e-9)
    torch.testing.assert_close(to_stock(ours.state_dict()), stock.state_dict(), rtol=1e-8, atol=1e-9)
