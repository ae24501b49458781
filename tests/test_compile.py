"""torch.compile policy: lazy, fullgraph, a bounded number of graphs, same results as eager.

Compiling on this CPU takes seconds per graph, so these tests are marked slow
(CI runs them; ``make test-fast`` skips them).
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from espnet_mha import FlashMultiHeadedAttention, compile_policy
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.slow
FP32 = dict(rtol=1e-5, atol=1e-5)


def graphs():
    return counters["stats"]["unique_graphs"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def layers():
    torch._dynamo.reset()
    counters.clear()
    _, compiled = stock_and_flash(32, 4, dtype=torch.float32, compile=True)
    _, eager = stock_and_flash(32, 4, dtype=torch.float32, compile=False)
    return compiled, eager


def shapes(count, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        b, t1, t2 = (int(torch.randint(2, 9, (), generator=gen)) for _ in range(3))
        yield b, t1 + 1, t2 * 3 + 2


def mask_for(kind, b, t1, t2, seed):
    if kind == "none":
        return None
    keep = rand(b, t1 if kind == "query" else 1, t2, seed=seed) > -0.3
    keep[0, 0] = False
    return keep


def run_forward(layers, b, t1, t2, kind, seed, self_attention=False):
    compiled, eager = layers
    query = rand(b, t1, 32, seed=seed)
    memory = None if self_attention else rand(b, t2, 32, seed=seed + 1)
    mask = mask_for(kind, b, t1, t1 if self_attention else t2, seed)
    got, _ = compiled(query, memory, mask)
    expected, _ = eager(query, memory, mask)
    torch.testing.assert_close(got, expected, **FP32)


def decode(layers, t2, seed, beam=10, steps=8):
    """Step like BatchBeamSearch: 1 hypothesis, then the beam, then fewer."""
    compiled, eager = layers
    memory = rand(1, t2, 32, seed=seed)
    states = [None, None]
    for step in range(steps):
        batch = 1 if step == 0 else max(beam - max(0, step - 4), 2)
        query = rand(batch, 32, seed=seed + step)
        outs = []
        for i, layer in enumerate((compiled, eager)):
            out, state = layer.step(query, states[i], memory=memory.expand(batch, -1, -1))
            states[i] = state[0].unsqueeze(0)
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], **FP32)


@pytest.mark.xfail(torch.__version__ < "2.7", strict=False,
                   reason="torch 2.5/2.6 (duck sizing) guard a beam size against the head count or size: "
                          "3 more graphs after warm-up here; torch 2.11 has none")
def test_no_recompilation_after_warm_up(layers):
    # Warm-up: every mask kind, self- and cross-attention, size-1 specialisations, steps.
    for kind in ("none", "key", "query"):
        run_forward(layers, 3, 5, 7, kind, seed=1)
        run_forward(layers, 3, 5, 5, kind, seed=2, self_attention=True)
        run_forward(layers, 1, 1, 9, kind, seed=3)
    decode(layers, t2=11, seed=4)
    warm = graphs()
    print(f"graphs after warm-up: {warm}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    for i, (b, t1, t2) in enumerate(shapes(24, seed=5)):
        run_forward(layers, b, t1, t2, ("none", "key", "query")[i % 3], seed=10 + i, self_attention=i % 4 == 0)
    for i, t2 in enumerate((13, 29, 57, 300)):
        decode(layers, t2=t2, seed=50 + i, beam=(10, 5, 3, 8)[i])
    assert graphs() == warm, f"{graphs() - warm} new graphs after warm-up ({warm} during it)"
    assert warm <= 16
    assert not counters["graph_break"]
    compiled, eager = layers
    assert not compiled._checked_steps and eager._checked_steps  # compiled steps never take the eager hot path


def test_backward_and_autocast_match_eager(layers):
    compiled, eager = layers
    for layer in (compiled, eager):
        layer.train()
        layer.zero_grad()
    grads = []
    for layer in (compiled, eager):
        query, memory = rand(4, 6, 32, seed=7).requires_grad_(), rand(4, 10, 32, seed=8)
        mask = rand(4, 1, 10, seed=9) > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(query, memory, mask)
        out.float().square().sum().backward()
        grads.append((query.grad, layer.linear_qkv.weight.grad, layer.linear_out.weight.grad))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    for layer in (compiled, eager):
        layer.eval()


def test_compiled_layer_saves_plain_keys(layers):
    compiled, _ = layers
    assert sorted(compiled.state_dict()) == ["linear_out.bias", "linear_out.weight", "linear_qkv.bias", "linear_qkv.weight"]
    fresh = FlashMultiHeadedAttention(32, 4, compile=True)
    fresh.load_state_dict(compiled.state_dict(), strict=True)


def test_policy_resolution(monkeypatch):
    assert compile_policy.resolve_compile(None, None) == ("auto", None)
    assert not compile_policy.wants_compile("auto", "cpu")
    monkeypatch.setenv("ESPNET_MHA_COMPILE", "1")
    monkeypatch.setenv("ESPNET_MHA_COMPILE_MODE", "max-autotune")
    assert compile_policy.resolve_compile(False, None) == (True, "max-autotune")
    monkeypatch.setenv("ESPNET_MHA_COMPILE_MODE", " Max-Autotune ")  # read as ESPNET_MHA_BACKEND is
    assert compile_policy.resolve_compile(False, None) == (True, "max-autotune")


@pytest.mark.parametrize("option", [False, None, "auto"])
def test_a_compile_mode_without_compiling_says_it_has_no_effect(option, monkeypatch, caplog):
    """A mode applies only to compiled calls: with compile off (or "auto", which compiles on
    no device today) it was dropped without a word (an audit); it now warns, naming both."""
    monkeypatch.delenv("ESPNET_MHA_COMPILE", raising=False)
    monkeypatch.delenv("ESPNET_MHA_COMPILE_MODE", raising=False)
    with caplog.at_level(logging.WARNING, logger="espnet_mha.compile_policy"):
        assert compile_policy.resolve_compile(option, "reduce-overhead")[1] == "reduce-overhead"
    assert "compile_mode='reduce-overhead' has no effect with compile=" in caplog.text
    assert "pass compile=True" in caplog.text
    caplog.clear()
    monkeypatch.setenv("ESPNET_MHA_COMPILE_MODE", "max-autotune")
    with caplog.at_level(logging.WARNING, logger="espnet_mha.compile_policy"):
        compile_policy.resolve_compile(option, None)
    assert "ESPNET_MHA_COMPILE_MODE='max-autotune' has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.compile_policy"):
        compile_policy.resolve_compile(True, None)
    assert "no effect" not in caplog.text


def test_a_user_can_compile_a_fresh_model_with_fullgraph():
    """torch.compile(model, fullgraph=True) before any eager call: backend selection is
    traced, and the flash-attn probe (an import) could not be; it is now made when the
    layer is built, so the first compiled call works."""
    from espnet_mha import optional

    optional.reset()
    torch._dynamo.reset()
    stock, ours = stock_and_flash(8, 2, dtype=torch.float32)
    query, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[[True] * 5], [[True] * 3 + [False] * 2]])
    got, _ = torch.compile(ours, fullgraph=True, backend="eager")(query, memory, mask)
    torch.testing.assert_close(got, stock(query, memory, mask)[0], rtol=1e-5, atol=1e-5)


def test_a_users_fullgraph_compile_takes_a_first_mask_after_the_length_went_dynamic():
    """Unmasked calls at two memory lengths make T2 dynamic; the first masked call then
    failed under fullgraph with the layer's own "mask ... does not broadcast" error for a
    mask that fits: Dynamo read `11 not in (1, 11)` as true (an audit)."""
    torch._dynamo.reset()
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    for t2, masked in ((5, False), (9, False), (11, True), (13, True)):
        query, memory = rand(2, 3, 16, seed=t2), rand(2, t2, 16, seed=t2 + 1)
        mask = (torch.arange(t2) < torch.tensor([[t2], [t2 - 2]])).unsqueeze(1) if masked else None
        with torch.no_grad():
            torch.testing.assert_close(compiled(query, memory, mask)[0], stock(query, memory, mask)[0], **FP32)


def test_torch_func_transforms_and_forward_ad_run_a_compiled_layer_eagerly():
    """compile=True under torch.func (grad, vmap, jvp) or a forward-mode AD level: the
    fullgraph compile cannot run there ("Unsupported functorch tracing attempt"; no jvp for
    its graph), which failed every call where the stock layer, eager or compiled by the
    user, worked (an audit). Those calls run the eager function: no graph is made."""
    from torch.autograd import forward_ad
    from torch.func import grad, jvp, vmap

    torch._dynamo.reset()
    counters.clear()
    stock, ours = stock_and_flash(8, 2, compile=True)
    query, memory = rand(2, 3, 8, seed=1).double(), rand(2, 5, 8, seed=2).double()
    tangent = rand(2, 5, 8, seed=3).double()
    results = []
    for layer in (ours, stock):
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(layer(query, forward_ad.make_dual(memory, tangent))[0]).tangent
        results.append((grad(lambda m: layer(query, m)[0].sum())(memory),
                        vmap(lambda q, m: layer(q, m)[0])(query[None].repeat(3, 1, 1, 1), memory[None].repeat(3, 1, 1, 1)),
                        jvp(lambda m: layer(query, m)[0], (memory,), (tangent,))[1], dual))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert graphs() == 0


@pytest.mark.parametrize("layout", ["fused", "stock"])
def test_a_user_can_compile_with_fullgraph_a_layer_whose_linears_are_called_as_modules(layout, caplog):
    """A hooked projection (as LoRA or weight_norm, called as a module): the line saying so
    was a logging call, which fullgraph cannot trace (a probe: every first call failed). It
    is written once, when the call is traced, and the result is the stock layer's."""
    torch._dynamo.reset()
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32, state_dict_layout=layout)
    (ours.linear_k if layout == "stock" else ours.linear_qkv).register_forward_hook(lambda module, args, out: out * 1.5)
    for name in ("linear_k",) if layout == "stock" else ("linear_q", "linear_k", "linear_v"):
        getattr(stock, name).register_forward_hook(lambda module, args, out: out * 1.5)
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with caplog.at_level(logging.INFO, logger="espnet_mha"):
        compiled = torch.compile(ours, fullgraph=True, backend="eager")
        got = [compiled(query, memory)[0] for _ in range(2)]
    lines = [r.getMessage() for r in caplog.records if "as modules" in r.getMessage()]
    assert len(lines) == 1 and "it has hooks" in lines[0], lines
    for out in got:
        torch.testing.assert_close(out, stock(query, memory)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_users_compile_of_a_float64_model_trains(fullgraph, caplog):
    """torch.compile(model) by the user (the layer's own compile off): in float64 on CPU,
    Inductor's compiled SDPA backward fails (pytorch #185539), so the layer must take the
    math path there too, as under its own compile (it raised 'expected scalar type Double
    but found Float'; the stock layer under the same compile trains). The switch is
    logged once, when the call is traced (a probe found no line at any level)."""
    torch._dynamo.reset()
    stock, ours = stock_and_flash(32, 4, dtype=torch.float64)
    query = rand(2, 5, 32).double().requires_grad_(True)
    memory, mask = rand(2, 7, 32, seed=1).double(), torch.ones(2, 1, 7, dtype=torch.bool)
    mask[1, 0, 4:] = False
    compiled = torch.compile(ours, fullgraph=fullgraph)
    with caplog.at_level(logging.INFO, logger="espnet_mha"):
        for _ in range(3):
            got, _ = compiled(query, memory, mask)
    lines = [r.getMessage() for r in caplog.records if "instead of flash_attn" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("espnet_mha: using math instead of flash_attn: ") \
        and "185539" in lines[0], lines
    assert ours.last_backend == "math"
    (grad,) = torch.autograd.grad(got.sum(), query)
    expected, _ = stock(query, memory, mask)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), query)[0], rtol=1e-10, atol=1e-10)


