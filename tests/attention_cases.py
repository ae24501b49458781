"""Shared by the attention tests: the fp64 tolerance, the CUDA device, and an AttentionCall builder."""

import torch

from espnet_mha import masks
from espnet_mha.dispatch import AttentionCall

FP64 = dict(rtol=1e-10, atol=1e-10)
CUDA = torch.device("cuda")


def call(**overrides):
    base = dict(device=CUDA, dtype=torch.bfloat16, d_k=64, mask_kind=masks.NO_MASK)
    return AttentionCall(**{**base, **overrides})
