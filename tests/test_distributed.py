"""DistributedDataParallel parity: an ``S4Decoder`` with ``flash_mha`` trained for a few
Adam steps with DDP on 2 CPU processes (gloo) ends with the same parameters as one
process trained on the combined batch (fp64, within 1e-9), eager and compiled.

The workers are started with ``torch.multiprocessing`` (spawn) and meet through a
file in ``tmp_path`` (no port to collide on). Each rank collates its own half of the
batch, padded to its own longest utterance, as ESPnet's sampler and collate do.

ESPnet's S4 kernel (``SSKernelNPLR``) transforms its ``C`` parameter in place the
first time it sees a length and again whenever a longer one arrives
(``_setup_C``), and its output depends on that history (logits differ by about
1% here), with the stock ``mha`` as much as with ours. Replicas that see different
lengths would therefore differ for reasons that have nothing to do with
attention, so every model is first run once at ``MAX_TOKENS``, longer than any
training batch.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from espnet_mha.layer import FlashMultiHeadedAttention
from espnet_mha.testing import build_s4_decoder

WORLD = 2
PER_RANK = 2
STEPS = 3
VOCAB, D_MODEL, N_HEAD, N_LAYERS = 11, 16, 4, 2
MAX_TOKENS = 8
TOL = dict(rtol=1e-9, atol=1e-9)
TIMEOUT_S = {"eager": 120, "compiled": 540}

# The environment overrides the layer's options; the workers must run what the test asks.
ENV_OVERRIDES = ("ESPNET_MHA_COMPILE", "ESPNET_MHA_BACKEND", "ESPNET_MHA_COMPILE_MODE")


def make_model(compile, layout="fused"):
    model = build_s4_decoder("flash_mha", vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS,
                             n_head=N_HEAD, seed=0, layer_options={"compile": compile, "state_dict_layout": layout})
    model.double().train()
    with torch.no_grad():  # fix every S4 kernel's internal length (see the module docstring)
        model(torch.zeros(1, 1, D_MODEL, dtype=torch.float64), torch.tensor([1]),
              torch.zeros(1, MAX_TOKENS, dtype=torch.long), torch.tensor([MAX_TOKENS]))
    return model


def combined_batch(step):
    """WORLD * PER_RANK utterances of different encoder and token lengths (seeded by step)."""
    gen = torch.Generator().manual_seed(1000 + step)
    n = WORLD * PER_RANK
    hlens = torch.tensor([9, 4, 7, 6])[torch.randperm(n, generator=gen)]
    ylens = torch.tensor([5, 2, 4, 3])[torch.randperm(n, generator=gen)]  # <= MAX_TOKENS
    hs = torch.randn(n, int(hlens.max()), D_MODEL, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, VOCAB, (n, int(ylens.max()) + 1), generator=gen)
    return hs, hlens, ys, ylens


def shard(batch, rank):
    """Rank ``rank``'s utterances, re-padded to their own longest lengths."""
    hs, hlens, ys, ylens = (x[rank * PER_RANK : (rank + 1) * PER_RANK] for x in batch)
    return hs[:, : int(hlens.max())], hlens, ys[:, : int(ylens.max()) + 1], ylens


def loss_fn(model, hs, hlens, ys, ylens):
    """Teacher-forced token NLL, summed per utterance, averaged over the utterances."""
    logits, _ = model(hs, hlens, ys[:, :-1], ylens)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ys[:, 1:], reduction="none")
    valid = torch.arange(ys.size(1) - 1)[None] < ylens[:, None]
    return (nll * valid).sum(1).mean()


def train(model, batches):
    # Equal shard sizes: DDP's average of the per-rank means is the mean over the combined batch.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(model, *batch).backward()
        optimizer.step()


def _worker(rank, init_file, out_dir, compile, layout):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S["compiled"]))
    try:
        model = make_model(compile, layout)
        ddp = DistributedDataParallel(model)
        train(ddp, [shard(combined_batch(step), rank) for step in range(STEPS)])
        layers = [m for m in model.modules() if isinstance(m, FlashMultiHeadedAttention)]
        assert layers and all(m.compile_setting is compile for m in layers)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp(tmp_path, compile, layout, timeout):
    context = mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), compile, layout),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=5):  # re-raises a worker's exception
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


# pytorch #185539 (fixed by PR #185573, after torch 2.11): Inductor's meta function
# gives the CPU flash-attention logsumexp float32, so a compiled fp64 SDPA backward
# fails. Only that exact failure is expected; anything else fails the test.
COMPILED_FP64_BUG = "expected scalar type Double but found Float"


@pytest.mark.parametrize("mode", ["eager", "eager-stock_layout", pytest.param("compiled", marks=pytest.mark.slow)])
def test_ddp_on_two_processes_equals_one_process_on_the_combined_batch(mode, tmp_path, monkeypatch):
    """Also with the stock parameters (linear_q/k/v stacked per call), whose gradients
    DDP reduces per linear."""
    for name in ENV_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    compile = mode == "compiled"
    layout = "stock" if mode.endswith("stock_layout") else "fused"
    try:
        ranks = run_ddp(tmp_path, compile, layout, TIMEOUT_S[mode.split("-")[0]])
    except mp.ProcessRaisedException as exc:
        if compile and "CppCompileError" in str(exc) and torch.__version__ < "2.6":
            pytest.xfail("BUG: torch 2.5's inductor emits fp64 AVX512 C++ its compiler rejects (fmadd of "
                         "VectorizedN<double, 2>); fixed in torch 2.6")
        if compile and COMPILED_FP64_BUG in str(exc):
            pytest.xfail(
                "BUG: compile=True fails in fp64 CPU training (pytorch #185539): the compiled SDPA "
                "backward raises 'expected scalar type Double but found Float'; route compiled "
                "fp64 CPU calls to the math backend until a fixed torch is the floor"
            )
        raise

    # The reference: one process, eager, the whole batch every step.
    reference = make_model(False, layout)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    train(reference, [combined_batch(step) for step in range(STEPS)])
    expected = reference.state_dict()

    assert ranks[0].keys() == expected.keys()
    assert any(k.endswith("linear_qkv.weight" if layout == "fused" else "linear_k.weight") for k in expected)
    for key, value in expected.items():
        torch.testing.assert_close(ranks[0][key], value, **TOL, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)
    # The steps did train the attention layers (the comparison is not of untouched weights).
    # (Not linear_k.bias alone: the softmax ignores it, its gradient is rounding noise.)
    moved = [(expected[k] - initial[k]).abs().max().item() for k in expected
             if ("linear_qkv" in k if layout == "fused" else "linear_q." in k or "linear_k.weight" in k
                 or "linear_v." in k)]
    assert min(moved) > 1e-4
