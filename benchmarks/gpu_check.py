"""One-command GPU check: equivalence per backend, fragile lengths, compile, timings.

Usage (on a CUDA machine, after ``make setup`` and optionally ``pip install flash-attn``)::

    python -m benchmarks.gpu_check --out gpu_check.json

``--device cpu --quick`` runs the same checks on the CPU (CI uses it so the
script cannot rot). Exit status 1 if any check fails. Writes a JSON file and
prints a table.

Checks:
- equivalence with the stock layer per backend (flash_attn when installed,
  sdpa, math): fp32 against stock fp32; fp16/bf16 error against an fp64
  reference at most twice the stock layer's error in the same dtype (the stock
  layer cannot mask in bf16 -- numpy has no bfloat16 -- so its unmasked bf16
  error is the baseline there);
- fully masked rows give the output bias, never NaN, forward and backward;
- lengths upstream trackers report as fragile: T2 % 128 == 64 with a mask and
  gradients (cuDNN attention NaN, pytorch #196678), kv length % 32 == 1 with
  a beam-expanded (stride-0) memory, and with the stride-0 state a step
  returns for it handed back as it is (memory-efficient kernel, #191937);
- NaN is never hidden: a NaN query row or a NaN key column (from a NaN
  weight), unmasked, gives NaN wherever the stock layer does, per backend, in
  ``forward`` and ``step`` (SDPA's CPU kernel returns zeros there without a
  mask, pytorch #141128; whether CUDA kernels do is what this checks);
- torch.compile(fullgraph=True) of every path, no graph breaks;
- the flash-attn cases of ``benchmarks/gpu_cases.py``, per backend (auto, flash_attn
  where it can serve the call, sdpa, math) and dtype, forward and gradients, our
  error against the fp64 stock result at most twice the stock layer's in the
  same dtype (our math backend's where the stock layer cannot run: bf16 with a
  mask): causal self-attention against the stock layer given an explicit causal
  mask, alone and with padding (auto must route that to SDPA); attention dropout
  (eval matches stock; in training one-hot values expose the dropped weights:
  rate p, scale 1/(1-p), the same ones dropped in the backward, per seed); key
  masks with holes (flash-attn's varlen call) and per-query masks (auto must
  route them to SDPA); T % 128 == 64 with masks and gradients under each of
  PyTorch's SDPA kernels forced in turn. Without flash-attn they run the other
  backends and record why it was left out;
- timings of stock vs ours: cross-attention training step (fp32 and fp16
  autocast) and 50 decoding steps with a beam of 10.
"""

import argparse
import json
import sys
import time

import torch
from torch._dynamo.utils import counters

from benchmarks import gpu_cases
from benchmarks.gpu_cases import backends, compare, key_padding, max_err, note_flash, pairs, rand, record
from espnet_mha import FlashMultiHeadedAttention, dispatch, optional
from espnet_mha.dispatch import MATH, SDPA
from espnet_mha.testing import stock_and_flash


def check_equivalence(device, quick):
    n_feat, n_head = (32, 4) if quick else (256, 4)
    for backend in backends(device):
        for t2 in ((7, 33) if quick else (64, 192, 300, 320)):
            query, memory = rand(3, 9, n_feat, seed=1, device=device), rand(3, t2, n_feat, seed=2, device=device)
            mask = key_padding(3, t2, device)
            stock, ours = stock_and_flash(n_feat, n_head, dtype=torch.float64, device=device, backend=backend)
            reference, _ = stock(query.double(), memory.double(), mask)
            unmasked_reference, _ = stock(query.double(), memory.double())
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                stock.to(dtype), ours.to(dtype)
                try:
                    got, _ = ours(query.to(dtype), memory.to(dtype), mask)
                except dispatch.BackendUnavailableError as exc:
                    record("equivalence", True, backend=backend, dtype=str(dtype), t2=t2, skipped=str(exc)[:60])
                    continue
                ours_err = max_err(got, reference)
                if dtype == torch.bfloat16:
                    baseline = max_err(stock(query.to(dtype), memory.to(dtype))[0], unmasked_reference)
                else:
                    baseline = max_err(stock(query.to(dtype), memory.to(dtype), mask)[0], reference)
                bound = 1e-4 if dtype == torch.float32 else 2 * baseline
                ok = not got.isnan().any() and ours_err <= max(bound, 1e-6)
                record("equivalence", ok, backend=ours.last_backend, dtype=str(dtype).replace("torch.", ""),
                       t2=t2, err=f"{ours_err:.2e}", stock_err=f"{baseline:.2e}")
                stock.double(), ours.double()


