"""Attention dropout in decoding steps: applied in training as the stock step does, stopped in eval."""

import pytest
import torch

from cache_cases import FP64, seq

pytestmark = pytest.mark.usefixtures("layout")


def dropout_pair(p, **options):
    """The stock layer and ours with attention dropout ``p``, same weights, in training mode."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    from espnet_mha import FlashMultiHeadedAttention

    torch.manual_seed(0)
    stock = MultiHeadedAttention(12, 3, dropout=p).double().train()
    ours = FlashMultiHeadedAttention(12, 3, dropout=p, **options).double().train()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_steps_in_training_apply_dropout_as_the_stock_step(backend):
    """The stock step runs forward, so it drops attention weights in training.
    With p = 1 every weight is dropped: the output is the output bias, exactly."""
    stock, ours = dropout_pair(1.0, backend=backend)
    query, memory = seq(4, 12), seq(1, 7, 12).expand(4, -1, -1)
    bias = ours.linear_out.bias.expand(4, 12)
    _, state = ours.step(query, None, memory=memory)
    for got, _ in (ours.step(query, None, memory=memory), ours.step(query, state, memory=memory),
                   ours.step(query, state[:1], memory=memory), ours.step(query, state.contiguous(), memory=memory)):
        torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
        torch.testing.assert_close(got, bias, rtol=0, atol=0)
    _, causal = dropout_pair(1.0, backend=backend, causal=True)
    _, state = causal.step(query, None)
    torch.testing.assert_close(causal.step(query, state)[0], bias, rtol=0, atol=0)


def test_dropout_of_a_step_keeps_the_expectation_and_stops_in_eval():
    _, ours = dropout_pair(0.5)
    query, memory = seq(2, 12), seq(2, 40, 12, seed=1)
    _, state = ours.step(query, None, memory=memory)
    samples = torch.stack([ours.step(query, state, memory=memory)[0] for _ in range(400)])
    assert not torch.allclose(samples[0], samples[1])
    ours.eval()
    expected, _ = ours.step(query, state, memory=memory)
    torch.testing.assert_close(samples.mean(0), expected, rtol=0, atol=0.1)
    torch.testing.assert_close(ours.step(query, state, memory=memory)[0], expected, rtol=0, atol=0)
