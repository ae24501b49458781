"""Steps and torch.inference_mode: inference states, memories and zero masks serving steps with gradients."""

import pytest
import torch

from cache_cases import FP64, seq, stock_named_grads
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


def test_under_inference_mode_a_state_serves_the_next_steps():
    """Views of inference tensors have no ``_base``: BatchBeamSearch's fresh ``expand`` of the
    encoder output looked like another memory on every step, so every step recomputed."""
    stock, ours = stock_and_flash(16, 4)
    with torch.inference_mode():
        encoded = seq(1, 7, 16)
        query = seq(3, 16, seed=1)
        _, state = ours.step(query[:1], None, memory=encoded.expand(1, -1, -1))
        for _ in range(3):
            got, state = ours.step(query, state[:1], memory=encoded.expand(3, -1, -1))
            assert ours.last_cache == "reused"
            torch.testing.assert_close(got, stock.step(query, None, memory=encoded.expand(3, -1, -1))[0], **FP64)


def test_a_state_made_under_inference_mode_serves_a_step_with_gradients():
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 7, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    with torch.inference_mode():
        _, state = ours.step(query, None, memory=memory)
    got, _ = ours.step(query, state[:1], memory=memory)
    assert ours.last_cache == "recomputed: a state made under torch.inference_mode cannot be saved for backward"
    got.sum().backward()
    stock.step(query, None, memory=memory)[0].sum().backward()
    torch.testing.assert_close(ours.linear_out.weight.grad, stock.linear_out.weight.grad, **FP64)
    torch.testing.assert_close(stock_named_grads(ours)["linear_k.weight"], stock.linear_k.weight.grad, **FP64)


def test_an_inference_mode_memory_serves_a_step_with_gradients():
    """A frozen encoder run under inference_mode feeding decoder training: the batched GEMM
    saved the inference tensor for backward, which autograd refuses (stock: fine)."""
    stock, ours = stock_and_flash(16, 4)
    with torch.inference_mode():
        memory = seq(1, 7, 16)
    query = seq(3, 16, seed=1)
    out, _ = ours.step(query, None, memory=memory.expand(3, -1, -1))
    out.sum().backward()
    stock.step(query, None, memory=memory.expand(3, -1, -1))[0].sum().backward()
    torch.testing.assert_close(out, stock.step(query, None, memory=memory.expand(3, -1, -1))[0], **FP64)
    for name, grad in stock_named_grads(ours).items():
        torch.testing.assert_close(grad, stock.get_parameter(name).grad, **FP64)


def test_the_inference_tensor_itself_serves_a_step_with_gradients():
    """The inference tensor itself, not a view: the stock step raises (its linear_k saves
    it for backward); ours serves it, with the stock step's values and gradients on a
    copy of it; forward raises as the stock one does (README, "Differences")."""
    stock, ours = stock_and_flash(16, 4)
    with torch.inference_mode():
        memory = seq(2, 7, 16)
    query = seq(2, 16, seed=1)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        stock.step(query, None, memory=memory)
    out, _ = ours.step(query, None, memory=memory)
    out.sum().backward()
    expected, _ = stock.step(query, None, memory=memory.clone())
    expected.sum().backward()
    torch.testing.assert_close(out, expected, **FP64)
    for name, grad in stock_named_grads(ours).items():
        torch.testing.assert_close(grad, stock.get_parameter(name).grad, **FP64)
    for layer in (stock, ours):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            layer(query.unsqueeze(1), memory)


def test_the_zero_mask_of_unmasked_cpu_calls_is_made_once_and_serves_autograd():
    """Unmasked CPU SDPA calls get a remembered zero mask (pytorch #141128). The first one
    made under inference mode must still serve a forward and backward with gradients,
    where an inference tensor cannot be saved for backward."""
    from espnet_mha import kernels

    stock, ours = stock_and_flash(16, 4)
    kernels._ZERO_MASKS.clear()
    query = seq(2, 7, 16)
    with torch.inference_mode():
        ours(query, None, None)
    (mask,) = kernels._ZERO_MASKS.values()
    assert not mask.is_inference() and mask.shape == (1, 1, 1, 7) and not mask.any()
    query.requires_grad_(True)
    got, _ = ours(query, None, None)
    (grad,) = torch.autograd.grad(got.sum(), query)
    assert list(kernels._ZERO_MASKS.values()) == [mask]  # the same tensor served again
    stock_query = query.detach().requires_grad_(True)
    expected, _ = stock(stock_query, None, None)
    torch.testing.assert_close(got, expected, **FP64)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), stock_query)[0], **FP64)
