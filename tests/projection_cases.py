"""Seeded inputs, and the stock layer's q/k/v view of a called linear_qkv (Rows), shared by the projection tests."""

import torch
from torch import nn


def seq(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Rows(nn.Module):
    """Rows ``[start, stop)`` of a module's output: the stock layer's q/k/v view of our
    adapted ``linear_qkv``."""

    def __init__(self, module, start, stop):
        super().__init__()
        self.module, self.start, self.stop = module, start, stop

    def forward(self, x):
        return self.module(x)[..., self.start:self.stop]