def check_masked_rows_and_gradients(device, quick):
    """Fully masked rows and the cuDNN-fragile lengths (T2 % 128 == 64) with gradients."""
    for dtype in (torch.float32, torch.float16):
        for t2 in ((5, 64) if quick else (64, 192, 320, 300)):
            stock, ours = stock_and_flash(64, 4, dtype=dtype, device=device)
            query = rand(4, 16, 64, seed=3, device=device, dtype=dtype).requires_grad_()
            memory = rand(4, t2, 64, seed=4, device=device, dtype=dtype).requires_grad_()
            mask = key_padding(4, t2, device, seed=t2)
            out, _ = ours(query, memory, mask)
            out.float().square().sum().backward()
            finite = bool(out.isfinite().all() and query.grad.isfinite().all() and memory.grad.isfinite().all())
            bias_rows = torch.equal(out[-1], ours.linear_out.bias.expand(16, -1))
            record("masked_rows_and_grads", finite and bias_rows, dtype=str(dtype).replace("torch.", ""), t2=t2,
                   backend=ours.last_backend, finite=finite, bias_rows=bias_rows)


def check_expanded_memory_steps(device, quick):
    """kv length % 32 == 1 with the beam-expanded memory (#191937)."""
    for dtype in (torch.float32, torch.float16):
        for t2 in ((33,) if quick else (33, 97, 289, 300)):
            stock, ours = stock_and_flash(64, 4, dtype=dtype, device=device)
            memory = rand(1, t2, 64, seed=5, device=device, dtype=dtype).expand(10, -1, -1)
            query = rand(10, 64, seed=6, device=device, dtype=dtype)
            expected, _ = stock.step(query, None, memory=memory)
            _, state = ours.step(query[:1], None, memory=memory[:1])
            got, _ = ours.step(query, state[0].unsqueeze(0), memory=memory)
            err = max_err(got, expected)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            record("expanded_memory_step", err <= tol, dtype=str(dtype).replace("torch.", ""), t2=t2,
                   backend=ours.last_backend, err=f"{err:.2e}")


def check_expanded_state_steps(device, quick):
    """The decoding state a step returns for a beam-expanded memory is a stride-0 view; handed
    back as it is, its keys and values reach the kernel with stride 0 (kv length % 32 == 1:
    memory-efficient kernel, pytorch #191937), with and without a key mask; against the stock
    ``step``, per backend and per SDPA kernel."""
    note_flash("expanded_state_step", device)
    n_feat, n_head, beam = (32, 4, 4) if quick else (256, 4, 10)
    make_pair = pairs(n_feat, n_head, device)
    for t2 in ((33,) if quick else (33, 97, 289)):
        memory = rand(1, t2, n_feat, seed=60 + t2, device=device)
        first, second = rand(beam, n_feat, seed=61, device=device), rand(beam, n_feat, seed=62, device=device)
        holes = torch.rand(beam, 1, t2, generator=torch.Generator().manual_seed(t2)) > 0.3
        holes[..., 0] = True  # no hypothesis without keys

        def run(layer, mask):
            dtype = layer.linear_out.weight.dtype
            expanded = memory.to(dtype).expand(beam, -1, -1)
            with torch.no_grad():
                if not isinstance(layer, FlashMultiHeadedAttention):  # the stock step re-projects the memory
                    return [layer.step(second.to(dtype), None, memory=expanded, mask=mask)[0].double()]
                # Unmasked: with a shared memory the first step folds the beam into one batch, where a
                # per-hypothesis key mask becomes a per-query mask that forced flash_attn refuses.
                _, state = layer.step(first.to(dtype), None, memory=expanded)
                out, _ = layer.step(second.to(dtype), state, memory=expanded, mask=mask)
            if state.stride(0) != 0 or layer.last_cache != "reused":
                raise RuntimeError(f"not the case under test: state strides {state.stride()}, "
                                   f"cache {layer.last_cache!r}")
            return [out.double()]

        for mask in (None, holes.to(device)):
            unmasked_cpu = mask is None and device.type == "cpu"  # unmasked CPU steps run the math backend
            compare("expanded_state_step", device, make_pair, run, stock_mask=mask, mask=mask, expressible=True,
                    auto_fallback=MATH if unmasked_cpu else SDPA, sdpa_kernels=True, t2=t2,
                    masked=mask is not None)


def check_nan_rows(device, quick):
    """Unmasked calls with a NaN query row or a NaN key column: NaN wherever the stock layer has it."""
    n_feat, n_head = 32, 4
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.float16)
    for backend in backends(device):
        for dtype in dtypes:
            for where in ("query", "key_weight"):
                stock, ours = stock_and_flash(n_feat, n_head, dtype=torch.float32, device=device, backend=backend)
                if where == "key_weight":
                    with torch.no_grad():
                        stock.linear_k.weight[2, :] = float("nan")
                    ours.load_state_dict(stock.state_dict())
                query = rand(3, 5, n_feat, seed=7, device=device)
                memory = rand(3, 11, n_feat, seed=8, device=device)
                if where == "query":
                    query[1, 2, 3] = float("nan")
                expected = stock(query, memory)[0].isfinite()
                expected_step = stock.step(query[:, 2], None, memory=memory)[0].isfinite()
                ours.to(dtype)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    try:
                        got = ours(query.to(dtype), memory.to(dtype))[0].isfinite()
                        _, state = ours.step(query[:, 1].to(dtype), None, memory=memory.to(dtype))
                        got_step = ours.step(query[:, 2].to(dtype), state, memory=memory.to(dtype))[0].isfinite()
                    except dispatch.BackendUnavailableError as exc:
                        record("nan_rows", True, backend=backend, dtype=str(dtype), skipped=str(exc)[:60])
                        continue
                hidden = int((got & ~expected).sum()) + int((got_step & ~expected_step).sum())
                record("nan_rows", hidden == 0, backend=ours.last_backend, dtype=str(dtype).replace("torch.", ""),
                       where=where, hidden=hidden)


