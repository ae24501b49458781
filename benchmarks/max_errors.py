"""Maximum errors of flash_mha against ESPnet's stock layer over seeded random configurations.

Usage: ``python -m benchmarks.max_errors [--cases 200] [--per-item]``. Uses the same random
configurations as the tests (``tests/conftest.py::random_case``): sizes from 1,
head sizes 1-16, every mask layout and dtype, fully masked rows, self- and
cross-attention. Prints the maximum absolute error of the forward pass (fp64,
fp32), of the query gradient (fp64) and of cached ``step`` against the stock
``step`` (fp64), and the forward's error relative to the output's scale.
``--per-item`` runs every masked call through the padded-key path
(:mod:`espnet_mha.packing`), which these small sizes would not otherwise take.
"""

import argparse

import torch

from espnet_mha import packing
from espnet_mha.testing import stock_and_flash
from tests.conftest import random_case


def max_abs(a, b):
    return float((a.detach() - b.detach()).abs().max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--per-item", action="store_true", help="force the padded-key (per-item) path")
    args = parser.parse_args(argv)
    if args.per_item:
        packing.ITEM_COST_MACS = 0
    torch.set_num_threads(1)
    worst = dict(forward_fp64=0.0, forward_fp64_relative=0.0, forward_fp32=0.0, query_grad_fp64=0.0, step_fp64=0.0)
    for seed in range(args.cases):
        case = random_case(seed)
        for dtype, key in ((torch.float64, "forward_fp64"), (torch.float32, "forward_fp32")):
            stock, ours = stock_and_flash(case.n_feat, case.n_head, dtype=dtype, seed=seed)
            query, memory, mask = case.tensors(dtype)
            expected, got = stock(query, memory, mask)[0], ours(query, memory, mask)[0]
            worst[key] = max(worst[key], max_abs(got, expected))
            if dtype == torch.float64:
                scale = float(expected.detach().abs().max().clamp_min(1e-30))
                worst["forward_fp64_relative"] = max(worst["forward_fp64_relative"], max_abs(got, expected) / scale)
        stock, ours = stock_and_flash(case.n_feat, case.n_head, seed=seed)
        grads = []
        for layer in (stock, ours):
            query, memory, mask = case.tensors()
            query.requires_grad_(True)
            layer(query, memory, mask)[0].square().sum().backward()
            grads.append(query.grad)
        worst["query_grad_fp64"] = max(worst["query_grad_fp64"], max_abs(grads[1], grads[0]))
        if not case.self_attention:
            query, memory, mask = case.tensors()
            key_mask = mask if mask is not None and mask.size(1) == 1 else None
            state = None
            with torch.no_grad():
                for t in range(case.t1):
                    expected, _ = stock.step(query[:, t], None, memory=memory, mask=key_mask)
                    got, state = ours.step(query[:, t], state, memory=memory, mask=key_mask)
                    worst["step_fp64"] = max(worst["step_fp64"], max_abs(got, expected))
    path = " (masked calls per item)" if args.per_item else ""
    print(f"{args.cases} random configurations against espnet2's MultiHeadedAttention{path}:")
    for key, value in worst.items():
        print(f"  {key:22s} {value:.2e}")


if __name__ == "__main__":
    main()
