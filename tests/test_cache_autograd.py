"""A state's autograd graph: recomputed where it cannot carry the gradients the stock step gives."""

import contextlib

import pytest
import torch

from cache_cases import FP64, StepOf, kv_weight_name, seq, stock_named_grads
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


@pytest.mark.parametrize("case", ["no_grad_first_step", "detached_memory", "frozen_weights"])
def test_a_state_whose_graph_does_not_fit_the_step_is_recomputed(case):
    """A state carries the autograd graph of its projection. Made under no_grad and reused
    with gradients, the memory and the k/v weights got no gradient (stock: norms 1.3 and
    1.7); made from a memory that required grad and reused with ``memory.detach()``, or
    with weights frozen since, gradients leaked to where the stock step sends none."""
    stock, ours = stock_and_flash(16, 4)
    leaf, query = seq(1, 7, 16).requires_grad_(True), seq(3, 16, seed=1)
    memory = leaf.expand(3, -1, -1)  # as BatchBeamSearch passes it
    _, good = ours.step(query[:1], None, memory=leaf)
    ours.step(query, good[:1], memory=memory)  # reused: the signature is remembered (the fast path)
    assert ours.last_cache == "reused" and ours._checked_steps
    context = torch.no_grad() if case == "no_grad_first_step" else contextlib.nullcontext()
    with context:
        _, state = ours.step(query[:1], None, memory=leaf)
    given = memory.detach() if case == "detached_memory" else memory
    if case == "frozen_weights":
        for layer in (stock, ours):
            layer.requires_grad_(False)
    for layer in (stock, ours):
        layer.zero_grad(set_to_none=True)
    leaf.grad = None
    out, _ = ours.step(query, state[:1], memory=given)
    out.sum().backward()
    got = (leaf.grad, *stock_named_grads(ours).values())
    assert ours.last_cache.startswith("recomputed")
    leaf.grad = None
    stock.step(query, None, memory=given)[0].sum().backward()
    expected = (leaf.grad, *(p.grad for p in stock.parameters()))
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, **FP64)


@pytest.mark.parametrize("swap", ["memory", "weights"])
def test_a_state_is_recomputed_for_a_detached_copy_that_requires_grad(swap):
    """``x.detach().requires_grad_()`` has the address, write counter and flags of ``x``, but
    a state's graph reaches only ``x`` (a memory swapped so, or weights through
    torch.func.functional_call): the copy got no gradient (stock: 0.66 on the k/v rows)."""
    stock, ours = stock_and_flash(16, 4)
    leaf, query = seq(1, 7, 16).requires_grad_(True), seq(3, 16, seed=1)
    _, state = ours.step(query[:1], None, memory=leaf)
    memory = leaf.detach().requires_grad_(True) if swap == "memory" else leaf
    wrapper = StepOf(ours)
    params = {name: p.detach().requires_grad_(True) for name, p in wrapper.named_parameters()}
    if swap == "memory":
        out = wrapper(query, state[:1], memory.expand(3, -1, -1))
    else:
        out = torch.func.functional_call(wrapper, params, (query, state[:1], memory.expand(3, -1, -1)))
    assert ours.last_cache.startswith("recomputed")
    name = kv_weight_name(ours)
    got = torch.autograd.grad(out.sum(), memory if swap == "memory" else params[f"layer.{name}"])[0]
    stock_out = stock.step(query, None, memory=memory.expand(3, -1, -1))[0]
    if swap == "memory":
        expected = torch.autograd.grad(stock_out.sum(), memory)[0]
    elif name == "linear_k.weight":
        expected = torch.autograd.grad(stock_out.sum(), stock.linear_k.weight)[0]
    else:
        stock_out.sum().backward()
        expected = torch.cat([getattr(stock, f"linear_{x}").weight.grad for x in "qkv"])
    torch.testing.assert_close(got, expected, **FP64)


def test_a_state_reused_without_gradients_keeps_its_graph():
    """A no-grad step that reuses a state made with gradients must not record it as made
    without them: the next step with gradients reuses it (it recomputed needlessly)."""
    _, ours = stock_and_flash(16, 4)
    leaf, query = seq(1, 7, 16).requires_grad_(True), seq(3, 16, seed=1)
    _, state = ours.step(query[:1], None, memory=leaf)
    with torch.no_grad():
        ours.step(query, state[:1], memory=leaf.expand(3, -1, -1))
    assert ours.last_cache == "reused"
    ours.step(query, state[:1], memory=leaf.expand(3, -1, -1))
    assert ours.last_cache == "reused"


