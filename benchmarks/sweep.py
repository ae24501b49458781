"""Where is the layer slower than the stock one? A sweep over shapes no benchmark case lists.

Exploratory, not a benchmark: for each configuration the stock layer and ours
(fused layout, eager, same weights) alternate in one process, five rounds of
a median over repeated calls, and the best round of each is compared. Prints
one line per configuration and the list of those where ours took more than
5% longer. Speed claims are made by the pytest-benchmark cases only.

    python -m benchmarks.sweep [--threads N] [--out sweep.txt]
"""

import argparse
import itertools
import statistics
import time

import torch

from espnet_mha.testing import stock_and_flash

WIDTHS = [(64, 2), (128, 4), (256, 4), (512, 8)]  # (D, H)


def best_of_medians(stock_fn, ours_fn, reps, rounds=5):
    """(stock seconds, ours seconds): the fastest of ``rounds`` medians of ``reps`` calls, alternating."""
    def median(fn):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for _ in range(3):
        stock_fn(), ours_fn()
    pairs = [(median(stock_fn), median(ours_fn)) for _ in range(rounds)]
    return min(p[0] for p in pairs), min(p[1] for p in pairs)


def key_padding(batch, t2, gen):
    lengths = torch.randint(max(1, t2 // 2), t2 + 1, (batch,), generator=gen)
    lengths[0] = t2
    return (torch.arange(t2)[None, :] < lengths[:, None]).unsqueeze(1)


def sequences(stock, ours, d):
    """Cross-attention inference and training, self-attention inference, per shape and mask."""
    for batch, t1, t2, masked in itertools.product([1, 8], [1, 5, 50], [10, 100, 400], [False, True]):
        gen = torch.Generator().manual_seed(0)
        query, memory = torch.randn(batch, t1, d, generator=gen), torch.randn(batch, t2, d, generator=gen)
        mask = key_padding(batch, t2, gen) if masked else None
        with torch.no_grad():
            yield ("cross_infer", batch, t1, t2, masked,
                   best_of_medians(lambda: stock(query, memory, mask), lambda: ours(query, memory, mask), 30))
        if t1 != 5:
            continue
        query.requires_grad_(True)

        def train(layer):
            layer.zero_grad(set_to_none=True)
            layer(query, memory, mask)[0].sum().backward()

        yield "cross_train", batch, t1, t2, masked, best_of_medians(lambda: train(stock), lambda: train(ours), 10)
        sequence = torch.randn(batch, t2, d, generator=gen)
        with torch.no_grad():
            yield ("self_infer", batch, t2, t2, masked,
                   best_of_medians(lambda: stock(sequence, None, mask), lambda: ours(sequence, None, mask), 10))


def decoding(stock, ours, d):
    """20 steps the way BatchBeamSearch calls them (1 hypothesis, then the beam)."""
    for beam, t2 in itertools.product([1, 4, 10], [10, 100, 400]):
        gen = torch.Generator().manual_seed(1)
        memory, queries = torch.randn(1, t2, d, generator=gen), torch.randn(20, beam, d, generator=gen)

        def decode(layer):
            state = None
            for t in range(20):
                batch = 1 if t == 0 else beam
                _, state = layer.step(queries[t, :batch], state, memory=memory.expand(batch, -1, -1))
                state = None if state is None else state[0].unsqueeze(0)

        with torch.no_grad():
            yield "decode_20_steps", beam, 1, t2, False, best_of_medians(lambda: decode(stock), lambda: decode(ours), 5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="also write the lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines, slower = [], []
    for d, h in WIDTHS:
        stock, ours = stock_and_flash(d, h, dtype=torch.float32)
        for case, batch, t1, t2, masked, (s, o) in itertools.chain(sequences(stock, ours, d), decoding(stock, ours, d)):
            line = (f"{case:16s} D={d:<4d} H={h} B={batch:<2d} T1={t1:<3d} T2={t2:<3d} mask={int(masked)} "
                    f"stock={s * 1e3:9.3f} ms ours={o * 1e3:9.3f} ms speed-up {s / o:6.2f}x")
            print(line, flush=True)
            lines.append(line)
            if o > 1.05 * s:
                slower.append(line)
    summary = [f"ours more than 5% slower in {len(slower)} of {len(lines)} configurations "
               f"({args.threads} thread(s), torch {torch.__version__}):", *slower]
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines + summary) + "\n")


if __name__ == "__main__":
    main()
