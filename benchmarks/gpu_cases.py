"""The GPU check's helpers and its flash-attn cases: causal self-attention, attention dropout,
masks with holes, fragile lengths. Each compares our layer with the stock layer on seeded inputs
per backend (auto; flash_attn where it can serve the call here; sdpa; math) and dtype, appending
records to :data:`RESULTS`; without flash-attn (a CPU dry run) it records why it was left out.
"""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from espnet_mha import dispatch, masks
from espnet_mha.dispatch import AUTO, FLASH_ATTN, MATH, SDPA
from espnet_mha.testing import stock_and_flash

RESULTS = []
# PyTorch's own SDPA kernels, forced one by one under backend="sdpa" (None: PyTorch's choice).
SDPA_KERNELS = {None: None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
# What PyTorch raises when a forced SDPA kernel cannot serve a call (CUDA; CPU).
NO_SDPA_KERNEL = ("No available kernel", "No viable backend")


def record(check, ok, **details):
    RESULTS.append({"check": check, "ok": bool(ok), **details})
    status = "ok  " if ok else "FAIL"
    print(f"[{status}] {check} " + " ".join(f"{k}={v}" for k, v in details.items()), flush=True)


def rand(*shape, seed, device, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def key_padding(batch, t2, device, seed=0):
    """Suffix padding ``(B, 1, T2)``, nonzero = keep; the last utterance has no valid key at all."""
    lengths = torch.randint(1, t2 + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    keep = torch.arange(t2)[None] < lengths[:, None]
    keep[-1] = False
    return keep.unsqueeze(1).to(device)


def max_err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def dtypes(device):
    return (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32, torch.bfloat16)


def flash_refusal(device, dtype=torch.bfloat16, d_k=64):
    """Why flash-attn cannot serve an unmasked call with gradients here ("" if it can),
    by the layer's own rules (package, device, GPU generation, dtype, head size)."""
    call = dispatch.AttentionCall(device=device, dtype=dtype, d_k=d_k, mask_kind=masks.NO_MASK, grad=True)
    return dispatch.flash_attn_refusal(call)


def backends(device):
    """The backends to force: flash_attn first where it can serve bf16 here, then sdpa and math."""
    return ([] if flash_refusal(device) else [FLASH_ATTN]) + [SDPA, MATH]


def note_flash(check, device):
    """Record, once per case, that flash-attn was left out here and why."""
    reason = flash_refusal(device)
    if reason:
        record(check, True, backend=FLASH_ATTN, skipped=f"flash-attn not available here: {reason}"[:120])


def pairs(n_feat, n_head, device, seed=0, **options):
    """``(dtype, backend) -> (stock, ours)``, the same weights for every call."""
    return lambda dtype, backend: stock_and_flash(n_feat, n_head, dtype=dtype, device=device, seed=seed,
                                                  backend=backend, **options)


def forward_backward(layer, inputs, mask, weights):
    """float64 [output ``(B, T1, D)``, query gradient, memory gradient if any] of ``layer`` on
    ``inputs`` = (query, memory or None) cast to its dtype; the loss is ``(out * weights).sum()``."""
    dtype = layer.linear_out.weight.dtype
    leaves = [None if x is None else x.to(dtype, copy=True).requires_grad_() for x in inputs]
    out, _ = layer(*leaves, mask)
    (out.double() * weights).sum().backward()
    return [t.detach().double() for t in [out] + [x.grad for x in leaves if x is not None]]


def compare(check, device, make_pair, run, *, stock_mask, mask, expressible, hint="", auto_fallback=SDPA,
            sdpa_kernels=False, **details):
    """Run our layer per backend and dtype against the stock layer in float64; record each run.

    Args:
        make_pair: ``(dtype, backend) -> (stock, ours)``; run: ``(layer, mask) -> [float64 tensors]``.
        stock_mask, mask: what the stock layer and ours are given (they differ for causal layers).
        expressible: flash-attn can serve the call; if not, ``auto`` must run ``auto_fallback``
            and say ``hint`` in ``last_fallback``, and a forced ``flash_attn`` must refuse with it.
        sdpa_kernels: also force each of PyTorch's SDPA kernels under ``backend="sdpa"`` (those
            that cannot serve the call are recorded as skipped).

    Bound: each tensor's error against the float64 stock result at most twice the baseline's, plus
    one rounding at the tensor's scale. The baseline is the stock layer in the same dtype, or our
    math backend (the stock formula) where it cannot run: bf16 with a mask (numpy has no bfloat16).
    """
    reference = run(make_pair(torch.float64, MATH)[0], stock_mask)
    for dtype in dtypes(device):
        stock, math_layer = make_pair(dtype, MATH)
        stock_runs = dtype != torch.bfloat16 or stock_mask is None
        baseline = run(stock, stock_mask) if stock_runs else run(math_layer, mask)
        flash_ok = not flash_refusal(device, dtype, stock.d_k)
        for asked in ([AUTO, FLASH_ATTN] if flash_ok else [AUTO]) + [SDPA, MATH]:
            kernels = SDPA_KERNELS if sdpa_kernels and asked == SDPA else [None]
            if asked == AUTO:
                expected = FLASH_ATTN if flash_ok and expressible else auto_fallback
            else:
                expected = None if asked == FLASH_ATTN and not expressible else asked  # None: must refuse
            for kernel in kernels:
                where = dict(asked=asked, **({"kernel": kernel} if kernel else {}), dtype=dtype_name(dtype), **details)
                _, ours = make_pair(dtype, asked)
                try:
                    with sdpa_kernel(SDPA_KERNELS[kernel]) if kernel else contextlib.nullcontext():
                        got = run(ours, mask)
                except dispatch.BackendUnavailableError as exc:
                    if kernel and "sdpa_kernel allows SDPA" in str(exc):  # refused by us, not by PyTorch (CPU)
                        record(check, True, **where, skipped="PyTorch has no such kernel for this call")
                    else:
                        record(check, expected is None and hint in str(exc), **where, refused=str(exc)[:90])
                    continue
                except Exception as exc:  # a kernel error is a finding: record it, go on with the rest
                    if kernel and any(text in str(exc) for text in NO_SDPA_KERNEL):
                        record(check, True, **where, skipped="PyTorch has no such kernel for this call")
                    else:
                        record(check, False, **where, error=repr(exc)[:200])
                    continue
                routed = ours.last_backend == expected
                if asked == AUTO and flash_ok and not expressible:
                    routed = routed and hint in ours.last_fallback
                eps = torch.finfo(dtype).eps
                errors = [max_err(g, r) for g, r in zip(got, reference)]
                bases = [max_err(b, r) for b, r in zip(baseline, reference)]
                within = all(e <= 2 * b + eps * float(r.abs().max()) for e, b, r in zip(errors, bases, reference))
                finite = all(bool(g.isfinite().all()) for g in got)
                record(check, routed and within and finite, **where, backend=ours.last_backend,
                       err="/".join(f"{e:.1e}" for e in errors), base="/".join(f"{b:.1e}" for b in bases),
                       baseline="stock" if stock_runs else "math")


def check_causal(device, quick):
    """Causal self-attention (``causal=True``, ``memory=None``) against the stock layer given an
    explicit causal mask, alone and combined with key padding; forward and gradients. flash-attn
    serves the unpadded calls (its bottom-right causal alignment equals top-left for T1 == T2);
    causal with padding cannot be unpadded, so ``auto`` must route it to SDPA."""
    note_flash("causal_self_attention", device)
    n_feat, n_head = (32, 4) if quick else (256, 4)
    make_pair = pairs(n_feat, n_head, device, causal=True)
    for t in ((1, 9) if quick else (1, 64, 129, 320)):
        query = rand(3, t, n_feat, seed=10 + t, device=device)
        weights = rand(3, t, n_feat, seed=20 + t, device=device).double()
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]  # (1, T, T): i sees j <= i
        for padding in (None, key_padding(3, t, device, seed=t)):
            compare("causal_self_attention", device, make_pair,
                    lambda layer, mask: forward_backward(layer, (query, None), mask, weights),
                    stock_mask=causal if padding is None else causal & padding, mask=padding,
                    expressible=padding is None, hint="causal attention with a padding mask",
                    t=t, padded=padding is not None)


def holed_masks(batch, t1, t2, device, seed):
    """A key mask with holes ``(B, 1, T2)`` (never a suffix: the first key masked, the last
    kept; one utterance fully masked) and a per-query mask ``(B, T1, T2)`` with an empty row."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(batch, 1, t2, generator=gen) > 0.4
    keys[..., 0], keys[..., -1], keys[-1] = False, True, False
    per_query = torch.rand(batch, t1, t2, generator=gen) > 0.4
    per_query[0, -1] = False
    return keys.to(device), per_query.to(device)


def check_holed_masks(device, quick):
    """Masks that are not suffix padding. A key mask with holes is still one key set per
    utterance: flash-attn's varlen call takes it (the glue gathers the kept keys; without
    causality the order of keys does not matter). A per-query mask (also with batch 1) it
    cannot express: ``auto`` must route it to SDPA and a forced flash_attn must refuse."""
    note_flash("holed_masks", device)
    n_feat, n_head = (32, 4) if quick else (256, 4)
    batch, t1, t2 = (3, 5, 11) if quick else (4, 37, 300)
    make_pair = pairs(n_feat, n_head, device)
    query, memory = rand(batch, t1, n_feat, seed=41, device=device), rand(batch, t2, n_feat, seed=42, device=device)
    for self_attention in (False, True):
        t = t1 if self_attention else t2
        keys, per_query = holed_masks(batch, t1, t, device, seed=t)
        inputs = (query, None if self_attention else memory)
        weights = rand(batch, t1, n_feat, seed=43, device=device).double()
        for kind, mask in (("key_holes", keys), ("per_query", per_query), ("per_query_b1", per_query[:1])):
            if self_attention and kind == "per_query_b1":
                continue
            compare("holed_masks", device, make_pair,
                    lambda layer, mask: forward_backward(layer, inputs, mask, weights),
                    stock_mask=mask, mask=mask, expressible=kind == "key_holes", hint="differs per query",
                    mask_kind=kind, self_attention=self_attention)


def check_fragile_lengths(device, quick):
    """Lengths upstream trackers report as fragile, per backend and per SDPA kernel:
    T % 128 == 64 with a mask and gradients (cuDNN attention NaN in the query gradient on
    H100/H200, pytorch #196678; ``auto`` sends fp16/bf16 to flash-attn when it is installed, so
    backend="sdpa" is forced here to reach PyTorch's kernels)."""
    note_flash("fragile_lengths", device)
    n_feat, n_head = (32, 4) if quick else (256, 4)
    make_pair = pairs(n_feat, n_head, device)
    for t in ((64,) if quick else (64, 192, 320)):
        for self_attention in (True, False):
            t1 = t if self_attention else 9
            query = rand(3, t1, n_feat, seed=50 + t, device=device)
            inputs = (query, None if self_attention else rand(3, t, n_feat, seed=51 + t, device=device))
            weights = rand(3, t1, n_feat, seed=52 + t, device=device).double()
            padding = key_padding(3, t, device, seed=t)
            cases = [("key_padding", padding)]
            if self_attention:
                cases.append(("per_query", padding & torch.rand(3, t, t, generator=torch.Generator().manual_seed(t))
                              .gt(0.3).to(device)))
            for kind, mask in cases:
                compare("fragile_lengths", device, make_pair,
                        lambda layer, mask: forward_backward(layer, inputs, mask, weights),
                        stock_mask=mask, mask=mask, expressible=kind == "key_padding", hint="differs per query",
                        sdpa_kernels=True, t1=t1, t2=t, mask_kind=kind)


def check_dropout(device, quick):
    """Attention dropout, which no kernel reproduces bit for bit. Eval mode ignores it (matches the
    stock layer). In training, with one-hot values (``linear_v`` and ``linear_out`` the identity, key
    j = unit vector j in every head) the output *is* the dropped weights, so per backend: the share
    dropped is p (within 5 sigma), kept weights are the eval weights / (1 - p), masked keys stay 0,
    the backward drops the same weights (read out of ``linear_v``'s weight gradient, the loss picking
    query i in feature i of each head), a seed reproduces them and another seed does not."""
    p = 0.25
    n_head, d_k = (2, 16) if quick else (4, 64)
    n_feat, t = n_head * d_k, d_k  # T1 = T2 = d_k: one-hot keys need T2 <= d_k, the read-out T1 <= d_k
    query, memory = rand(3, 7, n_feat, seed=70, device=device), rand(3, 11, n_feat, seed=71, device=device)
    weights, mask = rand(3, 7, n_feat, seed=72, device=device).double(), key_padding(3, 11, device)
    compare("dropout_eval", device, pairs(n_feat, n_head, device, dropout=p),
            lambda layer, mask: forward_backward(layer, (query, memory), mask, weights),
            stock_mask=mask, mask=mask, expressible=True)
    note_flash("dropout_train", device)
    one_hot = torch.zeros(1, t, n_feat, device=device)
    for j in range(t):
        one_hot[0, j, j::d_k] = 1.0  # position j: feature j of every head
    query = rand(1, t, n_feat, seed=73, device=device)
    holes = torch.ones(1, 1, t, dtype=torch.bool, device=device)
    holes[..., 1], holes[..., -3:] = False, False
    for dtype in dtypes(device):
        for backend in ([] if flash_refusal(device, dtype, d_k) else [FLASH_ATTN]) + [SDPA, MATH]:
            for mask in (None, holes):
                stock, ours = stock_and_flash(n_feat, n_head, dtype=torch.float32, device=device, backend=backend,
                                              dropout=p)
                with torch.no_grad():
                    for linear in (stock.linear_v, stock.linear_out):
                        linear.weight.copy_(torch.eye(n_feat))
                        linear.bias.zero_()
                ours.load_state_dict(stock.state_dict())
                ours.to(dtype)
                x, keys = query.to(dtype), one_hot.to(dtype)
                try:
                    runs = dropout_runs(ours, x, keys, mask, one_hot)
                except Exception as exc:  # a kernel error is a finding
                    record("dropout_train", False, asked=backend, dtype=dtype_name(dtype), error=repr(exc)[:200])
                    continue
                keep = torch.ones(1, 1, t, dtype=torch.bool, device=device) if mask is None else mask
                record("dropout_train", **dropout_verdict(runs, keep.expand(n_head, t, t), p, dtype),
                       backend=ours.last_backend, dtype=dtype_name(dtype), masked=mask is not None)


def dropout_runs(layer, x, keys, mask, read_out):
    """Eval weights, then three training runs (seeds 1, 1, 2) of the one-hot probe: each
    (dropped weights ``(H, T1, T2)``, their copy from the backward, all finite)."""
    n_head, d_k, t = layer.h, layer.d_k, x.size(1)

    def weights_of(out):  # (1, T1, D) -> (H, T1, T2): feature j of head h is the weight of key j
        return out.detach().view(t, n_head, d_k).transpose(0, 1).float()

    with torch.no_grad():
        runs = [(weights_of(layer.eval()(x, keys, mask)[0]), None, True)]
    layer.train()
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        layer.zero_grad(set_to_none=True)
        leaf = x.detach().requires_grad_()
        out, _ = layer(leaf, keys, mask)
        (out.float() * read_out).sum().backward()
        # d loss / d W_v[h * d_k + i, j] = dropped weight of query i on key j in head h
        grad_v = layer.linear_qkv.weight.grad[2 * layer.n_feat:, :t].view(n_head, d_k, t).float()
        runs.append((weights_of(out), grad_v, bool(out.isfinite().all() and leaf.grad.isfinite().all())))
    return runs


def dropout_verdict(runs, keep, p, dtype):
    """``record`` arguments for the probe's runs (see :func:`check_dropout`); keep ``(H, T1, T2)``."""
    (eval_weights, _, _), (dropped, grad, finite), (again, _, _), (other, _, _) = runs
    kept_weight = eval_weights / (1 - p)
    if not bool((eval_weights[keep] > 0).all()):
        return dict(ok=False, error="an eval weight of a kept key is 0: the probe cannot tell dropped weights")
    zero = dropped == 0
    n = int(keep.sum())
    rate = float((zero & keep).sum()) / n
    kept = keep & ~zero
    scale_err = float(((dropped - kept_weight).abs() / kept_weight)[kept].max())
    grad_err = float(((grad - dropped).abs() / kept_weight)[kept].max())
    masked_zero = bool((dropped[~keep] == 0).all() and (grad[~keep] == 0).all())
    same_in_backward = torch.equal(grad == 0, zero) and grad_err <= 8 * torch.finfo(dtype).eps
    checks = dict(rate=abs(rate - p) <= 5 * (p * (1 - p) / n) ** 0.5, scale=scale_err <= 8 * torch.finfo(dtype).eps,
                  masked_zero=masked_zero, backward=same_in_backward, finite=finite,
                  reproducible=torch.equal(dropped, again), seeded=not torch.equal(zero, other == 0))
    return dict(ok=all(checks.values()), rate=f"{rate:.3f}", n=n, scale_err=f"{scale_err:.1e}",
                grad_err=f"{grad_err:.1e}", failed=",".join(k for k, v in checks.items() if not v) or "-")