@pytest.mark.parametrize("how", ["detach", "no_grad_step"])
def test_a_state_without_a_graph_is_recomputed_when_gradients_are_needed(how):
    """Training through the steps with a backward every two steps, the state detached after
    each (the habit that avoids backward through a freed graph), or a state returned by a
    step without gradients: its keys would carry no gradient to the memory and the k/v
    weights (they were reused: 0.4-4.7 off the stock step's gradients)."""
    stock, ours = stock_and_flash(16, 4)
    names = [name for name, _ in stock.named_parameters()]

    caches = []

    def train(layer):
        memory = seq(2, 5, 16, seed=1).requires_grad_(True)
        params = [memory, *layer.parameters()]
        grads, state, loss = [torch.zeros_like(p) for p in params], None, 0
        for t in range(6):
            if how == "no_grad_step" and t % 2 == 1 and state is not None:
                with torch.no_grad():
                    state = layer.step(seq(2, 16, seed=50 + t), state, memory=memory)[1]
            out, state = layer.step(seq(2, 16, seed=t), state, memory=memory)
            caches.append(getattr(layer, "last_cache", "stock"))
            loss = loss + out.pow(2).sum()
            if t % 2 == 1:
                grads = [g + d for g, d in zip(grads, torch.autograd.grad(loss, params))]
                loss, state = 0, state.detach() if state is not None else None
        return grads

    expected, got = train(stock), train(ours)
    reason = "recomputed: the state carries no graph, and the memory or the key/value weights need gradients"
    assert caches[6:] == ["filled", "reused", reason, "reused", reason, "reused"]
    torch.testing.assert_close(got[0], expected[0], **FP64)
    ours_grads = dict(zip([name for name, _ in ours.named_parameters()], got[1:]))
    stock_grads = dict(zip(names, expected[1:]))
    torch.testing.assert_close(ours_grads["linear_out.weight"], stock_grads["linear_out.weight"], **FP64)
    kv = ours_grads.get("linear_k.weight")
    if kv is None:  # the fused layout: rows q, k, v
        kv = ours_grads["linear_qkv.weight"][16:32]
    torch.testing.assert_close(kv, stock_grads["linear_k.weight"], **FP64)


def _split_under_no_grad(state, step):
    with torch.no_grad():
        return state[0].unsqueeze(0)


def _split_off_a_no_grad_step(state, step):
    with torch.no_grad():
        state = step(state[0].unsqueeze(0))  # a batch-1 state: the step returns a new, graph-less view
    return state[0].unsqueeze(0)  # BatchBeamSearch's split, with gradients on


def _split_off_a_detached_copy(state, step):
    return state.detach().requires_grad_(True)[0].unsqueeze(0)


@pytest.mark.parametrize("hand_over", [_split_under_no_grad, _split_off_a_no_grad_step, _split_off_a_detached_copy])
def test_a_view_of_a_state_without_a_graph_is_recomputed_when_gradients_are_needed(hand_over):
    """A state whose own grad_fn is set (a view made with gradients on) but whose graph ends
    at a tensor without one: the state a step without gradients returned, a split made
    under no_grad, a ``detach().requires_grad_()`` copy. Reused, its keys gave the memory no
    gradient and the k/v weights none (stock: up to 2.2 on them)."""
    stock, ours = stock_and_flash(16, 4)
    memory = seq(1, 5, 16, seed=1).requires_grad_(True)
    beam = memory.expand(3, -1, -1)
    _, state = ours.step(seq(3, 16, seed=2), None, memory=beam)
    state = hand_over(state, lambda s: ours.step(seq(3, 16, seed=3), s, memory=beam)[1])
    query = seq(3, 16, seed=4)
    got = ours.step(query, state, memory=beam)[0]
    assert ours.last_cache.startswith("recomputed: the state carries no graph")
    expected = stock.step(query, None, memory=beam)[0]
    torch.testing.assert_close(got, expected, **FP64)
    weights = seq(*got.shape, seed=5)
    (got * weights).sum().backward()
    stock_memory_grad = torch.autograd.grad((expected * weights).sum(), [memory, *stock.parameters()])
    torch.testing.assert_close(memory.grad, stock_memory_grad[0], **FP64)
    stock_grads = dict(zip([name for name, _ in stock.named_parameters()], stock_memory_grad[1:]))
    for name, grad in stock_named_grads(ours).items():
        torch.testing.assert_close(grad, stock_grads[name], **FP64)


def test_a_memory_view_made_under_no_grad_gets_the_gradient_of_its_step():
    """A memory view made under no_grad is a leaf of its own (no grad_fn): the step's memory
    gradient goes to it, not to its base. A cache made from a view made with gradients
    reached the base, and was reused: the step's gradient leaked into the base (1.08 off)."""
    stock, ours = stock_and_flash(16, 4)
    base_ours, base_stock = seq(1, 5, 16, seed=1).requires_grad_(True), seq(1, 5, 16, seed=1).requires_grad_(True)
    first, second = seq(3, 16, seed=2), seq(3, 16, seed=3)
    out_ours, state = ours.step(first, None, memory=base_ours.expand(3, -1, -1))
    out_stock = stock.step(first, None, memory=base_stock.expand(3, -1, -1))[0]
    with torch.no_grad():
        view_ours, view_stock = base_ours.expand(3, -1, -1), base_stock.expand(3, -1, -1)
    out_ours = out_ours + ours.step(second, state, memory=view_ours)[0]
    assert ours.last_cache.startswith("recomputed")
    out_stock = out_stock + stock.step(second, None, memory=view_stock)[0]
    out_ours.sum().backward()
    out_stock.sum().backward()
    torch.testing.assert_close(base_ours.grad, base_stock.grad, **FP64)
    torch.testing.assert_close(view_ours.grad, view_stock.grad, **FP64)