def test_calls_beyond_the_recompile_limit_run_eagerly_and_say_so(monkeypatch, caplog):
    """Graphs of every layer, size 0/1 specialisation, mask form and grad mode count
    against one dynamo limit per function; a training loop reached 64 and the next call
    raised dynamo's fullgraph error. Beyond the limit a call now runs eagerly (the same
    results) with a warning, unless dynamo's own fail_on_recompile_limit_hit asks for the
    error. (Dynamo's eager backend: the same guards, no code generation.)"""
    import functools
    import logging

    torch._dynamo.reset()
    monkeypatch.setattr(compile_policy.torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(compile_policy, "MIN_RECOMPILE_LIMIT", 2)
    monkeypatch.setattr(compile_policy, "_FALLBACKS", {})
    compile_policy.compiled.cache_clear()
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32, compile=True)
    query, memory = rand(3, 4, 16), rand(3, 5, 16, seed=1)
    masks = [None, rand(3, 1, 5, seed=2) > -0.5, rand(3, 4, 5, seed=3) > -0.5]  # three call forms
    # recompile_limit is torch >= 2.7's name for cache_size_limit.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    try:
        with torch._dynamo.config.patch(**{limit: 2}), caplog.at_level(logging.WARNING):
            for mask in masks:
                torch.testing.assert_close(ours(query, memory, mask)[0], stock(query, memory, mask)[0], **FP32)
            assert compile_policy.eager_fallbacks() == {"attend": 1}
            assert "espnet_mha: compile=True: attend reached dynamo's recompile limit" in caplog.text
            if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                    with pytest.raises(compile_policy._LIMIT_HIT, match="fail_on_recompile_limit_hit"):
                        ours(query, memory, masks[2])
    finally:
        compile_policy.compiled.cache_clear()
        torch._dynamo.reset()