def check_compile(device, quick):
    counters.clear()
    _, ours = stock_and_flash(64, 4, dtype=torch.float32, device=device, compile=True)
    _, eager = stock_and_flash(64, 4, dtype=torch.float32, device=device, compile=False)
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    ok, err = True, 0.0
    try:
        for dtype in dtypes:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for t1, t2 in ((5, 9), (7, 300)):
                    query, memory = rand(3, t1, 64, seed=t2, device=device), rand(3, t2, 64, seed=t1, device=device)
                    for mask in (None, key_padding(3, t2, device)):
                        err = max(err, max_err(ours(query, memory, mask)[0], eager(query, memory, mask)[0]))
                memory = rand(1, 33, 64, seed=9, device=device).expand(4, -1, -1)
                err = max(err, max_err(ours.step(memory[:, 0], None, memory=memory)[0],
                                       eager.step(memory[:, 0], None, memory=memory)[0]))
    except Exception as exc:  # a graph break under fullgraph=True raises
        ok = False
        record("compile_fullgraph", False, error=repr(exc)[:300])
        return
    breaks = sum(counters["graph_break"].values())
    record("compile_fullgraph", ok and breaks == 0 and err < 5e-2, graphs=counters["stats"]["unique_graphs"],
           graph_breaks=breaks, max_err_vs_eager=f"{err:.2e}")


def timed(fn, device, repeat):
    fn()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timings(device, quick):
    size = dict(batch=2, t1=8, t2=20, n_feat=32) if quick else dict(batch=8, t1=60, t2=300, n_feat=256)
    repeat = 3 if quick else 30
    rows = []
    for amp in (None, torch.float16):
        if amp is not None and device.type != "cuda":
            continue
        stock, ours = stock_and_flash(size["n_feat"], 4, dtype=torch.float32, device=device)
        _, compiled = stock_and_flash(size["n_feat"], 4, dtype=torch.float32, device=device, compile=True)
        impls = {"stock": stock, "flash_mha": ours, "flash_mha-compiled": compiled}
        query = rand(size["batch"], size["t1"], size["n_feat"], seed=1, device=device).requires_grad_()
        memory = rand(size["batch"], size["t2"], size["n_feat"], seed=2, device=device)
        mask = key_padding(size["batch"], size["t2"], device)
        mask[-1] = True

        def train_step(layer):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out, _ = layer.train()(query, memory, mask)
            out.float().sum().backward()

        for name, layer in impls.items():
            rows.append(dict(scenario=f"cross_train{'_amp16' if amp else ''}", impl=name,
                             median_ms=1e3 * timed(lambda: train_step(layer), device, repeat)))
    steps, beam = (5, 4) if quick else (50, 10)
    stock, ours = stock_and_flash(size["n_feat"], 4, dtype=torch.float32, device=device)
    memory = rand(1, size["t2"], size["n_feat"], seed=3, device=device)
    queries = rand(steps, beam, size["n_feat"], seed=4, device=device)

    def decode(layer):
        state = None
        with torch.no_grad():
            for t in range(steps):
                batch = 1 if t == 0 else beam
                _, state = layer.step(queries[t, :batch], state, memory=memory.expand(batch, -1, -1))
                state = None if state is None else state[0].unsqueeze(0)

    for name, layer in (("stock", stock), ("flash_mha", ours)):
        rows.append(dict(scenario=f"decode_{steps}_steps", impl=name, median_ms=1e3 * timed(lambda: decode(layer), device, repeat)))
    for row in rows:
        base = next(r for r in rows if r["scenario"] == row["scenario"] and r["impl"] == "stock")
        row["speedup"] = base["median_ms"] / row["median_ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    info = {**optional.versions(), "device": str(device), "flash_attn_reason": optional.flash_attn().reason}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = optional.capability_str(optional.device_capability(device))
    print(json.dumps(info, indent=1))
    results = gpu_cases.RESULTS
    results.clear()
    for check in (check_equivalence, check_masked_rows_and_gradients, check_expanded_memory_steps, check_nan_rows,
                  check_compile, gpu_cases.check_causal, gpu_cases.check_dropout, gpu_cases.check_holed_masks,
                  gpu_cases.check_fragile_lengths, check_expanded_state_steps):
        check(device, args.quick)
    rows = timings(device, args.quick)
    print("\n| scenario | impl | median | speed-up |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['scenario']} | {row['impl']} | {row['median_ms']:.3f} ms | {row['speedup']:.2f}x |")
    failed = [r for r in results if not r["ok"]]
    with open(args.out, "w") as f:
        json.dump({"info": info, "checks": results, "timings": rows, "failed": len(failed)}, f, indent=1)
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
