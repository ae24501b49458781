"""Helpers shared by the decoding-cache tests (test_step_*, test_cache_*, test_shared_beam_cache, test_causal_steps)."""

import torch

FP64 = dict(rtol=1e-10, atol=1e-10)


def seq(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def stock_named_grads(layer):
    """Our layer's gradients under the stock names, in the stock order (None where none)."""
    named = {name: p.grad for name, p in layer.named_parameters()}
    if "linear_qkv.weight" in named:
        for param in ("weight", "bias"):
            grad = named.pop(f"linear_qkv.{param}")
            for x, part in zip("qkv", (None,) * 3 if grad is None else grad.chunk(3)):
                named[f"linear_{x}.{param}"] = part
    order = [f"linear_{x}.{param}" for x in ("q", "k", "v", "out") for param in ("weight", "bias")]
    return {name: named[name] for name in order}


def kv_weight_name(layer):
    """The parameter name of the weight our layer projects keys from."""
    return "linear_qkv.weight" if "linear_qkv" in layer._modules else "linear_k.weight"


class StepOf(torch.nn.Module):
    """``forward`` is the layer's ``step`` (what torch.func.functional_call calls)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, query, state, memory):
        return self.layer.step(query, state, memory=memory)[0]
